//! Administration of the directory tables: domains, accounts, their
//! addresses, forwards and auto-replies, and mailing lists with their
//! members. `wsmtp accounts …` and the alias-file import call these functions.
//!
//! Interface: every function that changes the directory takes
//! `&mut C` where `C: GenericClient` (a `Client` or a `Transaction`), opens a
//! transaction on it (a savepoint when `C` is already a transaction) and
//! commits only when every check and statement succeeded. A command therefore
//! changes all of its rows or none. Functions that only read take `&C`.
//!
//! Input: every text value is checked by [`validate`] before use. Addresses
//! are normalised to a lowercase local part and an A-label domain, and an
//! address (including a catch-all `@domain`) may only be added at a domain in
//! `directory_domains` of kind local or migrating. Forward targets, list
//! owners and list members may be at any domain.
//!
//! Errors: [`AdminError`], whose message names the rejected value and states
//! what is expected or what to run first. A unique violation (SQLSTATE 23505)
//! that a concurrent change causes after the checks becomes
//! [`AdminError::AlreadyExists`].
//!
//! Passwords: [`set_password_hash`] stores a hash made by
//! [`crate::auth::password::hash_password`]; the clear password never reaches
//! this module.
//!
//! Known gaps: removing a domain removes its addresses but keeps the accounts
//! and lists that owned them.

pub mod validate;

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Transaction};

use super::{Account, AutoReply, AutoReplyKind, DomainKind, List, Mailbox};

/// Reasons why a directory command is rejected or fails.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },

    #[error("missing {what}: {reason}")]
    Missing { what: &'static str, reason: String },

    #[error(
        "domain {domain} is not in the directory; add it first with `wsmtp accounts domain add {domain} --kind local`"
    )]
    UnknownDomain { domain: String },

    #[error(
        "cannot add address {address}: domain {domain} is a relay domain, so every address there passes through to group {group}; make it migrating first with `wsmtp accounts domain set {domain} --kind migrating --legacy-group {group}`"
    )]
    RelayDomain {
        address: String,
        domain: String,
        group: String,
    },

    #[error("{what} {value} already exists")]
    AlreadyExists { what: &'static str, value: String },

    #[error("address {address} already exists: it belongs to {owner}")]
    AddressTaken { address: String, owner: OwnerRef },

    #[error("{what} {value} not found")]
    NotFound { what: &'static str, value: String },

    #[error(
        "domain {domain} still has {addresses} address(es); remove them first, or pass --force to remove the domain with them"
    )]
    DomainInUse { domain: String, addresses: i64 },

    #[error("{message}")]
    Conflict { message: String },

    #[error("database error: {}", describe_database_error(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// Renders a driver error with the server's message, which the driver's
/// `Display` leaves out.
pub fn describe_database_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Maps a unique violation to [`AdminError::AlreadyExists`], and any other
/// error to [`AdminError::Database`].
fn unique_to_exists(error: tokio_postgres::Error, what: &'static str, value: &str) -> AdminError {
    if error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        AdminError::AlreadyExists {
            what,
            value: value.to_owned(),
        }
    } else {
        AdminError::Database(error)
    }
}

fn not_found(what: &'static str, value: &str) -> AdminError {
    AdminError::NotFound {
        what,
        value: value.to_owned(),
    }
}

/// The account or list that an address belongs to, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerRef {
    Account(String),
    List(String),
}

impl fmt::Display for OwnerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnerRef::Account(name) => write!(f, "account {name}"),
            OwnerRef::List(name) => write!(f, "mailing list {name}"),
        }
    }
}

// --- Domains -----------------------------------------------------------------

/// A row of `directory_domains` with the number of addresses at the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSummary {
    pub name: String,
    pub kind: DomainKind,
    pub legacy_group: Option<String>,
    pub addresses: i64,
}

/// Checks that the legacy group is given exactly for relay and migrating
/// domains, as the `directory_domains_group` constraint requires.
fn domain_group(
    kind: DomainKind,
    legacy_group: Option<&str>,
) -> Result<Option<String>, AdminError> {
    match (kind, legacy_group) {
        (DomainKind::Local, None) => Ok(None),
        (DomainKind::Local, Some(group)) => Err(AdminError::Invalid {
            what: "legacy group",
            value: group.to_owned(),
            reason: "a local domain has no legacy group; leave out --legacy-group".to_owned(),
        }),
        (_, Some(group)) => Ok(Some(validate::group_name(group)?)),
        (kind, None) => Err(AdminError::Missing {
            what: "legacy group",
            reason: format!(
                "a {} domain needs --legacy-group, the downstream group that receives mail for addresses not in the directory",
                kind.as_str()
            ),
        }),
    }
}

/// Adds a domain and returns its normalised name.
///
/// # Errors
///
/// [`AdminError::Invalid`] for a bad name or group, and
/// [`AdminError::AlreadyExists`] when the domain is present.
pub async fn add_domain<C: GenericClient>(
    client: &mut C,
    name: &str,
    kind: DomainKind,
    legacy_group: Option<&str>,
) -> Result<String, AdminError> {
    let name = validate::domain_name(name)?;
    let group = domain_group(kind, legacy_group)?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "INSERT INTO directory_domains (name, kind, legacy_group) VALUES ($1, $2, $3)",
            &[&name, &kind.as_str(), &group],
        )
        .await
        .map_err(|error| unique_to_exists(error, "domain", &name))?;
    transaction.commit().await?;
    Ok(name)
}

/// Changes the kind and legacy group of a domain, for example from migrating
/// to local when the legacy server is retired.
///
/// # Errors
///
/// [`AdminError::NotFound`], and [`AdminError::Conflict`] when a domain that
/// has addresses would become a relay domain, where they would never be used.
pub async fn set_domain<C: GenericClient>(
    client: &mut C,
    name: &str,
    kind: DomainKind,
    legacy_group: Option<&str>,
) -> Result<(), AdminError> {
    let name = validate::domain_name(name)?;
    let group = domain_group(kind, legacy_group)?;
    let transaction = client.transaction().await?;
    let addresses = count_domain_addresses(&transaction, &name).await?;
    if kind == DomainKind::Relay && addresses > 0 {
        return Err(AdminError::Conflict {
            message: format!(
                "domain {name} has {addresses} address(es), which a relay domain would ignore; remove them first or use --kind migrating"
            ),
        });
    }
    let updated = transaction
        .execute(
            "UPDATE directory_domains SET kind = $2, legacy_group = $3 WHERE name = $1",
            &[&name, &kind.as_str(), &group],
        )
        .await?;
    if updated == 0 {
        return Err(not_found("domain", &name));
    }
    transaction.commit().await?;
    Ok(())
}

/// Removes a domain and returns the number of its addresses removed with it.
///
/// # Errors
///
/// [`AdminError::NotFound`], and [`AdminError::DomainInUse`] when the domain
/// has addresses and `force` is false.
pub async fn remove_domain<C: GenericClient>(
    client: &mut C,
    name: &str,
    force: bool,
) -> Result<i64, AdminError> {
    let name = validate::domain_name(name)?;
    let transaction = client.transaction().await?;
    let addresses = count_domain_addresses(&transaction, &name).await?;
    if addresses > 0 && !force {
        return Err(AdminError::DomainInUse {
            domain: name,
            addresses,
        });
    }
    // Addresses go with the domain through ON DELETE CASCADE.
    let deleted = transaction
        .execute("DELETE FROM directory_domains WHERE name = $1", &[&name])
        .await?;
    if deleted == 0 {
        return Err(not_found("domain", &name));
    }
    transaction.commit().await?;
    Ok(addresses)
}

async fn count_domain_addresses(
    transaction: &Transaction<'_>,
    domain: &str,
) -> Result<i64, AdminError> {
    Ok(transaction
        .query_one(
            "SELECT count(*) FROM addresses WHERE domain = $1",
            &[&domain],
        )
        .await?
        .get(0))
}

/// Lists every domain, sorted by name.
pub async fn list_domains<C: GenericClient>(client: &C) -> Result<Vec<DomainSummary>, AdminError> {
    let rows = client
        .query(
            "SELECT d.name, d.kind, d.legacy_group,
                    (SELECT count(*) FROM addresses a WHERE a.domain = d.name)
               FROM directory_domains d ORDER BY d.name",
            &[],
        )
        .await?;
    rows.into_iter()
        .map(|row| {
            let kind: String = row.get(1);
            Ok(DomainSummary {
                name: row.get(0),
                kind: parse_domain_kind(&kind)?,
                legacy_group: row.get(2),
                addresses: row.get(3),
            })
        })
        .collect()
}

fn parse_domain_kind(text: &str) -> Result<DomainKind, AdminError> {
    DomainKind::parse(text).ok_or_else(|| AdminError::Conflict {
        message: format!(
            "invalid domain kind {text:?} stored in directory_domains; expected local, relay or migrating"
        ),
    })
}

/// Looks up a domain's kind and legacy group.
pub async fn domain_kind<C: GenericClient>(
    client: &C,
    domain: &str,
) -> Result<Option<(DomainKind, Option<String>)>, AdminError> {
    let row = client
        .query_opt(
            "SELECT kind, legacy_group FROM directory_domains WHERE name = $1",
            &[&domain],
        )
        .await?;
    match row {
        Some(row) => {
            let kind: String = row.get(0);
            Ok(Some((parse_domain_kind(&kind)?, row.get(1))))
        }
        None => Ok(None),
    }
}

// --- Addresses -----------------------------------------------------------------

/// Checks that `address` may be added: its domain is local or migrating, a
/// catch-all is not at a migrating domain, and no one owns the address yet.
async fn check_new_address<C: GenericClient>(
    client: &C,
    address: &str,
    domain: &str,
) -> Result<(), AdminError> {
    match domain_kind(client, domain).await? {
        None => {
            return Err(AdminError::UnknownDomain {
                domain: domain.to_owned(),
            });
        }
        Some((DomainKind::Relay, group)) => {
            return Err(AdminError::RelayDomain {
                address: address.to_owned(),
                domain: domain.to_owned(),
                group: group.unwrap_or_default(),
            });
        }
        Some((DomainKind::Migrating, _)) if address.starts_with('@') => {
            return Err(AdminError::Conflict {
                message: format!(
                    "cannot add catch-all {address}: domain {domain} is migrating, and a catch-all would keep every address from the legacy group; make the domain local first with `wsmtp accounts domain set {domain} --kind local`"
                ),
            });
        }
        Some(_) => {}
    }
    if let Some(owner) = address_owner(client, address).await? {
        return Err(AdminError::AddressTaken {
            address: address.to_owned(),
            owner,
        });
    }
    Ok(())
}

/// Returns the account or list that owns a normalised address.
pub async fn address_owner<C: GenericClient>(
    client: &C,
    address: &str,
) -> Result<Option<OwnerRef>, AdminError> {
    let row = client
        .query_opt(
            "SELECT ac.name, l.name FROM addresses a
               LEFT JOIN accounts ac ON ac.id = a.account_id
               LEFT JOIN lists l ON l.id = a.list_id
              WHERE a.address = $1",
            &[&address],
        )
        .await?;
    Ok(row.and_then(|row| {
        match (
            row.get::<_, Option<String>>(0),
            row.get::<_, Option<String>>(1),
        ) {
            (Some(account), _) => Some(OwnerRef::Account(account)),
            (None, Some(list)) => Some(OwnerRef::List(list)),
            (None, None) => None,
        }
    }))
}

/// Inserts a checked, normalised address for an account or list id.
async fn insert_address(
    transaction: &Transaction<'_>,
    address: &str,
    domain: &str,
    owner: OwnerId,
) -> Result<(), AdminError> {
    let (account_id, list_id) = match owner {
        OwnerId::Account(id) => (Some(id), None),
        OwnerId::List(id) => (None, Some(id)),
    };
    transaction
        .execute(
            "INSERT INTO addresses (address, domain, account_id, list_id) VALUES ($1, $2, $3, $4)",
            &[&address, &domain, &account_id, &list_id],
        )
        .await
        .map_err(|error| unique_to_exists(error, "address", address))?;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum OwnerId {
    Account(i64),
    List(i64),
}

async fn account_id(transaction: &Transaction<'_>, name: &str) -> Result<i64, AdminError> {
    transaction
        .query_opt("SELECT id FROM accounts WHERE name = $1", &[&name])
        .await?
        .map(|row| row.get(0))
        .ok_or_else(|| not_found("account", name))
}

async fn list_id(transaction: &Transaction<'_>, name: &str) -> Result<i64, AdminError> {
    transaction
        .query_opt("SELECT id FROM lists WHERE name = $1", &[&name])
        .await?
        .map(|row| row.get(0))
        .ok_or_else(|| not_found("mailing list", name))
}

/// Adds an address (or a catch-all `@domain`) to an account or a list and
/// returns it normalised.
///
/// # Errors
///
/// [`AdminError::Invalid`], [`AdminError::UnknownDomain`],
/// [`AdminError::RelayDomain`], [`AdminError::AddressTaken`],
/// [`AdminError::NotFound`] for the owner, and [`AdminError::Conflict`] when
/// the owner already sends mail to that address (a loop).
pub async fn add_address<C: GenericClient>(
    client: &mut C,
    owner: &OwnerRef,
    address: &str,
) -> Result<String, AdminError> {
    let (address, domain) = validate::address_or_catch_all(address)?;
    let transaction = client.transaction().await?;
    let owner_id = match owner {
        OwnerRef::Account(name) => OwnerId::Account(account_id(&transaction, name).await?),
        OwnerRef::List(name) => OwnerId::List(list_id(&transaction, name).await?),
    };
    check_new_address(&transaction, &address, &domain).await?;
    check_no_loop(&transaction, owner_id, owner, &address).await?;
    insert_address(&transaction, &address, &domain, owner_id).await?;
    transaction.commit().await?;
    Ok(address)
}

/// Rejects an address that its owner already forwards to or has as member.
async fn check_no_loop(
    transaction: &Transaction<'_>,
    owner_id: OwnerId,
    owner: &OwnerRef,
    address: &str,
) -> Result<(), AdminError> {
    let looping = match owner_id {
        OwnerId::Account(id) => transaction
            .query_opt(
                "SELECT 1 FROM forwards WHERE account_id = $1 AND target = $2",
                &[&id, &address],
            )
            .await?
            .is_some(),
        OwnerId::List(id) => transaction
            .query_opt(
                "SELECT 1 FROM list_members WHERE list_id = $1 AND member = $2",
                &[&id, &address],
            )
            .await?
            .is_some(),
    };
    if looping {
        return Err(AdminError::Conflict {
            message: format!(
                "{owner} already sends mail to {address}; adding it as an address would loop, so remove that forward or member first"
            ),
        });
    }
    Ok(())
}

/// Removes an address from whichever account or list owns it, and returns
/// that owner.
///
/// # Errors
///
/// [`AdminError::Invalid`] and [`AdminError::NotFound`].
pub async fn remove_address<C: GenericClient>(
    client: &mut C,
    address: &str,
) -> Result<OwnerRef, AdminError> {
    let (address, _) = validate::address_or_catch_all(address)?;
    let transaction = client.transaction().await?;
    let owner = address_owner(&transaction, &address)
        .await?
        .ok_or_else(|| not_found("address", &address))?;
    transaction
        .execute("DELETE FROM addresses WHERE address = $1", &[&address])
        .await?;
    transaction.commit().await?;
    Ok(owner)
}

// --- Accounts ------------------------------------------------------------------

/// A new account. Values are checked and normalised by [`add_account`].
#[derive(Clone, Debug, Default)]
pub struct NewAccount {
    pub name: String,
    pub addresses: Vec<String>,
    pub mailbox: Option<Mailbox>,
    pub relay_group: Option<String>,
    pub forwards: Vec<String>,
}

/// Changes to an account: `None` keeps a field, `Some(None)` clears it.
#[derive(Clone, Debug, Default)]
pub struct AccountUpdate {
    pub mailbox: Option<Option<Mailbox>>,
    pub relay_group: Option<Option<String>>,
}

/// One line of the account list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountSummary {
    pub name: String,
    pub addresses: Vec<String>,
    pub mailbox: Option<Mailbox>,
    pub relay_group: Option<String>,
    pub forwards: i64,
    /// Kind of the auto-reply and whether it is enabled.
    pub auto_reply: Option<(AutoReplyKind, bool)>,
}

fn mailbox_columns(mailbox: Option<&Mailbox>) -> (Option<&'static str>, Option<&str>) {
    match mailbox {
        Some(Mailbox::Maildir(path)) => (Some("maildir"), Some(path.as_str())),
        Some(Mailbox::Lmtp(target)) => (Some("lmtp"), Some(target.as_str())),
        None => (None, None),
    }
}

fn mailbox_from_columns(kind: Option<String>, target: Option<String>) -> Option<Mailbox> {
    match (kind.as_deref(), target) {
        (Some("maildir"), Some(path)) => Some(Mailbox::Maildir(path)),
        (Some("lmtp"), Some(target)) => Some(Mailbox::Lmtp(target)),
        _ => None,
    }
}

/// Creates an account with its addresses, mailbox, relay group and forwards.
///
/// # Errors
///
/// Any check of [`add_address`] and [`add_forward`], and
/// [`AdminError::AlreadyExists`] when the name is taken.
pub async fn add_account<C: GenericClient>(
    client: &mut C,
    account: &NewAccount,
) -> Result<(), AdminError> {
    let name = validate::object_name("account name", &account.name)?;
    let mailbox = account
        .mailbox
        .as_ref()
        .map(validate::mailbox)
        .transpose()?;
    let relay_group = account
        .relay_group
        .as_deref()
        .map(validate::group_name)
        .transpose()?;
    let addresses = account
        .addresses
        .iter()
        .map(|address| validate::address_or_catch_all(address))
        .collect::<Result<Vec<_>, _>>()?;
    let forwards = account
        .forwards
        .iter()
        .map(|target| validate::address(target).map(|(target, _)| target))
        .collect::<Result<Vec<_>, _>>()?;
    reject_duplicates("address", addresses.iter().map(|(address, _)| address))?;
    reject_duplicates("forward target", forwards.iter())?;
    if let Some(target) = forwards
        .iter()
        .find(|target| addresses.iter().any(|(address, _)| address == *target))
    {
        return Err(AdminError::Conflict {
            message: format!(
                "forward target {target} is also an address of account {name}; mail would loop"
            ),
        });
    }

    let transaction = client.transaction().await?;
    let (mailbox_kind, mailbox_target) = mailbox_columns(mailbox.as_ref());
    let id: i64 = transaction
        .query_one(
            "INSERT INTO accounts (name, mailbox_kind, mailbox_target, relay_group)
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[&name, &mailbox_kind, &mailbox_target, &relay_group],
        )
        .await
        .map_err(|error| unique_to_exists(error, "account", &name))?
        .get(0);
    for (address, domain) in &addresses {
        check_new_address(&transaction, address, domain).await?;
        insert_address(&transaction, address, domain, OwnerId::Account(id)).await?;
    }
    for target in &forwards {
        transaction
            .execute(
                "INSERT INTO forwards (account_id, target) VALUES ($1, $2)",
                &[&id, target],
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

fn reject_duplicates<'a>(
    what: &'static str,
    values: impl Iterator<Item = &'a String>,
) -> Result<(), AdminError> {
    let mut seen = std::collections::HashSet::new();
    for value in values {
        if !seen.insert(value) {
            return Err(AdminError::Invalid {
                what,
                value: value.clone(),
                reason: "it is given twice".to_owned(),
            });
        }
    }
    Ok(())
}

/// Changes an account's mailbox or relay group.
///
/// # Errors
///
/// [`AdminError::Invalid`] and [`AdminError::NotFound`].
pub async fn set_account<C: GenericClient>(
    client: &mut C,
    name: &str,
    update: &AccountUpdate,
) -> Result<(), AdminError> {
    let mailbox = match &update.mailbox {
        Some(Some(mailbox)) => Some(Some(validate::mailbox(mailbox)?)),
        Some(None) => Some(None),
        None => None,
    };
    let relay_group = match &update.relay_group {
        Some(Some(group)) => Some(Some(validate::group_name(group)?)),
        Some(None) => Some(None),
        None => None,
    };
    let transaction = client.transaction().await?;
    let id = account_id(&transaction, name).await?;
    if let Some(mailbox) = &mailbox {
        let (kind, target) = mailbox_columns(mailbox.as_ref());
        transaction
            .execute(
                "UPDATE accounts SET mailbox_kind = $2, mailbox_target = $3 WHERE id = $1",
                &[&id, &kind, &target],
            )
            .await?;
    }
    if let Some(group) = &relay_group {
        transaction
            .execute(
                "UPDATE accounts SET relay_group = $2 WHERE id = $1",
                &[&id, group],
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Sets the SMTP AUTH password hash of an account (an argon2 PHC string), or
/// with `None` removes it, so the account can no longer authenticate.
///
/// # Errors
///
/// [`AdminError::NotFound`].
pub async fn set_password_hash<C: GenericClient>(
    client: &mut C,
    name: &str,
    hash: Option<&str>,
) -> Result<(), AdminError> {
    let transaction = client.transaction().await?;
    let updated = transaction
        .execute(
            "UPDATE accounts SET password_hash = $2 WHERE name = $1",
            &[&name, &hash],
        )
        .await?;
    if updated == 0 {
        return Err(not_found("account", name));
    }
    transaction.commit().await?;
    Ok(())
}

/// Removes an account with its addresses, forwards and auto-reply.
///
/// # Errors
///
/// [`AdminError::NotFound`].
pub async fn remove_account<C: GenericClient>(
    client: &mut C,
    name: &str,
) -> Result<(), AdminError> {
    let transaction = client.transaction().await?;
    let deleted = transaction
        .execute("DELETE FROM accounts WHERE name = $1", &[&name])
        .await?;
    if deleted == 0 {
        return Err(not_found("account", name));
    }
    transaction.commit().await?;
    Ok(())
}

/// Reads one account with its addresses (sorted, as the snapshot loader
/// sorts them), forwards and auto-reply.
///
/// # Errors
///
/// [`AdminError::NotFound`].
pub async fn show_account<C: GenericClient>(client: &C, name: &str) -> Result<Account, AdminError> {
    let row = client
        .query_opt(
            "SELECT id, name, mailbox_kind, mailbox_target, relay_group, password_hash
               FROM accounts WHERE name = $1",
            &[&name],
        )
        .await?
        .ok_or_else(|| not_found("account", name))?;
    let id: i64 = row.get(0);
    let addresses = client
        .query(
            "SELECT address FROM addresses WHERE account_id = $1 ORDER BY address",
            &[&id],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    let forwards = client
        .query(
            "SELECT target FROM forwards WHERE account_id = $1 ORDER BY target",
            &[&id],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    let auto_reply = client
        .query_opt(
            "SELECT kind, subject, body, active_from, active_until, interval_seconds, enabled
               FROM auto_replies WHERE account_id = $1",
            &[&id],
        )
        .await?
        .map(|row| -> Result<AutoReply, AdminError> {
            let kind: String = row.get(0);
            let seconds: i64 = row.get(5);
            Ok(AutoReply {
                kind: parse_auto_reply_kind(&kind)?,
                subject: row.get(1),
                body: row.get(2),
                active_from: row.get(3),
                active_until: row.get(4),
                interval: Duration::from_secs(seconds.max(1).unsigned_abs()),
                enabled: row.get(6),
            })
        })
        .transpose()?;
    Ok(Account {
        id,
        name: row.get(1),
        addresses,
        mailbox: mailbox_from_columns(row.get(2), row.get(3)),
        forwards,
        relay_group: row.get(4),
        auto_reply,
        password_hash: row.get(5),
    })
}

fn parse_auto_reply_kind(text: &str) -> Result<AutoReplyKind, AdminError> {
    AutoReplyKind::parse(text).ok_or_else(|| AdminError::Conflict {
        message: format!(
            "invalid auto-reply kind {text:?} stored in auto_replies; expected echo, vacation or every_time"
        ),
    })
}

/// Lists accounts sorted by name, optionally only those with an address at
/// `domain`.
///
/// # Errors
///
/// [`AdminError::Invalid`] for a bad domain name.
pub async fn list_accounts<C: GenericClient>(
    client: &C,
    domain: Option<&str>,
) -> Result<Vec<AccountSummary>, AdminError> {
    let domain = domain.map(validate::domain_name).transpose()?;
    let rows = client
        .query(
            "SELECT ac.name, ac.mailbox_kind, ac.mailbox_target, ac.relay_group,
                    array(SELECT a.address FROM addresses a
                          WHERE a.account_id = ac.id ORDER BY a.address),
                    (SELECT count(*) FROM forwards f WHERE f.account_id = ac.id),
                    r.kind, r.enabled
               FROM accounts ac
               LEFT JOIN auto_replies r ON r.account_id = ac.id
              WHERE $1::text IS NULL
                 OR EXISTS (SELECT 1 FROM addresses a WHERE a.account_id = ac.id AND a.domain = $1)
              ORDER BY ac.name",
            &[&domain],
        )
        .await?;
    rows.into_iter()
        .map(|row| {
            let auto_reply = match (
                row.get::<_, Option<String>>(6),
                row.get::<_, Option<bool>>(7),
            ) {
                (Some(kind), Some(enabled)) => Some((parse_auto_reply_kind(&kind)?, enabled)),
                _ => None,
            };
            Ok(AccountSummary {
                name: row.get(0),
                mailbox: mailbox_from_columns(row.get(1), row.get(2)),
                relay_group: row.get(3),
                addresses: row.get(4),
                forwards: row.get(5),
                auto_reply,
            })
        })
        .collect()
}

// --- Forwards ------------------------------------------------------------------

/// Adds a forward: every message for the account is also sent to `target`.
/// Returns the normalised target.
///
/// # Errors
///
/// [`AdminError::Invalid`], [`AdminError::NotFound`],
/// [`AdminError::AlreadyExists`], and [`AdminError::Conflict`] when the
/// target is one of the account's own addresses.
pub async fn add_forward<C: GenericClient>(
    client: &mut C,
    account: &str,
    target: &str,
) -> Result<String, AdminError> {
    let (target, _) = validate::address(target)?;
    let transaction = client.transaction().await?;
    let id = account_id(&transaction, account).await?;
    let own = transaction
        .query_opt(
            "SELECT 1 FROM addresses WHERE account_id = $1 AND address = $2",
            &[&id, &target],
        )
        .await?;
    if own.is_some() {
        return Err(AdminError::Conflict {
            message: format!(
                "{target} is an address of account {account} itself; a forward to it would loop"
            ),
        });
    }
    transaction
        .execute(
            "INSERT INTO forwards (account_id, target) VALUES ($1, $2)",
            &[&id, &target],
        )
        .await
        .map_err(|error| {
            unique_to_exists(error, "forward", &format!("from {account} to {target}"))
        })?;
    transaction.commit().await?;
    Ok(target)
}

/// Removes a forward.
///
/// # Errors
///
/// [`AdminError::Invalid`] and [`AdminError::NotFound`].
pub async fn remove_forward<C: GenericClient>(
    client: &mut C,
    account: &str,
    target: &str,
) -> Result<(), AdminError> {
    let (target, _) = validate::address(target)?;
    let transaction = client.transaction().await?;
    let id = account_id(&transaction, account).await?;
    let deleted = transaction
        .execute(
            "DELETE FROM forwards WHERE account_id = $1 AND target = $2",
            &[&id, &target],
        )
        .await?;
    if deleted == 0 {
        return Err(not_found("forward", &format!("from {account} to {target}")));
    }
    transaction.commit().await?;
    Ok(())
}

// --- Mailing lists -------------------------------------------------------------

/// A new mailing list. Values are checked and normalised by [`add_list`].
#[derive(Clone, Debug, Default)]
pub struct NewList {
    pub name: String,
    /// Reverse-path of mail expanded from the list (RFC 5321 section 3.9),
    /// so delivery failures go to the owner and not to the original sender.
    pub owner: String,
    pub addresses: Vec<String>,
    pub members: Vec<String>,
}

/// One line of the list of mailing lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListSummary {
    pub name: String,
    pub owner: String,
    pub addresses: Vec<String>,
    pub members: i64,
}

/// Creates a mailing list with its addresses and members.
///
/// # Errors
///
/// Any check of [`add_address`] and [`add_member`], and
/// [`AdminError::AlreadyExists`] when the name is taken.
pub async fn add_list<C: GenericClient>(client: &mut C, list: &NewList) -> Result<(), AdminError> {
    let name = validate::object_name("list name", &list.name)?;
    let (owner, _) =
        validate::address(&list.owner).map_err(|error| relabel(error, "list owner"))?;
    let addresses = list
        .addresses
        .iter()
        .map(|address| validate::address_or_catch_all(address))
        .collect::<Result<Vec<_>, _>>()?;
    let members = list
        .members
        .iter()
        .map(|member| validate::address(member).map(|(member, _)| member))
        .collect::<Result<Vec<_>, _>>()?;
    reject_duplicates("address", addresses.iter().map(|(address, _)| address))?;
    reject_duplicates("member", members.iter())?;
    if let Some(member) = members
        .iter()
        .find(|member| addresses.iter().any(|(address, _)| address == *member))
    {
        return Err(AdminError::Conflict {
            message: format!(
                "member {member} is also an address of mailing list {name}; mail would loop"
            ),
        });
    }

    let transaction = client.transaction().await?;
    let id: i64 = transaction
        .query_one(
            "INSERT INTO lists (name, owner) VALUES ($1, $2) RETURNING id",
            &[&name, &owner],
        )
        .await
        .map_err(|error| unique_to_exists(error, "mailing list", &name))?
        .get(0);
    for (address, domain) in &addresses {
        check_new_address(&transaction, address, domain).await?;
        insert_address(&transaction, address, domain, OwnerId::List(id)).await?;
    }
    for member in &members {
        transaction
            .execute(
                "INSERT INTO list_members (list_id, member) VALUES ($1, $2)",
                &[&id, member],
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Replaces the `what` of an [`AdminError::Invalid`], so the message names
/// the option that carried the value.
fn relabel(error: AdminError, what: &'static str) -> AdminError {
    match error {
        AdminError::Invalid { value, reason, .. } => AdminError::Invalid {
            what,
            value,
            reason,
        },
        other => other,
    }
}

/// Changes the owner of a mailing list and returns it normalised.
///
/// # Errors
///
/// [`AdminError::Invalid`] and [`AdminError::NotFound`].
pub async fn set_list_owner<C: GenericClient>(
    client: &mut C,
    name: &str,
    owner: &str,
) -> Result<String, AdminError> {
    let (owner, _) = validate::address(owner).map_err(|error| relabel(error, "list owner"))?;
    let transaction = client.transaction().await?;
    let updated = transaction
        .execute(
            "UPDATE lists SET owner = $2 WHERE name = $1",
            &[&name, &owner],
        )
        .await?;
    if updated == 0 {
        return Err(not_found("mailing list", name));
    }
    transaction.commit().await?;
    Ok(owner)
}

/// Removes a mailing list with its addresses and members.
///
/// # Errors
///
/// [`AdminError::NotFound`].
pub async fn remove_list<C: GenericClient>(client: &mut C, name: &str) -> Result<(), AdminError> {
    let transaction = client.transaction().await?;
    let deleted = transaction
        .execute("DELETE FROM lists WHERE name = $1", &[&name])
        .await?;
    if deleted == 0 {
        return Err(not_found("mailing list", name));
    }
    transaction.commit().await?;
    Ok(())
}

/// Reads one mailing list with its addresses and members, both sorted.
///
/// # Errors
///
/// [`AdminError::NotFound`].
pub async fn show_list<C: GenericClient>(client: &C, name: &str) -> Result<List, AdminError> {
    let row = client
        .query_opt(
            "SELECT id, name, owner FROM lists WHERE name = $1",
            &[&name],
        )
        .await?
        .ok_or_else(|| not_found("mailing list", name))?;
    let id: i64 = row.get(0);
    let addresses = client
        .query(
            "SELECT address FROM addresses WHERE list_id = $1 ORDER BY address",
            &[&id],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    let members = client
        .query(
            "SELECT member FROM list_members WHERE list_id = $1 ORDER BY member",
            &[&id],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    Ok(List {
        id,
        name: row.get(1),
        addresses,
        owner: row.get(2),
        members,
    })
}

/// Lists every mailing list, sorted by name.
pub async fn list_lists<C: GenericClient>(client: &C) -> Result<Vec<ListSummary>, AdminError> {
    let rows = client
        .query(
            "SELECT l.name, l.owner,
                    array(SELECT a.address FROM addresses a
                          WHERE a.list_id = l.id ORDER BY a.address),
                    (SELECT count(*) FROM list_members m WHERE m.list_id = l.id)
               FROM lists l ORDER BY l.name",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| ListSummary {
            name: row.get(0),
            owner: row.get(1),
            addresses: row.get(2),
            members: row.get(3),
        })
        .collect())
}

/// Adds a member to a mailing list and returns it normalised.
///
/// # Errors
///
/// [`AdminError::Invalid`], [`AdminError::NotFound`],
/// [`AdminError::AlreadyExists`], and [`AdminError::Conflict`] when the
/// member is one of the list's own addresses.
pub async fn add_member<C: GenericClient>(
    client: &mut C,
    list: &str,
    member: &str,
) -> Result<String, AdminError> {
    let (member, _) = validate::address(member).map_err(|error| relabel(error, "member"))?;
    let transaction = client.transaction().await?;
    let id = list_id(&transaction, list).await?;
    let own = transaction
        .query_opt(
            "SELECT 1 FROM addresses WHERE list_id = $1 AND address = $2",
            &[&id, &member],
        )
        .await?;
    if own.is_some() {
        return Err(AdminError::Conflict {
            message: format!(
                "{member} is an address of mailing list {list} itself; as a member it would loop"
            ),
        });
    }
    transaction
        .execute(
            "INSERT INTO list_members (list_id, member) VALUES ($1, $2)",
            &[&id, &member],
        )
        .await
        .map_err(|error| unique_to_exists(error, "member", &format!("{member} of {list}")))?;
    transaction.commit().await?;
    Ok(member)
}

/// Removes a member from a mailing list.
///
/// # Errors
///
/// [`AdminError::Invalid`] and [`AdminError::NotFound`].
pub async fn remove_member<C: GenericClient>(
    client: &mut C,
    list: &str,
    member: &str,
) -> Result<(), AdminError> {
    let (member, _) = validate::address(member).map_err(|error| relabel(error, "member"))?;
    let transaction = client.transaction().await?;
    let id = list_id(&transaction, list).await?;
    let deleted = transaction
        .execute(
            "DELETE FROM list_members WHERE list_id = $1 AND member = $2",
            &[&id, &member],
        )
        .await?;
    if deleted == 0 {
        return Err(not_found("member", &format!("{member} of {list}")));
    }
    transaction.commit().await?;
    Ok(())
}

// --- Auto-replies --------------------------------------------------------------

/// Creates or replaces the auto-reply of an account.
///
/// # Errors
///
/// [`AdminError::Invalid`] for an empty or multi-line subject, an empty body,
/// an active window that ends before it starts, or an interval that does not
/// fit the column; [`AdminError::NotFound`] for the account.
pub async fn set_auto_reply<C: GenericClient>(
    client: &mut C,
    account: &str,
    reply: &AutoReply,
) -> Result<(), AdminError> {
    let subject = validate::subject(&reply.subject)?;
    if reply.body.trim().is_empty() {
        return Err(AdminError::Invalid {
            what: "auto-reply body",
            value: reply.body.clone(),
            reason: "the body is empty; give the text with --body or --body-file".to_owned(),
        });
    }
    if let (Some(from), Some(until)) = (reply.active_from, reply.active_until)
        && from >= until
    {
        return Err(AdminError::Invalid {
            what: "active window",
            value: format!("{from} to {until}"),
            reason: "the window must end after it starts".to_owned(),
        });
    }
    let seconds = i64::try_from(reply.interval.as_secs())
        .ok()
        .filter(|seconds| *seconds > 0)
        .ok_or_else(|| AdminError::Invalid {
            what: "interval",
            value: format!("{:?}", reply.interval),
            reason: "expected at least one second".to_owned(),
        })?;

    let transaction = client.transaction().await?;
    let id = account_id(&transaction, account).await?;
    transaction
        .execute(
            "INSERT INTO auto_replies
                 (account_id, kind, subject, body, active_from, active_until, interval_seconds, enabled)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (account_id) DO UPDATE SET
                 kind = EXCLUDED.kind, subject = EXCLUDED.subject, body = EXCLUDED.body,
                 active_from = EXCLUDED.active_from, active_until = EXCLUDED.active_until,
                 interval_seconds = EXCLUDED.interval_seconds, enabled = EXCLUDED.enabled",
            &[
                &id,
                &reply.kind.as_str(),
                &subject,
                &reply.body,
                &reply.active_from,
                &reply.active_until,
                &seconds,
                &reply.enabled,
            ],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Enables or disables an account's auto-reply without changing its text.
///
/// # Errors
///
/// [`AdminError::NotFound`] for the account or its auto-reply.
pub async fn set_auto_reply_enabled<C: GenericClient>(
    client: &mut C,
    account: &str,
    enabled: bool,
) -> Result<(), AdminError> {
    let transaction = client.transaction().await?;
    let id = account_id(&transaction, account).await?;
    let updated = transaction
        .execute(
            "UPDATE auto_replies SET enabled = $2 WHERE account_id = $1",
            &[&id, &enabled],
        )
        .await?;
    if updated == 0 {
        return Err(not_found("auto-reply of account", account));
    }
    transaction.commit().await?;
    Ok(())
}

/// Removes an account's auto-reply and its per-correspondent log.
///
/// # Errors
///
/// [`AdminError::NotFound`] for the account or its auto-reply.
pub async fn remove_auto_reply<C: GenericClient>(
    client: &mut C,
    account: &str,
) -> Result<(), AdminError> {
    let transaction = client.transaction().await?;
    let id = account_id(&transaction, account).await?;
    let deleted = transaction
        .execute("DELETE FROM auto_replies WHERE account_id = $1", &[&id])
        .await?;
    if deleted == 0 {
        return Err(not_found("auto-reply of account", account));
    }
    // A later auto-reply starts without memory of earlier replies.
    transaction
        .execute("DELETE FROM auto_reply_log WHERE account_id = $1", &[&id])
        .await?;
    transaction.commit().await?;
    Ok(())
}
