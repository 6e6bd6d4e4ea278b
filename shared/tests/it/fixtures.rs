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
    let (status, doc) = http(&t, "openapi.json").await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let (status, body) = http(&t, "list-jobs.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jobs"][0]["id"], FIXTURE_JOB);
    assert_eq!(body["nextCursor"], serde_json::Value::Null);
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
async fn the_collect_fixture_is_read_and_changes_nothing_once_its_hold_is_gone() {
    let t = TestApp::embedded().await;
    let id: Uuid = FIXTURE_JOB.parse().unwrap();
    t.insert_job(id, &user("user-a", Some("tenant-x")), "fixture")
        .await;
    let event: SqsEvent = serde_json::from_str(&fixture("worker-collect.json")).unwrap();
    let response = shared::worker::handle_sqs(&t.app, event).await;
    // Read (not poison), acknowledged, and the job, which no check holds, is left as it was.
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(t.status_of(id).await, "queued");
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

/// The secret `infra/env/local.json` gives `sam local invoke`; the webhook fixture's token is
/// made with it.
const FIXTURE_CALLBACK_SECRET: &str = "local-callback-secret-for-sam-local-invoke-only";

#[tokio::test]
async fn the_webhook_fixture_is_authentic_only_under_the_local_callback_secret() {
    let t = TestApp::configured(
        |_| shared::queue::Dispatcher::embedded(),
        std::time::Duration::ZERO,
        &[("CALLBACK_SECRET", FIXTURE_CALLBACK_SECRET)],
    )
    .await;
    // No such job waits on the provider: authentic, and nothing to do.
    let (status, body) = http(&t, "modelslab-webhook.json").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("ignored")),
        "{body}"
    );

    let other = TestApp::configured(
        |_| shared::queue::Dispatcher::embedded(),
        std::time::Duration::ZERO,
        &[("CALLBACK_SECRET", "some-other-deployment-secret-0123456789")],
    )
    .await;
    let (status, _) = http(&other, "modelslab-webhook.json").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_drive_fixtures_connect_report_and_disconnect_the_fixture_user() {
    use wiremock::{matchers::path, Mock, MockServer, ResponseTemplate};
    let google = MockServer::start().await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": "fake-access-token-fixture", "expires_in": 3599, "token_type": "Bearer"
        })))
        .mount(&google)
        .await;
    let token_url = format!("{}/token", google.uri());
    let key = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";
    let t = TestApp::configured(
        |_| shared::queue::Dispatcher::embedded(),
        std::time::Duration::ZERO,
        &[
            ("MEDIA_STORE", "google-drive"),
            ("GOOGLE_CLIENT_ID", "client"),
            ("GOOGLE_CLIENT_SECRET", "secret"),
            ("GOOGLE_TOKEN_URL", &token_url),
            ("DRIVE_TOKEN_KEY", key),
        ],
    )
    .await;
    let connected = |body: &serde_json::Value| body["connected"].as_bool();
    let (status, body) = http(&t, "drive-connection.json").await;
    assert_eq!((status, connected(&body)), (200, Some(false)), "{body}");
    let (status, body) = http(&t, "drive-connect.json").await;
    assert_eq!((status, connected(&body)), (200, Some(true)), "{body}");
    let (_, body) = http(&t, "drive-connection.json").await;
    assert_eq!(connected(&body), Some(true));
    let (status, body) = http(&t, "drive-disconnect.json").await;
    assert_eq!((status, connected(&body)), (200, Some(false)));
    let (_, body) = http(&t, "drive-connection.json").await;
    assert_eq!(connected(&body), Some(false));

    // Where media are stored locally there is no Drive to connect.
    let local = TestApp::embedded().await;
    let (status, body) = http(&local, "drive-connection.json").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("drive_not_configured"))
    );
}
