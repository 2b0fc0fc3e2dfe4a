//! Keeps a [`Directory`] current: LISTEN on `wsmtp_directory` for prompt
//! reloads, and poll the version as the backstop, because a notification is
//! only a hint (it is lost while the connection is down).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{Directory, load_snapshot};
use crate::metrics::{Component, Metrics};

/// Wait before reconnecting after the database connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// Runs until `shutdown`: loads the directory, then reloads it whenever its
/// version changes. `url` is the queue database's URL.
pub async fn watch(
    url: String,
    directory: Arc<Directory>,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) =
            watch_connection(&url, &directory, poll_interval, &metrics, &shutdown).await
        {
            metrics.database_error(Component::Directory);
            crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                error = %error,
                suppressed,
                "directory watch failed; reconnecting"
            ));
        }
        tokio::select! {
            () = tokio::time::sleep(RECONNECT_DELAY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn watch_connection(
    url: &str,
    directory: &Directory,
    poll_interval: Duration,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let (mut client, mut connection) = tokio_postgres::connect(url, NoTls).await?;

    // The connection future must be polled to deliver notifications; forward
    // them into a channel that the loop below reads.
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = notify_tx.send(());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "directory watch connection failed");
                    break;
                }
            }
        }
    });

    client.batch_execute("LISTEN wsmtp_directory").await?;
    // Load after LISTEN, so a change between the two is not missed.
    reload_if_changed(&mut client, directory, metrics).await?;

    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            received = notify_rx.recv() => {
                if received.is_none() {
                    break Ok(());
                }
                // Coalesce a burst of notifications into one reload.
                while notify_rx.recv().now_or_never().flatten().is_some() {}
            }
            () = tokio::time::sleep(poll_interval) => {}
        }
        if let Err(error) = reload_if_changed(&mut client, directory, metrics).await {
            break Err(error);
        }
    };
    driver.abort();
    result
}

async fn reload_if_changed(
    client: &mut tokio_postgres::Client,
    directory: &Directory,
    metrics: &Metrics,
) -> Result<(), tokio_postgres::Error> {
    let version: i64 = client
        .query_one("SELECT version FROM directory_version WHERE id = 1", &[])
        .await?
        .get(0);
    if directory.version() == Some(version) {
        directory.mark_checked();
        return Ok(());
    }
    let started = Instant::now();
    match load_snapshot(client).await {
        Ok(snapshot) => {
            tracing::info!(
                version = snapshot.version,
                addresses = snapshot.address_count(),
                accounts = snapshot.accounts.len(),
                lists = snapshot.lists.len(),
                load_ms = started.elapsed().as_millis() as u64,
                "directory loaded"
            );
            directory.replace(snapshot);
            metrics.directory.reloaded(true);
        }
        Err(super::load::LoadError::Database(error)) => {
            metrics.directory.reloaded(false);
            return Err(error);
        }
        Err(error) => {
            metrics.directory.reloaded(false);
            tracing::error!(error = %error, "directory not reloaded; the previous one stays in force")
        }
    }
    Ok(())
}
