//! Secrets stay out of logs: every line of a full job run, at trace level and in the JSON format
//! the functions log in on Lambda, with ModelsLab, its webhook and Google Drive configured
//! against test servers, is searched for every key, token and secret involved.
//!
//! A test binary of its own, with the capturing subscriber as the process's global default:
//! a thread-scoped one misses events whose callsites other tests, running at the same time on
//! other threads, have already cached as uninteresting.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use serde_json::{json, Value};
use shared::{
    generator::{Downloader, ModelsLab},
    model::JobType,
    queue::Dispatcher,
    worker::{run_claimed, Outcome},
};
use tracing_subscriber::fmt::MakeWriter;
use uuid::Uuid;
use wiremock::{
    matchers::{method, path, query_param},
    Mock, MockServer, ResponseTemplate,
};

#[path = "it/support.rs"]
#[allow(dead_code)]
mod support;

use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const ML_KEY: &str = "fake-modelslab-key-for-the-log-test";
const REFRESH: &str = "fake-refresh-token-for-the-log-test";
const ACCESS: &str = "fake-access-token-for-the-log-test";
const CLIENT_SECRET: &str = "fake-client-secret-for-the-log-test";
const CALLBACK_SECRET: &str = "fake-callback-secret-for-the-log-test-0123";

#[tokio::test]
async fn a_full_job_run_logs_no_key_token_or_secret() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber here");

    let ml = MockServer::start().await;
    let google = MockServer::start().await;
    let (ml_uri, g_uri) = (ml.uri(), google.uri());
    let token_url = format!("{g_uri}/token");
    let api_url = format!("{g_uri}/drive/v3");
    let upload_url = format!("{g_uri}/upload/drive/v3");
    let host = ml.address().to_string();
    let seal_key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let mut t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[
            ("GENERATOR", "modelslab"),
            ("MODELSLAB_API_KEY", ML_KEY),
            ("MODELSLAB_BASE_URL", &ml_uri),
            ("DOWNLOAD_ALLOW_HTTP_HOSTS", &host),
            ("CALLBACK_BASE_URL", "https://jobs.example.com"),
            ("CALLBACK_SECRET", CALLBACK_SECRET),
            ("MEDIA_STORE", "google-drive"),
            ("GOOGLE_CLIENT_ID", "client-id"),
            ("GOOGLE_CLIENT_SECRET", CLIENT_SECRET),
            ("GOOGLE_TOKEN_URL", &token_url),
            ("GOOGLE_DRIVE_API_URL", &api_url),
            ("GOOGLE_DRIVE_UPLOAD_URL", &upload_url),
            ("DRIVE_TOKEN_KEY", &seal_key),
        ],
    )
    .await;
    tracing::info!(config = ?t.app.config, "configuration loaded");
    t.app.generator = Arc::new(ModelsLab::new(
        t.app.config.modelslab.clone().unwrap(),
        Downloader::new(t.app.config.downloads.clone()),
    ));

    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "access_token": ACCESS, "expires_in": 3599, "refresh_token": REFRESH }),
        ))
        .mount(&google)
        .await;
    Mock::given(method("POST"))
        .and(path("/drive/v3/files"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": "folder" })))
        .mount(&google)
        .await;
    let session = format!("{g_uri}/upload/session/s1");
    Mock::given(method("POST"))
        .and(path("/upload/drive/v3/files"))
        .and(query_param("uploadType", "resumable"))
        .respond_with(ResponseTemplate::new(200).insert_header("location", session.as_str()))
        .mount(&google)
        .await;
    Mock::given(method("PUT"))
        .and(path("/upload/session/s1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "id": "file", "webViewLink": "https://drive.google.com/file/d/file/view" }),
        ))
        .mount(&google)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v6/video/img2video"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({ "status": "processing", "id": 31, "eta": 30, "output": [] }),
            ),
        )
        .mount(&ml)
        .await;
    Mock::given(method("GET"))
        .and(path("/cdn/v.mp4"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(b"mp4-bytes".to_vec(), "video/mp4"))
        .mount(&ml)
        .await;

    let alice = user("alice", None);
    let (status, _) = call(
        &t.app,
        api_request(
            "PUT",
            "/api/drive/connection",
            Some(&alice),
            Some(&json!({ "refreshToken": REFRESH }).to_string()),
        ),
    )
    .await;
    assert_eq!(status, 200);

    // An animation from one of alice's images: submitted, then finished by the webhook.
    let (status, image) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice),
            Some(&json!({ "characterId": Uuid::new_v4() }).to_string()),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let source: Uuid = image["jobId"].as_str().unwrap().parse().unwrap();
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO generated_media (id, job_id, user_id, ordinal, media_type, mime_type, storage, \
         storage_key, public_url, size_bytes) \
         VALUES ($1, $1, 'alice', 0, 'image', 'image/png', 'local', 'k', 'https://m.example/a.png', 1)",
        &[&source],
    )
    .await
    .unwrap();
    let id = t
        .insert_with(
            &alice,
            JobType::Animation,
            json!({ "sourceImageId": source, "prompt": "wave" }),
        )
        .await;
    assert_eq!(
        run_claimed(&t.app, claim(&t, id).await).await.unwrap(),
        Outcome::Submitted
    );
    let submitted = ml
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.url.path() == "/api/v6/video/img2video")
        .unwrap();
    let sent: Value = serde_json::from_slice(&submitted.body).unwrap();
    let webhook = reqwest::Url::parse(sent["webhook"].as_str().unwrap()).unwrap();
    let callback_token = webhook
        .query_pairs()
        .find(|(k, _)| k == "token")
        .unwrap()
        .1
        .into_owned();
    let done = json!({ "status": "success", "id": 31, "output": [format!("{ml_uri}/cdn/v.mp4")] });
    let mut req = api_request("POST", webhook.path(), None, Some(&done.to_string()));
    *req.uri_mut() = format!("{}?{}", webhook.path(), webhook.query().unwrap())
        .parse()
        .unwrap();
    let (status, body) = call(&t.app, req).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("completed")));
    // A forged callback is refused and logged as such.
    let mut forged = api_request("POST", webhook.path(), None, Some("{}"));
    *forged.uri_mut() = format!("{}?attempt=1&token=forged", webhook.path())
        .parse()
        .unwrap();
    assert_eq!(call(&t.app, forged).await.0, 401);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The run was logged: every step that handles a secret left its line.
    for step in [
        "Google Drive connected",
        "submitted to the provider",
        "provider callback",
        "provider callback with a bad token refused",
        "job settled",
    ] {
        assert!(text.contains(step), "no {step:?} line in the logs:\n{text}");
    }
    for secret in [
        ML_KEY,
        REFRESH,
        ACCESS,
        CLIENT_SECRET,
        CALLBACK_SECRET,
        seal_key.as_str(),
        callback_token.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} appeared in the logs");
    }
}
