//! The `generation_jobs` repository. Every state change is a named, guarded UPDATE that names
//! the state (and, once claimed, the attempt) it expects, so a late or duplicate transition finds
//! no row and changes nothing.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::{Identity, Job, JobStatus, JobType, Media};

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("database error")]
    Db(#[from] tokio_postgres::Error),
    #[error("stored job {id} has an unknown job_type {job_type:?}")]
    UnknownType { id: Uuid, job_type: String },
    #[error("{0}")]
    Refused(Refusal),
}

/// Why an enqueue was refused by the abuse limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many jobs created in the last minute; the next is allowed after `retry_after`.
    RateLimited {
        per_minute: u32,
        retry_after: Duration,
    },
    /// Too many of the user's jobs are waiting already.
    QueueFull { max_queued: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited { per_minute, .. } => {
                write!(f, "at most {per_minute} jobs a minute may be created")
            }
            Refusal::QueueFull { max_queued } => {
                write!(f, "at most {max_queued} of your jobs may wait at once")
            }
        }
    }
}

/// Per-user abuse limits on job creation; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_minute: u32,
    pub max_queued: u32,
}

impl Quota {
    /// For callers that are not users: tests, tools, benchmarks.
    pub const UNLIMITED: Quota = Quota {
        per_minute: 0,
        max_queued: 0,
    };
}

impl JobsError {
    /// The database could not be reached or went away mid-request (a restart, a failover, a
    /// dropped connection): worth retrying, unlike a statement the server rejected.
    pub fn is_unavailable(&self) -> bool {
        let JobsError::Db(e) = self else {
            return false;
        };
        match e.code() {
            // Connection exceptions, operator intervention (shutdown), insufficient resources.
            Some(state) => ["08", "57", "53"]
                .iter()
                .any(|class| state.code().starts_with(class)),
            None => {
                e.is_closed()
                    || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
            }
        }
    }
}

pub struct NewJob<'a> {
    pub id: Uuid,
    pub owner: &'a Identity,
    pub job_type: JobType,
    pub entity_id: Uuid,
    pub params: &'a serde_json::Value,
    pub max_attempts: i32,
    pub limits: Limits,
    pub quota: Quota,
    /// A local worker stands ready: a job given a slot is inserted claimed, with this lease.
    pub start: Option<Duration>,
}

/// How a new job was admitted.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub created_at: DateTime<Utc>,
    /// A slot was reserved for it: it starts as soon as a worker takes its message.
    pub direct: bool,
    /// With [`NewJob::start`], it was inserted claimed (attempt 1): run it.
    pub started: Option<Claimed>,
    /// Queued jobs before it (its position is one more); 0 when `direct`.
    pub queued_ahead: i64,
}

/// How long a slot reserved at enqueue waits for the job's worker before it lapses.
pub const RESERVATION: Duration = Duration::from_secs(60);

/// The slot limits a claim or an enqueue works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// MAX_CONCURRENT_JOBS: how many slots there are.
    pub slots: u32,
    /// MAX_ACTIVE_PER_USER: how many of them one user may hold.
    pub per_user: u32,
}

impl From<u32> for Limits {
    /// The same number for both: no per-user limit beyond the slots themselves.
    fn from(slots: u32) -> Self {
        Limits {
            slots,
            per_user: slots,
        }
    }
}

/// A job claimed by a worker: the attempt number fences every later transition, and the limits
/// it was claimed under decide who is next for its slot.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    pub limits: Limits,
}

impl Claimed {
    pub fn attempt(&self) -> i32 {
        self.job.attempts
    }
}

/// One media item to attach to a completing job.
#[derive(Debug, Clone)]
pub struct NewMedia {
    pub id: Uuid,
    pub media_type: &'static str,
    pub mime_type: &'static str,
    pub storage: &'static str,
    pub storage_key: String,
    pub public_url: String,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub size_bytes: i64,
}

/// A job as its owner sees it, with its queue position while it waits.
#[derive(Debug, Clone)]
pub struct OwnedJob {
    pub job: Job,
    pub position: Option<i64>,
    /// While queued: the mean run time of recent completed jobs of its type.
    pub recent_run_seconds: Option<f64>,
    /// While the provider is working on it: when it was submitted and expected back.
    pub provider_wait: Option<ProviderWait>,
}

#[derive(Debug, Clone, Copy)]
pub struct ProviderWait {
    pub submitted_at: DateTime<Utc>,
    pub expected_at: DateTime<Utc>,
    pub checked_at: Option<DateTime<Utc>>,
}

/// A job the provider is working on, taken for a check.
#[derive(Debug, Clone)]
pub struct AwaitingJob {
    pub job: Job,
    pub external_id: String,
    pub submitted_at: DateTime<Utc>,
    pub expected_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    /// The output's URLs, once a check found the job finished and handed it on to collect.
    pub outputs: Option<Vec<String>>,
}

/// How a submitted job is to be followed.
#[derive(Debug, Clone, Copy)]
pub struct Followup {
    pub expected_in: Duration,
    pub max_wait: Duration,
    pub first_check_in: Duration,
    pub hold_slot: bool,
}

pub async fn insert(db: &impl GenericClient, new: &NewJob<'_>) -> Result<Admitted, JobsError> {
    let stmt = db.prepare_cached(include_str!("insert.sql")).await?;
    let row = db
        .query_one(
            &stmt,
            &[
                &new.id,
                &new.owner.user_id,
                &new.owner.tenant_id,
                &new.job_type.as_str(),
                &new.entity_id,
                new.params,
                &new.max_attempts,
                &(new.limits.slots as i32),
                &RESERVATION.as_secs_f64(),
                &(new.limits.per_user as i64),
                &(new.quota.per_minute as i64),
                &(new.quota.max_queued as i64),
                &new.start.map(|lease| lease.as_secs_f64()),
            ],
        )
        .await?;
    let Some(created_at) = row.try_get::<_, Option<DateTime<Utc>>>("created_at")? else {
        let recent: i64 = row.try_get("recent_jobs")?;
        let per_minute = i64::from(new.quota.per_minute);
        return Err(JobsError::Refused(
            if per_minute > 0 && recent >= per_minute {
                let oldest: Option<DateTime<Utc>> = row.try_get("recent_oldest")?;
                let free_at = oldest.unwrap_or_else(Utc::now) + chrono::Duration::seconds(60);
                Refusal::RateLimited {
                    per_minute: new.quota.per_minute,
                    retry_after: (free_at - Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .max(Duration::from_secs(1)),
                }
            } else {
                Refusal::QueueFull {
                    max_queued: new.quota.max_queued,
                }
            },
        ));
    };
    let started = match row.try_get::<_, Option<DateTime<Utc>>>("started_at")? {
        Some(_) => Some(Claimed {
            job: job_from_row(&row)?,
            limits: new.limits,
        }),
        None => None,
    };
    Ok(Admitted {
        created_at,
        direct: row.try_get("direct")?,
        started,
        queued_ahead: row.try_get("queued_ahead")?,
    })
}

/// What a claim of one named job found.
#[derive(Debug)]
pub enum ClaimResult {
    Claimed(Box<Claimed>),
    /// Queued and due, but every slot is taken.
    NoSlot,
    /// Queued, but backing off until then.
    NotDue(DateTime<Utc>),
    /// Unknown, running elsewhere, or finished: nothing to do.
    NotClaimable,
}

/// Claims the named job if it is queued and due, with the slot reserved for it or a free one
/// among the first `max_active`. One statement; only a failed claim asks why.
pub async fn claim_by_id(
    db: &impl GenericClient,
    id: Uuid,
    lease: Duration,
    limits: impl Into<Limits>,
) -> Result<ClaimResult, JobsError> {
    let limits = limits.into();
    let stmt = db.prepare_cached(include_str!("claim_by_id.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &id,
        &lease.as_secs_f64(),
        &(limits.slots as i32),
        &(limits.per_user as i64),
    ];
    if let Some(row) = retrying(|| db.query_opt(&stmt, params)).await? {
        return Ok(ClaimResult::Claimed(Box::new(Claimed {
            job: job_from_row(&row)?,
            limits,
        })));
    }
    let stmt = db.prepare_cached(include_str!("claim_state.sql")).await?;
    Ok(match db.query_opt(&stmt, &[&id]).await? {
        Some(row) if row.try_get::<_, JobStatus>("status")? == JobStatus::Queued => {
            if row.try_get("due")? {
                ClaimResult::NoSlot
            } else {
                ClaimResult::NotDue(row.try_get("run_after")?)
            }
        }
        _ => ClaimResult::NotClaimable,
    })
}

/// Claims up to `limit` jobs as slots allow, in one statement and one commit (the embedded
/// queue): reserved jobs first, then the next in fair-share order.
pub async fn claim_next(
    db: &impl GenericClient,
    limit: i64,
    lease: Duration,
    limits: impl Into<Limits>,
) -> Result<Vec<Claimed>, JobsError> {
    Ok(claim_line(db, limit, lease, limits).await?.jobs)
}

/// What a batch claim took, and whether it left a due job waiting.
#[derive(Debug)]
pub struct LineClaim {
    pub jobs: Vec<Claimed>,
    /// A due job is still queued for a slot or for its user's allowance. When not, no claim
    /// can take anything until a job comes (or a delayed one falls due).
    pub left_waiting: bool,
}

/// [`claim_next`], also saying whether it left a due job waiting.
pub async fn claim_line(
    db: &impl GenericClient,
    limit: i64,
    lease: Duration,
    limits: impl Into<Limits>,
) -> Result<LineClaim, JobsError> {
    let limits = limits.into();
    let stmt = db.prepare_cached(CLAIM_BATCH).await?;
    let nothing = CompletionColumns::of(&[], "");
    let params = LineParams::new(&[], limit, lease, limits);
    let params = params.refs(&nothing);
    let rows = retrying(|| db.query(&stmt, &params)).await?;
    line_from_rows(&rows, limits)
}

/// The completions with the claim that hands their slots on, as one statement.
const CLAIM_BATCH: &str = concat!(
    include_str!("completions.sql"),
    include_str!("claim_batch.sql")
);

/// claim_batch.sql's own parameters, after completions.sql's.
struct LineParams<'a> {
    takes: &'a [bool],
    extra: i64,
    lease_secs: f64,
    slots: i32,
    per_user: i64,
}

impl<'a> LineParams<'a> {
    fn new(takes: &'a [bool], extra: i64, lease: Duration, limits: Limits) -> Self {
        LineParams {
            takes,
            extra,
            lease_secs: lease.as_secs_f64(),
            slots: limits.slots as i32,
            per_user: limits.per_user as i64,
        }
    }

    fn refs<'s>(
        &'s self,
        completions: &'s CompletionColumns<'_>,
    ) -> Vec<&'s (dyn tokio_postgres::types::ToSql + Sync)> {
        let mut refs = completions.refs();
        refs.extend([
            &self.takes as &(dyn tokio_postgres::types::ToSql + Sync),
            &self.extra,
            &self.lease_secs,
            &self.slots,
            &self.per_user,
        ]);
        refs
    }
}

fn line_from_rows(rows: &[Row], limits: Limits) -> Result<LineClaim, JobsError> {
    let left_waiting = match rows.first() {
        Some(row) => row.try_get("left_waiting")?,
        None => true,
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        // The one row of a claim that took nothing carries only the flag.
        if row.try_get::<_, Option<Uuid>>("id")?.is_some() {
            jobs.push(Claimed {
                job: job_from_row(row)?,
                limits,
            });
        }
    }
    // UPDATE ... RETURNING keeps no order; hand jobs out in the order they were owed a slot.
    jobs.sort_by_key(|c| (c.job.created_at, c.job.id));
    Ok(LineClaim { jobs, left_waiting })
}

/// Records progress and renews the lease. `Ok(false)` means the attempt is no longer current.
pub async fn heartbeat(
    db: &impl GenericClient,
    claim: &Claimed,
    progress: i16,
    lease: Duration,
) -> Result<bool, JobsError> {
    let stmt = db.prepare_cached(include_str!("heartbeat.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &claim.job.id,
        &claim.attempt(),
        &progress.clamp(0, 99),
        &lease.as_secs_f64(),
    ];
    let row = retrying(|| db.query_opt(&stmt, params)).await?;
    Ok(row.is_some())
}

/// What a settling transition (complete, fail, requeue, cancel) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It applied. `next` is the oldest job now waiting for the slot it freed: send it a fresh
    /// message, since its own may be deferred for minutes.
    Applied { next: Option<Uuid> },
    /// The attempt is no longer current, or the job had already finished: nothing changed.
    NotCurrent,
}

impl Settled {
    pub fn applied(self) -> bool {
        matches!(self, Settled::Applied { .. })
    }
}

/// Runs one statement again when Postgres picked it as a deadlock victim. Safe because every
/// statement here is a single atomic, guarded transition: a victim changed nothing.
async fn retrying<T, Fut>(mut run: impl FnMut() -> Fut) -> Result<T, tokio_postgres::Error>
where
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    for _ in 0..3 {
        match run().await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
                tracing::debug!("deadlock victim; running the statement again");
            }
            done => return done,
        }
    }
    run().await
}

fn settled(row: Option<Row>) -> Result<Settled, JobsError> {
    Ok(match row {
        Some(row) => Settled::Applied {
            next: row.try_get("next_waiting")?,
        },
        None => Settled::NotCurrent,
    })
}

/// Completes the job with its media. Nothing is written unless the attempt is current.
pub async fn complete(
    db: &impl GenericClient,
    claim: &Claimed,
    media: &[NewMedia],
    model: &str,
    credits: i32,
) -> Result<Settled, JobsError> {
    let stmt = db.prepare_cached(include_str!("complete.sql")).await?;
    let m = MediaColumns::of(media.iter());
    let attempt = claim.attempt();
    let per_user = claim.limits.per_user as i64;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&claim.job.id, &attempt];
    params.extend(m.refs());
    params.extend([
        &model as &(dyn tokio_postgres::types::ToSql + Sync),
        &credits,
        &per_user,
    ]);
    let row = retrying(|| db.query_opt(&stmt, &params)).await?;
    settled(row)
}

/// Media items as the column arrays the completion statements unnest.
struct MediaColumns<'a> {
    ids: Vec<Uuid>,
    media_types: Vec<&'a str>,
    mime_types: Vec<&'a str>,
    storages: Vec<&'a str>,
    keys: Vec<&'a str>,
    urls: Vec<&'a str>,
    widths: Vec<Option<i32>>,
    heights: Vec<Option<i32>>,
    sizes: Vec<i64>,
}

impl<'a> MediaColumns<'a> {
    fn of(media: impl Iterator<Item = &'a NewMedia> + Clone) -> Self {
        MediaColumns {
            ids: media.clone().map(|m| m.id).collect(),
            media_types: media.clone().map(|m| m.media_type).collect(),
            mime_types: media.clone().map(|m| m.mime_type).collect(),
            storages: media.clone().map(|m| m.storage).collect(),
            keys: media.clone().map(|m| m.storage_key.as_str()).collect(),
            urls: media.clone().map(|m| m.public_url.as_str()).collect(),
            widths: media.clone().map(|m| m.width).collect(),
            heights: media.clone().map(|m| m.height).collect(),
            sizes: media.map(|m| m.size_bytes).collect(),
        }
    }

    /// The columns as statement parameters, in the order the statements take them.
    fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.ids,
            &self.media_types,
            &self.mime_types,
            &self.storages,
            &self.keys,
            &self.urls,
            &self.widths,
            &self.heights,
            &self.sizes,
        ]
    }
}

/// One finished job for [`complete_many`].
#[derive(Debug, Clone)]
pub struct Completion {
    pub job_id: Uuid,
    pub attempt: i32,
    pub media: Vec<NewMedia>,
    pub credits: i32,
}

/// Completes many jobs in one statement and one commit, each fenced by its own attempt as in
/// [`complete`]. Returns the ids of the jobs whose completion applied; the others changed
/// nothing and had none of their media written. Names no next job in line for the freed slots
/// (the embedded claimer takes them from the table).
pub async fn complete_many(
    db: &impl GenericClient,
    jobs: &[&Completion],
    model: &str,
) -> Result<std::collections::HashSet<Uuid>, JobsError> {
    let stmt = db
        .prepare_cached(concat!(
            include_str!("completions.sql"),
            include_str!("complete_batch.sql")
        ))
        .await?;
    let columns = CompletionColumns::of(jobs, model);
    let params = columns.refs();
    let rows = retrying(|| db.query(&stmt, &params)).await?;
    rows.iter()
        .map(|r| r.try_get::<_, Uuid>(0).map_err(JobsError::from))
        .collect()
}

/// completions.sql's parameters.
struct CompletionColumns<'a> {
    ids: Vec<Uuid>,
    attempts: Vec<i32>,
    credits: Vec<i32>,
    /// Each job's media in order, with the job they belong to and their ordinal.
    media_job: Vec<Uuid>,
    ordinals: Vec<i16>,
    media: MediaColumns<'a>,
    model: &'a str,
}

impl<'a> CompletionColumns<'a> {
    fn of(jobs: &[&'a Completion], model: &'a str) -> Self {
        CompletionColumns {
            ids: jobs.iter().map(|j| j.job_id).collect(),
            attempts: jobs.iter().map(|j| j.attempt).collect(),
            credits: jobs.iter().map(|j| j.credits).collect(),
            media_job: jobs
                .iter()
                .flat_map(|j| j.media.iter().map(|_| j.job_id))
                .collect(),
            ordinals: jobs
                .iter()
                .flat_map(|j| (0..j.media.len()).map(|o| o as i16))
                .collect(),
            media: MediaColumns::of(jobs.iter().flat_map(|j| j.media.iter())),
            model,
        }
    }

    fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.ids,
            &self.attempts,
            &self.credits,
            &self.media_job,
            &self.ordinals,
        ];
        refs.extend(self.media.refs());
        refs.push(&self.model);
        refs
    }
}

/// How the embedded completer's round ended.
#[derive(Debug)]
pub enum RoundEnd {
    /// Committed: the jobs whose completion applied, and the jobs claimed for their slots.
    /// `stranded`: completed jobs whose slots another statement held, which the round could
    /// neither hand on nor free: [`free_stranded`] frees them.
    Committed {
        applied: std::collections::HashSet<Uuid>,
        line: LineClaim,
        stranded: Vec<Uuid>,
    },
    /// Nothing was written: the completions must be written again. (Only a lost connection
    /// leaves it unknown. If the round did commit, a completion written again is refused by
    /// its fence and reported as not applied, and the jobs it claimed run again once their
    /// lease runs out.)
    Undone(JobsError),
    /// Committed, but what it claimed could not be read: those jobs run again once their lease
    /// runs out. `applied` is empty when even that could not be read.
    Unread {
        applied: std::collections::HashSet<Uuid>,
        error: JobsError,
    },
}

/// The embedded completer's round in one statement, one round trip and one commit: `jobs`'
/// completions, and claims for the slots they free, one for each completed job whose `takes`
/// (beside it in `jobs`) is true. A completed job's slot goes straight to the next job: one
/// slot write per job instead of a release and a take. The round is the drain's critical
/// path, and every round trip is a wake-up of this process and of a Postgres backend on the
/// same few cores: this was a transaction of six round trips, then of two.
pub async fn complete_and_claim(
    db: &impl GenericClient,
    jobs: &[&Completion],
    takes: &[bool],
    model: &str,
    lease: Duration,
    limits: impl Into<Limits>,
) -> RoundEnd {
    // One flag per completion: `unnest` would pad a short list with NULLs, read as false.
    debug_assert_eq!(jobs.len(), takes.len());
    let limits = limits.into();
    let stmt = match db.prepare_cached(CLAIM_BATCH).await {
        Ok(stmt) => stmt,
        Err(e) => return RoundEnd::Undone(e.into()),
    };
    let columns = CompletionColumns::of(jobs, model);
    let params = LineParams::new(takes, 0, lease, limits);
    let params = params.refs(&columns);
    let rows = match retrying(|| db.query(&stmt, &params)).await {
        Ok(rows) => rows,
        Err(e) => return RoundEnd::Undone(e.into()),
    };
    let read = rows.first().map(|r| {
        Ok::<_, tokio_postgres::Error>((
            r.try_get::<_, Vec<Uuid>>("applied")?,
            r.try_get::<_, Vec<Uuid>>("stranded")?,
        ))
    });
    let (applied, stranded) = match read {
        Some(Ok((applied, stranded))) => (applied.into_iter().collect(), stranded),
        None => Default::default(),
        Some(Err(e)) => {
            return RoundEnd::Unread {
                applied: Default::default(),
                error: e.into(),
            }
        }
    };
    match line_from_rows(&rows, limits) {
        Ok(line) => RoundEnd::Committed {
            applied,
            line,
            stranded,
        },
        Err(error) => RoundEnd::Unread { applied, error },
    }
}

/// Frees the slots a committed round left `stranded`, waiting for whoever holds them. Returns
/// how many it freed.
pub async fn free_stranded(db: &impl GenericClient, jobs: &[Uuid]) -> Result<u64, JobsError> {
    let stmt = db.prepare_cached(include_str!("free_stranded.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&jobs];
    Ok(retrying(|| db.execute(&stmt, params)).await?)
}

/// Fails the job for good, keeping the attempt's error.
pub async fn fail(
    db: &impl GenericClient,
    claim: &Claimed,
    error: &str,
    retryable: bool,
) -> Result<Settled, JobsError> {
    let stmt = db.prepare_cached(include_str!("fail.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &claim.job.id,
        &claim.attempt(),
        &error,
        &retryable,
        &(claim.limits.per_user as i64),
    ];
    let row = retrying(|| db.query_opt(&stmt, params)).await?;
    settled(row)
}

/// Returns the job to the queue after a retryable error, not to be claimed for `delay`.
pub async fn requeue(
    db: &impl GenericClient,
    claim: &Claimed,
    error: &str,
    delay: Duration,
) -> Result<Settled, JobsError> {
    let stmt = db.prepare_cached(include_str!("requeue.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &claim.job.id,
        &claim.attempt(),
        &error,
        &delay.as_secs_f64(),
        &(claim.limits.per_user as i64),
    ];
    let row = retrying(|| db.query_opt(&stmt, params)).await?;
    settled(row)
}

/// A processing job whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    pub id: Uuid,
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_expires_at: DateTime<Utc>,
}

/// One page of leases that expired before `before`, after the keyset `after`.
pub async fn expired_leases(
    db: &impl GenericClient,
    before: DateTime<Utc>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ExpiredLease>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("expired_leases.sql"))
        .await?;
    let (after_at, after_id) = (after.map(|a| a.0), after.map(|a| a.1));
    let rows = db
        .query(&stmt, &[&before, &after_at, &after_id, &limit])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ExpiredLease {
                id: r.try_get("id")?,
                attempts: r.try_get("attempts")?,
                max_attempts: r.try_get("max_attempts")?,
                lease_expires_at: r.try_get("lease_expires_at")?,
            })
        })
        .collect()
}

/// Re-queues a job whose lease expired, not before `run_after`. `Ok(false)`: its worker renewed
/// the lease or finished first.
pub async fn rescue_requeue(
    db: &impl GenericClient,
    lease: &ExpiredLease,
    error: &str,
    run_after: DateTime<Utc>,
) -> Result<bool, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("rescue_requeue.sql"))
        .await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&lease.id, &lease.attempts, &error, &run_after];
    Ok(retrying(|| db.query_opt(&stmt, params)).await?.is_some())
}

/// Fails a job whose last allowed attempt lost its lease.
pub async fn rescue_fail(
    db: &impl GenericClient,
    lease: &ExpiredLease,
    error: &str,
) -> Result<bool, JobsError> {
    let stmt = db.prepare_cached(include_str!("rescue_fail.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&lease.id, &lease.attempts, &error];
    Ok(retrying(|| db.query_opt(&stmt, params)).await?.is_some())
}

/// Marks and returns up to `limit` queued jobs whose message must be sent again (the outbox).
pub async fn take_undispatched(
    db: &impl GenericClient,
    grace: Duration,
    limit: i64,
) -> Result<Vec<Uuid>, JobsError> {
    let stmt = db.prepare_cached(include_str!("undispatched.sql")).await?;
    let rows = db.query(&stmt, &[&grace.as_secs_f64(), &limit]).await?;
    rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
}

/// Cancels the owner's unfinished job. `NotCurrent`: no such unfinished job of theirs.
pub async fn cancel(
    db: &impl GenericClient,
    id: Uuid,
    owner: &Identity,
    per_user: u32,
) -> Result<Settled, JobsError> {
    let stmt = db.prepare_cached(include_str!("cancel.sql")).await?;
    let per_user = per_user as i64;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&id, &owner.user_id, &owner.tenant_id, &per_user];
    settled(retrying(|| db.query_opt(&stmt, params)).await?)
}

/// One attempt's error, as kept.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptError {
    pub attempt: i32,
    pub retryable: bool,
    pub message: String,
    pub at: DateTime<Utc>,
}

pub async fn attempt_errors(
    db: &impl GenericClient,
    job_id: Uuid,
) -> Result<Vec<AttemptError>, JobsError> {
    let stmt = db.prepare_cached(include_str!("job_errors.sql")).await?;
    let rows = db.query(&stmt, &[&job_id]).await?;
    rows.iter()
        .map(|r| {
            Ok(AttemptError {
                attempt: r.try_get("attempt")?,
                retryable: r.try_get("retryable")?,
                message: r.try_get("message")?,
                at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// Records that the provider accepted the job; the attempt's lease ends here.
pub async fn submitted(
    db: &impl GenericClient,
    claim: &Claimed,
    external_id: &str,
    followup: Followup,
) -> Result<Settled, JobsError> {
    let stmt = db.prepare_cached(include_str!("submitted.sql")).await?;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &claim.job.id,
        &claim.attempt(),
        &external_id,
        &followup.expected_in.as_secs_f64(),
        &followup.max_wait.as_secs_f64(),
        &followup.first_check_in.as_secs_f64(),
        &followup.hold_slot,
        &(claim.limits.per_user as i64),
    ];
    let row = retrying(|| db.query_opt(&stmt, params)).await?;
    settled(row)
}

/// Takes up to `limit` waiting jobs whose check is due, holding each for `lease`.
pub async fn claim_due_checks(
    db: &impl GenericClient,
    limit: i64,
    lease: Duration,
) -> Result<Vec<AwaitingJob>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("claim_due_checks.sql"))
        .await?;
    let rows = db.query(&stmt, &[&limit, &lease.as_secs_f64()]).await?;
    rows.iter().map(awaiting_from_row).collect()
}

/// Takes one waiting job for a check, unless it was checked less than `min_interval` ago (or,
/// with `attempt`, unless that attempt is no longer the job's current one).
pub async fn claim_check(
    db: &impl GenericClient,
    id: Uuid,
    min_interval: Duration,
    lease: Duration,
    attempt: Option<i32>,
) -> Result<Option<AwaitingJob>, JobsError> {
    let stmt = db.prepare_cached(include_str!("claim_check.sql")).await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &id,
                &min_interval.as_secs_f64(),
                &lease.as_secs_f64(),
                &attempt,
            ],
        )
        .await?;
    row.as_ref().map(awaiting_from_row).transpose()
}

/// Keeps the output a check found ready, for a worker to collect, and when to send it another
/// message if none has by then. False when the job has moved on meanwhile.
pub async fn handed(
    db: &impl GenericClient,
    job: &AwaitingJob,
    outputs: &[String],
    resend_in: Duration,
) -> Result<bool, JobsError> {
    let stmt = db.prepare_cached(include_str!("handed.sql")).await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &job.job.id,
                &job.job.attempts,
                &outputs,
                &resend_in.as_secs_f64(),
            ],
        )
        .await?;
    Ok(row.is_some())
}

/// Takes a job handed to a worker to collect, holding it for `lease`. `None` when another
/// collection holds it, or the job has moved on.
pub async fn take_handed_check(
    db: &impl GenericClient,
    id: Uuid,
    attempt: i32,
    lease: Duration,
) -> Result<Option<AwaitingJob>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("take_handed_check.sql"))
        .await?;
    let row = db
        .query_opt(&stmt, &[&id, &attempt, &lease.as_secs_f64()])
        .await?;
    row.as_ref().map(awaiting_from_row).transpose()
}

/// The provider is still working: records progress and its latest estimate, and when to ask
/// again. False when the job has moved on meanwhile.
pub async fn check_pending(
    db: &impl GenericClient,
    job: &AwaitingJob,
    progress: i16,
    expected_in: Option<Duration>,
    next_check_in: Duration,
) -> Result<bool, JobsError> {
    let stmt = db.prepare_cached(include_str!("check_pending.sql")).await?;
    let expected: Option<f64> = expected_in.map(|d| d.as_secs_f64());
    let row = db
        .query_opt(
            &stmt,
            &[
                &job.job.id,
                &job.job.attempts,
                &progress,
                &expected,
                &next_check_in.as_secs_f64(),
            ],
        )
        .await?;
    Ok(row.is_some())
}

/// When the next waiting job is due for a check; `None` when no job waits on the provider.
pub async fn next_check_due(db: &impl GenericClient) -> Result<Option<DateTime<Utc>>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("next_check_due.sql"))
        .await?;
    Ok(db.query_one(&stmt, &[]).await?.try_get("due")?)
}

/// An input image the owner may use: where it is stored and the URL it is served at.
#[derive(Debug, Clone)]
pub struct InputMedia {
    pub id: Uuid,
    pub storage: String,
    pub storage_key: String,
    pub public_url: String,
}

pub async fn input_media(
    db: &impl GenericClient,
    user_id: &str,
    tenant_id: Option<&str>,
    ids: &[Uuid],
) -> Result<Vec<InputMedia>, JobsError> {
    let stmt = db.prepare_cached(include_str!("input_media.sql")).await?;
    let rows = db.query(&stmt, &[&ids, &user_id, &tenant_id]).await?;
    rows.iter()
        .map(|r| {
            Ok(InputMedia {
                id: r.try_get("id")?,
                storage: r.try_get("storage")?,
                storage_key: r.try_get("storage_key")?,
                public_url: r.try_get("public_url")?,
            })
        })
        .collect()
}

fn awaiting_from_row(row: &Row) -> Result<AwaitingJob, JobsError> {
    Ok(AwaitingJob {
        job: job_from_row(row)?,
        external_id: row.try_get("external_job_id")?,
        submitted_at: row.try_get("submitted_at")?,
        expected_at: row.try_get("provider_expected_at")?,
        deadline: row.try_get("provider_deadline")?,
        outputs: row.try_get("provider_outputs")?,
    })
}

pub async fn get_for_owner(
    db: &impl GenericClient,
    id: Uuid,
    owner: &Identity,
) -> Result<Option<OwnedJob>, JobsError> {
    let stmt = db.prepare_cached(include_str!("get_for_owner.sql")).await?;
    let Some(row) = db
        .query_opt(&stmt, &[&id, &owner.user_id, &owner.tenant_id])
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(OwnedJob {
        job: job_from_row(&row)?,
        position: row.try_get("position")?,
        recent_run_seconds: row.try_get("recent_run_seconds")?,
        provider_wait: if row.try_get("awaiting_provider")? {
            match (
                row.try_get::<_, Option<DateTime<Utc>>>("submitted_at")?,
                row.try_get::<_, Option<DateTime<Utc>>>("provider_expected_at")?,
            ) {
                (Some(submitted_at), Some(expected_at)) => Some(ProviderWait {
                    submitted_at,
                    expected_at,
                    checked_at: row.try_get("checked_at")?,
                }),
                _ => None,
            }
        } else {
            None
        },
    }))
}

/// One row of the owner's job list.
#[derive(Debug, Clone)]
pub struct ListedJob {
    pub id: Uuid,
    pub job_type: JobType,
    pub status: JobStatus,
    pub progress: i16,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub result: Option<Media>,
}

/// What to list, and from where.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<JobStatus>,
    pub job_type: Option<JobType>,
    /// The (created_at, id) of the last job of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

pub async fn list_for_owner(
    db: &impl GenericClient,
    owner: &Identity,
    query: &ListQuery,
) -> Result<Vec<ListedJob>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("list_for_owner.sql"))
        .await?;
    let job_type = query.job_type.map(JobType::as_str);
    let rows = db
        .query(
            &stmt,
            &[
                &owner.user_id,
                &owner.tenant_id,
                &query.status,
                &job_type,
                &query.after.map(|a| a.0),
                &query.after.map(|a| a.1),
                &query.limit,
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let id: Uuid = r.try_get("id")?;
            let job_type: String = r.try_get("job_type")?;
            let result = match r.try_get::<_, Option<Uuid>>("media_id")? {
                Some(media_id) => Some(Media {
                    id: media_id,
                    media_type: r.try_get("media_type")?,
                    mime_type: r.try_get("mime_type")?,
                    public_url: r.try_get("public_url")?,
                    width: r.try_get("width")?,
                    height: r.try_get("height")?,
                    size_bytes: r.try_get("size_bytes")?,
                    created_at: r.try_get("media_created_at")?,
                }),
                None => None,
            };
            Ok(ListedJob {
                id,
                job_type: JobType::parse(&job_type)
                    .ok_or(JobsError::UnknownType { id, job_type })?,
                status: r.try_get("status")?,
                progress: r.try_get("progress")?,
                error_message: r.try_get("error_message")?,
                attempts: r.try_get("attempts")?,
                created_at: r.try_get("created_at")?,
                started_at: r.try_get("started_at")?,
                completed_at: r.try_get("completed_at")?,
                result,
            })
        })
        .collect()
}

pub async fn media_for_job(db: &impl GenericClient, job_id: Uuid) -> Result<Vec<Media>, JobsError> {
    let stmt = db.prepare_cached(include_str!("media_for_job.sql")).await?;
    let rows = db.query(&stmt, &[&job_id]).await?;
    rows.iter()
        .map(|r| {
            Ok(Media {
                id: r.try_get("id")?,
                media_type: r.try_get("media_type")?,
                mime_type: r.try_get("mime_type")?,
                public_url: r.try_get("public_url")?,
                width: r.try_get("width")?,
                height: r.try_get("height")?,
                size_bytes: r.try_get("size_bytes")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// What a purge of settled jobs removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purged {
    pub jobs: i64,
    /// Storage keys of the locally stored files of the jobs' media, for the store to remove.
    pub local_keys: Vec<String>,
}

/// Deletes up to `limit` jobs settled more than `days` ago, with their media rows.
pub async fn purge_settled(
    db: &impl GenericClient,
    days: u32,
    limit: i64,
) -> Result<Purged, JobsError> {
    let stmt = db.prepare_cached(include_str!("purge_settled.sql")).await?;
    let row = db.query_one(&stmt, &[&(days as i32), &limit]).await?;
    Ok(Purged {
        jobs: row.try_get("jobs")?,
        local_keys: row.try_get("local_keys")?,
    })
}

pub async fn count_by_status(
    db: &impl GenericClient,
) -> Result<HashMap<JobStatus, i64>, JobsError> {
    let stmt = db
        .prepare_cached(include_str!("count_by_status.sql"))
        .await?;
    let rows = db.query(&stmt, &[]).await?;
    let mut counts: HashMap<JobStatus, i64> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        counts.insert(row.try_get("status")?, row.try_get("jobs")?);
    }
    Ok(counts)
}

fn job_from_row(row: &Row) -> Result<Job, JobsError> {
    let id: Uuid = row.try_get("id")?;
    let job_type: String = row.try_get("job_type")?;
    let job_type = JobType::parse(&job_type).ok_or(JobsError::UnknownType { id, job_type })?;
    Ok(Job {
        id,
        user_id: row.try_get("user_id")?,
        tenant_id: row.try_get("tenant_id")?,
        job_type,
        entity_id: row.try_get("entity_id")?,
        params: row.try_get("params")?,
        status: row.try_get("status")?,
        progress: row.try_get("progress")?,
        result_media_id: row.try_get("result_media_id")?,
        error_message: row.try_get("error_message")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}
