//! Every `events/*.json` file (what `sam local invoke -e` takes) runs through its handler.

use std::path::PathBuf;

use lambda_http::{
    aws_lambda_events::eventbridge::EventBridgeEvent, aws_lambda_events::sqs::SqsEvent, Body,
};
use uuid::Uuid;

use crate::support::*;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The job id the status and SQS fixtures name, owned by the fixtures' user.
const FIXTURE_JOB: &str = "0192f0c4-6a8e-7c3b-9d2e-5f1a2b3c4d5e";

async fn http(t: &TestApp, name: &str) -> (u16, serde_json::Value) {
    let req = lambda_http::request::from_str(&fixture(name)).expect(name);
    let response = shared::api::handle(&t.app, req).await;
    let status = response.status().as_u16();
    let Body::Text(text) = response.body() else {
        panic!("{name}: expected a JSON body")
    };
    (status, serde_json::from_str(text).unwrap())
}

#[test]
fn every_fixture_is_covered_by_this_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../events");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let source = include_str!("fixtures.rs");
    for name in names {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "events/{name} is not run by any test"
        );
    }
}

#[tokio::test]
async fn the_enqueue_fixtures_are_accepted() {
    let t = TestApp::embedded().await;
    for name in [
        "enqueue-character.json",
        "enqueue-moodboard.json",
        "enqueue-animation.json",
    ] {
        let (status, body) = http(&t, name).await;
        assert_eq!(status, 202, "{name}: {body}");
        assert!(
            body["jobId"]
                .as_str()
                .is_some_and(|id| id.parse::<Uuid>().is_ok()),
            "{name}"
        );
    }
    let conn = t.db.pool.get().await.unwrap();
    let owners: Vec<(String, Option<String>)> = conn
        .query("SELECT user_id, tenant_id FROM generation_jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(owners.len(), 3);
    assert!(owners
        .iter()
        .all(|(u, t)| u == "user-a" && t.as_deref() == Some("tenant-x")));
}

#[tokio::test]
async fn the_status_and_health_fixtures_answer_200() {
    let t = TestApp::embedded().await;
    let (status, body) = http(&t, "status.json").await;
    assert_eq!(status, 404, "before the job exists: {body}");
    t.insert_job(
        FIXTURE_JOB.parse().unwrap(),
        &user("user-a", Some("tenant-x")),
        "fixture",
    )
    .await;
    let (status, body) = http(&t, "status.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], FIXTURE_JOB);
    assert_eq!(body["status"], "queued");
    assert_eq!(body["position"], 1);
    let (status, _) = http(&t, "health.json").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_cancel_fixture_cancels_the_fixture_users_job() {
    let t = TestApp::embedded().await;
    t.insert_job(
        FIXTURE_JOB.parse().unwrap(),
        &user("user-a", Some("tenant-x")),
        "fixture",
    )
    .await;
    let (status, body) = http(&t, "cancel.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    // DELETE is the same cancel, and cancelling twice answers the same.
    let (status, again) = http(&t, "delete-job.json").await;
    assert_eq!((status, &again["status"]), (200, &body["status"]));
}

#[tokio::test]
async fn the_sqs_fixture_runs_its_job_through_the_worker() {
    let t = TestApp::embedded().await;
    let id: Uuid = FIXTURE_JOB.parse().unwrap();
    t.insert_job(id, &user("user-a", Some("tenant-x")), "fixture")
        .await;
    let event: SqsEvent = serde_json::from_str(&fixture("worker-sqs.json")).unwrap();
    let response = shared::worker::handle_sqs(&t.app, event).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.status_of(id).await, "completed");
}

#[tokio::test]
async fn the_schedule_fixture_runs_the_poller() {
    let t = TestApp::embedded().await;
    t.insert_job(Uuid::now_v7(), &user("user-a", None), "x")
        .await;
    let event: EventBridgeEvent<serde_json::Value> =
        serde_json::from_str(&fixture("poller-schedule.json")).unwrap();
    let report = shared::poller::handle_schedule(&t.app, event)
        .await
        .unwrap();
    assert_eq!(report.jobs["queued"], 1);
    assert_eq!(report.jobs["completed"], 0);
    assert_eq!(report.jobs.len(), 5);
}
