//! The schema's guards: impossible states cannot be stored, and transitions apply only from
//! the state (and attempt) they name.

use std::time::Duration;

use uuid::Uuid;

use crate::support::*;

#[tokio::test]
async fn the_schema_refuses_states_without_their_timestamps() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    let insert = |status: &'static str, extra: &'static str| {
        format!(
            "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, status{}) VALUES (gen_random_uuid(), 'u', 'moodboard', gen_random_uuid(), '{status}'{})",
            if extra.is_empty() { "" } else { ", error_message" },
            if extra.is_empty() { String::new() } else { format!(", '{extra}'") }
        )
    };
    for (status, extra) in [
        ("processing", ""),
        ("completed", ""),
        ("failed", "boom"),
        ("cancelled", ""),
    ] {
        let err = conn
            .execute(&insert(status, extra), &[])
            .await
            .expect_err(status);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{status}"
        );
    }
    let err = conn
        .execute(
            "INSERT INTO generation_jobs (id, user_id, job_type, entity_id) VALUES (gen_random_uuid(), 'u', 'sculpture', gen_random_uuid())",
            &[],
        )
        .await
        .expect_err("unknown job type");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    conn.execute(&insert("queued", ""), &[])
        .await
        .expect("a plain queued job is fine");
}

#[tokio::test]
async fn concurrent_claims_of_the_queue_never_take_the_same_job() {
    let t = TestApp::embedded().await;
    for _ in 0..20 {
        t.insert_job(Uuid::now_v7(), &user("alice", None), "x")
            .await;
    }
    // Eight claimers race round after round until the queue is empty.
    let mut ids: Vec<Uuid> = Vec::new();
    for _round in 0..20 {
        let claims = futures::future::join_all((0..8).map(|_| {
            let pool = t.db.pool.clone();
            async move {
                let conn = pool.get().await.unwrap();
                shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 1000)
                    .await
                    .unwrap()
            }
        }))
        .await;
        let round: Vec<Uuid> = claims.iter().flatten().map(|c| c.job.id).collect();
        if round.is_empty() {
            break;
        }
        ids.extend(round);
    }
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "no job was claimed twice");
    assert_eq!(total, 20);
}

#[tokio::test]
async fn a_finished_job_cannot_be_failed_requeued_or_claimed_again() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "x").await;
    let conn = t.db.pool.get().await.unwrap();
    let claim = claim(&t, id).await;
    assert!(shared::jobs::fail(&conn, &claim, "first", false)
        .await
        .unwrap()
        .applied());
    assert!(!shared::jobs::fail(&conn, &claim, "second", false)
        .await
        .unwrap()
        .applied());
    assert!(
        !shared::jobs::requeue(&conn, &claim, "again", Duration::ZERO)
            .await
            .unwrap()
            .applied()
    );
    assert!(
        !shared::jobs::heartbeat(&conn, &claim, 50, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(matches!(
        claim_result(&t, id).await,
        ClaimResult::NotClaimable
    ));
    let row = t.job_row(id).await;
    assert_eq!(
        row.get::<_, Option<String>>("error_message").as_deref(),
        Some("first")
    );
}

#[tokio::test]
async fn progress_never_goes_down() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("alice", None), "x").await;
    let conn = t.db.pool.get().await.unwrap();
    let claim = claim(&t, id).await;
    assert!(
        shared::jobs::heartbeat(&conn, &claim, 60, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        shared::jobs::heartbeat(&conn, &claim, 30, Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(t.job_row(id).await.get::<_, i16>("progress"), 60);
}

#[tokio::test]
async fn migrating_twice_is_harmless() {
    let t = TestApp::embedded().await;
    shared::db::migrate(&t.db.pool)
        .await
        .expect("second migration run is a no-op");
}

#[tokio::test]
async fn a_batch_claim_never_returns_more_jobs_than_asked_for_even_with_reservations() {
    let t = TestApp::configured(
        |_| shared::queue::Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_CONCURRENT_JOBS", "6")],
    )
    .await;
    // Three jobs hold reservations (answered `direct`)...
    for _ in 0..3 {
        let (_, body) = call(
            &t.app,
            api_request(
                "POST",
                "/api/generate/character",
                Some(&user("alice", None)),
                Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#),
            ),
        )
        .await;
        assert_eq!(body["mode"], "direct");
    }
    // ...and three more wait without one, while three slots are free.
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id) \
         SELECT gen_random_uuid(), 'bob', 'moodboard', gen_random_uuid() FROM generate_series(1, 3)",
        &[],
    )
    .await
    .unwrap();
    let first = shared::jobs::claim_next(&conn, 3, Duration::from_secs(60), t.app.config.limits())
        .await
        .unwrap();
    assert_eq!(first.len(), 3, "three asked for, three given");
    let rest = shared::jobs::claim_next(&conn, 100, Duration::from_secs(60), t.app.config.limits())
        .await
        .unwrap();
    assert_eq!(rest.len(), 3);
}

#[tokio::test]
async fn a_batch_claim_skips_a_job_another_claimer_holds_and_takes_the_next_in_line() {
    let t = TestApp::embedded().await;
    let (held, next) = (Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(held, &user("alice", None), "held").await;
    t.insert_job(next, &user("bob", None), "next").await;
    // Both wait in line: no reservations.
    t.free_all_slots().await;
    let conn = t.db.pool.get().await.unwrap();
    let mut other = t.db.pool.get().await.unwrap();
    let other = other.transaction().await.unwrap();
    other
        .execute(
            "SELECT 1 FROM generation_jobs WHERE id = $1 FOR UPDATE",
            &[&held],
        )
        .await
        .unwrap();
    let claimed =
        shared::jobs::claim_next(&conn, 1, Duration::from_secs(60), t.app.config.limits())
            .await
            .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![next],
        "the claim neither waits for the held job nor comes back empty"
    );
    other.rollback().await.unwrap();
}

#[tokio::test]
async fn the_outbox_resends_the_jobs_that_start_first_when_more_are_due_than_it_takes() {
    let t = TestApp::embedded().await;
    let alice: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let bob = Uuid::now_v7();
    for id in &alice {
        t.insert_job(*id, &user("alice", None), "mine").await;
    }
    t.insert_job(bob, &user("bob", None), "his").await;
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET created_at = created_at - interval '5 minutes', run_after = run_after - interval '5 minutes'",
        &[],
    )
    .await
    .unwrap();

    // Bob's one job shares the line's front with Alice's first, ahead of her other two, though
    // it came last.
    let mut resent = shared::jobs::take_undispatched(&conn, Duration::from_secs(60), 2)
        .await
        .unwrap();
    resent.sort();
    let mut first_in_line = vec![alice[0], bob];
    first_in_line.sort();
    assert_eq!(resent, first_in_line);
}

#[tokio::test]
async fn a_batch_claim_says_whether_it_left_a_due_job_waiting() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    let lease = Duration::from_secs(60);
    let one_each = shared::jobs::Limits {
        slots: 10,
        per_user: 1,
    };
    let claim = |limit: i64| {
        let conn = &conn;
        async move {
            shared::jobs::claim_line(conn, limit, lease, one_each)
                .await
                .unwrap()
        }
    };
    // Nothing queued: nothing taken, nothing left.
    let empty = claim(5).await;
    assert!(empty.jobs.is_empty() && !empty.left_waiting);

    // Three in line, two taken: one is left.
    conn.execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id) \
         SELECT gen_random_uuid(), 'user-' || g, 'moodboard', gen_random_uuid() FROM generate_series(1, 3) g",
        &[],
    )
    .await
    .unwrap();
    let two = claim(2).await;
    assert_eq!(two.jobs.len(), 2);
    assert!(two.left_waiting, "a third job is still in line");

    // The last one taken: the line is empty.
    let last = claim(5).await;
    assert_eq!(last.jobs.len(), 1);
    assert!(!last.left_waiting);

    // A job held back only by its user's allowance is still waiting: a completion of that
    // user's running job must claim it.
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [first, second] {
        conn.execute(
            "INSERT INTO generation_jobs (id, user_id, job_type, entity_id) \
             VALUES ($1, 'carol', 'moodboard', gen_random_uuid())",
            &[&id],
        )
        .await
        .unwrap();
    }
    let carol = claim(5).await;
    assert_eq!(
        carol.jobs.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![first]
    );
    assert!(
        carol.left_waiting,
        "carol's second job waits for her allowance"
    );
    let again = claim(5).await;
    assert!(again.jobs.is_empty());
    assert!(again.left_waiting, "and still waits");
}

/// The claimed job's completion, with one image.
fn completed(claim: &shared::jobs::Claimed) -> shared::jobs::Completion {
    shared::jobs::Completion {
        job_id: claim.job.id,
        attempt: claim.attempt(),
        media: vec![image("done")],
        credits: 1,
    }
}

fn image(key: &str) -> shared::jobs::NewMedia {
    shared::jobs::NewMedia {
        id: Uuid::new_v4(),
        media_type: "image",
        mime_type: "image/png",
        storage: "local",
        storage_key: key.into(),
        public_url: format!("http://127.0.0.1/media/{key}"),
        width: Some(1),
        height: Some(1),
        size_bytes: 16,
    }
}

#[tokio::test]
async fn a_batch_of_completions_applies_each_current_attempt_and_nothing_of_the_others() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        t.insert_job(*id, &alice, "batch").await;
    }
    let conn = t.db.pool.get().await.unwrap();
    let (current, stale, failed) = (
        claim(&t, ids[0]).await,
        claim(&t, ids[1]).await,
        claim(&t, ids[2]).await,
    );
    assert!(shared::jobs::fail(&conn, &failed, "given up", false)
        .await
        .unwrap()
        .applied());
    let completion =
        |claim: &shared::jobs::Claimed, attempt: i32, media| shared::jobs::Completion {
            job_id: claim.job.id,
            attempt,
            media,
            credits: 7,
        };
    let two = vec![image("a-0"), image("a-1")];
    let applied = shared::jobs::complete_many(
        &conn,
        &[
            &completion(&current, current.attempt(), two.clone()),
            // An attempt that is no longer the job's (as after a rescue and a new claim).
            &completion(&stale, stale.attempt() - 1, vec![image("b-0")]),
            &completion(&failed, failed.attempt(), vec![image("c-0")]),
        ],
        "batch-model",
    )
    .await
    .unwrap();
    assert_eq!(applied, [current.job.id].into_iter().collect());

    let row = t.job_row(current.job.id).await;
    assert_eq!(row.get::<_, String>("status"), "completed");
    assert_eq!(row.get::<_, i16>("progress"), 100);
    assert_eq!(
        row.get::<_, Option<Uuid>>("result_media_id"),
        Some(two[0].id)
    );
    assert_eq!(
        row.get::<_, Option<String>>("model_used").as_deref(),
        Some("batch-model")
    );
    let media: Vec<(Uuid, i16)> = conn
        .query(
            "SELECT job_id, ordinal FROM generated_media ORDER BY job_id, ordinal",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        media,
        [(current.job.id, 0), (current.job.id, 1)],
        "only the applied job's media were written, in their order"
    );
    assert_eq!(t.status_of(stale.job.id).await, "processing");
    assert_eq!(t.status_of(failed.job.id).await, "failed");
    let held: Vec<Uuid> = conn
        .query("SELECT job_id FROM job_slots WHERE job_id IS NOT NULL", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        held,
        [stale.job.id],
        "the completed job's slot is free again"
    );

    // A repeat of the same batch (a late duplicate) changes nothing.
    let again = shared::jobs::complete_many(
        &conn,
        &[&completion(&current, current.attempt(), vec![image("a-2")])],
        "batch-model",
    )
    .await
    .unwrap();
    assert!(again.is_empty());
}

/// Alice's first two jobs running in slots 2 and 3 (claimed from the line), her third waiting
/// for her allowance of two, and slot 1 free.
async fn two_running_and_one_waiting(t: &TestApp) -> (Vec<shared::jobs::Claimed>, Uuid) {
    let alice = user("alice", None);
    let (first, second, third) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    t.insert_job(first, &alice, "one").await;
    t.insert_job(second, &alice, "two").await;
    t.free_all_slots().await;
    let conn = t.db.pool.get().await.unwrap();
    // Slot 1 is busy while the two start, and free once they run: a claim that did not
    // prefer a finished job's slot would take it.
    conn.execute(
        "UPDATE job_slots SET job_id = gen_random_uuid(), user_id = 'dave', \
         lease_expires_at = now() + interval '1 hour' WHERE slot = 1",
        &[],
    )
    .await
    .unwrap();
    let running = shared::jobs::claim_line(&conn, 2, Duration::from_secs(60), TWO_EACH)
        .await
        .unwrap()
        .jobs;
    assert_eq!(running.len(), 2);
    t.insert_job(third, &alice, "three").await;
    conn.execute(
        "UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL \
         WHERE job_id = $1 OR slot = 1",
        &[&third],
    )
    .await
    .unwrap();
    (running, third)
}

const TWO_EACH: shared::jobs::Limits = shared::jobs::Limits {
    slots: 5,
    per_user: 2,
};

fn completions(running: &[shared::jobs::Claimed]) -> Vec<shared::jobs::Completion> {
    running
        .iter()
        .map(|c| shared::jobs::Completion {
            job_id: c.job.id,
            attempt: c.attempt(),
            media: vec![image(&c.job.id.to_string())],
            credits: 1,
        })
        .collect()
}

/// Each job's status and the slot naming it, if any, in the order asked.
async fn states(t: &TestApp, ids: &[Uuid]) -> Vec<(String, Option<i32>)> {
    let conn = t.db.pool.get().await.unwrap();
    let mut found = Vec::new();
    for id in ids {
        let row = conn
            .query_one(
                "SELECT j.status::text, s.slot FROM generation_jobs j \
                 LEFT JOIN job_slots s ON s.job_id = j.id WHERE j.id = $1",
                &[id],
            )
            .await
            .unwrap();
        found.push((row.get(0), row.get(1)));
    }
    found
}

/// Whether the connection is outside any transaction block: only there does a SAVEPOINT fail
/// for want of a transaction (inside an aborted one it fails otherwise).
async fn idle(db: &impl deadpool_postgres::GenericClient) -> bool {
    match db.batch_execute("SAVEPOINT probe").await {
        Ok(()) => false,
        Err(e) => e.code() == Some(&tokio_postgres::error::SqlState::NO_ACTIVE_SQL_TRANSACTION),
    }
}

/// A completer round's starting point: Alice's two running jobs have finished (`done`), her
/// third waits; `before` is the three jobs' states.
struct FinishedTwo {
    t: TestApp,
    third: Uuid,
    ids: [Uuid; 3],
    before: Vec<(String, Option<i32>)>,
    done: Vec<shared::jobs::Completion>,
}

impl FinishedTwo {
    /// The round of both completions, whose workers take another job as `takes` says.
    async fn round(
        &self,
        conn: &deadpool_postgres::Client,
        takes: [bool; 2],
        lease: Duration,
    ) -> shared::jobs::RoundEnd {
        let done: Vec<_> = self.done.iter().collect();
        shared::jobs::complete_and_claim(conn, &done, &takes, "m", lease, TWO_EACH).await
    }
}

async fn finished_two() -> FinishedTwo {
    let t = TestApp::embedded().await;
    let (running, third) = two_running_and_one_waiting(&t).await;
    let ids = [running[0].job.id, running[1].job.id, third];
    let before = states(&t, &ids).await;
    let done = completions(&running);
    FinishedTwo {
        t,
        third,
        ids,
        before,
        done,
    }
}

#[tokio::test]
async fn a_completer_round_commits_its_completions_and_hands_their_slots_to_the_jobs_it_claims() {
    let f = finished_two().await;
    let (t, third) = (&f.t, f.third);
    let conn = t.db.pool.get().await.unwrap();

    let shared::jobs::RoundEnd::Committed { applied, line, .. } =
        f.round(&conn, [true, true], Duration::from_secs(60)).await
    else {
        panic!("the round did not commit")
    };

    assert_eq!(applied, f.ids[..2].iter().copied().collect());
    // The two finished jobs no longer count against Alice, so her third starts, in the first
    // of their slots (not in the free slot 1), and the other is freed.
    assert_eq!(
        line.jobs.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        [third]
    );
    assert!(!line.left_waiting);
    let [one, two, three] = <[_; 3]>::try_from(states(t, &f.ids).await).unwrap();
    assert_eq!(one, ("completed".to_owned(), None));
    assert_eq!(two, ("completed".to_owned(), None));
    assert_eq!(three, ("processing".to_owned(), Some(2)));
    // Only slots 2 and 3 were written, each once: a release and a take would also have
    // written slot 1. (Every row the round wrote carries its transaction id, as the claimed
    // job's does.)
    let written: Vec<i32> = conn
        .query(
            "SELECT slot FROM job_slots WHERE xmin = \
             (SELECT xmin FROM generation_jobs WHERE id = $1) ORDER BY slot",
            &[&third],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(written, [2, 3]);
    assert!(idle(&conn).await, "the round committed");
}

#[tokio::test]
async fn a_completer_round_claims_only_for_the_workers_that_take_another_job() {
    let f = finished_two().await;
    let conn = f.t.db.pool.get().await.unwrap();

    let shared::jobs::RoundEnd::Committed { applied, line, .. } = f
        .round(&conn, [false, false], Duration::from_secs(60))
        .await
    else {
        panic!("the round did not commit")
    };

    assert_eq!(applied.len(), 2);
    assert!(line.jobs.is_empty());
    assert!(line.left_waiting, "Alice's third still waits");
    let [one, two, three] = <[_; 3]>::try_from(states(&f.t, &f.ids).await).unwrap();
    assert_eq!(one, ("completed".to_owned(), None));
    assert_eq!(two, ("completed".to_owned(), None));
    assert_eq!(three, ("queued".to_owned(), None), "both slots were freed");
}

#[tokio::test]
async fn a_completer_round_claims_nothing_for_a_completion_that_did_not_apply() {
    let mut f = finished_two().await;
    let conn = f.t.db.pool.get().await.unwrap();
    // The second job's completion comes from an attempt that is no longer current.
    f.done[1].attempt += 1;
    // Bob waits as well, so a claim for that completion would find a job to take.
    let bob = Uuid::now_v7();
    f.t.insert_job(bob, &user("bob", None), "bob's").await;
    conn.execute(
        "UPDATE job_slots SET job_id = NULL, user_id = NULL, lease_expires_at = NULL \
         WHERE job_id = $1",
        &[&bob],
    )
    .await
    .unwrap();

    let shared::jobs::RoundEnd::Committed { applied, line, .. } =
        f.round(&conn, [true, true], Duration::from_secs(60)).await
    else {
        panic!("the round did not commit")
    };

    assert_eq!(applied, [f.ids[0]].into_iter().collect());
    assert_eq!(
        line.jobs.len(),
        1,
        "one job for the one completion that applied"
    );
    assert!(line.left_waiting);
    let second = &states(&f.t, &f.ids).await[1];
    assert_eq!(
        second,
        &("processing".to_owned(), Some(3)),
        "the current attempt keeps its job and slot"
    );
}

#[tokio::test]
async fn a_completer_round_whose_claim_fails_writes_nothing_and_leaves_its_connection_idle() {
    let f = finished_two().await;
    let conn = f.t.db.pool.get().await.unwrap();

    // Alice's third was created "later" than it can be started: the statement fails on the
    // CHECK of times in order, and only once its claim reaches that job, after the completions.
    conn.execute(
        "UPDATE generation_jobs SET created_at = now() + interval '1 hour' WHERE id = $1",
        &[&f.third],
    )
    .await
    .unwrap();
    let claimed = f.round(&conn, [true, false], Duration::from_secs(60)).await;

    assert!(matches!(claimed, shared::jobs::RoundEnd::Undone(_)));
    assert_eq!(
        states(&f.t, &f.ids).await,
        f.before,
        "the completions were undone too"
    );
    assert!(idle(&conn).await, "the round ended");
    let again = shared::jobs::complete_many(&conn, &f.done.iter().collect::<Vec<_>>(), "m")
        .await
        .unwrap();
    assert_eq!(again.len(), 2, "the completions can be written again");
}

/// Every index scan in a JSON plan: (index name, its index condition and filter).
fn index_conditions(plan: &serde_json::Value, found: &mut Vec<(String, String)>) {
    if let Some(name) = plan.get("Index Name").and_then(|n| n.as_str()) {
        let text = |key: &str| {
            plan.get(key)
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_owned()
        };
        found.push((
            name.to_owned(),
            format!("{} {}", text("Index Cond"), text("Filter")),
        ));
    }
    for child in plan
        .get("Plans")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        index_conditions(child, found);
    }
}

/// The enqueue statement as `enqueue`, with the parameter types the service binds.
const PREPARE_ENQUEUE: &str = concat!(
    "PREPARE enqueue (uuid, text, text, text, uuid, jsonb, int4, int4, float8, int8, int8, int8, float8) AS ",
    include_str!("../../src/jobs/insert.sql"),
    ";"
);

/// The status read as `status` (id, user, tenant).
const PREPARE_STATUS: &str = concat!(
    "PREPARE status (uuid, text, text) AS ",
    include_str!("../../src/jobs/get_for_owner.sql"),
    ";"
);

/// Settled history only, then `ANALYZE`: statistics taken in a quiet hour, before a burst.
const QUIET_HOUR_STATISTICS: &str =
    "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, status, attempts, \
                                  created_at, started_at, completed_at, error_message) \
     SELECT gen_random_uuid(), 'history-' || (g % 50), 'moodboard', gen_random_uuid(), \
            'failed', 1, now() - interval '1 day', now() - interval '1 day', \
            now() - interval '1 day', 'history' \
     FROM generate_series(1, 5000) g; \
     ANALYZE generation_jobs;";

#[tokio::test]
async fn claims_and_enqueues_find_their_rows_by_key_even_when_statistics_saw_no_queued_jobs() {
    // Statistics taken in a quiet moment (only settled jobs), then a burst of queued jobs: the
    // planner believes the partial indexes of queued jobs are empty, the state in which it
    // once chose to scan one whole for a single id.
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(
        &(QUIET_HOUR_STATISTICS.to_owned()
            + "\
         INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), 'burst', 'moodboard', gen_random_uuid(), g \
         FROM generate_series(1, 3000) g;"),
    )
    .await
    .unwrap();
    conn.batch_execute(&format!(
        "SET plan_cache_mode = force_generic_plan; \
         PREPARE by_id (uuid, float8, int4, int8) AS {}; \
         PREPARE batch (uuid[], int4[], int4[], uuid[], int2[], uuid[], text[], text[], text[], \
                        text[], text[], int4[], int4[], int8[], text, bool[], int8, float8, int4, int8) \
             AS {}{}; \
         {PREPARE_ENQUEUE}",
        include_str!("../../src/jobs/claim_by_id.sql"),
        include_str!("../../src/jobs/completions.sql"),
        include_str!("../../src/jobs/claim_batch.sql"),
    ))
    .await
    .unwrap();
    // With the abuse limits on, as in production: the per-user queued count runs.
    let enqueue = "EXECUTE enqueue ('00000000-0000-0000-0000-000000000001', 'newcomer', NULL, \
                   'moodboard', '00000000-0000-0000-0000-000000000002', '{}', 3, 3, 60, 3, 60, 100, 60)";
    for execute in [
        "EXECUTE by_id ('00000000-0000-0000-0000-000000000000', 60, 3, 3)",
        "EXECUTE batch ('{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', \
                        '{}', '{}', 'm', '{}', 3, 60, 3, 3)",
        enqueue,
    ] {
        let row = conn
            .query_one(&format!("EXPLAIN (FORMAT JSON) {execute}"), &[])
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        let mut scans = Vec::new();
        index_conditions(&plan[0]["Plan"], &mut scans);
        // A queued-jobs index walked for one job's id, or for one user's jobs, is a scan of
        // the whole queue.
        let misused: Vec<_> = scans
            .iter()
            .filter(|(index, cond)| {
                index.starts_with("idx_jobs_queued")
                    && (cond.contains("(id =") || cond.contains("user_id ="))
            })
            .collect();
        assert!(
            misused.is_empty(),
            "{execute} walks a queued-jobs index for one job or one user: {misused:?}"
        );
        if execute != enqueue {
            // Not counting the completions' lookup of their own jobs ($1), which the batch
            // statement begins with.
            assert!(
                scans
                    .iter()
                    .any(|(index, cond)| index == "generation_jobs_pkey"
                        && !cond.contains("ANY ($1)")),
                "{execute} finds its jobs by primary key: {scans:?}"
            );
        }
    }
}

/// Every node of an EXPLAIN (FORMAT JSON) plan.
fn plan_nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut nodes = vec![plan];
    for child in plan
        .get("Plans")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        nodes.extend(plan_nodes(child));
    }
    nodes
}

/// The scans of `relation` that ran (EXPLAIN ANALYZE), wherever in the plan.
fn sequential_scans_run(plan: &serde_json::Value, relation: &str) -> usize {
    plan_nodes(plan)
        .into_iter()
        .filter(|node| {
            node["Node Type"] == "Seq Scan"
                && node["Relation Name"] == relation
                && node["Actual Loops"].as_u64() > Some(0)
        })
        .count()
}

#[tokio::test]
async fn an_enqueue_counts_its_position_along_the_line_even_when_statistics_saw_a_long_one() {
    // Statistics taken while thousands of jobs were queued, in rows too fresh for an index-only
    // scan: a count whose bound the planner cannot know (the new job's own key) was guessed at
    // a third of the line and read the whole job table instead, for a job joining the end
    // (nothing behind it) or a newcomer's (near the head).
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), 'burst', 'moodboard', gen_random_uuid(), g \
         FROM generate_series(1, 3000) g; \
         ANALYZE generation_jobs;",
    )
    .await
    .unwrap();
    conn.batch_execute(PREPARE_ENQUEUE).await.unwrap();
    for plans in ["force_custom_plan", "force_generic_plan"] {
        conn.batch_execute(&format!("SET plan_cache_mode = {plans}"))
            .await
            .unwrap();
        // No slot free (there are none): every job queues. No abuse limits: they count one
        // user's queued jobs, at most MAX_QUEUED_PER_USER of them, which this burst exceeds.
        for (user_id, side) in [("burst", "the end"), ("newcomer", "the head")] {
            let row = conn
                .query_one(
                    &format!(
                        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE enqueue (gen_random_uuid(), \
                         '{user_id}', NULL, 'moodboard', gen_random_uuid(), '{{}}', 3, 0, 60, 0, 0, 0, 60)"
                    ),
                    &[],
                )
                .await
                .unwrap();
            let plan: serde_json::Value = row.get(0);
            assert_eq!(
                sequential_scans_run(&plan[0]["Plan"], "generation_jobs"),
                0,
                "a job joining {side} ({plans}) reads the job table whole: {plan}"
            );
        }
    }
}

/// The entries read from the index of queued jobs (EXPLAIN ANALYZE), wherever in the plan.
fn queued_entries_read(plan: &serde_json::Value) -> u64 {
    plan_nodes(plan)
        .into_iter()
        .filter(|node| node["Index Name"] == "idx_jobs_queued_fair")
        .map(|node| {
            node["Actual Rows"].as_u64().unwrap_or(0) * node["Actual Loops"].as_u64().unwrap_or(0)
        })
        .sum()
}

#[tokio::test]
async fn a_position_among_many_users_reads_no_more_jobs_than_its_own_level_holds() {
    // 100 users with 20 queued jobs each: fair share puts them in 20 levels of 100. A user
    // with 10 queued joins the middle of the line, and one of their jobs sits there: either
    // side of it holds about 1,000 jobs, which a count of jobs would read.
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), 'user-' || u, 'moodboard', gen_random_uuid(), k \
         FROM generate_series(1, 20) k, generate_series(1, 100) u; \
         INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), 'middle', 'moodboard', gen_random_uuid(), k \
         FROM generate_series(1, 10) k; \
         ANALYZE generation_jobs;",
    )
    .await
    .unwrap();
    conn.batch_execute(&format!(
        "SET plan_cache_mode = force_generic_plan; {PREPARE_ENQUEUE} {PREPARE_STATUS}"
    ))
    .await
    .unwrap();
    let middle_job: Uuid = conn
        .query_one(
            "SELECT id FROM generation_jobs WHERE user_id = 'user-7' AND fair_key = 10",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // A newcomer's first job joins the head's level, last.
    let newcomers_job: Uuid = conn
        .query_one(
            "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
             VALUES (gen_random_uuid(), 'newcomer', 'moodboard', gen_random_uuid(), 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Besides its own level's jobs on one side, a read takes the first entry at each end of
    // the line and of its level.
    for (what, execute, most) in [
        (
            "the enqueue",
            "EXECUTE enqueue (gen_random_uuid(), 'middle', NULL, 'moodboard', gen_random_uuid(), \
             '{}', 3, 0, 60, 0, 0, 0, 60)"
                .to_owned(),
            2,
        ),
        (
            "a status read in the middle",
            format!("EXECUTE status ('{middle_job}', 'user-7', NULL)"),
            101 + 4,
        ),
        (
            "a newcomer's status read",
            format!("EXECUTE status ('{newcomers_job}', 'newcomer', NULL)"),
            4,
        ),
    ] {
        let row = conn
            .query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {execute}"), &[])
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        let read = queued_entries_read(&plan[0]["Plan"]);
        assert!(
            read <= most,
            "{what} read {read} queued jobs for its position: {plan}"
        );
    }
    // And the positions are the true ones, as counting the whole line gives them.
    let true_position = |id: Uuid| {
        let conn = &conn;
        async move {
            let row = conn
                .query_one(
                    "SELECT count(*) + 1 FROM generation_jobs q, generation_jobs j \
                     WHERE j.id = $1 AND q.status = 'queued' \
                       AND (q.fair_key, q.created_at, q.id) < (j.fair_key, j.created_at, j.id)",
                    &[&id],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    let status = conn
        .query_one(
            &format!("EXECUTE status ('{middle_job}', 'user-7', NULL)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        status.get::<_, Option<i64>>("position"),
        Some(true_position(middle_job).await)
    );
    let newcomers = conn
        .query_one(
            &format!("EXECUTE status ('{newcomers_job}', 'newcomer', NULL)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        newcomers.get::<_, Option<i64>>("position"),
        Some(true_position(newcomers_job).await)
    );
    // Behind its level's 101 (the hundred users' and the middle one's first jobs).
    assert_eq!(newcomers.get::<_, Option<i64>>("position"), Some(102));
    let enqueued = conn
        .query_one(
            "EXECUTE enqueue (gen_random_uuid(), 'middle', NULL, 'moodboard', gen_random_uuid(), \
             '{}', 3, 0, 60, 0, 0, 0, 60)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        enqueued.get::<_, i64>("queued_ahead") + 1,
        true_position(enqueued.get("id")).await
    );
}

#[tokio::test]
async fn positions_and_claims_reach_the_level_counts_by_key_even_when_statistics_saw_none() {
    // Plans made in a quiet hour, when statistics said no job was queued, then a burst of 100
    // users' jobs: a plan that believed the level counts empty would go on reading them whole
    // on every enqueue, status read and claim, however long the line grows.
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(
        &(QUIET_HOUR_STATISTICS.to_owned()
            + &format!("ANALYZE queue_levels; {PREPARE_ENQUEUE} {PREPARE_STATUS}")),
    )
    .await
    .unwrap();
    // This connection forces generic plans (as the service's do): they are made once, by the
    // first of these, and kept.
    let enqueue_read_and_claim = |user_id: &'static str| {
        let conn = &conn;
        async move {
            let job: Uuid = conn
                .query_one(
                    &format!(
                        "EXECUTE enqueue (gen_random_uuid(), '{user_id}', NULL, 'moodboard', \
                         gen_random_uuid(), '{{}}', 3, 0, 60, 0, 0, 0, 60)"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get("id");
            conn.batch_execute(&format!("EXECUTE status ('{job}', '{user_id}', NULL)"))
                .await
                .unwrap();
            shared::jobs::claim_line(conn, 5, Duration::from_secs(60), ONE_OF_FIVE)
                .await
                .unwrap()
        }
    };
    conn.batch_execute("BEGIN").await.unwrap();
    let quiet = enqueue_read_and_claim("newcomer").await;
    assert_eq!(quiet.jobs.len(), 1, "the newcomer's job starts");
    conn.batch_execute("ROLLBACK").await.unwrap();

    conn.batch_execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), 'user-' || u, 'moodboard', gen_random_uuid(), k \
         FROM generate_series(1, 30) k, generate_series(1, 100) u",
    )
    .await
    .unwrap();
    // Counts not yet published from earlier transactions show here too (Postgres 15): only
    // what this transaction adds is its statements'.
    let read_whole = || async {
        conn.query_one(
            "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'queue_levels'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    conn.batch_execute("BEGIN").await.unwrap();
    let before = read_whole().await;
    let busy = enqueue_read_and_claim("user-5").await;
    assert_eq!(busy.jobs.len(), 5, "five users' first jobs start");
    let after = read_whole().await;
    conn.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(after - before, 0, "times the level counts were read whole");
}

#[tokio::test]
async fn transitions_of_one_running_job_find_it_by_key_even_when_statistics_saw_none_running() {
    // Statistics taken while nothing ran, then many jobs running or waiting on the provider:
    // a generic plan could walk a partial index of processing jobs for the one id it wants.
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(
        &(QUIET_HOUR_STATISTICS.to_owned()
            + "\
         INSERT INTO generation_jobs (id, user_id, job_type, entity_id, status, attempts, \
                                      started_at, lease_expires_at) \
         SELECT gen_random_uuid(), 'busy-' || (g % 20), 'moodboard', gen_random_uuid(), \
                'processing', 1, now(), now() + interval '5 minutes' \
         FROM generate_series(1, 2000) g; \
         INSERT INTO generation_jobs (id, user_id, job_type, entity_id, status, attempts, \
                                      started_at, external_job_id, submitted_at, next_check_at, \
                                      provider_deadline) \
         SELECT gen_random_uuid(), 'video-' || (g % 20), 'animation', gen_random_uuid(), \
                'processing', 1, now(), 'ext-' || g, now(), now() + interval '1 minute', \
                now() + interval '1 hour' \
         FROM generate_series(1, 2000) g; \
         SET plan_cache_mode = force_generic_plan;"),
    )
    .await
    .unwrap();
    let statements = [
        ("heartbeat", include_str!("../../src/jobs/heartbeat.sql")),
        ("complete", include_str!("../../src/jobs/complete.sql")),
        ("fail", include_str!("../../src/jobs/fail.sql")),
        ("requeue", include_str!("../../src/jobs/requeue.sql")),
        ("submitted", include_str!("../../src/jobs/submitted.sql")),
        (
            "check_pending",
            include_str!("../../src/jobs/check_pending.sql"),
        ),
        (
            "claim_check",
            include_str!("../../src/jobs/claim_check.sql"),
        ),
        (
            "rescue_fail",
            include_str!("../../src/jobs/rescue_fail.sql"),
        ),
        (
            "rescue_requeue",
            include_str!("../../src/jobs/rescue_requeue.sql"),
        ),
        ("cancel", include_str!("../../src/jobs/cancel.sql")),
    ];
    for (name, sql) in statements {
        conn.batch_execute(&format!("PREPARE {name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
        // Postgres inferred each parameter's type; a generic plan does not look at values.
        let params = (1..=99)
            .take_while(|n| sql.contains(&format!("${n}")))
            .map(|_| "NULL")
            .collect::<Vec<_>>()
            .join(", ");
        let row = conn
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) EXECUTE {name} ({params})"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("explain {name}: {e}"));
        let plan: serde_json::Value = row.get(0);
        let mut scans = Vec::new();
        index_conditions(&plan[0]["Plan"], &mut scans);
        let walked: Vec<_> = scans
            .iter()
            .filter(|(index, cond)| index.starts_with("idx_jobs_") && cond.contains("(id ="))
            .collect();
        assert!(
            walked.is_empty(),
            "{name} walks a partial index of jobs for one id: {walked:?}"
        );
        assert!(
            scans
                .iter()
                .any(|(index, cond)| index == "generation_jobs_pkey" && cond.contains("(id =")),
            "{name} finds its job by primary key: {scans:?}"
        );
    }
}

#[tokio::test]
async fn a_slot_names_its_holders_user_or_nobody() {
    let t = TestApp::embedded().await;
    let id = Uuid::now_v7();
    t.insert_job(id, &user("carol", None), "held").await; // reserves a slot
    let conn = t.db.pool.get().await.unwrap();
    for (what, statement) in [
        (
            "a release that leaves the user behind",
            "UPDATE job_slots SET job_id = NULL, lease_expires_at = NULL WHERE job_id = $1",
        ),
        (
            "a hold that names no user",
            "UPDATE job_slots SET job_id = $1, lease_expires_at = now() + interval '1 minute' WHERE slot = 7",
        ),
    ] {
        let err = conn.execute(statement, &[&id]).await.expect_err(what);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{what}"
        );
    }
}

#[tokio::test]
async fn deleting_or_truncating_jobs_keeps_the_queue_tally_and_its_levels_equal_to_the_queued_jobs()
{
    let t = TestApp::embedded().await;
    for _ in 0..5 {
        t.insert_job(Uuid::now_v7(), &user("alice", None), "x")
            .await;
    }
    let conn = t.db.pool.get().await.unwrap();
    assert_eq!(tally_and_queued(&conn).await.unwrap(), (Some(5), 5));
    assert_eq!(levels_miscounted(&conn).await.unwrap(), 0);

    conn.batch_execute(
        "DELETE FROM generation_jobs WHERE id IN \
         (SELECT id FROM generation_jobs ORDER BY created_at LIMIT 2)",
    )
    .await
    .unwrap();
    assert_eq!(tally_and_queued(&conn).await.unwrap(), (Some(3), 3));
    assert_eq!(levels_miscounted(&conn).await.unwrap(), 0);

    conn.batch_execute("TRUNCATE generation_jobs CASCADE")
        .await
        .unwrap();
    assert_eq!(tally_and_queued(&conn).await.unwrap(), (Some(0), 0));
    assert_eq!(levels_miscounted(&conn).await.unwrap(), 0);

    // And it counts on from there.
    t.insert_job(Uuid::now_v7(), &user("bob", None), "x").await;
    assert_eq!(tally_and_queued(&conn).await.unwrap(), (Some(1), 1));
    assert_eq!(levels_miscounted(&conn).await.unwrap(), 0);
}

/// A per-user allowance of one, among five slots.
const ONE_OF_FIVE: shared::jobs::Limits = shared::jobs::Limits {
    slots: 5,
    per_user: 1,
};

/// An enqueue as the Lambda makes it (a slot reserved for a `direct` answer, no start).
async fn enqueue(
    db: &impl deadpool_postgres::GenericClient,
    owner: &shared::model::Identity,
    limits: shared::jobs::Limits,
) -> shared::jobs::Admitted {
    let params = serde_json::json!({ "prompt": "p" });
    shared::jobs::insert(
        db,
        &shared::jobs::NewJob {
            id: Uuid::now_v7(),
            owner,
            job_type: shared::model::JobType::CharacterImage,
            entity_id: Uuid::new_v4(),
            params: &params,
            max_attempts: 3,
            limits,
            quota: shared::jobs::Quota::UNLIMITED,
            start: None,
        },
    )
    .await
    .unwrap()
}

/// Runs `racing` on a connection of its own while `holder` has given Alice a slot in a
/// transaction not yet committed: once `racing` waits for a lock (or has already finished
/// without waiting), the transaction commits. Returns what `racing` returned.
async fn race_an_uncommitted_slot<T, Racing>(
    t: &TestApp,
    holder: &deadpool_postgres::Object,
    racing: impl FnOnce(deadpool_postgres::Object) -> Racing,
) -> T
where
    T: Send + 'static,
    Racing: std::future::Future<Output = T> + Send + 'static,
{
    let watcher = t.db.pool.get().await.unwrap();
    let racing = tokio::spawn(racing(t.db.pool.get().await.unwrap()));
    let racing = async move { racing.await.unwrap() };
    tokio::pin!(racing);
    // Bounded only so that a broken build fails instead of hanging.
    for _ in 0..500 {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::select! {
            done = &mut racing => {
                holder.batch_execute("COMMIT").await.unwrap();
                return done;
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    holder.batch_execute("COMMIT").await.unwrap();
    racing.await
}

async fn slots_held_by(t: &TestApp, user_id: &str) -> i64 {
    let conn = t.db.pool.get().await.unwrap();
    conn.query_one(
        "SELECT count(*) FROM job_slots WHERE user_id = $1 AND lease_expires_at > now()",
        &[&user_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Alice's first job, given a slot by a direct enqueue whose transaction is still open.
async fn alice_direct_uncommitted(t: &TestApp) -> deadpool_postgres::Object {
    let holder = t.db.pool.get().await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let first = enqueue(&holder, &user("alice", None), ONE_OF_FIVE).await;
    assert!(first.direct, "the first job gets a slot");
    holder
}

/// The user's next job, queued (as a plain insert: no admission ran for it), at the key
/// admission would give it, after their first job's.
async fn queued_for(t: &TestApp, user_id: &str) -> Uuid {
    let id = Uuid::now_v7();
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         VALUES ($1, $2, 'moodboard', gen_random_uuid(), 1)",
        &[&id, &user_id],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn two_enqueues_at_once_never_give_one_user_more_slots_than_allowed() {
    let t = TestApp::embedded().await;
    let holder = alice_direct_uncommitted(&t).await;
    let second = race_an_uncommitted_slot(&t, &holder, |conn| async move {
        enqueue(&conn, &user("alice", None), ONE_OF_FIVE).await
    })
    .await;
    assert!(!second.direct, "Alice already holds her one slot");
    assert_eq!(slots_held_by(&t, "alice").await, 1);
}

#[tokio::test]
async fn a_batch_claim_beside_a_direct_enqueue_keeps_the_users_allowance() {
    let t = TestApp::embedded().await;
    let holder = alice_direct_uncommitted(&t).await;
    let waiting = queued_for(&t, "alice").await;
    let claimed = race_an_uncommitted_slot(&t, &holder, |conn| async move {
        shared::jobs::claim_line(&conn, 5, Duration::from_secs(60), ONE_OF_FIVE)
            .await
            .unwrap()
    })
    .await;
    assert!(claimed.jobs.is_empty(), "Alice already holds her one slot");
    assert!(claimed.left_waiting, "her next job waits for her allowance");
    assert_eq!(t.status_of(waiting).await, "queued");
    assert_eq!(slots_held_by(&t, "alice").await, 1);
}

#[tokio::test]
async fn a_claim_by_id_beside_a_direct_enqueue_keeps_the_users_allowance() {
    let t = TestApp::embedded().await;
    let holder = alice_direct_uncommitted(&t).await;
    let waiting = queued_for(&t, "alice").await;
    let claimed = race_an_uncommitted_slot(&t, &holder, |conn| async move {
        shared::jobs::claim_by_id(&conn, waiting, Duration::from_secs(60), ONE_OF_FIVE)
            .await
            .unwrap()
    })
    .await;
    assert!(
        matches!(claimed, ClaimResult::NoSlot),
        "Alice already holds her one slot: {claimed:?}"
    );
    assert_eq!(slots_held_by(&t, "alice").await, 1);
}

#[tokio::test]
async fn only_an_allowance_below_the_slot_count_takes_a_users_lock() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    let locks_held = || async {
        let held: i64 = conn
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        conn.batch_execute("ROLLBACK").await.unwrap();
        held
    };
    let lease = Duration::from_secs(60);
    let cases = || {
        ["auto", "force_generic_plan"]
            .into_iter()
            .flat_map(|plans| {
                [
                    (plans, ONE_OF_FIVE, 1),
                    (plans, shared::jobs::Limits::from(5), 0),
                ]
            })
    };
    // Each statement that may give a user a slot, in a transaction rolled back once its locks
    // are counted.
    for (plans, limits, locks) in cases() {
        conn.batch_execute(&format!("SET plan_cache_mode = {plans}; BEGIN"))
            .await
            .unwrap();
        assert!(enqueue(&conn, &user("alice", None), limits).await.direct);
        assert_eq!(locks_held().await, locks, "enqueue, {plans}, {limits:?}");
    }
    let waiting = queued_for(&t, "alice").await;
    for (plans, limits, locks) in cases() {
        conn.batch_execute(&format!("SET plan_cache_mode = {plans}; BEGIN"))
            .await
            .unwrap();
        let line = shared::jobs::claim_line(&conn, 1, lease, limits)
            .await
            .unwrap();
        assert_eq!(line.jobs.len(), 1);
        assert_eq!(
            locks_held().await,
            locks,
            "batch claim, {plans}, {limits:?}"
        );

        conn.batch_execute("BEGIN").await.unwrap();
        let one = shared::jobs::claim_by_id(&conn, waiting, lease, limits)
            .await
            .unwrap();
        assert!(matches!(one, ClaimResult::Claimed(_)), "{one:?}");
        assert_eq!(
            locks_held().await,
            locks,
            "claim by id, {plans}, {limits:?}"
        );
    }
}

#[tokio::test]
async fn a_batch_claim_looks_past_a_user_held_back_by_their_allowance() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    // Twenty of Alice's jobs, then Bob's: with an allowance of one, only her first may start.
    conn.batch_execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         SELECT gen_random_uuid(), CASE WHEN g <= 20 THEN 'alice' ELSE 'bob' END, 'moodboard', \
                gen_random_uuid(), g \
         FROM generate_series(1, 21) g",
    )
    .await
    .unwrap();
    let line = shared::jobs::claim_line(&conn, 2, Duration::from_secs(60), ONE_OF_FIVE)
        .await
        .unwrap();
    // In no particular order: these jobs share one created_at.
    let mut users: Vec<&str> = line.jobs.iter().map(|c| c.job.user_id.as_str()).collect();
    users.sort();
    assert_eq!(users, ["alice", "bob"]);
}

#[tokio::test]
async fn a_batch_claim_looks_past_any_number_of_jobs_of_users_already_at_their_allowance() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    // Four users each hold one of five slots, their allowance, and have ten jobs each waiting
    // ahead of Carol's: more than a claim of one job looks ahead in line.
    for who in ["u1", "u2", "u3", "u4"] {
        let running = Uuid::now_v7();
        t.insert_job(running, &user(who, None), "x").await;
        claim(&t, running).await;
        conn.execute(
            "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
             SELECT gen_random_uuid(), $1, 'moodboard', gen_random_uuid(), g \
             FROM generate_series(1, 10) g",
            &[&who],
        )
        .await
        .unwrap();
    }
    let carols = Uuid::now_v7();
    conn.execute(
        "INSERT INTO generation_jobs (id, user_id, job_type, entity_id, fair_key) \
         VALUES ($1, 'carol', 'moodboard', gen_random_uuid(), 11)",
        &[&carols],
    )
    .await
    .unwrap();

    let line = shared::jobs::claim_line(&conn, 1, Duration::from_secs(60), ONE_OF_FIVE)
        .await
        .unwrap();
    let claimed: Vec<Uuid> = line.jobs.iter().map(|c| c.job.id).collect();
    assert_eq!(
        claimed,
        [carols],
        "the fifth slot goes to the one job that may take it"
    );
}

#[tokio::test]
async fn a_completer_round_does_not_wait_for_its_jobs_slot_that_another_claimer_holds() {
    let t = TestApp::embedded().await;
    let job = Uuid::now_v7();
    t.insert_job(job, &user("alice", None), "x").await;
    let running = claim(&t, job).await;
    let conn = t.db.pool.get().await.unwrap();
    // The job ran past its slot's lease: another claimer may take that slot as free, and
    // holds it until it commits. Waiting for it, with users' locks held, could close a cycle.
    conn.execute(
        "UPDATE job_slots SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1",
        &[&job],
    )
    .await
    .unwrap();
    let other = hold_slot_of(&t, job).await;
    let completion = completed(&running);
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
    let round = tokio::spawn({
        let pool = t.db.pool.clone();
        async move {
            let conn = pool.get().await.unwrap();
            let pid = backend_pid(&conn).await;
            pid_tx.send(pid).unwrap();
            shared::jobs::complete_and_claim(
                &conn,
                &[&completion],
                &[true],
                "m",
                Duration::from_secs(60),
                ONE_OF_FIVE,
            )
            .await
        }
    });
    let pid = pid_rx.await.unwrap();
    // Bounded only so that a broken build fails instead of hanging.
    for _ in 0..500 {
        if round.is_finished() {
            break;
        }
        let waits: Option<String> = conn
            .query_one(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        assert_ne!(
            waits.as_deref(),
            Some("Lock"),
            "the round waits for the slot another claimer holds"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = round.await.unwrap();
    other.batch_execute("ROLLBACK").await.unwrap();
    match end {
        shared::jobs::RoundEnd::Committed { applied, .. } => assert!(applied.contains(&job)),
        _ => panic!("the round did not commit"),
    }
    assert_eq!(t.status_of(job).await, "completed");
}

#[tokio::test]
async fn a_completed_jobs_slot_another_statement_holds_still_counts_for_its_user_and_is_freed_after_the_round(
) {
    let t = TestApp::embedded().await;
    let done = Uuid::now_v7();
    t.insert_job(done, &user("bob", None), "x").await;
    let running = claim(&t, done).await;
    let conn = t.db.pool.get().await.unwrap();
    let bobs_next = queued_for(&t, "bob").await;
    // A statement that looked at this slot as free found it taken on the re-check, and keeps
    // the row locked until it commits.
    let other = hold_slot_of(&t, done).await;

    let completion = completed(&running);
    let end = shared::jobs::complete_and_claim(
        &conn,
        &[&completion],
        &[true],
        "m",
        Duration::from_secs(60),
        ONE_OF_FIVE,
    )
    .await;
    let shared::jobs::RoundEnd::Committed {
        applied,
        line,
        stranded,
    } = end
    else {
        panic!("the round did not commit: {end:?}")
    };
    assert!(applied.contains(&done));
    assert!(
        line.jobs.is_empty(),
        "Bob's next job waits: the slot still held counts against his allowance of one"
    );
    assert_eq!(
        stranded,
        [done],
        "the slot the round could not free is named"
    );

    other.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        shared::jobs::free_stranded(&conn, &stranded).await.unwrap(),
        1
    );
    assert_eq!(slots_held_by(&t, "bob").await, 0);
    let line = shared::jobs::claim_line(&conn, 1, Duration::from_secs(60), ONE_OF_FIVE)
        .await
        .unwrap();
    assert_eq!(line.jobs.len(), 1, "and his next job starts");
    assert_eq!(line.jobs[0].job.id, bobs_next);
}

#[tokio::test]
async fn a_stalled_jobs_slot_counts_for_its_user_so_its_renewal_cannot_lift_them_over_the_allowance(
) {
    let t = TestApp::embedded().await;
    let stalled = Uuid::now_v7();
    t.insert_job(stalled, &user("alice", None), "x").await;
    let running = claim(&t, stalled).await;
    let conn = t.db.pool.get().await.unwrap();
    stall(&t, stalled).await;

    let next = enqueue(&conn, &user("alice", None), ONE_OF_FIVE).await;
    assert!(
        !next.direct,
        "Alice's stalled job may still run: her allowance of one is used"
    );
    let line = shared::jobs::claim_line(&conn, 4, Duration::from_secs(60), ONE_OF_FIVE)
        .await
        .unwrap();
    assert!(line.jobs.is_empty(), "nor does a claim start her next job");

    let renewed = shared::jobs::heartbeat(&conn, &running, 50, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(renewed, "the stalled worker wakes and renews its lease");
    assert_eq!(slots_held_by(&t, "alice").await, 1);
}

#[tokio::test]
async fn a_stalled_job_whose_slot_a_claim_is_handing_on_learns_it_must_stop_once_that_claim_commits(
) {
    let t = TestApp::embedded().await;
    let stalled = Uuid::now_v7();
    t.insert_job(stalled, &user("alice", None), "x").await;
    let running = claim(&t, stalled).await;
    stall(&t, stalled).await;
    // Another claimer is giving the expired slot to Bob's job, and has not committed yet.
    let claimer = t.db.pool.get().await.unwrap();
    claimer
        .batch_execute(&format!(
            "BEGIN; UPDATE job_slots SET job_id = '{}', user_id = 'bob', \
             lease_expires_at = now() + interval '1 minute' WHERE job_id = '{stalled}'",
            Uuid::now_v7()
        ))
        .await
        .unwrap();

    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
    let renewal = tokio::spawn({
        let pool = t.db.pool.clone();
        async move {
            let conn = pool.get().await.unwrap();
            let pid = backend_pid(&conn).await;
            pid_tx.send(pid).unwrap();
            shared::jobs::heartbeat(&conn, &running, 50, Duration::from_secs(60)).await
        }
    });
    let pid = pid_rx.await.unwrap();
    let conn = t.db.pool.get().await.unwrap();
    // Bounded only so that a broken build fails instead of hanging.
    for _ in 0..500 {
        let waits: Option<String> = conn
            .query_one(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waits.as_deref() == Some("Lock") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    claimer.batch_execute("COMMIT").await.unwrap();

    assert!(
        !renewal.await.unwrap().unwrap(),
        "the stalled worker learns its slot went to another job"
    );
    let expired: bool = conn
        .query_one(
            "SELECT lease_expires_at < now() FROM generation_jobs WHERE id = $1",
            &[&stalled],
        )
        .await
        .unwrap()
        .get(0);
    assert!(expired, "and its job's lease was not renewed");
}

/// The job's worker stalled past its lease; no one has taken its slot over or rescued it.
async fn stall(t: &TestApp, job: Uuid) {
    let conn = t.db.pool.get().await.unwrap();
    conn.batch_execute(&format!(
        "UPDATE job_slots SET lease_expires_at = now() - interval '1 second' WHERE job_id = '{job}'; \
         UPDATE generation_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = '{job}'"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn a_users_job_held_back_by_a_stalled_job_is_not_ahead_of_another_users_job() {
    let t = TestApp::embedded().await;
    let stalled = Uuid::now_v7();
    t.insert_job(stalled, &user("alice", None), "x").await;
    claim(&t, stalled).await;
    for other in ["carol", "dan", "erin", "frank"] {
        let id = Uuid::now_v7();
        t.insert_job(id, &user(other, None), "x").await;
        claim(&t, id).await;
    }
    stall(&t, stalled).await;
    let held_back = queued_for(&t, "alice").await;
    let bobs = queued_for(&t, "bob").await;
    let conn = t.db.pool.get().await.unwrap();

    // The one slot that is free, its lease run out, goes to Bob: Alice's next job is first in
    // line but may not start while her stalled job may still run.
    let result = shared::jobs::claim_by_id(&conn, bobs, Duration::from_secs(60), ONE_OF_FIVE)
        .await
        .unwrap();
    assert!(matches!(result, ClaimResult::Claimed(_)), "{result:?}");
    assert_eq!(t.status_of(held_back).await, "queued");
}
