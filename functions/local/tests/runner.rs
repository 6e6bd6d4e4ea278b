//! The local runner end to end over real HTTP: token, enqueue, status, media, errors.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use shared::{auth::LocalVerifier, db, App};
use uuid::Uuid;

struct Runner {
    base: String,
    token: String,
    verifier: Arc<LocalVerifier>,
    running: Option<local::Running>,
    db_name: String,
    media: std::path::PathBuf,
}

async fn start_runner() -> Runner {
    start_runner_with(&[], Duration::from_secs(60)).await
}

async fn start_runner_with(extra: &[(&str, &str)], poll_every: Duration) -> Runner {
    start_runner_on(extra, poll_every, None).await
}

/// A runner whose worker takes its jobs from `queue` (an SQS API and a queue's URL) instead of
/// the embedded queue.
async fn start_runner_on(
    extra: &[(&str, &str)],
    poll_every: Duration,
    queue: Option<(aws_sdk_sqs::Client, String)>,
) -> Runner {
    let extra: std::collections::HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let db_name = format!("mj_test_{}", Uuid::new_v4().simple());
    let media = std::env::temp_dir().join(&db_name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
    let media_dir = media.to_string_lossy().into_owned();
    let config = shared::Config::from_lookup(|name| match name {
        _ if extra.contains_key(name) => extra.get(name).cloned(),
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
    let mut app = App::from_config(config).await.unwrap();
    if let Some((client, url)) = queue {
        app.queue = shared::queue::Dispatcher::sqs(client, url);
    }
    db::migrate(&app.pool).await.unwrap();
    let verifier = Arc::new(LocalVerifier::new(b"test-secret").unwrap());
    let token = local::demo_token(&verifier, "local-user", Some("local-tenant"));
    let running = local::start(app, verifier.clone(), listener, poll_every).unwrap();
    Runner {
        base: format!("http://127.0.0.1:{port}"),
        token,
        verifier,
        running: Some(running),
        db_name,
        media,
    }
}

async fn connect(database: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:5432/{database}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
}

impl Runner {
    /// Stops the service as Ctrl-C does, keeping its database.
    async fn stop_service(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    async fn job_status(&self, id: &str) -> String {
        connect(&self.db_name)
            .await
            .query_one(
                "SELECT status::text FROM generation_jobs WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Starts a job of `kind` (`character`, `moodboard`, `animation`) as the runner's user:
    /// its id.
    async fn post_job(&self, kind: &str, body: Value) -> String {
        let posted: Value = reqwest::Client::new()
            .post(format!("{}/api/generate/{kind}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        posted["jobId"].as_str().unwrap().to_owned()
    }

    async fn post_character(&self) -> String {
        self.post_job(
            "character",
            serde_json::json!({ "characterId": Uuid::new_v4(), "prompt": "a knight" }),
        )
        .await
    }

    /// Stops the service, which must not wait out a lease (five minutes) for a slot never given
    /// back: the bound is far above the jobs' run time.
    async fn stop_within_a_bound(&mut self) {
        tokio::time::timeout(Duration::from_secs(60), self.stop_service())
            .await
            .expect("the stop waited for its running job, not for a lease");
    }

    /// Waits until the job runs (the bound only stops a broken run).
    async fn until_processing(&self, id: &str) {
        for _ in 0..200 {
            if self.job_status(id).await == "processing" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("job {id} never started");
    }

    async fn stop(mut self) {
        self.stop_service().await;
        connect("postgres")
            .await
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

    // Poll as the front end does.
    let mut seen = Vec::new();
    let last = wait_for(&http, &r, &job_id, &["completed", "failed"], &mut seen).await;
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
            ..Default::default()
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

    let job_id = &r
        .post_job(
            "moodboard",
            serde_json::json!({ "moodboardId": "2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c" }),
        )
        .await;
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

/// ModelsLab as a test server: a character image comes back at once, the animation made from it
/// is accepted as processing and is ready at the second fetch.
async fn modelslab() -> wiremock::MockServer {
    use wiremock::{
        matchers::{method, path},
        Mock, MockServer, ResponseTemplate,
    };
    let ml = MockServer::start().await;
    let cdn = |name: &str| format!("{}/cdn/{name}", ml.uri());
    let png = b"\x89PNG\r\n\x1a\n-not-decoded-by-anyone".to_vec();
    let mp4 = b"\x00\x00\x00\x18ftypmp42-a-short-video".to_vec();
    for (name, bytes, mime) in [("c.png", png, "image/png"), ("v.mp4", mp4, "video/mp4")] {
        Mock::given(method("GET"))
            .and(path(format!("/cdn/{name}")))
            .respond_with(ResponseTemplate::new(200).set_body_raw(bytes, mime))
            .mount(&ml)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/api/v6/images/text2img"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "status": "success", "id": 1, "output": [cdn("c.png")], "nsfw_content_detected": false
        })))
        .mount(&ml)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v6/video/img2video"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "status": "processing", "id": 4321, "eta": 1, "output": [],
            "fetch_result": format!("{}/api/v6/video/fetch/4321", ml.uri()),
            "future_links": [cdn("v.mp4")]
        })))
        .mount(&ml)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v6/video/fetch/4321"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "status": "processing", "id": 4321, "eta": 1, "output": []
        })))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&ml)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v6/video/fetch/4321"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "status": "success", "id": 4321, "output": [cdn("v.mp4")]
        })))
        .mount(&ml)
        .await;
    ml
}

async fn wait_for(
    http: &reqwest::Client,
    r: &Runner,
    job_id: &str,
    until: &[&str],
    seen: &mut Vec<String>,
) -> Value {
    // The bound is generous and only stops a broken run.
    for _ in 0..300 {
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
        if until.contains(&state.as_str()) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job_id} never reached {until:?}; states seen: {seen:?}");
}

#[tokio::test]
async fn an_animation_waits_on_modelslab_and_the_poller_completes_it_with_its_video_served() {
    let ml = modelslab().await;
    let uri = ml.uri();
    let host = ml.address().to_string();
    let r = start_runner_with(
        &[
            ("GENERATOR", "modelslab"),
            ("MODELSLAB_API_KEY", "ml-local-test-key"),
            ("MODELSLAB_BASE_URL", &uri),
            ("DOWNLOAD_ALLOW_HTTP_HOSTS", &host),
            // Only the poller may finish the job: the status route does not check here.
            ("PROVIDER_STATUS_CHECK_SECONDS", "3600"),
            ("POLLER_CHECK_WINDOW_SECONDS", "0"),
        ],
        Duration::from_secs(1),
    )
    .await;
    let http = reqwest::Client::new();

    // A character image first: it becomes the animation's source.
    let character = r.post_character().await;
    let mut seen = Vec::new();
    let image = wait_for(&http, &r, &character, &["completed", "failed"], &mut seen).await;
    assert_eq!(image["status"], "completed", "{image}");

    let job_id = r
        .post_job(
            "animation",
            serde_json::json!({
                "moodboardId": Uuid::new_v4(), "sourceImageId": image["result"]["id"], "prompt": "he waves"
            }),
        )
        .await;
    let mut seen = Vec::new();
    let waiting = wait_for(&http, &r, &job_id, &["processing"], &mut seen).await;
    assert!(waiting["progress"].as_i64().unwrap() < 100);
    let done = wait_for(&http, &r, &job_id, &["completed", "failed"], &mut seen).await;
    assert_eq!(done["status"], "completed", "{done}; states seen: {seen:?}");
    assert_eq!(done["progress"], 100);

    let fetches = ml
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|q| q.url.path() == "/api/v6/video/fetch/4321")
        .count();
    assert_eq!(fetches, 2, "the poller checked until the provider was done");
    let submitted = ml
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.url.path() == "/api/v6/video/img2video")
        .unwrap();
    let sent: Value = serde_json::from_slice(&submitted.body).unwrap();
    assert_eq!(sent["init_image"], image["result"]["publicUrl"]);

    let video = http
        .get(done["result"]["publicUrl"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(video.status(), 200);
    assert_eq!(video.headers()["content-type"], "video/mp4");
    assert_eq!(
        &video.bytes().await.unwrap()[..],
        b"\x00\x00\x00\x18ftypmp42-a-short-video"
    );
    r.stop().await;
}

#[tokio::test]
async fn stopping_the_service_lets_a_running_job_finish_and_write_its_completion() {
    let mut r = start_runner_with(
        &[("SIMULATOR_DURATION_MS", "1500")],
        Duration::from_secs(60),
    )
    .await;
    let job_id = r.post_character().await;
    r.until_processing(&job_id).await;

    r.stop_within_a_bound().await;
    // Cut off mid-run, it would stay processing until its lease ran out, then run again.
    assert_eq!(r.job_status(&job_id).await, "completed");
    r.stop().await;
}

#[tokio::test]
async fn stopping_the_service_lets_a_job_received_from_sqs_finish_deletes_its_message_and_starts_no_more(
) {
    let endpoint = std::env::var("MOTO_ENDPOINT").expect(
        "SQS tests need a local SQS API: run .ci/run, or start `moto_server -p 5000` and set MOTO_ENDPOINT=http://127.0.0.1:5000",
    );
    let client = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "tests",
            ))
            .endpoint_url(endpoint)
            .build(),
    );
    let url = client
        .create_queue()
        .queue_name(format!("jobs-{}", Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut r = start_runner_on(
        &[
            ("SIMULATOR_DURATION_MS", "1500"),
            ("MAX_CONCURRENT_JOBS", "1"),
        ],
        Duration::from_secs(60),
        Some((client.clone(), url.clone())),
    )
    .await;
    let job_id = r.post_character().await;
    // The worker has received its message once the job runs.
    r.until_processing(&job_id).await;
    // Two more wait for the one slot: the worker whose job frees it would run them next.
    let (second, third) = (r.post_character().await, r.post_character().await);

    r.stop_within_a_bound().await;
    assert_eq!(r.job_status(&job_id).await, "completed");
    assert_eq!(
        r.job_status(&second).await,
        "queued",
        "no job starts once stopping"
    );
    assert_eq!(r.job_status(&third).await, "queued");
    let attributes = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    assert_eq!(
        attributes[&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        "0",
        "the message was deleted, not left to come back"
    );
    // The next in line keeps a message, for whichever worker runs next.
    let visible = client
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert!(
        visible
            .iter()
            .any(|m| m.body().is_some_and(|b| b.contains(&second))),
        "{visible:?}"
    );
    client.delete_queue().queue_url(&url).send().await.unwrap();
    r.stop().await;
}
