//! POST /api/generate/{character,moodboard,animation}: validates, commits the job, sends its message.

use lambda_http::{service_fn, Error, Request};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let app = shared::App::from_config(shared::Config::from_env()?).await?;
    app.metrics.cold_start("enqueue");
    let app = &app;
    lambda_http::run(service_fn(move |req: Request| async move {
        Ok::<_, std::convert::Infallible>(shared::api::handle(app, req).await)
    }))
    .await
}
