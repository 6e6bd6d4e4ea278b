//! Completion webhooks: a local receiver (wiremock, the only host on the allow-list) checks
//! signatures and sees retries under one event id; every address a user-supplied URL must never
//! reach is refused.

use std::time::Duration;

use serde_json::{json, Value};
use shared::{config::Secret, queue::Dispatcher, worker::run_claimed};
use uuid::Uuid;
use wiremock::{matchers::method, Mock, MockServer, Request, ResponseTemplate};

use crate::support::*;

const SECRET: &str = "whsec-test-0123456789abcdef";

async fn app_with_receiver() -> (TestApp, MockServer) {
    let receiver = MockServer::start().await;
    let host = receiver.address().to_string();
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("WEBHOOK_SECRET", SECRET), ("WEBHOOK_ALLOW_HOSTS", &host)],
    )
    .await;
    (t, receiver)
}

async fn job_with_webhook(t: &TestApp, url: &str) -> (u16, Value) {
    let body = json!({ "characterId": Uuid::new_v4(), "prompt": "x", "webhookUrl": url });
    call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&user("hooked", None)),
            Some(&body.to_string()),
        ),
    )
    .await
}

fn header(r: &Request, name: &str) -> String {
    r.headers.get(name).unwrap().to_str().unwrap().to_owned()
}

/// What a receiver does with one delivery: verify it, and read it.
fn verified(r: &Request) -> Value {
    assert!(
        shared::webhooks::verify(
            &Secret::new(SECRET),
            &header(r, "webhook-id"),
            &header(r, "webhook-timestamp"),
            &r.body,
            &header(r, "webhook-signature"),
            chrono::Utc::now(),
            Duration::from_secs(300),
        ),
        "the signature does not verify"
    );
    serde_json::from_slice(&r.body).unwrap()
}

async fn deliveries(t: &TestApp) -> Vec<(String, i32, Option<String>, bool)> {
    let conn = t.db.pool.get().await.unwrap();
    conn.query(
        "SELECT status::text, attempts, last_error, delivered_at IS NOT NULL AS delivered FROM webhook_deliveries ORDER BY created_at",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test]
async fn a_finished_job_posts_a_signed_status_body_once() {
    let (t, receiver) = app_with_receiver().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let (status, answer) = job_with_webhook(&t, &format!("{}/hooks/jobs", receiver.uri())).await;
    assert_eq!(status, 202, "{answer}");
    let id: Uuid = answer["jobId"].as_str().unwrap().parse().unwrap();

    run_claimed(&t.app, claim(&t, id).await).await.unwrap();

    let received = receiver.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let event = verified(&received[0]);
    assert_eq!(event["type"], "job.completed");
    assert_eq!(
        event["id"].as_str().unwrap(),
        header(&received[0], "webhook-id")
    );
    assert_eq!(event["data"]["id"], id.to_string());
    assert_eq!(event["data"]["status"], "completed");
    assert!(event["data"]["result"]["publicUrl"].is_string());
    assert_eq!(
        deliveries(&t).await,
        vec![("completed".into(), 1, None, true)]
    );

    // A poller tick later: nothing is sent again.
    let event = serde_json::from_str(include_str!("../../../events/poller-schedule.json")).unwrap();
    let report = shared::poller::handle_schedule(&t.app, event)
        .await
        .unwrap();
    assert_eq!(report.webhooks_delivered, 0);
    assert_eq!(receiver.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_delivery_is_retried_under_the_same_event_id_so_receivers_drop_repeats() {
    let (t, receiver) = app_with_receiver().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let (_, answer) = job_with_webhook(&t, &format!("{}/hook", receiver.uri())).await;
    let id: Uuid = answer["jobId"].as_str().unwrap().parse().unwrap();
    // Cancelled, not completed: every terminal state is an event.
    let (status, _) = call(
        &t.app,
        api_request(
            "DELETE",
            &format!("/api/jobs/{id}"),
            Some(&user("hooked", None)),
            None,
        ),
    )
    .await;
    assert_eq!(status, 200);
    let first = deliveries(&t).await;
    assert_eq!(first.len(), 1);
    assert!(
        !first[0].3 && first[0].2.as_deref().unwrap().contains("503"),
        "{first:?}"
    );

    let conn = t.db.pool.get().await.unwrap();
    conn.execute("UPDATE webhook_deliveries SET next_attempt_at = now()", &[])
        .await
        .unwrap();
    let event = serde_json::from_str(include_str!("../../../events/poller-schedule.json")).unwrap();
    let report = shared::poller::handle_schedule(&t.app, event)
        .await
        .unwrap();
    assert_eq!(report.webhooks_delivered, 1);

    let received = receiver.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    let (a, b) = (verified(&received[0]), verified(&received[1]));
    assert_eq!(a["type"], "job.cancelled");
    assert_eq!(
        header(&received[0], "webhook-id"),
        header(&received[1], "webhook-id")
    );
    assert_eq!(a["id"], b["id"]);
    assert_eq!(deliveries(&t).await[0].1, 2);
    assert!(deliveries(&t).await[0].3);
}

#[tokio::test]
async fn urls_naming_internal_addresses_are_refused_at_enqueue() {
    let (t, _receiver) = app_with_receiver().await;
    for url in [
        "https://127.0.0.1/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[fd00::1]/hook",
        "http://hooks.example.com/plain-http",
        "https://user:pass@hooks.example.com/",
        "file:///etc/passwd",
        "not a url",
    ] {
        let (status, body) = job_with_webhook(&t, url).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("webhook_url_refused")),
            "{url}: {body}"
        );
    }
    let conn = t.db.pool.get().await.unwrap();
    let jobs: i64 = conn
        .query_one("SELECT count(*) FROM generation_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs, 0, "nothing was queued");
}

#[tokio::test]
async fn a_hostname_resolving_to_a_private_address_is_refused_before_connecting() {
    let (t, _receiver) = app_with_receiver().await;
    // `localhost` passes the enqueue check (it is a name), and resolves to loopback.
    let (status, answer) = job_with_webhook(&t, "https://localhost:8443/hook").await;
    assert_eq!(status, 202);
    let id: Uuid = answer["jobId"].as_str().unwrap().parse().unwrap();
    run_claimed(&t.app, claim(&t, id).await).await.unwrap();
    let sent = deliveries(&t).await;
    let error = sent[0].2.clone().unwrap();
    assert!(!sent[0].3);
    assert!(
        error.contains("localhost resolves to") && error.contains("loopback"),
        "{error}"
    );
}

#[tokio::test]
async fn a_redirect_to_an_internal_address_is_not_followed() {
    let (t, receiver) = app_with_receiver().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", "http://169.254.169.254/latest/meta-data/"),
        )
        .mount(&receiver)
        .await;
    let (_, answer) = job_with_webhook(&t, &format!("{}/hook", receiver.uri())).await;
    let id: Uuid = answer["jobId"].as_str().unwrap().parse().unwrap();
    run_claimed(&t.app, claim(&t, id).await).await.unwrap();
    let sent = deliveries(&t).await;
    assert!(!sent[0].3);
    assert!(sent[0]
        .2
        .as_deref()
        .unwrap()
        .contains("redirects are not followed"));
    assert_eq!(receiver.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_deployment_without_a_webhook_secret_refuses_webhook_urls() {
    let t = TestApp::embedded().await;
    let (status, body) = job_with_webhook(&t, "https://hooks.example.com/x").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("webhooks_not_configured"))
    );
}
