//! The delivery tier end to end: SMTP into the listener, routing, and
//! delivery to Maildirs, downstream groups and MX hosts found through a DNS
//! server on loopback, with retries, expiry and delivery status
//! notifications.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::db::TestDb;
use common::directory::{add_account, add_list, wait_until_current};
use common::dns::{TestDns, Zone};
use common::harness::{TestServer, send_spooled};
use common::sink::{Sink, SinkMessage};
use wsmtp::cli::serve::Role;

const ALL_ROLES: &[Role] = &[Role::Listener, Role::Router, Role::Delivery];

/// A server running every role, a sink as the downstream group `legacy`
/// (which receives example.net), and two MX sinks for `remote.test` on
/// 127.0.0.2 and 127.0.0.3, found through a DNS server on loopback.
struct Setup {
    server: TestServer,
    legacy: Sink,
    mx1: Sink,
    mx2: Sink,
    _dns: TestDns,
    maildirs: tempfile::TempDir,
}

/// Lines added under `delivery:`, each indented by two spaces.
async fn setup(zone: Zone, delivery: &str, legacy_host: Option<&str>) -> Setup {
    setup_with_fallback(zone, delivery, legacy_host, false).await
}

/// Like [`setup`]; `fallback` spools example.net recipients when the group
/// `legacy` is unreachable.
async fn setup_with_fallback(
    zone: Zone,
    delivery: &str,
    legacy_host: Option<&str>,
    fallback: bool,
) -> Setup {
    let legacy = Sink::start().await;
    let mx1 = Sink::start_on("127.0.0.2:0".parse().unwrap()).await;
    let port = mx1.addr.port();
    let mx2 = Sink::start_on(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 3), port))).await;
    let dns = TestDns::start(zone).await;
    let db = TestDb::create().await;
    let legacy_host = legacy_host
        .map(str::to_string)
        .unwrap_or_else(|| legacy.addr.to_string());
    let fallback = if fallback {
        "      fallback: queue\n"
    } else {
        ""
    };
    let yaml = format!(
        "hostname: mx.test.example\n\
         listeners:\n  - address: 127.0.0.1:0\n\
         timeouts:\n  shutdown_grace: 2s\n\
         relay:\n  local_domains: [example.com]\n  \
         relay_domains:\n    - domain: example.net\n      group: legacy\n{fallback}  \
         relay_networks: [127.0.0.1/32]\n\
         downstream_groups:\n  - name: legacy\n    connect_timeout: 1s\n    command_timeout: 10s\n    \
         tls: none\n    hosts: [{legacy_host}]\n\
         queue:\n  url: {url}\n  chunk_size: 65536\n\
         router:\n  poll_interval: 50ms\n\
         delivery:\n  poll_interval: 50ms\n  smtp_port: {port}\n  connect_timeout: 1s\n  \
         retry_intervals: [1s]\n  tls: none\n  \
         resolver:\n    nameservers: ['{dns}']\n    timeout: 1s\n    attempts: 1\n{delivery}",
        url = db.url,
        dns = dns.address(),
    );
    let server = TestServer::start_yaml_roles(&yaml, Some(db), Some(ALL_ROLES)).await;
    Setup {
        server,
        legacy,
        mx1,
        mx2,
        _dns: dns,
        maildirs: tempfile::tempdir().expect("temp dir"),
    }
}

impl Setup {
    fn maildir(&self, name: &str) -> PathBuf {
        self.maildirs.path().join(name)
    }

    async fn send(
        &self,
        sender: &str,
        recipients: &[&str],
        subject: &str,
    ) -> wsmtp::queue::QueueId {
        let mut client = self.server.connect().await;
        client.expect("EHLO client.test", 250).await;
        let content = format!(
            "From: <{sender}>\r\nTo: undisclosed-recipients:;\r\nSubject: {subject}\r\n\
             Message-ID: <{subject}@client.test>\r\n\r\nHello.\r\n"
        );
        send_spooled(&mut client, sender, recipients, content.as_bytes()).await
    }

    /// Waits until the queue contains no message at all.
    async fn wait_until_empty(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.server.all_messages().await;
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let mut details = Vec::new();
                for message in &left {
                    details.push(format!("{:?}", self.server.queue().show(message.id).await));
                }
                panic!("queue not empty after {timeout:?}: {}", details.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn db(&self) -> tokio_postgres::Client {
        self.server.db.as_ref().expect("database").connect().await
    }
}

/// Files in a Maildir's new/ directory, sorted by name.
fn maildir_messages(maildir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(maildir.join("new")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("entry").path()).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("read message"))
        .collect()
}

/// Waits until a Maildir contains `count` messages and returns them.
async fn wait_for_maildir(maildir: &Path, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let messages = maildir_messages(maildir);
        if messages.len() >= count || Instant::now() > deadline {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Messages whose envelope sender is `<>`.
fn notifications(messages: &[SinkMessage]) -> Vec<&SinkMessage> {
    messages
        .iter()
        .filter(|m| m.mail_from.starts_with("<>"))
        .collect()
}

fn remote_zone() -> Zone {
    Zone::new()
        .mx("remote.test", 10, "mx1.remote.test")
        .a("mx1.remote.test", Ipv4Addr::new(127, 0, 0, 2))
}

#[tokio::test(flavor = "multi_thread")]
async fn message_reaches_every_destination_once() {
    let setup = setup(remote_zone(), "", None).await;
    let db = setup.db().await;
    let dave = setup.maildir("dave");
    let erin = setup.maildir("erin");
    add_account(&db, "dave", &["dave@example.com"], dave.to_str(), &[]).await;
    add_account(
        &db,
        "erin",
        &["erin@example.com"],
        erin.to_str(),
        &["frank@remote.test"],
    )
    .await;
    let lmtp = Sink::start_lmtp().await;
    add_lmtp_account(&db, "lena", lmtp.addr).await;
    add_list(
        &db,
        "team",
        "team@example.com",
        "team-owner@example.net",
        &[
            "dave@example.com".to_string(),
            "lena@example.com".to_string(),
            "bob@example.net".to_string(),
        ],
    )
    .await;
    wait_until_current(&db, setup.server.directory.as_ref().unwrap()).await;

    let id = setup
        .send(
            "sender@example.net",
            &["dave@example.com", "erin@example.com", "team@example.com"],
            "fanout",
        )
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;

    let dave_mail = maildir_messages(&dave);
    assert_eq!(dave_mail.len(), 1, "dave gets one copy");
    assert!(contains(&dave_mail[0], "Return-Path: <sender@example.net>"));
    assert!(contains(&dave_mail[0], "Delivered-To: dave@example.com"));
    assert!(contains(&dave_mail[0], "Subject: fanout"));
    assert!(contains(&dave_mail[0], &id.simple().to_string()));
    assert_eq!(maildir_messages(&erin).len(), 1, "erin gets one copy");

    let mailbox = lmtp.messages();
    assert_eq!(mailbox.len(), 1, "the LMTP mailbox gets one copy");
    assert_eq!(mailbox[0].rcpt_to[0].trim(), "<lena@example.com>");
    assert!(mailbox[0].mail_from.starts_with("<team-owner@example.net>"));
    assert!(contains(
        &mailbox[0].unstuffed(),
        "Delivered-To: lena@example.com"
    ));

    let remote = setup.mx1.messages();
    assert_eq!(remote.len(), 1, "the forward reaches the MX once");
    assert_eq!(remote[0].rcpt_to[0].trim(), "<frank@remote.test>");
    assert!(remote[0].mail_from.starts_with("<sender@example.net>"));

    let legacy = setup.legacy.messages();
    assert_eq!(
        legacy.len(),
        1,
        "the list member at example.net gets one copy"
    );
    assert_eq!(legacy[0].rcpt_to[0].trim(), "<bob@example.net>");
    assert!(
        legacy[0].mail_from.starts_with("<team-owner@example.net>"),
        "list mail goes out from the list owner: {}",
        legacy[0].mail_from
    );
    assert!(setup.mx2.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_failure_is_retried_until_delivered() {
    let setup = setup(remote_zone(), "", None).await;
    setup.mx1.set_final_reply("451 4.3.0 try again later");
    setup
        .send("sender@example.com", &["kim@remote.test"], "retry")
        .await;

    let db = setup.db().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = db
            .query_opt("SELECT attempts, last_reply FROM deliveries", &[])
            .await
            .expect("query");
        if let Some(row) = row
            && row.get::<_, i32>(0) >= 1
        {
            let reply: String = row.get(1);
            assert!(reply.starts_with("451 4.3.0"), "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "no failed attempt recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    setup.mx1.clear_overrides();
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let messages = setup.mx1.messages();
    assert_eq!(messages.len(), 1, "delivered once after the retry");
    assert!(
        notifications(&messages).is_empty(),
        "no notification for a retried delivery"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_recipient_gets_one_notification() {
    let setup = setup(remote_zone(), "", None).await;
    setup
        .mx1
        .set_rcpt_reply("bad@remote.test", "550 5.1.1 no such mailbox here");
    setup
        .send(
            "owner@remote.test",
            &["good@remote.test", "bad@remote.test", "worse@remote.test"],
            "partly",
        )
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;

    let messages = setup.mx1.messages();
    let original: Vec<&SinkMessage> = messages
        .iter()
        .filter(|m| !m.mail_from.starts_with("<>"))
        .collect();
    assert_eq!(original.len(), 1, "one transaction for all recipients");
    let accepted: Vec<&str> = original[0].rcpt_to.iter().map(|r| r.trim()).collect();
    assert_eq!(accepted, vec!["<good@remote.test>", "<worse@remote.test>"]);

    let reports = notifications(&messages);
    assert_eq!(reports.len(), 1, "exactly one notification");
    assert_eq!(reports[0].rcpt_to[0].trim(), "<owner@remote.test>");
    let report = reports[0].unstuffed();
    assert!(contains(&report, "multipart/report"));
    assert!(contains(
        &report,
        "Final-Recipient: rfc822; bad@remote.test"
    ));
    assert!(contains(&report, "Action: failed"));
    assert!(contains(&report, "Status: 5.1.1"));
    assert!(contains(&report, "550 5.1.1 no such mailbox here"));
    assert!(!contains(
        &report,
        "Final-Recipient: rfc822; good@remote.test"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_host_warns_then_expires_with_notification() {
    let zone = remote_zone()
        .mx("dead.test", 10, "mx.dead.test")
        .a("mx.dead.test", Ipv4Addr::new(127, 0, 0, 4));
    let setup = setup(zone, "  max_lifetime: 3s\n  delay_notices: [1s]\n", None).await;
    let db = setup.db().await;
    let gina = setup.maildir("gina");
    add_account(&db, "gina", &["gina@example.com"], gina.to_str(), &[]).await;
    wait_until_current(&db, setup.server.directory.as_ref().unwrap()).await;

    setup
        .send("gina@example.com", &["bob@dead.test"], "doomed")
        .await;
    let reports = wait_for_maildir(&gina, 2, Duration::from_secs(20)).await;
    assert_eq!(reports.len(), 2, "a delay notice and a failure notice");
    let delayed = &reports[0];
    let failed = &reports[1];
    assert!(
        contains(delayed, "Action: delayed"),
        "{}",
        String::from_utf8_lossy(delayed)
    );
    assert!(contains(delayed, "Will-Retry-Until:"));
    assert!(
        contains(failed, "Action: failed"),
        "{}",
        String::from_utf8_lossy(failed)
    );
    assert!(contains(failed, "Final-Recipient: rfc822; bob@dead.test"));
    assert!(contains(failed, "gave up after 3 seconds"));
    assert!(contains(failed, "Return-Path: <>"));
    setup.wait_until_empty(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mx_hosts_are_tried_by_preference() {
    let zone = Zone::new()
        .mx("remote.test", 10, "down.remote.test")
        .a("down.remote.test", Ipv4Addr::new(127, 0, 0, 4))
        .mx("remote.test", 20, "mx2.remote.test")
        .a("mx2.remote.test", Ipv4Addr::new(127, 0, 0, 3))
        .mx("remote.test", 30, "mx1.remote.test")
        .a("mx1.remote.test", Ipv4Addr::new(127, 0, 0, 2));
    let setup = setup(zone, "", None).await;
    setup
        .send("sender@example.com", &["kim@remote.test"], "preference")
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    assert_eq!(
        setup.mx2.messages().len(),
        1,
        "the first host that answers gets it"
    );
    assert!(setup.mx1.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn domain_without_mx_uses_its_address() {
    let zone = Zone::new().a("plain.test", Ipv4Addr::new(127, 0, 0, 3));
    let setup = setup(zone, "", None).await;
    setup
        .send("sender@example.com", &["lee@plain.test"], "implicit")
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let messages = setup.mx2.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to[0].trim(), "<lee@plain.test>");
}

#[tokio::test(flavor = "multi_thread")]
async fn null_mx_domain_bounces_at_once() {
    let zone = remote_zone().null_mx("nomail.test");
    let setup = setup(zone, "", None).await;
    setup
        .send("owner@remote.test", &["max@nomail.test"], "nullmx")
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let reports = notifications(&setup.mx1.messages())
        .into_iter()
        .map(SinkMessage::unstuffed)
        .collect::<Vec<_>>();
    assert_eq!(reports.len(), 1);
    assert!(
        contains(&reports[0], "Status: 5.1.10"),
        "{}",
        String::from_utf8_lossy(&reports[0])
    );
    assert!(contains(
        &reports[0],
        "Final-Recipient: rfc822; max@nomail.test"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn null_sender_failure_is_dropped_without_notification() {
    let setup = setup(remote_zone(), "", None).await;
    setup
        .mx1
        .set_rcpt_reply("bad@remote.test", "550 5.1.1 no such mailbox here");
    setup
        .send("", &["bad@remote.test"], "bounce-of-bounce")
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    assert!(setup.mx1.messages().is_empty());
    assert!(setup.legacy.messages().is_empty());
}

/// Adds an account whose mailbox is on an LMTP server.
async fn add_lmtp_account(db: &tokio_postgres::Client, name: &str, server: SocketAddr) {
    let id: i64 = db
        .query_one(
            "INSERT INTO accounts (name, mailbox_kind, mailbox_target) VALUES ($1, 'lmtp', $2) RETURNING id",
            &[&name, &server.to_string()],
        )
        .await
        .expect("add account")
        .get(0);
    db.execute(
        "INSERT INTO addresses (address, domain, account_id) VALUES ($1, 'example.com', $2)",
        &[&format!("{name}@example.com"), &id],
    )
    .await
    .expect("add address");
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_replies_count_per_recipient() {
    let setup = setup(remote_zone(), "", None).await;
    let lmtp = Sink::start_lmtp().await;
    lmtp.set_lmtp_data_reply("mona@example.com", "452 4.2.2 mailbox full");
    let db = setup.db().await;
    add_lmtp_account(&db, "lena", lmtp.addr).await;
    add_lmtp_account(&db, "mona", lmtp.addr).await;
    wait_until_current(&db, setup.server.directory.as_ref().unwrap()).await;

    setup
        .send(
            "sender@example.net",
            &["lena@example.com", "mona@example.com"],
            "lmtp",
        )
        .await;
    let first = lmtp.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    let accepted: Vec<&str> = first[0].rcpt_to.iter().map(|r| r.trim()).collect();
    assert_eq!(
        accepted,
        vec!["<lena@example.com>"],
        "one transaction, lena accepted"
    );

    // mona's delivery is retried, alone, once her mailbox has room.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply: Option<String> = db
            .query_opt(
                "SELECT last_reply FROM deliveries WHERE address = 'mona@example.com' AND attempts > 0",
                &[],
            )
            .await
            .expect("query")
            .map(|row| row.get(0));
        if let Some(reply) = reply {
            assert!(reply.starts_with("452 4.2.2"), "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "mona's deferral not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lmtp.clear_overrides();
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let messages = lmtp.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].rcpt_to[0].trim(), "<mona@example.com>");
    assert!(notifications(&messages).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_fallback_is_delivered_when_the_group_returns() {
    // A port that is free now: the group is down until a sink starts there.
    let parked = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = parked.local_addr().expect("address");
    drop(parked);
    let setup = setup_with_fallback(remote_zone(), "", Some(&address.to_string()), true).await;
    setup
        .send("sender@remote.test", &["ned@example.net"], "fallback")
        .await;

    let db = setup.db().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempts: Option<i32> = db
            .query_opt(
                "SELECT attempts FROM deliveries WHERE address = 'ned@example.net'",
                &[],
            )
            .await
            .expect("query")
            .map(|row| row.get(0));
        if attempts.is_some_and(|n| n >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery attempt while the group is down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let returned = Sink::start_on(address).await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let messages = returned.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to[0].trim(), "<ned@example.net>");
}

/// A certificate for mx.secure.test, signed by nobody the client trusts.
fn self_signed(directory: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.secure.test".to_string()])
        .expect("certificate");
    let certificate = directory.join("cert.pem");
    let key = directory.join("key.pem");
    std::fs::write(&certificate, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (certificate, key)
}

/// A second wsmtp on 127.0.0.5 at the MX port, with STARTTLS, that passes
/// secure.test mail on to `sink`.
async fn start_tls_mx(port: u16, sink: &Sink, directory: &Path) -> TestServer {
    let (certificate, key) = self_signed(directory);
    let yaml = format!(
        "hostname: mx.secure.test\n\
         listeners:\n  - address: 127.0.0.5:{port}\n    tls: {{certificate: '{}', key: '{}'}}\n\
         relay:\n  relay_domains:\n    - domain: secure.test\n      group: inner\n\
         downstream_groups:\n  - name: inner\n    hosts: [{}]\n",
        certificate.display(),
        key.display(),
        sink.addr
    );
    TestServer::start_yaml(&yaml, None).await
}

fn secure_zone() -> Zone {
    remote_zone()
        .mx("secure.test", 10, "mx.secure.test")
        .a("mx.secure.test", Ipv4Addr::new(127, 0, 0, 5))
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_policy_delivers_over_starttls() {
    let setup = setup(
        secure_zone(),
        "  tls_policy:\n    - {domain: secure.test, tls: encrypt}\n",
        None,
    )
    .await;
    let inner = Sink::start().await;
    let certificates = tempfile::tempdir().expect("temp dir");
    let port = setup.mx1.addr.port();
    let secure_mx = start_tls_mx(port, &inner, certificates.path()).await;

    setup
        .send("sender@example.com", &["pat@secure.test"], "secret")
        .await;
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let messages = inner.messages();
    assert_eq!(messages.len(), 1);
    let content = messages[0].unstuffed();
    assert!(
        contains(&content, "with ESMTPS"),
        "the MX received it over TLS: {}",
        String::from_utf8_lossy(&content)
    );
    secure_mx.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn required_tls_defers_when_unavailable_or_untrusted() {
    let setup = setup(
        secure_zone(),
        "  tls_policy:\n    - {domain: remote.test, tls: encrypt}\n    - {domain: secure.test, tls: verify}\n",
        None,
    )
    .await;
    let inner = Sink::start().await;
    let certificates = tempfile::tempdir().expect("temp dir");
    let port = setup.mx1.addr.port();
    let secure_mx = start_tls_mx(port, &inner, certificates.path()).await;

    setup
        .send("sender@example.com", &["kim@remote.test"], "plain-only")
        .await;
    setup
        .send("sender@example.com", &["pat@secure.test"], "untrusted")
        .await;
    let db = setup.db().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let replies: Vec<(String, String)> = loop {
        let rows = db
            .query(
                "SELECT address, last_reply FROM deliveries WHERE attempts > 0 ORDER BY address",
                &[],
            )
            .await
            .expect("query");
        if rows.len() == 2 {
            break rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        assert!(
            Instant::now() < deadline,
            "both deliveries should have been tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(replies[0].0, "kim@remote.test");
    assert!(replies[0].1.contains("4.7.5"), "{}", replies[0].1);
    assert!(
        replies[0].1.contains("does not offer STARTTLS"),
        "{}",
        replies[0].1
    );
    assert_eq!(replies[1].0, "pat@secure.test");
    assert!(replies[1].1.contains("4.7.5"), "{}", replies[1].1);
    assert!(setup.mx1.messages().is_empty());
    assert!(inner.messages().is_empty());
    secure_mx.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_delete_with_bounce_notifies_the_sender() {
    let zone = remote_zone()
        .mx("dead.test", 10, "mx.dead.test")
        .a("mx.dead.test", Ipv4Addr::new(127, 0, 0, 4));
    let setup = setup(zone, "", None).await;
    let id = setup
        .send("owner@remote.test", &["stuck@dead.test"], "stuck")
        .await;
    let db = setup.db().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while db
        .query_opt("SELECT 1 FROM deliveries WHERE attempts > 0", &[])
        .await
        .expect("query")
        .is_none()
    {
        assert!(Instant::now() < deadline, "no attempt recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let settings = wsmtp::delivery::notify::NotificationSettings::new("mx.test.example");
    let outcome = wsmtp::delivery::store::bounce_and_delete(setup.server.queue(), &settings, &[id])
        .await
        .expect("bounce and delete");
    assert_eq!(outcome.deleted, vec![id]);
    assert_eq!(outcome.notifications, 1);
    setup.wait_until_empty(Duration::from_secs(20)).await;
    let reports = notifications(&setup.mx1.messages())
        .into_iter()
        .map(SinkMessage::unstuffed)
        .collect::<Vec<_>>();
    assert_eq!(reports.len(), 1);
    assert!(contains(
        &reports[0],
        "Final-Recipient: rfc822; stuck@dead.test"
    ));
    let report = String::from_utf8_lossy(&reports[0]);
    assert!(
        report.contains("message deleted from the queue"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn held_mail_waits_until_released() {
    use wsmtp::queue::Target;
    let setup = setup(remote_zone(), "", None).await;
    let queue = setup.server.queue();
    let destination = Target::Destination("domain:remote.test".into());
    queue.hold(&destination).await.expect("hold destination");
    let id = setup
        .send("sender@example.com", &["kim@remote.test"], "held")
        .await;
    queue
        .hold(&Target::Messages(vec![id]))
        .await
        .expect("hold message");
    queue
        .release(&destination)
        .await
        .expect("release destination");

    // Still held by the message hold.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(setup.mx1.messages().is_empty(), "held mail was delivered");
    let detail = queue.show(id).await.expect("show").expect("message");
    assert!(detail.held);
    assert!(detail.deliveries.iter().all(|d| d.attempts == 0));

    queue
        .release(&Target::Messages(vec![id]))
        .await
        .expect("release message");
    setup.wait_until_empty(Duration::from_secs(10)).await;
    assert_eq!(setup.mx1.messages().len(), 1);
}
