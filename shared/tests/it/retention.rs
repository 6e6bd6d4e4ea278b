//! Retention: the poller deletes what is finished once it is past its days, and nothing else.

use std::time::Duration;

use shared::queue::Dispatcher;
use uuid::Uuid;

use crate::support::*;

/// A job id made `days` ago, as the API makes them (UUIDv7).
fn id_from_days_ago(days: u64) -> Uuid {
    let at = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap();
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        since.as_secs(),
        since.subsec_nanos(),
    ))
}

async fn tick(t: &TestApp) -> shared::poller::Report {
    let event = serde_json::from_str(include_str!("../../../events/poller-schedule.json")).unwrap();
    shared::poller::handle_schedule(&t.app, event)
        .await
        .unwrap()
}

/// Dates a job `days` back, as if it had been made (and had run and settled) then.
async fn date_back(t: &TestApp, id: Uuid, days: i32) {
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET created_at = created_at - make_interval(days => $2), \
                started_at = started_at - make_interval(days => $2), \
                completed_at = completed_at - make_interval(days => $2) WHERE id = $1",
        &[&id, &days],
    )
    .await
    .unwrap();
}

/// Dates only a job's creation `days` back.
async fn created_back(t: &TestApp, id: Uuid, days: i32) {
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET created_at = created_at - make_interval(days => $2) WHERE id = $1",
        &[&id, &days],
    )
    .await
    .unwrap();
}

async fn media_keys(t: &TestApp, id: Uuid) -> Vec<String> {
    let conn = t.db.pool.get().await.unwrap();
    conn.query(
        "SELECT storage_key FROM generated_media WHERE job_id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn exists(t: &TestApp, id: Uuid) -> bool {
    let conn = t.db.pool.get().await.unwrap();
    conn.query_opt("SELECT 1 FROM generation_jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn settled_jobs_past_their_retention_are_deleted_with_their_media_and_files_and_nothing_else_is(
) {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("JOB_RETENTION_DAYS", "30")],
    )
    .await;
    let owner = user("alice", None);
    let (old, recent) = (id_from_days_ago(40), Uuid::now_v7());
    t.insert_job(old, &owner, "old").await;
    t.insert_job(recent, &owner, "recent").await;
    t.run_embedded_until_completed(2).await;
    date_back(&t, old, 40).await;
    // Created long ago but settled only lately: kept until it has been settled that long.
    let late = id_from_days_ago(40);
    t.insert_job(late, &owner, "late").await;
    t.run_embedded_until_completed(3).await;
    created_back(&t, late, 40).await;
    // Waiting since long ago (a deadline far off): not settled, so kept.
    let old_queued = id_from_days_ago(40);
    t.insert_job(old_queued, &owner, "still queued").await;
    created_back(&t, old_queued, 40).await;
    let (old_files, recent_files) = (media_keys(&t, old).await, media_keys(&t, recent).await);
    assert_eq!((old_files.len(), recent_files.len()), (1, 1));
    assert!(t.media.path().join(&old_files[0]).exists());

    let report = tick(&t).await;

    assert_eq!(report.purged_jobs, 1);
    assert!(!exists(&t, old).await);
    assert!(
        media_keys(&t, old).await.is_empty(),
        "its media rows went with it"
    );
    let old_folder = t.media.path().join(old.to_string());
    assert!(
        !old_folder.exists(),
        "its folder of local files was removed"
    );
    assert!(exists(&t, recent).await && exists(&t, old_queued).await && exists(&t, late).await);
    assert!(t.media.path().join(&recent_files[0]).exists());
    assert_eq!(t.status_of(old_queued).await, "queued");
    // Nothing more to delete on the next tick.
    assert_eq!(tick(&t).await.purged_jobs, 0);
}

#[tokio::test]
async fn without_a_job_retention_settled_jobs_are_kept_however_old() {
    let t = TestApp::embedded().await;
    let old = id_from_days_ago(4_000);
    t.insert_job(old, &user("alice", None), "old").await;
    t.run_embedded_until_completed(1).await;
    date_back(&t, old, 4_000).await;

    assert_eq!(tick(&t).await.purged_jobs, 0);
    assert_eq!(t.status_of(old).await, "completed");
}

#[tokio::test]
async fn settled_webhook_events_past_their_retention_are_deleted_and_pending_ones_are_kept() {
    let t = TestApp::embedded().await;
    let job = id_from_days_ago(20);
    t.insert_job(job, &user("alice", None), "x").await;
    let conn = t.db.pool.get().await.unwrap();
    let event = |delivered: Option<i32>, given_up: Option<i32>| {
        let conn = &conn;
        async move {
            let row = conn
                .query_one(
                    "INSERT INTO webhook_deliveries (job_id, status, url, delivered_at, given_up_at) \
                     VALUES ($1, 'completed', 'https://hooks.example/x', \
                             now() - make_interval(days => $2), now() - make_interval(days => $3)) \
                     RETURNING event_id",
                    &[&job, &delivered, &given_up],
                )
                .await
                .unwrap();
            row.get::<_, Uuid>(0)
        }
    };
    // The default retention is 7 days.
    let delivered_long_ago = event(Some(10), None).await;
    let given_up_long_ago = event(None, Some(10)).await;
    let delivered_lately = event(Some(1), None).await;
    let still_trying = event(None, None).await;

    assert_eq!(tick(&t).await.purged_webhooks, 2);

    let left: Vec<Uuid> = conn
        .query(
            "SELECT event_id FROM webhook_deliveries ORDER BY created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!left.contains(&delivered_long_ago) && !left.contains(&given_up_long_ago));
    assert!(left.contains(&delivered_lately) && left.contains(&still_trying));
    assert_eq!(left.len(), 2);
}

#[tokio::test]
async fn the_uuid_v7_floor_of_a_moment_sorts_between_the_ids_made_just_before_and_just_after_it() {
    let t = TestApp::embedded().await;
    let conn = t.db.pool.get().await.unwrap();
    let id = id_from_days_ago(3);
    let ms = id.get_timestamp().unwrap().to_unix();
    let made_at = chrono::DateTime::from_timestamp(ms.0 as i64, ms.1).unwrap();
    let row = conn
        .query_one(
            "SELECT uuid_v7_floor($1::timestamptz - interval '1 millisecond') < $2::uuid, \
                    uuid_v7_floor($1::timestamptz) <= $2::uuid, \
                    uuid_v7_floor($1::timestamptz + interval '1 millisecond') > $2::uuid",
            &[&made_at, &id],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
}
