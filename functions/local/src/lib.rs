//! The local runner: the whole service in one process. It serves the API (verifying bearer
//! tokens itself, as API Gateway's JWT authorizer would), runs the worker (embedded queue, or an
//! SQS queue fed to the same handler as Lambda's event source mapping would), runs the poller
//! every minute, and serves stored media under `/media`.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use lambda_http::{http, Body};
use shared::{
    api::{self, ApiError},
    auth::{Claims, LocalVerifier},
    queue::Dispatcher,
    telemetry::chain,
    App, Config,
};
use tokio::{net::TcpListener, sync::watch};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/media_jobs";

/// Configuration with the local runner's defaults under the environment: the local Postgres,
/// the simulator, media served by this process.
pub fn config_from_env(port: u16) -> Result<Config, shared::config::ConfigError> {
    Config::from_lookup(|name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| match name {
                "DATABASE_URL" => Some(DEFAULT_DATABASE_URL.into()),
                "GENERATOR" => Some("simulator".into()),
                "PUBLIC_BASE_URL" => Some(format!("http://127.0.0.1:{port}")),
                // The status route checks waiting provider jobs as the board polls; the poller
                // here need not linger, so stopping the runner stays quick.
                "POLLER_CHECK_WINDOW_SECONDS" => Some("0".into()),
                _ => None,
            })
    })
}

/// A running local service.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts the API server on `listener` plus the worker loop and the poller, which runs every
/// `poll_every` (a minute, like the EventBridge schedule, unless `POLL_INTERVAL_SECONDS` says).
pub fn start(
    app: App,
    verifier: Arc<LocalVerifier>,
    listener: TcpListener,
    poll_every: Duration,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let (shutdown, _) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve(app.clone(), verifier, listener, shutdown.subscribe())),
        tokio::spawn(run_worker(app.clone(), shutdown.subscribe())),
        tokio::spawn(run_poller(app, poll_every, shutdown.subscribe())),
    ];
    Ok(Running {
        addr,
        shutdown,
        tasks,
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve(
    app: App,
    verifier: Arc<LocalVerifier>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let stop = stopped(shutdown);
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let app = app.clone();
        let verifier = verifier.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                let verifier = verifier.clone();
                async move { Ok::<_, Infallible>(route(&app, &verifier, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
}

async fn route(
    app: &App,
    verifier: &LocalVerifier,
    req: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if let Some(key) = path.strip_prefix("/media/") {
        return media(app.config.media_dir.clone(), key).await;
    }
    if let Some(page) = board(&path) {
        return page;
    }
    let (parts, body) = req.into_parts();
    // One byte over the cap is enough to know the body is too large.
    let bytes = match Limited::new(body, api::MAX_BODY_BYTES + 1).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return to_hyper(ApiError::PayloadTooLarge.into_response()),
    };
    let body = if bytes.is_empty() {
        Body::Empty
    } else {
        Body::Binary(bytes.to_vec())
    };
    let request = lambda_http::Request::from_parts(parts, body);
    // Health and the API document are public; a provider callback carries its own per-job token instead of a JWT.
    let public = ["/api/health", "/api/openapi.json"].contains(&path.as_str());
    let request = if public || path.starts_with("/api/webhooks/") {
        request
    } else {
        match verifier.authorize(request).await {
            Ok(authorized) => authorized,
            Err(e) => {
                tracing::debug!(error = %chain(&e), "request refused");
                return to_hyper(ApiError::Unauthorized.into_response());
            }
        }
    };
    to_hyper(api::handle(app, request).await)
}

fn to_hyper(response: http::Response<Body>) -> http::Response<Full<Bytes>> {
    let (parts, body) = response.into_parts();
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Text(t) => Bytes::from(t),
        Body::Binary(b) => Bytes::from(b),
        _ => Bytes::new(),
    };
    http::Response::from_parts(parts, Full::new(bytes))
}

/// The job board (`/` and `/board/*`), compiled in so the runner serves it from anywhere.
fn board(path: &str) -> Option<http::Response<Full<Bytes>>> {
    let (body, mime): (&'static str, &str) = match path {
        "/" | "/index.html" => (
            include_str!("../board/index.html"),
            "text/html; charset=utf-8",
        ),
        "/board/board.js" => (
            include_str!("../board/board.js"),
            "text/javascript; charset=utf-8",
        ),
        "/board/api.js" => (
            include_str!("../board/api.js"),
            "text/javascript; charset=utf-8",
        ),
        "/board/use-job-status.js" => (
            include_str!("../board/use-job-status.js"),
            "text/javascript; charset=utf-8",
        ),
        "/board/board.css" => (
            include_str!("../board/board.css"),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    Some(
        http::Response::builder()
            .header("content-type", mime)
            .header("cache-control", "no-cache")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts are valid"),
    )
}

async fn media(dir: PathBuf, key: &str) -> http::Response<Full<Bytes>> {
    // Keys are `<uuid>/<attempt>-<n>.<ext>`: anything else, `..` included, is not ours to serve.
    let safe = !key.is_empty()
        && key.split('/').count() == 2
        && key
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.'))
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/'));
    let found = if safe {
        tokio::fs::read(dir.join(key)).await.ok()
    } else {
        None
    };
    let Some(bytes) = found else {
        return to_hyper(
            ApiError::NotFound {
                code: "media_not_found",
                message: "no such media".into(),
            }
            .into_response(),
        );
    };
    let mime = match key.rsplit('.').next() {
        Some("png") => "image/png",
        Some("webm") => "video/webm",
        Some("mp4") => "video/mp4",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    };
    http::Response::builder()
        .header("content-type", mime)
        .header("cache-control", "public, max-age=31536000, immutable")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts are valid")
}

async fn run_worker(app: App, shutdown: watch::Receiver<bool>) {
    match app.queue.clone() {
        Dispatcher::Embedded { local } => {
            shared::worker::run_embedded(app, local, stopped(shutdown)).await
        }
        Dispatcher::Sqs { client, queue_url } => {
            let stop = stopped(shutdown);
            tokio::pin!(stop);
            loop {
                // Only the wait for messages is cut short by a stop: a batch received is
                // handled to its end, so no job is left half run.
                let received = tokio::select! {
                    received = shared::worker::receive_sqs(&client, &queue_url, Duration::from_secs(20)) => received,
                    _ = &mut stop => return,
                };
                let handled = match received {
                    Ok(messages) => {
                        let handling =
                            shared::worker::handle_received(&app, &client, &queue_url, messages);
                        tokio::pin!(handling);
                        tokio::select! {
                            handled = &mut handling => handled,
                            _ = &mut stop => {
                                // The batch's jobs finish, but none starts after them: the
                                // next in line gets a message instead. Capped at a lease's
                                // length, so that a hung job cannot hold the stop forever.
                                app.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
                                match tokio::time::timeout(app.config.job_lease, handling).await {
                                    Ok(Err(e)) => tracing::warn!(error = %chain(&e), "deleting the last batch's messages failed; they come back"),
                                    Ok(Ok(_)) => {}
                                    Err(_) => tracing::warn!("stopped waiting for running jobs after a lease's time; they run again once their leases run out"),
                                }
                                return;
                            }
                        }
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = handled {
                    tracing::warn!(error = %chain(&e), "SQS receive or delete failed; retrying shortly");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = &mut stop => return,
                    }
                }
            }
        }
    }
}

async fn run_poller(app: App, every: Duration, shutdown: watch::Receiver<bool>) {
    let stop = stopped(shutdown);
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let mut event = lambda_http::aws_lambda_events::eventbridge::EventBridgeEvent::default();
                event.detail_type = "Scheduled Event".into();
                event.source = "local.runner".into();
                event.detail = serde_json::json!({});
                if let Err(e) = shared::poller::handle_schedule(&app, event).await {
                    tracing::warn!(error = %chain(&e), "poller tick failed");
                }
            }
            _ = &mut stop => return,
        }
    }
}

/// A token for the local runner's demo user, valid for 30 days (HS256 verifiers only).
pub fn demo_token(verifier: &LocalVerifier, user: &str, tenant: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    verifier
        .issue(&Claims {
            sub: user.into(),
            tenant_id: tenant.map(Into::into),
            exp: now + 30 * 86_400,
            iat: Some(now),
            iss: verifier.issuer().map(Into::into),
            aud: verifier
                .audience()
                .and_then(|a| a.first())
                .map(|a| a.clone().into()),
            ..Claims::default()
        })
        .expect("HS256 signing with an in-memory key cannot fail")
}
