//! DNS blocklists (DNSBL and RHSBL) against the loopback DNS server in
//! `tests/common/dns.rs`: lookups, rule decisions, the listener and
//! `wsmtp route`.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::harness::TestServer;
use common::sink::Sink;
use hickory_server::proto::rr::RecordType;
use wsmtp::config::Config;
use wsmtp::delivery::mx::ResolverSettings;
use wsmtp::policy::address::Address;
use wsmtp::policy::dnsbl::{
    BlocklistZone, Blocklists, DnsblResults, Listing, MAX_REASON_LENGTH, OnError, ZoneKind,
};
use wsmtp::policy::{Action, DirectoryView, Route, SessionFacts, decide};

const LISTED_REASON: &str = "Listed for spam, see https://bl.test/q/127.0.0.2";

/// Builds the zone that most tests serve: 127.0.0.2 and 2001:db8::1 listed
/// in bl.test, spam.example in dbl.test, 127.0.0.5 with the error code
/// 127.255.255.254 in bl.test, and 127.0.0.9 unanswered in slow.test and
/// answered with SERVFAIL in broken.test.
fn blocklist_zone() -> Zone {
    Zone::new()
        .a("2.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2))
        .txt("2.0.0.127.bl.test", &[LISTED_REASON])
        .a(
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test",
            Ipv4Addr::new(127, 0, 0, 4),
        )
        .a("5.0.0.127.bl.test", Ipv4Addr::new(127, 255, 255, 254))
        .unanswered("9.0.0.127.slow.test")
        .servfail("9.0.0.127.broken.test")
        .a("spam.example.dbl.test", Ipv4Addr::new(127, 0, 1, 2))
        .txt(
            "spam.example.dbl.test",
            &["Spam domain ", "{zone}\r\n\u{7}é"],
        )
}

fn zone(name: &str, kind: ZoneKind, timeout: Duration, on_error: OnError) -> BlocklistZone {
    BlocklistZone {
        zone: name.to_string(),
        kind,
        timeout,
        on_error,
    }
}

fn blocklists(dns: &TestDns, zones: Vec<BlocklistZone>) -> Blocklists {
    let settings = ResolverSettings {
        nameservers: vec![dns.address()],
        timeout: Duration::from_secs(5),
        attempts: 2,
    };
    Blocklists::new(&settings, zones).expect("build blocklists")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("IP address")
}

fn only(results: Vec<(String, Listing)>) -> Listing {
    assert_eq!(results.len(), 1, "{results:?}");
    results.into_iter().next().expect("one result").1
}

#[tokio::test]
async fn listed_client_has_txt_reason() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![zone(
            "bl.test",
            ZoneKind::Ip,
            Duration::from_secs(2),
            OnError::Ignore,
        )],
    );

    let results = lists.check_client(ip("127.0.0.2")).await;

    assert_eq!(
        results,
        vec![(
            "bl.test".to_string(),
            Listing::Listed {
                reason: Some(LISTED_REASON.to_string())
            }
        )]
    );
    let queries: Vec<(String, RecordType)> = dns
        .queries()
        .into_iter()
        .map(|query| (query.name, query.record_type))
        .collect();
    assert!(
        queries.contains(&("2.0.0.127.bl.test".to_string(), RecordType::A)),
        "{queries:?}"
    );
    assert!(
        queries.contains(&("2.0.0.127.bl.test".to_string(), RecordType::TXT)),
        "{queries:?}"
    );
}

#[tokio::test]
async fn unlisted_client_is_not_listed() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![zone(
            "bl.test",
            ZoneKind::Ip,
            Duration::from_secs(2),
            OnError::Ignore,
        )],
    );

    let listing = only(lists.check_client(ip("127.0.0.3")).await);

    assert_eq!(listing, Listing::NotListed);
    let txt_queries = dns
        .queries()
        .into_iter()
        .filter(|query| query.record_type == RecordType::TXT)
        .count();
    assert_eq!(txt_queries, 0, "no TXT lookup without a listing");
}

#[tokio::test]
async fn ipv6_client_uses_nibbles() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![zone(
            "bl.test",
            ZoneKind::Ip,
            Duration::from_secs(2),
            OnError::Ignore,
        )],
    );

    let listed = only(lists.check_client(ip("2001:db8::1")).await);
    let other = only(lists.check_client(ip("2001:db8::2")).await);

    assert_eq!(listed, Listing::Listed { reason: None });
    assert_eq!(other, Listing::NotListed);
}

#[tokio::test]
async fn rhsbl_checks_sender_domain() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![
            zone(
                "bl.test",
                ZoneKind::Ip,
                Duration::from_secs(2),
                OnError::Ignore,
            ),
            zone(
                "dbl.test",
                ZoneKind::Domain,
                Duration::from_secs(2),
                OnError::Ignore,
            ),
        ],
    );

    let listed = only(lists.check_domain("Spam.Example.").await);
    let clean = only(lists.check_domain("ham.example").await);
    let literal = only(lists.check_domain("[192.0.2.1]").await);

    // Control characters and non-ASCII become '?'; the braces stay text.
    assert_eq!(
        listed,
        Listing::Listed {
            reason: Some("Spam domain {zone}????".to_string())
        }
    );
    assert_eq!(clean, Listing::NotListed);
    assert_eq!(literal, Listing::NotListed);
    let queried: Vec<String> = dns.queries().into_iter().map(|q| q.name).collect();
    assert!(
        queried.contains(&"spam.example.dbl.test".to_string()),
        "{queried:?}"
    );
    assert!(
        queried.iter().all(|name| !name.ends_with(".bl.test")),
        "a domain check queries only domain zones: {queried:?}"
    );
}

#[tokio::test]
async fn long_txt_reason_is_cut() {
    let long = "x".repeat(250);
    let zone_with_long_reason = Zone::new()
        .a("2.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2))
        .txt("2.0.0.127.bl.test", &[&long, &long]);
    let dns = TestDns::start(zone_with_long_reason).await;
    let lists = blocklists(
        &dns,
        vec![zone(
            "bl.test",
            ZoneKind::Ip,
            Duration::from_secs(2),
            OnError::Ignore,
        )],
    );

    let listing = only(lists.check_client(ip("127.0.0.2")).await);

    let Listing::Listed {
        reason: Some(reason),
    } = listing
    else {
        panic!("expected a listing with a reason, got {listing:?}");
    };
    assert_eq!(reason.len(), MAX_REASON_LENGTH);
}

#[tokio::test]
async fn error_answer_is_a_failure() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![zone(
            "bl.test",
            ZoneKind::Ip,
            Duration::from_secs(2),
            OnError::Ignore,
        )],
    );

    let listing = only(lists.check_client(ip("127.0.0.5")).await);

    let Listing::Failed(error) = listing else {
        panic!("127.255.255.254 must be an error, got {listing:?}");
    };
    assert!(error.contains("127.255.255.254"), "{error}");
}

#[tokio::test]
async fn timeout_and_servfail_fail() {
    let dns = TestDns::start(blocklist_zone()).await;
    let lists = blocklists(
        &dns,
        vec![
            zone(
                "slow.test",
                ZoneKind::Ip,
                Duration::from_millis(300),
                OnError::Tempfail,
            ),
            zone(
                "broken.test",
                ZoneKind::Ip,
                Duration::from_secs(2),
                OnError::Tempfail,
            ),
        ],
    );

    let started = Instant::now();
    let results = lists.check_client(ip("127.0.0.9")).await;
    let elapsed = started.elapsed();

    assert_eq!(results.len(), 2, "{results:?}");
    for (zone, listing) in &results {
        assert!(matches!(listing, Listing::Failed(_)), "{zone}: {listing:?}");
    }
    let slow = &results
        .iter()
        .find(|(zone, _)| zone == "slow.test")
        .unwrap()
        .1;
    assert_eq!(slow, &Listing::Failed("timed out after 300ms".to_string()));
    // The resolver would wait 5 s per attempt; the zone's timeout cuts it.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

/// Writes `rules` into a rules directory and returns a configuration text
/// with those rules, the given `dnsbl` section and the test DNS server.
fn config_text(directory: &Path, dns: &TestDns, dnsbl: &str, rules: &str, relay: &str) -> String {
    let rules_directory = directory.join("rules");
    std::fs::create_dir_all(&rules_directory).expect("rules directory");
    std::fs::write(rules_directory.join("10-dnsbl.yaml"), rules).expect("write rules");
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nrules: {}\n{relay}\
         delivery:\n  resolver:\n    nameservers: [{}]\n    timeout: 5s\n\
         dnsbl:\n{dnsbl}",
        rules_directory.display(),
        dns.address()
    )
}

const RELAY: &str = "relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n\
                     downstream_groups:\n  - name: legacy\n    hosts: [127.0.0.1:9]\n";

const ZONES: &str = "  - {zone: bl.test, kind: ip, timeout: 2s}\n  \
                     - {zone: dbl.test, kind: domain}\n  \
                     - {zone: slow.test, timeout: 300ms, on_error: tempfail}\n  \
                     - {zone: quiet.test, timeout: 300ms, on_error: ignore}\n  \
                     - {zone: unused.test}\n";

const RULES: &str = "\
- name: listed-client
  dnsbl: [bl.test]
  action: reject
  reply: \"554 5.7.1 Client {reason} ({zone})\"
- name: listed-sender
  rhsbl: [dbl.test]
  action: reject
  reply: \"550 5.7.1 Sender domain rejected: {reason}\"
- name: strict-list
  dnsbl: [slow.test]
  action: reject
- name: lenient-list
  dnsbl: [quiet.test]
  action: reject
";

/// Decides `recipient` as the listener would: blocklist lookups through the
/// configuration's zones, then the rules.
async fn decide_with_lookups(config: &Config, client: &str, sender: &str) -> (String, String) {
    let lists = Blocklists::from_config(config)
        .expect("build blocklists")
        .expect("rules name zones");
    let client: IpAddr = client.parse().expect("client");
    let mut results: DnsblResults = lists.check_client(client).await.into_iter().collect();
    if let Some((_, domain)) = sender.rsplit_once('@') {
        results.extend(lists.check_domain(domain).await);
    }
    let session = SessionFacts {
        client,
        helo: "client.example",
        auth: None,
        tls: false,
        sender,
        dnsbl: &results,
    };
    let recipient = Address::parse("bob@example.net").expect("recipient");
    let decision = decide(
        &config.relay,
        &config.rules,
        DirectoryView::Absent,
        &session,
        &recipient,
        false,
    );
    let action = match &decision.action {
        Action::Accept(Route::Group(group)) => format!("group {group}"),
        Action::Accept(Route::Local) => "local".to_string(),
        Action::Reject(reply) => reply.summary(),
    };
    (action, decision.rule)
}

#[tokio::test]
async fn rules_decide_from_listings() {
    let dns = TestDns::start(
        blocklist_zone()
            .unanswered("9.0.0.127.quiet.test")
            .unanswered("8.0.0.127.quiet.test"),
    )
    .await;
    let directory = tempfile::tempdir().expect("temp dir");
    let text = config_text(directory.path(), &dns, ZONES, RULES, RELAY);
    let config = Config::parse(&text, None).expect("valid configuration");

    let named: Vec<&str> = config
        .rules
        .blocklist_zones()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        named,
        ["bl.test", "dbl.test", "quiet.test", "slow.test"],
        "unused.test is configured but named by no rule"
    );

    let cases = [
        (
            "127.0.0.2",
            "a@ham.example",
            format!("554 5.7.1 Client {LISTED_REASON} (bl.test)"),
            "listed-client",
        ),
        (
            "127.0.0.3",
            "a@spam.example",
            "550 5.7.1 Sender domain rejected: Spam domain {zone}????".to_string(),
            "listed-sender",
        ),
        (
            "127.0.0.3",
            "",
            "group legacy".to_string(),
            "relay_domains[example.net]",
        ),
        (
            "127.0.0.3",
            "a@ham.example",
            "group legacy".to_string(),
            "relay_domains[example.net]",
        ),
        (
            "127.0.0.9",
            "a@ham.example",
            "451 4.4.3 DNS blocklist slow.test unavailable, try again later".to_string(),
            "strict-list",
        ),
        (
            "127.0.0.8",
            "a@ham.example",
            "group legacy".to_string(),
            "relay_domains[example.net]",
        ),
    ];
    for (client, sender, expected, rule) in cases {
        let (action, decided_by) = decide_with_lookups(&config, client, sender).await;
        assert_eq!(action, expected, "{client} {sender}");
        assert!(
            decided_by.ends_with(rule),
            "{client} {sender}: decided by {decided_by}"
        );
    }
    let queried: Vec<String> = dns.queries().into_iter().map(|q| q.name).collect();
    assert!(
        queried.iter().all(|name| !name.ends_with("unused.test")),
        "a zone that no rule names is never queried: {queried:?}"
    );
}

#[tokio::test]
async fn listing_without_txt_names_zone() {
    let dns = TestDns::start(blocklist_zone()).await;
    let directory = tempfile::tempdir().expect("temp dir");
    let text = config_text(
        directory.path(),
        &dns,
        "  - {zone: bl.test}\n",
        "- name: listed\n  dnsbl: [bl.test]\n  action: reject\n  reply: \"554 5.7.1 {reason}\"\n",
        RELAY,
    );
    let config = Config::parse(&text, None).expect("valid configuration");

    let (action, _) = decide_with_lookups(&config, "2001:db8::1", "a@ham.example").await;

    assert_eq!(action, "554 5.7.1 listed in bl.test");
}

#[tokio::test]
async fn ignored_failure_passes() {
    let dns = TestDns::start(blocklist_zone()).await;
    let directory = tempfile::tempdir().expect("temp dir");
    let text = config_text(
        directory.path(),
        &dns,
        "  - {zone: slow.test, timeout: 300ms, on_error: ignore}\n",
        "- name: slow\n  dnsbl: [slow.test]\n  action: reject\n",
        RELAY,
    );
    let config = Config::parse(&text, None).expect("valid configuration");

    let (action, rule) = decide_with_lookups(&config, "127.0.0.9", "a@ham.example").await;

    assert_eq!(action, "group legacy");
    assert_eq!(rule, "relay_domains[example.net]");
}

#[test]
fn blocklist_problems_have_lines() {
    let directory = tempfile::tempdir().expect("temp dir");
    let rules_directory = directory.path().join("rules");
    std::fs::create_dir_all(&rules_directory).expect("rules directory");
    std::fs::write(
        rules_directory.join("10-dnsbl.yaml"),
        "- name: unknown\n  dnsbl: [nowhere.test]\n  action: reject\n\
         - name: wrong-kind\n  rhsbl: [bl.test]\n  action: reject\n\
         - name: placeholder\n  client: [192.0.2.0/24]\n  action: reject\n  reply: \"550 5.7.1 {reason}\"\n",
    )
    .expect("write rules");
    let text = format!(
        "listeners:\n  - address: 127.0.0.1:0\nrules: {}\ndnsbl:\n  \
         - {{zone: bl.test}}\n  \
         - {{zone: 'bad zone'}}\n  \
         - {{zone: kinds.test, kind: address}}\n  \
         - {{zone: errors.test, on_error: retry}}\n  \
         - {{zone: BL.test.}}\n  \
         - {{zone: slow.test, timeout: 5 minutes}}\n",
        rules_directory.display()
    );

    let problems = Config::parse(&text, None).expect_err("invalid configuration");

    let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let rules_file = rules_directory.join("10-dnsbl.yaml").display().to_string();
    let expected = [
        ("dnsbl[1].zone".to_string(), 6),
        ("dnsbl[2].kind".to_string(), 7),
        ("dnsbl[3].on_error".to_string(), 8),
        ("dnsbl[4].zone".to_string(), 9),
        ("dnsbl[5].timeout".to_string(), 10),
        (rules_file.clone(), 2),
        (rules_file.clone(), 5),
        (rules_file, 10),
    ];
    for (path, line) in expected {
        assert!(
            problems.iter().any(|p| p.path == path && p.line == line),
            "missing {path}:{line} in {rendered:#?}"
        );
    }
    assert_eq!(problems.len(), 8, "{rendered:#?}");
    assert!(
        rendered
            .iter()
            .any(|text| text.contains("unknown DNS blocklist zone \"nowhere.test\"")),
        "{rendered:#?}"
    );
    assert!(
        rendered
            .iter()
            .any(|text| text.contains("zone bl.test has kind ip, but rhsbl needs")),
        "{rendered:#?}"
    );
    assert!(
        rendered.iter().any(|text| text.contains("defined twice")),
        "{rendered:#?}"
    );
}

/// Starts wsmtp with the blocklist rules and a relay domain whose group is
/// `sink`.
async fn start_server(dns: &TestDns, sink: &Sink, directory: &Path) -> TestServer {
    let relay = format!(
        "relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n\
         downstream_groups:\n  - name: legacy\n    hosts: [{}]\n",
        sink.addr
    );
    let text = config_text(directory, dns, ZONES, RULES, &relay);
    TestServer::start_yaml(&text, None).await
}

#[tokio::test]
async fn listener_applies_blocklists() {
    let dns = TestDns::start(blocklist_zone()).await;
    let sink = Sink::start().await;
    let directory = tempfile::tempdir().expect("temp dir");
    let server = start_server(&dns, &sink, directory.path()).await;

    let mut listed = server.connect_from("127.0.0.2").await;
    listed.expect("EHLO client.example", 250).await;
    listed.expect("MAIL FROM:<a@ham.example>", 250).await;
    assert!(
        dns.queries().is_empty(),
        "no lookup before the first RCPT: {:?}",
        dns.queries()
    );
    let reply = listed.expect("RCPT TO:<bob@example.net>", 554).await;
    assert!(
        reply
            .text
            .contains(&format!("5.7.1 Client {LISTED_REASON} (bl.test)")),
        "{}",
        reply.text
    );
    listed.expect("QUIT", 221).await;

    let mut clean = server.connect_from("127.0.0.3").await;
    clean.expect("EHLO client.example", 250).await;
    clean.expect("MAIL FROM:<a@ham.example>", 250).await;
    clean.expect("RCPT TO:<bob@example.net>", 250).await;
    clean.expect("RSET", 250).await;
    clean.expect("MAIL FROM:<a@spam.example>", 250).await;
    let reply = clean.expect("RCPT TO:<bob@example.net>", 550).await;
    assert!(
        reply
            .text
            .contains("5.7.1 Sender domain rejected: Spam domain {zone}????"),
        "{}",
        reply.text
    );
    clean.expect("RSET", 250).await;
    clean.expect("MAIL FROM:<>", 250).await;
    clean.expect("RCPT TO:<bob@example.net>", 250).await;
    clean.expect("QUIT", 221).await;

    let mut unreachable = server.connect_from("127.0.0.9").await;
    unreachable.expect("EHLO client.example", 250).await;
    unreachable.expect("MAIL FROM:<a@ham.example>", 250).await;
    let reply = unreachable.expect("RCPT TO:<bob@example.net>", 451).await;
    assert!(
        reply
            .text
            .contains("4.4.3 DNS blocklist slow.test unavailable, try again later"),
        "{}",
        reply.text
    );
    unreachable.expect("QUIT", 221).await;

    let client_queries = dns
        .queries()
        .into_iter()
        .filter(|q| q.name == "3.0.0.127.bl.test" && q.record_type == RecordType::A)
        .count();
    assert_eq!(client_queries, 1, "{:?}", dns.queries());
    server.stop().await;
}

fn write_config(directory: &Path, text: &str) -> PathBuf {
    let path = directory.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test]
async fn route_prints_listings() {
    let dns = TestDns::start(blocklist_zone()).await;
    let directory = tempfile::tempdir().expect("temp dir");
    let text = config_text(directory.path(), &dns, ZONES, RULES, RELAY);
    let path = write_config(directory.path(), &text);

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsmtp"))
        .args([
            "route",
            "--client",
            "127.0.0.2",
            "--from",
            "a@spam.example",
            "--to",
            "bob@example.net",
            "--config",
        ])
        .arg(&path)
        .env_remove("DATABASE_URL")
        .output()
        .await
        .expect("run wsmtp route");

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        format!("dnsbl: 127.0.0.2 in bl.test: listed: {LISTED_REASON}"),
        "dnsbl: 127.0.0.2 in slow.test: not listed".to_string(),
        "rhsbl: spam.example in dbl.test: listed: Spam domain {zone}????".to_string(),
        format!("decision: reject with 554 5.7.1 Client {LISTED_REASON} (bl.test)"),
        "10-dnsbl.yaml:1 listed-client".to_string(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("unused.test"), "{stdout}");
}
