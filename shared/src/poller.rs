//! The scheduled poller (EventBridge, every minute): finishes jobs a provider works on (see
//! `provider`), rescues jobs whose worker stopped renewing its lease, re-sends messages that were never sent or were lost (the outbox), and reports how
//! many jobs are in each state.

use std::collections::BTreeMap;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;

use crate::{
    jobs::{self, ExpiredLease},
    telemetry::chain,
    worker::backoff,
    App,
};

/// Expired leases handled per page; the rescuer pages until none are left.
const RESCUE_PAGE: i64 = 100;
/// Messages re-sent per tick at most; the rest wait for the next tick.
const OUTBOX_BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("job repository error")]
    Jobs(#[from] jobs::JobsError),
}

/// What one tick did, as logged and returned.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub jobs: BTreeMap<&'static str, i64>,
    pub rescued: u32,
    pub rescue_failed: u32,
    pub redispatched: u32,
    /// Checks of jobs the provider is working on.
    pub provider_checks: u32,
    /// Completion webhooks delivered (first tries that failed, and events of rescued jobs).
    pub webhooks_delivered: u32,
    /// Settled jobs and settled webhook events deleted, being past their retention.
    pub purged_jobs: u32,
    pub purged_webhooks: u32,
}

pub async fn handle_schedule(
    app: &App,
    event: EventBridgeEvent<serde_json::Value>,
) -> Result<Report, PollerError> {
    handle_schedule_until(app, event, None).await
}

/// What a tick keeps of its invocation for its own work after the provider checks: webhooks,
/// the purge, the counts and the report.
const TICK_MARGIN: std::time::Duration = std::time::Duration::from_secs(15);

/// [`handle_schedule`] within an invocation that ends at `deadline`. Provider checks still
/// under way `TICK_MARGIN` before it are cut off (each job is taken again once its check's
/// lease runs out): a check held up by a slow provider must not time the whole tick out and
/// lose its webhooks and its report (whose absence is what `PollerMissingAlarm` watches for).
pub async fn handle_schedule_until(
    app: &App,
    event: EventBridgeEvent<serde_json::Value>,
    deadline: Option<std::time::Instant>,
) -> Result<Report, PollerError> {
    let (rescued, rescue_failed) = rescue(app, Utc::now()).await?;
    // Expired leases found this tick: the jobs that were stuck past their lease.
    let expired = rescued + rescue_failed;
    let redispatched = match &app.queue {
        // The embedded claimer reads the table itself: there are no messages to lose.
        crate::queue::Dispatcher::Embedded { .. } => 0,
        crate::queue::Dispatcher::Sqs { .. } => redispatch(app).await?,
    };
    // A provider outage must not stop the rescue and the outbox above from being reported.
    let follow = crate::provider::follow(app, app.config.provider.poll_window);
    let followed = match deadline {
        Some(end) => {
            let cut = crate::worker::margin_before(end, TICK_MARGIN);
            tokio::time::timeout_at(cut, follow).await.ok()
        }
        None => Some(follow.await),
    };
    let provider_checks = match followed {
        Some(Ok(n)) => n as u32,
        Some(Err(e)) => {
            tracing::error!(error = %chain(&e), "checking provider jobs failed");
            0
        }
        None => {
            tracing::warn!("provider checks still under way were cut off to finish the tick; their jobs are checked again once their checks' leases run out");
            0
        }
    };
    let webhooks_delivered = match crate::webhooks::deliver_due(app, None).await {
        Ok(n) => n as u32,
        Err(e) => {
            tracing::error!(error = %chain(&e), "delivering webhooks failed");
            0
        }
    };
    let conn = app.pool.get().await?;
    let purged = crate::idempotency::purge(&conn, 1_000).await?;
    if purged > 0 {
        tracing::info!(purged, "expired idempotency keys deleted");
    }
    let (purged_jobs, purged_webhooks) = purge_past_retention(app, &conn).await;
    let counts = jobs::count_by_status(&conn).await?;
    let report = Report {
        jobs: counts
            .into_iter()
            .map(|(status, n)| (status.as_str(), n))
            .collect(),
        rescued,
        rescue_failed,
        redispatched,
        provider_checks,
        webhooks_delivered,
        purged_jobs,
        purged_webhooks,
    };
    app.metrics.poller_tick(&crate::metrics::PollerTick {
        active: report.jobs.get("processing").copied().unwrap_or(0),
        queued: report.jobs.get("queued").copied().unwrap_or(0),
        expired,
        rescued,
        rescue_failed,
        redispatched,
    });
    tracing::info!(
        event_id = event.id.as_deref().unwrap_or(""),
        ?report,
        "poller tick"
    );
    Ok(report)
}

/// Rows deleted per tick at most, by each purge; the rest wait for the next tick.
const PURGE_BATCH: i64 = 1_000;

/// Deletes settled jobs and webhook events past their retention. A failure is logged and left
/// to the next tick: it must not cost this one its counts and report.
async fn purge_past_retention(app: &App, conn: &deadpool_postgres::Object) -> (u32, u32) {
    let retention = app.config.retention;
    let mut jobs = 0;
    if let Some(days) = retention.jobs {
        match jobs::purge_settled(conn, days, PURGE_BATCH).await {
            Ok(purged) => {
                app.store.remove_local(&purged.local_keys).await;
                jobs = purged.jobs as u32;
                if jobs > 0 {
                    tracing::info!(jobs, days, "settled jobs past their retention deleted");
                }
            }
            Err(e) => tracing::error!(error = %chain(&e), "purging settled jobs failed"),
        }
    }
    let mut webhooks = 0;
    if let Some(days) = retention.webhooks {
        match crate::webhooks::purge(conn, days, PURGE_BATCH).await {
            Ok(n) => {
                webhooks = n as u32;
                if webhooks > 0 {
                    tracing::info!(
                        webhooks,
                        days,
                        "settled webhook events past their retention deleted"
                    );
                }
            }
            Err(e) => tracing::error!(error = %chain(&e), "purging webhook events failed"),
        }
    }
    (jobs, webhooks)
}

/// What to do with a job whose lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rescue {
    /// Queue it again, to be claimed no earlier than `run_after`.
    Retry {
        run_after: DateTime<Utc>,
        reason: String,
    },
    /// Its last allowed attempt is spent.
    Fail { reason: String },
}

/// Decides a rescue. Pure: the clock and the jitter are given, so it can be tested exactly.
pub fn decide(lease: &ExpiredLease, now: DateTime<Utc>, jitter: f64) -> Rescue {
    let lost = format!(
        "attempt {} stopped renewing its lease (expired {})",
        lease.attempts,
        lease
            .lease_expires_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    if lease.attempts < lease.max_attempts {
        let wait = chrono::Duration::from_std(backoff(lease.attempts, jitter)).unwrap_or_default();
        Rescue::Retry {
            run_after: now + wait,
            reason: lost,
        }
    } else {
        Rescue::Fail {
            reason: format!("gave up after {} attempts: {lost}", lease.attempts),
        }
    }
}

/// Pages through the leases that expired before `now`, re-queuing or failing each job. Returns
/// (re-queued, failed). Every write is guarded by attempt and expiry, so a worker that renewed
/// in the meantime, or another poller, wins.
pub async fn rescue(app: &App, now: DateTime<Utc>) -> Result<(u32, u32), PollerError> {
    let conn = app.pool.get().await?;
    let (mut requeued, mut failed) = (0, 0);
    let mut cursor = None;
    loop {
        let page = jobs::expired_leases(&conn, now, cursor, RESCUE_PAGE).await?;
        for lease in &page {
            let jitter = rand::thread_rng().gen_range(0.0..=1.0);
            match decide(lease, now, jitter) {
                Rescue::Retry { run_after, reason } => {
                    if jobs::rescue_requeue(&conn, lease, &reason, run_after).await? {
                        requeued += 1;
                        tracing::warn!(job_id = %lease.id, attempt = lease.attempts, "lease expired; job queued again");
                        let delay = (run_after - Utc::now()).to_std().unwrap_or_default();
                        // If this send fails the outbox sends it later: the job is queued.
                        if let Err(e) = app.queue.dispatch(lease.id, delay).await {
                            tracing::warn!(job_id = %lease.id, error = %chain(&e), "rescued job not dispatched yet");
                        }
                    }
                }
                Rescue::Fail { reason } => {
                    if jobs::rescue_fail(&conn, lease, &reason).await? {
                        failed += 1;
                        tracing::warn!(job_id = %lease.id, attempt = lease.attempts, "lease expired on the last attempt; job failed");
                    }
                }
            }
        }
        if (page.len() as i64) < RESCUE_PAGE {
            return Ok((requeued, failed));
        }
        cursor = page.last().map(|l| (l.lease_expires_at, l.id));
    }
}

/// The outbox: re-sends the messages of queued jobs that have waited past the grace period
/// without being claimed. A duplicate is harmless: only one delivery can claim the job.
pub async fn redispatch(app: &App) -> Result<u32, PollerError> {
    let conn = app.pool.get().await?;
    let ids = jobs::take_undispatched(&conn, app.config.outbox_grace, OUTBOX_BATCH).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    match app.queue.dispatch_batch(&ids).await {
        Ok(sent) => {
            tracing::info!(sent, "outbox re-sent job messages");
            Ok(sent as u32)
        }
        Err(e) => {
            // They stay queued and are taken again after the grace period.
            tracing::warn!(error = %chain(&e), jobs = ids.len(), "outbox could not send; will retry");
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn lease(attempts: i32, max_attempts: i32) -> ExpiredLease {
        ExpiredLease {
            id: Uuid::nil(),
            attempts,
            max_attempts,
            lease_expires_at: DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
                .unwrap()
                .into(),
        }
    }

    #[test]
    fn an_expired_lease_with_attempts_left_is_retried_after_its_backoff() {
        let now: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-30T10:05:00Z")
            .unwrap()
            .into();
        let Rescue::Retry { run_after, reason } = decide(&lease(2, 3), now, 1.0) else {
            panic!("expected a retry")
        };
        assert_eq!(run_after, now + chrono::Duration::seconds(10));
        assert_eq!(
            reason,
            "attempt 2 stopped renewing its lease (expired 2026-11-30T10:00:00Z)"
        );
    }

    #[test]
    fn an_expired_lease_on_the_last_attempt_fails_the_job() {
        let now = Utc::now();
        assert_eq!(
            decide(&lease(3, 3), now, 0.0),
            Rescue::Fail {
                reason: "gave up after 3 attempts: attempt 3 stopped renewing its lease (expired 2026-11-30T10:00:00Z)"
                    .into()
            }
        );
    }
}
