//! The HTTP API, shared by the enqueue and status functions and the local runner. Handlers
//! never fail: every error becomes a JSON body `{"error": {"code", "message"}}` with one status
//! mapping, and internal errors are logged with their whole cause chain and answered opaquely.

use std::error::Error as StdError;

use chrono::{DateTime, Utc};
use lambda_http::{http::StatusCode, Body, Request, Response};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    auth,
    drive::{Drive, DriveError, Grant},
    idempotency,
    jobs::{self, NewJob},
    model::{Identity, JobStatus, JobType, Media},
    telemetry::chain,
    App,
};

/// Requests larger than this are refused before parsing.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_PROMPT_CHARS: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication required")]
    Unauthorized,
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    PayloadTooLarge,
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
    #[error("the database is unavailable")]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn StdError + Send + Sync>),
}

impl ApiError {
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn internal(e: impl StdError + Send + Sync + 'static) -> Self {
        ApiError::Internal(Box::new(e))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadRequest { code, .. }
            | ApiError::NotFound { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::TooManyRequests { code, .. } => code,
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        if let ApiError::Internal(_) | ApiError::Unavailable(_) = &self {
            tracing::error!(error = %chain(&self), "request failed");
        }
        let mut response = json_response(
            self.status(),
            &json!({ "error": { "code": self.code(), "message": self.to_string() } }),
        );
        let retry_after = match self {
            // Outages here are restarts and failovers: seconds, not minutes.
            ApiError::Unavailable(_) => Some(2),
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", lambda_http::http::HeaderValue::from(secs));
        }
        response
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Unavailable(Box::new(e))
    }
}

impl From<DriveError> for ApiError {
    fn from(e: DriveError) -> Self {
        match e {
            DriveError::Revoked(_) | DriveError::Rejected { .. } | DriveError::Sealed => {
                ApiError::Unprocessable {
                    code: "drive_grant_rejected",
                    message: e.to_string(),
                }
            }
            DriveError::NotConnected => ApiError::bad("CONNECT_DRIVE_REQUIRED", e.to_string()),
            DriveError::Unavailable(_) | DriveError::Pool(_) => ApiError::Unavailable(Box::new(e)),
            DriveError::Db(_) => ApiError::internal(e),
        }
    }
}

impl From<crate::worker::WorkerError> for ApiError {
    fn from(e: crate::worker::WorkerError) -> Self {
        use crate::worker::WorkerError;
        match e {
            WorkerError::Pool(_) => ApiError::Unavailable(Box::new(e)),
            WorkerError::Jobs(ref j) if j.is_unavailable() => ApiError::Unavailable(Box::new(e)),
            _ => ApiError::internal(e),
        }
    }
}

impl From<jobs::JobsError> for ApiError {
    fn from(e: jobs::JobsError) -> Self {
        if let jobs::JobsError::Refused(refusal) = &e {
            let message = refusal.to_string();
            return match refusal {
                jobs::Refusal::RateLimited { retry_after, .. } => ApiError::TooManyRequests {
                    code: "rate_limited",
                    message,
                    retry_after_secs: retry_after.as_secs_f64().ceil() as u64,
                },
                jobs::Refusal::QueueFull { .. } => ApiError::TooManyRequests {
                    code: "too_many_queued",
                    message,
                    // A queued job starts (or is cancelled) in about a run time.
                    retry_after_secs: 30,
                },
            };
        }
        if e.is_unavailable() {
            ApiError::Unavailable(Box::new(e))
        } else {
            ApiError::internal(e)
        }
    }
}

pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_string(body).expect("response bodies always serialise");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Body::Text(body))
        .expect("static response parts are valid")
}

/// Every route the router serves, as API Gateway route keys (the template's routes must match).
pub const ROUTES: &[&str] = &[
    "POST /api/generate/character",
    "POST /api/generate/moodboard",
    "POST /api/generate/animation",
    "GET /api/generate/status/{jobId}",
    "POST /api/generate/cancel/{jobId}",
    "DELETE /api/jobs/{jobId}",
    "GET /api/jobs",
    "GET /api/health",
    "GET /api/openapi.json",
    "POST /api/webhooks/modelslab/{jobId}",
    "GET /api/drive/connection",
    "PUT /api/drive/connection",
    "DELETE /api/drive/connection",
];

/// Routes one request. Used as is by both HTTP functions and the local runner; API Gateway only
/// sends each function its own routes, and anything else is answered here as a 404.
pub async fn handle(app: &App, req: Request) -> Response<Body> {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        user_id = tracing::field::Empty,
        job_id = tracing::field::Empty
    );
    route(app, req).instrument(span).await
}

async fn route(app: &App, req: Request) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let result = match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "health"]) => health(app).await,
        ("GET", ["api", "openapi.json"]) => Ok(openapi()),
        ("POST", ["api", "generate", kind]) if *kind != "status" => enqueue(app, &req, kind).await,
        ("GET", ["api", "generate", "status", job_id]) => status(app, &req, job_id).await,
        ("POST", ["api", "generate", "cancel", job_id]) | ("DELETE", ["api", "jobs", job_id]) => {
            cancel(app, &req, job_id).await
        }
        ("POST", ["api", "webhooks", "modelslab", job_id]) => {
            provider_callback(app, &req, job_id).await
        }
        ("GET", ["api", "jobs"]) => list(app, &req).await,
        ("GET", ["api", "drive", "connection"]) => drive_status(app, &req).await,
        ("PUT", ["api", "drive", "connection"]) => drive_connect(app, &req).await,
        ("DELETE", ["api", "drive", "connection"]) => drive_disconnect(app, &req).await,
        (_, ["api", "health"])
        | (_, ["api", "openapi.json"])
        | (_, ["api", "webhooks", "modelslab", _])
        | (_, ["api", "drive", "connection"])
        | (_, ["api", "jobs"])
        | (_, ["api", "generate", "status", _])
        | (_, ["api", "generate", "cancel", _])
        | (_, ["api", "jobs", _])
        | (_, ["api", "generate", _]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound {
            code: "route_not_found",
            message: format!("no route for {method} {path}"),
        }),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// The OpenAPI 3.1 document for every route here.
pub const OPENAPI: &str = include_str!("openapi.json");

fn openapi() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("cache-control", "public, max-age=300")
        .body(Body::Text(OPENAPI.to_owned()))
        .expect("a static response builds")
}

async fn health(app: &App) -> Result<Response<Body>, ApiError> {
    let conn = app.pool.get().await?;
    conn.simple_query("SELECT 1")
        .await
        .map_err(|e| ApiError::Unavailable(Box::new(e)))?;
    Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })))
}

fn caller(req: &Request) -> Result<Identity, ApiError> {
    let identity = auth::identity(req).ok_or(ApiError::Unauthorized)?;
    tracing::Span::current().record("user_id", identity.user_id.as_str());
    Ok(identity)
}

// ---- enqueue -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CharacterRequest {
    character_id: Uuid,
    image_reference_id: Option<Uuid>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    webhook_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MoodboardRequest {
    moodboard_id: Uuid,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    count: Option<u8>,
    webhook_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AnimationRequest {
    moodboard_id: Uuid,
    source_image_id: Uuid,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    webhook_url: Option<String>,
}

/// What a validated request turns into: the entity it is about and the parameters kept with it.
pub(crate) struct JobRequest {
    job_type: JobType,
    entity_id: Uuid,
    pub(crate) params: serde_json::Value,
    webhook_url: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnqueueResponse {
    job_id: Uuid,
    status: JobStatus,
    message: &'static str,
    mode: &'static str,
    position: Option<i64>,
}

async fn enqueue(app: &App, req: &Request, kind: &str) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    let key = idempotency_key(req)?;
    let mut request = parse_job_request(kind, req.body())?;
    if let Some(url) = request.webhook_url.take() {
        let settings = app
            .config
            .webhooks
            .as_ref()
            .ok_or_else(|| ApiError::Unprocessable {
                code: "webhooks_not_configured",
                message: "this deployment sends no completion webhooks".into(),
            })?;
        let url = crate::webhooks::check_url(settings, &url).map_err(|refused| {
            ApiError::Unprocessable {
                code: "webhook_url_refused",
                message: refused.to_string(),
            }
        })?;
        request.params["webhookUrl"] = json!(url.as_str());
    }
    let id = Uuid::now_v7();
    tracing::Span::current().record("job_id", tracing::field::display(id));
    if app.store.is_drive() {
        let conn = app.pool.get().await?;
        if !Drive::is_connected(&conn, &owner.user_id).await? {
            // As in the seed: the front end sends the user through Google's consent, then
            // retries.
            return Err(ApiError::bad(
                "CONNECT_DRIVE_REQUIRED",
                "connect Google Drive first: generated media are stored there",
            ));
        }
    }
    let job_type = request.job_type;
    // A task of its own, so that a request dropped mid-way (its client gone) cannot cut the
    // insert off from what must follow its commit: the hand-off of a job inserted claimed, or
    // its message.
    let admission = tokio::spawn(
        admit(app.clone(), owner.clone(), id, request, key).instrument(tracing::Span::current()),
    )
    .await
    .map_err(|e| ApiError::Internal(Box::new(e)))??;
    let response = match admission {
        Admission::New(response) => response,
        Admission::Replayed(response) => return Ok(response),
    };
    app.metrics
        .job_enqueued(job_type, response.mode == "direct");
    tracing::info!(job_id = %id, user_id = %owner.user_id, job_type = job_type.as_str(),
        mode = response.mode, "job enqueued");
    Ok(json_response(StatusCode::ACCEPTED, &response))
}

enum Admission {
    New(EnqueueResponse),
    /// A repeated `Idempotency-Key`: the answer to give.
    Replayed(Response<Body>),
}

/// Inserts the job (with its idempotency key, if any), then hands a job inserted claimed to the
/// local runner, or sends the job's message.
async fn admit(
    app: App,
    owner: Identity,
    id: Uuid,
    request: JobRequest,
    key: Option<String>,
) -> Result<Admission, ApiError> {
    let mut conn = app.pool.get().await?;
    // The embedded queue's runner has a worker free: a job given a slot is inserted claimed and
    // run at once, without waiting for a claim. Taken last, so no wait holds it.
    let local_slot = match &app.queue {
        crate::queue::Dispatcher::Embedded { local } => local.free_slot(),
        crate::queue::Dispatcher::Sqs { .. } => None,
    };
    let new = NewJob {
        id,
        owner: &owner,
        job_type: request.job_type,
        entity_id: request.entity_id,
        params: &request.params,
        max_attempts: app.config.job_max_attempts as i32,
        limits: app.config.limits(),
        quota: app.config.quota,
        start: local_slot.as_ref().map(|_| app.config.job_lease),
    };
    let admitted = match &key {
        // One statement, one commit: the common path.
        None => jobs::insert(&conn, &new).await?,
        // The job and the key commit together, or neither does.
        Some(key) => {
            let canonical = json!({ "type": request.job_type, "entityId": request.entity_id, "params": request.params });
            let tx = conn.transaction().await.map_err(jobs::JobsError::from)?;
            let admitted = jobs::insert(&tx, &new).await?;
            let body = serde_json::to_value(answer(id, &admitted)).expect("responses serialise");
            if idempotency::store(&tx, &owner, key, &canonical, id, &body).await? {
                tx.commit().await.map_err(jobs::JobsError::from)?;
                admitted
            } else {
                tx.rollback().await.map_err(jobs::JobsError::from)?;
                return Ok(Admission::Replayed(
                    replay(&conn, &owner, key, &canonical).await?,
                ));
            }
        }
    };
    drop(conn);

    // The job is committed: from here on the caller gets its id whatever happens to delivery.
    let response = answer(id, &admitted);
    match (admitted.started, local_slot) {
        (Some(claim), Some(slot)) => {
            if slot.run(claim).is_err() {
                tracing::error!(job_id = %id, "job accepted and started, but the runtime is shutting down; it runs again once its lease expires");
            }
        }
        _ => {
            if let Err(e) = app.queue.dispatch(id, std::time::Duration::ZERO).await {
                tracing::error!(job_id = %id, error = %chain(&e), "job accepted but its message was not sent; it stays queued");
            }
        }
    }
    Ok(Admission::New(response))
}

fn answer(id: Uuid, admitted: &jobs::Admitted) -> EnqueueResponse {
    if admitted.started.is_some() {
        EnqueueResponse {
            job_id: id,
            status: JobStatus::Processing,
            message: "Generating now...",
            mode: "direct",
            position: None,
        }
    } else if admitted.direct {
        EnqueueResponse {
            job_id: id,
            status: JobStatus::Queued,
            message: "Generating now...",
            mode: "direct",
            position: None,
        }
    } else {
        EnqueueResponse {
            job_id: id,
            status: JobStatus::Queued,
            message: "Added to queue...",
            mode: "queued",
            position: Some(admitted.queued_ahead + 1),
        }
    }
}

/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII characters.
fn idempotency_key(req: &Request) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(k) => Ok(Some(k.to_owned())),
        None => Err(ApiError::bad(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Answers a repeated `Idempotency-Key`: the original answer if the request is the same,
/// 422 if the key was used for a different request.
async fn replay(
    db: &impl deadpool_postgres::GenericClient,
    owner: &Identity,
    key: &str,
    canonical: &serde_json::Value,
) -> Result<Response<Body>, ApiError> {
    // The key can only be missing here if it expired between our insert and this read.
    let Some((request, response)) = idempotency::find(db, owner, key).await? else {
        return Err(ApiError::Conflict {
            code: "idempotency_key_in_flux",
            message: "retry the request".into(),
        });
    };
    if &request != canonical {
        return Err(ApiError::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was already used for a different request".into(),
        });
    }
    let mut replayed = json_response(StatusCode::ACCEPTED, &response);
    replayed.headers_mut().insert(
        "idempotent-replayed",
        lambda_http::http::HeaderValue::from_static("true"),
    );
    Ok(replayed)
}

pub(crate) fn parse_job_request(kind: &str, body: &Body) -> Result<JobRequest, ApiError> {
    let bytes: &[u8] = body.as_ref();
    if bytes.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    match kind {
        "character" => {
            let r: CharacterRequest = parse_json(bytes)?;
            Ok(JobRequest {
                job_type: JobType::CharacterImage,
                entity_id: r.character_id,
                webhook_url: r.webhook_url,
                params: json!({
                    "imageReferenceId": r.image_reference_id,
                    "prompt": checked_prompt("prompt", r.prompt)?,
                    "negativePrompt": checked_prompt("negativePrompt", r.negative_prompt)?,
                }),
            })
        }
        "moodboard" => {
            let r: MoodboardRequest = parse_json(bytes)?;
            if let Some(count) = r.count {
                if !(1..=4).contains(&count) {
                    return Err(ApiError::bad(
                        "invalid_request",
                        "count must be between 1 and 4 (the most ModelsLab makes from one request)",
                    ));
                }
            }
            Ok(JobRequest {
                job_type: JobType::Moodboard,
                entity_id: r.moodboard_id,
                webhook_url: r.webhook_url,
                params: json!({
                    "prompt": checked_prompt("prompt", r.prompt)?,
                    "negativePrompt": checked_prompt("negativePrompt", r.negative_prompt)?,
                    "count": r.count.unwrap_or(4),
                }),
            })
        }
        "animation" => {
            let r: AnimationRequest = parse_json(bytes)?;
            Ok(JobRequest {
                job_type: JobType::Animation,
                entity_id: r.moodboard_id,
                webhook_url: r.webhook_url,
                params: json!({
                    "sourceImageId": r.source_image_id,
                    "prompt": checked_prompt("prompt", r.prompt)?,
                    "negativePrompt": checked_prompt("negativePrompt", r.negative_prompt)?,
                }),
            })
        }
        _ => Err(ApiError::NotFound {
            code: "route_not_found",
            message: format!("unknown job kind {kind:?}"),
        }),
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad("invalid_request", e.to_string()),
        _ => ApiError::bad(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        ),
    })
}

fn checked_prompt(field: &str, prompt: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(prompt) = prompt
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::bad(
            "invalid_request",
            format!("{field} is longer than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    if prompt
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ApiError::bad(
            "invalid_request",
            format!("{field} contains control characters"),
        ));
    }
    Ok(Some(prompt))
}

// ---- status --------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub status: JobStatus,
    pub progress: i16,
    pub position: Option<i64>,
    /// While queued: about how long until it starts, from recent run times of its type.
    pub estimated_wait_seconds: Option<u64>,
    pub result: Option<Media>,
    pub media: Vec<Media>,
    pub error: Option<String>,
    pub attempts: i32,
    /// Every attempt's error, oldest first (a retried job keeps them all).
    pub attempt_errors: Vec<jobs::AttemptError>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// While the provider works on it: when the job was last checked with the provider.
    #[serde(skip)]
    provider_checked_at: Option<DateTime<Utc>>,
}

impl StatusResponse {
    fn check_due(&self, every: std::time::Duration) -> bool {
        self.provider_checked_at.is_some_and(|at| {
            Utc::now() - at >= chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX)
        })
    }
}

async fn status(app: &App, req: &Request, job_id: &str) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    let id = parse_job_id(job_id)?;
    let conn = app.pool.get().await?;
    let mut body = status_body(&conn, id, &owner, app.config.max_concurrent_jobs)
        .await?
        .ok_or_else(job_not_found)?;
    if body.check_due(app.config.provider.status_check_every) {
        drop(conn);
        // A failed check is the poller's to retry; this request still answers with the job.
        match crate::provider::check_on_status(app, id).await {
            Ok(Some(_)) => {
                let conn = app.pool.get().await?;
                body = status_body(&conn, id, &owner, app.config.max_concurrent_jobs)
                    .await?
                    .ok_or_else(job_not_found)?;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(job_id = %id, error = %chain(&e), "provider check failed"),
        }
    }
    Ok(json_response(StatusCode::OK, &body))
}

fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    let id = Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad("invalid_job_id", "jobId must be a UUID"))?;
    tracing::Span::current().record("job_id", tracing::field::display(id));
    Ok(id)
}

fn job_not_found() -> ApiError {
    ApiError::NotFound {
        code: "job_not_found",
        message: "no such job".into(),
    }
}

/// The job as its owner sees it; `None` for a missing job and for another user's job alike.
pub(crate) async fn status_body(
    db: &impl deadpool_postgres::GenericClient,
    id: Uuid,
    owner: &Identity,
    slots: u32,
) -> Result<Option<StatusResponse>, ApiError> {
    let Some(owned) = jobs::get_for_owner(db, id, owner).await? else {
        return Ok(None);
    };
    let job = owned.job;
    let media = if job.status == JobStatus::Completed {
        jobs::media_for_job(db, job.id).await?
    } else {
        Vec::new()
    };
    // Only a job that has met an error (failed, or needed another attempt) has errors to show.
    let attempt_errors = if job.error_message.is_some() || job.attempts > 1 {
        jobs::attempt_errors(db, job.id).await?
    } else {
        Vec::new()
    };
    let result = media
        .iter()
        .find(|m| Some(m.id) == job.result_media_id)
        .cloned();
    // While the provider works, progress is estimated from its eta; never below what was stored.
    let progress = match owned.provider_wait {
        Some(wait) => job.progress.max(crate::provider::estimate_progress(
            wait.submitted_at,
            wait.expected_at,
            Utc::now(),
        )),
        None => job.progress,
    };
    Ok(Some(StatusResponse {
        provider_checked_at: owned
            .provider_wait
            .map(|w| w.checked_at.unwrap_or(w.submitted_at)),
        id: job.id,
        job_type: job.job_type,
        status: job.status,
        progress,
        position: owned.position,
        estimated_wait_seconds: estimated_wait(owned.position, owned.recent_run_seconds, slots),
        result,
        media,
        error: if job.status == JobStatus::Failed {
            job.error_message
        } else {
            None
        },
        attempts: job.attempts,
        attempt_errors,
        created_at: job.created_at,
        started_at: job.started_at,
        completed_at: job.completed_at,
    }))
}

/// A job at `position` starts once that many jobs ahead of it have started; with `slots`
/// running at once, each taking about `run_seconds`, that is position x run / slots.
fn estimated_wait(position: Option<i64>, run_seconds: Option<f64>, slots: u32) -> Option<u64> {
    let (position, run) = (position?, run_seconds?);
    Some(
        (position as f64 * run / slots.max(1) as f64)
            .ceil()
            .max(0.0) as u64,
    )
}

// ---- list ----------------------------------------------------------------------------------

const LIST_DEFAULT: i64 = 20;
const LIST_MAX: i64 = 100;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListedJob {
    id: Uuid,
    #[serde(rename = "type")]
    job_type: JobType,
    status: JobStatus,
    progress: i16,
    result: Option<Media>,
    error: Option<String>,
    attempts: i32,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse {
    jobs: Vec<ListedJob>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The caller's jobs, newest first, keyset-paginated: a page never repeats or skips a job
/// however many are created meanwhile.
async fn list(app: &App, req: &Request) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    let mut query = jobs::ListQuery {
        limit: LIST_DEFAULT,
        ..jobs::ListQuery::default()
    };
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |what: &str| ApiError::bad("invalid_request", format!("{name}: {what}"));
        match name {
            "status" => {
                query.status = Some(JobStatus::parse(value).ok_or_else(|| {
                    bad("one of queued, processing, completed, failed, cancelled")
                })?)
            }
            "type" => {
                query.job_type = Some(
                    JobType::parse(value)
                        .ok_or_else(|| bad("one of character-image, moodboard, animation"))?,
                )
            }
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=LIST_MAX).contains(l))
                    .ok_or_else(|| bad("a whole number from 1 to 100"))?
            }
            "cursor" => {
                query.after = Some(decode_cursor(value).ok_or_else(|| {
                    ApiError::bad("invalid_cursor", "cursor is not one this service gave out")
                })?)
            }
            _ => return Err(bad("unknown query parameter")),
        }
    }
    let page = query.limit;
    query.limit = page + 1;
    let conn = app.pool.get().await?;
    let mut rows = jobs::list_for_owner(&conn, &owner, &query).await?;
    let next_cursor = if rows.len() as i64 > page {
        rows.truncate(page as usize);
        rows.last().map(|j| encode_cursor(j.created_at, j.id))
    } else {
        None
    };
    let jobs = rows
        .into_iter()
        .map(|j| ListedJob {
            id: j.id,
            job_type: j.job_type,
            status: j.status,
            progress: j.progress,
            result: j.result,
            error: if j.status == JobStatus::Failed {
                j.error_message
            } else {
                None
            },
            attempts: j.attempts,
            created_at: j.created_at,
            started_at: j.started_at,
            completed_at: j.completed_at,
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &ListResponse { jobs, next_cursor },
    ))
}

fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{id}", created_at.timestamp_micros()))
}

pub(crate) fn decode_cursor(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once('|')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

// ---- cancel --------------------------------------------------------------------------------

/// Cancels the caller's unfinished job and answers with its status. A finished job is a 409;
/// another user's job is a 404, as for status.
async fn cancel(app: &App, req: &Request, job_id: &str) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    let id = parse_job_id(job_id)?;
    let conn = app.pool.get().await?;
    let settled = jobs::cancel(&conn, id, &owner, app.config.max_active_per_user).await?;
    let cancelled = settled.applied();
    let body = status_body(&conn, id, &owner, app.config.max_concurrent_jobs)
        .await?
        .ok_or_else(job_not_found)?;
    if !cancelled && body.status != JobStatus::Cancelled {
        return Err(ApiError::Conflict {
            code: "job_finished",
            message: format!("the job is already {}", body.status.as_str()),
        });
    }
    if cancelled {
        tracing::info!(job_id = %id, user_id = %owner.user_id, "job cancelled");
        app.metrics.job_cancelled(body.job_type);
        crate::worker::nudge(app, settled).await;
        if app.config.webhooks.is_some() {
            crate::webhooks::deliver_now(app, id).await;
        }
    }
    Ok(json_response(StatusCode::OK, &body))
}

// ---- provider callbacks --------------------------------------------------------------------

/// ModelsLab's webhook. Authenticated by the per-job token in its URL (an HMAC the service alone
/// can make), not by a user's JWT; a repeat, or a callback for a job that moved on, changes
/// nothing and is still answered 200 so the provider stops.
async fn provider_callback(
    app: &App,
    req: &Request,
    job_id: &str,
) -> Result<Response<Body>, ApiError> {
    let id = parse_job_id(job_id)?;
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let attempt: Option<i32> = param("attempt").and_then(|a| a.parse().ok());
    let authentic = match (attempt, param("token")) {
        (Some(attempt), Some(token)) => {
            let secret = app.config.provider.callback_secret.as_ref();
            secret.is_some_and(|secret| crate::callbacks::verify(secret, id, attempt, token))
        }
        _ => false,
    };
    let Some(attempt) = attempt.filter(|_| authentic) else {
        tracing::warn!(job_id = %id, "provider callback with a bad token refused");
        return Err(ApiError::Unauthorized);
    };
    let body: &[u8] = req.body().as_ref();
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    let outcome = crate::provider::on_callback(app, id, attempt, body).await?;
    tracing::info!(job_id = %id, attempt, ?outcome, "provider callback");
    let outcome = match outcome {
        Some(crate::provider::Checked::Completed) => "completed",
        Some(crate::provider::Checked::Failed) => "failed",
        Some(crate::provider::Checked::Pending) => "pending",
        Some(crate::provider::Checked::HandedOff) => "collecting",
        Some(crate::provider::Checked::Superseded) | None => "ignored",
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({ "received": true, "outcome": outcome }),
    ))
}

// ---- Google Drive connection ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DriveGrantRequest {
    refresh_token: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DriveStatus {
    connected: bool,
    connected_at: Option<DateTime<Utc>>,
}

fn drive(app: &App) -> Result<&Drive, ApiError> {
    match &app.store {
        crate::storage::MediaStore::GoogleDrive(drive) => Ok(drive),
        _ => Err(ApiError::NotFound {
            code: "drive_not_configured",
            message: "this deployment stores media locally, not in Google Drive".into(),
        }),
    }
}

async fn drive_status(app: &App, req: &Request) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    drive(app)?;
    let conn = app.pool.get().await?;
    let connected_at = Drive::connected_at(&conn, &owner.user_id).await?;
    Ok(json_response(
        StatusCode::OK,
        &DriveStatus {
            connected: connected_at.is_some(),
            connected_at,
        },
    ))
}

/// Stores the user's Drive grant after the front end's OAuth consent: either the refresh token
/// it obtained or an authorization code for this service to exchange. Google is asked first, so
/// a bad grant is refused here rather than failing the user's next job.
async fn drive_connect(app: &App, req: &Request) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    let drive = drive(app)?;
    let bytes: &[u8] = req.body().as_ref();
    if bytes.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    let r: DriveGrantRequest = parse_json(bytes)?;
    let nonempty = |v: &Option<String>| {
        v.as_deref()
            .is_some_and(|s| !s.trim().is_empty() && s.len() <= 4096)
    };
    let grant = match (&r.refresh_token, &r.code, &r.redirect_uri) {
        (Some(_), None, None) if nonempty(&r.refresh_token) => {
            Grant::RefreshToken(r.refresh_token.unwrap_or_default())
        }
        (None, Some(_), Some(_)) if nonempty(&r.code) && nonempty(&r.redirect_uri) => Grant::Code {
            code: r.code.unwrap_or_default(),
            redirect_uri: r.redirect_uri.unwrap_or_default(),
        },
        _ => {
            return Err(ApiError::bad(
                "invalid_request",
                "send either refreshToken, or code with redirectUri",
            ))
        }
    };
    let conn = app.pool.get().await?;
    let connected_at = drive.connect(&conn, &owner.user_id, grant).await?;
    tracing::info!(user_id = %owner.user_id, "Google Drive connected");
    Ok(json_response(
        StatusCode::OK,
        &DriveStatus {
            connected: true,
            connected_at: Some(connected_at),
        },
    ))
}

async fn drive_disconnect(app: &App, req: &Request) -> Result<Response<Body>, ApiError> {
    let owner = caller(req)?;
    drive(app)?;
    let conn = app.pool.get().await?;
    Drive::disconnect(&conn, &owner.user_id).await?;
    tracing::info!(user_id = %owner.user_id, "Google Drive disconnected");
    Ok(json_response(
        StatusCode::OK,
        &DriveStatus {
            connected: false,
            connected_at: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn every_route_served_is_documented_and_every_documented_route_is_served() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
        let served: BTreeSet<String> = super::ROUTES.iter().map(|r| r.to_string()).collect();
        assert_eq!(served, documented);
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let text = super::OPENAPI;
        for reference in text.split("\"$ref\": \"").skip(1) {
            let target = reference.split('"').next().unwrap();
            let pointer = target.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
    }
}
