//! Google Drive as the media store, through real HTTP against a wiremock server that answers as
//! Google's OAuth token endpoint and the Drive v3 API document.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use shared::{
    model::{Identity, JobType},
    queue::Dispatcher,
    worker::{run_claimed, Outcome},
};
use uuid::Uuid;
use wiremock::{
    matchers::{body_string_contains, header, method, path, query_param},
    Mock, MockServer, Request, ResponseTemplate,
};

use crate::support::*;

const REFRESH: &str = "1//refresh-token-for-alice";

struct Google {
    t: TestApp,
    g: MockServer,
}

impl Google {
    async fn start() -> Self {
        let g = MockServer::start().await;
        let uri = g.uri();
        let (token, api, upload) = (
            format!("{uri}/token"),
            format!("{uri}/drive/v3"),
            format!("{uri}/upload/drive/v3"),
        );
        let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
        let t = TestApp::configured(
            |_| Dispatcher::embedded(),
            Duration::ZERO,
            &[
                ("MEDIA_STORE", "google-drive"),
                ("GOOGLE_CLIENT_ID", "client-id.apps.googleusercontent.com"),
                ("GOOGLE_CLIENT_SECRET", "google-client-secret"),
                ("GOOGLE_TOKEN_URL", &token),
                ("GOOGLE_DRIVE_API_URL", &api),
                ("GOOGLE_DRIVE_UPLOAD_URL", &upload),
                ("DRIVE_TOKEN_KEY", &key),
            ],
        )
        .await;
        Self { t, g }
    }

    /// The token endpoint hands out `access` (and, for a code, a refresh token).
    async fn tokens(&self, access: &str) {
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "access_token": access, "expires_in": 3599, "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/drive.file",
                "refresh_token": REFRESH
            })))
            .mount(&self.g)
            .await;
    }

    async fn drive_api(&self) {
        Mock::given(method("POST"))
            .and(path("/drive/v3/files"))
            .and(body_string_contains("application/vnd.google-apps.folder"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": "folder-1" })))
            .mount(&self.g)
            .await;
        Mock::given(method("POST"))
            .and(path("/upload/drive/v3/files"))
            .and(query_param("uploadType", "multipart"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "file-img", "webViewLink": "https://drive.google.com/file/d/file-img/view"
            })))
            .mount(&self.g)
            .await;
        let session = format!("{}/upload/session/abc", self.g.uri());
        Mock::given(method("POST"))
            .and(path("/upload/drive/v3/files"))
            .and(query_param("uploadType", "resumable"))
            .and(header("x-upload-content-type", "video/webm"))
            .respond_with(ResponseTemplate::new(200).insert_header("location", session.as_str()))
            .mount(&self.g)
            .await;
        Mock::given(method("PUT"))
            .and(path("/upload/session/abc"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "file-vid", "webViewLink": "https://drive.google.com/file/d/file-vid/view"
            })))
            .mount(&self.g)
            .await;
    }

    /// The first token request (the connect) answers `access-1`; later ones fall through to
    /// whatever else is mounted.
    async fn first_token_then_refreshes(&self) {
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "access_token": "access-1", "expires_in": 3599, "token_type": "Bearer"
            })))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&self.g)
            .await;
    }

    /// Connects alice, then lets her access token run out, as an hour passing would.
    async fn connect_with_an_expired_access_token(&self) {
        self.connect(&alice(), json!({ "refreshToken": REFRESH }))
            .await;
        let conn = self.t.db.pool.get().await.unwrap();
        conn.execute(
            "UPDATE drive_connections SET access_expires_at = now()",
            &[],
        )
        .await
        .unwrap();
    }

    async fn connect(&self, who: &Identity, body: Value) -> (u16, Value) {
        call(
            &self.t.app,
            api_request(
                "PUT",
                "/api/drive/connection",
                Some(who),
                Some(&body.to_string()),
            ),
        )
        .await
    }

    async fn requests(&self, p: &str) -> Vec<Request> {
        self.g
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path() == p)
            .collect()
    }

    async fn job(&self, who: &Identity, job_type: JobType) -> Uuid {
        let params = json!({ "prompt": "x", "sourceImageId": Uuid::new_v4() });
        self.t.insert_with(who, job_type, params).await
    }

    async fn run(&self, id: Uuid) -> Outcome {
        run_claimed(&self.t.app, claim(&self.t, id).await)
            .await
            .unwrap()
    }
}

fn alice() -> Identity {
    user("alice", Some("tenant-x"))
}

#[tokio::test]
async fn a_refresh_token_is_checked_with_google_stored_sealed_and_can_be_disconnected() {
    let d = Google::start().await;
    d.tokens("access-1").await;
    let (status, body) = d
        .connect(&alice(), json!({ "refreshToken": REFRESH }))
        .await;
    assert_eq!(
        (status, body["connected"].as_bool()),
        (200, Some(true)),
        "{body}"
    );

    let asked = d.requests("/token").await;
    let form = String::from_utf8_lossy(&asked[0].body).to_string();
    assert!(form.contains("grant_type=refresh_token"));
    assert!(form.contains("client_id=client-id.apps.googleusercontent.com"));

    // A dump of the table shows neither token.
    let conn = d.t.db.pool.get().await.unwrap();
    let dump: String = conn
        .query_one(
            "SELECT drive_connections::text AS row FROM drive_connections",
            &[],
        )
        .await
        .unwrap()
        .get("row");
    assert!(!dump.contains("refresh-token-for-alice") && !dump.contains("access-1"));
    let hex_of = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(!dump.contains(&hex_of("refresh-token-for-alice")));

    let (_, shown) = call(
        &d.t.app,
        api_request("GET", "/api/drive/connection", Some(&alice()), None),
    )
    .await;
    assert_eq!(shown["connected"], true);
    let (_, bobs) = call(
        &d.t.app,
        api_request(
            "GET",
            "/api/drive/connection",
            Some(&user("bob", None)),
            None,
        ),
    )
    .await;
    assert_eq!(bobs["connected"], false, "a connection is its user's alone");

    let (status, _) = call(
        &d.t.app,
        api_request("DELETE", "/api/drive/connection", Some(&alice()), None),
    )
    .await;
    assert_eq!(status, 200);
    let (_, shown) = call(
        &d.t.app,
        api_request("GET", "/api/drive/connection", Some(&alice()), None),
    )
    .await;
    assert_eq!(shown["connected"], false);
}

#[tokio::test]
async fn an_authorization_code_is_exchanged_for_the_refresh_token() {
    let d = Google::start().await;
    d.tokens("access-1").await;
    let (status, _) = d
        .connect(
            &alice(),
            json!({ "code": "4/0Ab-code", "redirectUri": "https://app.example.com/oauth" }),
        )
        .await;
    assert_eq!(status, 200);
    let form = String::from_utf8_lossy(&d.requests("/token").await[0].body).to_string();
    assert!(form.contains("grant_type=authorization_code"));
    assert!(form.contains("code=4%2F0Ab-code"));
    assert!(form.contains("redirect_uri=https%3A%2F%2Fapp.example.com%2Foauth"));
}

#[tokio::test]
async fn a_grant_google_refuses_is_a_422_and_nothing_is_stored() {
    let d = Google::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "Token has been expired or revoked."
        })))
        .mount(&d.g)
        .await;
    let (status, body) = d
        .connect(&alice(), json!({ "refreshToken": "1//stale" }))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "drive_grant_rejected");
    let (_, shown) = call(
        &d.t.app,
        api_request("GET", "/api/drive/connection", Some(&alice()), None),
    )
    .await;
    assert_eq!(shown["connected"], false);
    for bad in [
        json!({}),
        json!({ "refreshToken": "" }),
        json!({ "code": "x" }),
        json!({ "refreshToken": "a", "extra": 1 }),
    ] {
        let (status, _) = d.connect(&alice(), bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
    }
}

#[tokio::test]
async fn without_a_connection_the_generate_routes_answer_connect_drive_required_and_queue_nothing()
{
    let d = Google::start().await;
    for (route, body) in [
        (
            "/api/generate/character",
            json!({ "characterId": Uuid::new_v4() }),
        ),
        (
            "/api/generate/moodboard",
            json!({ "moodboardId": Uuid::new_v4() }),
        ),
        (
            "/api/generate/animation",
            json!({ "moodboardId": Uuid::new_v4(), "sourceImageId": Uuid::new_v4() }),
        ),
    ] {
        let (status, answer) = call(
            &d.t.app,
            api_request("POST", route, Some(&alice()), Some(&body.to_string())),
        )
        .await;
        assert_eq!(status, 400, "{route}");
        assert_eq!(answer["error"]["code"], "CONNECT_DRIVE_REQUIRED");
    }
    let conn = d.t.db.pool.get().await.unwrap();
    let jobs: i64 = conn
        .query_one("SELECT count(*) FROM generation_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs, 0);
}

#[tokio::test]
async fn images_go_into_one_app_folder_by_multipart_upload_and_videos_by_resumable_upload() {
    let d = Google::start().await;
    d.tokens("access-1").await;
    d.drive_api().await;
    d.connect(&alice(), json!({ "refreshToken": REFRESH }))
        .await;
    let (status, _) = call(
        &d.t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice()),
            Some(&json!({ "characterId": Uuid::new_v4() }).to_string()),
        ),
    )
    .await;
    assert_eq!(status, 202, "a connected user may generate");

    let image = d.job(&alice(), JobType::CharacterImage).await;
    let video = d.job(&alice(), JobType::Animation).await;
    assert_eq!(d.run(image).await, Outcome::Completed);
    assert_eq!(d.run(video).await, Outcome::Completed);

    assert_eq!(
        d.requests("/drive/v3/files").await.len(),
        1,
        "the folder is made once"
    );
    let uploads = d.requests("/upload/drive/v3/files").await;
    assert_eq!(uploads.len(), 2);
    for upload in &uploads {
        assert_eq!(
            upload.headers.get("authorization").unwrap(),
            "Bearer access-1"
        );
        assert!(String::from_utf8_lossy(&upload.body).contains("folder-1"));
    }
    assert_eq!(d.requests("/upload/session/abc").await.len(), 1);
    assert_eq!(
        d.requests("/token").await.len(),
        1,
        "the access token is reused"
    );

    let conn = d.t.db.pool.get().await.unwrap();
    let stored = conn
        .query(
            "SELECT storage, storage_key, public_url, media_type FROM generated_media ORDER BY media_type",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = stored
        .iter()
        .map(|r| (r.get("storage"), r.get("storage_key"), r.get("public_url")))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "google-drive".into(),
                "file-img".into(),
                "https://drive.google.com/file/d/file-img/view".into()
            ),
            (
                "google-drive".into(),
                "file-vid".into(),
                "https://drive.google.com/file/d/file-vid/view".into()
            ),
        ]
    );
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_before_the_upload() {
    let d = Google::start().await;
    d.first_token_then_refreshes().await;
    d.tokens("access-2").await;
    d.drive_api().await;
    d.connect_with_an_expired_access_token().await;

    let image = d.job(&alice(), JobType::CharacterImage).await;
    assert_eq!(d.run(image).await, Outcome::Completed);
    assert_eq!(d.requests("/token").await.len(), 2);
    let upload = &d.requests("/upload/drive/v3/files").await[0];
    assert_eq!(
        upload.headers.get("authorization").unwrap(),
        "Bearer access-2"
    );
}

#[tokio::test]
async fn a_revoked_connection_fails_the_job_asking_the_user_to_reconnect() {
    let d = Google::start().await;
    d.first_token_then_refreshes().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_grant", "error_description": "Token has been expired or revoked."
        })))
        .mount(&d.g)
        .await;
    d.drive_api().await;
    d.connect_with_an_expired_access_token().await;

    let image = d.job(&alice(), JobType::CharacterImage).await;
    assert_eq!(d.run(image).await, Outcome::Failed);
    let row = d.t.job_row(image).await;
    let message: String = row.get("error_message");
    assert!(message.contains("reconnect Google Drive"), "{message}");
    assert!(!message.contains(REFRESH));
}

#[tokio::test]
async fn an_unavailable_drive_is_retried_rather_than_failing_the_job() {
    let d = Google::start().await;
    d.tokens("access-1").await;
    Mock::given(method("POST"))
        .and(path("/drive/v3/files"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({
            "error": { "code": 503, "message": "The service is currently unavailable." }
        })))
        .mount(&d.g)
        .await;
    d.connect(&alice(), json!({ "refreshToken": REFRESH }))
        .await;
    let image = d.job(&alice(), JobType::CharacterImage).await;
    assert!(matches!(d.run(image).await, Outcome::Requeued { .. }));
}
