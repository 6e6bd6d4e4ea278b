//! Logging. JSON lines on Lambda (CloudWatch parses them), readable lines locally.

use std::error::Error;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let on_lambda = std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if on_lambda {
        // Lambda stamps each line itself. The span list carries the runtime's requestId and
        // our own fields (user_id, job_id), so every line can be traced to its request and job.
        builder
            .json()
            .with_current_span(true)
            .with_target(false)
            .without_time()
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
}

/// An error with its whole cause chain, for logs: "outer: cause: root cause".
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
