//! The fault suite: real processes killed with SIGKILL mid-job, and a real Postgres restarted
//! under load. `FAULT_KILLS` and `FAULT_SECONDS` scale them up (infra/faults.sh runs them
//! longer and prints the counts).

use std::{
    collections::HashMap,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use shared::{
    db,
    jobs::{self, NewJob},
    model::{Identity, JobType},
};
use tokio_postgres::NoTls;
use uuid::Uuid;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn fresh_database(server: &str) -> (String, deadpool_postgres::Pool) {
    let url = format!("{server}/mj_fault_{}", Uuid::new_v4().simple());
    db::create_database_if_missing(&url).await.unwrap();
    let pool = db::pool(&url, 4).unwrap();
    db::migrate(&pool).await.unwrap();
    (url, pool)
}

async fn drop_database(server: &str, url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let (client, conn) = tokio_postgres::connect(&format!("{server}/postgres"), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            &[],
        )
        .await
        .unwrap();
}

async fn enqueue(pool: &deadpool_postgres::Pool, slots: u32) -> (Uuid, bool) {
    let owner = Identity {
        user_id: "fault-user".into(),
        tenant_id: None,
    };
    let id = Uuid::now_v7();
    let conn = pool.get().await.unwrap();
    let admitted = jobs::insert(
        &conn,
        &NewJob {
            id,
            owner: &owner,
            job_type: JobType::Moodboard,
            entity_id: Uuid::new_v4(),
            params: &serde_json::json!({ "prompt": "faults", "count": 2 }),
            max_attempts: 50,
            limits: slots.into(),
            quota: jobs::Quota::UNLIMITED,
            start: None,
        },
    )
    .await
    .unwrap();
    (id, admitted.direct)
}

/// The local runner as a separate process: the worker we kill.
fn spawn_runner(database_url: &str, media: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_local"))
        .env("DATABASE_URL", database_url)
        .env("GENERATOR", "simulator")
        .env("SIMULATOR_DURATION_MS", "300")
        .env("MAX_CONCURRENT_JOBS", "4")
        .env("RATE_LIMIT_PER_MINUTE", "0")
        .env("MAX_QUEUED_PER_USER", "0")
        .env("JOB_LEASE_SECONDS", "5")
        .env("JOB_MAX_ATTEMPTS", "50")
        .env("POLL_INTERVAL_SECONDS", "1")
        .env("MEDIA_DIR", media)
        .env("PORT", free_port().to_string())
        .env("JWT_SECRET", "fault-suite")
        .env_remove("SQS_QUEUE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the local runner")
}

#[tokio::test]
async fn workers_killed_mid_job_lose_nothing_run_nothing_twice_and_leak_no_slot() {
    let server = "postgres://postgres@127.0.0.1:5432";
    let (url, pool) = fresh_database(server).await;
    let media = std::env::temp_dir().join(format!("mj-fault-media-{}", Uuid::new_v4().simple()));
    let kills = env_number("FAULT_KILLS", 100);
    let mut accepted = Vec::new();
    let mut rng = rand::thread_rng();
    let mut killed_mid_job = 0;

    for _ in 0..kills {
        // Jobs keep arriving while workers die.
        for _ in 0..rng.gen_range(0..3) {
            accepted.push(enqueue(&pool, 4).await.0);
        }
        let mut runner = spawn_runner(&url, &media);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(80..500))).await;
        let conn = pool.get().await.unwrap();
        let running: i64 = conn
            .query_one(
                "SELECT count(*) FROM generation_jobs WHERE status = 'processing'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        killed_mid_job += (running > 0) as u32;
        runner.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        runner.wait().unwrap();
    }

    // One last worker that is allowed to live finishes everything, rescuing what the dead held.
    let mut runner = spawn_runner(&url, &media);
    let deadline = Instant::now() + Duration::from_secs(180);
    let conn = pool.get().await.unwrap();
    loop {
        let open: i64 = conn
            .query_one(
                "SELECT count(*) FROM generation_jobs WHERE status IN ('queued', 'processing')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runner.kill().unwrap();
    runner.wait().unwrap();

    let states: HashMap<String, i64> = conn
        .query(
            "SELECT status::text, count(*) FROM generation_jobs GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total: i64 = states.values().sum();
    assert_eq!(
        total,
        accepted.len() as i64,
        "every accepted job is still there"
    );
    assert_eq!(
        states.get("queued").copied().unwrap_or(0) + states.get("processing").copied().unwrap_or(0),
        0,
        "{states:?}"
    );

    // Each completed job carries exactly one attempt's media, and was charged once.
    let doubles: i64 = conn
        .query_one(
            "SELECT count(*) FROM generation_jobs j
             WHERE j.status = 'completed' AND (
                 (SELECT count(*) FROM generated_media m WHERE m.job_id = j.id) <> 2
              OR (SELECT count(DISTINCT split_part(split_part(m.storage_key, '/', 2), '-', 1))
                  FROM generated_media m WHERE m.job_id = j.id) <> 1
              OR j.credits_used <> 4)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        doubles, 0,
        "a generator result was applied twice or charged wrongly"
    );
    let orphans: i64 = conn
        .query_one(
            "SELECT count(*) FROM generated_media m JOIN generation_jobs j ON j.id = m.job_id WHERE j.status <> 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);

    // No slot leaked: none is held, and the next job is admitted `direct` again.
    let held: i64 = conn
        .query_one(
            "SELECT count(*) FROM job_slots WHERE lease_expires_at > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
    assert!(enqueue(&pool, 4).await.1, "admission answers direct again");

    let rescued: i64 = conn
        .query_one("SELECT count(*) FROM job_errors", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "faults: {kills} SIGKILLs ({killed_mid_job} with jobs running), {} jobs accepted, {:?}, {rescued} attempts lost and rescued",
        accepted.len(),
        states
    );
    drop(conn);
    pool.close();
    drop_database(server, &url).await;
    let _ = std::fs::remove_dir_all(&media);
}

/// A Postgres of the test's own (initdb as the `postgres` user), so restarting it disturbs no
/// other test.
struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Debian's Postgres server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!("mj-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = Self {
            dir,
            bin,
            port: free_port(),
        };
        pg.as_postgres(&["chown", "-R", "postgres", pg.dir.to_str().unwrap()], true);
        pg.pg(&[
            "initdb",
            "-D",
            &pg.data(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        pg.ctl("start");
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn as_postgres(&self, args: &[&str], as_root: bool) {
        let status = if as_root {
            Command::new(args[0]).args(&args[1..]).status()
        } else {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .stdout(Stdio::null())
                .status()
        }
        .expect("run");
        assert!(status.success(), "{args:?}");
    }

    fn pg(&self, args: &[&str]) {
        let tool = self.bin.join(args[0]).to_string_lossy().into_owned();
        let mut full = vec![tool.as_str()];
        full.extend_from_slice(&args[1..]);
        self.as_postgres(&full, false);
    }

    fn ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        self.pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &options,
            "-l",
            &log,
            "-m",
            "fast",
            "-w",
            action,
        ]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_postgres_restart_under_load_gives_503s_not_500s_recovers_and_loses_no_accepted_job() {
    let pg = PrivatePostgres::start();
    let url = format!("{}/media_jobs", pg.url());
    let media = std::env::temp_dir().join(format!("mj-pgfault-media-{}", Uuid::new_v4().simple()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = shared::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some(url.clone()),
        "GENERATOR" => Some("simulator".into()),
        "SIMULATOR_DURATION_MS" => Some("50".into()),
        "MAX_CONCURRENT_JOBS" => Some("8".into()),
        // The load is one user's: the abuse limits are not under test here.
        "RATE_LIMIT_PER_MINUTE" | "MAX_QUEUED_PER_USER" => Some("0".into()),
        "JOB_LEASE_SECONDS" => Some("5".into()),
        "MEDIA_DIR" => Some(media.to_string_lossy().into_owned()),
        "PUBLIC_BASE_URL" => Some(format!("http://127.0.0.1:{port}")),
        _ => None,
    })
    .unwrap();
    db::create_database_if_missing(&url).await.unwrap();
    let app = shared::App::from_config(config).await.unwrap();
    db::migrate(&app.pool).await.unwrap();
    let verifier = Arc::new(shared::auth::LocalVerifier::new(b"pg-fault").unwrap());
    let token = local::demo_token(&verifier, "pg-user", None);
    let running = local::start(app, verifier, listener, Duration::from_secs(1)).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let seconds = env_number("FAULT_SECONDS", 6);
    let load_until = Instant::now() + Duration::from_secs(seconds);
    let producers = (0..4).map(|_| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(u16, bool, Option<String>)> = Vec::new();
            while Instant::now() < load_until {
                let posted = http
                    .post(format!("{base}/api/generate/character"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "characterId": "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b" }))
                    .send()
                    .await
                    .expect("the API answers during the outage");
                let status = posted.status().as_u16();
                let retry_after = posted.headers().contains_key("retry-after");
                let body: serde_json::Value = posted.json().await.unwrap();
                let job = body["jobId"].as_str().map(str::to_owned);
                if let Some(id) = &job {
                    let polled = http
                        .get(format!("{base}/api/generate/status/{id}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    seen.push((polled.status().as_u16(), polled.headers().contains_key("retry-after"), None));
                }
                seen.push((status, retry_after, job));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    });
    let producers: Vec<_> = producers.collect();
    tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
    // The outage: a fast shutdown (connections are killed) and a second of nothing.
    tokio::task::spawn_blocking({
        let (bin, dir, port) = (pg.bin.clone(), pg.dir.clone(), pg.port);
        move || {
            let pg = PrivatePostgres { bin, dir, port };
            pg.ctl("stop");
            std::thread::sleep(Duration::from_secs(1));
            pg.ctl("start");
            std::mem::forget(pg); // the outer handle owns the cluster
        }
    })
    .await
    .unwrap();

    let mut answers = Vec::new();
    for p in producers {
        answers.extend(p.await.unwrap());
    }
    let count = |code: u16| answers.iter().filter(|(s, _, _)| *s == code).count();
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|(s, _, _)| ![200, 202, 503].contains(s))
        .collect();
    assert!(
        unexpected.is_empty(),
        "only 200, 202 and 503 are acceptable: {unexpected:?}"
    );
    assert!(
        answers
            .iter()
            .filter(|(s, _, _)| *s == 503)
            .all(|(_, retry, _)| *retry),
        "503 carries Retry-After"
    );
    assert!(count(503) > 0, "the outage was seen");
    let accepted: Vec<Uuid> = answers
        .iter()
        .filter_map(|(_, _, id)| id.as_deref())
        .map(|id| id.parse().unwrap())
        .collect();
    // It recovered by itself: requests after the restart succeed.
    let after = http
        .post(format!("{base}/api/generate/character"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "characterId": "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b" }))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 202);

    // Every accepted job is in the database and completes.
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    let completed = loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM generation_jobs WHERE id = ANY($1) AND status = 'completed'",
                &[&accepted],
            )
            .await
            .unwrap()
            .get(0);
        if n == accepted.len() as i64 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "postgres restart: {} answers ({} accepted, {} status 200, {} x 503), {completed} of the accepted completed",
        answers.len(),
        count(202),
        count(200),
        count(503)
    );
    assert_eq!(completed, accepted.len() as i64, "no accepted job is lost");
    running.stop().await;
    let _ = std::fs::remove_dir_all(&media);
}

#[tokio::test]
async fn a_sigterm_lets_the_running_job_finish_before_the_runner_exits() {
    let server = "postgres://postgres@127.0.0.1:5432";
    let (url, pool) = fresh_database(server).await;
    let media = std::env::temp_dir().join(format!("mj-sigterm-{}", Uuid::new_v4().simple()));
    let mut runner = spawn_runner(&url, &media);
    let (job, direct) = enqueue(&pool, 4).await;
    assert!(direct);
    let conn = pool.get().await.unwrap();
    // The bound only stops a broken run.
    for _ in 0..400 {
        if status_of(&conn, job).await == "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status_of(&conn, job).await, "processing");

    let sent = Command::new("kill")
        .args(["-TERM", &runner.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exited = tokio::task::spawn_blocking(move || runner.wait().unwrap())
        .await
        .unwrap();
    assert!(
        exited.success(),
        "a clean exit, not death by the signal: {exited:?}"
    );
    assert_eq!(status_of(&conn, job).await, "completed");
    drop(conn);
    pool.close();
    drop_database(server, &url).await;
    let _ = std::fs::remove_dir_all(&media);
}

async fn status_of(conn: &deadpool_postgres::Object, job: Uuid) -> String {
    conn.query_one(
        "SELECT status::text FROM generation_jobs WHERE id = $1",
        &[&job],
    )
    .await
    .unwrap()
    .get(0)
}
