//! `wsmtp queue …` operator commands, run as an operator would: the real
//! binary against a real database with routed messages.

mod common;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use common::routed::{RoutedQueue, back_off, defer, delivery_row, destination_row, lease};
use wsmtp::queue::QueueId;

struct Cli {
    config: std::path::PathBuf,
    _directory: tempfile::TempDir,
}

impl Cli {
    fn new(fixture: &RoutedQueue) -> Cli {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = directory.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "listeners:\n  - address: 127.0.0.1:2525\nrelay:\n  local_domains: [example.com]\nqueue:\n  url: {}\n",
                fixture.db.url
            ),
        )
        .expect("write config");
        Cli {
            config,
            _directory: directory,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wsmtp"));
        command
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .arg("queue")
            .args(args)
            .arg("--config")
            .arg(&self.config);
        command
    }

    /// Runs `wsmtp queue ARGS…` and returns stdout; panics on failure.
    fn run(&self, args: &[&str]) -> String {
        let output = self.command(args).output().expect("run wsmtp");
        assert_success(args, &output);
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs the command and returns its output whatever the exit status.
    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run wsmtp")
    }

    fn run_with_stdin(&self, args: &[&str], input: &str) -> String {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsmtp");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let output = child.wait_with_output().expect("wait for wsmtp");
        assert_success(args, &output);
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Queue ids in the text output of `queue list ARGS…`.
    fn listed(&self, args: &[&str]) -> Vec<String> {
        let mut full = vec!["list"];
        full.extend_from_slice(args);
        let output = self.run(&full);
        let mut lines = output.lines();
        let header = lines.next().expect("header line");
        assert!(header.starts_with("queue id"), "{output}");
        let mut ids = Vec::new();
        for line in lines {
            if line.ends_with("message(s)") {
                let count: usize = line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("count");
                assert_eq!(count, ids.len(), "{output}");
                return ids;
            }
            ids.push(line.split_whitespace().next().expect("id").to_owned());
        }
        panic!("no count line in:\n{output}");
    }
}

fn assert_success(args: &[&str], output: &Output) {
    assert!(
        output.status.success(),
        "wsmtp queue {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

fn simple(id: QueueId) -> String {
    id.simple().to_string()
}

/// Returns the listed line of one message, split at whitespace.
fn list_line(output: &str, id: QueueId) -> Vec<String> {
    output
        .lines()
        .find(|line| line.starts_with(&simple(id)))
        .unwrap_or_else(|| panic!("{} not listed in:\n{output}", simple(id)))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_and_json() {
    let fixture = RoutedQueue::create().await;
    let bob = fixture
        .spool("bob@example.net", &["remote1@example.org"])
        .await;
    let null = fixture.spool("", &["alice@example.com"]).await;
    let carol = fixture
        .spool("carol@other.example", &["x@example.net", "y@example.net"])
        .await;
    fixture.route().await;
    let client = fixture.connect().await;
    client
        .execute(
            "UPDATE messages SET received_at = now() - interval '3 hours' WHERE id = $1",
            &[&carol],
        )
        .await
        .expect("age message");
    defer(&client, carol, "x@example.net", "1 hour").await;
    let cli = Cli::new(&fixture);

    assert_eq!(
        cli.listed(&[]),
        vec![simple(carol), simple(bob), simple(null)]
    );
    assert_eq!(cli.listed(&["--sender", "@EXAMPLE.net"]), vec![simple(bob)]);
    assert_eq!(cli.listed(&["--sender", "<>"]), vec![simple(null)]);
    assert_eq!(cli.listed(&["--sender", ""]), vec![simple(null)]);
    assert_eq!(
        cli.listed(&["--recipient", "Remote1@example.org"]),
        vec![simple(bob)]
    );
    assert_eq!(
        cli.listed(&["--destination", "example.net"]),
        vec![simple(carol)]
    );
    assert_eq!(
        cli.listed(&["--destination", "domain:example.org"]),
        vec![simple(bob)]
    );
    assert_eq!(cli.listed(&["--older-than", "2h"]), vec![simple(carol)]);
    assert!(cli.listed(&["--older-than", "5d"]).is_empty());
    assert_eq!(cli.listed(&["--state", "deferred"]), vec![simple(carol)]);
    assert_eq!(cli.listed(&["--limit", "1"]), vec![simple(carol)]);

    // Columns: state, hold, size, rcpts, pending, deferred.
    let output = cli.run(&["list"]);
    let line = list_line(&output, carol);
    assert_eq!(&line[1..3], ["ready", "-"], "{output}");
    assert_eq!(&line[4..7], ["2", "2", "1"], "{output}");
    assert_eq!(
        line.last().map(String::as_str),
        Some("<carol@other.example>")
    );

    let json: serde_json::Value =
        serde_json::from_str(&cli.run(&["list", "--json", "--state", "deferred"]))
            .expect("JSON list");
    let messages = json.as_array().expect("array");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["id"], simple(carol));
    assert_eq!(messages[0]["pending_deliveries"], 2);
    assert_eq!(messages[0]["deferred_deliveries"], 1);
    assert_eq!(messages[0]["held"], false);

    let bad = cli.output(&["list", "--older-than", "soon"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid duration \"soon\""), "{stderr}");
    let bad = cli.output(&["list", "--state", "stuck"]);
    assert!(!bad.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_skips_leased_delivery() {
    let fixture = RoutedQueue::create().await;
    let id = fixture
        .spool("bob@example.net", &["a@example.org", "b@example.org"])
        .await;
    fixture.route().await;
    let client = fixture.connect().await;
    defer(&client, id, "a@example.org", "1 hour").await;
    defer(&client, id, "b@example.org", "1 hour").await;
    lease(&client, id, "b@example.org", "worker-3", "10 minutes").await;
    back_off(&client, "domain:example.org", 4, "1 hour").await;
    let leased_before = delivery_row(&client, id, "b@example.org").await;
    let cli = Cli::new(&fixture);

    let output = cli.run(&["retry", &simple(id)]);
    assert!(output.contains("made 1 delivery(ies) due now"), "{output}");
    assert!(
        output.contains("note: 1 delivery(ies) in progress were left alone"),
        "{output}"
    );
    assert!(
        output.contains("note: destination domain:example.org waits until"),
        "{output}"
    );
    assert!(delivery_row(&client, id, "a@example.org").await.due);
    assert_eq!(
        delivery_row(&client, id, "b@example.org").await,
        leased_before
    );

    let output = cli.run(&["retry", "--destination", "example.org"]);
    assert!(output.contains("made 0 delivery(ies) due now"), "{output}");
    assert!(
        output.contains("reset the next attempt time of destination(s): domain:example.org"),
        "{output}"
    );
    assert_eq!(
        destination_row(&client, "domain:example.org").await,
        Some((true, 4, false))
    );

    let output = cli.run(&["retry", "--all"]);
    assert!(output.contains("made 0 delivery(ies) due now"), "{output}");
    assert_eq!(
        delivery_row(&client, id, "b@example.org").await,
        leased_before
    );

    // Exactly one way of choosing what to retry.
    assert!(!cli.output(&["retry"]).status.success());
    assert!(
        !cli.output(&["retry", "--all", "--destination", "example.org"])
            .status
            .success()
    );
    let bad = cli.output(&["retry", "not-an-id"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("invalid queue id \"not-an-id\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_and_release_show_in_list_and_show() {
    let fixture = RoutedQueue::create().await;
    let first = fixture
        .spool("bob@example.net", &["alice@example.com"])
        .await;
    let second = fixture.spool("bob@example.net", &["b@example.org"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    let cli = Cli::new(&fixture);

    // Message hold.
    let output = cli.run(&["hold", &simple(first)]);
    assert!(output.contains("held 1 message(s)"), "{output}");
    assert_eq!(cli.listed(&["--state", "held"]), vec![simple(first)]);
    assert_eq!(cli.listed(&["--state", "ready"]), vec![simple(second)]);
    let output = cli.run(&["list"]);
    assert_eq!(list_line(&output, first)[2], "message", "{output}");
    let shown = cli.run(&["show", &simple(first)]);
    assert!(shown.contains("held:        yes"), "{shown}");

    // Destination hold.
    let output = cli.run(&["hold", "--destination", "example.org"]);
    assert!(
        output.contains("held destination domain:example.org"),
        "{output}"
    );
    let output = cli.run(&["list"]);
    assert_eq!(list_line(&output, second)[2], "dest", "{output}");
    let shown = cli.run(&["show", &simple(second)]);
    assert!(shown.contains("held:        no"), "{shown}");
    assert!(
        shown.contains("domain:example.org  held=yes  failures=0"),
        "{shown}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli.run(&["show", &simple(second), "--json"])).expect("JSON show");
    assert_eq!(json["destinations"][0]["held"], true);

    // Release both; the deferred delivery becomes due.
    defer(&client, second, "b@example.org", "1 hour").await;
    let output = cli.run(&["release", "--destination", "domain:example.org"]);
    assert!(
        output.contains("released destination domain:example.org"),
        "{output}"
    );
    assert!(output.contains("made 1 delivery(ies) due now"), "{output}");
    assert!(delivery_row(&client, second, "b@example.org").await.due);
    let output = cli.run(&["release", "--destination", "example.org"]);
    assert!(
        output.contains("no held destination matches example.org"),
        "{output}"
    );

    let output = cli.run(&["release", &simple(first)]);
    assert!(output.contains("released 1 message(s)"), "{output}");
    assert!(cli.listed(&["--state", "held"]).is_empty());
    let output = cli.run(&["list"]);
    assert_eq!(list_line(&output, first)[2], "-", "{output}");
    assert_eq!(list_line(&output, second)[2], "-", "{output}");

    // An unknown bare destination is an error with a hint.
    let bad = cli.output(&["hold", "--destination", "nowhere.example"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("domain:nowhere.example"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_by_argument_and_stdin() {
    let fixture = RoutedQueue::create().await;
    let first = fixture.spool("bob@example.net", &["a@example.org"]).await;
    let second = fixture.spool("bob@example.net", &["b@example.org"]).await;
    let third = fixture.spool("bob@example.net", &["c@example.org"]).await;
    fixture.route().await;
    let client = fixture.connect().await;
    lease(&client, first, "a@example.org", "worker-1", "10 minutes").await;
    let cli = Cli::new(&fixture);

    let output = cli.output(&[
        "delete",
        &simple(first),
        &simple(wsmtp::queue::new_queue_id()),
    ]);
    assert_success(&["delete"], &output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("deleted 1 message(s)"), "{stdout}");
    assert!(
        stdout.contains("note: 1 delivery(ies) were in progress and may still complete"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: message"), "{stderr}");
    assert!(stderr.contains("not found in the queue"), "{stderr}");

    let output = cli.run_with_stdin(
        &["delete", "-"],
        &format!("{}\n{}\n", simple(second), simple(third)),
    );
    assert!(output.contains("deleted 2 message(s)"), "{output}");
    assert!(cli.listed(&[]).is_empty());
    let rows: i64 = client
        .query_one("SELECT count(*) FROM deliveries", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0);
    assert!(!cli.output(&["delete"]).status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_text_and_json() {
    let fixture = RoutedQueue::create().await;
    let remote = fixture
        .spool("bob@example.net", &["a@example.org", "b@example.org"])
        .await;
    let local = fixture
        .spool("bob@example.net", &["alice@example.com"])
        .await;
    fixture.route().await;
    fixture.spool("bob@example.net", &["x@example.net"]).await;
    let client = fixture.connect().await;
    lease(&client, remote, "a@example.org", "worker-1", "10 minutes").await;
    defer(&client, remote, "b@example.org", "1 hour").await;
    back_off(&client, "domain:example.org", 2, "1 hour").await;
    let cli = Cli::new(&fixture);
    cli.run(&["hold", &simple(local)]);

    let output = cli.run(&["stats"]);
    assert!(
        output.contains("messages:      receiving 0  ready 2  held 1"),
        "{output}"
    );
    assert!(
        output.contains("recipients:    1 awaiting routing"),
        "{output}"
    );
    assert!(
        output.contains("deliveries:    pending 3  due 0  deferred 1  in flight 1  held 1"),
        "{output}"
    );
    assert!(
        output.contains("destinations:  2 known  1 backed off  0 held"),
        "{output}"
    );
    let row: Vec<&str> = output
        .lines()
        .find(|line| line.starts_with("domain:example.org "))
        .expect("destination row")
        .split_whitespace()
        .collect();
    // pending, due, deferred, in flight, held, failures.
    assert_eq!(&row[1..7], ["2", "0", "1", "1", "0", "2"], "{output}");
    assert!(row.ends_with(&["connection", "refused"]), "{output}");
    assert!(output.contains("age in minutes"), "{output}");

    let json: serde_json::Value =
        serde_json::from_str(&cli.run(&["stats", "--json", "--top", "1"])).expect("JSON stats");
    assert_eq!(json["messages_ready"], 2);
    assert_eq!(json["deliveries"]["pending"], 3);
    let top = json["top_destinations"].as_array().expect("array");
    assert_eq!(top.len(), 1);
    assert_eq!(top[0]["name"], "domain:example.org");
    assert_eq!(top[0]["state"]["failures"], 2);

    // A held destination shows `held` in place of its next attempt.
    cli.run(&["hold", "--destination", "example.org"]);
    let output = cli.run(&["stats"]);
    let row: Vec<&str> = output
        .lines()
        .find(|line| line.starts_with("domain:example.org "))
        .expect("destination row")
        .split_whitespace()
        .collect();
    assert_eq!(row[7], "held", "{output}");
    assert!(
        output.contains("destinations:  2 known  1 backed off  1 held"),
        "{output}"
    );
}
