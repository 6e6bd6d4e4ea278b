//! The generator seam: one trait, one implementation per provider. Each error is marked
//! retryable or fatal where it happens, and only that mark decides the job's next state.

mod simulator;

pub use simulator::Simulator;

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
    pub bytes: Vec<u8>,
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

#[async_trait]
pub trait Generator: Send + Sync {
    /// The model name recorded with the job.
    fn model(&self) -> &str;

    /// Produces the job's media. Must return at least one file on success.
    async fn generate(
        &self,
        job: &Job,
        progress: &Progress,
    ) -> Result<Vec<GeneratedFile>, GenerateError>;
}
