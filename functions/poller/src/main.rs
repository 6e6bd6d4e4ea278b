//! The scheduled poller (EventBridge, every minute).

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let app = shared::App::from_config(shared::Config::from_env()?).await?;
    app.metrics.cold_start("poller");
    let app = &app;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<EventBridgeEvent<serde_json::Value>>| async move {
            let deadline = shared::worker::invocation_deadline(event.context.deadline);
            shared::poller::handle_schedule_until(app, event.payload, Some(deadline))
                .await
                .map_err(|e| {
                    tracing::error!(error = %shared::telemetry::chain(&e), "poller tick failed");
                    Error::from(e)
                })
        },
    ))
    .await
}
