//! Directory administration, alias-file import and the `wsmtp accounts`
//! command line, against a real PostgreSQL server (127.0.0.1:5432 or
//! `WSMTP_TEST_PG`, see `tests/common/db.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::db::TestDb;
use tokio_postgres::Client;
use wsmtp::directory::admin::{self, AccountUpdate, AdminError, NewAccount, NewList, OwnerRef};
use wsmtp::directory::import::{self, Format, ImportError, ImportOptions, ImportReport};
use wsmtp::directory::{AutoReply, AutoReplyKind, DomainKind, Mailbox};
use wsmtp::queue::{Queue, QueueConfig};

async fn migrated_db() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let queue = Queue::new(&QueueConfig {
        pool_size: 2,
        ..QueueConfig::new(db.url.clone())
    })
    .expect("valid queue config");
    queue.migrate().await.expect("migrate");
    let client = db.connect().await;
    (db, client)
}

async fn add_local_domain(client: &mut Client, name: &str) {
    admin::add_domain(client, name, DomainKind::Local, None)
        .await
        .expect("add local domain");
}

async fn directory_version(client: &Client) -> i64 {
    client
        .query_one("SELECT version FROM directory_version WHERE id = 1", &[])
        .await
        .expect("read version")
        .get(0)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect("count").get(0)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn vacation(subject: &str, body: &str) -> AutoReply {
    AutoReply {
        kind: AutoReplyKind::Vacation,
        subject: subject.to_owned(),
        body: body.to_owned(),
        active_from: None,
        active_until: None,
        interval: Duration::from_secs(7 * 86_400),
        enabled: true,
    }
}

// --- Domains -------------------------------------------------------------------

#[tokio::test]
async fn domain_add_set_list_remove() {
    let (_db, mut client) = migrated_db().await;

    let name = admin::add_domain(&mut client, "Example.COM.", DomainKind::Local, None)
        .await
        .expect("add");
    assert_eq!(name, "example.com");
    let name = admin::add_domain(
        &mut client,
        "bücher.example",
        DomainKind::Relay,
        Some("legacy"),
    )
    .await
    .expect("add IDN relay domain");
    assert_eq!(name, "xn--bcher-kva.example");

    admin::set_domain(
        &mut client,
        "example.com",
        DomainKind::Migrating,
        Some("legacy"),
    )
    .await
    .expect("set");
    let domains = admin::list_domains(&client).await.expect("list");
    assert_eq!(domains.len(), 2);
    assert_eq!(domains[0].name, "example.com");
    assert_eq!(domains[0].kind, DomainKind::Migrating);
    assert_eq!(domains[0].legacy_group.as_deref(), Some("legacy"));
    assert_eq!(domains[0].addresses, 0);
    assert_eq!(domains[1].kind, DomainKind::Relay);

    let removed = admin::remove_domain(&mut client, "xn--bcher-kva.example", false)
        .await
        .expect("remove");
    assert_eq!(removed, 0);
    assert_eq!(admin::list_domains(&client).await.expect("list").len(), 1);
}

#[tokio::test]
async fn domain_validation_errors() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;

    let error = admin::add_domain(&mut client, "example.com", DomainKind::Local, None)
        .await
        .expect_err("duplicate");
    assert!(
        matches!(error, AdminError::AlreadyExists { .. }),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "domain example.com already exists");

    let error = admin::add_domain(&mut client, "bad_domain!", DomainKind::Local, None)
        .await
        .expect_err("invalid name");
    assert!(
        error
            .to_string()
            .starts_with("invalid domain \"bad_domain!\""),
        "{error}"
    );

    let error = admin::add_domain(&mut client, "[192.0.2.1]", DomainKind::Local, None)
        .await
        .expect_err("literal");
    assert!(error.to_string().contains("address literals"), "{error}");

    let error = admin::add_domain(&mut client, "a.example", DomainKind::Local, Some("legacy"))
        .await
        .expect_err("group on local");
    assert!(
        error.to_string().contains("leave out --legacy-group"),
        "{error}"
    );

    let error = admin::add_domain(&mut client, "a.example", DomainKind::Relay, None)
        .await
        .expect_err("relay without group");
    assert!(matches!(error, AdminError::Missing { .. }), "{error:?}");
    assert!(error.to_string().contains("--legacy-group"), "{error}");

    let error = admin::add_domain(
        &mut client,
        "a.example",
        DomainKind::Relay,
        Some("no group"),
    )
    .await
    .expect_err("bad group name");
    assert!(
        error
            .to_string()
            .starts_with("invalid group name \"no group\""),
        "{error}"
    );

    let error = admin::set_domain(&mut client, "missing.example", DomainKind::Local, None)
        .await
        .expect_err("set missing");
    assert_eq!(error.to_string(), "domain missing.example not found");

    let error = admin::remove_domain(&mut client, "missing.example", true)
        .await
        .expect_err("remove missing");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn domain_with_addresses_resists_relay_and_removal() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect("add account");

    let error = admin::set_domain(
        &mut client,
        "example.com",
        DomainKind::Relay,
        Some("legacy"),
    )
    .await
    .expect_err("relay with addresses");
    assert!(matches!(error, AdminError::Conflict { .. }), "{error:?}");
    assert!(error.to_string().contains("1 address(es)"), "{error}");

    let error = admin::remove_domain(&mut client, "example.com", false)
        .await
        .expect_err("in use");
    assert!(
        matches!(error, AdminError::DomainInUse { addresses: 1, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("--force"), "{error}");

    let removed = admin::remove_domain(&mut client, "example.com", true)
        .await
        .expect("forced removal");
    assert_eq!(removed, 1);
    assert_eq!(count(&client, "SELECT count(*) FROM addresses").await, 0);
    // The account stays, without the address.
    let account = admin::show_account(&client, "alice")
        .await
        .expect("account kept");
    assert!(account.addresses.is_empty());
}

// --- Accounts ------------------------------------------------------------------

#[tokio::test]
async fn account_add_show_set_list_remove() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let version = directory_version(&client).await;

    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["Alice@Example.com".into(), "a@example.com".into()],
            mailbox: Some(Mailbox::Maildir("/var/mail/alice".into())),
            relay_group: None,
            forwards: vec!["Bob@Example.ORG".into()],
        },
    )
    .await
    .expect("add account");
    assert!(directory_version(&client).await > version);

    let account = admin::show_account(&client, "alice").await.expect("show");
    assert_eq!(account.name, "alice");
    assert_eq!(account.addresses, ["a@example.com", "alice@example.com"]);
    assert_eq!(
        account.mailbox,
        Some(Mailbox::Maildir("/var/mail/alice".into()))
    );
    assert_eq!(account.forwards, ["bob@example.org"]);
    assert_eq!(account.relay_group, None);
    assert_eq!(account.auto_reply, None);

    admin::set_account(
        &mut client,
        "alice",
        &AccountUpdate {
            mailbox: Some(Some(Mailbox::Lmtp("127.0.0.1:24".into()))),
            relay_group: Some(Some("legacy".into())),
        },
    )
    .await
    .expect("set");
    let account = admin::show_account(&client, "alice").await.expect("show");
    assert_eq!(account.mailbox, Some(Mailbox::Lmtp("127.0.0.1:24".into())));
    assert_eq!(account.relay_group.as_deref(), Some("legacy"));

    admin::set_account(
        &mut client,
        "alice",
        &AccountUpdate {
            mailbox: Some(None),
            relay_group: None,
        },
    )
    .await
    .expect("clear mailbox");
    let account = admin::show_account(&client, "alice").await.expect("show");
    assert_eq!(account.mailbox, None);
    assert_eq!(account.relay_group.as_deref(), Some("legacy"));

    admin::add_account(
        &mut client,
        &NewAccount {
            name: "bob".into(),
            ..NewAccount::default()
        },
    )
    .await
    .expect("add account without addresses");
    let accounts = admin::list_accounts(&client, None).await.expect("list");
    let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(accounts[0].forwards, 1);
    assert_eq!(accounts[0].addresses.len(), 2);
    let at_domain = admin::list_accounts(&client, Some("example.com"))
        .await
        .expect("list by domain");
    assert_eq!(at_domain.len(), 1);

    admin::remove_account(&mut client, "alice")
        .await
        .expect("remove");
    let error = admin::show_account(&client, "alice")
        .await
        .expect_err("gone");
    assert_eq!(error.to_string(), "account alice not found");
    assert_eq!(count(&client, "SELECT count(*) FROM addresses").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM forwards").await, 0);
}

#[tokio::test]
async fn account_validation_errors() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_domain(
        &mut client,
        "relay.example",
        DomainKind::Relay,
        Some("legacy"),
    )
    .await
    .expect("relay domain");
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect("add alice");

    let account = |name: &str, address: &str| NewAccount {
        name: name.into(),
        addresses: vec![address.into()],
        ..NewAccount::default()
    };

    let error = admin::add_account(&mut client, &account("alice", "other@example.com"))
        .await
        .expect_err("duplicate name");
    assert_eq!(error.to_string(), "account alice already exists");

    let error = admin::add_account(&mut client, &account("bob", "ALICE@example.com"))
        .await
        .expect_err("address taken");
    assert!(
        matches!(error, AdminError::AddressTaken { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "address alice@example.com already exists: it belongs to account alice"
    );

    let error = admin::add_account(&mut client, &account("bob", "bob@unknown.example"))
        .await
        .expect_err("unknown domain");
    assert!(
        matches!(error, AdminError::UnknownDomain { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("wsmtp accounts domain add unknown.example --kind local"),
        "{error}"
    );

    let error = admin::add_account(&mut client, &account("bob", "bob@relay.example"))
        .await
        .expect_err("relay domain");
    assert!(matches!(error, AdminError::RelayDomain { .. }), "{error:?}");
    assert!(error.to_string().contains("--kind migrating"), "{error}");

    for bad in [
        "bob%x@example.com",
        "bob!x@example.com",
        "\"bob@x\"@example.com",
    ] {
        let error = admin::add_account(&mut client, &account("bob", bad))
            .await
            .expect_err(bad);
        assert!(error.to_string().contains("'%' or '!'"), "{bad}: {error}");
    }

    let error = admin::add_account(&mut client, &account("bob", "bob"))
        .await
        .expect_err("no domain");
    assert!(
        error.to_string().starts_with("invalid address \"bob\""),
        "{error}"
    );

    let error = admin::add_account(&mut client, &account("bad name", "bob@example.com"))
        .await
        .expect_err("name with space");
    assert!(
        error.to_string().starts_with("invalid account name"),
        "{error}"
    );

    let error = admin::add_account(
        &mut client,
        &NewAccount {
            name: "bob".into(),
            mailbox: Some(Mailbox::Maildir("mail/bob".into())),
            ..NewAccount::default()
        },
    )
    .await
    .expect_err("relative maildir");
    assert!(
        error
            .to_string()
            .starts_with("invalid Maildir path \"mail/bob\""),
        "{error}"
    );

    let error = admin::add_account(
        &mut client,
        &NewAccount {
            name: "bob".into(),
            mailbox: Some(Mailbox::Lmtp("lmtp.example".into())),
            ..NewAccount::default()
        },
    )
    .await
    .expect_err("lmtp without port");
    assert!(error.to_string().contains("host:port"), "{error}");

    let error = admin::add_account(
        &mut client,
        &NewAccount {
            name: "bob".into(),
            addresses: vec!["bob@example.com".into()],
            forwards: vec!["bob@example.com".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect_err("forward to itself");
    assert!(matches!(error, AdminError::Conflict { .. }), "{error:?}");

    let error = admin::set_account(&mut client, "nobody", &AccountUpdate::default())
        .await
        .expect_err("set missing");
    assert_eq!(error.to_string(), "account nobody not found");

    let error = admin::remove_account(&mut client, "nobody")
        .await
        .expect_err("remove missing");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn account_add_is_atomic() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let version = directory_version(&client).await;

    // The second address is at a missing domain, so nothing may remain.
    let error = admin::add_account(
        &mut client,
        &NewAccount {
            name: "carol".into(),
            addresses: vec!["carol@example.com".into(), "carol@missing.example".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect_err("second address fails");
    assert!(
        matches!(error, AdminError::UnknownDomain { .. }),
        "{error:?}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM accounts").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM addresses").await, 0);
    assert_eq!(directory_version(&client).await, version);
}

// --- Addresses and forwards ----------------------------------------------------

#[tokio::test]
async fn address_add_remove_and_catch_all() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_domain(
        &mut client,
        "old.example",
        DomainKind::Migrating,
        Some("legacy"),
    )
    .await
    .expect("migrating domain");
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            ..NewAccount::default()
        },
    )
    .await
    .expect("account");
    let alice = OwnerRef::Account("alice".into());

    let address = admin::add_address(&mut client, &alice, "Alice@OLD.example")
        .await
        .expect("address at migrating domain");
    assert_eq!(address, "alice@old.example");
    let catch_all = admin::add_address(&mut client, &alice, "@Example.com")
        .await
        .expect("catch-all");
    assert_eq!(catch_all, "@example.com");
    let account = admin::show_account(&client, "alice").await.expect("show");
    assert_eq!(account.addresses, ["@example.com", "alice@old.example"]);

    let error = admin::add_address(&mut client, &alice, "@old.example")
        .await
        .expect_err("catch-all at migrating domain");
    assert!(matches!(error, AdminError::Conflict { .. }), "{error:?}");
    assert!(error.to_string().contains("--kind local"), "{error}");

    let error = admin::add_address(&mut client, &alice, "@example.com")
        .await
        .expect_err("duplicate catch-all");
    assert!(error.to_string().contains("already exists"), "{error}");

    let error = admin::add_address(
        &mut client,
        &OwnerRef::Account("nobody".into()),
        "n@example.com",
    )
    .await
    .expect_err("missing owner");
    assert_eq!(error.to_string(), "account nobody not found");

    let error = admin::add_address(
        &mut client,
        &OwnerRef::List("nolist".into()),
        "n@example.com",
    )
    .await
    .expect_err("missing list");
    assert_eq!(error.to_string(), "mailing list nolist not found");

    let owner = admin::remove_address(&mut client, "ALICE@old.example")
        .await
        .expect("remove");
    assert_eq!(owner, alice);
    let error = admin::remove_address(&mut client, "alice@old.example")
        .await
        .expect_err("removed twice");
    assert_eq!(error.to_string(), "address alice@old.example not found");
}

#[tokio::test]
async fn forward_add_remove_and_errors() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect("account");

    let target = admin::add_forward(&mut client, "alice", "Bob@Example.org")
        .await
        .expect("add forward");
    assert_eq!(target, "bob@example.org");

    let error = admin::add_forward(&mut client, "alice", "bob@example.org")
        .await
        .expect_err("duplicate");
    assert!(
        matches!(error, AdminError::AlreadyExists { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "forward from alice to bob@example.org already exists"
    );

    let error = admin::add_forward(&mut client, "alice", "alice@example.com")
        .await
        .expect_err("loop");
    assert!(error.to_string().contains("would loop"), "{error}");

    let error = admin::add_forward(&mut client, "alice", "@example.org")
        .await
        .expect_err("catch-all target");
    assert!(error.to_string().starts_with("invalid address"), "{error}");

    let error = admin::add_forward(&mut client, "nobody", "bob@example.org")
        .await
        .expect_err("missing account");
    assert_eq!(error.to_string(), "account nobody not found");

    // An address cannot be added when the account forwards to it.
    let error = admin::add_address(
        &mut client,
        &OwnerRef::Account("alice".into()),
        "bob@example.org",
    )
    .await
    .expect_err("domain example.org unknown");
    assert!(
        matches!(error, AdminError::UnknownDomain { .. }),
        "{error:?}"
    );
    admin::add_forward(&mut client, "alice", "second@example.com")
        .await
        .expect("forward to local address");
    let error = admin::add_address(
        &mut client,
        &OwnerRef::Account("alice".into()),
        "second@example.com",
    )
    .await
    .expect_err("address that is a forward target");
    assert!(error.to_string().contains("would loop"), "{error}");

    admin::remove_forward(&mut client, "alice", "BOB@example.org")
        .await
        .expect("remove");
    let error = admin::remove_forward(&mut client, "alice", "bob@example.org")
        .await
        .expect_err("removed twice");
    assert_eq!(
        error.to_string(),
        "forward from alice to bob@example.org not found"
    );
}

// --- Mailing lists -------------------------------------------------------------

#[tokio::test]
async fn list_add_members_owner_and_remove() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;

    admin::add_list(
        &mut client,
        &NewList {
            name: "staff".into(),
            owner: "Owner@Example.com".into(),
            addresses: vec!["staff@example.com".into()],
            members: vec!["alice@example.com".into(), "bob@example.org".into()],
        },
    )
    .await
    .expect("add list");
    let list = admin::show_list(&client, "staff").await.expect("show");
    assert_eq!(list.owner, "owner@example.com");
    assert_eq!(list.addresses, ["staff@example.com"]);
    assert_eq!(list.members, ["alice@example.com", "bob@example.org"]);

    let address = admin::add_address(
        &mut client,
        &OwnerRef::List("staff".into()),
        "team@example.com",
    )
    .await
    .expect("second list address");
    assert_eq!(address, "team@example.com");
    assert_eq!(
        admin::address_owner(&client, "team@example.com")
            .await
            .expect("owner"),
        Some(OwnerRef::List("staff".into()))
    );

    admin::add_member(&mut client, "staff", "Carol@Example.net")
        .await
        .expect("add member");
    let error = admin::add_member(&mut client, "staff", "carol@example.net")
        .await
        .expect_err("duplicate member");
    assert_eq!(
        error.to_string(),
        "member carol@example.net of staff already exists"
    );
    let error = admin::add_member(&mut client, "staff", "team@example.com")
        .await
        .expect_err("own address as member");
    assert!(error.to_string().contains("would loop"), "{error}");
    let error = admin::add_member(&mut client, "staff", "x%y@example.net")
        .await
        .expect_err("routing characters");
    assert!(error.to_string().starts_with("invalid member"), "{error}");

    admin::remove_member(&mut client, "staff", "bob@example.org")
        .await
        .expect("remove member");
    let error = admin::remove_member(&mut client, "staff", "bob@example.org")
        .await
        .expect_err("removed twice");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");

    let owner = admin::set_list_owner(&mut client, "staff", "boss@example.com")
        .await
        .expect("set owner");
    assert_eq!(owner, "boss@example.com");
    let error = admin::set_list_owner(&mut client, "staff", "boss")
        .await
        .expect_err("owner without domain");
    assert!(
        error.to_string().starts_with("invalid list owner \"boss\""),
        "{error}"
    );

    let lists = admin::list_lists(&client).await.expect("list lists");
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].members, 2);
    assert_eq!(
        lists[0].addresses,
        ["staff@example.com", "team@example.com"]
    );
    assert_eq!(lists[0].owner, "boss@example.com");

    let error = admin::add_list(
        &mut client,
        &NewList {
            name: "staff".into(),
            owner: "owner@example.com".into(),
            ..NewList::default()
        },
    )
    .await
    .expect_err("duplicate list");
    assert_eq!(error.to_string(), "mailing list staff already exists");

    admin::remove_list(&mut client, "staff")
        .await
        .expect("remove list");
    assert_eq!(count(&client, "SELECT count(*) FROM addresses").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM list_members").await, 0);
    let error = admin::show_list(&client, "staff").await.expect_err("gone");
    assert_eq!(error.to_string(), "mailing list staff not found");
}

// --- Auto-replies --------------------------------------------------------------

#[tokio::test]
async fn auto_reply_set_toggle_remove() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect("account");

    let from = time::macros::datetime!(2025-07-01 08:00 +02:00);
    let until = time::macros::datetime!(2025-07-15 00:00 UTC);
    let reply = AutoReply {
        kind: AutoReplyKind::EveryTime,
        subject: "Out of office".into(),
        body: "Back on the 15th.\n".into(),
        active_from: Some(from),
        active_until: Some(until),
        interval: Duration::from_secs(12 * 3600),
        enabled: true,
    };
    admin::set_auto_reply(&mut client, "alice", &reply)
        .await
        .expect("set");
    let stored = admin::show_account(&client, "alice")
        .await
        .expect("show")
        .auto_reply
        .expect("auto-reply stored");
    assert_eq!(stored, reply);

    // Setting again replaces every field.
    admin::set_auto_reply(&mut client, "alice", &vacation("Away", "Gone."))
        .await
        .expect("replace");
    let stored = admin::show_account(&client, "alice")
        .await
        .expect("show")
        .auto_reply
        .expect("auto-reply stored");
    assert_eq!(stored, vacation("Away", "Gone."));

    admin::set_auto_reply_enabled(&mut client, "alice", false)
        .await
        .expect("disable");
    let stored = admin::show_account(&client, "alice")
        .await
        .expect("show")
        .auto_reply
        .expect("auto-reply stored");
    assert!(!stored.enabled);
    assert_eq!(stored.subject, "Away");

    admin::remove_auto_reply(&mut client, "alice")
        .await
        .expect("remove");
    assert_eq!(
        admin::show_account(&client, "alice")
            .await
            .expect("show")
            .auto_reply,
        None
    );
    let error = admin::set_auto_reply_enabled(&mut client, "alice", true)
        .await
        .expect_err("nothing to enable");
    assert_eq!(error.to_string(), "auto-reply of account alice not found");
    let error = admin::remove_auto_reply(&mut client, "alice")
        .await
        .expect_err("removed twice");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn auto_reply_validation_errors() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            ..NewAccount::default()
        },
    )
    .await
    .expect("account");

    let error = admin::set_auto_reply(
        &mut client,
        "alice",
        &vacation("Away\r\nBcc: x@example.org", "Gone."),
    )
    .await
    .expect_err("subject with line break");
    assert!(error.to_string().starts_with("invalid subject"), "{error}");

    let error = admin::set_auto_reply(&mut client, "alice", &vacation("Away", "  \n"))
        .await
        .expect_err("empty body");
    assert!(error.to_string().contains("--body-file"), "{error}");

    let mut window = vacation("Away", "Gone.");
    window.active_from = Some(time::macros::datetime!(2025-07-15 00:00 UTC));
    window.active_until = Some(time::macros::datetime!(2025-07-01 00:00 UTC));
    let error = admin::set_auto_reply(&mut client, "alice", &window)
        .await
        .expect_err("window ends before it starts");
    assert!(
        error.to_string().contains("must end after it starts"),
        "{error}"
    );

    let mut zero = vacation("Away", "Gone.");
    zero.interval = Duration::from_millis(500);
    let error = admin::set_auto_reply(&mut client, "alice", &zero)
        .await
        .expect_err("interval under a second");
    assert!(error.to_string().starts_with("invalid interval"), "{error}");

    let error = admin::set_auto_reply(&mut client, "nobody", &vacation("Away", "Gone."))
        .await
        .expect_err("missing account");
    assert_eq!(error.to_string(), "account nobody not found");

    assert_eq!(count(&client, "SELECT count(*) FROM auto_replies").await, 0);
}

// --- Import --------------------------------------------------------------------

async fn import(
    client: &mut Client,
    format: Format,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    import::import_file(client, format, path, options).await
}

fn aliases_options() -> ImportOptions {
    ImportOptions {
        domain: Some("example.com".into()),
        ..ImportOptions::default()
    }
}

fn notices_containing(report: &ImportReport, text: &str) -> Vec<String> {
    report
        .notices
        .iter()
        .map(ToString::to_string)
        .filter(|notice| notice.contains(text))
        .collect()
}

#[tokio::test]
async fn import_virtual_creates_rows() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let path = fixture("virtual");

    let report = import(
        &mut client,
        Format::Virtual,
        &path,
        &ImportOptions::default(),
    )
    .await
    .expect("import");
    assert!(!report.dry_run);
    assert_eq!(report.entries, 9);

    // The declared virtual alias domain is created as local.
    let domains = admin::list_domains(&client).await.expect("domains");
    let net = domains
        .iter()
        .find(|d| d.name == "example.net")
        .expect("example.net created");
    assert_eq!(net.kind, DomainKind::Local);

    let info = admin::show_account(&client, "info@example.com")
        .await
        .expect("info");
    assert_eq!(info.addresses, ["info@example.com"]);
    assert_eq!(info.forwards, ["alice@example.org"]);
    assert_eq!(info.mailbox, None);

    let sales = admin::show_account(&client, "sales@example.com")
        .await
        .expect("sales");
    assert_eq!(
        sales.forwards,
        ["bob@example.org", "carol@example.org", "dave@example.org"]
    );

    let support = admin::show_account(&client, "support@example.net")
        .await
        .expect("support");
    assert_eq!(support.forwards, ["tier1@example.org", "tier2@example.org"]);

    let catch_all = admin::show_account(&client, "@example.net")
        .await
        .expect("catch-all");
    assert_eq!(catch_all.addresses, ["@example.net"]);
    assert_eq!(catch_all.forwards, ["catchall@example.org"]);

    // owner-staff makes staff a list owned by owner-staff.
    let staff = admin::show_list(&client, "staff@example.com")
        .await
        .expect("staff list");
    assert_eq!(staff.owner, "owner-staff@example.com");
    assert_eq!(staff.members, ["alice@example.org", "bob@example.org"]);
    let owner = admin::show_account(&client, "owner-staff@example.com")
        .await
        .expect("owner alias");
    assert_eq!(owner.forwards, ["alice@example.org"]);

    // The self-target is dropped with a note; the remote forward stays.
    let keep = admin::show_account(&client, "keep@example.com")
        .await
        .expect("keep");
    assert_eq!(keep.forwards, ["keep@elsewhere.example"]);
    let path_text = path.display().to_string();
    let notes = notices_containing(&report, "it is the key itself");
    assert_eq!(notes.len(), 1, "{:?}", report.notices);
    assert!(
        notes[0].starts_with(&format!("{path_text}:12: ")),
        "{}",
        notes[0]
    );

    // The domain rewrite cannot be stored.
    let notes = notices_containing(&report, "rewrites the domain");
    assert_eq!(notes.len(), 1, "{:?}", report.notices);
    assert!(
        notes[0].starts_with(&format!("{path_text}:27: ")),
        "{}",
        notes[0]
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM directory_domains WHERE name = 'old.example'"
        )
        .await,
        0
    );

    assert_eq!(count(&client, "SELECT count(*) FROM accounts").await, 6);
    assert_eq!(count(&client, "SELECT count(*) FROM lists").await, 1);
    assert_eq!(count(&client, "SELECT count(*) FROM addresses").await, 7);
}

#[tokio::test]
async fn import_virtual_twice_changes_nothing() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let path = fixture("virtual");

    let first = import(
        &mut client,
        Format::Virtual,
        &path,
        &ImportOptions::default(),
    )
    .await
    .expect("first import");
    assert!(!first.changes.is_empty());
    let version = directory_version(&client).await;

    let second = import(
        &mut client,
        Format::Virtual,
        &path,
        &ImportOptions::default(),
    )
    .await
    .expect("second import");
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    assert_eq!(directory_version(&client).await, version);
    assert_eq!(second.entries, first.entries);
}

#[tokio::test]
async fn import_aliases_with_include_and_skips() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let path = fixture("aliases");
    let include = fixture("lists/developers");

    let report = import(&mut client, Format::Aliases, &path, &aliases_options())
        .await
        .expect("import");
    assert_eq!(report.entries, 9);

    // Names are lowercased and qualified; local targets too.
    let daemon = admin::show_account(&client, "mailer-daemon@example.com")
        .await
        .expect("mailer-daemon");
    assert_eq!(daemon.forwards, ["postmaster@example.com"]);
    let root = admin::show_account(&client, "root@example.com")
        .await
        .expect("root");
    assert_eq!(root.forwards, ["admin@example.org"]);

    // Continuation lines and a quoted target.
    let team = admin::show_account(&client, "team@example.com")
        .await
        .expect("team");
    assert_eq!(
        team.forwards,
        ["alice@example.org", "bob@example.org", "carol@example.org"]
    );

    // The pipe is skipped, the address beside it imported.
    let bugs = admin::show_account(&client, "bugs@example.com")
        .await
        .expect("bugs");
    assert_eq!(bugs.forwards, ["triage@example.org"]);
    let path_text = path.display().to_string();
    let pipes = notices_containing(&report, "a pipe command cannot be stored");
    assert_eq!(pipes.len(), 2, "{:?}", report.notices);
    assert!(
        pipes
            .iter()
            .any(|n| n.starts_with(&format!("{path_text}:17: "))),
        "{pipes:?}"
    );
    let include_text = include.display().to_string();
    assert!(
        pipes
            .iter()
            .any(|n| n.starts_with(&format!("{include_text}:6: "))),
        "{pipes:?}"
    );

    // A key with only a file target is skipped as a whole.
    let files = notices_containing(&report, "a file cannot be stored");
    assert_eq!(files.len(), 1, "{:?}", report.notices);
    assert!(
        files[0].starts_with(&format!("{path_text}:18: ")),
        "{}",
        files[0]
    );
    let error = admin::show_account(&client, "archive@example.com")
        .await
        .expect_err("archive skipped");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");

    // The include makes a list; owner-developers is its owner.
    let developers = admin::show_list(&client, "developers@example.com")
        .await
        .expect("developers list");
    assert_eq!(developers.owner, "owner-developers@example.com");
    assert_eq!(
        developers.members,
        [
            "dana@example.org",
            "erin@example.org",
            "frank@example.org",
            "root@example.com"
        ]
    );
    let member_change = report
        .changes
        .iter()
        .find(|change| change.to_string().contains("member frank@example.org"))
        .expect("member change");
    assert_eq!(member_change.origin.file, include);
    assert_eq!(member_change.origin.line, 3);

    // Running it again changes nothing.
    let version = directory_version(&client).await;
    let second = import(&mut client, Format::Aliases, &path, &aliases_options())
        .await
        .expect("second import");
    assert!(second.changes.is_empty(), "{:?}", second.changes);
    assert_eq!(directory_version(&client).await, version);
}

#[tokio::test]
async fn import_dry_run_changes_nothing() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let version = directory_version(&client).await;

    let report = import(
        &mut client,
        Format::Virtual,
        &fixture("virtual"),
        &ImportOptions {
            dry_run: true,
            ..ImportOptions::default()
        },
    )
    .await
    .expect("dry run");
    assert!(report.dry_run);
    assert!(
        report
            .changes
            .iter()
            .any(|change| change.to_string().ends_with("add local domain example.net")),
        "{:?}",
        report.changes
    );
    assert!(report.changes.len() > 20, "{}", report.changes.len());
    assert_eq!(directory_version(&client).await, version);
    assert_eq!(count(&client, "SELECT count(*) FROM accounts").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM directory_domains").await,
        1
    );
}

#[tokio::test]
async fn import_malformed_lines_name_file_and_line() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("aliases");
    std::fs::write(
        &path,
        "good: a@example.org\nbroken a@example.org\nbad: x%y@example.org\nloop: :include:missing.list\n",
    )
    .expect("write aliases");

    let error = import(&mut client, Format::Aliases, &path, &aliases_options())
        .await
        .expect_err("malformed");
    let ImportError::Invalid { problems } = &error else {
        panic!("expected Invalid, got {error:?}");
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    let text = error.to_string();
    let file = path.display().to_string();
    assert!(text.contains("nothing was changed"), "{text}");
    assert!(
        text.contains(&format!("{file}:2: expected `name: target, …`")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{file}:3: invalid address \"x%y@example.org\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{file}:4: cannot read include file")),
        "{text}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test]
async fn import_reports_missing_and_relay_domains() {
    let (_db, mut client) = migrated_db().await;
    admin::add_domain(
        &mut client,
        "relay.example",
        DomainKind::Relay,
        Some("legacy"),
    )
    .await
    .expect("relay domain");
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("virtual");
    std::fs::write(
        &path,
        "a@missing.example x@example.org\nb@missing.example y@example.org\nc@relay.example z@example.org\n",
    )
    .expect("write virtual");

    let error = import(
        &mut client,
        Format::Virtual,
        &path,
        &ImportOptions::default(),
    )
    .await
    .expect_err("domains");
    let ImportError::Invalid { problems } = &error else {
        panic!("expected Invalid, got {error:?}");
    };
    // The missing domain is reported once, at its first key.
    assert_eq!(problems.len(), 2, "{problems:?}");
    let file = path.display().to_string();
    assert!(
        problems[0].to_string().starts_with(&format!(
            "{file}:1: domain missing.example is not in the directory"
        )),
        "{}",
        problems[0]
    );
    assert!(
        problems[1]
            .to_string()
            .starts_with(&format!("{file}:3: cannot add address c@relay.example")),
        "{}",
        problems[1]
    );
    assert_eq!(count(&client, "SELECT count(*) FROM accounts").await, 0);

    let error = import(
        &mut client,
        Format::Aliases,
        &fixture("aliases"),
        &ImportOptions::default(),
    )
    .await
    .expect_err("aliases without domain");
    assert!(matches!(error, ImportError::MissingDomain), "{error:?}");
}

#[tokio::test]
async fn import_merges_into_existing_account() {
    let (_db, mut client) = migrated_db().await;
    add_local_domain(&mut client, "example.com").await;
    admin::add_account(
        &mut client,
        &NewAccount {
            name: "alice".into(),
            addresses: vec!["alice@example.com".into()],
            mailbox: Some(Mailbox::Maildir("/var/mail/alice".into())),
            forwards: vec!["old@example.org".into()],
            ..NewAccount::default()
        },
    )
    .await
    .expect("existing account");
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("virtual");
    std::fs::write(
        &path,
        "alice@example.com alice@example.com, alice@elsewhere.example\nhelp@example.com nobody@example.com\n",
    )
    .expect("write virtual");

    let report = import(
        &mut client,
        Format::Virtual,
        &path,
        &ImportOptions::default(),
    )
    .await
    .expect("import");
    let alice = admin::show_account(&client, "alice").await.expect("alice");
    assert_eq!(
        alice.forwards,
        ["alice@elsewhere.example", "old@example.org"]
    );
    assert_eq!(
        alice.mailbox,
        Some(Mailbox::Maildir("/var/mail/alice".into()))
    );
    let error = admin::show_account(&client, "alice@example.com")
        .await
        .expect_err("no second account");
    assert!(matches!(error, AdminError::NotFound { .. }), "{error:?}");

    // alice has a mailbox, so her self-target needs no note; the extra
    // forward is kept and named.
    assert!(
        notices_containing(&report, "it is the key itself").is_empty(),
        "{:?}",
        report.notices
    );
    let kept = notices_containing(&report, "old@example.org");
    assert_eq!(kept.len(), 1, "{:?}", report.notices);
    assert!(kept[0].contains("kept"), "{}", kept[0]);

    // A target at a local domain that nothing in the directory covers.
    let unknown = notices_containing(&report, "nobody@example.com");
    assert_eq!(unknown.len(), 1, "{:?}", report.notices);
    assert!(unknown[0].contains("will be rejected"), "{}", unknown[0]);
}

// --- Command line --------------------------------------------------------------

fn wsmtp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wsmtp"));
    command.env_remove("DATABASE_URL").env_remove("RUST_LOG");
    command
}

struct Cli {
    config: PathBuf,
    _directory: tempfile::TempDir,
}

impl Cli {
    fn new(db: &TestDb) -> Cli {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = directory.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "listeners:\n  - address: 127.0.0.1:2525\nrelay:\n  local_domains: [seeded.example]\nqueue:\n  url: {}\n",
                db.url
            ),
        )
        .expect("write config");
        Cli {
            config,
            _directory: directory,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        wsmtp()
            .arg("accounts")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run wsmtp accounts")
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a command that must fail and returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_accounts_end_to_end() {
    let db = TestDb::reserve();
    let cli = Cli::new(&db);

    let output = cli.ok(&["domain", "add", "Example.com", "--kind", "local"]);
    assert_eq!(output.trim(), "added local domain example.com");

    let output = cli.ok(&[
        "add",
        "alice",
        "--address",
        "alice@example.com",
        "--address",
        "A@example.com",
        "--maildir",
        "/var/mail/alice",
        "--forward",
        "bob@example.org",
    ]);
    assert_eq!(output.trim(), "added account alice");

    let body_file = cli._directory.path().join("body.txt");
    std::fs::write(&body_file, "I am away.\nBack on Monday.\n").expect("write body");
    cli.ok(&[
        "autoreply",
        "set",
        "alice",
        "--subject",
        "Away",
        "--body-file",
        body_file.to_str().expect("UTF-8 path"),
        "--from",
        "2025-07-01T08:00:00+02:00",
        "--interval",
        "12h",
    ]);

    let show = cli.ok(&["show", "alice"]);
    let expected = [
        "account:     alice",
        "addresses:   a@example.com",
        "             alice@example.com",
        "mailbox:     maildir:/var/mail/alice",
        "relay group: -",
        "forwards:    bob@example.org",
        "password:    -",
        "auto-reply:  vacation, enabled, active now",
        "  window:    2025-07-01T06:00:00Z to -",
        "  interval:  12h",
        "  subject:   Away",
        "  body:",
        "    I am away.",
        "    Back on Monday.",
    ];
    assert_eq!(show.lines().collect::<Vec<_>>(), expected, "{show}");

    // show also takes an address.
    let by_address = cli.ok(&["show", "A@Example.com"]);
    assert!(
        by_address.starts_with("account:     alice\n"),
        "{by_address}"
    );

    let list = cli.ok(&["list"]);
    assert!(list.contains("alice"), "{list}");
    assert!(list.contains("a@example.com, alice@example.com"), "{list}");
    assert!(list.trim_end().ends_with("1 account(s)"), "{list}");

    cli.ok(&[
        "mailing-list",
        "add",
        "staff",
        "--owner",
        "owner@example.com",
        "--address",
        "staff@example.com",
    ]);
    let output = cli.ok(&[
        "member",
        "add",
        "staff",
        "alice@example.com",
        "carol@example.org",
    ]);
    assert_eq!(output.lines().count(), 2, "{output}");
    let staff = cli.ok(&["ml", "show", "staff"]);
    assert!(staff.contains("owner:       owner@example.com"), "{staff}");
    assert!(
        staff.contains("members:     alice@example.com\n             carol@example.org"),
        "{staff}"
    );
    let by_address = cli.ok(&["show", "staff@example.com"]);
    assert!(
        by_address.starts_with("list:        staff\n"),
        "{by_address}"
    );

    // Errors go to stderr with a non-zero status and change nothing: the
    // first forward is valid, the second one is not.
    let error = cli.fails(&[
        "forward",
        "add",
        "alice",
        "carol@example.org",
        "x%y@example.org",
    ]);
    assert!(
        error.contains("invalid address \"x%y@example.org\""),
        "{error}"
    );
    let show = cli.ok(&["show", "alice"]);
    assert!(!show.contains("carol@example.org"), "{show}");

    let error = cli.fails(&["address", "add", "alice", "alice@unknown.example"]);
    assert!(
        error.contains("domain unknown.example is not in the directory; add it first with `wsmtp accounts domain add unknown.example --kind local`"),
        "{error}"
    );
    // Migration logs at info level stay out of the administrative output.
    assert!(!error.contains("INFO"), "{error}");

    let error = cli.fails(&["add", "bob", "--address", "alice@example.com"]);
    assert!(
        error.contains("already exists: it belongs to account alice"),
        "{error}"
    );

    let error = cli.fails(&[
        "autoreply",
        "set",
        "alice",
        "--subject",
        "x",
        "--body",
        "y",
        "--interval",
        "soon",
    ]);
    assert!(error.contains("invalid interval \"soon\""), "{error}");

    let output = cli.ok(&["remove", "alice"]);
    assert_eq!(output.trim(), "removed account alice");
    let error = cli.fails(&["show", "alice"]);
    assert!(error.contains("account alice not found"), "{error}");

    drop(cli);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_imports_aliases_with_dry_run() {
    let db = TestDb::reserve();
    let cli = Cli::new(&db);
    cli.ok(&["domain", "add", "example.com", "--kind", "local"]);
    let aliases = fixture("aliases");
    let aliases = aliases.to_str().expect("UTF-8 path");

    let dry = cli.ok(&[
        "import",
        "aliases",
        aliases,
        "--domain",
        "example.com",
        "--dry-run",
    ]);
    assert!(
        dry.contains(
            "add mailing list developers@example.com with owner owner-developers@example.com"
        ),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("note: {aliases}:17: skipped target")),
        "{dry}"
    );
    assert!(dry.trim_end().ends_with("nothing was changed"), "{dry}");
    let list = cli.ok(&["list"]);
    assert!(list.trim_end().ends_with("0 account(s)"), "{list}");

    let real = cli.ok(&["import", "aliases", aliases, "--domain", "example.com"]);
    assert!(
        real.trim_end().ends_with("29 change(s) made, 4 note(s)"),
        "{real}"
    );
    let again = cli.ok(&["import", "aliases", aliases, "--domain", "example.com"]);
    assert!(
        again.trim_end().ends_with("0 change(s) made, 4 note(s)"),
        "{again}"
    );

    let error = cli.fails(&["import", "aliases", aliases]);
    assert!(error.contains("--domain"), "{error}");

    drop(cli);
    db.drop_database().await;
}

#[test]
fn cli_help_describes_options() {
    let output = wsmtp()
        .args(["accounts", "autoreply", "set", "--help"])
        .output()
        .expect("run help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--kind",
        "--subject",
        "--body-file",
        "--from",
        "--until",
        "--interval",
        "RFC 3339",
        "s, m, h, d or w",
    ] {
        assert!(help.contains(expected), "missing {expected:?} in:\n{help}");
    }
}
