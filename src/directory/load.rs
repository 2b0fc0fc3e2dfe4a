//! Reads the whole directory from PostgreSQL into a [`Snapshot`], inside one
//! repeatable-read transaction so the copy is consistent.

use std::collections::HashMap;
use std::pin::pin;

use futures_util::TryStreamExt;
use tokio_postgres::Client;

use super::{
    Account, AutoReply, AutoReplyKind, DomainEntry, DomainKind, List, Mailbox, Owner, Snapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the directory failed: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("invalid directory data: {0}")]
    Invalid(String),
}

/// Loads a snapshot. Takes `&mut Client` because it runs a transaction.
pub async fn load_snapshot(client: &mut Client) -> Result<Snapshot, LoadError> {
    let transaction = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut snapshot = Snapshot {
        version: transaction
            .query_one("SELECT version FROM directory_version WHERE id = 1", &[])
            .await?
            .get(0),
        ..Snapshot::default()
    };

    for row in transaction
        .query(
            "SELECT name, kind, legacy_group FROM directory_domains",
            &[],
        )
        .await?
    {
        let kind: String = row.get(1);
        let kind = DomainKind::parse(&kind)
            .ok_or_else(|| LoadError::Invalid(format!("domain kind {kind:?}")))?;
        snapshot.domains.insert(
            row.get(0),
            DomainEntry {
                kind,
                legacy_group: row.get(2),
            },
        );
    }

    let mut account_index = HashMap::new();
    let accounts = transaction
        .query(
            "SELECT id, name, mailbox_kind, mailbox_target, relay_group, password_hash
               FROM accounts ORDER BY id",
            &[],
        )
        .await?;
    for row in accounts {
        let id: i64 = row.get(0);
        let mailbox = match (
            row.get::<_, Option<String>>(2).as_deref(),
            row.get::<_, Option<String>>(3),
        ) {
            (Some("maildir"), Some(path)) => Some(Mailbox::Maildir(path)),
            (Some("lmtp"), Some(target)) => Some(Mailbox::Lmtp(target)),
            _ => None,
        };
        let name: String = row.get(1);
        account_index.insert(id, snapshot.accounts.len());
        snapshot
            .account_names
            .insert(name.clone(), snapshot.accounts.len() as u32);
        snapshot.accounts.push(Account {
            id,
            name,
            addresses: Vec::new(),
            mailbox,
            forwards: Vec::new(),
            relay_group: row.get(4),
            auto_reply: None,
            password_hash: row.get(5),
        });
    }

    for row in transaction
        .query(
            "SELECT account_id, target FROM forwards ORDER BY account_id, target",
            &[],
        )
        .await?
    {
        if let Some(index) = account_index.get(&row.get::<_, i64>(0)) {
            snapshot.accounts[*index].forwards.push(row.get(1));
        }
    }

    let replies = transaction
        .query(
            "SELECT account_id, kind, subject, body, active_from, active_until, interval_seconds, enabled
               FROM auto_replies",
            &[],
        )
        .await?;
    for row in replies {
        let Some(index) = account_index.get(&row.get::<_, i64>(0)) else {
            continue;
        };
        let kind: String = row.get(1);
        let kind = AutoReplyKind::parse(&kind)
            .ok_or_else(|| LoadError::Invalid(format!("auto-reply kind {kind:?}")))?;
        let seconds: i64 = row.get(6);
        snapshot.accounts[*index].auto_reply = Some(AutoReply {
            kind,
            subject: row.get(2),
            body: row.get(3),
            active_from: row.get(4),
            active_until: row.get(5),
            interval: std::time::Duration::from_secs(seconds.max(1) as u64),
            enabled: row.get(7),
        });
    }

    let mut list_index = HashMap::new();
    for row in transaction
        .query("SELECT id, name, owner FROM lists ORDER BY id", &[])
        .await?
    {
        let id: i64 = row.get(0);
        list_index.insert(id, snapshot.lists.len());
        snapshot.lists.push(List {
            id,
            name: row.get(1),
            addresses: Vec::new(),
            owner: row.get(2),
            members: Vec::new(),
        });
    }
    for row in transaction
        .query(
            "SELECT list_id, member FROM list_members ORDER BY list_id, member",
            &[],
        )
        .await?
    {
        if let Some(index) = list_index.get(&row.get::<_, i64>(0)) {
            snapshot.lists[*index].members.push(row.get(1));
        }
    }

    // Addresses can number millions: stream them rather than collect rows.
    let rows = transaction
        .query_raw(
            "SELECT address, account_id, list_id FROM addresses ORDER BY address",
            std::iter::empty::<i64>(),
        )
        .await?;
    let mut rows = pin!(rows);
    while let Some(row) = rows.try_next().await? {
        let address: String = row.get(0);
        let owner = match (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)) {
            (Some(account), _) => account_index.get(&account).map(|i| {
                snapshot.accounts[*i].addresses.push(address.clone());
                Owner::Account(*i as u32)
            }),
            (None, Some(list)) => list_index.get(&list).map(|i| {
                snapshot.lists[*i].addresses.push(address.clone());
                Owner::List(*i as u32)
            }),
            (None, None) => None,
        };
        if let Some(owner) = owner {
            snapshot.addresses.insert(address, owner);
        }
    }

    transaction.commit().await?;
    Ok(snapshot)
}
