//! Everything a handler needs, built once per process (one Lambda cold start, one local run).

use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::{
    config::{Config, GeneratorKind, MediaStoreKind},
    db::{self, DbError},
    drive::Drive,
    generator::{Downloader, Generator, ModelsLab, Simulator},
    metrics::Metrics,
    queue::{self, Dispatcher},
    storage::{LocalMediaStore, MediaStore},
};

#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub pool: Pool,
    pub queue: Dispatcher,
    pub generator: Arc<dyn Generator>,
    pub store: MediaStore,
    pub metrics: Metrics,
    /// The embedded queue's batching completer, while its workers run; `None` elsewhere (an
    /// SQS worker completes each job with its own statement).
    pub completions: Option<crate::worker::Completer>,
    /// Set when a local service stops: its workers finish the jobs they hold, but a job's slot
    /// goes to the next in line by a message, not by running that job in this process.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// One provider output collected (held in memory, up to DOWNLOAD_MAX_MB, until stored) at
    /// a time per process: a worker runs a batch's records at once, and the poller several
    /// checks.
    pub collecting: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// Builds the app from configuration: the pool (connections open lazily), the SQS client when
    /// a queue URL is configured, and the configured generator.
    pub async fn from_config(config: Config) -> Result<Self, DbError> {
        let pool = db::pool(&config.database_url, config.db_pool_size)?;
        let queue = match &config.sqs_queue_url {
            Some(url) => Dispatcher::sqs(queue::sqs_client(url).await, url.clone()),
            None => Dispatcher::embedded(),
        };
        let generator: Arc<dyn Generator> = match config.generator {
            GeneratorKind::Simulator => Arc::new(Simulator::new(config.simulator_duration)),
            GeneratorKind::ModelsLab => Arc::new(ModelsLab::new(
                config
                    .modelslab
                    .clone()
                    .expect("configuration requires ModelsLab settings with GENERATOR=modelslab"),
                Downloader::new(config.downloads.clone()),
            )),
        };
        Ok(Self::new(config, pool, queue, generator))
    }

    pub fn new(
        config: Config,
        pool: Pool,
        queue: Dispatcher,
        generator: Arc<dyn Generator>,
    ) -> Self {
        let store = match &config.media_store {
            MediaStoreKind::Local => MediaStore::Local(LocalMediaStore::new(
                config.media_dir.clone(),
                config.public_media_url.clone(),
            )),
            MediaStoreKind::GoogleDrive(drive) => {
                MediaStore::GoogleDrive(Arc::new(Drive::new(drive.clone())))
            }
        };
        Self {
            config: Arc::new(config),
            pool,
            queue,
            generator,
            store,
            metrics: Metrics::from_env(),
            completions: None,
            stopping: Default::default(),
            collecting: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}
