//! The worker: claims a job, runs its generator while renewing the lease, stores the media and
//! completes the job, or records why it could not. The same code serves SQS batches (Lambda and
//! the local runner's SQS mode) and the embedded queue.

use std::{collections::HashMap, sync::Arc, time::Duration};

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use rand::Rng;
use tokio::{sync::Semaphore, time::Instant};
use tracing::{field, Instrument};

use crate::{
    generator::{Callback, GenerateError, Generation, Inputs, Progress},
    jobs::{self, ClaimResult, Claimed, JobsError},
    queue::JobMessage,
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
    #[error("the batch this job's completion was written in failed")]
    Batch(#[source] Arc<WorkerError>),
    #[error("the completer has stopped")]
    CompleterGone,
    #[error("the invocation was about to end; the record was cut off (a job it was running runs again after its lease)")]
    OutOfTime,
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    /// A retryable error; the job is queued again and will run after `delay`. Without
    /// `message_sent`, the retry's own message could not be sent: the message that delivered
    /// this attempt is delivered again after `delay` instead (and, where there is none, the
    /// outbox re-sends one).
    Requeued {
        delay: Duration,
        message_sent: bool,
    },
    /// The job was not claimable (unknown, finished, or already running): acknowledged, not run.
    NotClaimable,
    /// Every slot it may use is held: acknowledged. The worker whose job frees a slot for it
    /// runs it (it is named next in line by that transition); if that chain ever breaks, the
    /// outbox re-sends its message after OUTBOX_GRACE_SECONDS.
    Waiting,
    /// The job is waiting for a slot or for its backoff: the message is hidden for `delay` and
    /// delivered again then.
    Deferred {
        delay: Duration,
    },
    /// This attempt lost the job (rescued or cancelled) while it ran; what it produced is discarded.
    Superseded,
    /// The provider accepted the job and finishes it later; checks take it from here.
    Submitted,
    /// A finished provider job's output, handed on by a check: what collecting it did.
    Collected(crate::provider::Collected),
}

/// Handles an SQS batch: each record has its own span and outcome, and only the records that
/// must be delivered again are reported (`ReportBatchItemFailures`).
pub async fn handle_sqs(app: &App, event: SqsEvent) -> SqsBatchResponse {
    handle_sqs_until(app, event, None).await
}

/// How long before the invocation ends a record still running is given up, so that the batch
/// is answered in time.
const ANSWER_MARGIN: Duration = Duration::from_secs(3);

/// [`handle_sqs`] within an invocation that ends at `deadline`: a worker runs the jobs its own
/// jobs free slots for only while enough of the invocation is left, and a record still running
/// near the end is cut off and reported, so that one long job never costs the batch its answer
/// (a timed-out invocation would return every message, and cut off every job in it).
pub async fn handle_sqs_until(
    app: &App,
    event: SqsEvent,
    deadline: Option<std::time::Instant>,
) -> SqsBatchResponse {
    let answer_by = deadline.map(|end| margin_before(end, ANSWER_MARGIN));
    let outcomes = futures::future::join_all(event.records.iter().map(|record| {
        let message_id = record.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("record", message_id = %message_id, job_id = field::Empty);
        async move {
            let run = process_record(app, record, deadline);
            let outcome = match answer_by {
                Some(at) => tokio::time::timeout_at(at, run)
                    .await
                    .unwrap_or(Err(WorkerError::OutOfTime)),
                None => run.await,
            };
            (record, outcome)
        }
        .instrument(span)
    }))
    .await;
    let mut response = SqsBatchResponse::default();
    for (record, outcome) in outcomes {
        let message_id = record.message_id.clone().unwrap_or_default();
        // A record left in the queue is reported; when to deliver it again is set explicitly.
        let redeliver_in = match outcome {
            Ok(Outcome::Deferred { delay }) => {
                tracing::info!(
                    message_id,
                    delay_s = delay.as_secs(),
                    "job waits; message deferred"
                );
                Some(delay)
            }
            // The job is queued for its retry, but its message was not sent: this one carries
            // the retry instead, delivered again when the job is due.
            Ok(Outcome::Requeued {
                delay,
                message_sent: false,
            }) => {
                tracing::info!(
                    message_id,
                    delay_s = delay.as_secs(),
                    "job requeued; this message carries its retry"
                );
                Some(delay)
            }
            Ok(outcome) => {
                tracing::info!(message_id, ?outcome, "record done");
                None
            }
            Err(e @ WorkerError::BadMessage(_)) => {
                // Poison: let it reach maxReceiveCount (and the DLQ) quickly.
                tracing::warn!(message_id, error = %chain(&e), "unreadable message; it will go to the DLQ");
                Some(POISON_REDELIVERY)
            }
            Err(e) => {
                tracing::warn!(message_id, error = %chain(&e), "record failed; it will be delivered again");
                Some(retry_delay(receive_count(record)))
            }
        };
        if let Some(delay) = redeliver_in {
            if let Some(handle) = &record.receipt_handle {
                app.queue.defer(handle, delay).await;
            }
            response.add_failure(message_id);
        }
    }
    response
}

/// The queue's maxReceiveCount (template.yaml). A message comes back only while its job backs
/// off (hidden until due) or after its record failed (a backoff that doubles per receive up to
/// 7.5-15 minutes), so this many receives tolerate at least a day of trouble before a healthy
/// job's message could be dead-lettered; the outbox re-sends any queued job whose message is
/// gone even then.
pub const MAX_RECEIVE_COUNT: u32 = 200;

/// How soon an unreadable message is delivered again, so it reaches the DLQ in minutes.
const POISON_REDELIVERY: Duration = Duration::from_secs(10);

fn receive_count(record: &SqsMessage) -> i32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

async fn process_record(
    app: &App,
    record: &SqsMessage,
    deadline: Option<std::time::Instant>,
) -> Result<Outcome, WorkerError> {
    let message: JobMessage = serde_json::from_str(record.body.as_deref().unwrap_or(""))
        .map_err(WorkerError::BadMessage)?;
    tracing::Span::current().record("job_id", field::display(message.job_id));
    if let Some(collection) = &message.collect {
        return Ok(
            match crate::provider::collect_handed(app, message.job_id, collection, deadline).await?
            {
                crate::provider::Collected::NoTime => Outcome::Deferred {
                    delay: Duration::from_secs(1),
                },
                collected => Outcome::Collected(collected),
            },
        );
    }
    let claim = {
        let conn = app.pool.get().await?;
        jobs::claim_by_id(
            &conn,
            message.job_id,
            app.config.job_lease,
            app.config.limits(),
        )
        .await?
    };
    match claim {
        ClaimResult::Claimed(claim) => {
            let (outcome, next) = run_claimed_then(app, *claim, Handoff::Return).await?;
            if let Some(Next::Waiting(next)) = next {
                run_chain(app, next, deadline).await;
            }
            Ok(outcome)
        }
        ClaimResult::NotClaimable => Ok(Outcome::NotClaimable),
        ClaimResult::NoSlot => Ok(Outcome::Waiting),
        ClaimResult::NotDue(at) => {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            Ok(Outcome::Deferred {
                delay: wait.max(Duration::from_secs(1)),
            })
        }
    }
}

/// `margin` before an invocation's `end` (or its end, when less is left), as a timer's instant.
pub(crate) fn margin_before(end: std::time::Instant, margin: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(end.checked_sub(margin).unwrap_or(end))
}

/// The instant a Lambda invocation ends, from its context's deadline (ms since the epoch).
pub fn invocation_deadline(epoch_ms: u64) -> std::time::Instant {
    let end = std::time::UNIX_EPOCH + Duration::from_millis(epoch_ms);
    let left = end
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    std::time::Instant::now() + left
}

/// Runs the jobs that finishing jobs free slots for, one after another in this worker, instead
/// of messaging each: no SQS request and no idle slot between them. Stops when no job is
/// waiting, when another worker took the slot, or when the invocation is nearly over.
async fn run_chain(app: &App, mut next: uuid::Uuid, deadline: Option<std::time::Instant>) {
    loop {
        let time_left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if time_left.is_some_and(|left| left < app.config.worker_chain_min)
            || app.stopping.load(std::sync::atomic::Ordering::Relaxed)
        {
            nudge(app, jobs::Settled::Applied { next: Some(next) }).await;
            return;
        }
        let claim = async {
            let conn = app.pool.get().await?;
            Ok::<_, WorkerError>(
                jobs::claim_by_id(&conn, next, app.config.job_lease, app.config.limits()).await?,
            )
        }
        .await;
        let claim = match claim {
            Ok(ClaimResult::Claimed(claim)) => *claim,
            // Two jobs finishing at once can both name the same next job, and the other
            // worker claimed it: this slot then goes to whoever is first in line now (whose
            // message may already have been acknowledged).
            Ok(ClaimResult::NotClaimable) => match first_in_line(app).await {
                Some(claim) => claim,
                None => return,
            },
            // Another job took the slot, and its worker hands it on in turn.
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(job_id = %next, error = %chain(&e), "could not claim the next job in line; sending it a message");
                nudge(app, jobs::Settled::Applied { next: Some(next) }).await;
                return;
            }
        };
        let job_id = claim.job.id;
        let span = tracing::info_span!("chained", %job_id);
        match run_claimed_then(app, claim, Handoff::Return)
            .instrument(span)
            .await
        {
            Ok((_, Some(Next::Waiting(after)))) => next = after,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%job_id, error = %chain(&e), "chained job run failed; it stays processing until its lease expires");
                return;
            }
        }
    }
}

/// Claims the job first in line for a free slot, if any.
async fn first_in_line(app: &App) -> Option<Claimed> {
    let claimed = async {
        let conn = app.pool.get().await?;
        Ok::<_, WorkerError>(
            jobs::claim_next(&conn, 1, app.config.job_lease, app.config.limits()).await?,
        )
    }
    .await;
    match claimed {
        Ok(claimed) => claimed.into_iter().next(),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "could not claim the next job in line; the outbox will re-send its message");
            None
        }
    }
}

/// What a worker does with a slot its job's transition frees, when a job is waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// Send that job a message (the embedded queue: wake its claimer).
    Message,
    /// Return it to the caller, which runs it itself (an SQS worker's chain).
    Return,
    /// Have the batching completer claim it with the completion (the embedded queue's workers).
    Completer,
}

/// The job a finished job's worker runs next.
enum Next {
    /// Claimed by the completer with the completion: run it.
    Claimed(Claimed),
    /// Named next in line for the freed slot: claim it, then run it.
    Waiting(uuid::Uuid),
}

/// Runs a claimed job to its next state. Every transition is fenced by the claim's attempt.
pub async fn run_claimed(app: &App, claim: Claimed) -> Result<Outcome, WorkerError> {
    Ok(run_claimed_then(app, claim, Handoff::Message).await?.0)
}

/// Runs a claimed job as [`run_claimed`] does, handing the slot it frees on as `handoff` says.
async fn run_claimed_then(
    app: &App,
    claim: Claimed,
    handoff: Handoff,
) -> Result<(Outcome, Option<Next>), WorkerError> {
    let mut next = None;
    let job_id = claim.job.id;
    let job_type = claim.job.job_type;
    let started = std::time::Instant::now();
    let queue_wait = claim
        .job
        .started_at
        .map(|s| (s - claim.job.created_at).num_milliseconds())
        .unwrap_or(0);
    tracing::info!(%job_id, user_id = %claim.job.user_id, attempt = claim.attempt(), job_type = job_type.as_str(), "job started");
    app.metrics.job_started(job_type, queue_wait as f64);
    let generated = match generate_with_heartbeat(app, &claim).await {
        Some(result) => result,
        None => {
            app.metrics.job_settled(
                job_type,
                "JobsSuperseded",
                started.elapsed().as_secs_f64() * 1e3,
            );
            return Ok((Outcome::Superseded, None));
        }
    };
    // A connection is taken only for each write, never held while media are stored or while a
    // completion waits for its batch.
    let outcome = match generated {
        Ok(Generation::Done(files)) if files.is_empty() => {
            settle_failure(
                app,
                &app.pool.get().await?,
                &claim,
                GenerateError::Fatal("the generator returned no media".into()),
                handoff,
                &mut next,
            )
            .await?
        }
        Ok(Generation::Done(files)) => {
            match app
                .store
                .put(&app.pool, &claim.job, claim.attempt(), &files)
                .await
            {
                Ok(media) => {
                    let credits = app.config.credits.for_type(job_type);
                    let (applied, handed) = complete(app, &claim, &media, credits, handoff).await?;
                    next = handed;
                    if applied {
                        Outcome::Completed
                    } else {
                        app.store
                            .discard(&app.pool, &claim.job.user_id, &media)
                            .await;
                        Outcome::Superseded
                    }
                }
                Err(e) => {
                    tracing::warn!(%job_id, error = %chain(&e), "could not store the job's media");
                    let message = chain(&e);
                    let error = if e.is_retryable() {
                        GenerateError::Retryable(message)
                    } else {
                        GenerateError::Fatal(message)
                    };
                    settle_failure(
                        app,
                        &app.pool.get().await?,
                        &claim,
                        error,
                        handoff,
                        &mut next,
                    )
                    .await?
                }
            }
        }
        Ok(Generation::Submitted(submission)) => {
            let provider = &app.config.provider;
            let followup = jobs::Followup {
                expected_in: submission.eta.unwrap_or(Duration::from_secs(60)),
                max_wait: provider.max_wait,
                first_check_in: crate::provider::next_check_in(
                    submission.eta,
                    provider.callback_base_url.is_some(),
                ),
                hold_slot: provider.hold_slots,
            };
            let settled = jobs::submitted(
                &app.pool.get().await?,
                &claim,
                &submission.external_id,
                followup,
            )
            .await?;
            if settled.applied() {
                tracing::info!(%job_id, external_id = %submission.external_id, eta_s = ?submission.eta.map(|d| d.as_secs()), "submitted to the provider");
                next = hand_on(app, settled, handoff).await;
                Outcome::Submitted
            } else {
                Outcome::Superseded
            }
        }
        Err(e) => {
            app.metrics
                .provider_error(job_type, matches!(e, GenerateError::Retryable(_)));
            settle_failure(app, &app.pool.get().await?, &claim, e, handoff, &mut next).await?
        }
    };
    let metric = match outcome {
        Outcome::Completed => "JobsCompleted",
        Outcome::Failed => "JobsFailed",
        Outcome::Requeued { .. } => "JobsRetried",
        Outcome::Submitted => "JobsSubmitted",
        _ => "JobsSuperseded",
    };
    app.metrics
        .job_settled(job_type, metric, started.elapsed().as_secs_f64() * 1e3);
    tracing::info!(%job_id, attempt = claim.attempt(), ?outcome, "job settled");
    if matches!(outcome, Outcome::Completed | Outcome::Failed)
        && claim.job.params.get("webhookUrl").is_some()
    {
        crate::webhooks::deliver_now(app, job_id).await;
    }
    Ok((outcome, next))
}

/// Completes the job: through the batching completer when the embedded queue runs one, else
/// with its own statement. Returns whether the completion applied, and the next job for the
/// slot it freed when `handoff` asks for it back.
async fn complete(
    app: &App,
    claim: &Claimed,
    media: &[jobs::NewMedia],
    credits: i32,
    handoff: Handoff,
) -> Result<(bool, Option<Next>), WorkerError> {
    if let Some(completer) = &app.completions {
        let completion = jobs::Completion {
            job_id: claim.job.id,
            attempt: claim.attempt(),
            media: media.to_vec(),
            credits,
        };
        let take_next = handoff == Handoff::Completer;
        let (applied, claimed) = completer.complete(completion, take_next).await?;
        return Ok((applied, claimed.map(Next::Claimed)));
    }
    let conn = app.pool.get().await?;
    let settled = jobs::complete(&conn, claim, media, app.generator.model(), credits).await?;
    Ok((settled.applied(), hand_on(app, settled, handoff).await))
}

/// The job named next in line for the slot a transition freed: returned to run here, or sent
/// a message.
async fn hand_on(app: &App, settled: jobs::Settled, handoff: Handoff) -> Option<Next> {
    match (settled, handoff) {
        (jobs::Settled::Applied { next: Some(next) }, Handoff::Return) => Some(Next::Waiting(next)),
        _ => {
            nudge(app, settled).await;
            None
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<(bool, Option<Claimed>), Arc<WorkerError>>>;

struct Finished {
    completion: jobs::Completion,
    take_next: bool,
    reply: Reply,
}

/// Writes the embedded queue's completions in batches: one transaction and one commit for
/// every job that finished while the previous batch was being written. Under load a commit
/// carries many jobs; at a trickle a job finds the completer idle and is written at once,
/// alone. In the same commit it claims a job for each slot a completion freed, and hands it to
/// that job's worker, so a busy queue needs no separate claim (and no second commit) per job.
#[derive(Clone)]
pub struct Completer {
    tx: tokio::sync::mpsc::UnboundedSender<Finished>,
    /// Set when the embedded queue stops: completions are still written, no job is claimed.
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

/// At most this many jobs per completion statement (the slots bound it anyway).
const MAX_COMPLETION_BATCH: usize = 256;
/// How long a round waits for the jobs the last round started (in practice up to the next tick
/// of tokio's 1 ms timer), and only while some are still out.
const GATHER: std::time::Duration = std::time::Duration::from_micros(500);

impl Completer {
    /// Starts the completer's task; it ends once every handle is dropped. `claiming` is held
    /// by whoever claims jobs for the embedded queue, so that claims never run concurrently:
    /// two at once would skip each other's locked rows, and a later job could start before an
    /// earlier one. (MAX_ACTIVE_PER_USER holds either way: migration V13.)
    pub fn start(app: &App, claiming: Arc<tokio::sync::Mutex<()>>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Finished>();
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let app = app.clone();
        let stopping = stopped.clone();
        tokio::spawn(async move {
            // Jobs the last round started, not yet back.
            let mut started: std::collections::HashSet<uuid::Uuid> = Default::default();
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_COMPLETION_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                for finished in &batch {
                    started.remove(&finished.completion.job_id);
                }
                // Short jobs the last round started finish while this one is gathered: waiting
                // a moment for them lets them share its commit instead of needing one more.
                let until = tokio::time::Instant::now() + GATHER;
                while !started.is_empty() && batch.len() < MAX_COMPLETION_BATCH {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(next)) => {
                            started.remove(&next.completion.job_id);
                            batch.push(next);
                        }
                        _ => break,
                    }
                }
                started.clear();
                match write_batch(&app, &claiming, &stopping, &batch).await {
                    Ok((applied, claimed)) => {
                        started.extend(claimed.iter().map(|c| c.job.id));
                        let mut claimed = claimed.into_iter();
                        for finished in batch {
                            let done = applied.contains(&finished.completion.job_id);
                            let next = if done && finished.take_next {
                                claimed.next()
                            } else {
                                None
                            };
                            let _ = finished.reply.send(Ok((done, next)));
                        }
                        // A round claims no more jobs than it has applied completions that
                        // take another: one per taker.
                        debug_assert!(claimed.next().is_none());
                    }
                    // One job's trouble must not hold back the others: each is written alone,
                    // claiming nothing. A job whose completion still fails stays processing until
                    // its lease expires, and runs again.
                    Err(e) => {
                        tracing::warn!(jobs = batch.len(), error = %chain(&e), "a completion batch failed; writing its jobs one by one");
                        // The slots of completions written alone are freed: the claimer
                        // takes them.
                        if let crate::queue::Dispatcher::Embedded { local } = &app.queue {
                            local.bell.ring();
                        }
                        for finished in batch {
                            let alone = write_one(&app, &finished.completion)
                                .await
                                .map(|done| (done, None))
                                .map_err(Arc::new);
                            let _ = finished.reply.send(alone);
                        }
                    }
                }
            }
        });
        Completer { tx, stopped }
    }

    /// Stops claiming: completions are still written, but no job is claimed with them.
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes the job with the next batch: whether its completion applied, and with
    /// `take_next` the job claimed for its slot, if one was waiting.
    pub async fn complete(
        &self,
        completion: jobs::Completion,
        take_next: bool,
    ) -> Result<(bool, Option<Claimed>), WorkerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Finished {
                completion,
                take_next,
                reply,
            })
            .map_err(|_| WorkerError::CompleterGone)?;
        answer
            .await
            .map_err(|_| WorkerError::CompleterGone)?
            .map_err(WorkerError::Batch)
    }
}

/// One completion in its own statement: whether it applied.
async fn write_one(app: &App, completion: &jobs::Completion) -> Result<bool, WorkerError> {
    let conn = app.pool.get().await?;
    let applied = jobs::complete_many(&conn, &[completion], app.generator.model()).await?;
    Ok(applied.contains(&completion.job_id))
}

/// One completer round: the batch's completions, and claims for the slots they freed, in one
/// statement. A failed round writes nothing; the completions are then written alone.
async fn write_batch(
    app: &App,
    claiming: &tokio::sync::Mutex<()>,
    stopped: &std::sync::atomic::AtomicBool,
    batch: &[Finished],
) -> Result<(std::collections::HashSet<uuid::Uuid>, Vec<Claimed>), WorkerError> {
    let completions: Vec<&jobs::Completion> = batch.iter().map(|f| &f.completion).collect();
    let bell = match &app.queue {
        crate::queue::Dispatcher::Embedded { local } => Some(&local.bell),
        crate::queue::Dispatcher::Sqs { .. } => None,
    };
    let conn = app.pool.get().await?;
    let wants =
        !stopped.load(std::sync::atomic::Ordering::Relaxed) && batch.iter().any(|f| f.take_next);
    // Held through the write: every claim either ended before the look at the bell below (what
    // it found is what was looked at) or starts after this commit and sees the slots and
    // allowances it frees or takes.
    let claiming_guard = if wants {
        Some(claiming.lock().await)
    } else {
        None
    };
    // While the last claim left no job waiting and none has come since, a claim would find
    // nothing.
    let quiet = bell.is_some_and(|bell| !bell.may_have_waiting());
    if !wants || quiet {
        // The completions alone, freeing their slots.
        let applied = jobs::complete_many(&conn, &completions, app.generator.model()).await?;
        return Ok((applied, Vec::new()));
    }
    let takes: Vec<bool> = batch.iter().map(|f| f.take_next).collect();
    // What the claim finds holds only once the round commits: until then, and for good if it
    // fails, the line may have jobs.
    let token = bell.map(|b| {
        let token = b.before_claim();
        b.after_claim(token, None);
        token
    });
    match jobs::complete_and_claim(
        &conn,
        &completions,
        &takes,
        app.generator.model(),
        app.config.job_lease,
        app.config.limits(),
    )
    .await
    {
        jobs::RoundEnd::Committed {
            applied,
            line,
            stranded,
        } => {
            if let (Some(bell), Some(token)) = (bell, token) {
                bell.after_claim(token, Some(line.left_waiting));
            }
            // The round has committed: claims may go on while the stranded slots' holder is
            // waited for below.
            drop(claiming_guard);
            if !stranded.is_empty() {
                // Best effort: a slot left held frees itself when its lease runs out.
                match jobs::free_stranded(&conn, &stranded).await {
                    Ok(freed) => {
                        tracing::info!(
                            freed,
                            "freed completed jobs' slots another statement held during the round"
                        );
                        if let Some(bell) = bell {
                            bell.ring();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "could not free completed jobs' slots; they free themselves when their leases run out")
                    }
                }
            }
            Ok((applied, line.jobs))
        }
        jobs::RoundEnd::Undone(e) => {
            // Nothing was written: the completions are written again on their own, freeing
            // their slots, and the claimer takes those slots.
            tracing::warn!(error = %chain(&e), "claiming with a completion batch failed; writing the completions alone");
            if let Some(bell) = bell {
                bell.ring();
            }
            let applied = jobs::complete_many(&conn, &completions, app.generator.model()).await?;
            Ok((applied, Vec::new()))
        }
        jobs::RoundEnd::Unread { applied, error } => {
            tracing::error!(error = %chain(&error), "a completion batch committed, but the jobs it claimed could not be read; they run again when their lease runs out");
            if let Some(bell) = bell {
                bell.ring();
            }
            Ok((applied, Vec::new()))
        }
    }
}

async fn settle_failure(
    app: &App,
    db: &impl deadpool_postgres::GenericClient,
    claim: &Claimed,
    error: GenerateError,
    handoff: Handoff,
    next: &mut Option<Next>,
) -> Result<Outcome, WorkerError> {
    let (settled, outcome) = match &error {
        GenerateError::Retryable(message) if claim.attempt() < claim.job.max_attempts => {
            let delay = retry_delay(claim.attempt());
            let settled = jobs::requeue(db, claim, message, delay).await?;
            let mut message_sent = true;
            if settled.applied() {
                if let Err(e) = app.queue.dispatch(claim.job.id, delay).await {
                    tracing::warn!(job_id = %claim.job.id, error = %chain(&e), "the retry's message was not sent");
                    message_sent = false;
                }
            }
            (
                settled,
                Outcome::Requeued {
                    delay,
                    message_sent,
                },
            )
        }
        GenerateError::Retryable(message) => {
            let text = format!("gave up after {} attempts: {message}", claim.attempt());
            (jobs::fail(db, claim, &text, true).await?, Outcome::Failed)
        }
        GenerateError::Fatal(message) => (
            jobs::fail(db, claim, message, false).await?,
            Outcome::Failed,
        ),
    };
    if !settled.applied() {
        return Ok(Outcome::Superseded);
    }
    // The freed slot is handed on whether or not the retry's message was sent: the next job's
    // claim needs only Postgres.
    *next = hand_on(app, settled, handoff).await;
    Ok(outcome)
}

/// Hands the slot a transition just freed to the oldest waiting job by sending it a fresh
/// message: its own may be hidden for minutes of deferral backoff. Best effort: if the send
/// fails, that job's own message or the outbox still gets it there.
pub async fn nudge(app: &App, settled: jobs::Settled) {
    if let jobs::Settled::Applied { next: Some(next) } = settled {
        if let Err(e) = app.queue.dispatch(next, Duration::ZERO).await {
            tracing::warn!(job_id = %next, error = %chain(&e), "could not hand the freed slot on");
        }
    }
}

/// Exponential backoff with jitter for the given attempt (or receive count).
pub fn retry_delay(attempt: i32) -> Duration {
    backoff(attempt, rand::thread_rng().gen_range(0.0..=1.0))
}

/// About 5 s, 10 s, 20 s, ... capped at SQS's 15-minute maximum delay; `jitter` in 0..=1 picks
/// a point in the upper half of each step, so retries of many jobs do not arrive together.
pub fn backoff(attempt: i32, jitter: f64) -> Duration {
    let base = 5u64
        .saturating_mul(1 << attempt.clamp(1, 12).saturating_sub(1))
        .min(900) as f64;
    Duration::from_secs_f64((base / 2.0 + base / 2.0 * jitter.clamp(0.0, 1.0)).max(1.0))
}

/// Runs the generator while writing its progress and renewing the lease. Returns `None` when a
/// heartbeat finds the attempt is no longer current: the generator is then dropped mid-flight.
async fn generate_with_heartbeat(
    app: &App,
    claim: &Claimed,
) -> Option<Result<Generation, GenerateError>> {
    let inputs = match resolve_inputs(app, claim).await {
        Ok(inputs) => inputs,
        Err(e) => return Some(Err(e)),
    };
    let provider = &app.config.provider;
    let callback = match (&provider.callback_base_url, &provider.callback_secret) {
        (Some(base), Some(secret)) => Some(Callback {
            url: crate::callbacks::url(base, secret, claim.job.id, claim.attempt()),
            track_id: claim.job.id.to_string(),
        }),
        _ => None,
    };
    let (progress, watch) = Progress::channel();
    let generate = app
        .generator
        .generate(&claim.job, &inputs, &progress, callback.as_ref());
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

/// Resolves the media ids a job names as input to URLs the provider can fetch, for generators
/// that use them. Only the job owner's own media count.
async fn resolve_inputs(app: &App, claim: &Claimed) -> Result<Inputs, GenerateError> {
    let id_of = |name: &str| {
        claim
            .job
            .params
            .get(name)
            .and_then(|v| v.as_str())
            .and_then(|s| uuid::Uuid::parse_str(s).ok())
    };
    let (reference, source) = (id_of("imageReferenceId"), id_of("sourceImageId"));
    if !app.generator.uses_inputs() || (reference.is_none() && source.is_none()) {
        return Ok(Inputs::default());
    }
    let ids: Vec<uuid::Uuid> = reference.into_iter().chain(source).collect();
    let found = async {
        let conn = app.pool.get().await.map_err(|e| chain(&e))?;
        jobs::input_media(
            &conn,
            &claim.job.user_id,
            claim.job.tenant_id.as_deref(),
            &ids,
        )
        .await
        .map_err(|e| chain(&e))
    }
    .await
    .map_err(|e| {
        GenerateError::Retryable(format!("could not look up the job's input media: {e}"))
    })?;
    let url_of = |id: Option<uuid::Uuid>| {
        let id = id?;
        found
            .iter()
            .find(|m| m.id == id)
            .map(|m| match m.storage.as_str() {
                // The provider fetches inputs itself; a Drive file is fetched by its download link.
                "google-drive" => format!(
                    "https://drive.google.com/uc?export=download&id={}",
                    m.storage_key
                ),
                _ => m.public_url.clone(),
            })
    };
    Ok(Inputs {
        reference_image_url: url_of(reference),
        source_image_url: url_of(source),
    })
}

/// The embedded queue: claims the oldest queued jobs straight from the table, at most
/// `MAX_CONCURRENT_JOBS` at a time, until `shutdown` resolves; then returns once the jobs
/// running have finished (or a lease's time has passed).
pub async fn run_embedded(
    mut app: App,
    local: Arc<crate::queue::LocalQueue>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    const IDLE_POLL: Duration = Duration::from_millis(500);
    let bell = &local.bell;
    let claiming = Arc::new(tokio::sync::Mutex::new(()));
    let completer = Completer::start(&app, claiming.clone());
    app.completions = Some(completer.clone());
    let slots = Arc::new(Semaphore::new(app.config.max_concurrent_jobs as usize));
    // Jobs an enqueue inserted claimed, on a slot it took from `slots`. This task ends once
    // the queue is closed and every slot handed out has been used or dropped.
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let runs = app.clone();
    tokio::spawn(async move {
        while let Some((claim, permit)) = started.recv().await {
            spawn_run(&runs, claim, permit);
        }
    });
    local.open(slots.clone(), started_tx);
    // However this function ends, enqueues stop handing it jobs and the completer stops
    // claiming (dropped mid-way, the jobs already running are left to finish on their own).
    struct Stopping(Completer, Arc<crate::queue::LocalQueue>);
    impl Drop for Stopping {
        fn drop(&mut self) {
            self.1.close();
            self.0.stop();
        }
    }
    let stopping = Stopping(completer, local.clone());
    tokio::pin!(shutdown);
    loop {
        // Wait for at least one free slot, then claim as many jobs as there are free slots.
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        // Jobs completed in one batch free their permits together: let them all land, so one
        // claim takes their slots at once.
        tokio::task::yield_now().await;
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let claimed = match app.pool.get().await {
            Ok(conn) => {
                let _claiming = claiming.lock().await;
                let token = bell.before_claim();
                let line = jobs::claim_line(
                    &conn,
                    permits.len() as i64,
                    app.config.job_lease,
                    app.config.limits(),
                )
                .await;
                bell.after_claim(token, line.as_ref().ok().map(|l| l.left_waiting));
                line.map(|l| l.jobs).map_err(WorkerError::from)
            }
            Err(e) => Err(e.into()),
        };
        let claimed = claimed.unwrap_or_else(|e| {
            tracing::warn!(error = %chain(&e), "claiming jobs failed");
            Vec::new()
        });
        if claimed.is_empty() {
            drop(permits);
            tokio::select! {
                _ = bell.rung() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = &mut shutdown => break,
            }
            continue;
        }
        // claim_next never returns more jobs than it was asked for, so each has a permit.
        debug_assert!(claimed.len() <= permits.len());
        let line_was_empty = claimed.len() < permits.len();
        // Claims are serialised (this loop and the completer take `claiming`), which keeps the
        // start order the order positions promised; concurrent claimers would skip each
        // other's locked rows and start later jobs first.
        for (claim, permit) in claimed.into_iter().zip(permits.drain(..)) {
            spawn_run(&app, claim, permit);
        }
        // Asking again at once would find nothing (one more statement and commit per job at a
        // trickle). A ring sent meanwhile is kept by `Notify`, so no job enqueued meanwhile
        // waits for the poll; one that falls due later (a retry's backoff) is found by it.
        if line_was_empty {
            tokio::select! {
                _ = bell.rung() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = &mut shutdown => break,
            }
        }
    }
    drop(stopping);
    // The jobs already running finish and their completions are written before this returns:
    // a job cut off mid-run stays processing until its lease runs out, and then runs again.
    // The wait is capped at a lease's length, so that a hung job cannot hold the stop forever.
    // Every slot's permit back means no run, and no enqueue's hand-off, is left.
    let all = app.config.max_concurrent_jobs;
    let running = all as usize - slots.available_permits();
    if running > 0 {
        tracing::info!(running, "waiting for running jobs to finish");
    }
    if tokio::time::timeout(app.config.job_lease, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            running = all as usize - slots.available_permits(),
            "stopped waiting for running jobs after a lease's time; they run again once their leases run out"
        );
    }
}

/// Runs a claimed job on a local slot, then each job claimed with its completion, on the same
/// slot.
fn spawn_run(app: &App, claim: Claimed, permit: tokio::sync::OwnedSemaphorePermit) {
    let app = app.clone();
    tokio::spawn(async move {
        let mut next = Some(claim);
        while let Some(claim) = next.take() {
            let span = tracing::info_span!("job", job_id = %claim.job.id);
            match run_claimed_then(&app, claim, Handoff::Completer)
                .instrument(span)
                .await
            {
                Ok((_, Some(Next::Claimed(handed)))) => next = Some(handed),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %chain(&e), "job run failed; it stays processing until its lease expires")
                }
            }
        }
        drop(permit);
    });
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
    let messages = receive_sqs(client, queue_url, wait).await?;
    handle_received(app, client, queue_url, messages).await
}

/// Waits up to `wait` for a batch of up to 10 messages. Dropping this future loses no message:
/// one SQS has already handed over stays hidden until its visibility timeout ends, then comes
/// back.
pub async fn receive_sqs(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    wait: Duration,
) -> Result<Vec<aws_sdk_sqs::types::Message>, aws_sdk_sqs::Error> {
    crate::queue::count_request();
    let received = client
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(wait.as_secs() as i32)
        .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
        .send()
        .await?;
    Ok(received.messages.unwrap_or_default())
}

/// Hands received messages to the worker's handler as an `SqsEvent` and deletes those it did
/// not report as failed. Run to its end: dropped mid-way, it would cut jobs off mid-run.
pub async fn handle_received(
    app: &App,
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    messages: Vec<aws_sdk_sqs::types::Message>,
) -> Result<usize, aws_sdk_sqs::Error> {
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
    // One DeleteMessageBatch per batch, as the event source mapping does: fewer SQS requests per job.
    let entries: Vec<_> = handles
        .into_values()
        .enumerate()
        .map(|(i, handle)| {
            aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect();
    if !entries.is_empty() {
        crate::queue::count_request();
        client
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await?;
    }
    Ok(messages.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_stays_in_the_upper_half_and_is_capped() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs_f64(2.5));
        assert_eq!(backoff(1, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(3, 0.5), Duration::from_secs(15));
        assert_eq!(backoff(30, 1.0), Duration::from_secs(900));
        assert!(
            retry_delay(2) >= Duration::from_secs(5) && retry_delay(2) <= Duration::from_secs(10)
        );
    }
}
