//! The generator seam: one trait, one implementation per provider. Each error is marked
//! retryable or fatal where it happens, and only that mark decides the job's next state.

mod download;
mod modelslab;
mod simulator;

pub use download::{DownloadRules, Downloader};
pub use modelslab::{read_answer as read_modelslab_answer, ModelsLab, ModelsLabConfig};
pub use simulator::Simulator;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::model::Job;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// Worth another attempt: the provider was busy, slow or unreachable.
    #[error("{0}")]
    Retryable(String),
    /// Another attempt would fail the same way: bad input, rejected content, a provider error.
    #[error("{0}")]
    Fatal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }
}

/// One produced file, before it is stored.
#[derive(Debug, Clone)]
pub struct GeneratedFile {
    pub kind: MediaKind,
    pub mime_type: &'static str,
    pub extension: &'static str,
    pub width: Option<i32>,
    pub height: Option<i32>,
    /// Shared, not copied, by whatever sends it on (a Drive upload).
    pub bytes: bytes::Bytes,
}

/// Where a generator reports progress (0–100). The worker turns the latest value into a
/// throttled heartbeat, so generators may report as often as they like.
#[derive(Clone)]
pub struct Progress(watch::Sender<u8>);

impl Progress {
    pub fn channel() -> (Self, watch::Receiver<u8>) {
        let (tx, rx) = watch::channel(0);
        (Self(tx), rx)
    }

    pub fn report(&self, percent: u8) {
        self.0.send_if_modified(|p| {
            let next = percent.min(100).max(*p);
            let changed = next != *p;
            *p = next;
            changed
        });
    }
}

/// What starting a job gave.
#[derive(Debug)]
pub enum Generation {
    /// The media, ready to store. Must hold at least one file.
    Done(Vec<GeneratedFile>),
    /// The provider accepted the job and will finish it later; the job waits in `processing`
    /// and is checked by the poller, the status route and the provider's webhook.
    Submitted(Submission),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The provider's id for the job, kept as `external_job_id`.
    pub external_id: String,
    /// How long the provider expects to take, when it says.
    pub eta: Option<Duration>,
}

/// What a check of a submitted job found. A provider's failure answer is a `Fatal` error.
#[derive(Debug)]
pub enum Check {
    /// Finished: the output's URLs, fetched by [`Generator::collect`]. A check only reads the
    /// answer, so that whoever checks need not have the time a download takes.
    Ready(Vec<String>),
    Pending {
        eta: Option<Duration>,
    },
}

/// Where the provider may call back when a submitted job finishes.
#[derive(Debug, Clone)]
pub struct Callback {
    /// Carries the job's unguessable token; never logged.
    pub url: String,
    pub track_id: String,
}

#[async_trait]
pub trait Generator: Send + Sync {
    /// The model name recorded with the job.
    fn model(&self) -> &str;

    /// Starts (and, for a quick provider, finishes) the job. `inputs` are the job's resolved
    /// input media URLs; `callback` is where a provider that finishes later may report.
    async fn generate(
        &self,
        job: &Job,
        inputs: &Inputs,
        progress: &Progress,
        callback: Option<&Callback>,
    ) -> Result<Generation, GenerateError>;

    /// Whether `generate` reads `Inputs`; others are spared the lookup.
    fn uses_inputs(&self) -> bool {
        false
    }

    /// Asks the provider about a job it accepted earlier.
    async fn check(&self, _job: &Job, _external_id: &str) -> Result<Check, GenerateError> {
        Err(GenerateError::Fatal(format!(
            "the {} generator does not run long jobs",
            self.model()
        )))
    }

    /// Fetches the output a check found ready.
    async fn collect(
        &self,
        _job: &Job,
        _outputs: &[String],
    ) -> Result<Vec<GeneratedFile>, GenerateError> {
        Err(GenerateError::Fatal(format!(
            "the {} generator does not run long jobs",
            self.model()
        )))
    }

    /// Reads the provider's callback for a job it accepted earlier. By default it only
    /// prompts a check, so nothing in the body has to be trusted.
    async fn check_callback(
        &self,
        job: &Job,
        external_id: &str,
        _body: &[u8],
    ) -> Result<Check, GenerateError> {
        self.check(job, external_id).await
    }
}

/// Input media a job refers to by id (a character's reference image, an animation's source
/// image), resolved to URLs the provider can fetch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub reference_image_url: Option<String>,
    pub source_image_url: Option<String>,
}
