//! The command line, run as a user would: the real binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::db::TestDb;

fn wsmtp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsmtp"));
    command.env_remove("DATABASE_URL").env_remove("RUST_LOG");
    command
}

fn write_config(directory: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = directory.path().join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_accepts_the_shipped_config() {
    let output = wsmtp()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"),
        ])
        .output()
        .expect("run wsmtp check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
}

#[test]
fn check_reports_every_problem_with_key_and_line() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        &directory,
        "listeners:\n  - address: localhost\nrelay:\n  local_domains: [example.com]\n  relay_domains:\n    - domain: example.net\n      group: nowhere\n  relay_networks: [10.0.0.0/40]\ntimeouts:\n  command: soon\n",
    );
    let output = wsmtp()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run wsmtp check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "line 2: listeners[0].address",
        "line 7: relay.relay_domains[0].group",
        "line 8: relay.relay_networks[0]",
        "line 10: timeouts.command",
        "queue:",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_reports_yaml_errors_with_line() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        &directory,
        "listeners:\n  - address: 127.0.0.1:2525\nlimits:\n  max_recipients: many\n",
    );
    let output = wsmtp()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run wsmtp check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 4"), "{stderr}");
}

#[test]
fn check_reports_unknown_rate_limit_class() {
    let directory = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(directory.path().join("rules")).expect("rules directory");
    std::fs::write(
        directory.path().join("rules/20-customers.yaml"),
        "- name: customers\n  client: [10.20.0.0/16]\n  action: relay\n  rate_limit: customer\n\
         - name: blocked\n  client: [192.0.2.0/24]\n  action: reject\n  rate_limit: customers\n",
    )
    .expect("write rules");
    let path = write_config(
        &directory,
        "listeners:\n  - address: 127.0.0.1:2525\nrate_limits:\n  customers:\n    messages_per_sender: 100/1h\n",
    );
    let output = wsmtp()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run wsmtp check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "20-customers.yaml:4: unknown rate limit class \"customer\"; define it under rate_limits",
        "20-customers.yaml:8: rate_limit is only used with actions accept and relay",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

/// A server process that is killed if the test fails before stopping it.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn connect_with_retry(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return stream,
            Err(error) if Instant::now() > deadline => {
                panic!("wsmtp did not start listening: {error}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read line");
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_then_serve_then_sigterm() {
    let db = TestDb::reserve();
    let directory = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let path = write_config(
        &directory,
        &format!(
            "listeners:\n  - address: 127.0.0.1:{port}\nrelay:\n  local_domains: [example.com]\nqueue:\n  url: {}\ntimeouts:\n  shutdown_grace: 5s\n",
            db.url
        ),
    );

    // migrate creates the missing database.
    let output = wsmtp()
        .args(["migrate", "--config"])
        .arg(&path)
        .output()
        .expect("run migrate");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An account for alice, so the directory accepts her address.
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
        .batch_execute(
            "WITH account AS (INSERT INTO accounts (name, mailbox_kind, mailbox_target)
                              VALUES ('alice', 'maildir', '/tmp/wsmtp-test-maildir/cli-alice') RETURNING id)
             INSERT INTO addresses (address, domain, account_id)
             SELECT 'alice@example.com', 'example.com', id FROM account",
        )
        .await
        .expect("add account");

    let mut server = ServerProcess(
        wsmtp()
            // Without the delivery role the message stays queued for
            // `queue list` and `queue show` below.
            .args(["serve", "--roles", "listener,router", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsmtp serve"),
    );
    let stream = connect_with_retry(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    assert!(read_line(&mut reader).starts_with("220 "));
    writer.write_all(b"HELO cli.example\r\n").expect("write");
    assert!(read_line(&mut reader).starts_with("250 "));

    // Until the directory has loaded, local recipients get 451.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        writer
            .write_all(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
            .expect("write");
        assert!(read_line(&mut reader).starts_with("250 "));
        let rcpt = read_line(&mut reader);
        if rcpt.starts_with("250 ") {
            break;
        }
        assert!(rcpt.starts_with("451 4.3.0"), "{rcpt}");
        assert!(Instant::now() < deadline, "the directory did not load");
        writer.write_all(b"RSET\r\n").expect("write");
        assert!(read_line(&mut reader).starts_with("250 "));
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.write_all(b"DATA\r\n").expect("write");
    assert!(read_line(&mut reader).starts_with("354 "));
    writer
        .write_all(b"Subject: cli\r\n\r\nhello\r\n.\r\n")
        .expect("write");
    let queued = read_line(&mut reader);
    assert!(queued.starts_with("250 2.0.0 OK: queued as "), "{queued}");
    let queue_id = queued
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("queue id")
        .to_string();

    let list = wsmtp()
        .args(["queue", "list", "--config"])
        .arg(&path)
        .output()
        .expect("queue list");
    assert!(String::from_utf8_lossy(&list.stdout).contains(&queue_id));
    let show = wsmtp()
        .args(["queue", "show", &queue_id, "--body", "--config"])
        .arg(&path)
        .output()
        .expect("queue show");
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains("<alice@example.com>  route=local"),
        "{shown}"
    );
    assert!(shown.contains("hello"), "{shown}");

    // SIGTERM: the idle session gets 421 and the process exits cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let line = read_line(&mut reader);
    assert!(line.starts_with("421 4.3.2"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = server.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "wsmtp did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let mut log = String::new();
    server
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("log");
    assert!(
        log.contains("transaction finished") && log.contains(&queue_id),
        "{log}"
    );
    assert!(log.contains("SIGTERM received"), "{log}");
    db.drop_database().await;
}
