//! Completion webhooks to clients (the `webhook_deliveries` repository and its sender).
//!
//! A job created with `webhookUrl` gets one event per terminal state, recorded by a trigger in
//! the same transaction as the transition. The sender POSTs the job's status body, signed as
//! Standard Webhooks does: `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
//! under the deployment's WEBHOOK_SECRET, with `webhook-id` (the event id: the same on every
//! retry, so receivers drop repeats) and `webhook-timestamp` (signed, so a replay is detectable).
//! Failed attempts are retried with backoff; after the last one the event is given up.
//!
//! The URL is the user's, so before every request it is vetted: https only, every address its
//! host resolves to must be public (no loopback, private, link-local, unique-local, CGNAT,
//! multicast or IPv4-mapped/translated IPv6), the connection is pinned to the vetted addresses
//! so DNS cannot change between check and use, and redirects are never followed.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aws_lc_rs::hmac;
use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::json;
use uuid::Uuid;

use crate::{config::Secret, model::Identity, model::JobStatus, telemetry::chain, App};

/// Attempts before an event is given up: about 5 s, 10 s, 20 s, ... 640 s apart.
pub const MAX_ATTEMPTS: i32 = 8;
const BATCH: i64 = 50;
const ATTEMPT_LEASE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("job repository error")]
    Jobs(#[from] crate::jobs::JobsError),
}

/// Deletes up to `limit` events delivered or given up more than `days` ago; returns how many.
pub async fn purge(db: &impl GenericClient, days: u32, limit: i64) -> Result<u64, WebhookError> {
    let stmt = db.prepare_cached(include_str!("purge.sql")).await?;
    Ok(db.execute(&stmt, &[&(days as i32), &limit]).await?)
}

/// Why a URL may not be called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub secret: Secret,
    /// Hosts (`host` or `host:port`) exempt from the https and public-address rules: local
    /// receivers in tests only.
    pub allow_hosts: Vec<String>,
}

impl WebhookSettings {
    fn allowed(&self, url: &reqwest::Url) -> bool {
        let host = url.host_str().unwrap_or_default();
        let with_port = format!("{host}:{}", url.port_or_known_default().unwrap_or(0));
        self.allow_hosts
            .iter()
            .any(|h| h == host || *h == with_port)
    }
}

/// Checks what can be checked without DNS: at enqueue, so a bad URL is refused at once.
pub fn check_url(settings: &WebhookSettings, raw: &str) -> Result<reqwest::Url, Refused> {
    if raw.len() > 2048 {
        return Err(Refused("webhookUrl is longer than 2048 characters".into()));
    }
    let url = reqwest::Url::parse(raw).map_err(|e| Refused(format!("webhookUrl: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused("webhookUrl may not carry credentials".into()));
    }
    let host = url
        .host()
        .ok_or_else(|| Refused("webhookUrl has no host".into()))?;
    if settings.allowed(&url) {
        return Ok(url);
    }
    if url.scheme() != "https" {
        return Err(Refused("webhookUrl must be https".into()));
    }
    let literal = match host {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = literal {
        refuse_non_public(ip)?;
    }
    Ok(url)
}

/// Refuses every address that is not plainly public.
pub fn refuse_non_public(ip: IpAddr) -> Result<(), Refused> {
    let why = match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    };
    match why {
        Some(reason) => Err(Refused(format!("{ip} is {reason}"))),
        None => Ok(()),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address (cloud metadata lives here)")
    } else if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("not a unicast address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (CGNAT) address")
    } else if ip.is_documentation() || (a == 198 && (b == 18 || b == 19)) || (a == 192 && b == 0) {
        Some("a reserved address")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped address")
    } else if segments[..6] == [0, 0, 0, 0, 0, 0] {
        Some("an IPv4-compatible address")
    } else if segments[0] == 0x64 && segments[1] == 0xff9b {
        Some("an IPv4-translated (NAT64) address")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("a unique-local address")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("not a unicast address")
    } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
        Some("a documentation address")
    } else {
        None
    }
}

/// Resolves the URL's host and vets every address it gives. Answers the addresses to pin.
pub async fn vet(
    settings: &WebhookSettings,
    url: &reqwest::Url,
) -> Result<Vec<SocketAddr>, Refused> {
    let host = url.host_str().ok_or_else(|| Refused("no host".into()))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Refused(format!("{host} does not resolve: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Refused(format!("{host} does not resolve")));
    }
    if !settings.allowed(url) {
        for addr in &addrs {
            refuse_non_public(addr.ip()).map_err(|r| Refused(format!("{host} resolves to {r}")))?;
        }
    }
    Ok(addrs)
}

/// The signature header's value for one event.
pub fn sign(secret: &Secret, event_id: Uuid, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(format!("{event_id}.{timestamp}.").as_bytes());
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign()))
}

/// What a receiver does: checks the signature in constant time and refuses a timestamp more
/// than `tolerance` from `now` (a replay). Kept here so the documented scheme is tested.
pub fn verify(
    secret: &Secret,
    event_id: &str,
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: DateTime<Utc>,
    tolerance: Duration,
) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return false;
    };
    if (now.timestamp() - ts).unsigned_abs() > tolerance.as_secs() {
        return false;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let message = [format!("{event_id}.{ts}.").as_bytes(), body].concat();
    signature.split(' ').any(|candidate| {
        candidate
            .strip_prefix("v1,")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .is_some_and(|tag| hmac::verify(&key, &message, &tag).is_ok())
    })
}

struct Due {
    event_id: Uuid,
    job_id: Uuid,
    status: JobStatus,
    url: String,
    attempts: i32,
    created_at: DateTime<Utc>,
    owner: Identity,
}

/// Sends every due event (only `job`'s, when given). Answers how many were delivered.
pub async fn deliver_due(app: &App, job: Option<Uuid>) -> Result<usize, WebhookError> {
    let Some(settings) = &app.config.webhooks else {
        return Ok(0);
    };
    let mut delivered = 0;
    loop {
        let due = {
            let db = app.pool.get().await?;
            claim_due(&db, job).await?
        };
        let taken = due.len();
        for event in due {
            if deliver(app, settings, event).await? {
                delivered += 1;
            }
        }
        if (taken as i64) < BATCH {
            return Ok(delivered);
        }
    }
}

/// Best effort right after a transition, so the client hears at once; the poller retries.
pub async fn deliver_now(app: &App, job: Uuid) {
    if let Err(e) = deliver_due(app, Some(job)).await {
        tracing::warn!(job_id = %job, error = %chain(&e), "webhook delivery failed; the poller retries it");
    }
}

async fn claim_due(db: &impl GenericClient, job: Option<Uuid>) -> Result<Vec<Due>, WebhookError> {
    let stmt = db.prepare_cached(include_str!("claim_due.sql")).await?;
    let rows = db
        .query(&stmt, &[&BATCH, &ATTEMPT_LEASE.as_secs_f64(), &job])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                event_id: r.try_get("event_id")?,
                job_id: r.try_get("job_id")?,
                status: r.try_get("status")?,
                url: r.try_get("url")?,
                attempts: r.try_get("attempts")?,
                created_at: r.try_get("created_at")?,
                owner: Identity {
                    user_id: r.try_get("user_id")?,
                    tenant_id: r.try_get("tenant_id")?,
                },
            })
        })
        .collect()
}

/// One attempt at one event. True when the receiver took it.
async fn deliver(app: &App, settings: &WebhookSettings, event: Due) -> Result<bool, WebhookError> {
    let outcome = attempt(app, settings, &event).await;
    let db = app.pool.get().await?;
    match outcome {
        Ok(()) => {
            let stmt = db.prepare_cached(include_str!("delivered.sql")).await?;
            db.execute(&stmt, &[&event.event_id]).await?;
            tracing::info!(job_id = %event.job_id, event_id = %event.event_id, attempt = event.attempts, "webhook delivered");
            Ok(true)
        }
        Err(reason) => {
            let delay = crate::worker::retry_delay(event.attempts);
            let stmt = db.prepare_cached(include_str!("retry.sql")).await?;
            db.execute(
                &stmt,
                &[
                    &event.event_id,
                    &reason,
                    &delay.as_secs_f64(),
                    &MAX_ATTEMPTS,
                ],
            )
            .await?;
            tracing::warn!(job_id = %event.job_id, event_id = %event.event_id, attempt = event.attempts,
                error = %reason, given_up = event.attempts >= MAX_ATTEMPTS, "webhook not delivered");
            Ok(false)
        }
    }
}

async fn attempt(app: &App, settings: &WebhookSettings, event: &Due) -> Result<(), String> {
    let url = check_url(settings, &event.url).map_err(|r| r.0)?;
    let addrs = vet(settings, &url).await.map_err(|r| r.0)?;
    let data = {
        let db = app.pool.get().await.map_err(|e| chain(&e))?;
        crate::api::status_body(
            &db,
            event.job_id,
            &event.owner,
            app.config.max_concurrent_jobs,
        )
        .await
        .map_err(|e| chain(&e))?
    };
    let body = serde_json::to_vec(&json!({
        "id": event.event_id,
        "type": format!("job.{}", event.status.as_str()),
        "createdAt": event.created_at,
        "data": data,
    }))
    .expect("webhook bodies serialise");
    let timestamp = Utc::now().timestamp();
    let host = url.host_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .resolve_to_addrs(&host, &addrs)
        .build()
        .map_err(|e| chain(&e))?;
    let response = client
        .post(url.clone())
        .header("content-type", "application/json")
        .header("user-agent", "media-jobs-webhooks/1")
        .header("webhook-id", event.event_id.to_string())
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            sign(&settings.secret, event.event_id, timestamp, &body),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "the receiver did not answer in time".to_owned()
            } else {
                "could not reach the receiver".to_owned()
            }
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.is_redirection() {
        Err(format!(
            "the receiver answered {status}; redirects are not followed"
        ))
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        refuse_non_public(ip.parse().unwrap()).is_err()
    }

    #[test]
    fn only_public_unicast_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(refused(bad), "{bad} passed");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
        ] {
            assert!(!refused(good), "{good} refused");
        }
    }

    #[test]
    fn a_signature_verifies_only_for_its_body_id_and_a_recent_timestamp() {
        let secret = Secret::new("whsec-test");
        let id = Uuid::now_v7();
        let now = Utc::now();
        let ts = now.timestamp();
        let sig = sign(&secret, id, ts, b"{\"a\":1}");
        let tolerance = Duration::from_secs(300);
        let ok = |body: &[u8], id: &str, ts: &str, at| {
            verify(&secret, id, ts, body, &sig, at, tolerance)
        };
        assert!(ok(b"{\"a\":1}", &id.to_string(), &ts.to_string(), now));
        assert!(!ok(b"{\"a\":2}", &id.to_string(), &ts.to_string(), now));
        assert!(!ok(
            b"{\"a\":1}",
            &Uuid::now_v7().to_string(),
            &ts.to_string(),
            now
        ));
        assert!(!ok(
            b"{\"a\":1}",
            &id.to_string(),
            &(ts + 1).to_string(),
            now
        ));
        // The same message ten minutes later is a replay.
        assert!(!ok(
            b"{\"a\":1}",
            &id.to_string(),
            &ts.to_string(),
            now + chrono::Duration::minutes(10)
        ));
    }
}
