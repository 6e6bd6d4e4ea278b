//! The media job system's library. Every Lambda binary and the local runner are thin shells
//! around what lives here, so tests exercise exactly the code that runs in production.

pub mod api;
pub mod app;
pub mod auth;
pub mod callbacks;
pub mod config;
pub mod db;
pub mod drive;
#[doc(hidden)]
pub mod fuzz;
pub mod generator;
pub mod idempotency;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod poller;
pub mod provider;
pub mod queue;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
pub mod worker;

pub use app::App;
pub use config::Config;
