//! `wsmtp serve`: runs the listener, router and delivery tiers until SIGTERM
//! or SIGINT, and reloads the configuration on SIGHUP.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminServer, AdminState, Readiness};
use crate::config::Config;
use crate::delivery::notify::NotificationSettings;
use crate::delivery::store::DeliveryStore;
use crate::delivery::worker::DeliveryWorkers;
use crate::directory::{self, Directory};
use crate::listener::Server;
use crate::listener::intake::Shared;
use crate::listener::reload::Reloader;
use crate::metrics::{Component, Metrics};
use crate::policy::dnsbl::Blocklists;
use crate::queue::Queue;
use crate::ratelimit::RateLimits;
use crate::router::worker::{Router, RouterSettings};

/// How long to wait between attempts to migrate an unreachable queue database.
const MIGRATION_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// The tiers one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The SMTP listener: decisions, pass-through and spooling.
    Listener,
    /// Routing of spooled mail through the account directory.
    Router,
    /// Delivery of routed mail: SMTP, LMTP and Maildir, retries and bounces.
    Delivery,
}

/// A started server.
pub struct Running {
    /// Ends after shutdown was requested and the tiers drained.
    pub handle: tokio::task::JoinHandle<()>,
    /// Bound listener addresses, in configuration order.
    pub addresses: Vec<SocketAddr>,
    pub directory: Option<Arc<Directory>>,
    pub router: Option<Arc<Router>>,
    pub delivery: Option<Arc<DeliveryWorkers>>,
    /// The bound admin address, when `admin` is configured.
    pub admin_address: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// Reloads the configuration; SIGHUP calls it in `wsmtp serve`.
    pub reloader: Arc<Reloader>,
}

pub async fn serve(config: Config, roles: Vec<Role>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed first: SIGHUP's default action ends the process, and
    // `wsmtp reload` may send it as soon as the pid file exists.
    let hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let pid_file = config.pid_file.clone();
    let shutdown = CancellationToken::new();
    let running = start(config, &roles, shutdown.clone()).await?;
    let pid_file = pid_file.and_then(|path| super::reload::PidFile::create(&path));
    let status = pid_file.as_ref().map(|file| file.status_path());
    tokio::spawn(reload_on_hangup(
        hangup,
        Arc::clone(&running.reloader),
        status,
    ));
    tokio::spawn(wait_for_signal(shutdown));
    running.handle.await?;
    drop(pid_file);
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the configuration at each SIGHUP and writes the outcome to the
/// status file that `wsmtp reload` waits for.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    status: Option<std::path::PathBuf>,
) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        let result = reloader.reload().await;
        if let Some(path) = &status {
            let stats = reloader.stats();
            let attempt = stats.successes() + stats.failures();
            super::reload::write_status(path, attempt, &result);
        }
    }
}

/// Starts the given roles and returns at once.
pub async fn start(
    config: Config,
    roles: &[Role],
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let wants_router = roles.contains(&Role::Router);
    let wants_listener = roles.contains(&Role::Listener);
    let wants_delivery = roles.contains(&Role::Delivery);
    if (wants_router || wants_delivery) && config.queue.is_none() {
        anyhow::bail!(
            "the router and delivery roles need a queue database: add a queue section or set DATABASE_URL"
        );
    }

    let metrics = Arc::new(Metrics::from_config(&config));
    let queue = match &config.queue {
        Some(settings) => Some(Queue::new(&settings.database)?),
        None => None,
    };
    let directory = queue.as_ref().map(|_| Arc::new(Directory::new()));
    let delivery = match (&queue, wants_delivery) {
        (Some(queue), true) => Some(Arc::new(
            delivery_workers(queue, &config)?.with_metrics(Arc::clone(&metrics)),
        )),
        _ => None,
    };
    let router = match (&queue, &directory, wants_router) {
        (Some(queue), Some(directory), true) => {
            let mut router = Router::new(
                queue.clone(),
                Arc::clone(directory),
                router_settings(&config),
            );
            router.set_metrics(Arc::clone(&metrics));
            if let Some(delivery) = &delivery {
                router.set_delivery_wake(delivery.wake_handle());
            }
            Some(Arc::new(router))
        }
        _ => None,
    };
    // Cancelled once the queue's migrations are applied.
    let queue_ready = CancellationToken::new();
    if let (Some(queue), Some(directory), Some(settings)) = (&queue, &directory, &config.queue) {
        tokio::spawn(maintain_queue(
            queue.clone(),
            Arc::clone(directory),
            config.clone(),
            settings.janitor_interval,
            Arc::clone(&metrics),
            queue_ready.clone(),
            shutdown.clone(),
        ));
    }

    let admin_config = config.admin.clone();
    let readiness = Arc::new(Readiness::new(
        wants_listener,
        queue.clone().map(|queue| (queue, queue_ready.clone())),
        admin_config
            .as_ref()
            .map_or(std::time::Duration::from_secs(2), |admin| {
                admin.check_timeout
            }),
    ));
    // The admin listener stays up while the tiers drain, so the process
    // reports itself unready and can still be scraped.
    let admin_shutdown = CancellationToken::new();
    let mut admin_address = None;
    let mut admin_task = None;
    if let Some(admin) = &admin_config {
        let server = AdminServer::bind(
            admin.address,
            AdminState {
                metrics: Arc::clone(&metrics),
                readiness: Arc::clone(&readiness),
                queue: queue.clone(),
                directory: directory.clone(),
            },
        )
        .await?;
        admin_address = server.local_address();
        admin_task = Some(tokio::spawn(server.run(admin_shutdown.clone())));
        if let Some(queue) = &queue {
            // Counting starts once the queue is migrated: before, on a new
            // installation, the database or its tables do not exist yet.
            let collector = crate::metrics::collector::run(
                queue.clone(),
                Arc::clone(&metrics),
                admin.queue_interval,
                admin.check_timeout,
                shutdown.clone(),
            );
            let queue_ready = queue_ready.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = queue_ready.cancelled() => collector.await,
                    () = shutdown.cancelled() => {}
                }
            });
        }
    }
    {
        let readiness = Arc::clone(&readiness);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.set_shutting_down();
        });
    }

    let mut tasks = Vec::new();
    let mut addresses = Vec::new();
    let config = Arc::new(config);
    let mut listener_state = None;
    if wants_listener {
        let blocklists = Blocklists::from_config(&config)?.map(Arc::new);
        let rate_limits = RateLimits::new(&config.rate_limits, config.limits.rate_limit_keys, None);
        let shared = Arc::new(Shared {
            config: Arc::clone(&config),
            queue,
            directory: directory.clone(),
            router_wake: router.as_ref().map(|r| r.wake_handle()),
            blocklists,
            metrics: Arc::clone(&metrics),
            rate_limits: Arc::new(rate_limits),
        });
        let server = Server::bind(shared).await?;
        addresses = server.local_addresses();
        listener_state = Some(server.state());
        tasks.push(tokio::spawn(server.run(shutdown.clone())));
        // The sockets are bound and listening: connections wait in the
        // backlog until the accept loops take them.
        readiness.set_listening();
    }
    let reloader = Arc::new(Reloader::new(
        config,
        listener_state,
        wants_router || wants_delivery,
        Arc::clone(&metrics),
    ));
    if let Some(router) = &router {
        tasks.push(tokio::spawn(Arc::clone(router).run(shutdown.clone())));
    }
    if let Some(delivery) = &delivery {
        tasks.push(tokio::spawn(
            Arc::clone(delivery).run_when(queue_ready.clone(), shutdown.clone()),
        ));
    }
    let handle = tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
        admin_shutdown.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
    });
    Ok(Running {
        handle,
        addresses,
        directory,
        router,
        delivery,
        admin_address,
        metrics,
        reloader,
    })
}

fn delivery_workers(queue: &Queue, config: &Config) -> anyhow::Result<DeliveryWorkers> {
    let owner = format!(
        "{}:{}:{}",
        config.hostname,
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let mut notifications = NotificationSettings::new(config.hostname.clone());
    notifications.return_limit = config.delivery.bounce_return_limit;
    if let Some(settings) = &config.queue {
        notifications.chunk_size = settings.database.chunk_size;
    }
    let store = DeliveryStore::new(queue.clone(), owner, config.delivery.clone(), notifications);
    DeliveryWorkers::new(store, config)
}

fn router_settings(config: &Config) -> RouterSettings {
    RouterSettings {
        workers: config.router.workers,
        claim_messages: config.router.claim_messages as i64,
        lease: config.router.lease,
        batch_size: config.router.batch_size,
        max_depth: config.router.max_depth,
        poll_interval: config.router.poll_interval,
        hostname: config.hostname.clone(),
        relay_domains: config.relay.relay_domains.clone(),
        outbound_group: config.relay.outbound_group.clone(),
    }
}

/// Applies migrations (retrying while the database is unreachable, since the
/// listener keeps serving pass-through mail meanwhile), enters the
/// configured local domains into the directory, watches the directory, and
/// runs the janitor.
async fn maintain_queue(
    queue: Queue,
    directory: Arc<Directory>,
    config: Config,
    janitor_interval: std::time::Duration,
    metrics: Arc<Metrics>,
    ready: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        let result = match queue.migrate().await {
            Ok(()) => seed_domains(&queue, &config).await,
            Err(error) => Err(anyhow::Error::from(error)),
        };
        match result {
            Ok(()) => {
                ready.cancel();
                break;
            }
            Err(error) => {
                metrics.database_error(Component::Janitor);
                let error = format!("{error:#}");
                crate::log_limited!(error, suppressed => tracing::error!(
                    error = %error,
                    suppressed,
                    retry_seconds = MIGRATION_RETRY.as_secs(),
                    "queue migration failed; spooling fails until it succeeds"
                ));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(MIGRATION_RETRY) => {}
            () = shutdown.cancelled() => return,
        }
    }

    tokio::spawn(crate::queue::statistics::keep_statistics(
        queue.clone(),
        shutdown.clone(),
    ));
    if let Some(settings) = &config.queue {
        tokio::spawn(directory::watch(
            settings.database.url.clone(),
            directory,
            config.directory_poll_interval,
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }

    loop {
        tokio::select! {
            () = tokio::time::sleep(janitor_interval) => {}
            () = shutdown.cancelled() => return,
        }
        let janitor = metrics.queue.as_ref();
        match queue.remove_expired_receiving().await {
            Ok(0) => {}
            Ok(removed) => {
                if let Some(janitor) = janitor {
                    janitor.receiving_removed.inc_by(removed);
                }
                tracing::info!(removed, "janitor removed unfinished messages");
            }
            Err(error) => {
                metrics.database_error(Component::Janitor);
                crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                    error = %error,
                    suppressed,
                    "janitor failed"
                ));
            }
        }
        match queue.upkeep().await {
            Ok(upkeep) => {
                if let Some(janitor) = janitor {
                    janitor.leases_expired.inc_by(upkeep.leases_returned);
                }
                if upkeep.leases_returned > 0 {
                    tracing::warn!(
                        leases = upkeep.leases_returned,
                        "expired leases returned; their workers stopped or stalled"
                    );
                }
                if upkeep.destinations_added > 0 {
                    tracing::info!(
                        destinations = upkeep.destinations_added,
                        "destination rows re-created for pending deliveries"
                    );
                }
                if upkeep.messages_completed > 0 {
                    tracing::info!(
                        messages = upkeep.messages_completed,
                        "complete messages removed"
                    );
                }
            }
            Err(error) => {
                metrics.database_error(Component::Janitor);
                crate::log_limited!(error.to_string(), suppressed => tracing::warn!(
                    error = %error,
                    suppressed,
                    "queue upkeep failed"
                ));
            }
        }
    }
}

/// Enters `relay.local_domains` from the configuration into the directory as
/// local domains, so accounts can be added for them.
pub async fn seed_domains(queue: &Queue, config: &Config) -> anyhow::Result<()> {
    let domains: Vec<String> = config.relay.local_domains.iter().cloned().collect();
    if domains.is_empty() {
        return Ok(());
    }
    let client = queue.pool().get().await?;
    client
        .execute(
            "INSERT INTO directory_domains (name, kind)
             SELECT unnest($1::text[]), 'local'
             ON CONFLICT (name) DO NOTHING",
            &[&domains],
        )
        .await?;
    Ok(())
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
