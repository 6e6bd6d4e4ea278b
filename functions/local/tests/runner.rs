//! The local runner end to end over real HTTP: token, enqueue, status, media, errors.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use shared::{auth::LocalVerifier, db, App};
use uuid::Uuid;

struct Runner {
    base: String,
    token: String,
    verifier: Arc<LocalVerifier>,
    running: local::Running,
    db_name: String,
    media: std::path::PathBuf,
}

async fn start_runner() -> Runner {
    let db_name = format!("mj_test_{}", Uuid::new_v4().simple());
    let media = std::env::temp_dir().join(&db_name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
    let media_dir = media.to_string_lossy().into_owned();
    let config = shared::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some(url.clone()),
        "GENERATOR" => Some("simulator".into()),
        "SIMULATOR_DURATION_MS" => Some("300".into()),
        "MEDIA_DIR" => Some(media_dir.clone()),
        "PUBLIC_BASE_URL" => Some(format!("http://127.0.0.1:{port}")),
        _ => None,
    })
    .unwrap();
    db::create_database_if_missing(&config.database_url)
        .await
        .unwrap();
    let app = App::from_config(config).await.unwrap();
    db::migrate(&app.pool).await.unwrap();
    let verifier = Arc::new(LocalVerifier::new(b"test-secret").unwrap());
    let token = local::demo_token(&verifier, "local-user", Some("local-tenant"));
    let running = local::start(app, verifier.clone(), listener, Duration::from_secs(60)).unwrap();
    Runner {
        base: format!("http://127.0.0.1:{port}"),
        token,
        verifier,
        running,
        db_name,
        media,
    }
}

impl Runner {
    async fn stop(self) {
        self.running.stop().await;
        let (client, conn) = tokio_postgres::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .execute(
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name),
                &[],
            )
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.media);
    }
}

#[tokio::test]
async fn a_character_job_posted_over_http_completes_and_its_png_is_served() {
    let r = start_runner().await;
    let http = reqwest::Client::new();
    let posted = http
        .post(format!("{}/api/generate/character", r.base))
        .bearer_auth(&r.token)
        .json(&serde_json::json!({ "characterId": "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b", "prompt": "a knight" }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    let posted: Value = posted.json().await.unwrap();
    let job_id = posted["jobId"].as_str().unwrap().to_owned();
    assert!(matches!(posted["mode"].as_str(), Some("direct")));

    let mut seen = Vec::new();
    let mut last = Value::Null;
    // Poll as the front end does; the bound is generous and only stops a broken run.
    for _ in 0..150 {
        let status: Value = http
            .get(format!("{}/api/generate/status/{job_id}", r.base))
            .bearer_auth(&r.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let state = status["status"].as_str().unwrap().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        last = status;
        if state == "completed" || state == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("completed"),
        "states seen: {seen:?}, last: {last}"
    );
    assert!(
        seen.iter()
            .all(|s| ["queued", "processing", "completed"].contains(&s.as_str())),
        "{seen:?}"
    );

    let image = http
        .get(last["result"]["publicUrl"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    assert_eq!(image.headers()["content-type"], "image/png");
    assert_eq!(&image.bytes().await.unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    r.stop().await;
}

#[tokio::test]
async fn the_runner_refuses_missing_forged_and_expired_tokens_and_hides_other_users_jobs() {
    let r = start_runner().await;
    let http = reqwest::Client::new();
    let status_url = |id: &str| format!("{}/api/generate/status/{id}", r.base);

    let no_token = http
        .get(status_url(&Uuid::now_v7().to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let body: Value = no_token.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    let forged = local::demo_token(
        &LocalVerifier::new(b"not-the-secret").unwrap(),
        "local-user",
        None,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = r
        .verifier
        .issue(&shared::auth::Claims {
            sub: "local-user".into(),
            tenant_id: None,
            exp: now - 3600,
            iat: None,
        })
        .unwrap();
    for bad in [forged.as_str(), expired.as_str(), "not-a-jwt"] {
        let answer = http
            .get(status_url(&Uuid::now_v7().to_string()))
            .bearer_auth(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401, "token {bad}");
    }

    let posted: Value = http
        .post(format!("{}/api/generate/moodboard", r.base))
        .bearer_auth(&r.token)
        .json(&serde_json::json!({ "moodboardId": "2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = posted["jobId"].as_str().unwrap();
    let other = local::demo_token(&r.verifier, "someone-else", Some("local-tenant"));
    let theirs = http
        .get(status_url(job_id))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), 404);
    let unknown = http
        .get(status_url(&Uuid::now_v7().to_string()))
        .bearer_auth(&r.token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let a: Value = theirs.json().await.unwrap();
    let b: Value = unknown.json().await.unwrap();
    assert_eq!(a, b);

    let health = http
        .get(format!("{}/api/health", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health needs no token");
    let traversal = http
        .get(format!("{}/media/x/..%2f..%2fCargo.toml", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(traversal.status(), 404);
    r.stop().await;
}
