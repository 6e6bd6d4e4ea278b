use std::time::Duration;

use shared::{queue::Dispatcher, worker::Outcome};
use uuid::Uuid;

use crate::support::*;

#[tokio::test]
async fn the_worker_completes_a_job_and_stores_its_media() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "a knight").await;
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m-1", &job_message(id))])).await;
    assert!(response.batch_item_failures.is_empty());
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i16>("progress"), 100);
    assert_eq!(
        row.get::<_, Option<String>>("model_used").as_deref(),
        Some("counting-simulator")
    );
    let media_id: Uuid = row
        .get::<_, Option<Uuid>>("result_media_id")
        .expect("result media");
    let conn = t.db.pool.get().await.unwrap();
    let media = conn
        .query_one(
            "SELECT storage_key, mime_type, size_bytes FROM generated_media WHERE id = $1",
            &[&media_id],
        )
        .await
        .unwrap();
    let bytes = std::fs::read(t.media.path().join(media.get::<_, String>("storage_key"))).unwrap();
    assert_eq!(media.get::<_, String>("mime_type"), "image/png");
    assert_eq!(media.get::<_, i64>("size_bytes"), bytes.len() as i64);
}

#[tokio::test]
async fn an_animation_produces_a_real_video_file() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let (_, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/animation",
            Some(&alice),
            Some(r#"{"moodboardId":"2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c","sourceImageId":"3d4e5f60-7182-4930-9c4d-5e6f7a8b9c0d"}"#),
        ),
    )
    .await;
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m-1", &job_message(id))])).await;
    let (_, status) = poll_status(&t.app, &alice, id).await;
    assert_eq!(status["result"]["mimeType"], "video/webm");
    let key = status["result"]["publicUrl"]
        .as_str()
        .unwrap()
        .strip_prefix("http://media.test/media/")
        .unwrap();
    let bytes = std::fs::read(t.media.path().join(key)).unwrap();
    assert_eq!(
        &bytes[..4],
        &[0x1a, 0x45, 0xdf, 0xa3],
        "an EBML (WebM) header"
    );
}

#[tokio::test]
async fn a_fatal_generator_error_fails_the_job_with_a_readable_message() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "please simulate:fail now")
        .await;
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m-1", &job_message(id))])).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "a failed job is a settled outcome, not a redelivery"
    );
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert_eq!(row.get::<_, i32>("attempts"), 1);
    assert!(row
        .get::<_, Option<String>>("error_message")
        .unwrap()
        .starts_with("simulated failure"));
    let (_, body) = call(
        &t.app,
        api_request(
            "GET",
            &format!("/api/generate/status/{id}"),
            Some(&user("alice", None)),
            None,
        ),
    )
    .await;
    assert_eq!(body["status"], "failed");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("simulated failure"));
    assert!(body["result"].is_null());
}

#[tokio::test]
async fn a_retryable_error_on_the_last_attempt_fails_the_job_and_says_it_gave_up() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "simulate:retryable")
        .await;
    for attempt in 1..=3 {
        shared::worker::handle_sqs(
            &t.app,
            batch(vec![sqs_record(&format!("m-{attempt}"), &job_message(id))]),
        )
        .await;
        // Skip the retry backoff rather than wait it out.
        let conn = t.db.pool.get().await.unwrap();
        conn.execute(
            "UPDATE generation_jobs SET run_after = now() WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    }
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert_eq!(row.get::<_, i32>("attempts"), 3);
    assert!(row
        .get::<_, Option<String>>("error_message")
        .unwrap()
        .starts_with("gave up after 3 attempts"));
}

#[tokio::test]
async fn the_same_message_delivered_twice_runs_the_generator_once() {
    let t = TestApp::with(|_| Dispatcher::embedded(), Duration::from_millis(200)).await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "once").await;
    let body = job_message(id);
    // Twice in one batch (concurrently), then once more after it finished.
    let response = shared::worker::handle_sqs(
        &t.app,
        batch(vec![sqs_record("m-1", &body), sqs_record("m-1-dup", &body)]),
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m-1-late", &body)])).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "a message for a finished job is acknowledged"
    );
    assert_eq!(t.generator.calls_for(id), 1);
    assert_eq!(t.status_of(id).await, "completed");
}

#[tokio::test]
async fn a_batch_with_one_bad_record_reports_exactly_that_record() {
    let t = TestApp::embedded().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(a, &user("alice", None), "a").await;
    t.insert_job(b, &user("bob", None), "b").await;
    let response = shared::worker::handle_sqs(
        &t.app,
        batch(vec![
            sqs_record("good-1", &job_message(a)),
            sqs_record("poison", "{\"jobId\": 42"),
            sqs_record("good-2", &job_message(b)),
        ]),
    )
    .await;
    let failed = reported(&response);
    assert_eq!(failed, ["poison"]);
    assert_eq!(t.status_of(a).await, "completed");
    assert_eq!(t.status_of(b).await, "completed");
    let wire = serde_json::to_value(&response).unwrap();
    assert_eq!(
        wire,
        serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "poison" }] })
    );
}

#[tokio::test]
async fn a_message_for_an_unknown_job_is_acknowledged_and_runs_nothing() {
    let t = TestApp::embedded().await;
    let response = shared::worker::handle_sqs(
        &t.app,
        batch(vec![sqs_record("m-1", &job_message(Uuid::now_v7()))]),
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.generator.total_calls(), 0);
}

#[tokio::test]
async fn when_the_database_is_down_the_record_is_reported_for_redelivery() {
    let t = TestApp::embedded().await;
    let broken = shared::App::new(
        config(
            "postgres://postgres@127.0.0.1:5432/mj_no_such_database",
            t.media.path(),
        ),
        shared::db::pool("postgres://postgres@127.0.0.1:5432/mj_no_such_database", 1).unwrap(),
        Dispatcher::embedded(),
        t.generator.clone(),
    );
    let response = shared::worker::handle_sqs(
        &broken,
        batch(vec![sqs_record("m-1", &job_message(Uuid::now_v7()))]),
    )
    .await;
    let failed = reported(&response);
    assert_eq!(failed, ["m-1"]);
}

#[tokio::test]
async fn a_retry_whose_message_cannot_be_sent_still_hands_its_slot_on_and_keeps_its_own_message() {
    // Nothing listens at this SQS endpoint: every send fails.
    let t = TestApp::configured(
        |_| {
            Dispatcher::sqs(
                sqs_client_for("http://127.0.0.1:9"),
                "http://127.0.0.1:9/123456789012/jobs".into(),
            )
        },
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let (retried, next) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(retried, &user("alice", None), "simulate:retryable")
        .await;
    t.insert_job(next, &user("bob", None), "next in line").await;

    let response = shared::worker::handle_sqs(
        &t.app,
        batch(vec![sqs_record("m-retried", &job_message(retried))]),
    )
    .await;

    // The slot the retry freed went to the next job, run here without a message.
    assert_eq!(t.status_of(next).await, "completed");
    let row = t.job_row(retried).await;
    assert_eq!(row.get::<_, String>("status"), "queued");
    assert_eq!(row.get::<_, i32>("attempts"), 1);
    // The message that delivered the failed attempt comes back to carry the retry.
    let failed = reported(&response);
    assert_eq!(failed, ["m-retried"]);
}

#[tokio::test]
async fn a_job_still_running_as_the_invocation_ends_is_cut_off_and_only_its_record_is_reported() {
    // Every job takes a minute; the invocation has 13 s left, 10 s before it is cut off.
    let t = TestApp::with(|_| Dispatcher::embedded(), Duration::from_secs(60)).await;
    let slow = Uuid::now_v7();
    t.insert_job(slow, &user("alice", None), "slow").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(13);

    let response = shared::worker::handle_sqs_until(
        &t.app,
        batch(vec![
            sqs_record("m-slow", &job_message(slow)),
            sqs_record("m-unknown", &job_message(Uuid::now_v7())),
        ]),
        Some(deadline),
    )
    .await;

    let failed = reported(&response);
    assert_eq!(failed, ["m-slow"], "the other record's outcome stands");
    // Still held under its lease: the rescuer runs it again once that runs out.
    assert_eq!(t.status_of(slow).await, "processing");
}

#[tokio::test]
async fn the_embedded_queue_runs_every_job_without_exceeding_the_concurrency_limit() {
    let t = TestApp::with(|_| Dispatcher::embedded(), Duration::from_millis(50)).await;
    let alice = user("alice", None);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let id = Uuid::now_v7();
        t.insert_job(id, &alice, "batch").await;
        ids.push(id);
    }
    t.run_embedded_until_completed(10).await;
    for id in ids {
        assert_eq!(t.status_of(id).await, "completed");
        assert_eq!(t.generator.calls_for(id), 1);
    }
    let max = t
        .generator
        .max_running
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&max),
        "MAX_CONCURRENT_JOBS is 3, saw {max} at once"
    );
}

/// The runner's side of the embedded queue, opened as `run_embedded` opens it, with `workers`
/// local workers: what an enqueue hands over arrives on the receiver.
fn open_local_runner(
    t: &TestApp,
    workers: usize,
) -> (
    std::sync::Arc<shared::queue::LocalQueue>,
    tokio::sync::mpsc::UnboundedReceiver<(
        shared::jobs::Claimed,
        tokio::sync::OwnedSemaphorePermit,
    )>,
) {
    let Dispatcher::Embedded { local } = t.app.queue.clone() else {
        unreachable!("the app runs the embedded queue")
    };
    let (runner, started) = tokio::sync::mpsc::unbounded_channel();
    local.open(
        std::sync::Arc::new(tokio::sync::Semaphore::new(workers)),
        runner,
    );
    (local, started)
}

/// A character job posted by `who`.
fn character_for(who: &str) -> lambda_http::Request {
    api_request(
        "POST",
        "/api/generate/character",
        Some(&user(who, None)),
        Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
    )
}

#[tokio::test]
async fn an_enqueue_while_a_local_worker_stands_free_hands_it_its_job_already_claimed() {
    let t = TestApp::embedded().await;
    let (local, mut started) = open_local_runner(&t, 1);
    let enqueue = || call(&t.app, character_for("alice"));
    let (status, body) = enqueue().await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["mode"], "direct");
    assert_eq!(
        body["status"], "processing",
        "inserted claimed, not reserved"
    );
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    let (claim, _worker) = started
        .try_recv()
        .expect("the job was handed to the runner");
    assert_eq!((claim.job.id, claim.attempt()), (id, 1));
    let conn = t.db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT j.status::text, j.attempts, j.started_at IS NOT NULL AS started, \
                    s.lease_expires_at = j.lease_expires_at AS slot_leased_with_it \
             FROM generation_jobs j JOIN job_slots s ON s.job_id = j.id WHERE j.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "processing");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));

    // Its one local worker is busy: the next job only reserves a slot, for a claim to take.
    let (_, body) = enqueue().await;
    assert_eq!(
        (body["mode"].as_str(), body["status"].as_str()),
        (Some("direct"), Some("queued"))
    );
    assert!(started.try_recv().is_err());

    // Once the runner has stopped, enqueues reserve as behind SQS.
    local.close();
    drop(_worker);
    let (_, body) = enqueue().await;
    assert_eq!(body["status"], "queued");
}

#[tokio::test]
async fn an_enqueue_whose_client_goes_away_midway_still_hands_its_started_job_over() {
    let t = TestApp::embedded().await;
    let (local, mut started) = open_local_runner(&t, 1);
    let request = character_for("alice");
    // The server drops the request's future at the first point it waits, as hyper does when
    // the client disconnects.
    let dropped = tokio::time::timeout(Duration::ZERO, shared::api::handle(&t.app, request)).await;
    assert!(dropped.is_err(), "the handler had to wait for the database");
    let (claim, _worker) = tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .expect("the started job was handed to the runner")
        .expect("the runner's side is open");
    assert_eq!(t.status_of(claim.job.id).await, "processing");
    assert_eq!(claim.attempt(), 1);
    local.close();
}

#[tokio::test]
async fn an_enqueue_does_not_start_ahead_of_a_job_that_holds_a_reservation() {
    let t = TestApp::embedded().await;
    // Reserved while the runner had no worker free (or before it ran): it starts first.
    let reserved = Uuid::now_v7();
    t.insert_job(reserved, &user("bob", None), "reserved").await;
    let (local, mut started) = open_local_runner(&t, 2);
    let (_, body) = call(&t.app, character_for("alice")).await;
    assert_eq!(
        (body["mode"].as_str(), body["status"].as_str()),
        (Some("direct"), Some("queued")),
        "a slot is free, but the reserved job goes first: {body}"
    );
    assert!(started.try_recv().is_err());
    local.close();
}

#[tokio::test]
async fn an_enqueue_that_finds_a_job_waiting_queues_behind_it_even_with_a_local_worker_free() {
    let t = TestApp::embedded().await;
    // A job already waits in line (the runner is not running yet, so it was only reserved,
    // and its reservation ran out); a new one must not overtake it.
    let first = Uuid::now_v7();
    t.insert_job(first, &user("bob", None), "first").await;
    t.free_all_slots().await;
    let conn = t.db.pool.get().await.unwrap();
    let admitted = shared::jobs::insert(
        &conn,
        &shared::jobs::NewJob {
            id: Uuid::now_v7(),
            owner: &user("alice", None),
            job_type: shared::model::JobType::CharacterImage,
            entity_id: Uuid::new_v4(),
            params: &serde_json::json!({}),
            max_attempts: 3,
            limits: t.app.config.limits(),
            quota: shared::jobs::Quota::UNLIMITED,
            start: Some(Duration::from_secs(60)),
        },
    )
    .await
    .unwrap();
    assert!(admitted.started.is_none() && !admitted.direct);
    assert_eq!(admitted.queued_ahead, 1);
}

#[tokio::test]
async fn a_completion_from_an_attempt_that_lost_its_job_changes_nothing() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "late").await;
    let conn = t.db.pool.get().await.unwrap();
    let stale = claim(&t, id).await;
    // The job is taken from this attempt (as a rescue would) and claimed again.
    conn.execute(
        "UPDATE generation_jobs SET status = 'queued', lease_expires_at = NULL WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let current = claim(&t, id).await;
    assert_eq!(current.attempt(), 2);

    assert_eq!(
        shared::worker::run_claimed(&t.app, stale).await.unwrap(),
        Outcome::Superseded
    );
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "processing");
    let media: i64 = conn
        .query_one("SELECT count(*) FROM generated_media", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(media, 0, "the stale attempt wrote no media rows");
    assert_eq!(
        std::fs::read_dir(t.media.path().join(id.to_string()))
            .unwrap()
            .count(),
        0,
        "and left no files"
    );

    assert_eq!(
        shared::worker::run_claimed(&t.app, current).await.unwrap(),
        Outcome::Completed
    );
}

#[tokio::test]
async fn jobs_finishing_together_complete_through_the_batching_completer_and_a_stale_one_is_superseded(
) {
    let mut t = TestApp::embedded().await;
    t.app.completions = Some(shared::worker::Completer::start(
        &t.app,
        std::sync::Arc::new(tokio::sync::Mutex::new(())),
    ));
    let alice = user("alice", None);
    let mut ids = Vec::new();
    for _ in 0..8 {
        let id = Uuid::now_v7();
        t.insert_job(id, &alice, "together").await;
        ids.push(id);
    }
    let mut claims = Vec::new();
    for id in &ids {
        claims.push(claim(&t, *id).await);
    }
    // The last job is taken from its attempt (as a rescue would) and claimed again.
    let conn = t.db.pool.get().await.unwrap();
    let lost = ids[7];
    conn.execute(
        "UPDATE generation_jobs SET status = 'queued', lease_expires_at = NULL WHERE id = $1",
        &[&lost],
    )
    .await
    .unwrap();
    let current = claim(&t, lost).await;

    let outcomes = futures::future::join_all(
        claims
            .into_iter()
            .map(|c| shared::worker::run_claimed(&t.app, c)),
    )
    .await;
    for (id, outcome) in ids.iter().zip(&outcomes) {
        let expected = if *id == lost {
            Outcome::Superseded
        } else {
            Outcome::Completed
        };
        assert_eq!(outcome.as_ref().unwrap(), &expected, "job {id}");
    }
    for id in &ids[..7] {
        let row = t.job_row(*id).await;
        assert_eq!(row.get::<_, String>("status"), "completed");
        assert!(row.get::<_, Option<Uuid>>("result_media_id").is_some());
    }
    let media_of_lost: i64 = conn
        .query_one(
            "SELECT count(*) FROM generated_media WHERE job_id = $1",
            &[&lost],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(media_of_lost, 0, "the stale attempt wrote no media rows");
    assert_eq!(t.status_of(lost).await, "processing");
    assert_eq!(
        shared::worker::run_claimed(&t.app, current).await.unwrap(),
        Outcome::Completed
    );
}

fn finished_job(claim: &shared::jobs::Claimed, storage: &'static str) -> shared::jobs::Completion {
    shared::jobs::Completion {
        job_id: claim.job.id,
        attempt: claim.attempt(),
        media: vec![shared::jobs::NewMedia {
            id: Uuid::new_v4(),
            media_type: "image",
            mime_type: "image/png",
            storage,
            storage_key: format!("{}/0.png", claim.job.id),
            public_url: "http://media.test/0.png".into(),
            width: Some(1),
            height: Some(1),
            size_bytes: 16,
        }],
        credits: 1,
    }
}

#[tokio::test]
async fn a_completion_batch_that_fails_is_written_job_by_job_so_one_bad_job_holds_back_no_other() {
    let t = TestApp::embedded().await;
    let completer =
        shared::worker::Completer::start(&t.app, std::sync::Arc::new(tokio::sync::Mutex::new(())));
    let alice = user("alice", None);
    let (good, bad) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(good, &alice, "good").await;
    t.insert_job(bad, &alice, "bad").await;
    let (good_claim, bad_claim) = (claim(&t, good).await, claim(&t, bad).await);
    // Sent together, so they share a batch; the bad one's media break a CHECK constraint.
    let (good_result, bad_result) = tokio::join!(
        completer.complete(finished_job(&good_claim, "local"), false),
        completer.complete(finished_job(&bad_claim, "no-such-storage"), false),
    );
    assert!(matches!(good_result, Ok((true, None))), "{good_result:?}");
    assert!(bad_result.is_err());
    assert_eq!(t.status_of(good).await, "completed");
    assert_eq!(
        t.status_of(bad).await,
        "processing",
        "left for its lease to expire"
    );
}

#[tokio::test]
async fn the_completer_frees_a_completed_jobs_slot_that_another_statement_held_during_its_round() {
    let t = TestApp::embedded().await;
    let completer =
        shared::worker::Completer::start(&t.app, std::sync::Arc::new(tokio::sync::Mutex::new(())));
    let done = Uuid::now_v7();
    t.insert_job(done, &user("alice", None), "x").await;
    let running = claim(&t, done).await;
    let other = hold_slot_of(&t, done).await;

    let completing = tokio::spawn(async move {
        completer
            .complete(finished_job(&running, "local"), true)
            .await
    });
    // The round commits without the slot; freeing it then waits for the statement holding it.
    let conn = t.db.pool.get().await.unwrap();
    let holder = backend_pid(&other).await;
    let mut waited_for = false;
    // Bounded only so that a broken build fails instead of hanging.
    for _ in 0..1000 {
        waited_for = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))",
                &[&holder],
            )
            .await
            .unwrap()
            .get(0);
        if waited_for || completing.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waited_for, "the completer waits for the slot's holder");
    other.batch_execute("ROLLBACK").await.unwrap();

    let (applied, _) = completing.await.unwrap().unwrap();
    assert!(applied);
    assert_eq!(t.status_of(done).await, "completed");
    let held: i64 = conn
        .query_one("SELECT count(*) FROM job_slots WHERE job_id = $1", &[&done])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "no slot names the completed job");
}

#[tokio::test]
async fn a_stopped_completer_still_writes_completions_but_claims_no_job() {
    let t = TestApp::embedded().await;
    let completer =
        shared::worker::Completer::start(&t.app, std::sync::Arc::new(tokio::sync::Mutex::new(())));
    let alice = user("alice", None);
    let (running, waiting) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(running, &alice, "running").await;
    t.insert_job(waiting, &alice, "waiting").await;
    let running_claim = claim(&t, running).await;
    completer.stop();
    let result = completer
        .complete(finished_job(&running_claim, "local"), true)
        .await
        .unwrap();
    assert!(result.0, "the completion was written");
    assert!(result.1.is_none(), "no job was claimed for the slot");
    assert_eq!(t.status_of(running).await, "completed");
    assert_eq!(t.status_of(waiting).await, "queued");
}
