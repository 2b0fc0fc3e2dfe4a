//! Writes a checked import plan into the directory inside the caller's
//! transaction, through the functions of [`crate::directory::admin`] so that
//! imported rows pass the same checks as rows added by hand.
//!
//! Every write is preceded by a read that shows it is needed, so a second run
//! of the same file issues no writing statement and leaves the directory
//! version unchanged. Problems (a missing or relay domain, a rejected row)
//! are collected, so the caller can roll back and list them all. A database
//! failure aborts at once.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Transaction;

use super::{Action, Change, ImportReport, Notice, Plan, PlannedKey, Problem};
use crate::directory::DomainKind;
use crate::directory::admin::{self, AdminError, NewAccount, NewList, OwnerRef};

/// Applies the plan. Returns `Err` only for database failures.
pub(super) async fn apply(
    transaction: &mut Transaction<'_>,
    plan: &Plan,
    problems: &mut Vec<Problem>,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let mut domains = DomainCheck::default();

    for declared in &plan.domains {
        match admin::domain_kind(&*transaction, &declared.name).await? {
            None => {
                admin::add_domain(transaction, &declared.name, DomainKind::Local, None).await?;
                report.changes.push(Change {
                    origin: declared.origin.clone(),
                    action: Action::AddDomain {
                        name: declared.name.clone(),
                    },
                });
            }
            Some((DomainKind::Relay, _)) => problems.push(Problem::at(
                declared.origin.clone(),
                format!(
                    "domain {} is declared as a virtual alias domain but is a relay domain in the directory; change it with `wsmtp accounts domain set {} --kind local` (or --kind migrating)",
                    declared.name, declared.name
                ),
            )),
            Some(_) => {}
        }
    }

    for key in &plan.keys {
        if !domains.accepts(transaction, key, problems).await? {
            continue;
        }
        let result = apply_key(transaction, key, report).await;
        match result {
            Ok(()) => {}
            Err(AdminError::Database(error)) => return Err(AdminError::Database(error)),
            Err(error) => problems.push(Problem::at(key.origin.clone(), error.to_string())),
        }
    }

    warn_unknown_targets(transaction, plan, report).await
}

/// The result of checking each key domain once, so that a missing domain is
/// reported once and not for every key.
#[derive(Default)]
struct DomainCheck {
    checked: HashMap<String, Option<DomainKind>>,
}

impl DomainCheck {
    async fn accepts(
        &mut self,
        transaction: &Transaction<'_>,
        key: &PlannedKey,
        problems: &mut Vec<Problem>,
    ) -> Result<bool, AdminError> {
        let kind = match self.checked.get(&key.domain) {
            Some(kind) => *kind,
            None => {
                let kind = match admin::domain_kind(transaction, &key.domain).await? {
                    None => {
                        problems.push(Problem::at(
                            key.origin.clone(),
                            AdminError::UnknownDomain {
                                domain: key.domain.clone(),
                            }
                            .to_string(),
                        ));
                        None
                    }
                    Some((DomainKind::Relay, group)) => {
                        problems.push(Problem::at(
                            key.origin.clone(),
                            AdminError::RelayDomain {
                                address: key.address.clone(),
                                domain: key.domain.clone(),
                                group: group.unwrap_or_default(),
                            }
                            .to_string(),
                        ));
                        None
                    }
                    Some((kind, _)) => Some(kind),
                };
                self.checked.insert(key.domain.clone(), kind);
                kind
            }
        };
        Ok(kind.is_some())
    }
}

/// Adds the key's address and targets to its existing owner, or creates an
/// account or mailing list for it.
async fn apply_key(
    transaction: &mut Transaction<'_>,
    key: &PlannedKey,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let owner = match admin::address_owner(&*transaction, &key.address).await? {
        Some(owner) => owner,
        None => match existing_by_name(transaction, &key.address).await? {
            Some(owner) => {
                admin::add_address(transaction, &owner, &key.address).await?;
                report.changes.push(Change {
                    origin: key.origin.clone(),
                    action: Action::AddAddress {
                        address: key.address.clone(),
                        owner: owner.to_string(),
                    },
                });
                owner
            }
            None => return create(transaction, key, report).await,
        },
    };
    match owner {
        OwnerRef::Account(name) => merge_into_account(transaction, key, &name, report).await,
        OwnerRef::List(name) => merge_into_list(transaction, key, &name, report).await,
    }
}

/// Finds an account or list named after the address that does not own it,
/// such as one whose address was removed by hand after an earlier import.
async fn existing_by_name(
    transaction: &Transaction<'_>,
    name: &str,
) -> Result<Option<OwnerRef>, AdminError> {
    let row = transaction
        .query_opt(
            "SELECT 'account' FROM accounts WHERE name = $1
             UNION ALL SELECT 'list' FROM lists WHERE name = $1 LIMIT 1",
            &[&name],
        )
        .await?;
    Ok(row.map(|row| match row.get::<_, &str>(0) {
        "account" => OwnerRef::Account(name.to_owned()),
        _ => OwnerRef::List(name.to_owned()),
    }))
}

async fn create(
    transaction: &mut Transaction<'_>,
    key: &PlannedKey,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let targets: Vec<String> = key
        .targets
        .iter()
        .map(|(target, _)| target.clone())
        .collect();
    let name = key.address.clone();
    match &key.list_owner {
        Some(owner) => {
            admin::add_list(
                transaction,
                &NewList {
                    name: name.clone(),
                    owner: owner.clone(),
                    addresses: vec![key.address.clone()],
                    members: targets,
                },
            )
            .await?;
            report.changes.push(Change {
                origin: key.origin.clone(),
                action: Action::AddList {
                    name: name.clone(),
                    owner: owner.clone(),
                },
            });
            report.changes.push(Change {
                origin: key.origin.clone(),
                action: Action::AddAddress {
                    address: key.address.clone(),
                    owner: OwnerRef::List(name.clone()).to_string(),
                },
            });
            for (member, origin) in &key.targets {
                report.changes.push(Change {
                    origin: origin.clone(),
                    action: Action::AddMember {
                        list: name.clone(),
                        member: member.clone(),
                    },
                });
            }
            note_self_targets(key, None, report);
        }
        None => {
            admin::add_account(
                transaction,
                &NewAccount {
                    name: name.clone(),
                    addresses: vec![key.address.clone()],
                    forwards: targets,
                    ..NewAccount::default()
                },
            )
            .await?;
            report.changes.push(Change {
                origin: key.origin.clone(),
                action: Action::AddAccount { name: name.clone() },
            });
            report.changes.push(Change {
                origin: key.origin.clone(),
                action: Action::AddAddress {
                    address: key.address.clone(),
                    owner: OwnerRef::Account(name.clone()).to_string(),
                },
            });
            for (target, origin) in &key.targets {
                report.changes.push(Change {
                    origin: origin.clone(),
                    action: Action::AddForward {
                        account: name.clone(),
                        target: target.clone(),
                    },
                });
            }
            note_self_targets(key, Some((&name, false)), report);
        }
    }
    Ok(())
}

/// Reports targets equal to the key. `account` is the account's name and
/// whether it has a mailbox, or None for a mailing list.
fn note_self_targets(key: &PlannedKey, account: Option<(&str, bool)>, report: &mut ImportReport) {
    for origin in &key.self_targets {
        let message = match account {
            Some((_, true)) => continue,
            Some((name, false)) => format!(
                "skipped target {}: it is the key itself (a local copy), and account {name} has no mailbox; set one with `wsmtp accounts set {name} --maildir PATH`",
                key.address
            ),
            None => format!(
                "skipped target {}: a mailing list cannot be its own member",
                key.address
            ),
        };
        report.notices.push(Notice {
            origin: origin.clone(),
            message,
        });
    }
}

async fn merge_into_account(
    transaction: &mut Transaction<'_>,
    key: &PlannedKey,
    name: &str,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let account = admin::show_account(&*transaction, name).await?;
    if key.list_owner.is_some() {
        report.notices.push(Notice {
            origin: key.origin.clone(),
            message: format!(
                "{} belongs to account {name}, so its targets become forwards of that account and not a mailing list",
                key.address
            ),
        });
    }
    for (target, origin) in &key.targets {
        if account.forwards.contains(target) {
            continue;
        }
        if account.addresses.contains(target) {
            report.notices.push(Notice {
                origin: origin.clone(),
                message: format!(
                    "skipped target {target}: it is another address of account {name}"
                ),
            });
            continue;
        }
        admin::add_forward(transaction, name, target).await?;
        report.changes.push(Change {
            origin: origin.clone(),
            action: Action::AddForward {
                account: name.to_owned(),
                target: target.clone(),
            },
        });
    }
    note_extra(
        key,
        &account.forwards,
        &format!("account {name} also forwards to"),
        report,
    );
    note_self_targets(key, Some((name, account.mailbox.is_some())), report);
    Ok(())
}

async fn merge_into_list(
    transaction: &mut Transaction<'_>,
    key: &PlannedKey,
    name: &str,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let list = admin::show_list(&*transaction, name).await?;
    for (member, origin) in &key.targets {
        if list.members.contains(member) {
            continue;
        }
        if list.addresses.contains(member) {
            report.notices.push(Notice {
                origin: origin.clone(),
                message: format!(
                    "skipped target {member}: it is another address of mailing list {name}"
                ),
            });
            continue;
        }
        admin::add_member(transaction, name, member).await?;
        report.changes.push(Change {
            origin: origin.clone(),
            action: Action::AddMember {
                list: name.to_owned(),
                member: member.clone(),
            },
        });
    }
    note_extra(
        key,
        &list.members,
        &format!("mailing list {name} also has the member"),
        report,
    );
    if let Some(owner) = &key.list_owner
        && *owner != list.owner
    {
        report.notices.push(Notice {
            origin: key.origin.clone(),
            message: format!(
                "mailing list {name} keeps its owner {}; the file implies {owner}",
                list.owner
            ),
        });
    }
    note_self_targets(key, None, report);
    Ok(())
}

/// Names the forwards or members that the directory has but the file does
/// not list; the import keeps them.
fn note_extra(key: &PlannedKey, existing: &[String], prefix: &str, report: &mut ImportReport) {
    for value in existing {
        if !key.targets.iter().any(|(target, _)| target == value) {
            report.notices.push(Notice {
                origin: key.origin.clone(),
                message: format!("{prefix} {value}, which the file does not list; kept"),
            });
        }
    }
}

/// Warns about targets at local domains of the directory that no address,
/// sub-address base or catch-all covers, since mail to them would be
/// rejected.
async fn warn_unknown_targets(
    transaction: &Transaction<'_>,
    plan: &Plan,
    report: &mut ImportReport,
) -> Result<(), AdminError> {
    let mut warned: HashSet<&str> = HashSet::new();
    let mut kinds: HashMap<String, Option<DomainKind>> = HashMap::new();
    for key in &plan.keys {
        for (target, origin) in &key.targets {
            if warned.contains(target.as_str()) {
                continue;
            }
            let Some((local, domain)) = target.rsplit_once('@') else {
                continue;
            };
            let kind = match kinds.get(domain) {
                Some(kind) => *kind,
                None => {
                    let kind = admin::domain_kind(transaction, domain)
                        .await?
                        .map(|(kind, _)| kind);
                    kinds.insert(domain.to_owned(), kind);
                    kind
                }
            };
            if kind != Some(DomainKind::Local) {
                continue;
            }
            let mut candidates = vec![target.clone(), format!("@{domain}")];
            if let Some((base, _)) = local.split_once(crate::directory::SUBADDRESS_SEPARATOR)
                && !base.is_empty()
            {
                candidates.push(format!("{base}@{domain}"));
            }
            let known = transaction
                .query_opt(
                    "SELECT 1 FROM addresses WHERE address = ANY($1) LIMIT 1",
                    &[&candidates],
                )
                .await?
                .is_some();
            if !known {
                warned.insert(target.as_str());
                report.notices.push(Notice {
                    origin: origin.clone(),
                    message: format!(
                        "target {target} is at local domain {domain} but no account or list has that address, so mail to it will be rejected"
                    ),
                });
            }
        }
    }
    Ok(())
}
