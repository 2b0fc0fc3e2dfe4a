//! `wsmtp serve`: runs the listener until SIGTERM or SIGINT.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listener::Server;
use crate::listener::intake::Shared;
use crate::queue::Queue;

/// How long to wait between attempts to migrate an unreachable queue database.
const MIGRATION_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = start(config, shutdown.clone()).await?;
    tokio::spawn(wait_for_signal(shutdown));
    server.await?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds the listener, starts the queue's background tasks and returns the
/// running server; it ends after `shutdown` is cancelled and sessions drained.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (handle, _) = start_with_addresses(config, shutdown).await?;
    Ok(handle)
}

/// Like [`start`], and also returns the bound addresses (useful with port 0).
pub async fn start_with_addresses(
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Vec<std::net::SocketAddr>)> {
    let queue = match &config.queue {
        Some(settings) => {
            let queue = Queue::new(&settings.database)?;
            tokio::spawn(maintain_queue(
                queue.clone(),
                settings.janitor_interval,
                shutdown.clone(),
            ));
            Some(queue)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        config: Arc::new(config),
        queue,
    });
    let server = Server::bind(shared).await?;
    let addresses = server.local_addresses();
    Ok((tokio::spawn(server.run(shutdown)), addresses))
}

/// Applies migrations (retrying while the database is unreachable, since the
/// listener keeps serving pass-through mail meanwhile), then runs the janitor.
async fn maintain_queue(
    queue: Queue,
    janitor_interval: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        match queue.migrate().await {
            Ok(()) => break,
            Err(error) => {
                tracing::error!(error = %error, retry_seconds = MIGRATION_RETRY.as_secs(), "queue migration failed; spooling fails until it succeeds");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(MIGRATION_RETRY) => {}
            () = shutdown.cancelled() => return,
        }
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(janitor_interval) => {}
            () = shutdown.cancelled() => return,
        }
        match queue.remove_expired_receiving().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "janitor removed unfinished messages"),
            Err(error) => tracing::warn!(error = %error, "janitor failed"),
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::error!(error = %error, "cannot install the SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
