//! The worker: claims a job, runs its generator while renewing the lease, stores the media and
//! completes the job, or records why it could not. The same code serves SQS batches (Lambda and
//! the local runner's SQS mode) and the embedded queue.

use std::{collections::HashMap, sync::Arc, time::Duration};

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use rand::Rng;
use tokio::{sync::Semaphore, time::Instant};
use tracing::{field, Instrument};

use crate::{
    generator::{GenerateError, Progress},
    jobs::{self, Claimed, JobsError},
    queue::{JobMessage, QueueError},
    storage::StorageError,
    telemetry::chain,
    App,
};

/// How often a running job's progress is written, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("message body is not a job message")]
    BadMessage(#[source] serde_json::Error),
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("job repository error")]
    Jobs(#[from] JobsError),
    #[error("could not store the job's media")]
    Storage(#[from] StorageError),
    #[error("could not schedule the retry")]
    Queue(#[from] QueueError),
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    /// A retryable error; the job is queued again and will run after `delay`.
    Requeued {
        delay: Duration,
    },
    /// The job was not claimable (unknown, finished, or already running): acknowledged, not run.
    NotClaimable,
    /// This attempt lost the job (rescued or cancelled) while it ran; what it produced is discarded.
    Superseded,
}

/// Handles an SQS batch: each record has its own span and outcome, and only the records that
/// must be delivered again are reported (`ReportBatchItemFailures`).
pub async fn handle_sqs(app: &App, event: SqsEvent) -> SqsBatchResponse {
    let outcomes = futures::future::join_all(event.records.iter().map(|record| {
        let message_id = record.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("record", message_id = %message_id, job_id = field::Empty);
        async move { (message_id, process_record(app, record).await) }.instrument(span)
    }))
    .await;
    let mut response = SqsBatchResponse::default();
    for (message_id, outcome) in outcomes {
        match outcome {
            Ok(outcome) => tracing::info!(message_id, ?outcome, "record done"),
            Err(e) => {
                tracing::warn!(message_id, error = %chain(&e), "record failed; it will be delivered again");
                response.add_failure(message_id);
            }
        }
    }
    response
}

async fn process_record(app: &App, record: &SqsMessage) -> Result<Outcome, WorkerError> {
    let message: JobMessage = serde_json::from_str(record.body.as_deref().unwrap_or(""))
        .map_err(WorkerError::BadMessage)?;
    tracing::Span::current().record("job_id", field::display(message.job_id));
    let claim = {
        let conn = app.pool.get().await?;
        jobs::claim_by_id(&conn, message.job_id, app.config.job_lease).await?
    };
    match claim {
        None => Ok(Outcome::NotClaimable),
        Some(claim) => run_claimed(app, claim).await,
    }
}

/// Runs a claimed job to its next state. Every transition is fenced by the claim's attempt.
pub async fn run_claimed(app: &App, claim: Claimed) -> Result<Outcome, WorkerError> {
    let job_id = claim.job.id;
    tracing::info!(%job_id, attempt = claim.attempt(), job_type = claim.job.job_type.as_str(), "job started");
    let generated = match generate_with_heartbeat(app, &claim).await {
        Some(result) => result,
        None => return Ok(Outcome::Superseded),
    };
    let conn = app.pool.get().await?;
    let outcome = match generated {
        Ok(files) if files.is_empty() => {
            settle_failure(
                app,
                &conn,
                &claim,
                GenerateError::Fatal("the generator returned no media".into()),
            )
            .await?
        }
        Ok(files) => {
            let media = app.store.put(job_id, claim.attempt(), &files).await?;
            if jobs::complete(&conn, &claim, &media, app.generator.model()).await? {
                Outcome::Completed
            } else {
                app.store.discard(&media).await;
                Outcome::Superseded
            }
        }
        Err(e) => settle_failure(app, &conn, &claim, e).await?,
    };
    tracing::info!(%job_id, attempt = claim.attempt(), ?outcome, "job settled");
    Ok(outcome)
}

async fn settle_failure(
    app: &App,
    db: &impl deadpool_postgres::GenericClient,
    claim: &Claimed,
    error: GenerateError,
) -> Result<Outcome, WorkerError> {
    let applied = match &error {
        GenerateError::Retryable(message) if claim.attempt() < claim.job.max_attempts => {
            let delay = retry_delay(claim.attempt());
            if !jobs::requeue(db, claim, message).await? {
                return Ok(Outcome::Superseded);
            }
            // If this send fails the error is returned, the record is reported, and SQS delivers
            // the original message again: the job is queued, so that delivery claims it.
            app.queue.dispatch(claim.job.id, delay).await?;
            return Ok(Outcome::Requeued { delay });
        }
        GenerateError::Retryable(message) => {
            let text = format!("gave up after {} attempts: {message}", claim.attempt());
            jobs::fail(db, claim, &text).await?
        }
        GenerateError::Fatal(message) => jobs::fail(db, claim, message).await?,
    };
    Ok(if applied {
        Outcome::Failed
    } else {
        Outcome::Superseded
    })
}

/// Exponential backoff with jitter: about 5 s, 10 s, 20 s, ... capped at SQS's 15 minutes.
pub fn retry_delay(attempt: i32) -> Duration {
    let base = 5u64
        .saturating_mul(1 << attempt.clamp(1, 12).saturating_sub(1))
        .min(900);
    let jittered = rand::thread_rng().gen_range(base / 2..=base);
    Duration::from_secs(jittered.max(1))
}

/// Runs the generator while writing its progress and renewing the lease. Returns `None` when a
/// heartbeat finds the attempt is no longer current: the generator is then dropped mid-flight.
async fn generate_with_heartbeat(
    app: &App,
    claim: &Claimed,
) -> Option<Result<Vec<crate::generator::GeneratedFile>, GenerateError>> {
    let (progress, watch) = Progress::channel();
    let generate = app.generator.generate(&claim.job, &progress);
    tokio::pin!(generate);
    let renew_every = app.config.job_lease / 3;
    let mut last_write = Instant::now();
    let mut written = claim.job.progress.max(0) as u8;
    let mut ticker = tokio::time::interval_at(
        Instant::now() + PROGRESS_EVERY,
        PROGRESS_EVERY.min(renew_every),
    );
    loop {
        tokio::select! {
            result = &mut generate => return Some(result),
            _ = ticker.tick() => {
                let current = *watch.borrow();
                if current == written && last_write.elapsed() < renew_every {
                    continue;
                }
                match app.pool.get().await {
                    Ok(conn) => match jobs::heartbeat(&conn, claim, current as i16, app.config.job_lease).await {
                        Ok(true) => {
                            written = current;
                            last_write = Instant::now();
                        }
                        Ok(false) => {
                            tracing::warn!(job_id = %claim.job.id, attempt = claim.attempt(), "lost the job while running it; stopping");
                            return None;
                        }
                        Err(e) => tracing::warn!(job_id = %claim.job.id, error = %chain(&e), "heartbeat failed"),
                    },
                    Err(e) => tracing::warn!(job_id = %claim.job.id, error = %chain(&e), "heartbeat failed"),
                }
            }
        }
    }
}

/// The embedded queue: claims the oldest queued jobs straight from the table, at most
/// `MAX_CONCURRENT_JOBS` at a time, until `shutdown` resolves.
pub async fn run_embedded(
    app: App,
    wake: Arc<tokio::sync::Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    const IDLE_POLL: Duration = Duration::from_millis(500);
    let slots = Arc::new(Semaphore::new(app.config.max_concurrent_jobs as usize));
    tokio::pin!(shutdown);
    loop {
        // Wait for at least one free slot, then claim as many jobs as there are free slots.
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => return,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let claimed = match app.pool.get().await {
            Ok(conn) => jobs::claim_next(&conn, permits.len() as i64, app.config.job_lease)
                .await
                .map_err(WorkerError::from),
            Err(e) => Err(e.into()),
        };
        let claimed = claimed.unwrap_or_else(|e| {
            tracing::warn!(error = %chain(&e), "claiming jobs failed");
            Vec::new()
        });
        if claimed.is_empty() {
            drop(permits);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = &mut shutdown => return,
            }
            continue;
        }
        for (claim, permit) in claimed.into_iter().zip(permits.drain(..)) {
            let app = app.clone();
            let span = tracing::info_span!("job", job_id = %claim.job.id);
            tokio::spawn(
                async move {
                    if let Err(e) = run_claimed(&app, claim).await {
                        tracing::error!(error = %chain(&e), "job run failed; it stays processing until its lease expires");
                    }
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}

/// One round of what Lambda's SQS event source mapping does: receive a batch, hand it to the
/// handler as an `SqsEvent`, and delete only the messages the handler did not report as failed.
/// Returns how many messages were received.
pub async fn poll_sqs_once(
    app: &App,
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    wait: Duration,
) -> Result<usize, aws_sdk_sqs::Error> {
    let received = client
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(wait.as_secs() as i32)
        .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
        .send()
        .await?;
    let messages = received.messages.unwrap_or_default();
    if messages.is_empty() {
        return Ok(0);
    }
    let mut handles = HashMap::new();
    let records = messages
        .iter()
        .map(|m| {
            let mut record = SqsMessage::default();
            record.message_id = m.message_id.clone();
            record.receipt_handle = m.receipt_handle.clone();
            record.body = m.body.clone();
            record.md5_of_body = m.md5_of_body.clone();
            record.event_source = Some("aws:sqs".into());
            record.attributes = m
                .attributes
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect();
            if let (Some(id), Some(handle)) = (&m.message_id, &m.receipt_handle) {
                handles.insert(id.clone(), handle.clone());
            }
            record
        })
        .collect();
    let mut event = SqsEvent::default();
    event.records = records;
    let response = handle_sqs(app, event).await;
    for failure in &response.batch_item_failures {
        handles.remove(&failure.item_identifier);
    }
    for (_, handle) in handles {
        client
            .delete_message()
            .queue_url(queue_url)
            .receipt_handle(handle)
            .send()
            .await?;
    }
    Ok(messages.len())
}
