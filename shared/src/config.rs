//! Configuration, read once per process from the environment.

use std::{env, path::PathBuf, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be set")]
    Missing(&'static str),
    #[error("{name} has an invalid value {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Which generator runs jobs. There is deliberately no default outside the local runner: a
/// deployment that forgets to choose must fail at start, not quietly run the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorKind {
    Simulator,
    ModelsLab,
}

/// A configured secret: `{:?}` shows only that it is set, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// How jobs a provider finishes later are followed.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// A submitted job still unfinished after this long fails as timed out.
    pub max_wait: Duration,
    /// The status route asks the provider about a job at most this often.
    pub status_check_every: Duration,
    /// How long one poller invocation keeps checking due jobs before it returns.
    pub poll_window: Duration,
    /// Whether a job waiting on the provider keeps its slot (by default it frees it).
    pub hold_slots: bool,
    /// Where the provider's callbacks reach this service (`https://api.example.com`); without
    /// it jobs are submitted without a webhook and the poller alone finishes them.
    pub callback_base_url: Option<String>,
    /// Keys the per-job callback tokens; without it no callback is authentic.
    pub callback_secret: Option<Secret>,
}

/// Where media go.
#[derive(Debug, Clone)]
pub enum MediaStoreKind {
    Local,
    GoogleDrive(DriveConfig),
}

#[derive(Debug, Clone)]
pub struct DriveConfig {
    pub client_id: String,
    pub client_secret: Secret,
    /// Google's endpoints; test servers in tests.
    pub token_url: String,
    pub api_url: String,
    pub upload_url: String,
    /// The app folder created in each user's Drive.
    pub folder_name: String,
    /// Seals stored tokens (DRIVE_TOKEN_KEY: 32 bytes, base64).
    pub token_key: Secret,
}

#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    /// Absent means the embedded queue: workers claim straight from the job table.
    pub sqs_queue_url: Option<String>,
    pub max_concurrent_jobs: u32,
    /// How many slots one user may hold at once (MAX_ACTIVE_PER_USER; all of them by default).
    pub max_active_per_user: u32,
    /// Abuse limits per user: jobs created per minute, and jobs waiting at once.
    pub quota: crate::jobs::Quota,
    pub job_max_attempts: u32,
    pub job_lease: Duration,
    pub generator: GeneratorKind,
    pub simulator_duration: Duration,
    pub media_dir: PathBuf,
    /// Prefix of the URLs media are served under, e.g. `http://127.0.0.1:3000/media`.
    pub public_media_url: String,
    pub db_pool_size: usize,
    /// How long a claimable job may sit unclaimed before the poller re-sends its message.
    pub outbox_grace: Duration,
    /// An SQS worker runs the next job in line itself, when its own job frees the slot, only
    /// with at least this much of its invocation left; otherwise it messages that job.
    pub worker_chain_min: Duration,
    /// Credits charged per job type, once, at completion.
    pub credits: Credits,
    pub modelslab: Option<crate::generator::ModelsLabConfig>,
    pub downloads: crate::generator::DownloadRules,
    pub provider: ProviderSettings,
    pub media_store: MediaStoreKind,
    /// Completion webhooks to clients; without WEBHOOK_SECRET, requests naming a webhookUrl
    /// are refused.
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    /// How long the poller keeps what is finished.
    pub retention: Retention,
}

/// Days before the poller deletes what is finished; `None` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Settled jobs (JOB_RETENTION_DAYS; kept by default: they are users' history).
    pub jobs: Option<u32>,
    /// Delivered or abandoned completion webhooks (WEBHOOK_RETENTION_DAYS, 7).
    pub webhooks: Option<u32>,
}

/// Credits per job type (`JOB_CREDITS=character-image=1,moodboard=4,animation=10`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    pub character_image: i32,
    pub moodboard: i32,
    pub animation: i32,
}

impl Credits {
    pub fn for_type(&self, job_type: crate::model::JobType) -> i32 {
        use crate::model::JobType::*;
        match job_type {
            CharacterImage => self.character_image,
            Moodboard => self.moodboard,
            Animation => self.animation,
        }
    }

    fn parse(raw: &str) -> Result<Self, ConfigError> {
        let invalid = |reason| ConfigError::Invalid {
            name: "JOB_CREDITS",
            value: raw.to_owned(),
            reason,
        };
        let mut credits = Credits::default();
        for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, amount) = pair
                .split_once('=')
                .ok_or(invalid("expected type=amount pairs"))?;
            let amount: i32 = amount
                .trim()
                .parse()
                .map_err(|_| invalid("an amount is not a whole number"))?;
            if !(0..=1_000_000).contains(&amount) {
                return Err(invalid("an amount is out of range"));
            }
            match crate::model::JobType::parse(kind.trim()) {
                Some(crate::model::JobType::CharacterImage) => credits.character_image = amount,
                Some(crate::model::JobType::Moodboard) => credits.moodboard = amount,
                Some(crate::model::JobType::Animation) => credits.animation = amount,
                None => return Err(invalid("unknown job type")),
            }
        }
        Ok(credits)
    }
}

impl Default for Credits {
    fn default() -> Self {
        Credits {
            character_image: 1,
            moodboard: 4,
            animation: 10,
        }
    }
}

// DATABASE_URL carries a password: keep it out of `{:?}` output and therefore out of logs.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &"<redacted>")
            .field("sqs_queue_url", &self.sqs_queue_url)
            .field("max_concurrent_jobs", &self.max_concurrent_jobs)
            .field("max_active_per_user", &self.max_active_per_user)
            .field("quota", &self.quota)
            .field("job_max_attempts", &self.job_max_attempts)
            .field("job_lease", &self.job_lease)
            .field("generator", &self.generator)
            .field("simulator_duration", &self.simulator_duration)
            .field("media_dir", &self.media_dir)
            .field("public_media_url", &self.public_media_url)
            .field("db_pool_size", &self.db_pool_size)
            .field("outbox_grace", &self.outbox_grace)
            .field("worker_chain_min", &self.worker_chain_min)
            .field("credits", &self.credits)
            .field("modelslab", &self.modelslab)
            .field("downloads", &self.downloads)
            .field("provider", &self.provider)
            .field("media_store", &self.media_store)
            .field("webhooks", &self.webhooks)
            .field("retention", &self.retention)
            .finish()
    }
}

impl Config {
    pub fn limits(&self) -> crate::jobs::Limits {
        crate::jobs::Limits {
            slots: self.max_concurrent_jobs,
            per_user: self.max_active_per_user,
        }
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// Reads configuration through `lookup`, so tests and the local runner can layer defaults
    /// without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let generator = match lookup("GENERATOR").as_deref() {
            None => return Err(ConfigError::Missing("GENERATOR")),
            Some("simulator") => GeneratorKind::Simulator,
            Some("modelslab") => GeneratorKind::ModelsLab,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "GENERATOR",
                    value: other.to_owned(),
                    reason: "expected `modelslab` or `simulator`",
                })
            }
        };
        let modelslab = match generator {
            GeneratorKind::ModelsLab => Some(crate::generator::ModelsLabConfig {
                api_key: Secret::new(
                    lookup("MODELSLAB_API_KEY").ok_or(ConfigError::Missing("MODELSLAB_API_KEY"))?,
                ),
                base_url: lookup("MODELSLAB_BASE_URL")
                    .unwrap_or_else(|| "https://modelslab.com".into()),
                image_model: lookup("MODELSLAB_IMAGE_MODEL").unwrap_or_else(|| "flux".into()),
                video_model: lookup("MODELSLAB_VIDEO_MODEL").unwrap_or_else(|| "wan2.2".into()),
                request_timeout: Duration::from_secs(
                    number(&lookup, "MODELSLAB_TIMEOUT_SECONDS", 30, 1..=600)?.into(),
                ),
            }),
            GeneratorKind::Simulator => None,
        };
        let downloads = crate::generator::DownloadRules {
            max_bytes: u64::from(download_max_mb(&lookup)?) * 1024 * 1024,
            timeout: Duration::from_secs(
                number(&lookup, "DOWNLOAD_TIMEOUT_SECONDS", 90, 1..=900)?.into(),
            ),
            allow_http_hosts: list(&lookup, "DOWNLOAD_ALLOW_HTTP_HOSTS"),
        };
        let callback_base_url =
            lookup("CALLBACK_BASE_URL").map(|u| u.trim_end_matches('/').to_owned());
        let callback_secret = match (lookup("CALLBACK_SECRET"), &callback_base_url) {
            (Some(secret), _) if secret.len() >= 32 => Some(Secret::new(secret)),
            (Some(secret), _) => {
                return Err(ConfigError::Invalid {
                    name: "CALLBACK_SECRET",
                    value: format!("<{} characters>", secret.len()),
                    reason: "must be at least 32 characters",
                })
            }
            (None, Some(_)) => return Err(ConfigError::Missing("CALLBACK_SECRET")),
            // No callbacks are asked for, and none is accepted. (Not a random key: making one
            // wakes the crypto library, which costs a cold start 60 ms.)
            (None, None) => None,
        };
        let provider = ProviderSettings {
            max_wait: Duration::from_secs(
                number(&lookup, "PROVIDER_MAX_WAIT_SECONDS", 900, 10..=86_400)?.into(),
            ),
            status_check_every: Duration::from_secs(
                number(&lookup, "PROVIDER_STATUS_CHECK_SECONDS", 5, 1..=3600)?.into(),
            ),
            poll_window: Duration::from_secs(
                number(&lookup, "POLLER_CHECK_WINDOW_SECONDS", 40, 0..=600)?.into(),
            ),
            hold_slots: flag(&lookup, "LONG_JOBS_HOLD_SLOTS")?,
            callback_base_url,
            callback_secret,
        };
        let media_store = match lookup("MEDIA_STORE").as_deref() {
            None | Some("local") => MediaStoreKind::Local,
            Some("google-drive") => MediaStoreKind::GoogleDrive(DriveConfig {
                client_id: lookup("GOOGLE_CLIENT_ID")
                    .ok_or(ConfigError::Missing("GOOGLE_CLIENT_ID"))?,
                client_secret: Secret::new(
                    lookup("GOOGLE_CLIENT_SECRET")
                        .ok_or(ConfigError::Missing("GOOGLE_CLIENT_SECRET"))?,
                ),
                token_url: lookup("GOOGLE_TOKEN_URL")
                    .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into()),
                api_url: lookup("GOOGLE_DRIVE_API_URL")
                    .unwrap_or_else(|| "https://www.googleapis.com/drive/v3".into()),
                upload_url: lookup("GOOGLE_DRIVE_UPLOAD_URL")
                    .unwrap_or_else(|| "https://www.googleapis.com/upload/drive/v3".into()),
                folder_name: lookup("DRIVE_FOLDER_NAME").unwrap_or_else(|| "AI Generations".into()),
                token_key: {
                    let raw =
                        lookup("DRIVE_TOKEN_KEY").ok_or(ConfigError::Missing("DRIVE_TOKEN_KEY"))?;
                    if crate::drive::seal_key(&raw).is_none() {
                        return Err(ConfigError::Invalid {
                            name: "DRIVE_TOKEN_KEY",
                            value: "<hidden>".into(),
                            reason: "must be 32 bytes, base64-encoded",
                        });
                    }
                    Secret::new(raw)
                },
            }),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "MEDIA_STORE",
                    value: other.to_owned(),
                    reason: "expected `local` or `google-drive`",
                })
            }
        };
        let public_base = lookup("PUBLIC_BASE_URL").unwrap_or_default();
        let max_concurrent_jobs = number(&lookup, "MAX_CONCURRENT_JOBS", 5, 1..=1_000)?;
        Ok(Self {
            database_url: lookup("DATABASE_URL").ok_or(ConfigError::Missing("DATABASE_URL"))?,
            sqs_queue_url: lookup("SQS_QUEUE_URL"),
            max_concurrent_jobs,
            // More than all the slots means no per-user limit at all.
            max_active_per_user: number(
                &lookup,
                "MAX_ACTIVE_PER_USER",
                max_concurrent_jobs,
                1..=1_000,
            )?
            .min(max_concurrent_jobs),
            quota: crate::jobs::Quota {
                per_minute: number(&lookup, "RATE_LIMIT_PER_MINUTE", 60, 0..=1_000_000)?,
                max_queued: number(&lookup, "MAX_QUEUED_PER_USER", 100, 0..=1_000_000)?,
            },
            job_max_attempts: number(&lookup, "JOB_MAX_ATTEMPTS", 3, 1..=100)?,
            job_lease: Duration::from_secs(
                number(&lookup, "JOB_LEASE_SECONDS", 300, 5..=86_400)?.into(),
            ),
            generator,
            simulator_duration: Duration::from_millis(
                number(&lookup, "SIMULATOR_DURATION_MS", 1500, 0..=600_000)?.into(),
            ),
            media_dir: lookup("MEDIA_DIR").unwrap_or_else(|| "media".into()).into(),
            public_media_url: format!("{}/media", public_base.trim_end_matches('/')),
            db_pool_size: number(&lookup, "DB_POOL_SIZE", 8, 1..=200)? as usize,
            outbox_grace: Duration::from_secs(
                number(&lookup, "OUTBOX_GRACE_SECONDS", 60, 1..=86_400)?.into(),
            ),
            worker_chain_min: Duration::from_secs(
                number(&lookup, "WORKER_CHAIN_MIN_SECONDS", 60, 0..=900)?.into(),
            ),
            credits: match lookup("JOB_CREDITS") {
                Some(raw) => Credits::parse(&raw)?,
                None => Credits::default(),
            },
            modelslab,
            downloads,
            provider,
            media_store,
            webhooks: match lookup("WEBHOOK_SECRET") {
                Some(secret) if secret.len() >= 24 => Some(crate::webhooks::WebhookSettings {
                    secret: Secret::new(secret),
                    allow_hosts: list(&lookup, "WEBHOOK_ALLOW_HOSTS"),
                }),
                Some(_) => {
                    return Err(ConfigError::Invalid {
                        name: "WEBHOOK_SECRET",
                        value: "<hidden>".into(),
                        reason: "must be at least 24 characters",
                    })
                }
                None => None,
            },
            retention: Retention {
                jobs: Some(number(&lookup, "JOB_RETENTION_DAYS", 0, 0..=36_500)?)
                    .filter(|&d| d > 0),
                webhooks: Some(number(&lookup, "WEBHOOK_RETENTION_DAYS", 7, 0..=36_500)?)
                    .filter(|&d| d > 0),
            },
        })
    }
}

/// A comma-separated list; empty when unset.
fn list(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Vec<String> {
    lookup(name)
        .map(|raw| {
            raw.split(',')
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn flag(lookup: &impl Fn(&str) -> Option<String>, name: &'static str) -> Result<bool, ConfigError> {
    match lookup(name).as_deref().map(str::trim) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ConfigError::Invalid {
            name,
            value: other.to_owned(),
            reason: "expected true or false",
        }),
    }
}

/// Memory a function needs beside the file it downloads (its own 11-12 MB resident, HTTP and
/// TLS buffers, the runtime).
const DOWNLOAD_HEADROOM_MB: u32 = 64;

/// The download cap, for a job's files together. They are held whole in memory until stored
/// (one job's at a time per process, `App::collecting`), and an image's upload to Drive copies
/// it once more, so in a Lambda function (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, set by Lambda) the
/// default is half of what the function has beside its headroom, and a larger cap is refused at
/// start: a download past the memory would kill the invocation, again on every try, instead of
/// failing the job with a message that names the limit.
fn download_max_mb(lookup: &impl Fn(&str) -> Option<String>) -> Result<u32, ConfigError> {
    let memory = number(lookup, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0, 128..=10_240)
        .ok()
        .filter(|&mb| mb > 0);
    let room = memory.map(|mb| mb.saturating_sub(DOWNLOAD_HEADROOM_MB).max(1));
    let default = room.map_or(200, |room| (room / 2).clamp(1, 200));
    let cap = number(lookup, "DOWNLOAD_MAX_MB", default, 1..=4096)?;
    if room.is_some_and(|room| cap > room / 2) {
        return Err(ConfigError::Invalid {
            name: "DOWNLOAD_MAX_MB",
            value: cap.to_string(),
            reason: "more than half of what the function's memory leaves beside 64 MB of headroom: raise its MemorySize or lower the cap",
        });
    }
    Ok(cap)
}

fn number(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ConfigError> {
    let Some(raw) = lookup(name) else {
        return Ok(default);
    };
    let value: u32 = raw.trim().parse().map_err(|_| ConfigError::Invalid {
        name,
        value: raw.clone(),
        reason: "not a whole number",
    })?;
    if !range.contains(&value) {
        return Err(ConfigError::Invalid {
            name,
            value: raw,
            reason: "out of range",
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_deployment_that_names_no_generator_is_refused() {
        let err = Config::from_lookup(lookup(&[("DATABASE_URL", "postgres://x")])).unwrap_err();
        assert!(matches!(err, ConfigError::Missing("GENERATOR")));
    }

    #[test]
    fn an_unknown_generator_is_refused_rather_than_simulated() {
        let err = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://x"),
            ("GENERATOR", "replicate"),
        ]))
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                name: "GENERATOR",
                ..
            }
        ));
        let err = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://x"),
            ("GENERATOR", "modelslab"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Missing("MODELSLAB_API_KEY")));
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_their_name() {
        let err = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://x"),
            ("GENERATOR", "simulator"),
            ("MAX_CONCURRENT_JOBS", "0"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("MAX_CONCURRENT_JOBS"));
    }

    #[test]
    fn the_download_cap_fits_the_functions_memory() {
        let cap = |pairs: &[(&str, &str)]| {
            let mut all = vec![("DATABASE_URL", "postgres://x"), ("GENERATOR", "simulator")];
            all.extend_from_slice(pairs);
            Config::from_lookup(lookup(&all)).map(|c| c.downloads.max_bytes / (1024 * 1024))
        };
        // Outside Lambda: 200 MB unless set.
        assert_eq!(cap(&[]).unwrap(), 200);
        assert_eq!(cap(&[("DOWNLOAD_MAX_MB", "500")]).unwrap(), 500);
        // In a 256 MB function: half of what is left beside the headroom, by default.
        let lambda = ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256");
        assert_eq!(cap(&[lambda]).unwrap(), 96);
        assert_eq!(
            cap(&[("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")]).unwrap(),
            200
        );
        assert_eq!(cap(&[lambda, ("DOWNLOAD_MAX_MB", "50")]).unwrap(), 50);
        // A cap the function could not hold twice over is refused at start, naming the setting.
        let err = cap(&[lambda, ("DOWNLOAD_MAX_MB", "97")]).unwrap_err();
        assert!(err.to_string().contains("DOWNLOAD_MAX_MB"), "{err}");
    }

    #[test]
    fn credits_are_read_per_job_type_and_unknown_types_are_refused() {
        let base = [("DATABASE_URL", "postgres://x"), ("GENERATOR", "simulator")];
        let with = |credits: &str| {
            let mut pairs = base.to_vec();
            pairs.push(("JOB_CREDITS", credits));
            Config::from_lookup(lookup(&pairs))
        };
        let c = with("moodboard=7, animation=0").unwrap().credits;
        assert_eq!(
            c,
            Credits {
                character_image: 1,
                moodboard: 7,
                animation: 0
            }
        );
        assert!(with("sculpture=3").is_err());
        assert!(with("moodboard=-1").is_err());
    }

    #[test]
    fn a_per_user_limit_above_the_slot_count_means_no_per_user_limit() {
        let config = |per_user: &str| {
            Config::from_lookup(lookup(&[
                ("DATABASE_URL", "postgres://x"),
                ("GENERATOR", "simulator"),
                ("MAX_CONCURRENT_JOBS", "2"),
                ("MAX_ACTIVE_PER_USER", per_user),
            ]))
            .unwrap()
        };
        assert_eq!(
            config("3").limits(),
            crate::jobs::Limits {
                slots: 2,
                per_user: 2
            }
        );
        assert_eq!(
            config("1").limits(),
            crate::jobs::Limits {
                slots: 2,
                per_user: 1
            }
        );
    }

    #[test]
    fn the_database_password_never_appears_in_debug_output() {
        let config = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
            ("GENERATOR", "simulator"),
            ("PUBLIC_BASE_URL", "http://127.0.0.1:3000/"),
        ]))
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(config.public_media_url, "http://127.0.0.1:3000/media");
        let config = Config::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://x"),
            ("GENERATOR", "modelslab"),
            ("MODELSLAB_API_KEY", "ml-key-hunter3"),
            ("CALLBACK_BASE_URL", "https://api.example.com"),
            (
                "CALLBACK_SECRET",
                "callback-secret-hunter4-0123456789abcdef",
            ),
            ("MEDIA_STORE", "google-drive"),
            ("GOOGLE_CLIENT_ID", "client"),
            ("GOOGLE_CLIENT_SECRET", "google-hunter5"),
            (
                "DRIVE_TOKEN_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ]))
        .unwrap();
        let shown = format!("{config:?}");
        for secret in ["hunter3", "hunter4", "hunter5", "AAAAAAAA"] {
            assert!(!shown.contains(secret), "{secret} leaked into {shown}");
        }
    }
}
