//! The SMTP listener: binds the configured addresses, accepts connections
//! within the connection limits, and runs one [`Session`] task per
//! connection with an [`Intake`] handler.
//!
//! Limits: a total connection cap, a cap of open connections per client
//! address and a rate of new connections per client address (IPv6: per
//! /64), the last two from the client's rate limit class. A client over
//! any of them gets `421 4.7.0` and is closed before any command is read.
//! Reloads: the settings that sessions read are one [`ListenerState`],
//! which a reload replaces as a whole. Each connection takes the state
//! current when it is admitted and keeps it to its end.
//! PROXY protocol: the header of a trusted load balancer's connection is read
//! in the connection's own task. The client it names is the one counted and
//! served, and a balancer that sends no valid header is closed without a
//! greeting.
//! Shutdown: when the token is cancelled the listener stops accepting, idle
//! sessions get 421 and close, and sessions in a transaction may finish
//! within `timeouts.shutdown_grace`; those still open then are cut off.

pub mod intake;
pub mod proxy_protocol;
pub mod reload;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::auth::limiter::ClientKey;
use crate::config::{ListenerConfig, ProxyProtocolConfig, TlsFiles};
use crate::metrics::{ConnectionRejection, Metrics};
use crate::smtp::reply::Reply;
use crate::smtp::session::{Session, SessionAuth, SessionConfig};
use intake::{Intake, Shared};

/// Counts open connections, in total and per client address (IPv6: per
/// /64). The maximums come with each request, from the current
/// configuration, so the counts survive a reload.
struct ConnectionLimits {
    open: Mutex<HashMap<ClientKey, usize>>,
    total: std::sync::atomic::AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Held by a session; releases its connection slot when dropped.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    key: ClientKey,
    /// `wsmtp_connections_open`, decreased when the slot is released.
    open_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// A connection over a limit: the limit's name for the log, the reason for
/// the metrics, and the reply.
struct Refusal {
    limit: &'static str,
    reason: ConnectionRejection,
    reply: Reply,
}

impl ConnectionLimits {
    fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<ConnectionSlot, Refusal> {
        use std::sync::atomic::Ordering;
        // A poisoned lock means a session panicked while holding it; the
        // counters are still usable, so recover the guard.
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.total.load(Ordering::Relaxed) >= max_total {
            return Err(Refusal {
                limit: "max_connections",
                reason: ConnectionRejection::MaxConnections,
                reply: Reply::too_many_connections(),
            });
        }
        let key = ClientKey::from_ip(ip);
        let count = open.entry(key).or_insert(0);
        if *count >= max_per_ip {
            if *count == 0 {
                open.remove(&key);
            }
            return Err(Refusal {
                limit: "max_connections_per_ip",
                reason: ConnectionRejection::MaxConnectionsPerIp,
                reply: Reply::too_many_connections_from_ip(),
            });
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            key,
            open_gauge: self.metrics.smtp.connections_open.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        self.open_gauge.dec();
    }
}

/// A bound socket with the settings of its listener that only a restart
/// changes.
struct BoundListener {
    socket: TcpListener,
    /// Position in `listeners`, which is also the index of its session
    /// settings in [`ListenerState`].
    index: usize,
    proxy_protocol: Option<ProxyProtocolConfig>,
}

/// The settings that the sessions of every listener read: the configuration
/// with the rules, lists and rate limits, and each listener's session
/// settings.
pub struct ListenerState {
    pub shared: Arc<Shared>,
    /// Session settings of each listener, in configuration order.
    sessions: Vec<Arc<SessionConfig>>,
}

impl ListenerState {
    /// Builds the state for a reloaded configuration in `shared`. Limits
    /// and timeouts come from it; the host name, TLS and AUTH of each
    /// listener only change with a restart, so they are kept.
    pub fn reloaded(&self, shared: Arc<Shared>) -> ListenerState {
        let sessions = self
            .sessions
            .iter()
            .map(|old| {
                Arc::new(SessionConfig {
                    hostname: old.hostname.clone(),
                    limits: shared.config.limits.clone(),
                    timeouts: shared.config.timeouts.clone(),
                    tls: old.tls.clone(),
                    implicit_tls: old.implicit_tls,
                    auth: old.auth.clone(),
                    metrics: Arc::clone(&old.metrics),
                })
            })
            .collect();
        ListenerState { shared, sessions }
    }
}

/// A bound listener, ready to serve.
pub struct Server {
    sockets: Vec<BoundListener>,
    state: Arc<ArcSwap<ListenerState>>,
    connections: Arc<ConnectionLimits>,
}

impl Server {
    /// Binds every configured listener and loads TLS material.
    pub async fn bind(shared: Arc<Shared>) -> anyhow::Result<Server> {
        let config = Arc::clone(&shared.config);
        let mut sockets = Vec::new();
        let mut sessions = Vec::new();
        // One authenticator for all listeners, so failure counts are shared.
        let authenticator = match &shared.directory {
            Some(directory) if config.listeners.iter().any(|l| l.auth.is_some()) => Some(Arc::new(
                Authenticator::new(Arc::clone(directory), config.auth.clone()),
            )),
            _ => None,
        };
        for (index, listener) in config.listeners.iter().enumerate() {
            let tls = match &listener.tls {
                Some(files) => Some(load_tls(files)?),
                None => None,
            };
            sessions.push(Arc::new(SessionConfig {
                hostname: config.hostname.clone(),
                limits: config.limits.clone(),
                timeouts: config.timeouts.clone(),
                tls,
                implicit_tls: listener.tls.as_ref().is_some_and(|files| files.implicit),
                auth: session_auth(listener, authenticator.as_ref())?,
                metrics: Arc::clone(&shared.metrics),
            }));
            let socket = TcpListener::bind(listener.address)
                .await
                .with_context(|| format!("cannot listen on {}", listener.address))?;
            sockets.push(BoundListener {
                socket,
                index,
                proxy_protocol: listener.proxy_protocol.clone(),
            });
        }
        let connections = Arc::new(ConnectionLimits {
            open: Mutex::new(HashMap::new()),
            total: std::sync::atomic::AtomicUsize::new(0),
            metrics: Arc::clone(&shared.metrics),
        });
        let state = ListenerState { shared, sessions };
        Ok(Server {
            sockets,
            state: Arc::new(ArcSwap::from_pointee(state)),
            connections,
        })
    }

    /// The state that new connections take, for a reload to replace.
    pub fn state(&self) -> Arc<ArcSwap<ListenerState>> {
        Arc::clone(&self.state)
    }

    /// The bound addresses, in configuration order (useful with port 0).
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|bound| bound.socket.local_addr().ok())
            .collect()
    }

    /// Accepts connections until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let sessions = CancellationToken::new();
        tracker.spawn(tidy_rate_limits(Arc::clone(&self.state), shutdown.clone()));
        for bound in self.sockets {
            let address = bound
                .socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let session_config = Arc::clone(&self.state.load().sessions[bound.index]);
            tracing::info!(
                address = %address,
                tls = session_config.tls.is_some(),
                implicit_tls = session_config.implicit_tls,
                auth = session_config.auth.is_some(),
                proxy_protocol = bound.proxy_protocol.is_some(),
                "listening"
            );
            let context = Arc::new(ListenerContext {
                index: bound.index,
                proxy_protocol: bound.proxy_protocol,
                state: Arc::clone(&self.state),
                connections: Arc::clone(&self.connections),
                sessions: sessions.clone(),
            });
            tracker.spawn(accept_loop(
                bound.socket,
                context,
                shutdown.clone(),
                tracker.clone(),
            ));
        }

        shutdown.cancelled().await;
        let grace = self.state.load().shared.config.timeouts.shutdown_grace;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "shutting down: no new connections"
        );
        // Idle sessions close with 421 now; sessions inside a transaction get
        // the grace period to finish it.
        sessions.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("grace period over: closing sessions still open");
        }
    }
}

/// Drops rate limit keys that are back to a fresh state, every
/// [`TIDY_INTERVAL`](crate::ratelimit::TIDY_INTERVAL), in the limiters
/// that new connections use.
async fn tidy_rate_limits(state: Arc<ArcSwap<ListenerState>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(crate::ratelimit::TIDY_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        let rate_limits = Arc::clone(&state.load().shared.rate_limits);
        let started = std::time::Instant::now();
        rate_limits.tidy();
        tracing::debug!(
            keys = rate_limits.tracked_keys(),
            duration_ms = started.elapsed().as_millis() as u64,
            "rate limit keys tidied"
        );
    }
}

/// Settings and shared state for the connections of one listener.
struct ListenerContext {
    /// Position of the listener in `listeners`.
    index: usize,
    proxy_protocol: Option<ProxyProtocolConfig>,
    state: Arc<ArcSwap<ListenerState>>,
    connections: Arc<ConnectionLimits>,
    /// Cancelled at shutdown: idle sessions close.
    sessions: CancellationToken,
}

impl ListenerContext {
    /// Counts the connection against the limits for `client` and builds its
    /// session with the current state. Over a limit the connection gets 421
    /// from a task of its own and `None` is returned.
    fn admit(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<(Session<Intake>, ConnectionSlot)> {
        let state = self.state.load_full();
        let metrics = &state.shared.metrics;
        let class = state.shared.rate_limits.class_for_client(client.ip());
        let admitted = self
            .connections
            .acquire(
                client.ip(),
                state.shared.config.limits.max_connections,
                class.max_connections_per_ip(),
            )
            .and_then(|slot| match class.check_connection(client.ip()) {
                Ok(()) => Ok(slot),
                Err(hit) => Err(Refusal {
                    limit: hit.limit.as_str(),
                    reason: ConnectionRejection::RateLimit,
                    reply: hit.reply(),
                }),
            });
        let slot = match admitted {
            Ok(slot) => slot,
            Err(refusal) => {
                metrics.smtp.connection_rejected(refusal.reason);
                metrics.smtp.reply_sent(refusal.reply.code());
                if refusal.reason == ConnectionRejection::RateLimit {
                    metrics.rate_limit_hit(refusal.limit);
                }
                tracing::info!(
                    client_ip = %client.ip(),
                    limit = refusal.limit,
                    class = class.name(),
                    reply = %refusal.reply.summary(),
                    "connection refused by limit"
                );
                tokio::spawn(refuse(stream, refusal.reply));
                return None;
            }
        };
        metrics.smtp.connections_accepted.inc();
        metrics.smtp.connections_open.inc();
        let session = Session::new(
            Arc::clone(&state.sessions[self.index]),
            stream,
            client,
            local,
            Intake::new(Arc::clone(&state.shared)),
            self.sessions.clone(),
        );
        Some((session, slot))
    }

    /// Reads the PROXY header of a trusted load balancer's connection, then
    /// serves the client it names. A missing or invalid header closes the
    /// connection without a greeting.
    async fn serve_proxied(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        timeout: std::time::Duration,
    ) {
        let header = tokio::select! {
            header = proxy_protocol::read_header(&mut stream, timeout) => header,
            () = self.sessions.cancelled() => return,
        };
        let client = match header {
            Ok(proxy_protocol::Source::Client(client)) => {
                tracing::debug!(peer = %peer, client = %client, "PROXY header read");
                client
            }
            Ok(proxy_protocol::Source::Peer) => {
                tracing::debug!(peer = %peer, "PROXY header without a client address");
                peer
            }
            // A TCP health check connects and closes without sending anything.
            Err(proxy_protocol::HeaderError::Closed { received: 0 }) => {
                tracing::debug!(peer = %peer, "load balancer closed the connection before a PROXY header");
                return;
            }
            Err(error) => {
                self.state
                    .load()
                    .shared
                    .metrics
                    .smtp
                    .connection_rejected(ConnectionRejection::ProxyHeader);
                tracing::warn!(peer = %peer, error = %error, "PROXY header missing or invalid; connection closed");
                return;
            }
        };
        if let Some((session, _slot)) = self.admit(stream, client, local) {
            session.run().await;
        }
    }
}

async fn accept_loop(
    socket: TcpListener,
    context: Arc<ListenerContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(error = %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let proxy_timeout = context
            .proxy_protocol
            .as_ref()
            .filter(|settings| settings.trusts(peer.ip()))
            .map(|settings| settings.timeout);
        if let Some(timeout) = proxy_timeout {
            // The header is read in the connection's task, so a slow balancer
            // never holds up the accept loop; the limits are applied after it.
            let context = Arc::clone(&context);
            tracker.spawn(async move {
                context.serve_proxied(stream, peer, local, timeout).await;
            });
            continue;
        }
        if let Some((session, slot)) = context.admit(stream, peer, local) {
            tracker.spawn(async move {
                let _slot = slot;
                session.run().await;
            });
        }
    }
}

/// The AUTH settings of a listener's sessions.
fn session_auth(
    listener: &ListenerConfig,
    authenticator: Option<&Arc<Authenticator>>,
) -> anyhow::Result<Option<SessionAuth>> {
    let Some(auth) = &listener.auth else {
        return Ok(None);
    };
    let Some(authenticator) = authenticator else {
        anyhow::bail!(
            "listener {} offers AUTH, which needs the account directory; add a queue section",
            listener.address
        );
    };
    Ok(Some(SessionAuth {
        mechanisms: auth.mechanisms.clone(),
        require_tls: auth.require_tls,
        authenticator: Arc::clone(authenticator),
    }))
}

/// Sends a 421 to a connection over a limit and closes it.
async fn refuse(mut stream: TcpStream, reply: Reply) {
    let wire = reply.to_wire();
    let write = stream.write_all(wire.as_bytes());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), write).await;
    let _ = stream.shutdown().await;
}

/// Loads a certificate chain and private key (PEM) into a TLS acceptor.
pub fn load_tls(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certificates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.certificate)
            .with_context(|| format!("cannot read certificate {}", files.certificate.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!("invalid certificate PEM in {}", files.certificate.display())
            })?;
    if certificates.is_empty() {
        anyhow::bail!("no certificate found in {}", files.certificate.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("cannot read private key {}", files.key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .context("certificate and key do not match or are unsupported")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
