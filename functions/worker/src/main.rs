//! The SQS worker: runs each record's job and reports only the records to deliver again.

use aws_lambda_events::sqs::SqsEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let app = shared::App::from_config(shared::Config::from_env()?).await?;
    app.metrics.cold_start("worker");
    let app = &app;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = shared::worker::invocation_deadline(event.context.deadline);
        Ok::<_, std::convert::Infallible>(
            shared::worker::handle_sqs_until(app, event.payload, Some(deadline)).await,
        )
    }))
    .await
}
