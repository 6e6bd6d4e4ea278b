//! Connection pool, TLS and migrations. One migration runner serves the local runner at start,
//! the tests, and the deploy step (`local migrate`).

use std::sync::Arc;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;

refinery::embed_migrations!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres connection string")]
    BadUrl(#[source] tokio_postgres::Error),
    #[error("could not build the connection pool")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("could not get a database connection")]
    Checkout(#[from] deadpool_postgres::PoolError),
    #[error("database error")]
    Query(#[from] tokio_postgres::Error),
    #[error("migration failed")]
    Migrate(#[from] refinery::Error),
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
}

/// Builds the pool. TLS (for Neon and any managed Postgres) is used when the URL asks for it
/// with `sslmode=require`; a local database without `sslmode` connects in plain text.
pub fn pool(database_url: &str, max_size: usize) -> Result<Pool, DbError> {
    let config: tokio_postgres::Config = database_url.parse().map_err(DbError::BadUrl)?;
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match config.get_ssl_mode() {
        SslMode::Disable | SslMode::Prefer => {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        }
        _ => Manager::from_config(config, tls_connector()?, manager_config),
    };
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                // Every statement here is prepared once per connection and run thousands of
                // times. Left to choose, Postgres re-plans the enqueue statement on every call
                // (2 ms of planning for 1 ms of work, measured on 10,000 queued jobs); the
                // statements are written so their generic plans are good (issue 7's notes).
                client
                    .simple_query("SET plan_cache_mode = force_generic_plan")
                    .await
                    .map_err(HookError::Backend)?;
                Ok(())
            })
        }))
        .build()?)
}

fn tls_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Applies every pending migration. An advisory lock makes concurrent starts (several Lambda
/// cold starts, or a deploy racing the local runner) wait for one another instead of colliding.
pub async fn migrate(pool: &Pool) -> Result<(), DbError> {
    const LOCK_KEY: i64 = 0x6d65_6469_616a_6f62; // "mediajob"
    let mut conn = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut conn;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = migrations::runner().run_async(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result?;
    Ok(())
}

/// Creates the URL's database when it does not exist yet, connecting to the server's
/// `postgres` database to do so. Used by the local runner and the tests, never on AWS.
pub async fn create_database_if_missing(database_url: &str) -> Result<(), DbError> {
    let config: tokio_postgres::Config = database_url.parse().map_err(DbError::BadUrl)?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Identifiers cannot be bound as parameters; quote it the way Postgres does.
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .execute(&format!("CREATE DATABASE {quoted}"), &[])
            .await
        {
            Ok(_) => {}
            // Another process created it between our check and our CREATE.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}
