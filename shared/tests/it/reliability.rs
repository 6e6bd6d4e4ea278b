//! Slots, rescue, the outbox, cancellation, kept errors and credits.

use std::time::Duration;

use shared::{queue::Dispatcher, worker::Outcome};
use uuid::Uuid;

use crate::support::*;

async fn sql(t: &TestApp, statement: &str, id: Uuid) {
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(statement, &[&id]).await.unwrap();
}

#[tokio::test]
async fn racing_claimers_never_hold_more_jobs_than_there_are_slots() {
    let t = TestApp::embedded().await; // MAX_CONCURRENT_JOBS = 3
    for _ in 0..20 {
        t.insert_job(Uuid::now_v7(), &user("alice", None), "x")
            .await;
    }
    let claims = futures::future::join_all((0..8).map(|_| {
        let pool = t.db.pool.clone();
        async move {
            let conn = pool.get().await.unwrap();
            shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 3)
                .await
                .unwrap()
                .len()
        }
    }))
    .await;
    assert_eq!(claims.iter().sum::<usize>(), 3);

    let queued = {
        let conn = t.db.pool.get().await.unwrap();
        let id: Uuid = conn
            .query_one(
                "SELECT id FROM generation_jobs WHERE status = 'queued' LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        id
    };
    let conn = t.db.pool.get().await.unwrap();
    let result = shared::jobs::claim_by_id(&conn, queued, Duration::from_secs(60), 3)
        .await
        .unwrap();
    assert!(matches!(result, ClaimResult::NoSlot), "{result:?}");
}

#[tokio::test]
async fn with_one_slot_jobs_start_in_the_promised_order_and_positions_fall_by_one() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let alice = user("alice", None);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (_, body) = call(
            &t.app,
            api_request(
                "POST",
                "/api/generate/character",
                Some(&alice),
                Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
            ),
        )
        .await;
        ids.push(body["jobId"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    let position = |id: Uuid| {
        let app = t.app.clone();
        let alice = alice.clone();
        async move {
            let (_, body) = poll_status(&app, &alice, id).await;
            body["position"].as_i64()
        }
    };
    for (started, expected) in ids.iter().enumerate() {
        for (i, id) in ids.iter().enumerate().skip(started) {
            assert_eq!(
                position(*id).await,
                Some((i - started + 1) as i64),
                "job {i} after {started} started"
            );
        }
        let conn = t.db.pool.get().await.unwrap();
        let claimed = shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 1)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|c| c.job.id).collect::<Vec<_>>(),
            vec![*expected]
        );
        assert!(
            shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 1)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(shared::jobs::fail(&conn, &claimed[0], "done", false)
            .await
            .unwrap()
            .applied());
    }
}

#[tokio::test]
async fn fifty_racing_enqueues_with_four_free_slots_get_exactly_four_direct_answers() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "4")],
    )
    .await;
    let answers = futures::future::join_all((0..50).map(|i| {
        let app = t.app.clone();
        async move {
            let who = user(&format!("user-{}", i % 7), None);
            call(
                &app,
                api_request(
                    "POST",
                    "/api/generate/character",
                    Some(&who),
                    Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
                ),
            )
            .await
        }
    }))
    .await;
    assert!(answers.iter().all(|(status, _)| *status == 202));
    let direct: Vec<&serde_json::Value> = answers
        .iter()
        .map(|(_, b)| b)
        .filter(|b| b["mode"] == "direct")
        .collect();
    assert_eq!(direct.len(), 4);
    // The direct ones are the ones holding the slots, and they do start.
    let conn = t.db.pool.get().await.unwrap();
    let held: i64 = conn
        .query_one(
            "SELECT count(*) FROM job_slots WHERE lease_expires_at > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 4);
    for body in direct {
        let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
        let result = shared::jobs::claim_by_id(&conn, id, Duration::from_secs(60), 4)
            .await
            .unwrap();
        assert!(matches!(result, ClaimResult::Claimed(_)), "{result:?}");
    }
}

#[tokio::test]
async fn a_slot_reserved_for_a_job_whose_message_never_comes_frees_itself() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let alice = user("alice", None);
    let body = r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#;
    let (_, first) = call(
        &t.app,
        api_request("POST", "/api/generate/character", Some(&alice), Some(body)),
    )
    .await;
    let (_, second) = call(
        &t.app,
        api_request("POST", "/api/generate/character", Some(&alice), Some(body)),
    )
    .await;
    assert_eq!(
        (first["mode"].as_str(), second["mode"].as_str()),
        (Some("direct"), Some("queued"))
    );
    // The first job's worker never shows up; its reservation runs out.
    let conn = t.db.pool.get().await.unwrap();
    conn.execute("UPDATE job_slots SET lease_expires_at = now() - interval '1 second' WHERE job_id IS NOT NULL", &[])
        .await
        .unwrap();
    let second_id: Uuid = second["jobId"].as_str().unwrap().parse().unwrap();
    let claimed = shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "one slot, one job");
    assert_ne!(
        claimed[0].job.id, second_id,
        "FIFO: the older job still goes first"
    );
}

/// Two jobs were answered `direct` and hold slots 1 and 2. The first is cancelled, which frees
/// slot 1; the second's worker is late, and its reservation of slot 2 runs out. The lowest free
/// slot is then 1, while slot 2 still names the second job.
async fn a_job_whose_reservation_ran_out_behind_a_lower_free_slot(t: &TestApp) -> Uuid {
    let alice = user("alice", None);
    let (first, second) = (enqueue_as(t, &alice).await, enqueue_as(t, &alice).await);
    assert_eq!(
        (first["mode"].as_str(), second["mode"].as_str()),
        (Some("direct"), Some("direct"))
    );
    let (first, late) = (id_of(&first), id_of(&second));
    let (status, _) = call(
        &t.app,
        api_request(
            "POST",
            &format!("/api/generate/cancel/{first}"),
            Some(&alice),
            None,
        ),
    )
    .await;
    assert_eq!(status, 200);
    sql(
        t,
        "UPDATE job_slots SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1",
        late,
    )
    .await;
    late
}

async fn slots_naming(t: &TestApp, id: Uuid) -> Vec<(i32, bool)> {
    let conn = t.db.pool.get().await.unwrap();
    conn.query(
        "SELECT slot, lease_expires_at > now() FROM job_slots WHERE job_id = $1 ORDER BY slot",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn two_slots() -> TestApp {
    TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "2")],
    )
    .await
}

#[tokio::test]
async fn the_embedded_queue_claims_a_job_whose_reservation_ran_out_with_the_lowest_free_slot() {
    let t = two_slots().await;
    let late = a_job_whose_reservation_ran_out_behind_a_lower_free_slot(&t).await;
    let conn = t.db.pool.get().await.unwrap();
    let claimed =
        shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), t.app.config.limits())
            .await
            .expect("a stale reservation does not stop the queue");
    assert_eq!(
        claimed.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![late]
    );
    assert_eq!(
        slots_naming(&t, late).await,
        vec![(1, true)],
        "the job holds the slot it was claimed with, and no other names it"
    );
}

#[tokio::test]
async fn a_worker_runs_a_job_whose_reservation_ran_out_when_its_message_finally_comes() {
    let t = two_slots().await;
    let late = a_job_whose_reservation_ran_out_behind_a_lower_free_slot(&t).await;
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(late))])).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.generator.calls_for(late), 1);
    assert_eq!(t.status_of(late).await, "completed");
    assert_eq!(
        slots_naming(&t, late).await,
        vec![],
        "its slots are all free again"
    );
}

#[tokio::test]
async fn a_job_whose_old_reservation_another_statement_holds_waits_instead_of_failing_the_claim() {
    let t = two_slots().await;
    let late = a_job_whose_reservation_ran_out_behind_a_lower_free_slot(&t).await;
    // Another statement holds the old slot row (a concurrent claim taking it as a free slot).
    let mut other = t.db.pool.get().await.unwrap();
    let other = other.transaction().await.unwrap();
    other
        .execute(
            "SELECT 1 FROM job_slots WHERE job_id = $1 FOR UPDATE",
            &[&late],
        )
        .await
        .unwrap();
    let conn = t.db.pool.get().await.unwrap();
    let batch = shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), t.app.config.limits())
        .await
        .expect("the batch claim neither fails nor waits");
    assert!(batch.is_empty(), "the job waits for its old row");
    let one =
        shared::jobs::claim_by_id(&conn, late, Duration::from_secs(60), t.app.config.limits())
            .await
            .expect("the claim by id neither fails nor waits");
    assert!(matches!(one, shared::jobs::ClaimResult::NoSlot));
    other.rollback().await.unwrap();
    let claimed =
        shared::jobs::claim_by_id(&conn, late, Duration::from_secs(60), t.app.config.limits())
            .await
            .unwrap();
    assert!(matches!(claimed, shared::jobs::ClaimResult::Claimed(_)));
    assert_eq!(
        slots_naming(&t, late).await,
        vec![(2, true)],
        "once free, its own old slot is the one it takes back"
    );
}

/// Two jobs hold slots outside any worker, `reserved` holds the third (answered `direct`), and
/// `waiting` waits behind them; `waiting`'s message has been received and acknowledged.
async fn a_job_waiting_for_a_slot_its_message_already_acknowledged(
    queue: &TestQueue,
    t: &TestApp,
) -> (Uuid, Uuid) {
    let alice = user("alice", None);
    for _ in 0..2 {
        let id = Uuid::now_v7();
        t.insert_job(id, &alice, "busy").await;
        claim(t, id).await;
    }
    let (reserved, waiting) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(reserved, &alice, "reserved").await;
    t.insert_job(waiting, &alice, "wait").await;
    queue.send(waiting).await;
    let received =
        shared::worker::poll_sqs_once(&t.app, &queue.client, &queue.url, Duration::from_secs(1))
            .await
            .unwrap();
    assert_eq!(received, 1);
    assert_eq!(t.status_of(waiting).await, "queued");
    assert_eq!(t.generator.calls_for(waiting), 0);
    assert_eq!(
        queue.depth().await,
        (0, 0, 0),
        "the waiting job's message is acknowledged, not kept"
    );
    (reserved, waiting)
}

#[tokio::test]
async fn the_worker_whose_job_frees_a_slot_runs_the_job_waiting_for_it_without_a_message() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await; // MAX_CONCURRENT_JOBS = 3
    let (reserved, waiting) =
        a_job_waiting_for_a_slot_its_message_already_acknowledged(&queue, &t).await;

    let response = shared::worker::handle_sqs(
        &t.app,
        batch(vec![sqs_record("m-reserved", &job_message(reserved))]),
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.status_of(reserved).await, "completed");
    assert_eq!(
        t.status_of(waiting).await,
        "completed",
        "run by the same worker, next"
    );
    assert_eq!(t.generator.calls_for(waiting), 1);
    assert_eq!(
        queue.depth().await,
        (0, 0, 0),
        "no message was sent to hand the slot on"
    );
}

#[tokio::test]
async fn a_worker_near_the_end_of_its_invocation_messages_the_next_job_instead_of_running_it() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let (reserved, waiting) =
        a_job_waiting_for_a_slot_its_message_already_acknowledged(&queue, &t).await;

    let ten_seconds_left = std::time::Instant::now() + Duration::from_secs(10);
    let response = shared::worker::handle_sqs_until(
        &t.app,
        batch(vec![sqs_record("m-reserved", &job_message(reserved))]),
        Some(ten_seconds_left),
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.status_of(reserved).await, "completed");
    assert_eq!(
        t.status_of(waiting).await,
        "queued",
        "left for another invocation"
    );
    let messages = queue.receive().await;
    let bodies: Vec<_> = messages.iter().filter_map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        [job_message(waiting)],
        "which its fresh message starts"
    );
}

#[tokio::test]
async fn the_rescuer_requeues_a_job_whose_lease_expired_and_keeps_the_error() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "x").await;
    let stale = claim(&t, id).await;
    sql(
        &t,
        "UPDATE generation_jobs SET lease_expires_at = now() - interval '1 minute' WHERE id = $1",
        id,
    )
    .await;

    let (requeued, failed) = shared::poller::rescue(&t.app, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!((requeued, failed), (1, 0));
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "queued");
    assert!(row
        .get::<_, Option<String>>("error_message")
        .unwrap()
        .contains("stopped renewing its lease"));
    // Rescuing again finds nothing: it is no longer processing.
    assert_eq!(
        shared::poller::rescue(&t.app, chrono::Utc::now())
            .await
            .unwrap(),
        (0, 0)
    );

    // The worker that lost the lease finishes late: nothing it does applies.
    assert_eq!(
        shared::worker::run_claimed(&t.app, stale).await.unwrap(),
        Outcome::Superseded
    );
    assert_eq!(t.status_of(id).await, "queued");

    // Once its backoff has passed it runs again, as attempt 2, and the first error is kept.
    sql(
        &t,
        "UPDATE generation_jobs SET run_after = now() WHERE id = $1",
        id,
    )
    .await;
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(id))])).await;
    assert!(response.batch_item_failures.is_empty());
    let row = t.job_row(id).await;
    assert_eq!(
        (
            row.get::<_, String>("status"),
            row.get::<_, i32>("attempts")
        ),
        ("completed".into(), 2)
    );
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
    assert_eq!(body["attemptErrors"][0]["attempt"], 1, "{body}");
}

#[tokio::test]
async fn a_freed_slot_is_handed_to_the_oldest_waiting_job_with_a_fresh_message() {
    let queue = TestQueue::new().await;
    let t = TestApp::configured(
        {
            let (client, url) = (queue.client.clone(), queue.url.clone());
            move |_| Dispatcher::sqs(client, url)
        },
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let alice = user("alice", None);
    let (running, waiting) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(running, &alice, "first").await;
    t.insert_job(waiting, &alice, "second").await;
    let claim = claim(&t, running).await;
    // The waiting job's own message is deferred for a long time; nothing is visible now.
    assert_eq!(queue.depth().await.0, 0);

    assert_eq!(
        shared::worker::run_claimed(&t.app, claim).await.unwrap(),
        Outcome::Completed
    );
    let messages = queue.receive().await;
    let bodies: Vec<&str> = messages.iter().filter_map(|m| m.body()).collect();
    assert_eq!(
        bodies,
        [job_message(waiting).as_str()],
        "the freed slot's job is told at once"
    );
    shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(waiting))])).await;
    assert_eq!(t.status_of(waiting).await, "completed");
}

#[tokio::test]
async fn a_job_still_backing_off_is_not_run_early_by_a_duplicate_message() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "x").await;
    sql(
        &t,
        "UPDATE generation_jobs SET run_after = now() + interval '1 hour' WHERE id = $1",
        id,
    )
    .await;
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(id))])).await;
    assert_eq!(
        response.batch_item_failures.len(),
        1,
        "kept for later delivery"
    );
    assert_eq!(t.generator.calls_for(id), 0);
    assert_eq!(t.status_of(id).await, "queued");
}

#[tokio::test]
async fn the_rescuer_fails_a_job_whose_last_attempt_lost_its_lease() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "x").await;
    claim(&t, id).await;
    sql(&t, "UPDATE generation_jobs SET attempts = max_attempts, lease_expires_at = now() - interval '1 second' WHERE id = $1", id).await;
    assert_eq!(
        shared::poller::rescue(&t.app, chrono::Utc::now())
            .await
            .unwrap(),
        (0, 1)
    );
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "failed");
    assert!(row
        .get::<_, Option<String>>("error_message")
        .unwrap()
        .starts_with("gave up after 3 attempts"));
}

#[tokio::test]
async fn the_rescuer_leaves_live_leases_alone_and_pages_through_many_expired_ones() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let live = Uuid::now_v7();
    t.insert_job(live, &alice, "live").await;
    claim(&t, live).await;
    for _ in 0..250 {
        let id = Uuid::now_v7();
        t.insert_job(id, &alice, "dead").await;
        claim(&t, id).await;
        sql(&t, "UPDATE generation_jobs SET lease_expires_at = now() - interval '5 minutes' WHERE id = $1", id).await;
    }
    assert_eq!(
        shared::poller::rescue(&t.app, chrono::Utc::now())
            .await
            .unwrap(),
        (250, 0)
    );
    assert_eq!(t.status_of(live).await, "processing");
}

#[tokio::test]
async fn when_sqs_was_down_at_enqueue_the_outbox_sends_the_job_later_and_it_completes() {
    let queue = TestQueue::new().await;
    let down = TestApp::with(
        |_| {
            Dispatcher::sqs(
                sqs_client_for("http://127.0.0.1:9"),
                "http://127.0.0.1:9/123456789012/nowhere".into(),
            )
        },
        Duration::ZERO,
    )
    .await;
    let alice = user("alice", None);
    let (status, body) = call(
        &down.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice),
            Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();

    // SQS is back. Within the grace period the poller leaves the job alone...
    let mut app = down.app.clone();
    app.queue = Dispatcher::sqs(queue.client.clone(), queue.url.clone());
    assert_eq!(shared::poller::redispatch(&app).await.unwrap(), 0);
    // ...and once it has waited past it, the outbox sends its message, once.
    sql(&down, "UPDATE generation_jobs SET created_at = created_at - interval '5 minutes', run_after = run_after - interval '5 minutes' WHERE id = $1", id).await;
    assert_eq!(shared::poller::redispatch(&app).await.unwrap(), 1);
    assert_eq!(
        shared::poller::redispatch(&app).await.unwrap(),
        0,
        "not re-sent again within the grace period"
    );

    shared::worker::poll_sqs_once(&app, &queue.client, &queue.url, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(down.status_of(id).await, "completed");
}

#[tokio::test]
async fn cancelling_a_queued_job_is_immediate_and_it_never_runs() {
    let t = TestApp::embedded().await;
    let alice = user("alice", Some("t"));
    let id = Uuid::now_v7();
    t.insert_job(id, &alice, "x").await;
    for (method, path) in [
        ("POST", format!("/api/generate/cancel/{id}")),
        ("DELETE", format!("/api/jobs/{id}")),
    ] {
        let (status, body) = call(&t.app, api_request(method, &path, Some(&alice), None)).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("cancelled")),
            "{method} {path}: {body}"
        );
    }
    let response =
        shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(id))])).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.generator.calls_for(id), 0);
    assert_eq!(t.status_of(id).await, "cancelled");
}

#[tokio::test]
async fn a_cancelled_processing_job_discards_its_workers_result_and_is_charged_nothing() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let id = Uuid::now_v7();
    t.insert_job(id, &alice, "x").await;
    let running = claim(&t, id).await;
    let (status, _) = call(
        &t.app,
        api_request(
            "POST",
            &format!("/api/generate/cancel/{id}"),
            Some(&alice),
            None,
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        shared::worker::run_claimed(&t.app, running).await.unwrap(),
        Outcome::Superseded
    );
    let conn = t.db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT status::text, credits_used, result_media_id FROM generation_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cancelled");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, Option<Uuid>>(2), None);
}

#[tokio::test]
async fn cancel_answers_404_for_someone_elses_job_and_409_for_a_finished_one() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let id = Uuid::now_v7();
    t.insert_job(id, &alice, "x").await;
    let (status, body) = call(
        &t.app,
        api_request(
            "POST",
            &format!("/api/generate/cancel/{id}"),
            Some(&user("bob", None)),
            None,
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    assert_eq!(
        t.status_of(id).await,
        "queued",
        "bob's attempt changed nothing"
    );

    shared::worker::handle_sqs(&t.app, batch(vec![sqs_record("m", &job_message(id))])).await;
    let (status, body) = call(
        &t.app,
        api_request("DELETE", &format!("/api/jobs/{id}"), Some(&alice), None),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("job_finished")),
        "{body}"
    );
    assert_eq!(t.status_of(id).await, "completed");
}

#[tokio::test]
async fn credits_are_charged_once_at_completion_and_never_for_failures() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let (ok, bad) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(ok, &alice, "fine").await;
    t.insert_job(bad, &alice, "simulate:fail").await;
    for _ in 0..2 {
        shared::worker::handle_sqs(
            &t.app,
            batch(vec![
                sqs_record("a", &job_message(ok)),
                sqs_record("b", &job_message(bad)),
            ]),
        )
        .await;
    }
    let conn = t.db.pool.get().await.unwrap();
    let credits = |id: Uuid| {
        let conn = &conn;
        async move {
            conn.query_one(
                "SELECT credits_used FROM generation_jobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i32>(0)
        }
    };
    assert_eq!(credits(ok).await, t.app.config.credits.character_image);
    assert_eq!(credits(bad).await, 0);
}

#[tokio::test]
async fn a_queued_job_shows_an_estimated_wait_from_recent_run_times_of_its_type() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "2")],
    )
    .await;
    let alice = user("alice", None);
    // Two finished jobs of the type took 10 s and 20 s.
    for seconds in [10, 20] {
        let id = Uuid::now_v7();
        t.insert_job(id, &alice, "done").await;
        let claimed = claim(&t, id).await;
        let conn = t.db.pool.get().await.unwrap();
        assert!(shared::jobs::fail(&conn, &claimed, "x", false)
            .await
            .unwrap()
            .applied());
        conn.execute(
            &format!(
                "UPDATE generation_jobs SET started_at = created_at, \
                 completed_at = created_at + interval '{seconds} seconds' WHERE id = $1"
            ),
            &[&id],
        )
        .await
        .unwrap();
    }
    // Turn them into completed jobs, which the schema allows only with a result.
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "WITH m AS (INSERT INTO generated_media (id, job_id, user_id, ordinal, media_type, mime_type, storage, storage_key, public_url, size_bytes) \
         SELECT gen_random_uuid(), id, user_id, 0, 'image', 'image/png', 'local', id::text, 'http://x', 1 FROM generation_jobs RETURNING id, job_id) \
         UPDATE generation_jobs j SET status = 'completed', progress = 100, result_media_id = m.id FROM m WHERE j.id = m.job_id",
        &[],
    )
    .await
    .unwrap();
    // Now four queued jobs behind two busy slots: the fourth is at position 4.
    let mut last = None;
    for _ in 0..4 {
        let (_, body) = call(
            &t.app,
            api_request(
                "POST",
                "/api/generate/character",
                Some(&alice),
                Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
            ),
        )
        .await;
        last = Some(body["jobId"].as_str().unwrap().to_owned());
    }
    let (_, status) = call(
        &t.app,
        api_request(
            "GET",
            &format!("/api/generate/status/{}", last.unwrap()),
            Some(&alice),
            None,
        ),
    )
    .await;
    assert_eq!(status["position"], 4);
    // 4 jobs x 15 s mean run time / 2 slots.
    assert_eq!(status["estimatedWaitSeconds"], 30);
}

async fn enqueue_as(t: &TestApp, who: &shared::model::Identity) -> serde_json::Value {
    let (status, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(who),
            Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
        ),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body
}

fn id_of(body: &serde_json::Value) -> Uuid {
    body["jobId"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn one_users_pile_of_jobs_does_not_starve_a_newcomer_and_positions_say_so() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let (alice, bob) = (user("alice", None), user("bob", None));
    let mut alices = Vec::new();
    for _ in 0..5 {
        alices.push(id_of(&enqueue_as(&t, &alice).await));
    }
    let answer = enqueue_as(&t, &bob).await;
    assert_eq!(
        (answer["mode"].as_str(), answer["position"].as_i64()),
        (Some("queued"), Some(2)),
        "{answer}"
    );
    let bobs = id_of(&answer);

    let promised = [alices[0], bobs, alices[1], alices[2], alices[3], alices[4]];
    let owner_of = |id: Uuid| {
        if id == bobs {
            bob.clone()
        } else {
            alice.clone()
        }
    };
    for (started, expected) in promised.iter().enumerate() {
        for (i, id) in promised.iter().enumerate().skip(started) {
            let (_, status) = call(
                &t.app,
                api_request(
                    "GET",
                    &format!("/api/generate/status/{id}"),
                    Some(&owner_of(*id)),
                    None,
                ),
            )
            .await;
            assert_eq!(
                status["position"].as_i64(),
                Some((i - started + 1) as i64),
                "job {i} after {started} started"
            );
        }
        let conn = t.db.pool.get().await.unwrap();
        let claimed = shared::jobs::claim_next(&conn, 10, Duration::from_secs(60), 1)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|c| c.job.id).collect::<Vec<_>>(),
            vec![*expected],
            "start {started}"
        );
        assert!(shared::jobs::fail(&conn, &claimed[0], "done", false)
            .await
            .unwrap()
            .applied());
    }
}

/// The position a plain count of the whole line gives: the queued jobs before this one in
/// fair-share order, plus one.
async fn counted_position(t: &TestApp, id: Uuid) -> i64 {
    let conn = t.db.pool.get().await.unwrap();
    conn.query_one(
        "SELECT count(*) + 1 FROM generation_jobs q, generation_jobs j \
         WHERE j.id = $1 AND q.status = 'queued' \
           AND (q.fair_key, q.created_at, q.id) < (j.fair_key, j.created_at, j.id)",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Enqueues as `who`; a queued answer's position must be what a plain count says.
async fn enqueue_and_check_position(
    t: &TestApp,
    who: &shared::model::Identity,
) -> (Uuid, shared::model::Identity) {
    let answer = enqueue_as(t, who).await;
    let id = id_of(&answer);
    if answer["mode"] == "queued" {
        assert_eq!(
            answer["position"].as_i64(),
            Some(counted_position(t, id).await),
            "the answer to {}'s enqueue",
            who.user_id
        );
    }
    (id, who.clone())
}

#[tokio::test]
async fn positions_counted_from_either_end_of_the_line_agree_with_counting_all_of_it() {
    // Piles of three sizes interleave in fair-share order, so some jobs sit nearer the head
    // (counted directly) and some nearer the tail (the tally less the jobs behind).
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[
            ("MAX_CONCURRENT_JOBS", "1"),
            ("RATE_LIMIT_PER_MINUTE", "0"),
            ("MAX_QUEUED_PER_USER", "0"),
        ],
    )
    .await;
    let users = [user("alice", None), user("bob", None), user("carol", None)];
    let mut jobs = Vec::new();
    for round in 0..12 {
        for (u, who) in users.iter().enumerate() {
            if round >= [12, 3, 7][u] {
                continue;
            }
            jobs.push(enqueue_and_check_position(&t, who).await);
        }
    }
    // One more of carol's lands between the middle and the tail (jobs behind it), and a
    // newcomer's first lands at the head's key (jobs ahead of it at that key).
    jobs.push(enqueue_and_check_position(&t, &users[2]).await);
    jobs.push(enqueue_and_check_position(&t, &user("dave", None)).await);
    let conn = t.db.pool.get().await.unwrap();
    let status_positions = |jobs: Vec<(Uuid, shared::model::Identity)>| {
        let t = &t;
        async move {
            let mut wrong = Vec::new();
            let mut queued = 0;
            for (id, who) in &jobs {
                let (_, status) = poll_status(&t.app, who, *id).await;
                if status["status"] != "queued" {
                    continue;
                }
                queued += 1;
                let counted = counted_position(t, *id).await;
                if status["position"].as_i64() != Some(counted) {
                    wrong.push((status["position"].clone(), counted));
                }
            }
            (queued, wrong)
        }
    };
    // All 24 wait: the first holds the one slot's reservation but has not started.
    assert_eq!(status_positions(jobs.clone()).await, (24, vec![]));

    // Jobs leave the line at its head (claims) and from its middle (a cancellation).
    let claimed = shared::jobs::claim_next(&conn, 10, Duration::from_secs(60), 1)
        .await
        .unwrap();
    assert!(shared::jobs::fail(&conn, &claimed[0], "done", false)
        .await
        .unwrap()
        .applied());
    let (middle, owner) = jobs[9].clone();
    assert!(shared::jobs::cancel(&conn, middle, &owner, 1)
        .await
        .unwrap()
        .applied());
    assert_eq!(status_positions(jobs).await, (22, vec![]));
}

#[tokio::test]
async fn a_user_at_the_per_user_limit_waits_while_others_use_the_free_slots() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "4"), ("MAX_ACTIVE_PER_USER", "2")],
    )
    .await;
    let (alice, bob) = (user("alice", None), user("bob", None));
    let mut modes = Vec::new();
    let mut alices = Vec::new();
    for _ in 0..4 {
        let body = enqueue_as(&t, &alice).await;
        modes.push(body["mode"].as_str().unwrap().to_owned());
        alices.push(id_of(&body));
    }
    assert_eq!(modes, ["direct", "direct", "queued", "queued"]);
    assert_eq!(
        enqueue_as(&t, &bob).await["mode"],
        "direct",
        "bob may use a slot alice may not"
    );

    let conn = t.db.pool.get().await.unwrap();
    let limits = t.app.config.limits();
    let claimed = shared::jobs::claim_next(&conn, 10, Duration::from_secs(60), limits)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3, "alice's first two and bob's");
    assert!(claimed
        .iter()
        .all(|c| c.job.id != alices[2] && c.job.id != alices[3]));
    assert!(
        shared::jobs::claim_next(&conn, 10, Duration::from_secs(60), limits)
            .await
            .unwrap()
            .is_empty()
    );

    // When one of alice's jobs finishes, her next one takes the slot.
    let first = claimed.iter().find(|c| c.job.id == alices[0]).unwrap();
    let settled = shared::jobs::fail(&conn, first, "done", false)
        .await
        .unwrap();
    assert_eq!(
        settled,
        shared::jobs::Settled::Applied {
            next: Some(alices[2])
        }
    );
    let next = shared::jobs::claim_next(&conn, 10, Duration::from_secs(60), limits)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![alices[2]]
    );
}

#[tokio::test]
async fn the_embedded_queue_keeps_the_per_user_limit_while_completions_hand_slots_on() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::from_millis(30),
        &[("MAX_CONCURRENT_JOBS", "4"), ("MAX_ACTIVE_PER_USER", "2")],
    )
    .await;
    let (alice, bob) = (user("alice", None), user("bob", None));
    for i in 0..10 {
        let owner = if i < 8 { &alice } else { &bob };
        t.insert_job(Uuid::now_v7(), owner, "hand-off").await;
    }
    t.run_embedded_until_completed(10).await;
    let conn = t.db.pool.get().await.unwrap();

    // Each job held its slot from its claim (started_at) to its completion; a job handed a
    // slot by a completion starts at that completion's very timestamp, so intervals are
    // half-open.
    let most_at_once = |user: &'static str| {
        let conn = &conn;
        async move {
            conn.query_one(
                "SELECT coalesce(max(n), 0) FROM (
                     SELECT (SELECT count(*) FROM generation_jobs o
                             WHERE o.user_id = j.user_id
                               AND o.started_at <= j.started_at AND o.completed_at > j.started_at) AS n
                     FROM generation_jobs j WHERE j.user_id = $1) x",
                &[&user],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let statuses: Vec<String> = conn
        .query("SELECT status::text FROM generation_jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(statuses.iter().all(|s| s == "completed"), "{statuses:?}");
    assert_eq!(t.generator.total_calls(), 10, "every job ran exactly once");
    let alice_most = most_at_once("alice").await;
    assert!(
        (1..=2).contains(&alice_most),
        "alice held {alice_most} slots at once; her limit is 2"
    );
    let max = t
        .generator
        .max_running
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=4).contains(&max),
        "MAX_CONCURRENT_JOBS is 4, saw {max}"
    );
}
