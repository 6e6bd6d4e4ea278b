use std::time::Duration;

use serde_json::json;
use shared::queue::Dispatcher;
use uuid::Uuid;

use crate::support::*;

const CHARACTER: &str =
    r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"a knight"}"#;

#[tokio::test]
async fn an_accepted_job_is_answered_202_with_its_id_and_committed_as_queued() {
    let t = TestApp::embedded().await;
    let alice = user("alice", Some("tenant-x"));
    let (status, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice),
            Some(CHARACTER),
        ),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["mode"], "direct");
    assert_eq!(body["message"], "Generating now...");
    assert!(body["position"].is_null());
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    let conn = t.db.pool.get().await.unwrap();
    let row = conn
        .query_one("SELECT user_id, tenant_id, job_type, entity_id, params FROM generation_jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("user_id"), "alice");
    assert_eq!(
        row.get::<_, Option<String>>("tenant_id").as_deref(),
        Some("tenant-x")
    );
    assert_eq!(row.get::<_, String>("job_type"), "character-image");
    assert_eq!(
        row.get::<_, Uuid>("entity_id").to_string(),
        "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"
    );
    assert_eq!(
        row.get::<_, serde_json::Value>("params")["prompt"],
        "a knight"
    );
}

#[tokio::test]
async fn when_every_slot_is_taken_a_job_is_queued_with_its_true_position() {
    let t = TestApp::embedded().await; // MAX_CONCURRENT_JOBS = 3, and no worker runs
    let alice = user("alice", None);
    let mut answers = Vec::new();
    for _ in 0..5 {
        let (status, body) = call(
            &t.app,
            api_request(
                "POST",
                "/api/generate/character",
                Some(&alice),
                Some(CHARACTER),
            ),
        )
        .await;
        assert_eq!(status, 202);
        answers.push(body);
    }
    let modes: Vec<&str> = answers
        .iter()
        .map(|b| b["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["direct", "direct", "direct", "queued", "queued"]);
    assert_eq!(answers[3]["position"], 4);
    assert_eq!(answers[3]["message"], "Added to queue...");
    assert_eq!(answers[4]["position"], 5);
    // The status route reports the same position, which FIFO claiming honours.
    let (_, status) = call(
        &t.app,
        api_request(
            "GET",
            &format!(
                "/api/generate/status/{}",
                answers[4]["jobId"].as_str().unwrap()
            ),
            Some(&alice),
            None,
        ),
    )
    .await;
    assert_eq!(status["position"], 5);
    let conn = t.db.pool.get().await.unwrap();
    let claimed = shared::jobs::claim_next(&conn, 5, Duration::from_secs(60), 1000)
        .await
        .unwrap();
    let order: Vec<String> = claimed.iter().map(|c| c.job.id.to_string()).collect();
    let promised: Vec<String> = answers
        .iter()
        .map(|b| b["jobId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, promised);
}

#[tokio::test]
async fn the_status_route_shows_a_completed_job_with_its_media() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let (_, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/moodboard",
            Some(&alice),
            Some(r#"{"moodboardId":"2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c","prompt":"forest","count":3}"#),
        ),
    )
    .await;
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    let claim = claim(&t, id).await;
    shared::worker::run_claimed(&t.app, claim).await.unwrap();

    let (status, body) = poll_status(&t.app, &alice, id).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["status"], "completed");
    assert_eq!(body["progress"], 100);
    assert!(body["error"].is_null());
    assert!(
        body["startedAt"].is_string()
            && body["completedAt"].is_string()
            && body["createdAt"].is_string()
    );
    assert_eq!(body["media"].as_array().unwrap().len(), 3);
    assert_eq!(body["result"], body["media"][0]);
    let url = body["result"]["publicUrl"].as_str().unwrap();
    let key = url
        .strip_prefix("http://media.test/media/")
        .expect("served under the public media URL");
    let bytes = std::fs::read(t.media.path().join(key)).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(body["result"]["sizeBytes"], bytes.len());
}

#[tokio::test]
async fn another_users_job_is_a_404_exactly_like_a_missing_one() {
    let t = TestApp::embedded().await;
    let alice = user("alice", Some("tenant-x"));
    let id = Uuid::now_v7();
    t.insert_job(id, &alice, "mine").await;
    let path = format!("/api/generate/status/{id}");

    let (owner_status, _) = call(&t.app, api_request("GET", &path, Some(&alice), None)).await;
    assert_eq!(owner_status, 200);
    let missing = call(
        &t.app,
        api_request(
            "GET",
            &format!("/api/generate/status/{}", Uuid::now_v7()),
            Some(&alice),
            None,
        ),
    )
    .await;
    for stranger in [
        user("bob", Some("tenant-x")),
        user("alice", Some("tenant-y")),
        user("alice", None),
    ] {
        let answer = call(&t.app, api_request("GET", &path, Some(&stranger), None)).await;
        assert_eq!(
            answer, missing,
            "{stranger:?} must not learn the job exists"
        );
    }
    assert_eq!(missing.0, 404);
    assert_eq!(missing.1["error"]["code"], "job_not_found");
}

#[tokio::test]
async fn requests_without_an_identity_get_401_and_touch_nothing() {
    let t = TestApp::embedded().await;
    let (status, body) = call(
        &t.app,
        api_request("POST", "/api/generate/character", None, Some(CHARACTER)),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = call(
        &t.app,
        api_request(
            "GET",
            &format!("/api/generate/status/{}", Uuid::now_v7()),
            None,
            None,
        ),
    )
    .await;
    assert_eq!(status, 401);
    let conn = t.db.pool.get().await.unwrap();
    let n: i64 = conn
        .query_one("SELECT count(*) FROM generation_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_with_a_stable_code_and_nothing_is_written() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let long_prompt = format!(
        r#"{{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"{}"}}"#,
        "x".repeat(2001)
    );
    let huge = format!(
        r#"{{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","prompt":"{}"}}"#,
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/api/generate/character",
            Some("{not json"),
            400,
            "invalid_json",
        ),
        ("POST", "/api/generate/character", None, 400, "invalid_json"),
        (
            "POST",
            "/api/generate/character",
            Some("[]"),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/character",
            Some(r#"{"prompt":"no id"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/character",
            Some(r#"{"characterId":"not-a-uuid"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/character",
            Some(r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b","evil":1}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/character",
            Some(&long_prompt),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/character",
            Some(&huge),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/api/generate/moodboard",
            Some(r#"{"moodboardId":"2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c","count":0}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/animation",
            Some(r#"{"moodboardId":"2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c"}"#),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/generate/sculpture",
            Some("{}"),
            404,
            "route_not_found",
        ),
        (
            "GET",
            "/api/generate/status/12345",
            None,
            400,
            "invalid_job_id",
        ),
        (
            "DELETE",
            "/api/generate/status/0192f0c4-6a8e-7c3b-9d2e-5f1a2b3c4d5e",
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/api/nothing-here", None, 404, "route_not_found"),
    ];
    for (method, path, body, want_status, want_code) in cases {
        let (status, answer) = call(&t.app, api_request(method, path, Some(&alice), body)).await;
        assert_eq!(status, want_status, "{method} {path} {body:?} -> {answer}");
        assert_eq!(
            answer["error"]["code"], want_code,
            "{method} {path} {body:?} -> {answer}"
        );
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let conn = t.db.pool.get().await.unwrap();
    let n: i64 = conn
        .query_one("SELECT count(*) FROM generation_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn health_is_200_when_the_database_answers_and_503_when_it_does_not() {
    let t = TestApp::embedded().await;
    let (status, body) = call(&t.app, api_request("GET", "/api/health", None, None)).await;
    assert_eq!((status, body), (200, json!({ "status": "ok" })));

    let dead = shared::App::new(
        config(
            "postgres://postgres@127.0.0.1:5432/mj_no_such_database",
            t.media.path(),
        ),
        shared::db::pool("postgres://postgres@127.0.0.1:5432/mj_no_such_database", 1).unwrap(),
        Dispatcher::embedded(),
        t.generator.clone(),
    );
    let response = shared::api::handle(&dead, api_request("GET", "/api/health", None, None)).await;
    assert_eq!(response.headers()["retry-after"], "2");
    let (status, body) = call(&dead, api_request("GET", "/api/health", None, None)).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        !body.to_string().contains("mj_no_such_database"),
        "internal detail leaked: {body}"
    );
}
