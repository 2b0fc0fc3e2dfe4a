//! Builds directory entries with plain SQL, for tests that need accounts and
//! lists, and waits until a server's snapshot has caught up.
#![allow(dead_code)]

use std::time::Duration;

use tokio_postgres::GenericClient;

pub async fn add_domain(client: &impl GenericClient, name: &str, kind: &str, group: Option<&str>) {
    client
        .execute(
            "INSERT INTO directory_domains (name, kind, legacy_group) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, legacy_group = EXCLUDED.legacy_group",
            &[&name, &kind, &group],
        )
        .await
        .expect("add domain");
}

/// Adds an account with addresses (their domains must exist), an optional
/// Maildir, and forwards. Returns its id.
pub async fn add_account(
    client: &impl GenericClient,
    name: &str,
    addresses: &[&str],
    maildir: Option<&str>,
    forwards: &[&str],
) -> i64 {
    let kind = maildir.map(|_| "maildir");
    let id: i64 = client
        .query_one(
            "INSERT INTO accounts (name, mailbox_kind, mailbox_target) VALUES ($1, $2, $3) RETURNING id",
            &[&name, &kind, &maildir],
        )
        .await
        .expect("add account")
        .get(0);
    for address in addresses {
        let domain = address
            .rsplit_once('@')
            .map(|(_, d)| d)
            .expect("address has a domain");
        client
            .execute(
                "INSERT INTO addresses (address, domain, account_id) VALUES ($1, $2, $3)",
                &[address, &domain, &id],
            )
            .await
            .expect("add address");
    }
    for target in forwards {
        client
            .execute(
                "INSERT INTO forwards (account_id, target) VALUES ($1, $2)",
                &[&id, target],
            )
            .await
            .expect("add forward");
    }
    id
}

pub async fn add_list(
    client: &impl GenericClient,
    name: &str,
    address: &str,
    owner: &str,
    members: &[String],
) -> i64 {
    let id: i64 = client
        .query_one(
            "INSERT INTO lists (name, owner) VALUES ($1, $2) RETURNING id",
            &[&name, &owner],
        )
        .await
        .expect("add list")
        .get(0);
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d)
        .expect("address has a domain");
    client
        .execute(
            "INSERT INTO addresses (address, domain, list_id) VALUES ($1, $2, $3)",
            &[&address, &domain, &id],
        )
        .await
        .expect("add list address");
    client
        .execute(
            "INSERT INTO list_members (list_id, member) SELECT $1, unnest($2::text[])",
            &[&id, &members],
        )
        .await
        .expect("add members");
    id
}

pub async fn add_vacation(client: &impl GenericClient, account_id: i64, interval_seconds: i64) {
    client
        .execute(
            "INSERT INTO auto_replies (account_id, kind, subject, body, interval_seconds)
             VALUES ($1, 'vacation', 'Out of office', 'I am away until Monday.', $2)",
            &[&account_id, &interval_seconds],
        )
        .await
        .expect("add vacation");
}

/// Waits until `directory` has loaded the database's current version.
pub async fn wait_until_current(
    client: &impl GenericClient,
    directory: &wsmtp::directory::Directory,
) {
    let version: i64 = client
        .query_one("SELECT version FROM directory_version", &[])
        .await
        .expect("directory version")
        .get(0);
    for _ in 0..400 {
        if directory.version().is_some_and(|v| v >= version) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the directory did not reach version {version} within 10 s");
}
