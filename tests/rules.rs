//! Relay rules: a realistic rules directory decided case by case, problems
//! reported with file and line, `wsmtp route` and rules applied at RCPT.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use common::harness::TestServer;
use common::sink::Sink;
use wsmtp::config::Config;
use wsmtp::directory::{Account, DomainEntry, DomainKind, List, Owner, Snapshot};
use wsmtp::policy::address::Address;
use wsmtp::policy::dnsbl::DnsblResults;
use wsmtp::policy::{Action, DirectoryView, Route, SessionFacts, decide};

const CONFIG: &str = "\
hostname: mx.isp.example
listeners:
  - address: 127.0.0.1:2525
relay:
  local_domains: [isp.example]
  relay_domains:
    - domain: partner.example
      group: partner
  relay_networks: [127.0.0.1/32]
  outbound_group: outbound
downstream_groups:
  - name: outbound
    hosts: [127.0.0.1:2601]
  - name: partner
    hosts: [127.0.0.1:2602]
  - name: legacy
    hosts: [127.0.0.1:2603]
queue:
  url: postgres://postgres@127.0.0.1:5432/unused
";

const BLOCKLIST: &str = "\
- name: blocked-networks
  client: [203.0.113.0/24, 2001:db8:bad::/48]
  action: reject
  reply: \"554 5.7.1 Your network is blocked\"
- name: spam-senders
  sender: [\"*@spam.example\", \"/.*@bulk[0-9]+\\\\.example/\"]
  action: reject
  reply: \"550 5.7.1 Sender rejected\"
";

const SUBMISSION: &str = "\
- name: authenticated-submission
  auth: [any]
  tls: true
  recipient_kind: [foreign, relay_domain, local_account, list]
  action: relay
  group: outbound
- name: plain-auth-must-use-tls
  auth: [any]
  tls: false
  action: tempfail
  reply: \"451 4.7.0 Use STARTTLS first\"
";

const CUSTOMERS: &str = "\
- name: customers-send-out
  client: [10.20.0.0/16]
  recipient_kind: [foreign]
  action: relay
- name: customers-bogus-helo
  client: [10.20.0.0/16]
  helo: [\"localhost\", \"*.localdomain\"]
  action: reject
- name: unknown-local-users
  recipient_kind: [unknown_local]
  action: reject
  reply: \"550 5.1.1 No such mailbox at this ISP\"
- name: empty-sender-to-lists
  sender: [\"<>\"]
  recipient_kind: [list]
  action: reject
  reply: \"550 5.7.1 Lists do not take bounces\"
";

fn rules_config(directory: &Path) -> Config {
    let rules = directory.join("rules");
    std::fs::create_dir_all(&rules).expect("rules directory");
    std::fs::write(rules.join("10-blocklist.yaml"), BLOCKLIST).expect("write");
    std::fs::write(rules.join("20-submission.yaml"), SUBMISSION).expect("write");
    std::fs::write(rules.join("30-customers.yaml"), CUSTOMERS).expect("write");
    std::fs::write(rules.join("README"), "not a rules file").expect("write");
    let path = directory.join("config.yaml");
    std::fs::write(&path, CONFIG).expect("write config");
    Config::load(&path).expect("valid configuration and rules")
}

fn snapshot() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (name, kind, group) in [
        ("isp.example", DomainKind::Local, None),
        ("old.isp.example", DomainKind::Migrating, Some("legacy")),
    ] {
        snapshot.domains.insert(
            name.to_string(),
            DomainEntry {
                kind,
                legacy_group: group.map(str::to_string),
            },
        );
    }
    snapshot.accounts.push(Account {
        id: 1,
        name: "alice".into(),
        addresses: vec!["alice@isp.example".into()],
        mailbox: None,
        forwards: vec![],
        relay_group: None,
        auto_reply: None,
        password_hash: None,
    });
    snapshot
        .addresses
        .insert("alice@isp.example".into(), Owner::Account(0));
    snapshot.lists.push(List {
        id: 1,
        name: "news".into(),
        addresses: vec!["news@isp.example".into()],
        owner: "alice@isp.example".into(),
        members: vec!["alice@isp.example".into()],
    });
    snapshot
        .addresses
        .insert("news@isp.example".into(), Owner::List(0));
    snapshot
}

struct Case {
    client: &'static str,
    helo: &'static str,
    auth: Option<&'static str>,
    tls: bool,
    sender: &'static str,
    recipient: &'static str,
    /// `local`, `group NAME` or the reply code and enhanced code.
    action: &'static str,
    /// The start of the deciding rule's reference.
    rule: &'static str,
}

const fn case(
    client: &'static str,
    sender: &'static str,
    recipient: &'static str,
    action: &'static str,
    rule: &'static str,
) -> Case {
    Case {
        client,
        helo: "client.example",
        auth: None,
        tls: false,
        sender,
        recipient,
        action,
        rule,
    }
}

#[test]
fn rules_decide_each_case() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = rules_config(directory.path());
    assert_eq!(config.rules.rules().len(), 8);
    let snapshot = snapshot();
    let cases = [
        // Blocklisted networks lose even for local recipients.
        case(
            "203.0.113.9",
            "a@example.org",
            "alice@isp.example",
            "554 5.7.1",
            "10-blocklist.yaml:1 blocked-networks",
        ),
        case(
            "2001:db8:bad::1",
            "a@example.org",
            "alice@isp.example",
            "554 5.7.1",
            "10-blocklist.yaml:1 blocked-networks",
        ),
        case(
            "192.0.2.1",
            "x@spam.example",
            "alice@isp.example",
            "550 5.7.1",
            "10-blocklist.yaml:5 spam-senders",
        ),
        case(
            "192.0.2.1",
            "x@bulk42.example",
            "alice@isp.example",
            "550 5.7.1",
            "10-blocklist.yaml:5 spam-senders",
        ),
        // Customers by network send out through the outbound group.
        case(
            "10.20.3.4",
            "c@isp.example",
            "friend@example.org",
            "group outbound",
            "30-customers.yaml:1 customers-send-out",
        ),
        // Customers to a relay domain: no rule, the built-in relay domain.
        case(
            "10.20.3.4",
            "c@isp.example",
            "bob@partner.example",
            "group partner",
            "relay_domains[partner.example]",
        ),
        // Strangers: local accounts accepted, relaying refused.
        case(
            "192.0.2.1",
            "a@example.org",
            "alice@isp.example",
            "local",
            "account[alice]",
        ),
        case(
            "192.0.2.1",
            "a@example.org",
            "friend@example.org",
            "550 5.7.1",
            "no_relay",
        ),
        case(
            "192.0.2.1",
            "a@example.org",
            "nobody@isp.example",
            "550 5.1.1",
            "30-customers.yaml:9 unknown-local-users",
        ),
        // A migrating domain passes unknown users to its legacy group.
        case(
            "192.0.2.1",
            "a@example.org",
            "old@old.isp.example",
            "group legacy",
            "migrating[old.isp.example]",
        ),
        case(
            "192.0.2.1",
            "",
            "news@isp.example",
            "550 5.7.1",
            "30-customers.yaml:13 empty-sender-to-lists",
        ),
        case(
            "192.0.2.1",
            "a@example.org",
            "news@isp.example",
            "local",
            "list[news]",
        ),
        // Postmaster is always accepted, whatever the rules say.
        case(
            "203.0.113.9",
            "a@example.org",
            "postmaster@isp.example",
            "local",
            "postmaster",
        ),
    ];
    let mut helo_case = case(
        "10.20.3.4",
        "c@isp.example",
        "alice@isp.example",
        "550 5.7.1",
        "30-customers.yaml:5 customers-bogus-helo",
    );
    helo_case.helo = "box.localdomain";
    let mut submission = case(
        "192.0.2.1",
        "alice@isp.example",
        "friend@example.org",
        "group outbound",
        "20-submission.yaml:1 authenticated-submission",
    );
    submission.auth = Some("alice");
    submission.tls = true;
    let mut plain_submission = case(
        "192.0.2.1",
        "alice@isp.example",
        "friend@example.org",
        "451 4.7.0",
        "20-submission.yaml:7 plain-auth-must-use-tls",
    );
    plain_submission.auth = Some("alice");

    for case in cases
        .iter()
        .chain([&helo_case, &submission, &plain_submission])
    {
        let client: IpAddr = case.client.parse().expect("client address");
        let session = SessionFacts {
            client,
            helo: case.helo,
            auth: case.auth,
            tls: case.tls,
            sender: case.sender,
            dnsbl: DnsblResults::none(),
        };
        let recipient = Address::parse(case.recipient).expect("recipient");
        let decision = decide(
            &config.relay,
            &config.rules,
            DirectoryView::Ready(&snapshot),
            &session,
            &recipient,
            false,
        );
        let action = match &decision.action {
            Action::Accept(Route::Local) => "local".to_string(),
            Action::Accept(Route::Group(group)) => format!("group {group}"),
            Action::Reject(reply) => {
                format!(
                    "{} {}",
                    reply.code(),
                    reply.enhanced().expect("enhanced code")
                )
            }
        };
        let label = format!("{} from {} at {}", case.recipient, case.sender, case.client);
        assert_eq!(action, case.action, "{label}: action");
        let rule = decision.rule.rsplit('/').next().unwrap_or(&decision.rule);
        assert!(
            rule.starts_with(case.rule),
            "{label}: decided by {} instead of {}",
            decision.rule,
            case.rule
        );
    }
}

#[test]
fn every_rule_problem_is_reported_with_file_and_line() {
    let directory = tempfile::tempdir().expect("temp dir");
    let rules = directory.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules directory");
    std::fs::write(
        rules.join("10-bad.yaml"),
        "- name: one\n  client: [10.0.0.0/40]\n  action: reject\n  reply: \"450 5.7.1 wrong class\"\n\
         - name: two\n  recipient_kind: [martian]\n  action: relay\n  group: nowhere\n",
    )
    .expect("write");
    std::fs::write(
        rules.join("20-worse.yaml"),
        "- name: one\n  action: explode\n- name: three\n  helo: [\"/[unclosed/\"]\n  action: accept\n",
    )
    .expect("write");
    let path = directory.path().join("config.yaml");
    std::fs::write(&path, CONFIG).expect("write config");
    let error = Config::load(&path).expect_err("broken rules").to_string();
    for expected in [
        "10-bad.yaml:2: invalid network \"10.0.0.0/40\"",
        "10-bad.yaml:4: invalid reply \"450 5.7.1 wrong class\"",
        "10-bad.yaml:6: unknown recipient kind \"martian\"",
        "10-bad.yaml:8: unknown downstream group \"nowhere\"",
        "20-worse.yaml:1: rule name \"one\" is used twice",
        "20-worse.yaml:2: unknown action \"explode\"",
        "20-worse.yaml:4: invalid pattern \"/[unclosed/\"",
    ] {
        assert!(
            error.contains(expected),
            "missing {expected:?} in:\n{error}"
        );
    }
    // Rule one is a reject whose reply is invalid: that is its problem,
    // not that a reply was given at all.
    assert!(
        !error.contains("reply is only used"),
        "false problem reported in:\n{error}"
    );
    // Problems are listed file by file, in line order.
    let position = |text: &str| error.find(text).expect(text);
    assert!(
        position("10-bad.yaml:2:") < position("10-bad.yaml:8:"),
        "{error}"
    );
    assert!(
        position("10-bad.yaml:8:") < position("20-worse.yaml:1:"),
        "{error}"
    );
    assert!(
        position("20-worse.yaml:1:") < position("20-worse.yaml:2:"),
        "{error}"
    );
}

#[test]
fn route_command_names_the_deciding_rule() {
    let directory = tempfile::tempdir().expect("temp dir");
    rules_config(directory.path());
    let output = Command::new(env!("CARGO_BIN_EXE_wsmtp"))
        .args([
            "route",
            "--client",
            "10.20.3.4",
            "--from",
            "c@isp.example",
            "--to",
            "friend@example.org",
            "bob@partner.example",
            "--config",
        ])
        .arg(directory.path().join("config.yaml"))
        .env_remove("DATABASE_URL")
        .output()
        .expect("run wsmtp route");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("rules: 8 rule(s)"), "{stdout}");
    assert!(
        stdout.contains("friend@example.org\n  kind:     foreign"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pass through to group outbound"),
        "{stdout}"
    );
    assert!(
        stdout.contains("30-customers.yaml:1 customers-send-out"),
        "{stdout}"
    );
    assert!(stdout.contains("pass through to group partner"), "{stdout}");
    assert!(
        stdout.contains("relay_domains[partner.example]"),
        "{stdout}"
    );
}

#[tokio::test]
async fn rule_reply_reaches_the_client() {
    let sink = Sink::start().await;
    let directory = tempfile::tempdir().expect("temp dir");
    let rules = directory.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules directory");
    std::fs::write(
        rules.join("10-helo.yaml"),
        "- name: no-invalid-helo\n  helo: [\"*.invalid\"]\n  action: reject\n  reply: \"550 5.7.1 Fix your HELO\"\n",
    )
    .expect("write");
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nrules: {}\n\
         relay:\n  relay_domains:\n    - domain: example.net\n      group: legacy\n\
         downstream_groups:\n  - name: legacy\n    hosts: [{}]\n",
        rules.display(),
        sink.addr
    );
    let server = TestServer::start_yaml(&yaml, None).await;
    let mut client = server.connect().await;
    client.expect("EHLO box.invalid", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    let reply = client.expect("RCPT TO:<bob@example.net>", 550).await;
    assert!(reply.text.contains("5.7.1 Fix your HELO"), "{}", reply.text);
    client.expect("RSET", 250).await;
    client.expect("EHLO box.example", 250).await;
    client.expect("MAIL FROM:<a@example.org>", 250).await;
    client.expect("RCPT TO:<bob@example.net>", 250).await;
    client.expect("QUIT", 221).await;
    server.stop().await;
}

#[test]
fn named_lists_block_networks_and_senders() {
    let directory = tempfile::tempdir().expect("temp dir");
    let rules = directory.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules directory");
    std::fs::write(
        directory.path().join("blocked.cidr"),
        "# dial-up pools\n100.64.0.0/10\n100.64.1.0/24 allow   # a customer's mail server\n",
    )
    .expect("write");
    std::fs::write(
        directory.path().join("senders.txt"),
        "@spam.example\nbad@example.org\n",
    )
    .expect("write");
    std::fs::write(
        rules.join("10-lists.yaml"),
        "- name: dialup\n  client_list: [dialup]\n  action: reject\n  reply: \"554 5.7.1 Dynamic address\"\n\
         - name: senders\n  sender_list: [senders]\n  action: reject\n",
    )
    .expect("write");
    let config = format!(
        "{CONFIG}lists:\n  - {{name: dialup, kind: networks, file: blocked.cidr}}\n  \
         - {{name: senders, kind: addresses, file: senders.txt}}\n"
    );
    let path = directory.path().join("config.yaml");
    std::fs::write(&path, config).expect("write config");
    let config = Config::load(&path).expect("valid configuration");
    let snapshot = snapshot();

    for (client, sender, expected) in [
        ("100.64.9.9", "a@example.org", "dialup"),
        ("100.64.1.5", "a@example.org", "account[alice]"),
        ("192.0.2.1", "x@spam.example", "senders"),
        ("192.0.2.1", "BAD@example.org", "senders"),
        ("192.0.2.1", "good@example.org", "account[alice]"),
        ("192.0.2.1", "", "account[alice]"),
    ] {
        let session = SessionFacts {
            client: client.parse().expect("client"),
            helo: "client.example",
            auth: None,
            tls: false,
            sender,
            dnsbl: DnsblResults::none(),
        };
        let recipient = Address::parse("alice@isp.example").expect("recipient");
        let decision = decide(
            &config.relay,
            &config.rules,
            DirectoryView::Ready(&snapshot),
            &session,
            &recipient,
            false,
        );
        assert!(
            decision.rule.ends_with(expected),
            "{client} {sender}: decided by {}",
            decision.rule
        );
    }
}
