//! Database creation and schema migrations for the queue.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use super::QueueError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Key of the session advisory lock that serializes migrations across
/// processes, because refinery itself takes no lock. The value is arbitrary
/// but fixed ("wsmtpmig" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x7773_6d74_706d_6967;

/// Attempts of CREATE DATABASE while the template database is busy.
const CREATE_DATABASE_ATTEMPTS: u32 = 5;

/// Creates the database if needed and allowed, then applies the embedded
/// migrations on a dedicated connection that owns the migration lock.
pub(super) async fn migrate(pg_config: &Config, create_database: bool) -> Result<(), QueueError> {
    let mut client = match connect(pg_config, "connect for migration").await {
        Ok(client) => client,
        Err(error)
            if create_database && error.sqlstate() == Some(&SqlState::INVALID_CATALOG_NAME) =>
        {
            create_missing_database(pg_config).await?;
            connect(pg_config, "connect for migration").await?
        }
        Err(error) => return Err(error),
    };

    const LOCK_ACTION: &str = "take the migration lock";
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| QueueError::from_pg(LOCK_ACTION, e))?;

    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(QueueError::Migration)?;
    for migration in report.applied_migrations() {
        tracing::info!(migration = %migration, "applied queue migration");
    }

    // Dropping the connection releases the advisory lock as well, so an
    // unlock failure is not worth reporting as a migration failure.
    if let Err(error) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
    {
        tracing::debug!(error = %super::error::describe_pg_error(&error), "migration unlock failed");
    }
    Ok(())
}

/// Opens a connection outside the pool and drives it on a background task.
async fn connect(pg_config: &Config, action: &'static str) -> Result<Client, QueueError> {
    let (client, connection) = pg_config
        .connect(NoTls)
        .await
        .map_err(|e| QueueError::from_pg(action, e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %super::error::describe_pg_error(&error), "queue connection ended");
        }
    });
    Ok(client)
}

/// Creates the database named in `pg_config` through the `postgres`
/// maintenance database of the same server. Another process creating it at
/// the same time is not an error.
async fn create_missing_database(pg_config: &Config) -> Result<(), QueueError> {
    const ACTION: &str = "create the queue database";

    // tokio-postgres defaults the database name to the user name.
    let Some(name) = pg_config
        .get_dbname()
        .or(pg_config.get_user())
        .map(str::to_owned)
    else {
        return Err(QueueError::InvalidConfig(
            "the queue database URL names neither a database nor a user".to_owned(),
        ));
    };

    let mut admin_config = pg_config.clone();
    admin_config.dbname("postgres");
    let admin = connect(&admin_config, "connect to the postgres database").await?;
    let statement = format!("CREATE DATABASE {}", quote_identifier(&name));

    let mut attempt = 1;
    loop {
        let Err(error) = admin.batch_execute(&statement).await else {
            tracing::info!(database = %name, "created queue database");
            return Ok(());
        };
        match error.code() {
            // 42P04: created by someone else since our connect failed. 23505:
            // the same race, caught by the unique index of pg_database.
            Some(code)
                if *code == SqlState::DUPLICATE_DATABASE || *code == SqlState::UNIQUE_VIOLATION =>
            {
                return Ok(());
            }
            // 55006: another session is connected to the template database.
            // Such sessions are usually short, so retry after a pause.
            Some(code)
                if *code == SqlState::OBJECT_IN_USE && attempt < CREATE_DATABASE_ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            _ => return Err(QueueError::from_pg(ACTION, error)),
        }
        attempt += 1;
    }
}

/// Quotes an SQL identifier by doubling embedded double quotes.
pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
