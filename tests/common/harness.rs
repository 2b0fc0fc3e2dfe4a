//! Starts wsmtp in-process on port 0 with a test configuration, and drives it
//! with a raw SMTP client that can bind to any 127.x address.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::db::TestDb;
use wsmtp::cli::serve::Role;
use wsmtp::config::Config;
use wsmtp::queue::{Queue, QueueConfig};

/// Settings that differ between tests; the rest is the standard layout:
/// example.com local (when a database is used), example.net relayed to the
/// group `legacy` (the sinks), 127.0.0.1 a relay network.
pub struct TestConfig {
    pub downstream: Vec<SocketAddr>,
    pub with_queue: bool,
    /// YAML lines under `limits:`, each indented by two spaces.
    pub limits: String,
    /// YAML lines under `timeouts:`.
    pub timeouts: String,
    /// YAML for the listener's `tls:` key, e.g. `{certificate: a, key: b}`.
    pub tls: Option<String>,
    /// YAML for the listener's `auth:` key, e.g. `{require_tls: false}`.
    pub auth: Option<String>,
    /// YAML lines under the top-level `auth:` section.
    pub auth_settings: String,
    /// Top-level YAML appended to the configuration, e.g. a `rate_limits:`
    /// section or a `rules:` directory.
    pub extra: String,
}

impl TestConfig {
    pub fn new(downstream: &[SocketAddr]) -> TestConfig {
        TestConfig {
            downstream: downstream.to_vec(),
            with_queue: true,
            limits: String::new(),
            timeouts: String::new(),
            tls: None,
            auth: None,
            auth_settings: String::new(),
            extra: String::new(),
        }
    }

    /// Appends top-level YAML to the configuration.
    pub fn extra(mut self, yaml: &str) -> TestConfig {
        self.extra.push_str(yaml);
        self
    }

    pub fn without_queue(mut self) -> TestConfig {
        self.with_queue = false;
        self
    }

    pub fn limits(mut self, yaml: &str) -> TestConfig {
        self.limits = yaml.to_string();
        self
    }

    pub fn tls(mut self, certificate: &std::path::Path, key: &std::path::Path) -> TestConfig {
        self.tls = Some(format!(
            "{{certificate: '{}', key: '{}'}}",
            certificate.display(),
            key.display()
        ));
        self
    }

    /// Like [`TestConfig::tls`], with the handshake on connect (RFC 8314).
    pub fn implicit_tls(
        mut self,
        certificate: &std::path::Path,
        key: &std::path::Path,
    ) -> TestConfig {
        self.tls = Some(format!(
            "{{certificate: '{}', key: '{}', implicit: true}}",
            certificate.display(),
            key.display()
        ));
        self
    }

    /// Offers AUTH on the listener; `yaml` is the value of its `auth:` key.
    pub fn auth(mut self, yaml: &str) -> TestConfig {
        self.auth = Some(yaml.to_string());
        self
    }

    /// YAML lines under the top-level `auth:` section, each indented by two spaces.
    pub fn auth_settings(mut self, yaml: &str) -> TestConfig {
        self.auth_settings = yaml.to_string();
        self
    }

    pub fn timeouts(mut self, yaml: &str) -> TestConfig {
        self.timeouts = yaml.to_string();
        self
    }

    fn to_yaml(&self, database_url: Option<&str>) -> String {
        let hosts: Vec<String> = self
            .downstream
            .iter()
            .map(|a| format!("      - {a}\n"))
            .collect();
        let hosts = if hosts.is_empty() {
            // A port nothing listens on, so the group is unreachable.
            "      - 127.0.0.1:9\n".to_string()
        } else {
            hosts.concat()
        };
        let tls = self
            .tls
            .as_ref()
            .map(|tls| format!("    tls: {tls}\n"))
            .unwrap_or_default();
        let listener_auth = self
            .auth
            .as_ref()
            .map(|auth| format!("    auth: {auth}\n"))
            .unwrap_or_default();
        let auth_settings = if self.auth_settings.is_empty() {
            String::new()
        } else {
            format!("auth:\n{}", self.auth_settings)
        };
        let local = if database_url.is_some() {
            "[example.com]"
        } else {
            "[]"
        };
        let queue = database_url
            .map(|url| format!("queue:\n  url: {url}\n  chunk_size: 65536\n"))
            .unwrap_or_default();
        format!(
            "hostname: mx.test.example\n\
             listeners:\n  - address: 127.0.0.1:0\n{tls}{listener_auth}{auth_settings}\
             limits:\n{limits}\
             timeouts:\n  shutdown_grace: 5s\n{timeouts}\
             relay:\n  local_domains: {local}\n  \
             relay_domains:\n    - domain: example.net\n      group: legacy\n  \
             relay_networks: [127.0.0.1/32]\n  outbound_group: legacy\n\
             downstream_groups:\n  - name: legacy\n    connect_timeout: 2s\n    command_timeout: 10s\n    hosts:\n{hosts}\
             {queue}{extra}",
            limits = if self.limits.contains("max_message_size") {
                self.limits.clone()
            } else {
                format!("  max_message_size: 209715200\n{}", self.limits)
            },
            timeouts = self.timeouts,
            extra = self.extra,
        )
    }
}

/// A running wsmtp with its own database.
pub struct TestServer {
    pub address: SocketAddr,
    pub queue: Option<Queue>,
    pub db: Option<TestDb>,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
    pub directory: Option<std::sync::Arc<wsmtp::directory::Directory>>,
    /// The admin listener's address, when the configuration has `admin`.
    pub admin: Option<SocketAddr>,
}

impl TestServer {
    pub async fn start(config: TestConfig) -> TestServer {
        let db = if config.with_queue {
            Some(TestDb::create().await)
        } else {
            None
        };
        let yaml = config.to_yaml(db.as_ref().map(|db| db.url.as_str()));
        TestServer::start_yaml(&yaml, db).await
    }

    /// Starts wsmtp with a complete configuration text (listen on port 0),
    /// running the listener, and the router when there is a queue.
    pub async fn start_yaml(yaml: &str, db: Option<TestDb>) -> TestServer {
        TestServer::start_yaml_roles(yaml, db, None).await
    }

    /// Like [`TestServer::start_yaml`] with the given roles.
    pub async fn start_yaml_roles(
        yaml: &str,
        db: Option<TestDb>,
        roles: Option<&[Role]>,
    ) -> TestServer {
        // Logs when RUST_LOG is set, e.g. RUST_LOG=wsmtp=debug.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let parsed = Config::parse(yaml, None)
            .unwrap_or_else(|problems| panic!("test config invalid: {problems:?}\n{yaml}"));
        let queue = match &parsed.queue {
            Some(settings) => {
                let queue = Queue::new(&settings.database).expect("queue");
                queue.migrate().await.expect("migrate test database");
                Some(queue)
            }
            None => None,
        };
        if let Some(queue) = &queue {
            seed_directory(queue).await;
        }
        let shutdown = CancellationToken::new();
        let roles: &[Role] = match (roles, &queue) {
            (Some(roles), _) => roles,
            (None, Some(_)) => &[Role::Listener, Role::Router],
            (None, None) => &[Role::Listener],
        };
        let running = wsmtp::cli::serve::start(parsed, roles, shutdown.clone())
            .await
            .expect("start wsmtp");
        if let Some(directory) = &running.directory {
            wait_for_directory(directory).await;
        }
        TestServer {
            address: running.addresses[0],
            queue,
            db,
            shutdown,
            handle: Some(running.handle),
            directory: running.directory,
            admin: running.admin_address,
        }
    }

    /// Connects from 127.0.0.1 (a relay network) and reads the greeting.
    pub async fn connect(&self) -> SmtpClient {
        SmtpClient::connect_from("127.0.0.1", self.address).await
    }

    /// Connects from another loopback address, outside the relay networks.
    pub async fn connect_from(&self, ip: &str) -> SmtpClient {
        SmtpClient::connect_from(ip, self.address).await
    }

    pub fn queue(&self) -> &Queue {
        self.queue.as_ref().expect("test server has a queue")
    }

    /// Messages in the `ready` state that are not held.
    pub async fn ready_messages(&self) -> Vec<wsmtp::queue::MessageSummary> {
        let filter = wsmtp::queue::ListFilter {
            state: Some(wsmtp::queue::ListState::Ready),
            limit: 1000,
            ..Default::default()
        };
        self.queue().list(&filter).await.expect("list queue")
    }

    /// Every message row, whatever its state.
    pub async fn all_messages(&self) -> Vec<wsmtp::queue::MessageSummary> {
        let filter = wsmtp::queue::ListFilter {
            limit: 1000,
            ..Default::default()
        };
        self.queue().list(&filter).await.expect("list queue")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
    }
}

/// Accounts every test server has: alice and carol at example.com, with
/// Maildir mailboxes.
pub const SEEDED_ACCOUNTS: &[&str] = &["alice", "carol"];

async fn seed_directory(queue: &Queue) {
    let client = queue.pool().get().await.expect("pooled connection");
    client
        .batch_execute("INSERT INTO directory_domains (name, kind) VALUES ('example.com', 'local') ON CONFLICT DO NOTHING")
        .await
        .expect("seed domain");
    for name in SEEDED_ACCOUNTS {
        let id: i64 = client
            .query_one(
                "INSERT INTO accounts (name, mailbox_kind, mailbox_target) VALUES ($1, 'maildir', $2) RETURNING id",
                &[name, &format!("/tmp/wsmtp-test-maildir/{name}")],
            )
            .await
            .expect("seed account")
            .get(0);
        client
            .execute(
                "INSERT INTO addresses (address, domain, account_id) VALUES ($1, 'example.com', $2)",
                &[&format!("{name}@example.com"), &id],
            )
            .await
            .expect("seed address");
    }
}

/// Waits until the server's directory snapshot contains the seeded accounts.
pub async fn wait_for_directory(directory: &wsmtp::directory::Directory) {
    for _ in 0..200 {
        if directory
            .snapshot()
            .is_some_and(|snapshot| snapshot.accounts.len() >= SEEDED_ACCOUNTS.len())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the directory was not loaded within 5 s");
}

/// Spools `count` small messages straight into the queue, each to the
/// given local recipients.
pub async fn spool_messages(queue: &Queue, count: usize, recipients: &[&str]) {
    spool_messages_for_group(queue, count, recipients, None).await;
}

/// Like [`spool_messages`], with every recipient routed to `group`, as the
/// listener stores relay-domain recipients of a spooled transaction.
pub async fn spool_messages_for_group(
    queue: &Queue,
    count: usize,
    recipients: &[&str],
    group: Option<&str>,
) {
    let recipients: Vec<wsmtp::queue::SpoolRecipient> = recipients
        .iter()
        .map(|address| wsmtp::queue::SpoolRecipient {
            address: address.to_string(),
            route_group: group.map(str::to_string),
            orcpt: None,
            notify: None,
        })
        .collect();
    for n in 0..count {
        let mut writer = queue.begin(wsmtp::queue::Envelope {
            id: wsmtp::queue::new_queue_id(),
            sender: format!("sender{n}@example.net"),
            client_ip: "127.0.0.2".parse().expect("ip"),
            helo: "client.example".into(),
            smtputf8: false,
            body_type: None,
            dsn_ret: None,
            dsn_envid: None,
        });
        writer
            .write(format!("Subject: {n}\r\n\r\nbody\r\n").as_bytes())
            .await
            .expect("write");
        writer.commit(&recipients).await.expect("commit");
    }
}

/// Queue settings for direct use in tests.
pub fn queue_config(url: &str) -> QueueConfig {
    QueueConfig {
        url: url.to_string(),
        pool_size: 4,
        chunk_size: 65536,
        statement_timeout: Duration::from_secs(10),
        create_database: false,
        receiving_ttl: Duration::from_secs(3600),
    }
}

/// One SMTP reply as read by [`SmtpClient`].
#[derive(Debug, Clone)]
pub struct TestReply {
    pub code: u16,
    /// Full reply text, lines joined with `\n`, codes included.
    pub text: String,
}

/// A raw SMTP client for tests: sends exact bytes, reads replies.
pub struct SmtpClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl SmtpClient {
    pub async fn connect_from(ip: &str, server: SocketAddr) -> SmtpClient {
        let mut client = SmtpClient::connect_raw(ip, server).await;
        let greeting = client.reply().await;
        assert_eq!(greeting.code, 220, "greeting: {}", greeting.text);
        client
    }

    /// Connects without reading the greeting.
    pub async fn connect_raw(ip: &str, server: SocketAddr) -> SmtpClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{ip}:0").parse().expect("bind address"))
            .expect("bind test client");
        let stream = socket.connect(server).await.expect("connect to wsmtp");
        SmtpClient {
            stream,
            buffer: Vec::new(),
        }
    }

    pub async fn send(&mut self, data: &[u8]) {
        self.stream.write_all(data).await.expect("write to wsmtp");
    }

    /// Reads one reply; panics after 20 s or if the connection closes.
    pub async fn reply(&mut self) -> TestReply {
        self.try_reply(Duration::from_secs(20))
            .await
            .expect("connection closed before a reply")
    }

    /// Reads one reply, or None when the server closed the connection.
    pub async fn try_reply(&mut self, timeout: Duration) -> Option<TestReply> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(timeout).await?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        let code = lines[0]
            .get(..3)
            .and_then(|c| c.parse().ok())
            .expect("reply code");
        Some(TestReply {
            code,
            text: lines.join("\n"),
        })
    }

    async fn read_line(&mut self, timeout: Duration) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(timeout, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for a reply")
                .ok()?;
            if read == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Sends a command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str) -> TestReply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends a command and checks the reply code.
    pub async fn expect(&mut self, line: &str, code: u16) -> TestReply {
        let reply = self.command(line).await;
        assert_eq!(reply.code, code, "{line} got {}", reply.text);
        reply
    }

    /// True when the server has closed the connection (reads EOF).
    pub async fn is_closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// A simple test message of about `size` octets with CRLF lines.
pub fn test_message(subject: &str, size: usize) -> Vec<u8> {
    let mut message =
        format!("From: a@example.org\r\nTo: b@example.net\r\nSubject: {subject}\r\n\r\n")
            .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while message.len() < size {
        message.extend_from_slice(line);
    }
    message
}

/// Strips our Received header (the first header field and its folded lines).
pub fn without_first_received(content: &[u8]) -> &[u8] {
    assert!(
        content.starts_with(b"Received: "),
        "content starts with our Received header"
    );
    let mut index = 0;
    loop {
        let end = content[index..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| index + p + 2)
            .expect("header line end");
        index = end;
        if content.get(index) != Some(&b'\t') && content.get(index) != Some(&b' ') {
            return &content[index..];
        }
    }
}

/// Sends one message in an open session and returns the queue id from the
/// 250 reply, asserting that every step is accepted and the message spooled.
pub async fn send_spooled(
    client: &mut SmtpClient,
    sender: &str,
    recipients: &[&str],
    content: &[u8],
) -> wsmtp::queue::QueueId {
    client.expect(&format!("MAIL FROM:<{sender}>"), 250).await;
    for recipient in recipients {
        client.expect(&format!("RCPT TO:<{recipient}>"), 250).await;
    }
    client.expect("DATA", 354).await;
    client.send(content).await;
    client.send(b".\r\n").await;
    let reply = client.reply().await;
    assert!(
        reply.text.starts_with("250 2.0.0 OK: queued as "),
        "{}",
        reply.text
    );
    wsmtp::queue::QueueId::parse_str(reply.text.rsplit(' ').next().expect("queue id"))
        .expect("queue id")
}
