//! Who may do what: the authorization matrix over every route, the job list, and the abuse
//! limits on job creation.

use std::{collections::BTreeSet, time::Duration};

use serde_json::{json, Value};
use shared::{model::Identity, queue::Dispatcher};
use uuid::Uuid;

use crate::support::*;

fn character() -> String {
    json!({ "characterId": Uuid::new_v4(), "prompt": "a knight" }).to_string()
}

async fn enqueue(t: &TestApp, who: &Identity, route: &str, body: &str) -> (u16, Value) {
    call(&t.app, api_request("POST", route, Some(who), Some(body))).await
}

async fn new_job(t: &TestApp, who: &Identity) -> String {
    let (status, body) = enqueue(t, who, "/api/generate/character", &character()).await;
    assert_eq!(status, 202, "{body}");
    body["jobId"].as_str().unwrap().to_owned()
}

/// Users A and B in tenants X and Y. The owner is A in X; every other identity (another user in
/// the same tenant, the same user id in another tenant, another user in another tenant) must
/// find the job missing, on every route that names a job.
#[tokio::test]
async fn every_route_lets_a_user_see_and_touch_only_their_own_jobs() {
    let t = TestApp::embedded().await;
    let owner = user("A", Some("X"));
    let others = [
        user("B", Some("X")),
        user("A", Some("Y")),
        user("B", Some("Y")),
        user("A", None),
    ];
    let job = new_job(&t, &owner).await;

    // Routes naming a job: (method, path, owner's status).
    let job_routes = [
        ("GET", format!("/api/generate/status/{job}"), 200),
        ("POST", format!("/api/generate/cancel/{job}"), 200),
        ("DELETE", format!("/api/jobs/{job}"), 200),
    ];
    for (method, path, _) in &job_routes {
        for other in &others {
            let (status, body) = call(&t.app, api_request(method, path, Some(other), None)).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (404, Some("job_not_found")),
                "{method} {path} as {other:?}"
            );
        }
        let (status, body) = call(&t.app, api_request(method, path, None, None)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path} anonymous"
        );
    }
    // Nobody else's attempt changed the job: it is still queued, until its owner cancels it.
    assert_eq!(t.status_of(job.parse().unwrap()).await, "queued");
    for (method, path, expected) in &job_routes {
        let (status, body) = call(&t.app, api_request(method, path, Some(&owner), None)).await;
        assert_eq!(status, *expected, "{method} {path} as the owner: {body}");
    }
    assert_eq!(t.status_of(job.parse().unwrap()).await, "cancelled");

    // The list shows each identity its own jobs only.
    for other in &others {
        new_job(&t, other).await;
    }
    let mut all = BTreeSet::new();
    for who in std::iter::once(&owner).chain(&others) {
        let (status, body) = call(&t.app, api_request("GET", "/api/jobs", Some(who), None)).await;
        assert_eq!(status, 200);
        let jobs = body["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 1, "{who:?} sees {body}");
        assert!(all.insert(jobs[0]["id"].as_str().unwrap().to_owned()));
    }
    assert!(all.contains(&job));

    // Every route that acts for a user refuses an anonymous caller.
    for route in shared::api::ROUTES {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{jobId}", &job);
        let (status, body) = call(&t.app, api_request(method, &path, None, Some("{}"))).await;
        if path == "/api/health" || path == "/api/openapi.json" {
            assert_eq!(status, 200, "{route} needs no token");
        } else if path.starts_with("/api/webhooks/") {
            // Authenticated by its per-job token instead (see the provider tests).
            assert_eq!(status, 401, "{route} without its token");
        } else {
            assert_eq!(status, 401, "{route} anonymous: {body}");
        }
    }
}

#[tokio::test]
async fn the_list_pages_newest_first_without_repeats_and_filters() {
    let t = TestApp::embedded().await;
    let owner = user("lister", Some("X"));
    let mut made = Vec::new();
    for i in 0..25 {
        let (route, body) = if i % 5 == 0 {
            (
                "/api/generate/moodboard",
                json!({ "moodboardId": Uuid::new_v4() }).to_string(),
            )
        } else {
            ("/api/generate/character", character())
        };
        let (status, answer) = enqueue(&t, &owner, route, &body).await;
        assert_eq!(status, 202);
        made.push(answer["jobId"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/jobs?limit=10&cursor={c}"),
            None => "/api/jobs?limit=10".into(),
        };
        let (status, body) = call(
            &t.app,
            api_request("GET", "/api/jobs", Some(&owner), None).tap_uri(&path),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        seen.extend(
            body["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_owned()),
        );
        match body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        // A job created between pages appears on no later page and shifts nothing.
        if pages == 1 {
            new_job(&t, &owner).await;
        }
    }
    assert_eq!(pages, 3);
    made.reverse();
    assert_eq!(seen, made, "newest first, each once");

    let (_, moodboards) = call(
        &t.app,
        api_request("GET", "/api/jobs", Some(&owner), None)
            .tap_uri("/api/jobs?type=moodboard&status=queued"),
    )
    .await;
    let moodboards = moodboards["jobs"].as_array().unwrap();
    assert_eq!(moodboards.len(), 5);
    assert!(moodboards
        .iter()
        .all(|j| j["type"] == "moodboard" && j["status"] == "queued"));

    for bad in [
        "/api/jobs?limit=0",
        "/api/jobs?limit=101",
        "/api/jobs?limit=ten",
        "/api/jobs?status=running",
        "/api/jobs?type=sculpture",
        "/api/jobs?cursor=not-a-cursor",
        "/api/jobs?owner=someone-else",
    ] {
        let (status, body) = call(
            &t.app,
            api_request("GET", "/api/jobs", Some(&owner), None).tap_uri(bad),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["code"].is_string());
    }
}

#[tokio::test]
async fn a_user_creating_jobs_too_fast_gets_429_with_retry_after_and_others_do_not() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("RATE_LIMIT_PER_MINUTE", "3")],
    )
    .await;
    let hasty = user("hasty", None);
    for _ in 0..3 {
        new_job(&t, &hasty).await;
    }
    let response = shared::api::handle(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&hasty),
            Some(&character()),
        ),
    )
    .await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let (_, body) = enqueue(&t, &hasty, "/api/generate/character", &character()).await;
    assert_eq!(body["error"]["code"], "rate_limited");
    // Nothing was half-written: three jobs, and another user is unaffected.
    assert_eq!(jobs_of(&t, "hasty").await, 3);
    new_job(&t, &user("patient", None)).await;
}

#[tokio::test]
async fn a_user_with_too_many_jobs_waiting_gets_429_until_one_finishes() {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[("MAX_QUEUED_PER_USER", "2"), ("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let heavy = user("heavy", None);
    // The first takes the only slot (direct) and still counts as queued until it starts.
    let first = new_job(&t, &heavy).await;
    new_job(&t, &heavy).await;
    let (status, body) = enqueue(&t, &heavy, "/api/generate/character", &character()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_queued")),
        "{body}"
    );
    // Cancelling one makes room.
    let (status, _) = call(
        &t.app,
        api_request("DELETE", &format!("/api/jobs/{first}"), Some(&heavy), None),
    )
    .await;
    assert_eq!(status, 200);
    new_job(&t, &heavy).await;
    assert_eq!(jobs_of(&t, "heavy").await, 3);
}

/// Sends `n` enqueues of one user at once; answers how many were accepted, and the codes of
/// the refused.
async fn all_at_once(t: &TestApp, who: &Identity, n: usize) -> (usize, BTreeSet<String>) {
    let bodies: Vec<String> = (0..n).map(|_| character()).collect();
    let answers = futures::future::join_all(
        bodies
            .iter()
            .map(|body| enqueue(t, who, "/api/generate/character", body)),
    )
    .await;
    let accepted = answers.iter().filter(|(status, _)| *status == 202).count();
    let refused = answers
        .iter()
        .filter(|(status, _)| *status != 202)
        .map(|(status, body)| format!("{status} {}", body["error"]["code"].as_str().unwrap_or("")))
        .collect();
    (accepted, refused)
}

/// One user, "eager", sends as many enqueues at once as the test pool has connections, under
/// `limit` (with one slot, so that jobs wait).
async fn eager_all_at_once_under(limit: (&str, &str)) -> (TestApp, usize, BTreeSet<String>) {
    let t = TestApp::configured(
        |_| Dispatcher::embedded(),
        Duration::ZERO,
        &[limit, ("MAX_CONCURRENT_JOBS", "1")],
    )
    .await;
    let (accepted, refused) = all_at_once(&t, &user("eager", None), 16).await;
    (t, accepted, refused)
}

#[tokio::test]
async fn requests_arriving_together_cannot_queue_more_than_the_limit() {
    let (t, accepted, refused) = eager_all_at_once_under(("MAX_QUEUED_PER_USER", "3")).await;
    assert_eq!(accepted, 3);
    assert_eq!(refused, BTreeSet::from(["429 too_many_queued".to_owned()]));
    assert_eq!(jobs_of(&t, "eager").await, 3);
}

#[tokio::test]
async fn requests_arriving_together_cannot_pass_the_rate_limit_and_each_gets_its_own_place() {
    let (t, accepted, refused) = eager_all_at_once_under(("RATE_LIMIT_PER_MINUTE", "5")).await;
    assert_eq!(accepted, 5);
    assert_eq!(refused, BTreeSet::from(["429 rate_limited".to_owned()]));
    // Fair share orders one user's jobs by their own sequence: no two share a place.
    let conn = t.db.pool.get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT count(*), count(DISTINCT fair_key) FROM generation_jobs WHERE user_id = 'eager'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (5, 5));
}

async fn jobs_of(t: &TestApp, user_id: &str) -> i64 {
    let conn = t.db.pool.get().await.unwrap();
    conn.query_one(
        "SELECT count(*) FROM generation_jobs WHERE user_id = $1",
        &[&user_id],
    )
    .await
    .unwrap()
    .get(0)
}

trait TapUri {
    fn tap_uri(self, uri: &str) -> Self;
}

impl TapUri for lambda_http::Request {
    /// The same request with a query string, as API Gateway builds it from `rawQueryString`.
    fn tap_uri(mut self, uri: &str) -> Self {
        *self.uri_mut() = uri.parse().unwrap();
        self
    }
}
