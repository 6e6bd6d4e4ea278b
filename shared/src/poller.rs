//! The scheduled poller (EventBridge, every minute). For now it reports how many jobs are in
//! each state; the long-job checks and the lease rescuer join it in their own issues.

use std::collections::BTreeMap;

use aws_lambda_events::eventbridge::EventBridgeEvent;

use crate::{jobs, App};

#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("job repository error")]
    Jobs(#[from] jobs::JobsError),
}

/// Counts of jobs by state, as logged and returned.
pub type Report = BTreeMap<&'static str, i64>;

pub async fn handle_schedule(
    app: &App,
    event: EventBridgeEvent<serde_json::Value>,
) -> Result<Report, PollerError> {
    let conn = app.pool.get().await?;
    let counts = jobs::count_by_status(&conn).await?;
    let report: Report = counts
        .into_iter()
        .map(|(status, n)| (status.as_str(), n))
        .collect();
    tracing::info!(event_id = event.id.as_deref().unwrap_or(""), jobs = ?report, "poller tick");
    Ok(report)
}
