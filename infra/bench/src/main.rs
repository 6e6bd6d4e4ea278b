//! `cargo run --release -p bench`: the service's latency, throughput, work per job and cold start,
//! each beside the Postgres limit measured in the same run (this machine's disk flush time swings
//! several-fold between runs, so only ratios travel). Needs the local Postgres and pgbench.
//!
//! BENCH_SECONDS (default 5) sets each timed phase; BENCH_DRAIN_JOBS (default 10000) the drain size.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use shared::{
    db,
    generator::{
        Callback, GenerateError, GeneratedFile, Generation, Generator, Inputs, MediaKind, Progress,
    },
    model::Job,
    queue::Dispatcher,
    App, Config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const FIXTURE: &str = include_str!("../../../events/enqueue-character.json");

/// 20,000 settled jobs of 200 other users, four in five completed with their media (the
/// tables every completion writes), then statistics.
const HISTORY: &str = "WITH history AS (
    INSERT INTO generation_jobs (id, user_id, job_type, entity_id, status, attempts, progress,
                                 result_media_id, created_at, started_at, completed_at, error_message)
    SELECT id, 'history-' || (g % 200), 'character-image', gen_random_uuid(),
           CASE WHEN g % 5 = 0 THEN 'failed' ELSE 'completed' END::job_status, 1,
           CASE WHEN g % 5 = 0 THEN 0 ELSE 100 END, CASE WHEN g % 5 <> 0 THEN media END,
           now() - interval '1 day' - g * interval '1 s', now() - interval '1 day',
           now() - interval '1 day', CASE WHEN g % 5 = 0 THEN 'history' END
    FROM (SELECT g, gen_random_uuid() AS id, gen_random_uuid() AS media
          FROM generate_series(1, 20000) g) h
    RETURNING id, user_id, result_media_id)
INSERT INTO generated_media (id, job_id, user_id, ordinal, media_type, mime_type, storage,
                             storage_key, public_url, size_bytes)
SELECT result_media_id, id, user_id, 0, 'image', 'image/png', 'local', 'history/' || id,
       'http://127.0.0.1/media/history', 1024
FROM history WHERE result_media_id IS NOT NULL;
ANALYZE;";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A generator that does nothing, so the queue's own cost is what is measured. It notes when
/// each job started, for pickup latency.
#[derive(Default)]
struct Noop {
    started: Mutex<HashMap<Uuid, Instant>>,
}

#[async_trait]
impl Generator for Noop {
    fn model(&self) -> &str {
        "noop"
    }

    async fn generate(
        &self,
        job: &Job,
        _: &Inputs,
        _: &Progress,
        _: Option<&Callback>,
    ) -> Result<Generation, GenerateError> {
        self.started.lock().unwrap().insert(job.id, Instant::now());
        Ok(Generation::Done(vec![GeneratedFile {
            kind: MediaKind::Image,
            mime_type: "image/png",
            extension: "png",
            width: Some(1),
            height: Some(1),
            bytes: vec![0u8; 16].into(),
        }]))
    }
}

struct Bench {
    app: App,
    url: String,
    noop: Arc<Noop>,
    media: std::path::PathBuf,
}

async fn bench_app(tag: &str, slots: u32) -> Bench {
    bench_app_via(tag, slots, SERVER, false).await
}

/// A bench app whose pool reaches Postgres at `server` (a [`TripCounter`]'s address); with
/// `limits`, the abuse limits at their defaults, as deployed.
async fn bench_app_via(tag: &str, slots: u32, server: &str, limits: bool) -> Bench {
    let name = format!("mj_bench_{tag}_{}", std::process::id());
    let url = format!("{SERVER}/{name}");
    db::create_database_if_missing(&url)
        .await
        .expect("create the bench database");
    let app_url = format!("{server}/{name}");
    // Media on tmpfs when there is one: the disk under test is Postgres's.
    let shm = std::path::Path::new("/dev/shm");
    let media = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
    .join(format!("mj-bench-{tag}"));
    let (u, m) = (app_url.clone(), media.to_string_lossy().into_owned());
    let config = Config::from_lookup(move |name| match name {
        "DATABASE_URL" => Some(u.clone()),
        "GENERATOR" => Some("simulator".into()),
        "MAX_CONCURRENT_JOBS" => Some(slots.to_string()),
        "MEDIA_DIR" => Some(m.clone()),
        "PUBLIC_BASE_URL" => Some("http://127.0.0.1".into()),
        "DB_POOL_SIZE" => Some("40".into()),
        // Producers are a handful of users enqueueing thousands of jobs: no abuse limits,
        // unless asked for (then each producer's request is of one of many users).
        "RATE_LIMIT_PER_MINUTE" | "MAX_QUEUED_PER_USER" if !limits => Some("0".into()),
        _ => None,
    })
    .unwrap();
    let pool = db::pool(&app_url, config.db_pool_size).unwrap();
    db::migrate(&pool).await.expect("migrate");
    // A running service's database has history and statistics. On a brand-new empty table,
    // Postgres plans every prepared statement as if for a tiny table until autovacuum's first
    // ANALYZE (up to a minute later): a few seconds' phase would measure only that.
    pool.get()
        .await
        .unwrap()
        .batch_execute(HISTORY)
        .await
        .expect("seed the history");
    let noop = Arc::new(Noop::default());
    let app = App::new(config, pool, Dispatcher::embedded(), noop.clone());
    let bench = Bench {
        app,
        url,
        noop,
        media,
    };
    bench.publish_statistics().await;
    bench
}

impl Bench {
    /// Closes the pool's connections and waits for their backends to exit. A backend
    /// publishes its statistics when it exits, and otherwise as much as 10 s after it goes
    /// idle: the work of seeding a phase would land in the phase's own counts.
    async fn publish_statistics(&self) {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let others = "SELECT count(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND pid <> pg_backend_pid() \
                        AND backend_type = 'client backend'";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Again each time: a connection still in use a moment ago may be back by now.
            drop(self.app.pool.retain(|_, _| false));
            let open: i64 = client.query_one(others, &[]).await.unwrap().get(0);
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("  {open} other sessions still connected: some statistics may come late");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn drop_database(self) {
        self.app.pool.close();
        let (client, conn) =
            tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let name = self.url.rsplit('/').next().unwrap();
        client
            .execute(
                &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                &[],
            )
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.media);
    }

    /// Jobs completed since the history (completed a day ago) was seeded, from the partial
    /// index of completed jobs: a scan of the whole table would take CPU from what is measured.
    async fn completed(&self) -> i64 {
        let conn = self.app.pool.get().await.unwrap();
        conn.query_one(
            "SELECT count(*) FROM generation_jobs WHERE status = 'completed' \
             AND job_type = 'character-image' AND completed_at > now() - interval '12 hours'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// Commits, rows and WAL of this database so far. Postgres 15 publishes each backend's
    /// counters about once a second, so a run of a few seconds undercounts; the default
    /// 10,000-job drain is long enough for the lag not to matter.
    async fn work(&self) -> Work {
        let conn = self.app.pool.get().await.unwrap();
        let row = conn
            .query_one(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 \
                 FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        Work {
            commits: row.get::<_, i64>(0) as f64,
            rows: row.get::<_, i64>(1) as f64,
            wal: row.get(2),
        }
    }
}

/// A TCP relay between the app and Postgres that counts round trips: each time a connection's
/// client sends after the server has answered it. Statements sent back to back without waiting
/// (pipelined) count once, as they cost one network delay.
struct TripCounter {
    url: String,
    trips: Arc<std::sync::atomic::AtomicU64>,
}

impl TripCounter {
    async fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("postgres://postgres@{}", listener.local_addr().unwrap());
        let trips = Arc::new(AtomicU64::new(0));
        let counted = trips.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let trips = counted.clone();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect("127.0.0.1:5432")
                        .await
                        .expect("the local Postgres");
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let answered = Arc::new(AtomicBool::new(true));
                    let waiting = answered.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                            if waiting.swap(false, SeqCst) {
                                trips.fetch_add(1, SeqCst);
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_server.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                            // Before the client can see the answer, so its next send counts.
                            answered.store(true, SeqCst);
                            if to_client.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_client.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        TripCounter { url, trips }
    }

    fn count(&self) -> u64 {
        self.trips.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Clone, Copy)]
struct Work {
    commits: f64,
    rows: f64,
    wal: f64,
}

/// One enqueue through the very handler the enqueue Lambda runs, from its event fixture.
async fn enqueue_via_handler(app: &App) -> Uuid {
    let req = lambda_http::request::from_str(FIXTURE).unwrap();
    let response = shared::api::handle(app, req).await;
    assert_eq!(response.status(), 202, "enqueue failed");
    let body: serde_json::Value = serde_json::from_slice(response.body().as_ref()).unwrap();
    body["jobId"].as_str().unwrap().parse().unwrap()
}

/// How many users the many-users enqueue spreads its requests over.
const MANY_USERS: u64 = 1_000;

/// One enqueue through the handler as a user picked at random among [`MANY_USERS`].
async fn enqueue_as_any_user(app: &App, fixture: &serde_json::Value) {
    let mut request = fixture.clone();
    request["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = format!(
        "bench-user-{}",
        Uuid::new_v4().as_u128() % u128::from(MANY_USERS)
    )
    .into();
    let req = lambda_http::request::from_str(&request.to_string()).unwrap();
    let response = shared::api::handle(app, req).await;
    assert_eq!(response.status(), 202, "enqueue failed");
}

const STATUS_FIXTURE: &str = include_str!("../../../events/status.json");

/// One status read through the handler the status Lambda runs, from its event fixture, of a
/// queued job by its owner: its answer carries a position.
async fn status_via_handler(app: &App, id: &str, user_id: &str) {
    let mut request: serde_json::Value = serde_json::from_str(STATUS_FIXTURE).unwrap();
    let path = format!("/api/generate/status/{id}");
    request["rawPath"] = path.clone().into();
    request["requestContext"]["http"]["path"] = path.into();
    request["pathParameters"]["jobId"] = id.into();
    request["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user_id.into();
    let req = lambda_http::request::from_str(&request.to_string()).unwrap();
    let response = shared::api::handle(app, req).await;
    assert_eq!(response.status(), 200, "status read failed");
    let body: serde_json::Value = serde_json::from_slice(response.body().as_ref()).unwrap();
    assert!(
        body["position"].as_i64().is_some(),
        "a queued job's position: {body}"
    );
}

async fn queued_depth(app: &App) -> i64 {
    let conn = app.pool.get().await.unwrap();
    conn.query_one(
        "SELECT count(*) FROM generation_jobs WHERE status = 'queued'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The enqueue handler's statement (`shared/src/jobs/insert.sql`, as built) run by pgbench with
/// what the handler binds for the bench's fixture: its user, tenant and params, the bench app's
/// limits, and no local worker standing ready (as in the enqueue phase). The ids are made in
/// the statement, as pgbench has no uuids.
fn enqueue_statement_alone(b: &Bench, clients: u32, secs: u64) -> f64 {
    // Without its comments: pgbench would bind a parameter a comment names, and Postgres could
    // not tell its type.
    let sql: String = include_str!("../../../shared/src/jobs/insert.sql")
        .lines()
        .map(|line| line.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
        .replace("$13", "NULL")
        .replace("$1,", "gen_random_uuid(),")
        .replace("$5,", "gen_random_uuid(),");
    // Highest first, so that `$1` does not rewrite the start of `$12`.
    let sql = (2..=12).rev().fold(sql, |sql, n| {
        sql.replace(&format!("${n}"), &format!(":p{n}"))
    });
    assert!(!sql.contains('$'), "every parameter is bound");
    let path = std::env::temp_dir().join(format!("mj-bench-insert-{}.sql", std::process::id()));
    std::fs::write(&path, format!("{sql};\n")).unwrap();
    let c = &b.app.config;
    let request: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let claims = &request["requestContext"]["authorizer"]["jwt"]["claims"];
    let body: serde_json::Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    // As the handler stores a character request.
    let params = serde_json::json!({
        "imageReferenceId": body["imageReferenceId"],
        "prompt": body["prompt"],
        "negativePrompt": null,
    });
    let defines = [
        format!("p2={}", claims["sub"].as_str().unwrap()),
        format!("p3={}", claims["tenant_id"].as_str().unwrap()),
        "p4=character-image".to_owned(),
        format!("p6={params}"),
        format!("p7={}", c.job_max_attempts),
        format!("p8={}", c.max_concurrent_jobs),
        format!("p9={}", shared::jobs::RESERVATION.as_secs()),
        format!("p10={}", c.max_active_per_user),
        format!("p11={}", c.quota.per_minute),
        format!("p12={}", c.quota.max_queued),
    ];
    let name = b.url.rsplit('/').next().unwrap();
    let rate = pgbench(path.to_str().unwrap(), clients, secs, name, &defines);
    let _ = std::fs::remove_file(&path);
    rate
}

/// Starts the embedded queue's workers; send on the returned channel to stop them.
fn start_workers(
    app: &App,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let Dispatcher::Embedded { local } = app.queue.clone() else {
        unreachable!("the bench runs the embedded queue")
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(shared::worker::run_embedded(
        app.clone(),
        local,
        async move {
            let _ = stop_rx.await;
        },
    ));
    (stop_tx, runner)
}

/// Enqueues `jobs` jobs through the handler from 10 concurrent producers.
async fn enqueue_many(app: &App, jobs: i64) {
    let taken = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let producers: Vec<_> = (0..10)
        .map(|_| {
            let (app, taken) = (app.clone(), taken.clone());
            tokio::spawn(async move {
                while taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                    enqueue_via_handler(&app).await;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
}

struct Latencies(Vec<Duration>);

impl Latencies {
    fn p(&mut self, q: f64) -> Duration {
        self.0.sort();
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0[((self.0.len() - 1) as f64 * q).round() as usize]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `producers` loops of `op` for `secs`; returns (latencies, operations per second).
async fn load<F, Fut>(producers: usize, secs: u64, op: F) -> (Latencies, f64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    op().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    (Latencies(all), rate)
}

/// pgbench's transactions per second for a script (one of `pglimit/`, or a path) at
/// `clients`; `defines` are its `-D` variables.
fn pgbench(script: &str, clients: u32, secs: u64, database: &str, defines: &[String]) -> f64 {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pglimit");
    let path = if script.contains('/') {
        script.to_owned()
    } else {
        format!("{dir}/{script}")
    };
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-n",
            "-M",
            "prepared",
            "-T",
            &secs.to_string(),
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
            "-f",
            &path,
            database,
        ])
        .args(defines.iter().flat_map(|d| ["-D", d.as_str()]))
        .output()
        .expect("pgbench (Debian: postgresql-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pgbench {script}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn psql(database: &str, sql: &str) {
    let status = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-qX",
            "-d",
            database,
            "-c",
            sql,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{sql}");
}

struct Limits {
    enq1: f64,
    enq10: f64,
    job3_20: f64,
    job1_20: f64,
    rows: Vec<String>,
}

impl Limits {
    /// The one-INSERT limit for 1 or 10 clients, and its name in the ratio column.
    fn insert_at(&self, clients: u64) -> (f64, String) {
        let limit = if clients == 1 { self.enq1 } else { self.enq10 };
        (limit, format!("INSERT @{clients}"))
    }
}

fn limits(secs: u64) -> Limits {
    let db = format!("mj_pglimit_{}", std::process::id());
    psql("postgres", &format!("CREATE DATABASE {db}"));
    psql(&db, include_str!("../pglimit/schema.sql"));
    let mut rows = Vec::new();
    let mut get = |script: &str, clients: u32| {
        let tps = pgbench(script, clients, secs, &db, &[]);
        rows.push(format!(
            "| pgbench `{script}`, {clients} clients | {tps:.0} jobs/s | (limit) |"
        ));
        tps
    };
    let enq1 = get("enq.sql", 1);
    let enq10 = get("enq.sql", 10);
    let job3_20 = get("job_3tx.sql", 20);
    let job1_20 = get("job_1tx.sql", 20);
    psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    Limits {
        enq1,
        enq10,
        job3_20,
        job1_20,
        rows,
    }
}

fn ratio(value: f64, limit: f64, name: &str) -> String {
    format!("{:.2}× {name}", value / limit)
}

/// A Lambda Runtime API that notes when the function first asks for work ("ready") and never
/// gives it any.
async fn ready_time(binary: &std::path::Path) -> (Duration, u64) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("DATABASE_URL", format!("{SERVER}/never_connected"))
        .env(
            "SQS_QUEUE_URL",
            "https://sqs.us-east-1.amazonaws.com/123456789012/media-jobs",
        )
        .env("GENERATOR", "simulator")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the function asked for its first event")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = socket.read(&mut buf).await.unwrap();
    let ready = started.elapsed();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("/runtime/invocation/next"));
    let pid = child.id().unwrap();
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let _ = socket.shutdown().await;
    child.kill().await.unwrap();
    (ready, rss_kib)
}

/// BENCH_PHASES (comma separated: enqueue, http, drain, e2e, pickup, trips, sqs, binaries) picks
/// phases;
/// all by default.
fn phase(name: &str) -> bool {
    std::env::var("BENCH_PHASES")
        .map(|p| p.split(',').any(|x| x.trim() == name))
        .unwrap_or(true)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let secs = env_number("BENCH_SECONDS", 5);
    let drain_jobs = env_number("BENCH_DRAIN_JOBS", 10_000) as i64;
    let mut table = vec![
        "| measure | value | ratio to the same-run limit |".to_owned(),
        "|---|---|---|".to_owned(),
    ];

    eprintln!("pgbench limits ({secs} s each)...");
    let limits = limits(secs);
    table.extend(limits.rows.iter().cloned());

    // ---- enqueue through the Lambda's handler ----
    for producers in [1usize, 10].into_iter().filter(|_| phase("enqueue")) {
        eprintln!("enqueue via handler, {producers} producers...");
        let b = bench_app(&format!("enq{producers}"), 5).await;
        let app = b.app.clone();
        let (mut lat, rate) = load(producers, secs, move || {
            let app = app.clone();
            async move {
                enqueue_via_handler(&app).await;
            }
        })
        .await;
        let (limit, name) = limits.insert_at(producers as u64);
        table.push(format!(
            "| enqueue, enqueue handler, {producers} producer(s): p50 {} p99 {} | {rate:.0} jobs/s | {} |",
            ms(lat.p(0.5)),
            ms(lat.p(0.99)),
            ratio(rate, limit, &name)
        ));
        b.drop_database().await;
    }

    // ---- the same, the requests spread over many users, abuse limits on ----
    // Fair share puts a user's first jobs near the head of the line: positions are counted
    // in the middle of the queue, not at its end as for one user.
    if phase("enqueue") {
        eprintln!("enqueue via handler, 10 producers, {MANY_USERS} users...");
        let b = bench_app_via("enqmany", 5, SERVER, true).await;
        let app = b.app.clone();
        let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let (mut lat, rate) = load(10, secs, move || {
            let (app, fixture) = (app.clone(), fixture.clone());
            async move {
                enqueue_as_any_user(&app, &fixture).await;
            }
        })
        .await;
        let (limit, name) = limits.insert_at(10);
        table.push(format!(
            "| enqueue, enqueue handler, 10 producers, {MANY_USERS} users, abuse limits on: p50 {} p99 {} | {rate:.0} jobs/s | {} |",
            ms(lat.p(0.5)),
            ms(lat.p(0.99)),
            ratio(rate, limit, &name)
        ));
        // Their owners polling the jobs that line left queued, as the front end does every 2 s.
        eprintln!("status reads via handler, queued jobs of {MANY_USERS} users...");
        let queued: Vec<(String, String)> = {
            let conn = b.app.pool.get().await.unwrap();
            conn.query(
                "SELECT id::text, user_id FROM generation_jobs WHERE status = 'queued' \
                 ORDER BY random() LIMIT 1000",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
        };
        let depth = queued_depth(&b.app).await;
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (app, queued) = (b.app.clone(), Arc::new(queued));
        let (mut lat, rate) = load(10, secs, move || {
            let (app, queued, counter) = (app.clone(), queued.clone(), counter.clone());
            async move {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % queued.len();
                status_via_handler(&app, &queued[i].0, &queued[i].1).await;
            }
        })
        .await;
        table.push(format!(
            "| status reads of queued jobs, status handler, 10 clients, {depth} queued of {MANY_USERS} users: p50 {} p99 {} | {rate:.0} reads/s | {} |",
            ms(lat.p(0.5)),
            ms(lat.p(0.99)),
            ratio(rate, limits.enq10, "INSERT @10")
        ));
        b.drop_database().await;
    }

    // ---- the enqueue's statement alone, through pgbench ----
    // Between a bare INSERT and the handler: what admission costs in Postgres, and what the
    // handler adds to it.
    for clients in [1u32, 10].into_iter().filter(|_| phase("enqueue")) {
        eprintln!("enqueue statement via pgbench, {clients} clients...");
        let b = bench_app(&format!("enqsql{clients}"), 5).await;
        let rate = enqueue_statement_alone(&b, clients, secs);
        let (limit, name) = limits.insert_at(clients as u64);
        table.push(format!(
            "| enqueue statement alone (`insert.sql` through pgbench, the handler's job and limits), {clients} clients | {rate:.0} jobs/s | {} |",
            ratio(rate, limit, &name)
        ));
        b.drop_database().await;
    }

    // ---- enqueue and status through the local HTTP server ----
    if phase("http") {
        let b = bench_app("http", 5).await;
        let verifier = Arc::new(shared::auth::LocalVerifier::new(b"bench").unwrap());
        let token = local::demo_token(&verifier, "bench-user", None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // No worker would run here: park the runner's by giving it nothing to claim... it claims, and
        // the no-op generator completes jobs, which is realistic for a live service.
        let running =
            local::start(b.app.clone(), verifier, listener, Duration::from_secs(60)).unwrap();
        let http = reqwest::Client::new();
        for producers in [1usize, 10] {
            eprintln!("enqueue via HTTP, {producers} producers...");
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            let (mut lat, rate) = load(producers, secs, move || {
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            async move {
                let r = http
                    .post(format!("{base}/api/generate/character"))
                    .bearer_auth(&token)
                    .body(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"bench"}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
        })
        .await;
            let (limit, name) = limits.insert_at(producers as u64);
            table.push(format!(
            "| enqueue, local HTTP server, {producers} producer(s): p50 {} p99 {} | {rate:.0} jobs/s | {} |",
            ms(lat.p(0.5)),
            ms(lat.p(0.99)),
            ratio(rate, limit, &name)
        ));
        }
        eprintln!("status reads via HTTP...");
        let ids: Vec<String> = {
            let conn = b.app.pool.get().await.unwrap();
            conn.query(
                "SELECT id::text FROM generation_jobs WHERE user_id = 'bench-user' LIMIT 100",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let ids = Arc::new(ids);
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut lat, rate) = load(10, secs, {
            let (http, base, token) = (http.clone(), base.clone(), token.clone());
            move || {
                let (http, base, token, ids, counter) = (
                    http.clone(),
                    base.clone(),
                    token.clone(),
                    ids.clone(),
                    counter.clone(),
                );
                async move {
                    let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % ids.len();
                    let r = http
                        .get(format!("{base}/api/generate/status/{}", ids[i]))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            }
        })
        .await;
        table.push(format!(
        "| status reads, local HTTP server, 10 clients: p50 {} p99 {} | {rate:.0} reads/s | {} |",
        ms(lat.p(0.5)),
        ms(lat.p(0.99)),
        ratio(rate, limits.enq10, "INSERT @10")
    ));
        running.stop().await;
        b.drop_database().await;
    }

    // ---- drain: jobs already queued, no-op generator ----
    for workers in [5u32, 20].into_iter().filter(|_| phase("drain")) {
        eprintln!("drain {drain_jobs} jobs with {workers} workers...");
        let b = bench_app(&format!("drain{workers}"), workers).await;
        let app = b.app.clone();
        // Fill the queue through the library, before any worker runs.
        enqueue_many(&app, drain_jobs).await;
        b.publish_statistics().await;
        let before = b.work().await;
        let started = Instant::now();
        let (stop_tx, runner) = start_workers(&app);
        // Polling the database while jobs run would take its CPU from the drain: wait for the
        // generator to have started every job, then for the last completions to be written.
        while b.noop.started.lock().unwrap().len() < drain_jobs as usize {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        while b.completed().await < drain_jobs {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let elapsed = started.elapsed();
        let _ = stop_tx.send(());
        runner.await.unwrap();
        // The drain's last second of statistics too.
        b.publish_statistics().await;
        let after = b.work().await;
        let rate = drain_jobs as f64 / elapsed.as_secs_f64();
        table.push(format!(
            "| drain {drain_jobs} queued jobs, {workers} workers | {rate:.0} jobs/s | {} |",
            ratio(rate, limits.job3_20, "3-tx @20")
        ));
        if workers == 20 {
            let per = |a: f64, b: f64| (a - b) / drain_jobs as f64;
            table.push(format!(
                "| work per job while draining: commits (= statements: all autocommit) / rows written / WAL | {:.2} / {:.2} / {:.0} B | |",
                per(after.commits, before.commits),
                per(after.rows, before.rows),
                per(after.wal, before.wal)
            ));
        }
        b.drop_database().await;
    }

    // ---- end to end: producers and workers at once ----
    if phase("e2e") {
        eprintln!("end to end, 10 producers and 20 workers...");
        let b = bench_app("e2e", 20).await;
        let app = b.app.clone();
        // The seeding's statistics out of the way first, as for the drain.
        b.publish_statistics().await;
        let before = b.work().await;
        let (stop_tx, runner) = start_workers(&app);
        let done_before = b.completed().await;
        let started = Instant::now();
        let (calls, enq_rate) = load(10, secs, {
            let app = app.clone();
            move || {
                let app = app.clone();
                async move {
                    enqueue_via_handler(&app).await;
                }
            }
        })
        .await;
        let elapsed = started.elapsed();
        let done = b.completed().await - done_before;
        let _ = stop_tx.send(());
        // Returns once the jobs still running have written their completions; the jobs still
        // queued stay so. Then every statement of the phase has been counted.
        runner.await.unwrap();
        b.publish_statistics().await;
        let after = b.work().await;
        let completed = b.completed().await - done_before;
        let rate = done as f64 / elapsed.as_secs_f64();
        table.push(format!(
        "| end to end, 10 producers + 20 workers: completed (enqueued {enq_rate:.0}/s) | {rate:.0} jobs/s | {} |",
        ratio(rate, limits.job3_20, "3-tx @20")
    ));
        let enqueued = calls.0.len().max(1) as f64;
        table.push(format!(
        "| work per job end to end: commits / rows written / WAL, per enqueued job ({enqueued:.0} enqueued, {completed} of them completed) | {:.2} / {:.2} / {:.0} B | |",
        (after.commits - before.commits) / enqueued,
        (after.rows - before.rows) / enqueued,
        (after.wal - before.wal) / enqueued
    ));
        b.drop_database().await;
    }

    // ---- pickup latency at an idle trickle ----
    if phase("pickup") {
        eprintln!("pickup latency at 50 jobs/s...");
        let b = bench_app("pickup", 20).await;
        let app = b.app.clone();
        let (stop_tx, runner) = start_workers(&app);
        let mut sent = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..(50 * secs) {
            tick.tick().await;
            let t = Instant::now();
            let id = enqueue_via_handler(&app).await;
            sent.push((id, t));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started_at = b.noop.started.lock().unwrap().clone();
        let mut pickup = Latencies(
            sent.iter()
                .filter_map(|(id, t)| started_at.get(id).map(|s| s.duration_since(*t)))
                .collect(),
        );
        table.push(format!(
        "| pickup (enqueue call to generator start), 50 jobs/s, embedded queue: p50 {} p99 {} | {} of {} picked up | |",
        ms(pickup.p(0.5)),
        ms(pickup.p(0.99)),
        pickup.0.len(),
        sent.len()
    ));
        let _ = stop_tx.send(());
        runner.await.unwrap();
        b.drop_database().await;
    }

    // ---- Postgres round trips per job, counted on the wire ----
    if phase("trips") {
        eprintln!("round trips per job, at a trickle and draining...");
        let relay = TripCounter::start().await;
        let b = bench_app_via("trips", 20, &relay.url, false).await;
        let app = b.app.clone();
        let (stop_tx, runner) = start_workers(&app);
        // The first jobs also open pooled connections and prepare statements: not counted.
        let trickle = |jobs: usize| {
            let app = app.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                for _ in 0..jobs {
                    tick.tick().await;
                    enqueue_via_handler(&app).await;
                }
                // The last job's completion is written well within this.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        trickle(50).await;
        let jobs = 50 * secs as usize;
        let before = relay.count();
        trickle(jobs).await;
        let at_trickle = (relay.count() - before) as f64 / jobs as f64;
        let _ = stop_tx.send(());
        runner.await.unwrap();
        let queued = 5000i64;
        let before = relay.count();
        enqueue_many(&app, queued).await;
        let enqueue = (relay.count() - before) as f64 / queued as f64;
        // Counted beside the relay, not through it.
        let (watch, conn) = tokio_postgres::connect(&b.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let queued_now = || async {
            watch
                .query_one(
                    "SELECT count(*) FROM generation_jobs WHERE status IN ('queued', 'processing')",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        let before = relay.count();
        let (stop_tx, runner) = start_workers(&app);
        while b.noop.started.lock().unwrap().len() < 50 + jobs + queued as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while queued_now().await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let draining = (relay.count() - before) as f64 / queued as f64;
        let _ = stop_tx.send(());
        runner.await.unwrap();
        table.push(format!(
            "| Postgres round trips per job (on the wire): at a trickle of 50 jobs/s, whole life / enqueue of {queued} / draining them with 20 workers | {at_trickle:.2} / {enqueue:.2} / {draining:.2} | |"
        ));
        b.drop_database().await;
    }

    // ---- SQS requests per job, against a local SQS API when one is given ----
    if let (true, Ok(endpoint)) = (phase("sqs"), std::env::var("MOTO_ENDPOINT")) {
        eprintln!("SQS requests per job (moto at {endpoint})...");
        let jobs = 300i64;
        // A local SQS API takes any credentials; name them so the SDK never goes looking for
        // real ones (the instance metadata endpoint among them).
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
            ("AWS_REGION", "us-east-1"),
        ] {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let config = shared::queue::sqs_client(&format!("{endpoint}/123456789012/x")).await;
        let name = format!("bench-{}", Uuid::new_v4().simple());
        let queue_url = config
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let mut b = bench_app("sqs", 20).await;
        b.app.queue = Dispatcher::sqs(config.clone(), queue_url.clone());
        let before = shared::queue::SQS_REQUESTS.load(std::sync::atomic::Ordering::Relaxed);
        let app = b.app.clone();
        enqueue_many(&app, jobs).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while b.completed().await < jobs && Instant::now() < deadline {
            shared::worker::poll_sqs_once(&app, &config, &queue_url, Duration::from_secs(1))
                .await
                .unwrap();
        }
        // Then until the queue is empty: the messages of jobs that ran before their own
        // message arrived still cost a receive and a delete each.
        while shared::worker::poll_sqs_once(&app, &config, &queue_url, Duration::from_secs(1))
            .await
            .unwrap()
            > 0
            && Instant::now() < deadline
        {}
        assert_eq!(b.completed().await, jobs, "every job completed");
        let requests =
            shared::queue::SQS_REQUESTS.load(std::sync::atomic::Ordering::Relaxed) - before;
        table.push(format!(
            "| SQS requests per job (sends, receives, delete batches, visibility changes; {jobs} jobs, 20 slots, moto; until the queue is empty) | {:.3} ({requests} requests) | |",
            requests as f64 / jobs as f64
        ));
        b.drop_database().await;
    }

    // ---- the function binaries ----
    if !phase("binaries") {
        println!("{}", table.join("\n"));
        return;
    }
    eprintln!("function binaries (release build)...");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "enqueue",
            "-p",
            "status",
            "-p",
            "worker",
            "-p",
            "poller",
        ])
        .status()
        .unwrap();
    assert!(built.success());
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release");
    for f in ["enqueue", "status", "worker", "poller"] {
        let path = target.join(f);
        let size = std::fs::metadata(&path).unwrap().len();
        let mut readies = Vec::new();
        let mut rss = 0;
        for _ in 0..5 {
            let (ready, kib) = ready_time(&path).await;
            readies.push(ready);
            rss = rss.max(kib);
        }
        let mut readies = Latencies(readies);
        table.push(format!(
            "| `{f}` binary (x86_64, stripped): size / process start to ready (median of 5) / resident | {:.1} MiB / {} / {:.1} MiB | |",
            size as f64 / 1048576.0,
            ms(readies.p(0.5)),
            rss as f64 / 1024.0
        ));
    }

    table.push(format!(
        "| (also measured) pgbench one-transaction job @20 | {:.0} jobs/s | |",
        limits.job1_20
    ));
    let report = table.join("\n");
    println!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.md"), format!("{report}\n")).unwrap();
}
