//! Delivery. Postgres holds the job; the queue only says "look at job X" (or, for a provider
//! job a check found finished, "collect its output"). With `SQS_QUEUE_URL` set that is an SQS
//! message; without it, the embedded mode wakes the in-process claimer, which takes work
//! straight from the job table.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};

use aws_sdk_sqs::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::jobs::Claimed;

/// SQS API requests this process has made (sends, batches, visibility changes, receives,
/// deletes): what the benchmark divides by jobs to report SQS requests per job.
pub static SQS_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn count_request() {
    SQS_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The one message the queue carries: run the job, or, with `collect`, finish it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobMessage {
    pub job_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect: Option<Collection>,
}

/// A provider job a check found finished, handed to a worker to download, store and complete:
/// a worker's invocation has the time for a large download that a status request (API
/// Gateway's 30 s) or a poller tick does not. The output's URLs are kept on the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Collection {
    pub attempt: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("SQS SendMessage failed")]
    Send(
        #[source]
        Box<aws_sdk_sqs::error::SdkError<aws_sdk_sqs::operation::send_message::SendMessageError>>,
    ),
    #[error("SQS SendMessageBatch failed")]
    SendBatch(
        #[source]
        Box<
            aws_sdk_sqs::error::SdkError<
                aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError,
            >,
        >,
    ),
}

#[derive(Clone)]
pub enum Dispatcher {
    Sqs { client: Client, queue_url: String },
    Embedded { local: Arc<LocalQueue> },
}

/// The embedded queue's shared state: its doorbell and, while its runner runs, a way for an
/// enqueue to hand the runner a job it inserted already claimed.
#[derive(Default)]
pub struct LocalQueue {
    pub bell: Doorbell,
    runner: std::sync::Mutex<Option<Runner>>,
}

/// A running embedded runner: its local slots, and where it takes jobs started for it.
struct Runner {
    slots: Arc<Semaphore>,
    jobs: StartedJobs,
}

/// Jobs an enqueue started, each with the local slot it runs on.
pub type StartedJobs = mpsc::UnboundedSender<(Claimed, OwnedSemaphorePermit)>;

impl LocalQueue {
    /// Called by the runner as it starts: enqueues may now start jobs on its free slots.
    pub fn open(&self, slots: Arc<Semaphore>, jobs: StartedJobs) {
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = Some(Runner { slots, jobs });
    }

    /// Called by the runner as it stops: enqueues queue their jobs again.
    pub fn close(&self) {
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// One of the runner's free local slots, if it runs and has one.
    pub fn free_slot(&self) -> Option<LocalSlot> {
        let runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        let runner = runner.as_ref()?;
        Some(LocalSlot {
            permit: runner.slots.clone().try_acquire_owned().ok()?,
            jobs: runner.jobs.clone(),
        })
    }
}

/// A local slot held for a job being enqueued; dropped unused, it is free again.
pub struct LocalSlot {
    permit: OwnedSemaphorePermit,
    jobs: StartedJobs,
}

impl LocalSlot {
    /// Hands the runner a job that was inserted claimed and committed. The runner's hand-off
    /// task lives until the last slot it handed out is used, so this fails only while the
    /// runtime shuts down (the job's lease then runs out and the rescuer queues it again).
    pub fn run(self, claim: Claimed) -> Result<(), Box<Claimed>> {
        self.jobs
            .send((claim, self.permit))
            .map_err(|mpsc::error::SendError((claim, _))| Box::new(claim))
    }
}

/// The embedded queue's doorbell. A ring wakes the claimer, and is counted, so that after a
/// claim that left no job waiting the completer can tell whether one may have come since, and
/// skip a claim that would find nothing (one statement per job at a trickle).
pub struct Doorbell {
    wake: Notify,
    rings: AtomicU64,
    /// `rings` as read before the last claim, if that claim left no due job waiting.
    quiet_since: AtomicU64,
}

/// `quiet_since` when the last claim left jobs waiting, failed, or there has been none.
const UNKNOWN: u64 = u64::MAX;

impl Default for Doorbell {
    fn default() -> Self {
        Doorbell {
            wake: Notify::new(),
            rings: AtomicU64::new(0),
            quiet_since: AtomicU64::new(UNKNOWN),
        }
    }
}

impl Doorbell {
    /// A job may have become claimable: call after its commit.
    pub fn ring(&self) {
        self.rings.fetch_add(1, SeqCst);
        self.wake.notify_one();
    }

    /// Waits for a ring; one rung while nobody waited is kept for the next wait.
    pub async fn rung(&self) {
        self.wake.notified().await
    }

    /// Read before a claim's statement is sent. A job committed before this read is in that
    /// statement's snapshot; one committed after it rings after it.
    pub fn before_claim(&self) -> u64 {
        self.rings.load(SeqCst)
    }

    /// Records what the claim begun at `token` found (`None`: it failed). Claims are serialised,
    /// so the last one recorded is the latest.
    pub fn after_claim(&self, token: u64, left_waiting: Option<bool>) {
        let quiet = match left_waiting {
            Some(false) => token,
            _ => UNKNOWN,
        };
        self.quiet_since.store(quiet, SeqCst);
    }

    /// False only when the last claim left no due job waiting and nothing has rung since.
    /// A job queued with a delay (a retry's backoff) rang when it was queued, not when it falls
    /// due; the claimer's poll takes it, as it does jobs another process queued.
    pub fn may_have_waiting(&self) -> bool {
        let quiet = self.quiet_since.load(SeqCst);
        quiet == UNKNOWN || self.rings.load(SeqCst) != quiet
    }
}

impl Dispatcher {
    pub fn sqs(client: Client, queue_url: String) -> Self {
        Dispatcher::Sqs { client, queue_url }
    }

    pub fn embedded() -> Self {
        Dispatcher::Embedded {
            local: Arc::new(LocalQueue::default()),
        }
    }

    /// Asks for the job to be run, after `delay` (SQS allows at most 15 minutes).
    pub async fn dispatch(&self, job_id: Uuid, delay: Duration) -> Result<(), QueueError> {
        match self {
            Dispatcher::Sqs { client, queue_url } => {
                count_request();
                let body = serde_json::to_string(&JobMessage {
                    job_id,
                    collect: None,
                })
                .expect("a uuid always serialises");
                client
                    .send_message()
                    .queue_url(queue_url)
                    .message_body(body)
                    .delay_seconds(whole_seconds(delay, 900))
                    .send()
                    .await
                    .map_err(|e| QueueError::Send(Box::new(e)))?;
                Ok(())
            }
            // The embedded claimer polls the table, so a delay needs no timer here; a wake-up
            // just saves it waiting for its next poll.
            Dispatcher::Embedded { local } => {
                local.bell.ring();
                Ok(())
            }
        }
    }

    /// Whether workers take messages from SQS; the embedded queue's have no time limit, so
    /// its checks collect provider output themselves.
    pub fn is_sqs(&self) -> bool {
        matches!(self, Dispatcher::Sqs { .. })
    }

    /// Hands a finished provider job's collection to a worker. The embedded queue carries no
    /// such message: its checks collect themselves ([`Dispatcher::is_sqs`]).
    pub async fn hand_off(&self, job_id: Uuid, collect: Collection) -> Result<(), QueueError> {
        let Dispatcher::Sqs { client, queue_url } = self else {
            return Ok(());
        };
        count_request();
        let body = serde_json::to_string(&JobMessage {
            job_id,
            collect: Some(collect),
        })
        .expect("a job message always serialises");
        client
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| QueueError::Send(Box::new(e)))?;
        Ok(())
    }

    /// Asks for several jobs to be run now; returns how many messages were accepted. Used by
    /// the outbox, which tries again later for any that were not.
    pub async fn dispatch_batch(&self, job_ids: &[Uuid]) -> Result<usize, QueueError> {
        match self {
            Dispatcher::Sqs { client, queue_url } => {
                let mut sent = 0;
                for chunk in job_ids.chunks(10) {
                    count_request();
                    let entries = chunk
                        .iter()
                        .enumerate()
                        .map(|(i, job_id)| {
                            let body = serde_json::to_string(&JobMessage {
                                job_id: *job_id,
                                collect: None,
                            })
                            .expect("a uuid always serialises");
                            aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .message_body(body)
                                .build()
                                .expect("id and body are set")
                        })
                        .collect::<Vec<_>>();
                    let out = client
                        .send_message_batch()
                        .queue_url(queue_url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map_err(|e| QueueError::SendBatch(Box::new(e)))?;
                    sent += out.successful.len();
                }
                Ok(sent)
            }
            Dispatcher::Embedded { local } => {
                local.bell.ring();
                Ok(job_ids.len())
            }
        }
    }

    /// Hides a received message for `delay` before it is delivered again (SQS only).
    pub async fn defer(&self, receipt_handle: &str, delay: Duration) {
        if let Dispatcher::Sqs { client, queue_url } = self {
            count_request();
            let result = client
                .change_message_visibility()
                .queue_url(queue_url)
                .receipt_handle(receipt_handle)
                .visibility_timeout(whole_seconds(delay, 43_200))
                .send()
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %crate::telemetry::chain(&e), "could not change the message's visibility");
            }
        }
    }
}

/// A delay in SQS's whole seconds, rounded up, so that a message never comes back before the
/// job it carries is due (one that did would find it not yet due and be deferred again, or,
/// should the job fall due between the claim and the look at why it failed, be acknowledged
/// as waiting for a slot).
fn whole_seconds(delay: Duration, max: i32) -> i32 {
    delay.as_secs_f64().ceil().min(f64::from(max)) as i32
}

/// Builds an SQS client from the standard AWS configuration chain (environment, profile, the
/// Lambda role). A queue URL that is not on amazonaws.com (moto, ElasticMQ, LocalStack) is a
/// local SQS API, and the client is pointed at it, so `sam local invoke` and the local runner
/// need nothing but the queue URL.
pub async fn sqs_client(queue_url: &str) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = local_endpoint(queue_url) {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

fn local_endpoint(queue_url: &str) -> Option<String> {
    let (scheme, rest) = queue_url.split_once("://")?;
    let host = rest.split('/').next()?;
    let hostname = host.split(':').next()?;
    (!hostname.ends_with(".amazonaws.com")).then(|| format!("{scheme}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_rounded_up_to_whole_seconds_and_capped() {
        assert_eq!(whole_seconds(Duration::ZERO, 900), 0);
        assert_eq!(whole_seconds(Duration::from_millis(5_001), 900), 6);
        assert_eq!(whole_seconds(Duration::from_secs(7), 900), 7);
        assert_eq!(whole_seconds(Duration::from_secs(3_600), 900), 900);
    }

    #[test]
    fn a_new_doorbell_knows_nothing_of_the_line() {
        assert!(Doorbell::default().may_have_waiting());
    }

    #[test]
    fn a_claim_that_left_nothing_waiting_quiets_the_line_until_the_next_ring() {
        let bell = Doorbell::default();
        let token = bell.before_claim();
        bell.after_claim(token, Some(false));
        assert!(!bell.may_have_waiting());
        bell.ring();
        assert!(bell.may_have_waiting());
    }

    #[test]
    fn a_ring_while_a_claim_runs_keeps_the_line_awake_whatever_the_claim_found() {
        let bell = Doorbell::default();
        let token = bell.before_claim();
        // A job committed after the claim's snapshot was taken rings here.
        bell.ring();
        bell.after_claim(token, Some(false));
        assert!(bell.may_have_waiting());
    }

    #[test]
    fn a_claim_that_left_jobs_waiting_or_failed_keeps_the_line_awake() {
        let bell = Doorbell::default();
        bell.after_claim(bell.before_claim(), Some(false));
        bell.after_claim(bell.before_claim(), Some(true));
        assert!(bell.may_have_waiting());
        bell.after_claim(bell.before_claim(), Some(false));
        bell.after_claim(bell.before_claim(), None);
        assert!(bell.may_have_waiting());
    }

    #[test]
    fn a_local_queue_url_names_its_own_endpoint_and_an_aws_one_does_not() {
        assert_eq!(
            local_endpoint("http://127.0.0.1:5000/123456789012/media-jobs").as_deref(),
            Some("http://127.0.0.1:5000")
        );
        assert_eq!(
            local_endpoint("https://sqs.eu-west-1.amazonaws.com/123456789012/media-jobs"),
            None
        );
    }
}
