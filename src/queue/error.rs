//! Errors of the queue module and their classification as transient or not.

use std::fmt::Write as _;

use tokio_postgres::error::SqlState;

use super::QueueId;

/// Failure of a queue operation. Each message names the operation and the
/// cause, including the SQLSTATE for database errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The connection URL could not be parsed.
    #[error("invalid queue database URL: {detail}")]
    InvalidUrl {
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A configuration value is out of range.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),

    /// An operator command got an invalid value, such as an empty
    /// destination name.
    #[error("{0}")]
    InvalidArgument(String),

    /// The database could not be reached, a pool timeout passed, or the
    /// connection broke. Transient.
    #[error("queue database unavailable while trying to {action}: {detail}")]
    Unavailable {
        action: &'static str,
        detail: String,
    },

    /// The server returned an error for an SQL statement.
    #[error("queue database error while trying to {action}: {detail}")]
    Database {
        action: &'static str,
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A stored body does not match its recorded size, chunk count or digest.
    #[error("queue integrity check failed for message {id}: {detail}")]
    Integrity { id: QueueId, detail: String },

    /// The message row is gone or no longer `receiving` while its writer
    /// still had data to store, typically because the janitor removed it
    /// after `expires_at` passed.
    #[error("message {id} is no longer in state receiving; the janitor may have removed it")]
    NotReceiving { id: QueueId },

    /// An earlier write of this writer failed, so the stored body is
    /// incomplete and the writer accepts no more data.
    #[error("spool writer of message {id} failed earlier and accepts no more data")]
    WriterFailed { id: QueueId },

    /// No message has this id.
    #[error("message {id} not found in the queue")]
    NotFound { id: QueueId },

    /// The body was requested of a message that is not `ready`.
    #[error("message {id} is {state}, so its body is incomplete")]
    NotReady { id: QueueId, state: String },

    /// Writing a body to the caller's destination failed.
    #[error("cannot write the body of message {id} to its destination: {source}")]
    Output {
        id: QueueId,
        #[source]
        source: std::io::Error,
    },

    /// `commit` was called without recipients.
    #[error("message {id} has no recipients; commit needs at least one")]
    NoRecipients { id: QueueId },

    /// Applying the embedded schema migrations failed.
    #[error("queue schema migration failed: {0}")]
    Migration(#[source] refinery::Error),
}

impl QueueError {
    /// Returns true when retrying later may succeed: the database was
    /// unreachable, the connection broke, a timeout passed, or the server
    /// reported a transient condition (serialization failure, deadlock,
    /// lack of resources, shutdown, canceled statement).
    pub fn is_transient(&self) -> bool {
        match self {
            QueueError::Unavailable { .. }
            | QueueError::NotReceiving { .. }
            | QueueError::Output { .. } => true,
            QueueError::Database { source, .. } => is_transient_sqlstate(source.code()),
            QueueError::InvalidUrl { .. }
            | QueueError::InvalidConfig(_)
            | QueueError::InvalidArgument(_)
            | QueueError::Integrity { .. }
            | QueueError::WriterFailed { .. }
            | QueueError::NotFound { .. }
            | QueueError::NotReady { .. }
            | QueueError::NoRecipients { .. }
            | QueueError::Migration(_) => false,
        }
    }

    /// Returns the SQLSTATE of a database error.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            QueueError::Database { source, .. } => source.code(),
            _ => None,
        }
    }

    /// Classifies a driver error: a server-reported error becomes `Database`,
    /// anything else (I/O, closed connection, timeout) becomes `Unavailable`.
    pub(crate) fn from_pg(action: &'static str, source: tokio_postgres::Error) -> QueueError {
        let detail = describe_pg_error(&source);
        if source.as_db_error().is_some() {
            QueueError::Database {
                action,
                detail,
                source,
            }
        } else {
            QueueError::Unavailable { action, detail }
        }
    }

    /// Classifies a pool checkout error.
    pub(crate) fn from_pool(
        action: &'static str,
        error: deadpool_postgres::PoolError,
    ) -> QueueError {
        use deadpool_postgres::PoolError;
        match error {
            PoolError::Backend(source) => QueueError::from_pg(action, source),
            PoolError::Timeout(kind) => QueueError::Unavailable {
                action,
                detail: format!("connection pool timed out ({kind:?})"),
            },
            PoolError::Closed => QueueError::Unavailable {
                action,
                detail: "connection pool is closed".to_owned(),
            },
            PoolError::NoRuntimeSpecified => {
                QueueError::InvalidConfig("connection pool has no async runtime".to_owned())
            }
            PoolError::PostCreateHook(hook_error) => QueueError::Unavailable {
                action,
                detail: format!("connection setup failed: {hook_error}"),
            },
        }
    }
}

/// SQLSTATE classes and codes after which a retry may succeed.
fn is_transient_sqlstate(code: Option<&SqlState>) -> bool {
    let Some(code) = code else {
        return false;
    };
    let code = code.code();
    // Class 08 connection exception, 40 transaction rollback (serialization
    // failure, deadlock), 53 insufficient resources (disk full, too many
    // connections), 57 operator intervention (statement timeout, shutdown),
    // 58 system error (I/O error), and 55P03 lock not available. A missing
    // database (3D000) or a failed login stays permanent until an operator acts.
    ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == SqlState::LOCK_NOT_AVAILABLE.code()
}

/// Renders a driver error with its server message, SQLSTATE and cause,
/// because the driver's own `Display` prints only the error kind.
pub(crate) fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            let _ = write!(text, "; detail: {detail}");
        }
        return text;
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        let _ = write!(text, ": {inner}");
        cause = inner.source();
    }
    text
}

/// A database error with its cause: tokio-postgres leaves the server's
/// message and the underlying error out of its own text.
pub fn describe_database_error(error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// A pool error with the database's own message when there is one: the
/// pool's `Display` says only "db error" for a failed connection.
pub fn describe_pool_error(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(source) => describe_database_error(source),
        other => other.to_string(),
    }
}
