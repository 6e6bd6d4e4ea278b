//! ModelsLab, through real HTTP against a wiremock server that answers as docs.modelslab.com
//! documents: immediate results, long jobs finished by the poller or a callback, and every
//! failure class. The worker, the poller and the API run against a real Postgres.

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value};
use shared::{
    generator::{Downloader, ModelsLab},
    model::{Identity, JobType},
    queue::Dispatcher,
    worker::{run_claimed, Outcome},
};
use uuid::Uuid;
use wiremock::{
    matchers::{body_partial_json, method, path, path_regex},
    Mock, MockServer, Request, ResponseTemplate,
};

use crate::support::*;

const KEY: &str = "ml-test-key-0123456789";

/// A tiny valid PNG, as the provider's CDN would serve it.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0x49, 0x48, 0x44, 0x52, 0, 0, 0,
    1, 0, 0, 0, 1, 8, 2, 0, 0, 0, 0x90, 0x77, 0x53, 0xde,
];
const MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isomfake-video-bytes";

const CALLBACKS: &[(&str, &str)] = &[
    ("CALLBACK_BASE_URL", "https://jobs.example.com"),
    ("CALLBACK_SECRET", "callback-secret-callback-secret-0123"),
];

pub struct Provider {
    pub t: TestApp,
    pub ml: MockServer,
}

impl Provider {
    pub async fn start(overrides: &[(&str, &str)]) -> Self {
        let ml = MockServer::start().await;
        let host = ml.address().to_string();
        let uri = ml.uri();
        let mut all: Vec<(&str, &str)> = vec![
            ("GENERATOR", "modelslab"),
            ("MODELSLAB_API_KEY", KEY),
            ("MODELSLAB_BASE_URL", &uri),
            ("DOWNLOAD_ALLOW_HTTP_HOSTS", &host),
            ("POLLER_CHECK_WINDOW_SECONDS", "0"),
        ];
        all.extend_from_slice(overrides);
        let mut t = TestApp::configured(|_| Dispatcher::embedded(), Duration::ZERO, &all).await;
        t.app.generator = Arc::new(ModelsLab::new(
            t.app
                .config
                .modelslab
                .clone()
                .expect("modelslab configured"),
            Downloader::new(t.app.config.downloads.clone()),
        ));
        Self { t, ml }
    }

    /// With ModelsLab's callbacks on: each job is sent a webhook URL of its own.
    pub async fn with_callbacks() -> Self {
        Self::start(CALLBACKS).await
    }

    /// Behind SQS, as on Lambda: a check that finds a job finished hands its collection to a
    /// worker through `queue`.
    pub async fn behind_sqs(queue: &TestQueue, overrides: &[(&str, &str)]) -> Self {
        let mut p = Self::start(overrides).await;
        p.t.app.queue = Dispatcher::sqs(queue.client.clone(), queue.url.clone());
        p
    }

    /// Hands SQS messages to the worker's handler, as Lambda's event source mapping does.
    async fn deliver(
        &self,
        messages: &[aws_sdk_sqs::types::Message],
    ) -> lambda_http::aws_lambda_events::sqs::SqsBatchResponse {
        shared::worker::handle_sqs(&self.t.app, as_event(messages)).await
    }

    /// Serves a video at `/cdn/{name}` that takes `delay` to arrive.
    async fn serve_slowly(&self, name: &str, delay: Duration) -> String {
        Mock::given(method("GET"))
            .and(path(format!("/cdn/{name}")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw(MP4.to_vec(), "video/mp4")
                    .set_delay(delay),
            )
            .mount(&self.ml)
            .await;
        format!("{}/cdn/{name}", self.ml.uri())
    }

    /// Waits until a download of provider output has begun.
    async fn until_downloading(&self) {
        let waiting_since = std::time::Instant::now();
        while self.requests_matching("/cdn/").await == 0 {
            assert!(
                waiting_since.elapsed() < Duration::from_secs(20),
                "the output was never fetched"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A moodboard of `count` images.
    async fn moodboard(&self, count: u32) -> Uuid {
        self.job(
            &alice(),
            JobType::Moodboard,
            json!({ "prompt": "dusk", "count": count }),
        )
        .await
    }

    /// Serves a file at `/cdn/{name}` the way a CDN does.
    async fn serve(&self, name: &str, content_type: &str, bytes: &[u8]) -> String {
        Mock::given(method("GET"))
            .and(path(format!("/cdn/{name}")))
            .respond_with(ResponseTemplate::new(200).set_body_raw(bytes.to_vec(), content_type))
            .mount(&self.ml)
            .await;
        format!("{}/cdn/{name}", self.ml.uri())
    }

    async fn answer(&self, route: &str, status: u16, body: Value) {
        Mock::given(method("POST"))
            .and(path(route))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&self.ml)
            .await;
    }

    async fn job(&self, owner: &Identity, job_type: JobType, params: Value) -> Uuid {
        self.t.insert_with(owner, job_type, params).await
    }

    /// A source image the owner generated earlier, for an animation.
    async fn source_image(&self, owner: &Identity) -> Uuid {
        let earlier = self
            .job(owner, JobType::CharacterImage, json!({ "prompt": "hero" }))
            .await;
        let media = Uuid::now_v7();
        let conn = self.t.db.pool.get().await.unwrap();
        conn.execute(
            "INSERT INTO generated_media (id, job_id, user_id, tenant_id, ordinal, media_type, mime_type, \
             storage, storage_key, public_url, size_bytes) \
             VALUES ($1, $2, $3, $4, 0, 'image', 'image/png', 'local', 'k', 'https://media.example/hero.png', 10)",
            &[&media, &earlier, &owner.user_id, &owner.tenant_id],
        )
        .await
        .unwrap();
        media
    }

    async fn animation(&self, owner: &Identity) -> Uuid {
        let source = self.source_image(owner).await;
        self.job(
            owner,
            JobType::Animation,
            json!({ "sourceImageId": source, "prompt": "the hero waves" }),
        )
        .await
    }

    async fn run(&self, id: Uuid) -> Outcome {
        run_claimed(&self.t.app, claim(&self.t, id).await)
            .await
            .unwrap()
    }

    async fn row(&self, id: Uuid) -> tokio_postgres::Row {
        let conn = self.t.db.pool.get().await.unwrap();
        conn.query_one(
            "SELECT status::text AS status, error_message, external_job_id, lease_expires_at, \
                    progress, attempts, next_check_at, \
                    (SELECT count(*) FROM generated_media m WHERE m.job_id = j.id) AS media, \
                    (SELECT count(*) FROM job_slots s WHERE s.job_id = j.id) AS slots \
             FROM generation_jobs j WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
    }

    /// Makes a waiting job's next check due now, as time passing would.
    async fn make_due(&self, id: Uuid) {
        let conn = self.t.db.pool.get().await.unwrap();
        conn.execute(
            "UPDATE generation_jobs SET next_check_at = now(), checked_at = now() - interval '1 hour' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    }

    async fn poller_tick(&self) -> shared::poller::Report {
        let event = serde_json::from_str(include_str!("../../../events/poller-schedule.json"))
            .expect("fixture");
        shared::poller::handle_schedule(&self.t.app, event)
            .await
            .unwrap()
    }

    async fn requests_to(&self, route: &str) -> Vec<Request> {
        self.ml
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path() == route)
            .collect()
    }

    async fn requests_matching(&self, prefix: &str) -> usize {
        self.ml
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path().starts_with(prefix))
            .count()
    }
}

/// Received SQS messages as the event Lambda hands the worker.
fn as_event(
    messages: &[aws_sdk_sqs::types::Message],
) -> lambda_http::aws_lambda_events::sqs::SqsEvent {
    batch(
        messages
            .iter()
            .map(|m| sqs_record(m.message_id().unwrap(), m.body().unwrap()))
            .collect(),
    )
}

fn alice() -> Identity {
    user("alice", Some("tenant-x"))
}

fn processing(id: Value, eta: u64) -> Value {
    json!({
        "status": "processing", "tip": "Your image is processing in background",
        "eta": eta, "messege": "Try to fetch request after seconds estimated",
        "fetch_result": "https://modelslab.com/api/v6/video/fetch/1", "id": id, "output": [],
        "future_links": ["https://pub.r2.dev/generations/1.mp4"], "meta": {}
    })
}

fn success(output: &[String]) -> Value {
    json!({
        "status": "success", "generationTime": 1.4, "id": 42, "output": output,
        "proxy_links": output, "meta": { "prompt": "x" }, "nsfw_content_detected": false,
        "webhook_status": "", "tip": ""
    })
}

#[tokio::test]
async fn an_immediate_success_is_downloaded_stored_and_completes_the_job() {
    let p = Provider::start(&[]).await;
    let url = p.serve("a.png", "image/png", PNG).await;
    p.answer("/api/v6/images/text2img", 200, success(&[url]))
        .await;
    let id = p
        .job(
            &alice(),
            JobType::CharacterImage,
            json!({ "prompt": "a knight" }),
        )
        .await;

    assert_eq!(p.run(id).await, Outcome::Completed);

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i64>("media"), 1);
    let sent = p.requests_to("/api/v6/images/text2img").await;
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["key"], KEY);
    assert_eq!(body["prompt"], "a knight");
    assert_eq!(body["samples"], 1);
    let stored = std::fs::read_dir(p.t.media.path().join(id.to_string()))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(stored.path()).unwrap(), PNG);
}

#[tokio::test]
async fn a_character_with_a_reference_image_goes_to_img2img_with_it() {
    let p = Provider::start(&[]).await;
    let url = p.serve("a.png", "image/png", PNG).await;
    p.answer("/api/v6/images/img2img", 200, success(&[url]))
        .await;
    let reference = p.source_image(&alice()).await;
    let id = p
        .job(
            &alice(),
            JobType::CharacterImage,
            json!({ "prompt": "same hero, new pose", "imageReferenceId": reference }),
        )
        .await;

    assert_eq!(p.run(id).await, Outcome::Completed);
    let sent = p.requests_to("/api/v6/images/img2img").await;
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["init_image"], "https://media.example/hero.png");
}

#[tokio::test]
async fn another_users_image_or_the_same_user_ids_in_another_tenant_is_never_sent_as_an_input() {
    let p = Provider::start(&[]).await;
    for owner in [
        user("bob", Some("tenant-y")),
        user("alice", Some("tenant-y")),
    ] {
        let theirs = p.source_image(&owner).await;
        let id = p
            .job(
                &alice(),
                JobType::Animation,
                json!({ "sourceImageId": theirs, "prompt": "wave" }),
            )
            .await;

        assert_eq!(p.run(id).await, Outcome::Failed, "{owner:?}");
        let row = p.row(id).await;
        assert!(row
            .get::<_, String>("error_message")
            .contains("source image"));
    }
    assert_eq!(p.requests_matching("/api/v6/").await, 0);
}

#[tokio::test]
async fn a_moodboard_asks_for_several_samples_and_keeps_each_image() {
    let p = Provider::start(&[]).await;
    let urls = vec![
        p.serve("m0.png", "image/png", PNG).await,
        p.serve("m1.png", "image/png", PNG).await,
        p.serve("m2.png", "image/png", PNG).await,
    ];
    p.answer("/api/v6/images/text2img", 200, success(&urls))
        .await;
    let id = p.moodboard(3).await;

    assert_eq!(p.run(id).await, Outcome::Completed);
    assert_eq!(p.row(id).await.get::<_, i64>("media"), 3);
    let sent = p.requests_to("/api/v6/images/text2img").await;
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["samples"], 3);
}

#[tokio::test]
async fn a_processing_video_frees_its_worker_and_slot_and_the_poller_completes_it() {
    let p = Provider::start(&[]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(4242), 30))
        .await;
    let id = p.animation(&alice()).await;

    assert_eq!(p.run(id).await, Outcome::Submitted);
    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "processing");
    assert_eq!(
        row.get::<_, Option<String>>("external_job_id").as_deref(),
        Some("4242")
    );
    assert!(row
        .get::<_, Option<chrono::DateTime<chrono::Utc>>>("lease_expires_at")
        .is_none());
    assert_eq!(row.get::<_, i64>("slots"), 0, "a waiting job holds no slot");
    let sent = p.requests_to("/api/v6/video/img2video").await;
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["init_image"], "https://media.example/hero.png");

    // Not due yet: a tick leaves it alone.
    assert_eq!(p.poller_tick().await.provider_checks, 0);
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    p.answer("/api/v6/video/fetch/4242", 200, success(&[video]))
        .await;
    p.make_due(id).await;
    assert_eq!(p.poller_tick().await.provider_checks, 1);

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i16>("progress"), 100);
    assert_eq!(row.get::<_, i64>("media"), 1);
    let fetch = p.requests_to("/api/v6/video/fetch/4242").await;
    let body: Value = serde_json::from_slice(&fetch[0].body).unwrap();
    assert_eq!(body["key"], KEY);
}

#[tokio::test]
async fn a_long_job_can_be_configured_to_keep_its_slot_until_it_finishes() {
    let p = Provider::start(&[("LONG_JOBS_HOLD_SLOTS", "true")]).await;
    p.answer(
        "/api/v6/video/img2video",
        200,
        processing(json!("abc-1"), 30),
    )
    .await;
    let id = p.animation(&alice()).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    assert_eq!(p.row(id).await.get::<_, i64>("slots"), 1);

    p.answer(
        "/api/v6/video/fetch/abc-1",
        200,
        json!({ "status": "error", "message": "Processing failed: Invalid input dimensions" }),
    )
    .await;
    p.make_due(id).await;
    p.poller_tick().await;
    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert_eq!(row.get::<_, i64>("slots"), 0, "finishing frees the slot");
}

#[tokio::test]
async fn a_provider_error_while_processing_fails_the_job_with_its_message() {
    let p = Provider::start(&[]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(7), 30))
        .await;
    p.answer(
        "/api/v6/video/fetch/7",
        200,
        json!({ "status": "error", "message": "Processing failed: Invalid input dimensions" }),
    )
    .await;
    let id = p.animation(&alice()).await;
    p.run(id).await;
    p.make_due(id).await;
    p.poller_tick().await;

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert!(row
        .get::<_, String>("error_message")
        .contains("Processing failed: Invalid input dimensions"));
    assert_eq!(
        row.get::<_, i32>("attempts"),
        1,
        "a provider error is not retried"
    );
}

#[tokio::test]
async fn a_job_still_processing_past_the_maximum_wait_fails_as_timed_out() {
    let p = Provider::start(&[("PROVIDER_MAX_WAIT_SECONDS", "600")]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(8), 30))
        .await;
    p.answer("/api/v6/video/fetch/8", 200, processing(json!(8), 30))
        .await;
    let id = p.animation(&alice()).await;
    p.run(id).await;
    {
        let conn = p.t.db.pool.get().await.unwrap();
        let deadline: chrono::DateTime<chrono::Utc> = conn
            .query_one(
                "SELECT provider_deadline - submitted_at AS d, provider_deadline FROM generation_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get("provider_deadline");
        assert!(deadline > chrono::Utc::now() + chrono::Duration::seconds(590));
        // Ten minutes pass.
        conn.execute(
            "UPDATE generation_jobs SET provider_deadline = now() - interval '1 second', \
             next_check_at = now() WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    }
    p.poller_tick().await;

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert!(row.get::<_, String>("error_message").contains("timed out"));
}

#[tokio::test]
async fn a_pending_check_raises_progress_and_schedules_the_next_one() {
    let p = Provider::start(&[]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(9), 2))
        .await;
    p.answer("/api/v6/video/fetch/9", 200, processing(json!(9), 20))
        .await;
    let id = p.animation(&alice()).await;
    p.run(id).await;
    // Long past the first estimate of 2 s.
    let conn = p.t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET submitted_at = now() - interval '10 seconds', \
         provider_expected_at = now() - interval '8 seconds', next_check_at = now(), \
         started_at = created_at WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    p.poller_tick().await;

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "processing");
    let progress: i16 = row.get("progress");
    assert!((90..100).contains(&progress), "progress {progress}");
    let next: chrono::DateTime<chrono::Utc> = row.get("next_check_at");
    assert!(next > chrono::Utc::now() + chrono::Duration::seconds(10));
}

#[tokio::test]
async fn rate_limiting_is_retried_and_the_retry_succeeds() {
    let p = Provider::start(&[]).await;
    Mock::given(method("POST"))
        .and(path("/api/v6/images/text2img"))
        .respond_with(ResponseTemplate::new(429).set_body_json(json!({
            "status": "error", "message": "Rate limit exceeded. Maximum 5 queued requests allowed.", "retry_after": 30
        })))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.ml)
        .await;
    let url = p.serve("a.png", "image/png", PNG).await;
    p.answer("/api/v6/images/text2img", 200, success(&[url]))
        .await;
    let id = p
        .job(&alice(), JobType::CharacterImage, json!({ "prompt": "x" }))
        .await;

    assert!(matches!(p.run(id).await, Outcome::Requeued { .. }));
    let conn = p.t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET run_after = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    assert_eq!(p.run(id).await, Outcome::Completed);
    let errors = conn
        .query(
            "SELECT retryable, message FROM job_errors WHERE job_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].get::<_, bool>("retryable"));
    assert!(errors[0]
        .get::<_, String>("message")
        .contains("Rate limit exceeded"));
}

/// Starts a character job against a provider answering `answer`, and checks that the attempt
/// was requeued with a retryable error saying `expected`.
async fn first_attempt_is_retryable(p: &Provider, answer: ResponseTemplate, expected: &str) {
    Mock::given(method("POST"))
        .and(path("/api/v6/images/text2img"))
        .respond_with(answer)
        .mount(&p.ml)
        .await;
    let id = p
        .job(&alice(), JobType::CharacterImage, json!({ "prompt": "x" }))
        .await;
    assert!(matches!(p.run(id).await, Outcome::Requeued { .. }));
    let conn = p.t.db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT retryable, message FROM job_errors WHERE job_id = $1 AND attempt = 1",
            &[&id],
        )
        .await
        .unwrap();
    let message: String = row.get("message");
    assert!(row.get::<_, bool>("retryable"), "{message}");
    assert!(message.contains(expected), "{message}");
}

#[tokio::test]
async fn a_server_error_is_retryable() {
    let p = Provider::start(&[]).await;
    let answer = ResponseTemplate::new(500).set_body_json(
        json!({ "status": "error", "message": "Internal server error. Please try again." }),
    );
    first_attempt_is_retryable(&p, answer, "HTTP 500").await;
}

#[tokio::test]
async fn a_provider_that_does_not_answer_in_time_is_retryable() {
    let p = Provider::start(&[("MODELSLAB_TIMEOUT_SECONDS", "1")]).await;
    let answer = ResponseTemplate::new(200)
        .set_body_json(success(&["https://x/a.png".into()]))
        .set_delay(Duration::from_secs(5));
    first_attempt_is_retryable(&p, answer, "timed out").await;
}

#[tokio::test]
async fn a_malformed_answer_is_retryable() {
    let p = Provider::start(&[]).await;
    let answer = ResponseTemplate::new(200).set_body_raw("{\"status\": \"succ", "application/json");
    first_attempt_is_retryable(&p, answer, "not its JSON").await;
}

/// Starts a character job against a provider refusing it with `status` and `message`, and
/// checks that the job failed at once, keeping the provider's message and never the key.
async fn first_attempt_fails_with(status: u16, message: &str) {
    let p = Provider::start(&[]).await;
    p.answer(
        "/api/v6/images/text2img",
        status,
        json!({ "status": "error", "message": message }),
    )
    .await;
    let id = p
        .job(&alice(), JobType::CharacterImage, json!({ "prompt": "x" }))
        .await;
    assert_eq!(p.run(id).await, Outcome::Failed);
    let row = p.row(id).await;
    let kept: String = row.get("error_message");
    assert!(kept.contains(message), "{kept}");
    assert!(!kept.contains(KEY));
    assert_eq!(row.get::<_, i32>("attempts"), 1);
}

#[tokio::test]
async fn an_invalid_key_fails_the_job_at_once_with_the_providers_message() {
    first_attempt_fails_with(401, "Invalid API key").await;
}

#[tokio::test]
async fn a_validation_error_fails_the_job_with_the_providers_message() {
    first_attempt_fails_with(400, "width must be between 256 and 1024").await;
}

#[tokio::test]
async fn an_nsfw_flag_fails_the_job_and_nothing_is_downloaded() {
    let p = Provider::start(&[]).await;
    let url = p.serve("blank.png", "image/png", PNG).await;
    let mut answer = success(&[url]);
    answer["nsfw_content_detected"] = json!(true);
    p.answer("/api/v6/images/text2img", 200, answer).await;
    let id = p
        .job(&alice(), JobType::CharacterImage, json!({ "prompt": "x" }))
        .await;
    assert_eq!(p.run(id).await, Outcome::Failed);
    assert!(p
        .row(id)
        .await
        .get::<_, String>("error_message")
        .contains("NSFW"));
    assert_eq!(p.requests_matching("/cdn/").await, 0);
    assert_eq!(p.row(id).await.get::<_, i64>("media"), 0);
}

#[tokio::test]
async fn downloads_that_break_a_rule_fail_the_job_and_store_nothing() {
    // Plain http to a host not configured for tests; then too big; then not an image.
    let p = Provider::start(&[("DOWNLOAD_MAX_MB", "1")]).await;
    let big = p
        .serve("big.png", "image/png", &vec![7u8; 1024 * 1024 + 1])
        .await;
    let html = p.serve("page.png", "text/html", b"<html>").await;
    for (url, expected) in [
        ("http://cdn.example.com/a.png".to_string(), "only https"),
        (big, "byte limit"),
        (html, "content type"),
    ] {
        p.ml.reset().await;
        p.serve("big.png", "image/png", &vec![7u8; 1024 * 1024 + 1])
            .await;
        p.serve("page.png", "text/html", b"<html>").await;
        p.answer(
            "/api/v6/images/text2img",
            200,
            success(std::slice::from_ref(&url)),
        )
        .await;
        let id = p
            .job(&alice(), JobType::CharacterImage, json!({ "prompt": "x" }))
            .await;
        assert_eq!(p.run(id).await, Outcome::Failed, "{url}");
        let row = p.row(id).await;
        let message: String = row.get("error_message");
        assert!(message.contains(expected), "{url}: {message}");
        assert_eq!(row.get::<_, i64>("media"), 0);
    }
}

#[tokio::test]
async fn the_download_cap_holds_for_a_jobs_files_together() {
    let p = Provider::start(&[("DOWNLOAD_MAX_MB", "1")]).await;
    // Each under the cap, together over it: all are held in memory until stored.
    let part = vec![7u8; 600 * 1024];
    let urls = vec![
        p.serve("m0.png", "image/png", &part).await,
        p.serve("m1.png", "image/png", &part).await,
    ];
    p.answer("/api/v6/images/text2img", 200, success(&urls))
        .await;
    let id = p.moodboard(2).await;

    assert_eq!(p.run(id).await, Outcome::Failed);
    let row = p.row(id).await;
    let message: String = row.get("error_message");
    assert!(message.contains("with the job's other files"), "{message}");
    assert_eq!(row.get::<_, i64>("media"), 0);
}

/// The webhook URL the provider was given for the job, as it was sent.
async fn webhook_of(p: &Provider, route: &str) -> (String, Value) {
    let sent = p.requests_to(route).await;
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    (body["webhook"].as_str().unwrap().to_owned(), body)
}

fn callback_request(url: &str, body: &Value) -> lambda_http::Request {
    let parsed = reqwest::Url::parse(url).unwrap();
    let mut req = api_request("POST", parsed.path(), None, Some(&body.to_string()));
    *req.uri_mut() = format!("{}?{}", parsed.path(), parsed.query().unwrap_or(""))
        .parse()
        .unwrap();
    req
}

#[tokio::test]
async fn a_callback_completes_the_job_and_forged_or_repeated_ones_change_nothing() {
    let p = Provider::with_callbacks().await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(77), 40))
        .await;
    let id = p.animation(&alice()).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    let (webhook, sent) = webhook_of(&p, "/api/v6/video/img2video").await;
    assert_eq!(sent["track_id"], id.to_string());
    assert!(webhook.starts_with(&format!(
        "https://jobs.example.com/api/webhooks/modelslab/{id}?attempt=1&token="
    )));

    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    let mut done = success(&[video]);
    done["track_id"] = json!(id.to_string());

    // Forged: the job id alone, a wrong token, a token for another attempt.
    let forged = [
        format!("https://jobs.example.com/api/webhooks/modelslab/{id}"),
        format!("https://jobs.example.com/api/webhooks/modelslab/{id}?attempt=1&token=AAAA"),
        webhook.replace("attempt=1", "attempt=2"),
    ];
    for url in &forged {
        let (status, body) = call(&p.t.app, callback_request(url, &done)).await;
        assert_eq!(status, 401, "{url}: {body}");
    }
    assert_eq!(p.row(id).await.get::<_, String>("status"), "processing");

    let (status, body) = call(&p.t.app, callback_request(&webhook, &done)).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("completed")));
    assert_eq!(p.row(id).await.get::<_, String>("status"), "completed");

    // The provider may deliver again: same answer code, nothing changes.
    let (status, body) = call(&p.t.app, callback_request(&webhook, &done)).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    assert_eq!(p.row(id).await.get::<_, i64>("media"), 1);
    assert_eq!(p.requests_matching("/cdn/").await, 1, "downloaded once");
    assert_eq!(
        p.requests_matching("/api/v6/video/fetch").await,
        0,
        "no polling needed"
    );
}

#[tokio::test]
async fn a_failure_callback_fails_the_job_with_the_providers_message() {
    let p = Provider::with_callbacks().await;
    p.answer(
        "/api/v6/video/img2video",
        200,
        processing(json!("abc123-def456"), 40),
    )
    .await;
    let id = p.animation(&alice()).await;
    p.run(id).await;
    let (webhook, _) = webhook_of(&p, "/api/v6/video/img2video").await;
    let failed = json!({ "status": "failed", "id": "abc123-def456",
        "message": "Processing failed: Invalid input dimensions", "track_id": id.to_string() });
    let (status, _) = call(&p.t.app, callback_request(&webhook, &failed)).await;
    assert_eq!(status, 200);
    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert!(row
        .get::<_, String>("error_message")
        .contains("Invalid input dimensions"));
}

#[tokio::test]
async fn a_page_polling_every_100ms_for_10s_makes_only_a_handful_of_provider_checks() {
    let p = Provider::start(&[]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(55), 60))
        .await;
    Mock::given(method("POST"))
        .and(path_regex("^/api/v6/video/fetch/55$"))
        .and(body_partial_json(json!({ "key": KEY })))
        .respond_with(ResponseTemplate::new(200).set_body_json(processing(json!(55), 60)))
        .mount(&p.ml)
        .await;
    let owner = alice();
    let id = p.animation(&owner).await;
    p.run(id).await;

    let started = std::time::Instant::now();
    let mut polls = 0;
    let mut last_progress = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let (status, body) = poll_status(&p.t.app, &owner, id).await;
        assert_eq!(status, 200);
        assert_eq!(body["status"], "processing");
        let progress = body["progress"].as_i64().unwrap();
        assert!(
            progress >= last_progress,
            "progress went from {last_progress} to {progress}"
        );
        assert!(progress < 100);
        last_progress = progress;
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fetches = p.requests_matching("/api/v6/video/fetch/").await;
    assert!(polls >= 50, "only {polls} polls");
    // One check per 5 s at most: the status route did check, and no more than that.
    assert!(
        (1..=3).contains(&fetches),
        "{fetches} fetches for {polls} polls"
    );
}

#[tokio::test]
async fn a_check_under_way_keeps_callbacks_and_status_checks_off_the_job_until_it_ends() {
    let p = Provider::with_callbacks().await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(91), 40))
        .await;
    let owner = alice();
    let id = p.animation(&owner).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    let (webhook, _) = webhook_of(&p, "/api/v6/video/img2video").await;
    // The finished video downloads slowly: the poller's check is still under way while the
    // callback and a status poll come in.
    let video = p.serve_slowly("slow.mp4", Duration::from_secs(2)).await;
    let mut done = success(&[video]);
    p.answer("/api/v6/video/fetch/91", 200, done.clone()).await;
    p.make_due(id).await;
    let app = p.t.app.clone();
    let poller = tokio::spawn(async move { shared::provider::check_due(&app).await.unwrap() });
    p.until_downloading().await;

    done["track_id"] = json!(id.to_string());
    let (status, body) = call(&p.t.app, callback_request(&webhook, &done)).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    // As if the status route's few seconds between checks had passed.
    let conn = p.t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET checked_at = now() - interval '1 hour' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let (status, body) = poll_status(&p.t.app, &owner, id).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("processing")));

    assert_eq!(poller.await.unwrap(), 1);
    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i64>("media"), 1);
    assert_eq!(p.requests_matching("/cdn/").await, 1, "downloaded once");
    assert_eq!(
        p.requests_matching("/api/v6/video/fetch/").await,
        1,
        "the provider was asked once"
    );
    let key: String = conn
        .query_one(
            "SELECT m.storage_key FROM generated_media m JOIN generation_jobs j \
             ON j.result_media_id = m.id WHERE j.id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        std::fs::read(p.t.media.path().join(key)).unwrap(),
        MP4,
        "the completed job's file is there"
    );
}

#[tokio::test]
async fn a_check_whose_checker_died_lets_the_next_one_take_the_job_once_its_lease_runs_out() {
    let p = Provider::with_callbacks().await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(92), 40))
        .await;
    let id = p.animation(&alice()).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    let (webhook, _) = webhook_of(&p, "/api/v6/video/img2video").await;
    p.make_due(id).await;
    // A poller took the job for a check with a lease that has already run out, and never
    // ended the check.
    let conn = p.t.db.pool.get().await.unwrap();
    let taken = shared::jobs::claim_due_checks(&conn, 50, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);

    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    let mut done = success(&[video]);
    done["track_id"] = json!(id.to_string());
    let (status, body) = call(&p.t.app, callback_request(&webhook, &done)).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("completed")));
    assert_eq!(p.row(id).await.get::<_, String>("status"), "completed");
}

#[tokio::test]
async fn a_provider_check_held_up_past_the_ticks_time_is_cut_off_and_the_tick_still_reports() {
    let p = Provider::start(&[]).await;
    p.answer("/api/v6/video/img2video", 200, processing(json!(93), 30))
        .await;
    let id = p.animation(&alice()).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    // The provider takes 25 s to answer (within the 30 s request timeout).
    Mock::given(method("POST"))
        .and(path("/api/v6/video/fetch/93"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(processing(json!(93), 30))
                .set_delay(Duration::from_secs(25)),
        )
        .mount(&p.ml)
        .await;
    p.make_due(id).await;
    let event = serde_json::from_str(include_str!("../../../events/poller-schedule.json"))
        .expect("fixture");

    // 20 s of the invocation left: the checks get 5 s of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let report = shared::poller::handle_schedule_until(&p.t.app, event, Some(deadline))
        .await
        .unwrap();

    assert_eq!(report.provider_checks, 0, "the check was cut off");
    assert!(
        p.t.emitted
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("ActiveJobs")),
        "the tick still reported"
    );
    assert_eq!(p.row(id).await.get::<_, String>("status"), "processing");
}

/// The job's kept output and whether a check holds it now.
async fn handed_state(p: &Provider, id: Uuid) -> (Option<Vec<String>>, bool) {
    let conn = p.t.db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT provider_outputs, coalesce(check_taken_until > now(), false) FROM generation_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// As if the hold of the check that handed the job on had run out, and the poller's time to
/// send another message had come.
async fn let_the_hand_off_lapse(p: &Provider, id: Uuid) {
    let conn = p.t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET check_taken_until = now() - interval '1 second', \
                next_check_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
}

/// A video job the provider accepted as request `request`, to finish later.
async fn submitted_video(p: &Provider, request: u64) -> Uuid {
    p.answer(
        "/api/v6/video/img2video",
        200,
        processing(json!(request), 30),
    )
    .await;
    let id = p.animation(&alice()).await;
    assert_eq!(p.run(id).await, Outcome::Submitted);
    id
}

/// The provider now answers that request `request` finished with `video`, and the job is due
/// for a check.
async fn finished_with(p: &Provider, id: Uuid, request: u64, video: &str) {
    p.answer(
        &format!("/api/v6/video/fetch/{request}"),
        200,
        success(&[video.to_owned()]),
    )
    .await;
    p.make_due(id).await;
}

/// The poller's check hands the finished job to a worker: the message it sent.
async fn handed_by_the_poller(p: &Provider, queue: &TestQueue) -> Vec<aws_sdk_sqs::types::Message> {
    assert_eq!(p.poller_tick().await.provider_checks, 1);
    let handed = queue.receive().await;
    assert_eq!(handed.len(), 1);
    handed
}

/// As if the provider's deadline had passed `minutes` ago.
async fn deadline_passed(p: &Provider, id: Uuid, minutes: i32) {
    let conn = p.t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET provider_deadline = now() - make_interval(mins => $2) WHERE id = $1",
        &[&id, &minutes],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn behind_sqs_a_status_poll_that_finds_the_video_finished_hands_it_to_a_worker_which_collects_it(
) {
    let queue = TestQueue::new().await;
    let p = Provider::behind_sqs(&queue, &[]).await;
    let owner = alice();
    let id = submitted_video(&p, 94).await;
    // The finished video downloads slowly.
    let video = p.serve_slowly("slow.mp4", Duration::from_secs(2)).await;
    finished_with(&p, id, 94, &video).await;

    // The poll asks the provider and answers at once, downloading nothing.
    let (status, body) = poll_status(&p.t.app, &owner, id).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("processing")));
    assert_eq!(p.requests_matching("/cdn/").await, 0);
    assert_eq!(handed_state(&p, id).await.0, Some(vec![video]));
    let handed = queue.receive().await;
    assert_eq!(handed.len(), 1);
    let message: Value = serde_json::from_str(handed[0].body().unwrap()).unwrap();
    assert_eq!(message["jobId"], id.to_string());
    assert_eq!(message["collect"]["attempt"], 1);
    // Polled again, the handed job is neither checked nor handed again.
    p.make_due(id).await;
    let (_, body) = poll_status(&p.t.app, &owner, id).await;
    assert_eq!(body["status"], "processing");
    assert!(queue.receive().await.is_empty());
    assert_eq!(p.requests_matching("/api/v6/video/fetch/").await, 1);

    // A worker collects it; the same message delivered again meanwhile finds it held.
    let collecting = {
        let (app, event) = (p.t.app.clone(), as_event(&handed));
        tokio::spawn(async move { shared::worker::handle_sqs(&app, event).await })
    };
    p.until_downloading().await;
    assert!(reported(&p.deliver(&handed).await).is_empty());
    assert!(reported(&collecting.await.unwrap()).is_empty());

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i64>("media"), 1);
    assert_eq!(p.requests_matching("/cdn/").await, 1, "downloaded once");
    assert_eq!(
        p.requests_matching("/api/v6/video/fetch/").await,
        1,
        "the provider was asked once"
    );
    let (_, body) = poll_status(&p.t.app, &owner, id).await;
    assert_eq!(body["status"], "completed");
}

#[tokio::test]
async fn a_hand_off_whose_message_comes_late_is_collected_by_the_first_message_to_arrive_even_past_the_deadline(
) {
    let queue = TestQueue::new().await;
    let p = Provider::behind_sqs(&queue, CALLBACKS).await;
    let id = submitted_video(&p, 95).await;
    let (webhook, _) = webhook_of(&p, "/api/v6/video/img2video").await;
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    finished_with(&p, id, 95, &video).await;

    // The poller hands the finished job on; its message waits behind a busy queue.
    let first = handed_by_the_poller(&p, &queue).await;
    let_the_hand_off_lapse(&p, id).await;

    // The provider's callback now changes nothing; the poller sends another message without
    // asking the provider again.
    let mut done = success(&[video]);
    done["track_id"] = json!(id.to_string());
    let (status, body) = call(&p.t.app, callback_request(&webhook, &done)).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    let second = handed_by_the_poller(&p, &queue).await;
    assert_eq!(p.requests_matching("/api/v6/video/fetch/").await, 1);

    // The provider's wait runs out before a worker comes: the output is still collected, by
    // the late first message; the second then finds the job finished.
    deadline_passed(&p, id, 1).await;
    assert!(reported(&p.deliver(&first).await).is_empty());
    assert_eq!(p.row(id).await.get::<_, String>("status"), "completed");
    assert!(reported(&p.deliver(&second).await).is_empty());
    let row = p.row(id).await;
    assert_eq!(row.get::<_, i64>("media"), 1);
    assert_eq!(p.requests_matching("/cdn/").await, 1);
}

#[tokio::test]
async fn a_collection_that_fails_on_the_way_is_tried_again_from_the_kept_output() {
    let queue = TestQueue::new().await;
    let p = Provider::behind_sqs(&queue, &[]).await;
    let id = submitted_video(&p, 97).await;
    // The CDN fails the first download.
    Mock::given(method("GET"))
        .and(path("/cdn/v.mp4"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&p.ml)
        .await;
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    finished_with(&p, id, 97, &video).await;
    let first = handed_by_the_poller(&p, &queue).await;

    assert!(reported(&p.deliver(&first).await).is_empty());
    let (outputs, held) = handed_state(&p, id).await;
    assert_eq!(p.row(id).await.get::<_, String>("status"), "processing");
    assert!(
        outputs.is_some() && !held,
        "the output is kept and the job free"
    );

    // Due again (the 20 s after a failed try have passed): handed on again, and collected.
    p.make_due(id).await;
    let second = handed_by_the_poller(&p, &queue).await;
    assert!(reported(&p.deliver(&second).await).is_empty());
    assert_eq!(p.row(id).await.get::<_, String>("status"), "completed");
    assert_eq!(p.requests_matching("/cdn/").await, 2);
    assert_eq!(
        p.requests_matching("/api/v6/video/fetch/").await,
        1,
        "the provider was asked once"
    );
}

#[tokio::test]
async fn a_collection_is_not_started_with_less_than_a_minute_of_the_invocation_left() {
    let queue = TestQueue::new().await;
    let p = Provider::behind_sqs(&queue, &[]).await;
    let id = submitted_video(&p, 99).await;
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    finished_with(&p, id, 99, &video).await;
    let handed = handed_by_the_poller(&p, &queue).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(50);
    let response =
        shared::worker::handle_sqs_until(&p.t.app, as_event(&handed), Some(deadline)).await;

    // Delivered again, for an invocation with the time; the job is left free for it.
    assert_eq!(reported(&response).len(), 1);
    assert_eq!(p.requests_matching("/cdn/").await, 0);
    let (outputs, held) = handed_state(&p, id).await;
    assert!(outputs.is_some() && !held);
    assert!(reported(&p.deliver(&handed).await).is_empty());
    assert_eq!(p.row(id).await.get::<_, String>("status"), "completed");
}

#[tokio::test]
async fn output_that_cannot_be_collected_long_past_the_deadline_fails_the_job_saying_so() {
    let queue = TestQueue::new().await;
    let p = Provider::behind_sqs(&queue, &[]).await;
    let id = submitted_video(&p, 98).await;
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    finished_with(&p, id, 98, &video).await;
    handed_by_the_poller(&p, &queue).await;

    // No worker ever collects it, well past the provider's deadline.
    let_the_hand_off_lapse(&p, id).await;
    deadline_passed(&p, id, 31).await;
    assert_eq!(p.poller_tick().await.provider_checks, 1);

    let row = p.row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    let error = row.get::<_, Option<String>>("error_message").unwrap();
    assert!(error.contains("could not be collected"), "{error}");
    assert_eq!(p.requests_matching("/cdn/").await, 0);
}

#[tokio::test]
async fn a_finished_job_whose_hand_off_cannot_be_sent_is_collected_by_the_check_itself() {
    let mut p = Provider::start(&[]).await;
    // Nothing listens at this SQS endpoint: every send fails.
    p.t.app.queue = Dispatcher::sqs(
        sqs_client_for("http://127.0.0.1:9"),
        "http://127.0.0.1:9/123456789012/jobs".into(),
    );
    let id = submitted_video(&p, 96).await;
    let video = p.serve("v.mp4", "video/mp4", MP4).await;
    finished_with(&p, id, 96, &video).await;

    let (status, body) = poll_status(&p.t.app, &alice(), id).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("completed")));
    assert_eq!(p.requests_matching("/cdn/").await, 1);
}
