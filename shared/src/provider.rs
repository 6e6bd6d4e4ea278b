//! Jobs a provider finishes later. The worker submits them and returns at once; from then on
//! a job is followed by checks: the poller's (due at `next_check_at`), the status route's (at most
//! one per job every few seconds, however often the page polls) and the provider's callback.
//! Every check is taken with a guarded UPDATE, and every outcome is a transition fenced by the
//! attempt, so a repeated callback or two racing checks change the job once.
//!
//! A check only asks; fetching a finished job's output can take longer than a status request
//! (API Gateway's 30 s) or a poller tick may run. Behind SQS, a check that finds the output ready
//! keeps its URLs on the job and hands it to a worker with a message; the worker downloads,
//! stores and completes it. Until one has, the job is not asked about again: the poller sends
//! another message every few minutes, and a failed collection is tried again from the kept
//! output. The embedded queue's checks collect it themselves.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    generator::{Check, GenerateError, GeneratedFile},
    jobs::{self, AwaitingJob, Claimed},
    queue::Collection,
    telemetry::chain,
    worker::{nudge, WorkerError},
    App,
};

/// How long one check may take before another checker may take the job.
pub const CHECK_LEASE: Duration = Duration::from_secs(120);
/// How many waiting jobs one poller pass takes at a time, and checks at once.
const CHECK_BATCH: i64 = 50;
const CHECK_CONCURRENCY: usize = 8;

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Completed,
    Failed,
    /// Still working; checked again after the delay.
    Pending,
    /// The job moved on (cancelled, completed by a racing check) while this one ran.
    Superseded,
    /// Finished at the provider; a worker collects the output.
    HandedOff,
}

/// Where a check's answer comes from. A job already found finished (its output kept on it) is
/// not asked about again, whoever checks it.
#[derive(Debug, Clone, Copy)]
pub enum Asked<'a> {
    /// Ask the provider.
    Provider,
    /// The provider's callback body.
    Callback(&'a [u8]),
    /// A worker that took the job handed to it: collect the kept output here.
    Collector,
}

/// How long a job handed to a worker waits for one before the poller sends another message:
/// longer than a message waits in the queue while the workers are busy.
const RESEND_HANDED_IN: Duration = Duration::from_secs(300);
/// How long past the provider's deadline a job whose output is ready may still be collected.
const COLLECT_GRACE: chrono::Duration = chrono::Duration::minutes(30);

/// Progress shown for a job the provider is working on: from 10 at submission, rising linearly
/// to 90 at the provider's expected finish, then creeping towards 99. Never 100: that is only
/// for a completed job.
pub fn estimate_progress(
    submitted: DateTime<Utc>,
    expected: DateTime<Utc>,
    now: DateTime<Utc>,
) -> i16 {
    let total = (expected - submitted).num_milliseconds().max(1_000) as f64;
    let elapsed = (now - submitted).num_milliseconds().max(0) as f64;
    let ratio = elapsed / total;
    let percent = if ratio <= 1.0 {
        10.0 + 80.0 * ratio
    } else {
        90.0 + 9.0 * (1.0 - 1.0 / ratio)
    };
    percent.floor().clamp(10.0, 99.0) as i16
}

/// When to ask the provider again: around its estimate, never hammering it and never waiting
/// long. With callbacks on, polling is only the fallback and can be rarer.
pub fn next_check_in(eta: Option<Duration>, callbacks: bool) -> Duration {
    let (min, max) = if callbacks {
        (Duration::from_secs(15), Duration::from_secs(60))
    } else {
        (Duration::from_secs(5), Duration::from_secs(30))
    };
    eta.unwrap_or(Duration::from_secs(10)).clamp(min, max)
}

/// After a failed check (the provider unreachable, a download cut off): back off, but keep
/// trying until the deadline fails the job.
const RETRY_CHECK_IN: Duration = Duration::from_secs(20);

/// Checks one taken job and applies what the provider said.
pub async fn check_job(
    app: &App,
    awaiting: AwaitingJob,
    asked: Asked<'_>,
) -> Result<Checked, WorkerError> {
    check_holding(app, awaiting, asked, None).await
}

/// [`check_job`], with the process's collecting permit already `held` (a worker takes it
/// before it takes the job, so that the job's hold does not run out while it waits its turn).
async fn check_holding(
    app: &App,
    awaiting: AwaitingJob,
    asked: Asked<'_>,
    held: Option<Permit>,
) -> Result<Checked, WorkerError> {
    let (job_id, webhook) = (
        awaiting.job.id,
        awaiting.job.params.get("webhookUrl").is_some(),
    );
    let checked = check_and_settle(app, awaiting, asked, held).await?;
    if webhook && matches!(checked, Checked::Completed | Checked::Failed) {
        crate::webhooks::deliver_now(app, job_id).await;
    }
    Ok(checked)
}

/// The process's permit to hold one job's provider output in memory (`App::collecting`).
type Permit = tokio::sync::OwnedSemaphorePermit;

async fn collecting_permit(app: &App) -> Permit {
    app.collecting
        .clone()
        .acquire_owned()
        .await
        .expect("the collecting semaphore is never closed")
}

/// What a check found, its output fetched (held under the process's collecting permit until
/// it is stored).
enum Found {
    Files(Vec<GeneratedFile>, Permit),
    Pending { eta: Option<Duration> },
}

async fn check_and_settle(
    app: &App,
    awaiting: AwaitingJob,
    asked: Asked<'_>,
    mut held: Option<Permit>,
) -> Result<Checked, WorkerError> {
    let job_id = awaiting.job.id;
    let now = Utc::now();
    let claim = Claimed {
        job: awaiting.job.clone(),
        limits: app.config.limits(),
    };
    // Output found ready is collected even after the provider's deadline, for a while.
    if let Some(message) = past_deadline(&awaiting, now) {
        return fail(app, &claim, &message, true).await;
    }
    let answer = match (&awaiting.outputs, asked) {
        (Some(outputs), _) => Ok(Check::Ready(outputs.clone())),
        (None, Asked::Provider) => {
            app.generator
                .check(&awaiting.job, &awaiting.external_id)
                .await
        }
        (None, Asked::Callback(body)) => {
            app.generator
                .check_callback(&awaiting.job, &awaiting.external_id, body)
                .await
        }
        (None, Asked::Collector) => Err(GenerateError::Fatal(
            "a job handed on to collect kept no output".into(),
        )),
    };
    let found = match answer {
        Ok(Check::Ready(outputs)) if outputs.is_empty() => {
            return fail(
                app,
                &claim,
                "the provider finished without any media",
                false,
            )
            .await;
        }
        Ok(Check::Ready(outputs)) => {
            if !matches!(asked, Asked::Collector) {
                match hand_off(app, &awaiting, &outputs).await? {
                    HandOff::Sent => return Ok(Checked::HandedOff),
                    HandOff::MovedOn => return Ok(Checked::Superseded),
                    HandOff::CollectHere(permit) => held = held.or(permit),
                }
            }
            let permit = match held {
                Some(permit) => permit,
                None => collecting_permit(app).await,
            };
            app.generator
                .collect(&awaiting.job, &outputs)
                .await
                .map(|files| Found::Files(files, permit))
        }
        Ok(Check::Pending { eta }) => Ok(Found::Pending { eta }),
        Err(e) => Err(e),
    };
    let conn = app.pool.get().await?;
    match found {
        Ok(Found::Files(files, permit)) => {
            let stored = app
                .store
                .put(&app.pool, &claim.job, claim.attempt(), &files)
                .await;
            drop((files, permit));
            let media = match stored {
                Ok(media) => media,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(%job_id, error = %chain(&e), "could not store the provider's output; will check again");
                    jobs::check_pending(&conn, &awaiting, 0, None, RETRY_CHECK_IN).await?;
                    return Ok(Checked::Pending);
                }
                Err(e) => {
                    drop(conn);
                    return fail(app, &claim, &chain(&e), false).await;
                }
            };
            let credits = app.config.credits.for_type(claim.job.job_type);
            let settled =
                jobs::complete(&conn, &claim, &media, app.generator.model(), credits).await?;
            if settled.applied() {
                app.metrics.job_settled(
                    claim.job.job_type,
                    "JobsCompleted",
                    (Utc::now() - awaiting.submitted_at).num_milliseconds() as f64,
                );
                tracing::info!(%job_id, attempt = claim.attempt(), "provider job completed");
                nudge(app, settled).await;
                Ok(Checked::Completed)
            } else {
                app.store
                    .discard(&app.pool, &claim.job.user_id, &media)
                    .await;
                Ok(Checked::Superseded)
            }
        }
        Ok(Found::Pending { eta }) => {
            // Progress is judged by the estimate the job had until now, so a later, longer
            // estimate never takes back what the page already showed.
            let progress = estimate_progress(awaiting.submitted_at, awaiting.expected_at, now);
            let callbacks = app.config.provider.callback_base_url.is_some();
            let applied = jobs::check_pending(
                &conn,
                &awaiting,
                progress,
                eta,
                next_check_in(eta, callbacks),
            )
            .await?;
            Ok(if applied {
                Checked::Pending
            } else {
                Checked::Superseded
            })
        }
        Err(GenerateError::Fatal(message)) => {
            drop(conn);
            app.metrics.provider_error(claim.job.job_type, false);
            fail(app, &claim, &message, false).await
        }
        Err(GenerateError::Retryable(message)) => {
            app.metrics.provider_error(claim.job.job_type, true);
            tracing::warn!(%job_id, error = %message, "provider check failed; will check again");
            jobs::check_pending(&conn, &awaiting, 0, None, RETRY_CHECK_IN).await?;
            Ok(Checked::Pending)
        }
    }
}

/// Why a job fails as timed out now, if it does: the provider did not finish by its deadline,
/// or, for output found ready, it could not be collected within the grace after it.
fn past_deadline(awaiting: &AwaitingJob, now: chrono::DateTime<Utc>) -> Option<String> {
    let request = &awaiting.external_id;
    if awaiting.outputs.is_some() {
        (now >= awaiting.deadline + COLLECT_GRACE).then(|| {
            format!(
                "timed out: the provider's finished output could not be collected within {} minutes of its deadline (request {request})",
                COLLECT_GRACE.num_minutes()
            )
        })
    } else {
        (now >= awaiting.deadline).then(|| {
            let minutes = (awaiting.deadline - awaiting.submitted_at).num_seconds() as f64 / 60.0;
            format!("timed out: the provider did not finish within {minutes:.0} minutes (request {request})")
        })
    }
}

/// What became of a hand-off.
enum HandOff {
    Sent,
    /// There is no worker queue, or the message could not be sent: collecting here is slower
    /// but finishes the job (with the collecting permit, when it was taken to take the job).
    CollectHere(Option<Permit>),
    /// The job was cancelled or finished meanwhile.
    MovedOn,
}

/// Hands the collection of a job found ready to a worker: keeps the output on the job, lets go
/// of it, then sends a worker a message.
async fn hand_off(
    app: &App,
    awaiting: &AwaitingJob,
    outputs: &[String],
) -> Result<HandOff, WorkerError> {
    if !app.queue.is_sqs() {
        return Ok(HandOff::CollectHere(None));
    }
    let job_id = awaiting.job.id;
    // Also when it was handed before and no worker has collected it since: the poller then
    // sends another message, and sets when to send the next.
    let kept = {
        let conn = app.pool.get().await?;
        jobs::handed(&conn, awaiting, outputs, RESEND_HANDED_IN).await?
    };
    if !kept {
        return Ok(HandOff::MovedOn);
    }
    let collection = Collection {
        attempt: awaiting.job.attempts,
    };
    match app.queue.hand_off(job_id, collection).await {
        Ok(()) => {
            tracing::info!(%job_id, "provider job finished; a worker collects it");
            Ok(HandOff::Sent)
        }
        Err(e) => {
            // The send may have failed only to our eyes (a lost answer): the job is taken the
            // way a worker takes it, so that one of the two collects.
            tracing::warn!(%job_id, error = %chain(&e), "could not hand the provider's output to a worker; collecting it here");
            let permit = collecting_permit(app).await;
            let conn = app.pool.get().await?;
            Ok(
                match jobs::take_handed_check(&conn, job_id, awaiting.job.attempts, CHECK_LEASE)
                    .await?
                {
                    Some(_) => HandOff::CollectHere(Some(permit)),
                    None => HandOff::Sent,
                },
            )
        }
    }
}

/// What a worker did with a hand-off message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collected {
    /// It took the job and collected it, with this outcome.
    Checked(Checked),
    /// Another collection holds the job, or it has moved on: nothing to do.
    NotTaken,
    /// Too little of the invocation was left once this process could collect: the message
    /// is to be delivered again, for another invocation.
    NoTime,
}

/// The least of an invocation a collection starts with: a file's download (90 s by default)
/// may take most of it.
const COLLECT_MIN_LEFT: Duration = Duration::from_secs(60);

/// A worker's share of a hand-off: waits its turn to collect (one job's output in memory at a
/// time), then takes the job, unless a collection holds it, and collects the kept output. The
/// job's hold starts only once the collection can, so it does not run out while the record
/// waits behind others of its batch; and none is started with less than a minute of the
/// invocation (`deadline`) left.
pub async fn collect_handed(
    app: &App,
    job_id: Uuid,
    collection: &Collection,
    deadline: Option<std::time::Instant>,
) -> Result<Collected, WorkerError> {
    let permit = collecting_permit(app).await;
    if deadline.is_some_and(|end| {
        end.saturating_duration_since(std::time::Instant::now()) < COLLECT_MIN_LEFT
    }) {
        return Ok(Collected::NoTime);
    }
    let taken = {
        let conn = app.pool.get().await?;
        jobs::take_handed_check(&conn, job_id, collection.attempt, CHECK_LEASE).await?
    };
    match taken {
        Some(job) => Ok(Collected::Checked(
            check_holding(app, job, Asked::Collector, Some(permit)).await?,
        )),
        None => Ok(Collected::NotTaken),
    }
}

async fn fail(
    app: &App,
    claim: &Claimed,
    message: &str,
    retryable: bool,
) -> Result<Checked, WorkerError> {
    let conn = app.pool.get().await?;
    let settled = jobs::fail(&conn, claim, message, retryable).await?;
    drop(conn);
    if !settled.applied() {
        return Ok(Checked::Superseded);
    }
    tracing::info!(job_id = %claim.job.id, attempt = claim.attempt(), error = %message, "provider job failed");
    app.metrics
        .job_settled(claim.job.job_type, "JobsFailed", 0.0);
    nudge(app, settled).await;
    Ok(Checked::Failed)
}

/// Checks every due job once. Answers how many were checked.
pub async fn check_due(app: &App) -> Result<usize, WorkerError> {
    let mut checked = 0;
    loop {
        let due = {
            let conn = app.pool.get().await?;
            jobs::claim_due_checks(&conn, CHECK_BATCH, CHECK_LEASE).await?
        };
        let taken = due.len();
        futures::stream::iter(due)
            .for_each_concurrent(CHECK_CONCURRENCY, |job| async move {
                let id = job.job.id;
                if let Err(e) = check_job(app, job, Asked::Provider).await {
                    // The check's lease runs out and the job is due again.
                    tracing::warn!(job_id = %id, error = %chain(&e), "provider check failed");
                }
            })
            .await;
        checked += taken;
        if (taken as i64) < CHECK_BATCH {
            return Ok(checked);
        }
    }
}

/// The poller's share: checks due jobs, and keeps checking as they fall due for up to
/// `window`, so jobs are checked more often than the once-a-minute schedule. Returns early once
/// no job waits on the provider.
pub async fn follow(app: &App, window: Duration) -> Result<usize, WorkerError> {
    let until = Instant::now() + window;
    let mut checked = check_due(app).await?;
    loop {
        let due = {
            let conn = app.pool.get().await?;
            jobs::next_check_due(&conn).await?
        };
        let Some(due) = due else {
            return Ok(checked);
        };
        let wait = (due - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(250));
        if Instant::now() + wait >= until {
            return Ok(checked);
        }
        tokio::time::sleep(wait).await;
        checked += check_due(app).await?;
    }
}

/// A status request's check: only if the job waits on the provider and was not checked in the
/// last few seconds, so a page polling every 2 s does not multiply provider traffic.
pub async fn check_on_status(app: &App, id: Uuid) -> Result<Option<Checked>, WorkerError> {
    let taken = {
        let conn = app.pool.get().await?;
        jobs::claim_check(
            &conn,
            id,
            app.config.provider.status_check_every,
            CHECK_LEASE,
            None,
        )
        .await?
    };
    match taken {
        Some(job) => Ok(Some(check_job(app, job, Asked::Provider).await?)),
        None => Ok(None),
    }
}

/// A provider callback, already authenticated. Repeats are harmless: a finished job is not
/// waiting any more, so nothing is taken.
pub async fn on_callback(
    app: &App,
    id: Uuid,
    attempt: i32,
    body: &[u8],
) -> Result<Option<Checked>, WorkerError> {
    let taken = {
        let conn = app.pool.get().await?;
        jobs::claim_check(&conn, id, Duration::ZERO, CHECK_LEASE, Some(attempt)).await?
    };
    match taken {
        Some(job) => Ok(Some(check_job(app, job, Asked::Callback(body)).await?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn progress_rises_with_elapsed_time_and_stays_below_100() {
        let (submitted, expected) = (at(0), at(60));
        let mut last = 0;
        for t in (0..3600).step_by(5) {
            let p = estimate_progress(submitted, expected, at(t));
            assert!(p >= last, "progress went down at {t}s");
            assert!((10..=99).contains(&p));
            last = p;
        }
        assert_eq!(estimate_progress(submitted, expected, at(0)), 10);
        assert_eq!(estimate_progress(submitted, expected, at(30)), 50);
        assert_eq!(estimate_progress(submitted, expected, at(60)), 90);
        assert!(estimate_progress(submitted, expected, at(100_000)) <= 99);
    }

    #[test]
    fn checks_follow_the_eta_within_bounds() {
        assert_eq!(
            next_check_in(Some(Duration::from_secs(1)), false),
            Duration::from_secs(5)
        );
        assert_eq!(
            next_check_in(Some(Duration::from_secs(12)), false),
            Duration::from_secs(12)
        );
        assert_eq!(
            next_check_in(Some(Duration::from_secs(600)), false),
            Duration::from_secs(30)
        );
        assert_eq!(next_check_in(None, true), Duration::from_secs(15));
    }
}
