//! What every integration test needs: a fresh database on the local Postgres, the app built
//! against it, and (for SQS tests) a fresh queue on the moto server that `.ci/run` starts.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use deadpool_postgres::Pool;
use lambda_http::{aws_lambda_events::sqs::SqsMessage, Body, Request, RequestExt};
pub use shared::jobs::ClaimResult;
use shared::{
    db,
    generator::{Callback, GenerateError, Generation, Generator, Inputs, Progress, Simulator},
    model::{Identity, Job},
    queue::Dispatcher,
    App, Config,
};
use uuid::Uuid;

fn server_url(db: &str) -> String {
    let base = std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    format!("{}/{db}", base.trim_end_matches('/'))
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub pool: Pool,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("mj_test_{}", Uuid::new_v4().simple());
        let url = server_url(&name);
        db::create_database_if_missing(&url)
            .await
            .expect("create test database");
        let pool = db::pool(&url, 16).expect("pool");
        db::migrate(&pool).await.expect("migrate");
        Self { url, name, pool }
    }
}

impl Drop for TestDb {
    /// Every test also checks, at its end, that the queue tally still counts exactly the
    /// queued jobs, and each level's count the queued jobs of that level, whatever ways in
    /// and out of the queue the test took.
    fn drop(&mut self) {
        let name = self.name.clone();
        let (own, admin) = (self.url.clone(), server_url("postgres"));
        self.pool.close();
        // Drop runs outside async context: use a thread with its own small runtime.
        let tally = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tally = match tokio_postgres::connect(&own, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        // A session the test left holding a lock must not hang it here.
                        let _ = client
                            .batch_execute("SET lock_timeout = '5s'; SET statement_timeout = '10s'")
                            .await;
                        match tally_and_queued(&client).await {
                            Ok(tally) => levels_miscounted(&client).await.map(|off| (tally, off)),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .execute(
                            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                            &[],
                        )
                        .await;
                }
                tally
            })
        })
        .join();
        if !std::thread::panicking() {
            let ((tallied, queued), levels_off) = tally
                .expect("the check thread")
                .expect("the queue tally could be read");
            assert_eq!(
                tallied,
                Some(queued),
                "the queue tally against the queued jobs"
            );
            assert_eq!(
                levels_off, 0,
                "fair-share levels whose count is not their queued jobs'"
            );
        }
    }
}

/// The queue tally and the number of queued jobs it must equal, read in one snapshot.
pub async fn tally_and_queued(
    db: &tokio_postgres::Client,
) -> Result<(Option<i64>, i64), tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT (SELECT sum(queued) FROM queue_tally)::int8, \
                    (SELECT count(*) FROM generation_jobs WHERE status = 'queued')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// How many fair-share levels' counts (queue_levels) differ from their queued jobs, read in one
/// snapshot.
pub async fn levels_miscounted(db: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT count(*) FROM \
               (SELECT fair_key, sum(queued)::int8 AS n FROM queue_levels GROUP BY fair_key) l \
               FULL JOIN (SELECT fair_key, count(*) AS n FROM generation_jobs \
                          WHERE status = 'queued' GROUP BY fair_key) j USING (fair_key) \
             WHERE l.n IS DISTINCT FROM j.n",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

pub fn config(database_url: &str, media_dir: &std::path::Path) -> Config {
    config_with(database_url, media_dir, &[])
}

/// The test configuration with some variables set otherwise.
pub fn config_with(
    database_url: &str,
    media_dir: &std::path::Path,
    overrides: &[(&str, &str)],
) -> Config {
    let url = database_url.to_owned();
    let dir = media_dir.to_string_lossy().into_owned();
    let overrides: HashMap<String, String> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(move |name| match name {
        _ if overrides.contains_key(name) => overrides.get(name).cloned(),
        "DATABASE_URL" => Some(url.clone()),
        "GENERATOR" => Some("simulator".into()),
        "SIMULATOR_DURATION_MS" => Some("0".into()),
        "MEDIA_DIR" => Some(dir.clone()),
        "PUBLIC_BASE_URL" => Some("http://media.test".into()),
        "MAX_CONCURRENT_JOBS" => Some("3".into()),
        // Tests enqueue many jobs as one user; the abuse limits have their own tests.
        "RATE_LIMIT_PER_MINUTE" | "MAX_QUEUED_PER_USER" => Some("0".into()),
        _ => None,
    })
    .expect("test config")
}

/// Counts how often jobs were generated, and how many ran at once, around the simulator.
pub struct CountingGenerator {
    inner: Simulator,
    pub calls: Mutex<HashMap<Uuid, usize>>,
    running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub hold: Duration,
}

impl CountingGenerator {
    pub fn new(hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: Simulator::new(Duration::ZERO),
            calls: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            hold,
        })
    }

    pub fn calls_for(&self, id: Uuid) -> usize {
        self.calls.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    pub fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
}

#[async_trait]
impl Generator for CountingGenerator {
    fn model(&self) -> &str {
        "counting-simulator"
    }

    async fn generate(
        &self,
        job: &Job,
        inputs: &Inputs,
        progress: &Progress,
        callback: Option<&Callback>,
    ) -> Result<Generation, GenerateError> {
        *self.calls.lock().unwrap().entry(job.id).or_default() += 1;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.hold).await;
        let result = self.inner.generate(job, inputs, progress, callback).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// The app under test, on its own database and media folder.
pub struct TestApp {
    pub app: App,
    pub db: TestDb,
    pub generator: Arc<CountingGenerator>,
    pub media: tempdir::TempDir,
    /// Every EMF line the app emitted.
    pub emitted: Arc<Mutex<Vec<String>>>,
}

impl TestApp {
    pub async fn embedded() -> Self {
        Self::with(|_| Dispatcher::embedded(), Duration::ZERO).await
    }

    pub async fn with(queue: impl FnOnce(&Config) -> Dispatcher, hold: Duration) -> Self {
        Self::configured(queue, hold, &[]).await
    }

    pub async fn configured(
        queue: impl FnOnce(&Config) -> Dispatcher,
        hold: Duration,
        overrides: &[(&str, &str)],
    ) -> Self {
        let db = TestDb::new().await;
        let media = tempdir::TempDir::new();
        let config = config_with(&db.url, media.path(), overrides);
        let generator = CountingGenerator::new(hold);
        let queue = queue(&config);
        let mut app = App::new(config, db.pool.clone(), queue, generator.clone());
        let (metrics, emitted) = shared::metrics::Metrics::capturing();
        app.metrics = metrics;
        Self {
            app,
            db,
            generator,
            media,
            emitted,
        }
    }

    pub async fn sqs(queue: &TestQueue) -> Self {
        let (client, url) = (queue.client.clone(), queue.url.clone());
        Self::with(move |_| Dispatcher::sqs(client, url), Duration::ZERO).await
    }

    /// Runs the embedded queue until `jobs` jobs have completed (or 30 s have passed), then
    /// stops it.
    pub async fn run_embedded_until_completed(&self, jobs: i64) {
        let Dispatcher::Embedded { local } = self.app.queue.clone() else {
            panic!("the app runs the embedded queue")
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runner = tokio::spawn(shared::worker::run_embedded(
            self.app.clone(),
            local,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let conn = self.db.pool.get().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let done: i64 = conn
                .query_one(
                    "SELECT count(*) FROM generation_jobs WHERE status = 'completed'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if done >= jobs {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(());
        runner.await.unwrap();
    }

    /// Frees every slot, as if every reservation had been taken back: queued jobs then wait in
    /// line for one.
    pub async fn free_all_slots(&self) {
        let conn = self.db.pool.get().await.unwrap();
        conn.execute(
            "UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL",
            &[],
        )
        .await
        .unwrap();
    }

    pub async fn job_row(&self, id: Uuid) -> tokio_postgres::Row {
        let conn = self.db.pool.get().await.unwrap();
        conn.query_one(
            "SELECT status::text AS status, progress, attempts, error_message, result_media_id, model_used \
             FROM generation_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
    }

    pub async fn status_of(&self, id: Uuid) -> String {
        self.job_row(id).await.get("status")
    }

    /// Inserts a queued job of any type with these params, as an accepted enqueue would have.
    pub async fn insert_with(
        &self,
        owner: &Identity,
        job_type: shared::model::JobType,
        params: serde_json::Value,
    ) -> Uuid {
        let id = Uuid::now_v7();
        self.insert_as(id, owner, job_type, params).await;
        id
    }

    /// Inserts a queued character job directly, as an accepted enqueue would have.
    pub async fn insert_job(&self, id: Uuid, owner: &Identity, prompt: &str) {
        let params = serde_json::json!({ "prompt": prompt });
        self.insert_as(id, owner, shared::model::JobType::CharacterImage, params)
            .await;
    }

    async fn insert_as(
        &self,
        id: Uuid,
        owner: &Identity,
        job_type: shared::model::JobType,
        params: serde_json::Value,
    ) {
        let conn = self.db.pool.get().await.unwrap();
        shared::jobs::insert(
            &conn,
            &shared::jobs::NewJob {
                id,
                owner,
                job_type,
                entity_id: Uuid::new_v4(),
                params: &params,
                max_attempts: 3,
                limits: self.app.config.limits(),
                quota: shared::jobs::Quota::UNLIMITED,
                start: None,
            },
        )
        .await
        .unwrap();
    }
}

/// Claims the job as a worker would, with a slot limit that does not get in the way.
pub async fn claim_result(t: &TestApp, id: Uuid) -> ClaimResult {
    let conn = t.db.pool.get().await.unwrap();
    shared::jobs::claim_by_id(&conn, id, Duration::from_secs(60), 1000)
        .await
        .unwrap()
}

pub async fn claim(t: &TestApp, id: Uuid) -> shared::jobs::Claimed {
    match claim_result(t, id).await {
        ClaimResult::Claimed(c) => *c,
        other => panic!("expected to claim {id}, got {other:?}"),
    }
}

pub fn user(name: &str, tenant: Option<&str>) -> Identity {
    Identity {
        user_id: name.into(),
        tenant_id: tenant.map(Into::into),
    }
}

/// An API Gateway v2 request as the JWT authorizer hands it over.
pub fn api_request(
    method: &str,
    path: &str,
    who: Option<&Identity>,
    body: Option<&str>,
) -> Request {
    let mut event = serde_json::json!({
        "version": "2.0",
        "routeKey": format!("{method} {path}"),
        "rawPath": path,
        "rawQueryString": "",
        "headers": { "content-type": "application/json" },
        "requestContext": {
            "accountId": "123456789012", "apiId": "test", "domainName": "test.local", "domainPrefix": "test",
            "http": { "method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "test" },
            "requestId": "req", "routeKey": format!("{method} {path}"), "stage": "$default",
            "time": "30/Nov/2026:00:00:00 +0000", "timeEpoch": 0
        },
        "isBase64Encoded": false
    });
    if let Some(who) = who {
        let mut claims = serde_json::json!({ "sub": who.user_id });
        if let Some(t) = &who.tenant_id {
            claims["tenant_id"] = t.clone().into();
        }
        event["requestContext"]["authorizer"] =
            serde_json::json!({ "jwt": { "claims": claims, "scopes": null } });
    }
    if let Some(body) = body {
        event["body"] = body.into();
    }
    let req = lambda_http::request::from_str(&event.to_string()).expect("valid v2 event");
    debug_assert!(req.request_context_ref().is_some());
    req
}

pub async fn call(app: &App, req: Request) -> (u16, serde_json::Value) {
    let response = shared::api::handle(app, req).await;
    let status = response.status().as_u16();
    let body = match response.body() {
        Body::Text(t) => serde_json::from_str(t).expect("JSON body"),
        Body::Binary(b) => serde_json::from_slice(b).expect("JSON body"),
        _ => serde_json::Value::Null,
    };
    (status, body)
}

/// The Postgres backend serving this connection, to watch it from another.
pub async fn backend_pid(db: &impl deadpool_postgres::GenericClient) -> i32 {
    db.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The status route's answer to the owner's poll of the job.
pub async fn poll_status(app: &App, owner: &Identity, id: Uuid) -> (u16, serde_json::Value) {
    call(
        app,
        api_request(
            "GET",
            &format!("/api/generate/status/{id}"),
            Some(owner),
            None,
        ),
    )
    .await
}

/// An SQS event carrying these records, as the event source mapping delivers a batch.
pub fn batch(records: Vec<SqsMessage>) -> lambda_http::aws_lambda_events::sqs::SqsEvent {
    let mut event = lambda_http::aws_lambda_events::sqs::SqsEvent::default();
    event.records = records;
    event
}

pub fn sqs_record(message_id: &str, body: &str) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = Some(message_id.into());
    record.body = Some(body.into());
    record.event_source = Some("aws:sqs".into());
    record
}

/// The message ids a batch response reports for redelivery.
pub fn reported(response: &lambda_http::aws_lambda_events::sqs::SqsBatchResponse) -> Vec<&str> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect()
}

/// Opens a transaction that holds the slot row naming `job` locked, as another statement does
/// from locking it until it commits. Roll it back to let go.
pub async fn hold_slot_of(t: &TestApp, job: Uuid) -> deadpool_postgres::Object {
    let other = t.db.pool.get().await.unwrap();
    other
        .batch_execute(&format!(
            "BEGIN; SELECT slot FROM job_slots WHERE job_id = '{job}' FOR UPDATE"
        ))
        .await
        .unwrap();
    other
}

pub fn job_message(id: Uuid) -> String {
    serde_json::json!({ "jobId": id }).to_string()
}

/// A fresh queue on the moto server started by `.ci/run` (its URL in `MOTO_ENDPOINT`).
pub struct TestQueue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
}

pub fn sqs_client_for(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

impl TestQueue {
    pub async fn new() -> Self {
        let endpoint = std::env::var("MOTO_ENDPOINT").expect(
            "SQS tests need a local SQS API: run .ci/run, or start `moto_server -p 5000` and set MOTO_ENDPOINT=http://127.0.0.1:5000",
        );
        let client = sqs_client_for(&endpoint);
        let name = format!("jobs-{}", Uuid::new_v4().simple());
        let url = client
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .expect("create queue")
            .queue_url
            .unwrap();
        Self { client, url }
    }

    /// Sends the job's message, as enqueue (or a duplicate delivery) would.
    pub async fn send(&self, id: Uuid) {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(job_message(id))
            .send()
            .await
            .unwrap();
    }

    /// Receives what is visible now (short poll), without deleting it.
    pub async fn receive(&self) -> Vec<aws_sdk_sqs::types::Message> {
        self.client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default()
    }

    pub async fn depth(&self) -> (i64, i64, i64) {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(A::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .expect("attributes")
            .attributes
            .unwrap_or_default();
        let get = |k: A| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
        (
            get(A::ApproximateNumberOfMessages),
            get(A::ApproximateNumberOfMessagesNotVisible),
            get(A::ApproximateNumberOfMessagesDelayed),
        )
    }
}

pub mod tempdir {
    /// A folder removed at drop, for one test's media.
    pub struct TempDir(std::path::PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("mj-media-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
