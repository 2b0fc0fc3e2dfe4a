//! Throwaway PostgreSQL databases for integration tests.
//!
//! The server is `postgres://postgres@127.0.0.1:5432/postgres`, or the URL in
//! the environment variable `WSMTP_TEST_PG`, which must name a database the
//! test user may connect to and a user allowed to create databases. Each
//! [`TestDb`] gets a unique name `wsmtp_test_<uuid>` and is dropped with
//! `DROP DATABASE … WITH (FORCE)` (PostgreSQL 13 or later), which also ends
//! connections still open in the test's pools.

// Each test binary compiles tests/common and uses only part of it.
#![allow(dead_code)]

use tokio_postgres::{Client, Config, NoTls};

const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A uniquely named test database, dropped when the value is dropped.
pub struct TestDb {
    /// URL of the test database, for `QueueConfig::url`.
    pub url: String,
    /// Database name, `wsmtp_test_<uuid simple>`.
    pub name: String,
    dropped: bool,
}

impl TestDb {
    /// Creates a new, empty database.
    pub async fn create() -> TestDb {
        let db = TestDb::reserve();
        let admin = connect_admin().await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{}\"", db.name))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {} failed: {}", db.name, describe(&e)));
        db
    }

    /// Returns a unique name and URL without creating the database, for
    /// tests of database creation. Dropping the value still drops the
    /// database if something created it.
    pub fn reserve() -> TestDb {
        let name = format!("wsmtp_test_{}", uuid::Uuid::now_v7().simple());
        let url = replace_dbname(&base_url(), &name);
        TestDb {
            url,
            name,
            dropped: false,
        }
    }

    /// Opens a plain connection to the test database, for raw SQL checks.
    pub async fn connect(&self) -> Client {
        connect_to(&self.url).await
    }

    /// Drops the database and waits for the result.
    pub async fn drop_database(mut self) {
        self.dropped = true;
        let admin = connect_admin().await;
        admin
            .batch_execute(&drop_statement(&self.name))
            .await
            .unwrap_or_else(|e| panic!("DROP DATABASE {} failed: {}", self.name, describe(&e)));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop runs inside the test's runtime, where blocking on async work
        // is not allowed, so a separate thread with its own runtime does it.
        let statement = drop_statement(&self.name);
        let name = self.name.clone();
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let admin = try_connect(&base_url()).await.map_err(|e| describe(&e))?;
                admin
                    .batch_execute(&statement)
                    .await
                    .map_err(|e| describe(&e))
            })
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cannot drop test database {name}: {error}"),
            Err(_) => eprintln!("cannot drop test database {name}: the drop thread panicked"),
        }
    }
}

fn base_url() -> String {
    std::env::var("WSMTP_TEST_PG").unwrap_or_else(|_| DEFAULT_BASE_URL.to_owned())
}

fn drop_statement(name: &str) -> String {
    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
}

async fn connect_admin() -> Client {
    connect_to(&base_url()).await
}

async fn connect_to(url: &str) -> Client {
    try_connect(url).await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to test PostgreSQL (set WSMTP_TEST_PG to override): {}",
            describe(&e)
        )
    })
}

async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let config: Config = url.parse()?;
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped; errors after that
        // are of no interest to a test.
        let _ = connection.await;
    });
    Ok(client)
}

/// Returns `url` with its database path replaced by `/name`, keeping any
/// query string.
fn replace_dbname(url: &str, name: &str) -> String {
    let (without_query, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let authority_start = without_query.find("://").map_or(0, |i| i + 3);
    let authority_end = without_query[authority_start..]
        .find('/')
        .map_or(without_query.len(), |i| authority_start + i);
    let mut result = format!("{}/{}", &without_query[..authority_end], name);
    if let Some(query) = query {
        result.push('?');
        result.push_str(query);
    }
    result
}

/// Renders a driver error with the server message, which the driver's
/// `Display` leaves out.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => format!("{error:?}"),
    }
}
