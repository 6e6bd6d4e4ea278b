//! Idempotency-Key on the POST routes: the same request under the same key gets the original
//! answer and job; a different request under it is refused; keys belong to their user.

use lambda_http::{http::HeaderValue, Request};

use crate::support::*;

const BODY: &str = r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"a knight"}"#;

fn with_key(mut req: Request, key: &str) -> Request {
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_str(key).unwrap());
    req
}

async fn post(
    t: &TestApp,
    who: &shared::model::Identity,
    key: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    call(
        &t.app,
        with_key(
            api_request("POST", "/api/generate/character", Some(who), Some(body)),
            key,
        ),
    )
    .await
}

async fn jobs_in_db(t: &TestApp) -> i64 {
    let conn = t.db.pool.get().await.unwrap();
    conn.query_one("SELECT count(*) FROM generation_jobs", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_same_request_under_the_same_key_gets_the_original_answer_and_job() {
    let t = TestApp::embedded().await;
    let alice = user("alice", Some("x"));
    let (status, first) = post(&t, &alice, "key-1", BODY).await;
    assert_eq!(status, 202);
    // Same meaning, different bytes: keys compare requests, not whitespace or field order.
    let reordered =
        r#"{ "prompt": "a knight", "characterId": "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b" }"#;
    let response = shared::api::handle(
        &t.app,
        with_key(
            api_request(
                "POST",
                "/api/generate/character",
                Some(&alice),
                Some(reordered),
            ),
            "key-1",
        ),
    )
    .await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let (_, again) = post(&t, &alice, "key-1", BODY).await;
    assert_eq!(again, first);
    assert_eq!(jobs_in_db(&t).await, 1);
}

#[tokio::test]
async fn a_different_request_under_a_used_key_is_refused_with_422() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    post(&t, &alice, "key-1", BODY).await;
    let other = r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"a dragon"}"#;
    let (status, body) = post(&t, &alice, "key-1", other).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    assert_eq!(jobs_in_db(&t).await, 1);
}

#[tokio::test]
async fn keys_belong_to_their_user_and_tenant() {
    let t = TestApp::embedded().await;
    let (_, a) = post(&t, &user("alice", Some("x")), "shared-key", BODY).await;
    let (_, b) = post(&t, &user("bob", Some("x")), "shared-key", BODY).await;
    let (_, c) = post(&t, &user("alice", Some("y")), "shared-key", BODY).await;
    assert_ne!(a["jobId"], b["jobId"]);
    assert_ne!(a["jobId"], c["jobId"]);
    assert_eq!(jobs_in_db(&t).await, 3);
}

#[tokio::test]
async fn racing_requests_with_one_key_create_one_job() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let answers = futures::future::join_all((0..10).map(|_| post(&t, &alice, "race", BODY))).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, 202, "{b}");
            b["jobId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(jobs_in_db(&t).await, 1);
}

#[tokio::test]
async fn an_expired_key_can_be_used_again() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let (_, first) = post(&t, &alice, "old", BODY).await;
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'",
        &[],
    )
    .await
    .unwrap();
    let (status, second) = post(
        &t,
        &alice,
        "old",
        r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#,
    )
    .await;
    assert_eq!(status, 202);
    assert_ne!(first["jobId"], second["jobId"]);
}

#[tokio::test]
async fn a_malformed_key_is_a_400() {
    let t = TestApp::embedded().await;
    let long = "k".repeat(256);
    for key in [long.as_str(), "has space", ""] {
        let (status, body) = post(&t, &user("alice", None), key, BODY).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_idempotency_key")),
            "{key:?}"
        );
    }
    assert_eq!(jobs_in_db(&t).await, 0);
}
