//! Configuration reload: in process through the `Reloader` of a started
//! server, and end to end with the real binary, `wsmtp reload` and SIGHUP.
//! A broken file leaves the old rules serving, a good change reaches new
//! sessions while open ones keep their decisions, and rate limit counts
//! survive.

mod common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::SmtpClient;
use common::sink::Sink;
use tokio_util::sync::CancellationToken;
use wsmtp::cli::serve::{Role, Running};
use wsmtp::config::Config;

const BLOCKING_RULE: &str = "\
- name: block-nine
  client: [127.0.0.9/32]
  action: reject
  reply: \"550 5.7.1 Blocked by the old rules\"
";

const BLOCKED: &str = "550 5.7.1 Blocked by the old rules";

/// A configuration directory with `config.yaml` and `rules/`.
struct Setup {
    directory: tempfile::TempDir,
}

impl Setup {
    fn new(sink: &Sink, port: u16, extra: &str) -> Setup {
        let directory = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(directory.path().join("rules")).expect("rules directory");
        let setup = Setup { directory };
        setup.write_config(sink, port, "mx.test.example", extra);
        setup.write_rules(BLOCKING_RULE);
        setup
    }

    fn config_path(&self) -> PathBuf {
        self.directory.path().join("config.yaml")
    }

    fn write_config(&self, sink: &Sink, port: u16, hostname: &str, extra: &str) {
        let text = format!(
            "hostname: {hostname}\n\
             listeners:\n  - address: 127.0.0.1:{port}\n\
             timeouts:\n  shutdown_grace: 2s\n\
             relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n  \
             relay_networks: [127.0.0.1/32]\n\
             downstream_groups:\n  - name: legacy\n    hosts: [{}]\n{extra}",
            sink.addr
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    fn write_rules(&self, text: &str) {
        std::fs::write(self.directory.path().join("rules/10-test.yaml"), text)
            .expect("write rules");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }
}

async fn start(path: &Path) -> (Running, CancellationToken) {
    let config = Config::load(path).expect("valid configuration");
    let shutdown = CancellationToken::new();
    let running = wsmtp::cli::serve::start(config, &[Role::Listener], shutdown.clone())
        .await
        .expect("start wsmtp");
    (running, shutdown)
}

/// Sends EHLO, MAIL and one RCPT and returns the RCPT reply text.
async fn rcpt_reply(client: &mut SmtpClient, recipient: &str) -> String {
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.command(&format!("RCPT TO:<{recipient}>")).await;
    client.expect("RSET", 250).await;
    reply.text
}

async fn session(address: std::net::SocketAddr, ip: &str) -> SmtpClient {
    let mut client = SmtpClient::connect_from(ip, address).await;
    client.expect("EHLO client.example", 250).await;
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_rules_keep_old_rules_serving() {
    let sink = Sink::start().await;
    let setup = Setup::new(&sink, 0, "");
    let (running, shutdown) = start(&setup.config_path()).await;
    let address = running.addresses[0];
    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(rcpt_reply(&mut client, "bob@example.net").await, BLOCKED);

    setup.write_rules("- name: broken\n  client: [127.0.0.9/32]\n  action: explode\n");
    let error = running
        .reloader
        .reload()
        .await
        .expect_err("the broken rules are refused");
    let message = error.to_string();
    assert!(message.contains("10-test.yaml"), "{message}");
    assert!(message.contains("10-test.yaml:3:"), "{message}");
    assert!(message.contains("unknown action"), "{message}");
    let stats = running.reloader.stats();
    assert_eq!((stats.successes(), stats.failures()), (0, 1));
    assert!(stats.last_attempt().is_some());
    assert!(stats.last_success().is_none());

    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(
        rcpt_reply(&mut client, "bob@example.net").await,
        BLOCKED,
        "the old rules still serve"
    );

    // An unknown rate limit class is refused with its file and line too.
    setup.write_rules(
        "- name: relay-nine\n  client: [127.0.0.9/32]\n  action: relay\n  rate_limit: missing\n",
    );
    let message = running
        .reloader
        .reload()
        .await
        .expect_err("unknown class")
        .to_string();
    assert!(message.contains("10-test.yaml"), "{message}");
    assert!(message.contains("10-test.yaml:4:"), "{message}");
    assert!(
        message.contains("unknown rate limit class \"missing\""),
        "{message}"
    );
    assert_eq!(running.reloader.stats().failures(), 2);
    shutdown.cancel();
    let _ = running.handle.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn new_sessions_get_the_new_rules() {
    let sink = Sink::start().await;
    let setup = Setup::new(&sink, 0, "");
    let (running, shutdown) = start(&setup.config_path()).await;
    let address = running.addresses[0];
    let mut before = session(address, "127.0.0.9").await;
    assert_eq!(rcpt_reply(&mut before, "bob@example.net").await, BLOCKED);

    setup.write_rules("- name: relay-nine\n  client: [127.0.0.9/32]\n  action: relay\n");
    let report = running.reloader.reload().await.expect("reload");
    assert_eq!(report.rules, 1);
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(running.reloader.stats().successes(), 1);

    let mut after = session(address, "127.0.0.9").await;
    assert_eq!(
        rcpt_reply(&mut after, "bob@example.net").await,
        "250 2.1.5 Ok",
        "a new session uses the new rules"
    );
    assert_eq!(
        rcpt_reply(&mut before, "bob@example.net").await,
        BLOCKED,
        "an open session keeps the rules it started with"
    );
    shutdown.cancel();
    let _ = running.handle.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_only_settings_and_limits_survive() {
    let sink = Sink::start().await;
    let limits = "rate_limits:\n  default:\n    connections_per_ip: 2/1h\n";
    let setup = Setup::new(&sink, 0, limits);
    let (running, shutdown) = start(&setup.config_path()).await;
    let address = running.addresses[0];
    for _ in 0..2 {
        let mut client = SmtpClient::connect_raw("127.0.0.3", address).await;
        let greeting = client.reply().await;
        assert!(
            greeting.text.starts_with("220 mx.test.example"),
            "{}",
            greeting.text
        );
    }

    // A new host name needs a restart; the new rules and the unchanged
    // limit apply at once, and the limit keeps its count.
    setup.write_config(&sink, 0, "other.test.example", limits);
    setup.write_rules("- name: relay-nine\n  client: [127.0.0.9/32]\n  action: relay\n");
    let report = running.reloader.reload().await.expect("reload");
    assert_eq!(report.needs_restart, ["hostname"]);
    let mut client = SmtpClient::connect_raw("127.0.0.3", address).await;
    assert_eq!(
        client.reply().await.text,
        "421 4.7.0 Too many new connections from your address, try again later",
        "the count survived the reload"
    );
    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(
        rcpt_reply(&mut client, "bob@example.net").await,
        "250 2.1.5 Ok"
    );
    let mut client = SmtpClient::connect_raw("127.0.0.4", address).await;
    assert!(
        client.reply().await.text.starts_with("220 mx.test.example"),
        "the host name keeps its running value"
    );

    // A changed rate starts from zero.
    setup.write_config(
        &sink,
        0,
        "mx.test.example",
        "rate_limits:\n  default:\n    connections_per_ip: 3/1h\n",
    );
    running.reloader.reload().await.expect("reload");
    let mut client = SmtpClient::connect_raw("127.0.0.3", address).await;
    assert_eq!(client.reply().await.code, 220);
    shutdown.cancel();
    let _ = running.handle.await;
}

/// A `wsmtp serve` child process, killed if the test fails first.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wsmtp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsmtp"));
    command.env_remove("DATABASE_URL").env_remove("RUST_LOG");
    command
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_command_and_sighup_end_to_end() {
    let sink = Sink::start().await;
    let port = free_port();
    let setup = Setup::new(&sink, port, "");
    let log = setup.path("serve.log");
    let mut server = ServerProcess(
        wsmtp()
            .args(["serve", "--roles", "listener", "--config"])
            .arg(setup.config_path())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start wsmtp serve"),
    );
    let pid_file = setup.path("wsmtp.pid");
    wait_for("the pid file", || pid_file.exists());
    let pid = server.0.id().to_string();
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        pid
    );
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(rcpt_reply(&mut client, "bob@example.net").await, BLOCKED);

    // A good change: `wsmtp reload` reports the server's outcome.
    setup.write_rules("- name: relay-nine\n  client: [127.0.0.9/32]\n  action: relay\n");
    let output = wsmtp()
        .args(["reload", "--config"])
        .arg(setup.config_path())
        .output()
        .expect("run wsmtp reload");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("process {pid}: reloaded")),
        "{stdout}"
    );
    assert!(stdout.contains("ok rules=1"), "{stdout}");
    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(
        rcpt_reply(&mut client, "bob@example.net").await,
        "250 2.1.5 Ok"
    );

    // A broken change: the command reports it and does not signal.
    setup.write_rules(&format!("{BLOCKING_RULE}  rate_limit: nonexistent\n"));
    let output = wsmtp()
        .args(["reload", "--config"])
        .arg(setup.config_path())
        .output()
        .expect("run wsmtp reload");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("10-test.yaml"), "{stderr}");
    assert!(stderr.contains("unknown rate limit class"), "{stderr}");
    assert!(stderr.contains("nothing was reloaded"), "{stderr}");

    // SIGHUP without the command's check: the server refuses the file,
    // reports it in the status file and keeps serving the last good rules.
    let status = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let status_file = setup.path("wsmtp.pid.reload");
    wait_for("the failed reload's status", || {
        std::fs::read_to_string(&status_file).is_ok_and(|text| text.contains("attempt 2"))
    });
    let reported = std::fs::read_to_string(&status_file).expect("status");
    assert!(reported.contains("failed"), "{reported}");
    assert!(reported.contains("unknown rate limit class"), "{reported}");
    let mut client = session(address, "127.0.0.9").await;
    assert_eq!(
        rcpt_reply(&mut client, "bob@example.net").await,
        "250 2.1.5 Ok",
        "the last good rules still serve"
    );
    assert!(
        server.0.try_wait().expect("wait").is_none(),
        "SIGHUP does not stop the server"
    );

    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("the server to stop", || {
        server.0.try_wait().expect("wait").is_some()
    });
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    let mut text = String::new();
    std::fs::File::open(&log)
        .expect("log")
        .read_to_string(&mut text)
        .expect("read log");
    assert!(text.contains("config reloaded"), "{text}");
    assert!(text.contains("config reload failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_and_limit_hits_are_scraped() {
    let sink = Sink::start().await;
    let extra = "rate_limits:\n  default:\n    messages_per_ip: 1/1h\n\
                 admin:\n  address: 127.0.0.1:0\n";
    let setup = Setup::new(&sink, 0, extra);
    let (running, shutdown) = start(&setup.config_path()).await;
    let admin = running.admin_address.expect("admin listener");
    let limit_series = "wsmtp_rate_limit_hits_total{limit=\"messages_per_ip\"}";
    let success_series = "wsmtp_config_reloads_total{result=\"success\"}";
    let failure_series = "wsmtp_config_reloads_total{result=\"failure\"}";
    let before = common::admin::scrape(admin).await;
    assert_eq!(common::admin::value(&before, limit_series), 0.0);
    assert_eq!(common::admin::value(&before, success_series), 0.0);

    // The first message from 127.0.0.1 is counted, the second refused.
    let mut client = session(running.addresses[0], "127.0.0.1").await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("RSET", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 451).await;
    client.expect("QUIT", 221).await;

    running.reloader.reload().await.expect("reload");
    setup.write_rules("- name: broken\n  action: explode\n");
    running
        .reloader
        .reload()
        .await
        .expect_err("the broken rules are refused");

    let after = common::admin::scrape(admin).await;
    assert_eq!(common::admin::value(&after, limit_series), 1.0);
    assert_eq!(common::admin::value(&after, success_series), 1.0);
    assert_eq!(common::admin::value(&after, failure_series), 1.0);
    shutdown.cancel();
}
