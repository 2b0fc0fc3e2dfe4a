//! Import of Postfix `virtual` alias maps and Sendmail/Postfix `aliases`
//! files into the directory, for moving a domain off a legacy MTA.
//!
//! Interface: [`import_file`] reads one file (and the `:include:` files it
//! names), checks every line, and applies the result in one transaction on
//! the given client, or rolls it back when [`ImportOptions::dry_run`] is set.
//! It returns an [`ImportReport`] of the changes made (or that would be made)
//! and of the targets it skipped, each with the file and line it came from.
//!
//! # File formats
//!
//! Line rules are those of Postfix aliases(5) and virtual(5), see
//! [`parse`]. In a `virtual` file the key is `user@domain`, a catch-all
//! `@domain`, or a bare domain name containing a dot. A bare domain name
//! declares a virtual alias domain, so its value is ignored and the domain
//! is created as a local domain unless the directory has it already. A bare name without a
//! dot is a local user; it is qualified with [`ImportOptions::domain`] or
//! skipped when none is given. In an `aliases` file the key is a local name
//! (`name:`), qualified with [`ImportOptions::domain`], which is required.
//! Names and addresses are lowercased, as Postfix aliases(5) folds alias
//! names to lowercase.
//!
//! Targets are addresses, or local names qualified like keys (`\name`, which
//! only stops further aliasing, counts as `name`). `:include:PATH` in an
//! aliases file adds the targets listed in PATH, which is resolved from the
//! directory of the file naming it when relative; includes may nest up to 8
//! levels. Pipes (`|command`), files (`/path`), `@domain` rewrite targets and
//! names that cannot be qualified cannot be represented in the directory:
//! they are reported as skipped with their line, and the rest of the key is
//! still imported. A key left without targets is skipped as a whole.
//!
//! # Mapping to the directory
//!
//! RFC 5321 section 3.9 distinguishes an alias, which keeps the original
//! reverse-path, from a mailing list, whose expansion replaces it with the
//! list owner so that delivery failures reach the list's maintainer. The
//! legacy files say which one a key is, and the import follows them:
//!
//! - A key is a **mailing list** when its targets come from an `:include:`
//!   file (the usual way to keep a list's members), or when the file also
//!   has the key `owner-NAME`, to which Postfix aliases(5) directs the
//!   delivery errors of NAME. The list is named after its address,
//!   its members are the targets, and its owner is `owner-NAME@domain` when
//!   that key exists, else [`ImportOptions::owner`], else
//!   `postmaster@domain`.
//! - Every other key is an **account with forwards**, named after its
//!   address (catch-all accounts are named `@domain`), without a mailbox,
//!   whatever the number of targets. This keeps the sender of aliased mail
//!   unchanged, as the legacy MTA did.
//!
//! When the key's address already belongs to an account or a list in the
//! directory, the targets are added to that owner instead (as forwards of an
//! account, as members of a list), so an imported alias never takes an
//! address away from an existing account. A target equal to the key itself
//! (the legacy idiom for keeping a local copy) is dropped: an account with a
//! mailbox delivers there anyway, and for an account without one the report
//! says to set a mailbox.
//!
//! The import only adds. Running it again with the same file changes nothing
//! (no statement writes, so the directory version stays the same). Forwards
//! and members that the directory has but the file does not list are kept,
//! and the report names them.
//!
//! Errors: [`ImportError`]. A line that cannot be parsed, an invalid address,
//! a missing include file or a key at a domain that is missing or a relay
//! domain rejects the whole import, and the error lists every such problem
//! with `file:line`.
//!
//! Known gaps: the files are read with blocking I/O on the calling task.
//! Regular-expression and `pcre:` tables, Sendmail's `:include:` permission
//! rules and the `owner-` aliases of keys in other files are not considered.

mod apply;
pub mod parse;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use tokio_postgres::GenericClient;

use super::admin::{AdminError, describe_database_error, validate};
use parse::{Entry, TargetKind, Token};

/// Deepest nesting of `:include:` files accepted.
const MAX_INCLUDE_DEPTH: usize = 8;

/// The kind of file to import.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A Postfix `virtual` alias map of full addresses.
    Virtual,
    /// A Sendmail or Postfix `aliases` file of local names.
    Aliases,
}

/// Settings of one import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Domain that qualifies local names; required for aliases files.
    pub domain: Option<String>,
    /// Owner of imported mailing lists that have no `owner-NAME` key.
    pub owner: Option<String>,
    /// Check and report everything, then roll the transaction back.
    pub dry_run: bool,
}

/// A position in an imported file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub file: PathBuf,
    /// Line number, counted from 1.
    pub line: usize,
}

impl Origin {
    pub fn new(file: &Path, line: usize) -> Origin {
        Origin {
            file: file.to_owned(),
            line,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A reason that rejects the import, with its position when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Option<Origin>,
    pub message: String,
}

impl Problem {
    pub fn at(origin: Origin, message: impl Into<String>) -> Problem {
        Problem {
            origin: Some(origin),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{origin}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A skipped target or key, or a remark about existing directory entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// One row the import adds to the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    AddDomain { name: String },
    AddAccount { name: String },
    AddList { name: String, owner: String },
    AddAddress { address: String, owner: String },
    AddForward { account: String, target: String },
    AddMember { list: String, member: String },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::AddDomain { name } => write!(f, "add local domain {name}"),
            Action::AddAccount { name } => write!(f, "add account {name}"),
            Action::AddList { name, owner } => {
                write!(f, "add mailing list {name} with owner {owner}")
            }
            Action::AddAddress { address, owner } => write!(f, "add address {address} to {owner}"),
            Action::AddForward { account, target } => {
                write!(f, "add forward from account {account} to {target}")
            }
            Action::AddMember { list, member } => {
                write!(f, "add member {member} to mailing list {list}")
            }
        }
    }
}

/// A change with the line that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub origin: Origin,
    pub action: Action,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.action)
    }
}

/// The outcome of an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Keys read from the file, declarations of domains included.
    pub entries: usize,
    pub changes: Vec<Change>,
    pub notices: Vec<Notice>,
    /// True when the changes were rolled back.
    pub dry_run: bool,
}

/// Reasons why an import is rejected or fails; nothing is changed then.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("importing an aliases file needs --domain: alias names have no domain of their own")]
    MissingDomain,

    #[error("{0}")]
    InvalidOption(#[from] AdminError),

    #[error("{}", format_problems(problems))]
    Invalid { problems: Vec<Problem> },

    #[error("database error: {}", describe_database_error(.0))]
    Database(#[from] tokio_postgres::Error),
}

fn format_problems(problems: &[Problem]) -> String {
    let mut text = format!(
        "the import was rejected and nothing was changed; {} problem(s):",
        problems.len()
    );
    for problem in problems {
        text.push_str("\n  ");
        text.push_str(&problem.to_string());
    }
    text
}

/// Reads `path` in the given format and imports it in one transaction.
///
/// # Errors
///
/// [`ImportError::Read`] when the file cannot be read,
/// [`ImportError::MissingDomain`] for an aliases file without
/// [`ImportOptions::domain`], [`ImportError::InvalidOption`] for an invalid domain or
/// owner option, [`ImportError::Invalid`] listing every problem found, and
/// [`ImportError::Database`].
pub async fn import_file<C: GenericClient>(
    client: &mut C,
    format: Format,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let domain = options
        .domain
        .as_deref()
        .map(validate::domain_name)
        .transpose()?;
    if format == Format::Aliases && domain.is_none() {
        return Err(ImportError::MissingDomain);
    }
    let owner = options
        .owner
        .as_deref()
        .map(|owner| validate::address(owner).map(|(address, _)| address))
        .transpose()?;

    let text = parse::read_text(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut problems = Vec::new();
    let entries = match format {
        Format::Virtual => parse::parse_virtual(path, &text, &mut problems),
        Format::Aliases => parse::parse_aliases(path, &text, &mut problems),
    };
    let settings = Settings {
        format,
        domain,
        owner,
    };
    let mut plan = make_plan(&settings, &entries, &mut problems);
    if !problems.is_empty() {
        return Err(ImportError::Invalid { problems });
    }

    let mut report = ImportReport {
        entries: entries.len(),
        dry_run: options.dry_run,
        notices: std::mem::take(&mut plan.notices),
        ..ImportReport::default()
    };
    let mut transaction = client.transaction().await?;
    apply::apply(&mut transaction, &plan, &mut problems, &mut report)
        .await
        .map_err(|error| match error {
            AdminError::Database(error) => ImportError::Database(error),
            other => ImportError::InvalidOption(other),
        })?;
    if !problems.is_empty() {
        transaction.rollback().await?;
        return Err(ImportError::Invalid { problems });
    }
    if options.dry_run {
        transaction.rollback().await?;
    } else {
        transaction.commit().await?;
    }
    report.notices.sort_by(|a, b| a.origin.cmp(&b.origin));
    Ok(report)
}

/// Checked options of one import.
struct Settings {
    format: Format,
    domain: Option<String>,
    owner: Option<String>,
}

/// A virtual alias domain declared in the file.
#[derive(Debug)]
struct PlannedDomain {
    name: String,
    origin: Origin,
}

/// A key with its checked, normalised targets.
#[derive(Debug)]
struct PlannedKey {
    address: String,
    domain: String,
    origin: Origin,
    /// Owner when the key becomes a mailing list, None for an account.
    list_owner: Option<String>,
    targets: Vec<(String, Origin)>,
    /// Lines where the key names itself as a target.
    self_targets: Vec<Origin>,
}

#[derive(Debug, Default)]
struct Plan {
    domains: Vec<PlannedDomain>,
    keys: Vec<PlannedKey>,
    notices: Vec<Notice>,
}

/// Checks every entry and turns it into planned domains and keys. Problems
/// are collected; skipped targets become notices.
fn make_plan(settings: &Settings, entries: &[Entry], problems: &mut Vec<Problem>) -> Plan {
    let mut plan = Plan::default();
    let mut first_seen: HashMap<String, Origin> = HashMap::new();
    // Keys with targets from an include file, by address.
    let mut included: HashSet<String> = HashSet::new();

    for entry in entries {
        let key = match resolve_key(settings, entry) {
            KeyResolution::Address(address, domain) => (address, domain),
            KeyResolution::Domain(name) => {
                plan.domains.push(PlannedDomain {
                    name,
                    origin: entry.origin.clone(),
                });
                continue;
            }
            KeyResolution::Skip(message) => {
                plan.notices.push(Notice {
                    origin: entry.origin.clone(),
                    message,
                });
                continue;
            }
            KeyResolution::Problem(message) => {
                problems.push(Problem::at(entry.origin.clone(), message));
                continue;
            }
        };
        let (address, domain) = key;
        if let Some(first) = first_seen.get(&address) {
            plan.notices.push(Notice {
                origin: entry.origin.clone(),
                message: format!(
                    "skipped {address}: defined before at line {}, and only that first definition is imported",
                    first.line
                ),
            });
            continue;
        }
        first_seen.insert(address.clone(), entry.origin.clone());

        if entry.targets.is_empty() {
            problems.push(Problem::at(
                entry.origin.clone(),
                format!("key {:?} has no target", entry.key),
            ));
            continue;
        }
        let mut expansion = Expansion::default();
        let mut visited = Vec::new();
        expand_targets(
            settings,
            &entry.targets,
            0,
            &mut visited,
            &mut expansion,
            problems,
            &mut plan.notices,
        );
        if expansion.from_include {
            included.insert(address.clone());
        }

        let mut targets: Vec<(String, Origin)> = Vec::new();
        let mut self_targets = Vec::new();
        for (target, origin) in expansion.targets {
            if target == address {
                self_targets.push(origin);
            } else if !targets.iter().any(|(known, _)| *known == target) {
                targets.push((target, origin));
            }
        }
        if targets.is_empty() && self_targets.is_empty() {
            plan.notices.push(Notice {
                origin: entry.origin.clone(),
                message: format!("skipped {address}: none of its targets can be imported"),
            });
            continue;
        }
        plan.keys.push(PlannedKey {
            address,
            domain,
            origin: entry.origin.clone(),
            list_owner: None,
            targets,
            self_targets,
        });
    }

    assign_list_owners(settings, &mut plan, &included);
    plan
}

/// Marks keys as mailing lists (targets from `:include:`, or an `owner-`
/// key beside them) and chooses each list's owner.
fn assign_list_owners(settings: &Settings, plan: &mut Plan, included: &HashSet<String>) {
    let keys: HashSet<String> = plan.keys.iter().map(|key| key.address.clone()).collect();
    for key in &mut plan.keys {
        let Some((local, domain)) = key.address.split_once('@') else {
            continue;
        };
        let owner_key = format!("owner-{local}@{domain}");
        let has_owner_key = !local.is_empty() && keys.contains(&owner_key);
        if !has_owner_key && !included.contains(&key.address) {
            continue;
        }
        key.list_owner = Some(if has_owner_key {
            owner_key
        } else if let Some(owner) = &settings.owner {
            owner.clone()
        } else {
            format!("postmaster@{domain}")
        });
    }
}

enum KeyResolution {
    Address(String, String),
    Domain(String),
    Skip(String),
    Problem(String),
}

fn resolve_key(settings: &Settings, entry: &Entry) -> KeyResolution {
    let key = entry.key.as_str();
    match settings.format {
        Format::Virtual => {
            if key.contains('@') {
                return match validate::address_or_catch_all(key) {
                    Ok((address, domain)) => KeyResolution::Address(address, domain),
                    Err(error) => KeyResolution::Problem(error.to_string()),
                };
            }
            if key.contains('.') {
                return match validate::domain_name(key) {
                    Ok(name) => KeyResolution::Domain(name),
                    Err(error) => KeyResolution::Problem(error.to_string()),
                };
            }
            match &settings.domain {
                Some(domain) => qualify_key(key, domain),
                None => KeyResolution::Skip(format!(
                    "skipped key {key:?}: a name without a domain; pass --domain to qualify such names"
                )),
            }
        }
        Format::Aliases => {
            if key.contains('@') {
                return KeyResolution::Problem(format!(
                    "alias name {key:?} contains '@', but names in an aliases file have no domain; import a file of full addresses with `wsmtp accounts import virtual`"
                ));
            }
            match &settings.domain {
                Some(domain) => qualify_key(key, domain),
                // make_plan is only reached with a domain for aliases files.
                None => KeyResolution::Problem("no --domain given".to_owned()),
            }
        }
    }
}

fn qualify_key(name: &str, domain: &str) -> KeyResolution {
    match validate::address(&format!("{name}@{domain}")) {
        Ok((address, domain)) => KeyResolution::Address(address, domain),
        Err(error) => KeyResolution::Problem(error.to_string()),
    }
}

#[derive(Default)]
struct Expansion {
    targets: Vec<(String, Origin)>,
    from_include: bool,
}

/// Checks targets and expands include files into `expansion`.
fn expand_targets(
    settings: &Settings,
    tokens: &[Token],
    depth: usize,
    visited: &mut Vec<PathBuf>,
    expansion: &mut Expansion,
    problems: &mut Vec<Problem>,
    notices: &mut Vec<Notice>,
) {
    for token in tokens {
        let skip = |notices: &mut Vec<Notice>, reason: String| {
            notices.push(Notice {
                origin: token.origin.clone(),
                message: format!("skipped target {:?}: {reason}", token.text),
            });
        };
        let kind = parse::classify(&token.text);
        match kind {
            TargetKind::Pipe | TargetKind::File => skip(
                notices,
                format!(
                    "a {kind} cannot be stored in the directory; keep delivering it on the legacy server or through an LMTP mailbox"
                ),
            ),
            TargetKind::Include(_) if settings.format == Format::Virtual => skip(
                notices,
                ":include: is only read in aliases files".to_owned(),
            ),
            TargetKind::Include(path) => {
                expansion.from_include = true;
                include(
                    settings, token, &path, depth, visited, expansion, problems, notices,
                );
            }
            TargetKind::LocalExempt(name) => {
                qualify_target(settings, token, &name, expansion, problems, notices)
            }
            TargetKind::Local => {
                qualify_target(settings, token, &token.text, expansion, problems, notices)
            }
            TargetKind::Address if token.text.starts_with('@') => skip(
                notices,
                "an @domain target rewrites the domain of every address, which the directory cannot express".to_owned(),
            ),
            TargetKind::Address => match validate::address(&token.text) {
                Ok((address, _)) => expansion.targets.push((address, token.origin.clone())),
                Err(error) => problems.push(Problem::at(token.origin.clone(), error.to_string())),
            },
        }
    }
}

fn qualify_target(
    settings: &Settings,
    token: &Token,
    name: &str,
    expansion: &mut Expansion,
    problems: &mut Vec<Problem>,
    notices: &mut Vec<Notice>,
) {
    let Some(domain) = &settings.domain else {
        notices.push(Notice {
            origin: token.origin.clone(),
            message: format!(
                "skipped target {:?}: a name without a domain; pass --domain to qualify such names",
                token.text
            ),
        });
        return;
    };
    match validate::address(&format!("{name}@{domain}")) {
        Ok((address, _)) => expansion.targets.push((address, token.origin.clone())),
        Err(error) => problems.push(Problem::at(token.origin.clone(), error.to_string())),
    }
}

/// Reads an include file and expands its targets, guarding against loops.
#[allow(clippy::too_many_arguments)]
fn include(
    settings: &Settings,
    token: &Token,
    path: &str,
    depth: usize,
    visited: &mut Vec<PathBuf>,
    expansion: &mut Expansion,
    problems: &mut Vec<Problem>,
    notices: &mut Vec<Notice>,
) {
    if path.is_empty() {
        problems.push(Problem::at(
            token.origin.clone(),
            ":include: without a file name",
        ));
        return;
    }
    let resolved = parse::include_path(&token.origin.file, path);
    if depth >= MAX_INCLUDE_DEPTH {
        problems.push(Problem::at(
            token.origin.clone(),
            format!(
                "include files nest deeper than {MAX_INCLUDE_DEPTH} levels at {}",
                resolved.display()
            ),
        ));
        return;
    }
    let canonical = std::fs::canonicalize(&resolved).unwrap_or_else(|_| resolved.clone());
    if visited.contains(&canonical) {
        problems.push(Problem::at(
            token.origin.clone(),
            format!("include file {} includes itself", resolved.display()),
        ));
        return;
    }
    let text = match parse::read_text(&resolved) {
        Ok(text) => text,
        Err(error) => {
            problems.push(Problem::at(
                token.origin.clone(),
                format!("cannot read include file {}: {error}", resolved.display()),
            ));
            return;
        }
    };
    let tokens = parse::parse_include(&resolved, &text, problems);
    visited.push(canonical);
    expand_targets(
        settings,
        &tokens,
        depth + 1,
        visited,
        expansion,
        problems,
        notices,
    );
    visited.pop();
}
