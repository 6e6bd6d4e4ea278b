//! Integration tests: real Postgres (a fresh database per test) and a real SQS API (moto).

mod access;
mod api;
mod auth;
mod drive;
mod fixtures;
mod idempotency;
mod metrics;
mod provider;
mod queue;
mod reliability;
mod repository;
mod retention;
mod support;
mod template;
mod webhooks;
mod worker;
