//! SMTP AUTH (RFC 4954) with PLAIN and LOGIN against the account directory:
//! the failure limit, relaying and sender rules for authenticated clients,
//! implicit TLS, and `wsmtp accounts password`. The tests use a real
//! PostgreSQL, a recording downstream sink, and the real binary for the
//! command line.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::directory::wait_until_current;
use common::harness::{SmtpClient, TestConfig, TestServer};
use common::sink::{Sink, SinkMessage};
use common::tls::{TlsSmtpClient, handshake, make_certificate};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const PASSWORD: &str = "correct horse battery";

fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

/// Encodes a PLAIN response: authorization identity, user name and password.
fn plain(authorization: &str, login: &str, password: &str) -> String {
    b64(&format!("{authorization}\0{login}\0{password}"))
}

/// Builds the standard test layout with AUTH offered on the plain listener,
/// no wait after failures, and a sink as the outbound group.
fn plain_auth_config(sink: &Sink) -> TestConfig {
    TestConfig::new(&[sink.addr])
        .auth("{require_tls: false}")
        .auth_settings("  failure_delay: 0s\n")
}

/// Stores a password hash for a seeded account and waits until the server's
/// directory has it.
async fn set_password(server: &TestServer, account: &str, password: &str) {
    let client = server.db.as_ref().expect("test database").connect().await;
    let hash = wsmtp::auth::password::hash_password(password.as_bytes()).expect("hash");
    let updated = client
        .execute(
            "UPDATE accounts SET password_hash = $2 WHERE name = $1",
            &[&account, &hash],
        )
        .await
        .expect("store password hash");
    assert_eq!(updated, 1, "account {account} exists");
    wait_until_current(&client, server.directory.as_ref().expect("directory")).await;
}

async fn start_with_alice(config: TestConfig) -> TestServer {
    let server = TestServer::start(config).await;
    set_password(&server, "alice", PASSWORD).await;
    server
}

async fn ehlo(client: &mut SmtpClient) -> String {
    client.expect("EHLO client.example", 250).await.text
}

/// Sends one message to `recipient` in an open, greeted session and checks
/// that it is accepted.
async fn send_message(client: &mut SmtpClient, sender: &str, recipient: &str) {
    client.expect(&format!("MAIL FROM:<{sender}>"), 250).await;
    client.expect(&format!("RCPT TO:<{recipient}>"), 250).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: submitted\r\n\r\nHello.\r\n.\r\n")
        .await;
    let reply = client.reply().await;
    assert_eq!(reply.code, 250, "{}", reply.text);
}

fn received_header(message: &SinkMessage) -> String {
    let content = String::from_utf8_lossy(&message.unstuffed()).into_owned();
    content.split("\r\n").take(3).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn plain_with_and_without_initial_response() {
    let sink = Sink::start().await;
    let server = start_with_alice(plain_auth_config(&sink)).await;
    set_password(&server, "carol", "carol's password").await;

    let mut client = server.connect_from("127.0.0.2").await;
    let extensions = ehlo(&mut client).await;
    assert!(
        extensions.contains("250-AUTH PLAIN LOGIN") || extensions.contains("250 AUTH PLAIN LOGIN"),
        "{extensions}"
    );
    let reply = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            235,
        )
        .await;
    assert_eq!(reply.text, "235 2.7.0 Authentication succeeded");
    let again = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            503,
        )
        .await;
    assert!(again.text.starts_with("503 5.5.1"), "{}", again.text);

    // Without an initial response the server sends an empty challenge.
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    let challenge = client.expect("AUTH PLAIN", 334).await;
    assert_eq!(challenge.text, "334 ");
    client
        .expect(&plain("", "Alice@Example.COM", PASSWORD), 235)
        .await;

    // The account name is a login name too.
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "carol", "carol's password")),
            235,
        )
        .await;

    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    let reply = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", "wrong")),
            535,
        )
        .await;
    assert_eq!(reply.text, "535 5.7.8 Authentication credentials invalid");
    server.stop().await;
}

#[tokio::test]
async fn login_with_and_without_initial_response() {
    let sink = Sink::start().await;
    let server = start_with_alice(plain_auth_config(&sink)).await;

    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    let username = client.expect("AUTH LOGIN", 334).await;
    assert_eq!(username.text, "334 VXNlcm5hbWU6");
    let password = client.expect(&b64("alice@example.com"), 334).await;
    assert_eq!(password.text, "334 UGFzc3dvcmQ6");
    let reply = client.expect(&b64(PASSWORD), 235).await;
    assert!(reply.text.starts_with("235 2.7.0"), "{}", reply.text);

    // The user name may come with the command.
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    let password = client
        .expect(&format!("AUTH LOGIN {}", b64("alice")), 334)
        .await;
    assert_eq!(password.text, "334 UGFzc3dvcmQ6");
    let reply = client.expect(&b64("not the password"), 535).await;
    assert!(reply.text.starts_with("535 5.7.8"), "{}", reply.text);
    server.stop().await;
}

#[tokio::test]
async fn exchange_errors_get_their_replies() {
    let sink = Sink::start().await;
    let server = start_with_alice(plain_auth_config(&sink)).await;
    let good = format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD));

    let mut client = server.connect_from("127.0.0.2").await;
    let reply = client.expect(&good, 503).await;
    assert!(
        reply.text.starts_with("503 5.5.1"),
        "before EHLO: {}",
        reply.text
    );
    client.expect("HELO client.example", 250).await;
    client.expect(&good, 503).await;

    ehlo(&mut client).await;
    let reply = client.expect("AUTH PLAIN not*base64", 501).await;
    assert!(reply.text.starts_with("501 5.5.2"), "{}", reply.text);

    client.expect("AUTH PLAIN", 334).await;
    let reply = client.expect("*", 501).await;
    assert_eq!(reply.text, "501 5.0.0 Authentication cancelled");
    client.expect("AUTH LOGIN", 334).await;
    client.expect(&b64("alice"), 334).await;
    let reply = client.expect("*", 501).await;
    assert!(reply.text.starts_with("501 5.0.0"), "{}", reply.text);

    client.expect("AUTH PLAIN", 334).await;
    let reply = client.expect("%%%", 501).await;
    assert!(reply.text.starts_with("501 5.5.2"), "{}", reply.text);

    // A PLAIN message without its NUL separators.
    let reply = client
        .expect(&format!("AUTH PLAIN {}", b64("alice secret")), 501)
        .await;
    assert!(reply.text.starts_with("501 5.5.2"), "{}", reply.text);

    // Proxy authorization is not offered: the authorization identity must
    // be the authenticated account.
    let reply = client
        .expect(
            &format!(
                "AUTH PLAIN {}",
                plain("carol", "alice@example.com", PASSWORD)
            ),
            535,
        )
        .await;
    assert!(reply.text.starts_with("535 5.7.8"), "{}", reply.text);

    let reply = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "nobody@example.com", PASSWORD)),
            535,
        )
        .await;
    assert!(reply.text.starts_with("535 5.7.8"), "{}", reply.text);

    let reply = client.expect("AUTH CRAM-MD5", 504).await;
    assert!(reply.text.starts_with("504 5.5.4"), "{}", reply.text);

    client.expect("AUTH PLAIN", 334).await;
    let reply = client.expect(&"A".repeat(3000), 500).await;
    assert!(reply.text.starts_with("500 5.5.6"), "{}", reply.text);

    client.expect("MAIL FROM:<someone@example.org>", 250).await;
    let reply = client.expect(&good, 503).await;
    assert!(
        reply.text.starts_with("503 5.5.1") && reply.text.contains("transaction"),
        "{}",
        reply.text
    );
    client.expect("RSET", 250).await;

    // The session survived every error, and the credentials still work.
    client.expect(&good, 235).await;
    server.stop().await;
}

#[tokio::test]
async fn auth_is_not_offered_without_the_auth_key() {
    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr])).await;
    let mut client = server.connect_from("127.0.0.2").await;
    let extensions = ehlo(&mut client).await;
    assert!(!extensions.contains("AUTH"), "{extensions}");
    let reply = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            502,
        )
        .await;
    assert!(reply.text.starts_with("502 5.5.1"), "{}", reply.text);
    server.stop().await;
}

#[tokio::test]
async fn auth_requires_tls_when_configured() {
    let certificate = make_certificate();
    let sink = Sink::start().await;
    let config = TestConfig::new(&[sink.addr])
        .tls(&certificate.certificate_path, &certificate.key_path)
        .auth("{mechanisms: [plain, login], require_tls: true}");
    let server = start_with_alice(config).await;

    let mut client = server.connect_from("127.0.0.2").await;
    let extensions = ehlo(&mut client).await;
    assert!(extensions.contains("STARTTLS"), "{extensions}");
    assert!(
        !extensions.contains("AUTH"),
        "AUTH offered before TLS: {extensions}"
    );
    let reply = client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            538,
        )
        .await;
    assert!(reply.text.starts_with("538 5.7.11"), "{}", reply.text);

    client.expect("STARTTLS", 220).await;
    let mut tls = TlsSmtpClient::new(handshake(client.into_stream(), &certificate).await);
    let extensions = tls.expect("EHLO client.example", 250).await.text;
    assert!(extensions.contains("AUTH PLAIN LOGIN"), "{extensions}");
    tls.expect(
        &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
        235,
    )
    .await;
    tls.expect("MAIL FROM:<alice@example.com>", 250).await;
    tls.expect("RCPT TO:<dave@example.org>", 250).await;
    tls.expect("DATA", 354).await;
    tls.send(b"Subject: over TLS\r\n\r\nHello.\r\n.\r\n").await;
    assert_eq!(tls.reply().await.code, 250);

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    let received = received_header(&messages[0]);
    assert!(received.contains("with ESMTPSA id"), "{received}");
    server.stop().await;
}

#[tokio::test]
async fn failure_limit_blocks_the_client() {
    let sink = Sink::start().await;
    let config = TestConfig::new(&[sink.addr])
        .auth("{require_tls: false}")
        .auth_settings("  max_failures: 3\n  failure_window: 15m\n  failure_delay: 300ms\n");
    let server = start_with_alice(config).await;
    let good = format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD));
    let bad = format!("AUTH PLAIN {}", plain("", "alice@example.com", "guess"));

    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    for attempt in 1..=3 {
        let started = Instant::now();
        let reply = client.expect(&bad, 535).await;
        assert!(reply.text.starts_with("535 5.7.8"), "{}", reply.text);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "failure {attempt} was answered without the delay"
        );
    }
    // The next attempt is refused before the credentials are checked, even
    // with the right password.
    let reply = client.expect(&good, 454).await;
    assert_eq!(
        reply.text,
        "454 4.7.0 too many authentication failures, try later"
    );

    // The count belongs to the client address, not the connection.
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client.expect(&good, 454).await;
    client.expect("AUTH LOGIN", 454).await;

    let mut other = server.connect_from("127.0.0.3").await;
    ehlo(&mut other).await;
    other.expect(&good, 235).await;
    server.stop().await;
}

#[tokio::test]
async fn authenticated_client_relays_to_foreign_domains() {
    let sink = Sink::start().await;
    let server = start_with_alice(plain_auth_config(&sink)).await;

    // 127.0.0.2 is outside the relay networks.
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client.expect("MAIL FROM:<alice@example.com>", 250).await;
    let reply = client.expect("RCPT TO:<dave@example.org>", 550).await;
    assert!(reply.text.starts_with("550 5.7.1"), "{}", reply.text);
    client.expect("RSET", 250).await;

    client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            235,
        )
        .await;
    send_message(&mut client, "alice@example.com", "dave@example.org").await;

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].mail_from.trim(), "<alice@example.com>");
    assert_eq!(messages[0].rcpt_to, vec!["<dave@example.org>".to_string()]);
    let received = received_header(&messages[0]);
    assert!(received.contains("with ESMTPA id"), "{received}");
    server.stop().await;
}

#[tokio::test]
async fn authenticated_sender_must_match_account() {
    let sink = Sink::start().await;
    let server = start_with_alice(plain_auth_config(&sink)).await;

    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    // Unauthenticated clients are not checked.
    client.expect("MAIL FROM:<carol@example.com>", 250).await;
    client.expect("RSET", 250).await;

    client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            235,
        )
        .await;
    let reply = client.expect("MAIL FROM:<carol@example.com>", 553).await;
    assert_eq!(
        reply.text,
        "553 5.7.1 sender address not owned by the authenticated user"
    );
    client.expect("MAIL FROM:<someone@example.org>", 553).await;
    for allowed in ["<alice@example.com>", "<Alice+lists@EXAMPLE.com>", "<>"] {
        client.expect(&format!("MAIL FROM:{allowed}"), 250).await;
        client.expect("RSET", 250).await;
    }
    // Where AUTH is offered, the AUTH parameter of MAIL is accepted and
    // ignored (RFC 4954 §5).
    client
        .expect("MAIL FROM:<alice@example.com> AUTH=<>", 250)
        .await;
    client.expect("RSET", 250).await;
    server.stop().await;

    let sink = Sink::start().await;
    let config =
        plain_auth_config(&sink).auth_settings("  failure_delay: 0s\n  sender_must_match: false\n");
    let server = start_with_alice(config).await;
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "alice@example.com", PASSWORD)),
            235,
        )
        .await;
    client.expect("MAIL FROM:<carol@example.com>", 250).await;
    server.stop().await;
}

#[tokio::test]
async fn implicit_tls_greets_after_handshake() {
    let certificate = make_certificate();
    let sink = Sink::start().await;
    let config = TestConfig::new(&[sink.addr])
        .implicit_tls(&certificate.certificate_path, &certificate.key_path)
        .auth("{}");
    let server = start_with_alice(config).await;

    let raw = SmtpClient::connect_raw("127.0.0.2", server.address).await;
    let mut tls = TlsSmtpClient::new(handshake(raw.into_stream(), &certificate).await);
    let greeting = tls.reply().await;
    assert_eq!(greeting.code, 220, "{}", greeting.text);
    let extensions = tls.expect("EHLO client.example", 250).await.text;
    assert!(extensions.contains("AUTH PLAIN LOGIN"), "{extensions}");
    assert!(!extensions.contains("STARTTLS"), "{extensions}");
    let reply = tls.expect("STARTTLS", 503).await;
    assert!(reply.text.contains("TLS already active"), "{}", reply.text);

    tls.expect("AUTH LOGIN", 334).await;
    tls.expect(&b64("alice@example.com"), 334).await;
    tls.expect(&b64(PASSWORD), 235).await;
    tls.expect("MAIL FROM:<alice@example.com>", 250).await;
    tls.expect("RCPT TO:<dave@example.org>", 250).await;
    tls.expect("DATA", 354).await;
    tls.send(b"Subject: implicit\r\n\r\nHello.\r\n.\r\n").await;
    assert_eq!(tls.reply().await.code, 250);
    tls.expect("QUIT", 221).await;

    let messages = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    let received = received_header(&messages[0]);
    assert!(received.contains("with ESMTPSA id"), "{received}");

    // A client that does not start TLS gets no SMTP in clear text: its EHLO
    // fails the handshake and the server closes the connection.
    let mut plain_client = SmtpClient::connect_raw("127.0.0.2", server.address).await;
    plain_client.send(b"EHLO client.example\r\n").await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        plain_client.into_stream().read_to_end(&mut received),
    )
    .await
    .expect("the server closed the connection");
    assert!(read.is_ok() || received.is_empty(), "{read:?}");
    assert!(
        !String::from_utf8_lossy(&received).contains("220"),
        "the server answered in clear text: {received:?}"
    );
    server.stop().await;
}

// --- Command line --------------------------------------------------------------

fn wsmtp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsmtp"));
    command
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1");
    command
}

/// Runs `wsmtp accounts password …` with `stdin` as its standard input and
/// returns the output.
fn password_command(config: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = wsmtp()
        .arg("accounts")
        .arg("password")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wsmtp accounts password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write password");
    child.wait_with_output().expect("wait for wsmtp")
}

fn write_config(directory: &Path, database_url: &str, listener: &str) -> std::path::PathBuf {
    let path = directory.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test.example\n\
             listeners:\n  - address: 127.0.0.1:0\n{listener}\
             auth:\n  failure_delay: 0s\n\
             relay:\n  local_domains: [example.com]\n\
             queue:\n  url: {database_url}\n"
        ),
    )
    .expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_password_command() {
    let sink = Sink::start().await;
    let server = TestServer::start(plain_auth_config(&sink)).await;
    let db = server.db.as_ref().expect("database");
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write_config(directory.path(), &db.url, "");
    let database = db.connect().await;

    let output = password_command(&config, &["alice"], "from stdin 1\n");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "set the password of account alice");
    assert!(!stdout.contains("from stdin 1"), "{stdout}");
    assert!(!stderr.contains("from stdin 1"), "{stderr}");
    let stored: String = database
        .query_one(
            "SELECT password_hash FROM accounts WHERE name = 'alice'",
            &[],
        )
        .await
        .expect("read hash")
        .get(0);
    assert!(stored.starts_with("$argon2id$v=19$"), "{stored}");

    let file = directory.path().join("carol.password");
    std::fs::write(&file, "from a file 2\r\nsecond line ignored\n").expect("write file");
    let output = password_command(
        &config,
        &[
            "carol",
            "--password-file",
            file.to_str().expect("UTF-8 path"),
        ],
        "",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    wait_until_current(&database, server.directory.as_ref().expect("directory")).await;
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client
        .expect(
            &format!(
                "AUTH PLAIN {}",
                plain("", "alice@example.com", "from stdin 1")
            ),
            235,
        )
        .await;
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client
        .expect(
            &format!("AUTH PLAIN {}", plain("", "carol", "from a file 2")),
            235,
        )
        .await;

    let output = password_command(&config, &["alice", "--clear"], "");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "removed the password of account alice"
    );
    wait_until_current(&database, server.directory.as_ref().expect("directory")).await;
    let mut client = server.connect_from("127.0.0.2").await;
    ehlo(&mut client).await;
    client
        .expect(
            &format!(
                "AUTH PLAIN {}",
                plain("", "alice@example.com", "from stdin 1")
            ),
            535,
        )
        .await;

    let output = password_command(&config, &["nobody"], "whatever\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("account nobody not found"), "{stderr}");

    let output = password_command(&config, &["alice"], "");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no password on standard input"), "{stderr}");

    let output = password_command(&config, &["alice", "--clear", "--password-file", "x"], "");
    assert!(!output.status.success(), "--clear with --password-file");
    server.stop().await;
}

/// Lines that a child process writes to stderr, collected by a task.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn all(&self) -> Vec<String> {
        self.0.lock().expect("lines lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_never_logs_passwords() {
    let db = common::db::TestDb::reserve();
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        directory.path(),
        &db.url,
        "    auth: {mechanisms: [plain, login], require_tls: false}\n",
    );
    let secret = "s3cret-Pass phrase";

    let output = wsmtp()
        .args(["accounts", "add", "alice", "--address", "alice@example.com"])
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run wsmtp accounts add");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = password_command(&config, &["alice"], &format!("{secret}\n"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli_output = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let mut child = tokio::process::Command::from({
        let mut command = wsmtp();
        command
            .args(["serve", "--roles", "listener", "--config"])
            .arg(&config);
        command
    })
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .expect("start wsmtp serve");
    let lines = Lines::default();
    let (address_sender, address_receiver) = tokio::sync::oneshot::channel();
    let reader = {
        let lines = lines.clone();
        let stderr = child.stderr.take().expect("stderr");
        tokio::spawn(async move {
            let mut address_sender = Some(address_sender);
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                if line.contains("listening")
                    && let Some(address) = line
                        .split_whitespace()
                        .find_map(|field| field.strip_prefix("address="))
                    && let Some(sender) = address_sender.take()
                {
                    let _ = sender.send(address.parse::<std::net::SocketAddr>());
                }
                lines.0.lock().expect("lines lock").push(line);
            }
        })
    };
    let address = tokio::time::timeout(Duration::from_secs(30), address_receiver)
        .await
        .expect("wsmtp serve started listening")
        .expect("listening line")
        .expect("listening address");

    let good_plain = plain("", "alice@example.com", secret);
    let bad_plain = plain("", "alice@example.com", "wrong-guess-77");
    // The directory loads after the listener starts; until then AUTH gets 454.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = SmtpClient::connect_from("127.0.0.2", address).await;
        ehlo(&mut client).await;
        let reply = client.command(&format!("AUTH PLAIN {good_plain}")).await;
        if reply.code == 235 {
            break;
        }
        assert_eq!(reply.code, 454, "{}", reply.text);
        assert!(Instant::now() < deadline, "the directory never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = SmtpClient::connect_from("127.0.0.2", address).await;
    ehlo(&mut client).await;
    client.expect(&format!("AUTH PLAIN {bad_plain}"), 535).await;
    client.expect("AUTH LOGIN", 334).await;
    client.expect(&b64("alice"), 334).await;
    client.expect(&b64(secret), 235).await;
    client.expect("QUIT", 221).await;

    // Give the server a moment to write its last lines, then stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.start_kill().expect("stop wsmtp serve");
    let _ = child.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;

    let log = lines.all().join("\n");
    assert!(
        log.contains("authentication attempt"),
        "no attempt was logged:\n{log}"
    );
    assert!(log.contains("outcome=\"wrong password\""), "{log}");
    for forbidden in [
        secret.to_string(),
        "wrong-guess-77".to_string(),
        good_plain.clone(),
        bad_plain.clone(),
        b64(secret),
    ] {
        assert!(
            !log.contains(&forbidden),
            "the server log contains {forbidden:?}"
        );
        assert!(
            !cli_output.contains(&forbidden),
            "the command output contains {forbidden:?}"
        );
    }
    drop(db);
}
