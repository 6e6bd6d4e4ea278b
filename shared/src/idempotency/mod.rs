//! The `idempotency_keys` repository: answers given under an `Idempotency-Key`, per user and
//! tenant, kept for 24 hours.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::{jobs::JobsError, model::Identity};

/// Stores the answer for `key`. `Ok(false)`: the key is already in use; roll back and replay.
pub async fn store(
    db: &impl GenericClient,
    owner: &Identity,
    key: &str,
    request: &serde_json::Value,
    job_id: Uuid,
    response: &serde_json::Value,
) -> Result<bool, JobsError> {
    let stmt = db.prepare_cached(include_str!("store.sql")).await?;
    let tenant = owner.tenant_id.as_deref().unwrap_or("");
    let row = db
        .query_opt(
            &stmt,
            &[&owner.user_id, &tenant, &key, request, &job_id, response],
        )
        .await?;
    Ok(row.is_some())
}

/// The request and answer recorded under `key` in the last 24 hours.
pub async fn find(
    db: &impl GenericClient,
    owner: &Identity,
    key: &str,
) -> Result<Option<(serde_json::Value, serde_json::Value)>, JobsError> {
    let stmt = db.prepare_cached(include_str!("find.sql")).await?;
    let tenant = owner.tenant_id.as_deref().unwrap_or("");
    let row = db
        .query_opt(&stmt, &[&owner.user_id, &tenant, &key])
        .await?;
    Ok(match row {
        Some(row) => Some((row.try_get("request")?, row.try_get("response")?)),
        None => None,
    })
}

/// Deletes up to `limit` expired keys; returns how many.
pub async fn purge(db: &impl GenericClient, limit: i64) -> Result<u64, JobsError> {
    let stmt = db.prepare_cached(include_str!("purge.sql")).await?;
    Ok(db.execute(&stmt, &[&limit]).await?)
}
