//! `cargo run -p local` runs the whole service; `cargo run -p local -- migrate` only applies
//! migrations to `DATABASE_URL` (the deploy step); `cargo run -p local -- token USER [TENANT]`
//! prints a 30-day token signed with `JWT_SECRET`, for scripts that call a running service.

use std::sync::Arc;

use shared::{auth::LocalVerifier, db, App};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    shared::telemetry::init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let config = local::config_from_env(port)?;

    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("token") {
        let secret =
            std::env::var("JWT_SECRET").map_err(|_| "JWT_SECRET must be set to sign a token")?;
        let user = args.get(1).ok_or("usage: local token USER [TENANT]")?;
        let verifier = LocalVerifier::new(secret.as_bytes())?;
        println!(
            "{}",
            local::demo_token(&verifier, user, args.get(2).map(String::as_str))
        );
        return Ok(());
    }

    if args.first().map(String::as_str) == Some("migrate") {
        let pool = db::pool(&config.database_url, 1)?;
        db::migrate(&pool).await?;
        println!("migrations applied");
        return Ok(());
    }

    db::create_database_if_missing(&config.database_url).await?;
    let app = App::from_config(config).await?;
    db::migrate(&app.pool).await?;

    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (secret, generated) = match env("JWT_SECRET") {
        Some(s) => (s, false),
        None => (format!("{}{}", uuid_hex(), uuid_hex()), true),
    };
    let jwks = env("JWT_JWKS_URL");
    let verifier = match &jwks {
        Some(url) => LocalVerifier::jwks(url.clone()),
        None => LocalVerifier::new(secret.as_bytes())?,
    }
    .expecting(
        env("JWT_ISSUER"),
        env("JWT_AUDIENCE").map(|a| a.split(',').map(|s| s.trim().to_owned()).collect()),
    );
    let verifier = Arc::new(verifier);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let poll_every = std::env::var("POLL_INTERVAL_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(std::time::Duration::from_secs)
        .unwrap_or(std::time::Duration::from_secs(60));
    let mut stop = StopSignal::listen()?;
    let running = local::start(app.clone(), verifier.clone(), listener, poll_every)?;

    let base = format!("http://{}", running.addr);
    println!(
        "\nmedia job service on {base}  (queue: {})",
        if app.config.sqs_queue_url.is_some() {
            "SQS"
        } else {
            "embedded"
        }
    );
    if let Some(url) = &jwks {
        println!(
            "tokens are verified with the keys at {url}; bring one from your identity provider.\n"
        );
    } else {
        if generated {
            println!("JWT_SECRET was not set; this run signs tokens with a made-up secret.");
        }
        let token = local::demo_token(&verifier, "local-user", Some("local-tenant"));
        println!("token for user local-user (tenant local-tenant), valid 30 days:\n\n  export TOKEN={token}\n");
    }
    println!(
        "  curl -s -X POST {base}/api/generate/character -H \"authorization: Bearer $TOKEN\" \\"
    );
    println!("       -H 'content-type: application/json' -d '{{\"characterId\":\"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b\",\"prompt\":\"a knight\"}}'");
    println!("  curl -s {base}/api/generate/status/<jobId> -H \"authorization: Bearer $TOKEN\"\n");

    stop.recv().await?;
    println!("stopping: running jobs finish first (Ctrl-C again to stop at once)");
    tokio::select! {
        _ = running.stop() => {}
        _ = stop.recv() => println!("stopped without waiting: jobs cut off run again once their leases run out"),
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM: what `kill`, a process manager or a container runtime sends. SIGTERM is
/// listened for from before the service starts, so none sent once it runs is missed.
struct StopSignal {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn listen() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                interrupted = tokio::signal::ctrl_c() => interrupted,
                _ = self.terminate.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await
    }
}

fn uuid_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
