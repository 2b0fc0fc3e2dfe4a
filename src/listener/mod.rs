//! The SMTP listener: binds the configured addresses, accepts connections
//! within the connection limits, and runs one [`Session`] task per
//! connection with an [`Intake`] handler.
//!
//! Limits: a total connection cap and a per-client-IP cap; a client over
//! either gets `421 4.7.0` and is closed before any command is read.
//! PROXY protocol: the header of a trusted load balancer's connection is read
//! in the connection's own task. The client it names is the one counted and
//! served, and a balancer that sends no valid header is closed without a
//! greeting.
//! Shutdown: when the token is cancelled the listener stops accepting, idle
//! sessions get 421 and close, and sessions in a transaction may finish
//! within `timeouts.shutdown_grace`; those still open then are cut off.

pub mod intake;
pub mod proxy_protocol;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{ListenerConfig, ProxyProtocolConfig, TlsFiles};
use crate::metrics::{ConnectionRejection, Metrics};
use crate::smtp::reply::Reply;
use crate::smtp::session::{Session, SessionAuth, SessionConfig};
use intake::{Intake, Shared};

/// Counts open connections, in total and per client IP.
struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    total: std::sync::atomic::AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Held by a session; releases its connection slot when dropped.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
    /// `wsmtp_connections_open`, decreased when the slot is released.
    open_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl ConnectionLimits {
    fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<ConnectionSlot, (Reply, ConnectionRejection)> {
        use std::sync::atomic::Ordering;
        // A poisoned lock means a session panicked while holding it; the
        // counters are still usable, so recover the guard.
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err((
                Reply::too_many_connections(),
                ConnectionRejection::MaxConnections,
            ));
        }
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err((
                Reply::too_many_connections_from_ip(),
                ConnectionRejection::MaxConnectionsPerIp,
            ));
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            ip,
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
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        self.open_gauge.dec();
    }
}

/// A bound socket with the settings of its listener.
struct BoundListener {
    socket: TcpListener,
    session_config: Arc<SessionConfig>,
    proxy_protocol: Option<ProxyProtocolConfig>,
}

/// A bound listener, ready to serve.
pub struct Server {
    sockets: Vec<BoundListener>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    grace: std::time::Duration,
}

impl Server {
    /// Binds every configured listener and loads TLS material.
    pub async fn bind(shared: Arc<Shared>) -> anyhow::Result<Server> {
        let config = Arc::clone(&shared.config);
        let mut sockets = Vec::new();
        // One authenticator for all listeners, so failure counts are shared.
        let authenticator = match &shared.directory {
            Some(directory) if config.listeners.iter().any(|l| l.auth.is_some()) => Some(Arc::new(
                Authenticator::new(Arc::clone(directory), config.auth.clone()),
            )),
            _ => None,
        };
        for listener in &config.listeners {
            let tls = match &listener.tls {
                Some(files) => Some(load_tls(files)?),
                None => None,
            };
            let session_config = Arc::new(SessionConfig {
                hostname: config.hostname.clone(),
                limits: config.limits.clone(),
                timeouts: config.timeouts.clone(),
                tls,
                implicit_tls: listener.tls.as_ref().is_some_and(|files| files.implicit),
                auth: session_auth(listener, authenticator.as_ref())?,
                metrics: Arc::clone(&shared.metrics),
            });
            let socket = TcpListener::bind(listener.address)
                .await
                .with_context(|| format!("cannot listen on {}", listener.address))?;
            sockets.push(BoundListener {
                socket,
                session_config,
                proxy_protocol: listener.proxy_protocol.clone(),
            });
        }
        let limits = Arc::new(ConnectionLimits {
            max_total: config.limits.max_connections,
            max_per_ip: config.limits.max_connections_per_ip,
            open: Mutex::new(HashMap::new()),
            total: std::sync::atomic::AtomicUsize::new(0),
            metrics: Arc::clone(&shared.metrics),
        });
        Ok(Server {
            sockets,
            shared,
            limits,
            grace: config.timeouts.shutdown_grace,
        })
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
        for bound in self.sockets {
            let address = bound
                .socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(
                address = %address,
                tls = bound.session_config.tls.is_some(),
                implicit_tls = bound.session_config.implicit_tls,
                auth = bound.session_config.auth.is_some(),
                proxy_protocol = bound.proxy_protocol.is_some(),
                "listening"
            );
            let context = Arc::new(ListenerContext {
                session_config: bound.session_config,
                proxy_protocol: bound.proxy_protocol,
                shared: Arc::clone(&self.shared),
                limits: Arc::clone(&self.limits),
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
        tracing::info!(
            grace_seconds = self.grace.as_secs(),
            "shutting down: no new connections"
        );
        // Idle sessions close with 421 now; sessions inside a transaction get
        // the grace period to finish it.
        sessions.cancel();
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over: closing sessions still open");
        }
    }
}

/// Settings and shared state for the connections of one listener.
struct ListenerContext {
    session_config: Arc<SessionConfig>,
    proxy_protocol: Option<ProxyProtocolConfig>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    /// Cancelled at shutdown: idle sessions close.
    sessions: CancellationToken,
}

impl ListenerContext {
    /// Counts the connection against the limits for `client` and builds its
    /// session. Over a limit the connection gets 421 from a task of its own
    /// and `None` is returned.
    fn admit(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Option<(Session<Intake>, ConnectionSlot)> {
        let metrics = &self.shared.metrics;
        let slot = match self.limits.acquire(client.ip()) {
            Ok(slot) => slot,
            Err((reply, reason)) => {
                metrics.smtp.connection_rejected(reason);
                metrics.smtp.reply_sent(reply.code());
                tracing::info!(client_ip = %client.ip(), reply = %reply.summary(), "connection refused by limit");
                tokio::spawn(refuse(stream, reply));
                return None;
            }
        };
        metrics.smtp.connections_accepted.inc();
        metrics.smtp.connections_open.inc();
        let session = Session::new(
            Arc::clone(&self.session_config),
            stream,
            client,
            local,
            Intake::new(Arc::clone(&self.shared)),
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
                self.shared
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
