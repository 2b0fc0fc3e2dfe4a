//! The log lines a client's session produces, captured from the server's
//! own log output in both formats: a rejected relay attempt names the rule
//! that rejected it, with the same keys in text and JSON.

mod common;

use common::harness::{TestConfig, TestServer};
use common::logs::CapturedLog;
use common::sink::Sink;
use wsmtp::config::{LogConfig, LogFormat};

/// Runs a relay attempt from outside the relay networks and a passed-through
/// message, with the server's logs in `format`, and returns the lines.
/// The test runtime has one thread, so the subscriber set for this thread
/// receives the events of every task of the server.
async fn session_log(format: LogFormat) -> Vec<String> {
    let captured = CapturedLog::default();
    let writer = captured.clone();
    let config = LogConfig {
        format,
        filter: "wsmtp=info".to_string(),
    };
    let dispatch = wsmtp::logging::dispatch(&config, None, move || writer.clone(), false);
    let _guard = tracing::dispatcher::set_default(&dispatch);

    let sink = Sink::start().await;
    let server = TestServer::start(TestConfig::new(&[sink.addr]).without_queue()).await;
    let mut outsider = server.connect_from("127.0.0.2").await;
    outsider.expect("EHLO outside.example", 250).await;
    outsider.expect("MAIL FROM:<spam@example.org>", 250).await;
    outsider.expect("RCPT TO:<victim@example.org>", 550).await;
    outsider.expect("QUIT", 221).await;

    let mut client = server.connect().await;
    client.expect("EHLO client.example", 250).await;
    client.expect("MAIL FROM:<sender@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("DATA", 354).await;
    client
        .send(b"Subject: logged\r\n\r\nsecret body text\r\n.\r\n")
        .await;
    assert_eq!(client.reply().await.code, 250);
    client.expect("QUIT", 221).await;
    server.stop().await;
    captured.lines()
}

#[tokio::test]
async fn rejected_relay_names_rule_in_json() {
    let lines = session_log(LogFormat::Json).await;
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let with_message = |message: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|record| record["message"] == message)
            .collect()
    };

    let decided = with_message("recipient decided");
    let rejected: Vec<_> = decided
        .iter()
        .filter(|record| record["decision"] == "reject")
        .collect();
    assert_eq!(rejected.len(), 1, "{lines:#?}");
    let rejected = rejected[0];
    assert_eq!(rejected["rule"], "no_relay", "{rejected}");
    assert_eq!(rejected["client_ip"], "127.0.0.2", "{rejected}");
    assert_eq!(rejected["helo"], "outside.example", "{rejected}");
    assert_eq!(rejected["sender"], "spam@example.org", "{rejected}");
    assert_eq!(rejected["recipient"], "victim@example.org", "{rejected}");
    assert_eq!(rejected["level"], "INFO", "{rejected}");
    let reply = rejected["reply"].as_str().expect("reply");
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(rejected["queue_id"].is_string(), "{rejected}");

    let accepted: Vec<_> = decided
        .iter()
        .filter(|record| record["decision"] == "relay")
        .collect();
    assert_eq!(accepted.len(), 1, "{lines:#?}");
    assert_eq!(accepted[0]["rule"], "relay_domains[example.net]");

    let finished = with_message("transaction finished");
    assert_eq!(finished.len(), 1, "{lines:#?}");
    let finished = finished[0];
    assert_eq!(finished["decision"], "relay", "{finished}");
    assert_eq!(finished["client_ip"], "127.0.0.1", "{finished}");
    assert!(finished["size"].as_u64().expect("size") > 40, "{finished}");
    assert!(finished["duration_ms"].is_u64(), "{finished}");
    assert_eq!(
        finished["queue_id"], accepted[0]["queue_id"],
        "the transaction and its recipient share the queue id"
    );

    let abandoned = with_message("transaction abandoned without a message");
    assert_eq!(abandoned.len(), 1, "{lines:#?}");
    assert_eq!(abandoned[0]["queue_id"], rejected["queue_id"]);

    let closed = with_message("connection closed");
    assert_eq!(closed.len(), 2, "{lines:#?}");
    for record in closed {
        assert!(record["client_ip"].is_string(), "{record}");
        assert!(record["duration_ms"].is_u64(), "{record}");
    }

    let all = lines.join("\n");
    assert!(
        !all.contains("secret body text"),
        "message content was logged"
    );
}

#[tokio::test]
async fn rejected_relay_names_rule_in_text() {
    let lines = session_log(LogFormat::Text).await;
    let rejected: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("recipient decided") && line.contains("decision=reject"))
        .collect();
    assert_eq!(rejected.len(), 1, "{lines:#?}");
    let line = rejected[0];
    for part in [
        " INFO ",
        "rule=no_relay",
        "client_ip=127.0.0.2",
        "helo=outside.example",
        "recipient=victim@example.org",
        "reply=550 5.7.1",
    ] {
        assert!(line.contains(part), "no {part:?} in {line}");
    }
}
