//! `wsmtp accounts …`: administration of the account directory in the queue
//! database, and import of legacy alias files.
//!
//! Each command applies the queue migrations first (so the directory tables
//! exist), then runs in one transaction: a command with several values
//! (`forward add alice a@x b@y`) changes all of them or none. The checks and
//! messages come from [`crate::directory::admin`] and
//! [`crate::directory::import`]. A legacy or relay group that the
//! configuration does not define draws a warning on stderr, because another
//! host may define it. `accounts password` reads the password before its
//! transaction starts (see the `password` module).

mod password;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use tokio_postgres::Transaction;

use crate::config::Config;
use crate::directory::admin::{self, AccountUpdate, NewAccount, NewList, OwnerRef, validate};
use crate::directory::import::{self, Format, ImportOptions};
use crate::directory::{Account, AutoReply, AutoReplyKind, DomainKind, List, Mailbox};

#[derive(Subcommand, Debug)]
pub enum AccountsCommand {
    /// Create an account with its addresses, mailbox, relay group and forwards.
    Add(AddAccount),
    /// Change the mailbox or relay group of an account.
    Set(SetAccount),
    /// Remove an account with its addresses, forwards and auto-reply.
    Remove {
        /// Account name.
        name: String,
    },
    /// Set or remove the SMTP AUTH password of an account. The password is
    /// read from standard input (one line; asked twice without echo on a
    /// terminal) or from --password-file, never from the command line.
    Password(password::PasswordArgs),
    /// Show an account (by name, or by one of its addresses) or the mailing
    /// list that owns an address.
    Show {
        /// Account name or address.
        name: String,
    },
    /// List accounts with their mailbox, number of forwards and addresses.
    List {
        /// Only accounts with an address at this domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Add or remove addresses of accounts and mailing lists.
    #[command(subcommand)]
    Address(AddressCommand),
    /// Add or remove forwards: copies of an account's mail sent to other
    /// addresses with the original sender.
    #[command(subcommand)]
    Forward(ForwardCommand),
    /// Set, enable, disable or remove the auto-reply of an account.
    #[command(subcommand, name = "autoreply", alias = "auto-reply")]
    AutoReply(AutoReplyCommand),
    /// Add, change, remove or list the domains of the directory.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Add, change, remove, show or list mailing lists.
    #[command(subcommand, name = "mailing-list", visible_alias = "ml")]
    MailingList(MailingListCommand),
    /// Add or remove members of a mailing list.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Import a Postfix virtual alias map or a Sendmail/Postfix aliases file.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Args, Debug)]
pub struct AddAccount {
    /// Account name: no whitespace, unique among accounts.
    pub name: String,
    /// Address of the account (repeatable); `@example.com` is the domain's
    /// catch-all. The domain must be local or migrating in the directory.
    #[arg(long = "address", value_name = "ADDRESS")]
    pub addresses: Vec<String>,
    /// Deliver to this Maildir directory (absolute path).
    #[arg(long, value_name = "PATH", conflicts_with = "lmtp")]
    pub maildir: Option<String>,
    /// Deliver over LMTP to host:port or to a Unix socket path.
    #[arg(long, value_name = "TARGET")]
    pub lmtp: Option<String>,
    /// Also send every message for the account to this downstream group.
    #[arg(long, value_name = "GROUP")]
    pub relay_group: Option<String>,
    /// Forward a copy of every message to this address (repeatable).
    #[arg(long = "forward", value_name = "ADDRESS")]
    pub forwards: Vec<String>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("mailbox").args(["maildir", "lmtp", "no_mailbox"])))]
#[command(group(ArgGroup::new("relay").args(["relay_group", "no_relay_group"])))]
pub struct SetAccount {
    /// Account name.
    pub name: String,
    /// Deliver to this Maildir directory (absolute path).
    #[arg(long, value_name = "PATH")]
    pub maildir: Option<String>,
    /// Deliver over LMTP to host:port or to a Unix socket path.
    #[arg(long, value_name = "TARGET")]
    pub lmtp: Option<String>,
    /// Remove the mailbox: mail is only forwarded or relayed.
    #[arg(long)]
    pub no_mailbox: bool,
    /// Also send every message for the account to this downstream group.
    #[arg(long, value_name = "GROUP")]
    pub relay_group: Option<String>,
    /// Stop sending the account's mail to a relay group.
    #[arg(long)]
    pub no_relay_group: bool,
}

#[derive(Subcommand, Debug)]
pub enum AddressCommand {
    /// Add addresses to an account, or with --list to a mailing list.
    Add {
        /// Account name, or mailing list name with --list.
        owner: String,
        /// Addresses to add; `@example.com` is the domain's catch-all.
        #[arg(required = true)]
        addresses: Vec<String>,
        /// OWNER names a mailing list.
        #[arg(long)]
        list: bool,
    },
    /// Remove addresses from whichever account or list has them.
    Remove {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ForwardCommand {
    /// Forward the account's mail to these addresses as well.
    Add {
        account: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Stop forwarding to these addresses.
    Remove {
        account: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReplyKindArg {
    /// Returns the message to its sender.
    Echo,
    /// At most one reply per interval per correspondent.
    Vacation,
    /// A reply to every message, rate-limited per correspondent.
    #[value(name = "every_time", alias = "every-time")]
    EveryTime,
}

impl From<ReplyKindArg> for AutoReplyKind {
    fn from(kind: ReplyKindArg) -> AutoReplyKind {
        match kind {
            ReplyKindArg::Echo => AutoReplyKind::Echo,
            ReplyKindArg::Vacation => AutoReplyKind::Vacation,
            ReplyKindArg::EveryTime => AutoReplyKind::EveryTime,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AutoReplyCommand {
    /// Create or replace the auto-reply of an account; options left out take
    /// their defaults, not the previous values.
    Set(SetAutoReply),
    /// Turn the auto-reply on, keeping its text and window.
    Enable { account: String },
    /// Turn the auto-reply off, keeping its text and window.
    Disable { account: String },
    /// Delete the auto-reply and its per-correspondent log of sent replies.
    Remove { account: String },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("body_source").args(["body", "body_file"]).required(true)))]
pub struct SetAutoReply {
    pub account: String,
    /// Kind of reply.
    #[arg(long, value_enum, default_value = "vacation")]
    pub kind: ReplyKindArg,
    /// Subject of the reply: one line.
    #[arg(long)]
    pub subject: String,
    /// Text of the reply.
    #[arg(long)]
    pub body: Option<String>,
    /// Read the text of the reply from this UTF-8 file.
    #[arg(long, value_name = "PATH")]
    pub body_file: Option<PathBuf>,
    /// Start of the active window, RFC 3339 (e.g. 2025-07-01T08:00:00+02:00);
    /// default: active at once.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the active window, RFC 3339; default: no end.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Minimum time between two replies to one correspondent: a number with
    /// s, m, h, d or w.
    #[arg(long, default_value = "7d")]
    pub interval: String,
    /// Store the auto-reply disabled.
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DomainKindArg {
    /// Only addresses in the directory exist.
    Local,
    /// Every address passes through to the legacy group.
    Relay,
    /// Addresses in the directory are local, all others pass through to the
    /// legacy group.
    Migrating,
}

impl From<DomainKindArg> for DomainKind {
    fn from(kind: DomainKindArg) -> DomainKind {
        match kind {
            DomainKindArg::Local => DomainKind::Local,
            DomainKindArg::Relay => DomainKind::Relay,
            DomainKindArg::Migrating => DomainKind::Migrating,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DomainCommand {
    /// Add a domain to the directory.
    Add(DomainArgs),
    /// Change the kind and legacy group of a domain.
    Set(DomainArgs),
    /// Remove a domain.
    Remove {
        domain: String,
        /// Remove the domain even if addresses use it; they are removed too.
        #[arg(long)]
        force: bool,
    },
    /// List domains with their kind, legacy group and number of addresses.
    List,
}

#[derive(Args, Debug)]
pub struct DomainArgs {
    /// Domain name; internationalised names are stored as A-labels.
    pub domain: String,
    /// Kind of domain.
    #[arg(long, value_enum)]
    pub kind: DomainKindArg,
    /// Downstream group that receives mail for addresses not in the
    /// directory; required for relay and migrating domains.
    #[arg(long, value_name = "GROUP")]
    pub legacy_group: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum MailingListCommand {
    /// Create a mailing list.
    Add {
        /// List name: no whitespace, unique among lists.
        name: String,
        /// Reverse-path of mail sent to the members, which receives their
        /// delivery failures.
        #[arg(long, value_name = "ADDRESS")]
        owner: String,
        /// Address of the list (repeatable).
        #[arg(long = "address", value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// Member address (repeatable).
        #[arg(long = "member", value_name = "ADDRESS")]
        members: Vec<String>,
    },
    /// Change the owner of a mailing list.
    Set {
        name: String,
        #[arg(long, value_name = "ADDRESS")]
        owner: String,
    },
    /// Remove a mailing list with its addresses and members.
    Remove { name: String },
    /// Show a mailing list with its addresses and members.
    Show { name: String },
    /// List mailing lists.
    List,
}

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// Add members to a mailing list.
    Add {
        list: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove members from a mailing list.
    Remove {
        list: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// Import a Postfix virtual alias map (`address target, …` per line).
    Virtual {
        file: PathBuf,
        /// Domain for names written without one.
        #[arg(long)]
        domain: Option<String>,
        #[command(flatten)]
        common: ImportArgs,
    },
    /// Import an aliases file (`name: target, …` per line).
    Aliases {
        file: PathBuf,
        /// Domain of the alias names and of local names among the targets.
        #[arg(long)]
        domain: String,
        #[command(flatten)]
        common: ImportArgs,
    },
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Owner of imported mailing lists that have no owner-NAME alias;
    /// default postmaster@ the list's domain.
    #[arg(long, value_name = "ADDRESS")]
    pub owner: Option<String>,
    /// Print what would change, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs one `accounts` command against the queue database.
pub async fn run(config: Config, command: AccountsCommand) -> anyhow::Result<()> {
    let queue = super::queue_commands::open_queue(&config)?;
    queue.migrate().await?;
    super::serve::seed_domains(&queue, &config).await?;
    let mut client = queue
        .pool()
        .get()
        .await
        .context("cannot connect to the queue database")?;
    let command = match command {
        AccountsCommand::Password(args) => return password::run(client, args).await,
        other => other,
    };
    let mut transaction = client.transaction().await?;
    execute(&config, &mut transaction, command).await?;
    transaction.commit().await?;
    Ok(())
}

async fn execute(
    config: &Config,
    transaction: &mut Transaction<'_>,
    command: AccountsCommand,
) -> anyhow::Result<()> {
    match command {
        AccountsCommand::Add(add) => add_account(config, transaction, add).await,
        AccountsCommand::Set(set) => set_account(config, transaction, set).await,
        AccountsCommand::Remove { name } => {
            admin::remove_account(transaction, &name).await?;
            println!("removed account {name}");
            Ok(())
        }
        AccountsCommand::Password(_) => {
            anyhow::bail!("accounts password runs outside the shared transaction")
        }
        AccountsCommand::Show { name } => show(transaction, &name).await,
        AccountsCommand::List { domain } => list_accounts(transaction, domain.as_deref()).await,
        AccountsCommand::Address(command) => address(transaction, command).await,
        AccountsCommand::Forward(command) => forward(transaction, command).await,
        AccountsCommand::AutoReply(command) => auto_reply(transaction, command).await,
        AccountsCommand::Domain(command) => domain(config, transaction, command).await,
        AccountsCommand::MailingList(command) => mailing_list(transaction, command).await,
        AccountsCommand::Member(command) => member(transaction, command).await,
        AccountsCommand::Import(command) => import_file(transaction, command).await,
    }
}

/// Warns when a group is not defined in this host's configuration.
fn warn_unknown_group(config: &Config, group: Option<&str>) {
    if let Some(group) = group
        && !config.groups.contains_key(group)
    {
        eprintln!(
            "warning: group {group} is not defined under downstream_groups in this configuration; mail for it cannot be delivered from hosts that lack it"
        );
    }
}

fn mailbox_option(maildir: Option<String>, lmtp: Option<String>) -> Option<Mailbox> {
    match (maildir, lmtp) {
        (Some(path), _) => Some(Mailbox::Maildir(path)),
        (None, Some(target)) => Some(Mailbox::Lmtp(target)),
        (None, None) => None,
    }
}

async fn add_account(
    config: &Config,
    transaction: &mut Transaction<'_>,
    add: AddAccount,
) -> anyhow::Result<()> {
    warn_unknown_group(config, add.relay_group.as_deref());
    let account = NewAccount {
        name: add.name.clone(),
        addresses: add.addresses,
        mailbox: mailbox_option(add.maildir, add.lmtp),
        relay_group: add.relay_group,
        forwards: add.forwards,
    };
    admin::add_account(transaction, &account).await?;
    println!("added account {}", add.name);
    Ok(())
}

async fn set_account(
    config: &Config,
    transaction: &mut Transaction<'_>,
    set: SetAccount,
) -> anyhow::Result<()> {
    warn_unknown_group(config, set.relay_group.as_deref());
    let mailbox = if set.no_mailbox {
        Some(None)
    } else {
        mailbox_option(set.maildir, set.lmtp).map(Some)
    };
    let relay_group = if set.no_relay_group {
        Some(None)
    } else {
        set.relay_group.map(Some)
    };
    if mailbox.is_none() && relay_group.is_none() {
        anyhow::bail!(
            "nothing to change: give --maildir, --lmtp, --no-mailbox, --relay-group or --no-relay-group"
        );
    }
    let update = AccountUpdate {
        mailbox,
        relay_group,
    };
    admin::set_account(transaction, &set.name, &update).await?;
    println!("updated account {}", set.name);
    Ok(())
}

/// Shows an account by name; failing that, the owner of the address given.
async fn show(transaction: &Transaction<'_>, name: &str) -> anyhow::Result<()> {
    match admin::show_account(transaction, name).await {
        Ok(account) => {
            print_account(&account);
            return Ok(());
        }
        Err(admin::AdminError::NotFound { .. }) if name.contains('@') => {}
        Err(error) => return Err(error.into()),
    }
    let (address, _) = validate::address_or_catch_all(name)?;
    match admin::address_owner(transaction, &address).await? {
        Some(OwnerRef::Account(account)) => {
            print_account(&admin::show_account(transaction, &account).await?)
        }
        Some(OwnerRef::List(list)) => print_list(&admin::show_list(transaction, &list).await?),
        None => anyhow::bail!(
            "no account is named {name} and no account or list has the address {address}"
        ),
    }
    Ok(())
}

fn print_values(label: &str, values: &[String]) {
    if values.is_empty() {
        println!("{label:<13}-");
    }
    for (index, value) in values.iter().enumerate() {
        let label = if index == 0 { label } else { "" };
        println!("{label:<13}{value}");
    }
}

fn format_time(time: Option<time::OffsetDateTime>) -> String {
    match time {
        Some(time) => time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| time.to_string()),
        None => "-".to_owned(),
    }
}

fn print_account(account: &Account) {
    println!("{:<13}{}", "account:", account.name);
    print_values("addresses:", &account.addresses);
    println!(
        "{:<13}{}",
        "mailbox:",
        account
            .mailbox
            .as_ref()
            .map(Mailbox::destination)
            .unwrap_or_else(|| "-".to_owned())
    );
    println!(
        "{:<13}{}",
        "relay group:",
        account.relay_group.as_deref().unwrap_or("-")
    );
    print_values("forwards:", &account.forwards);
    println!(
        "{:<13}{}",
        "password:",
        if account.password_hash.is_some() {
            "set"
        } else {
            "-"
        }
    );

    let Some(reply) = &account.auto_reply else {
        println!("{:<13}-", "auto-reply:");
        return;
    };

    let now = time::OffsetDateTime::now_utc();
    println!(
        "{:<13}{}, {}, {}",
        "auto-reply:",
        reply.kind.as_str(),
        if reply.enabled { "enabled" } else { "disabled" },
        if reply.is_active(now) {
            "active now"
        } else {
            "not active now"
        }
    );
    println!(
        "{:<13}{} to {}",
        "  window:",
        format_time(reply.active_from),
        format_time(reply.active_until)
    );
    println!(
        "{:<13}{}",
        "  interval:",
        validate::format_interval(reply.interval)
    );
    println!("{:<13}{}", "  subject:", reply.subject);

    println!("  body:");
    for line in reply.body.lines() {
        println!("    {line}");
    }
}

fn print_list(list: &List) {
    println!("{:<13}{}", "list:", list.name);
    println!("{:<13}{}", "owner:", list.owner);
    print_values("addresses:", &list.addresses);
    print_values("members:", &list.members);
}

async fn list_accounts(transaction: &Transaction<'_>, domain: Option<&str>) -> anyhow::Result<()> {
    let accounts = admin::list_accounts(transaction, domain).await?;
    println!(
        "{:<24}  {:<32}  {:>8}  {:<18}  addresses",
        "name", "mailbox", "forwards", "auto-reply"
    );
    for account in &accounts {
        let reply = match account.auto_reply {
            Some((kind, true)) => kind.as_str().to_owned(),
            Some((kind, false)) => format!("{} (disabled)", kind.as_str()),
            None => "-".to_owned(),
        };
        println!(
            "{:<24}  {:<32}  {:>8}  {:<18}  {}",
            account.name,
            account
                .mailbox
                .as_ref()
                .map(Mailbox::destination)
                .unwrap_or_else(|| "-".to_owned()),
            account.forwards,
            reply,
            if account.addresses.is_empty() {
                "-".to_owned()
            } else {
                account.addresses.join(", ")
            }
        );
    }
    println!("{} account(s)", accounts.len());
    Ok(())
}

async fn address(transaction: &mut Transaction<'_>, command: AddressCommand) -> anyhow::Result<()> {
    match command {
        AddressCommand::Add {
            owner,
            addresses,
            list,
        } => {
            let owner = if list {
                OwnerRef::List(owner)
            } else {
                OwnerRef::Account(owner)
            };
            for address in &addresses {
                let address = admin::add_address(transaction, &owner, address).await?;
                println!("added address {address} to {owner}");
            }
        }
        AddressCommand::Remove { addresses } => {
            for address in &addresses {
                let owner = admin::remove_address(transaction, address).await?;
                println!("removed address {address} from {owner}");
            }
        }
    }
    Ok(())
}

async fn forward(transaction: &mut Transaction<'_>, command: ForwardCommand) -> anyhow::Result<()> {
    match command {
        ForwardCommand::Add { account, targets } => {
            for target in &targets {
                let target = admin::add_forward(transaction, &account, target).await?;
                println!("added forward from account {account} to {target}");
            }
        }
        ForwardCommand::Remove { account, targets } => {
            for target in &targets {
                admin::remove_forward(transaction, &account, target).await?;
                println!("removed forward from account {account} to {target}");
            }
        }
    }
    Ok(())
}

async fn auto_reply(
    transaction: &mut Transaction<'_>,
    command: AutoReplyCommand,
) -> anyhow::Result<()> {
    match command {
        AutoReplyCommand::Set(set) => {
            let body = match (&set.body, &set.body_file) {
                (Some(body), _) => body.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the body file {}", path.display()))?,
                // clap requires one of the two (group body_source).
                (None, None) => anyhow::bail!("give the reply text with --body or --body-file"),
            };
            let reply = AutoReply {
                kind: set.kind.into(),
                subject: set.subject,
                body,
                active_from: set
                    .from
                    .as_deref()
                    .map(|text| validate::timestamp("--from time", text))
                    .transpose()?,
                active_until: set
                    .until
                    .as_deref()
                    .map(|text| validate::timestamp("--until time", text))
                    .transpose()?,
                interval: validate::interval(&set.interval)?,
                enabled: !set.disabled,
            };
            admin::set_auto_reply(transaction, &set.account, &reply).await?;
            println!(
                "set {} auto-reply of account {}{}",
                reply.kind.as_str(),
                set.account,
                if reply.enabled { "" } else { " (disabled)" }
            );
        }
        AutoReplyCommand::Enable { account } => {
            admin::set_auto_reply_enabled(transaction, &account, true).await?;
            println!("enabled the auto-reply of account {account}");
        }
        AutoReplyCommand::Disable { account } => {
            admin::set_auto_reply_enabled(transaction, &account, false).await?;
            println!("disabled the auto-reply of account {account}");
        }
        AutoReplyCommand::Remove { account } => {
            admin::remove_auto_reply(transaction, &account).await?;
            println!("removed the auto-reply of account {account}");
        }
    }
    Ok(())
}

async fn domain(
    config: &Config,
    transaction: &mut Transaction<'_>,
    command: DomainCommand,
) -> anyhow::Result<()> {
    match command {
        DomainCommand::Add(args) => {
            warn_unknown_group(config, args.legacy_group.as_deref());
            let kind = DomainKind::from(args.kind);
            let name = admin::add_domain(
                transaction,
                &args.domain,
                kind,
                args.legacy_group.as_deref(),
            )
            .await?;
            println!("added {} domain {name}", kind.as_str());
        }
        DomainCommand::Set(args) => {
            warn_unknown_group(config, args.legacy_group.as_deref());
            let kind = DomainKind::from(args.kind);
            admin::set_domain(
                transaction,
                &args.domain,
                kind,
                args.legacy_group.as_deref(),
            )
            .await?;
            println!("domain {} is now {}", args.domain, kind.as_str());
        }
        DomainCommand::Remove { domain, force } => {
            let removed = admin::remove_domain(transaction, &domain, force).await?;
            println!("removed domain {domain} and {removed} address(es)");
        }
        DomainCommand::List => {
            let domains = admin::list_domains(&*transaction).await?;
            println!(
                "{:<32}  {:<9}  {:<16}  {:>9}",
                "domain", "kind", "legacy group", "addresses"
            );
            for domain in &domains {
                println!(
                    "{:<32}  {:<9}  {:<16}  {:>9}",
                    domain.name,
                    domain.kind.as_str(),
                    domain.legacy_group.as_deref().unwrap_or("-"),
                    domain.addresses
                );
            }
            println!("{} domain(s)", domains.len());
        }
    }
    Ok(())
}

async fn mailing_list(
    transaction: &mut Transaction<'_>,
    command: MailingListCommand,
) -> anyhow::Result<()> {
    match command {
        MailingListCommand::Add {
            name,
            owner,
            addresses,
            members,
        } => {
            let list = NewList {
                name: name.clone(),
                owner,
                addresses,
                members,
            };
            admin::add_list(transaction, &list).await?;
            println!("added mailing list {name}");
        }
        MailingListCommand::Set { name, owner } => {
            let owner = admin::set_list_owner(transaction, &name, &owner).await?;
            println!("mailing list {name} now has the owner {owner}");
        }
        MailingListCommand::Remove { name } => {
            admin::remove_list(transaction, &name).await?;
            println!("removed mailing list {name}");
        }
        MailingListCommand::Show { name } => {
            print_list(&admin::show_list(&*transaction, &name).await?);
        }
        MailingListCommand::List => {
            let lists = admin::list_lists(&*transaction).await?;
            println!(
                "{:<24}  {:<32}  {:>7}  addresses",
                "name", "owner", "members"
            );
            for list in &lists {
                println!(
                    "{:<24}  {:<32}  {:>7}  {}",
                    list.name,
                    list.owner,
                    list.members,
                    if list.addresses.is_empty() {
                        "-".to_owned()
                    } else {
                        list.addresses.join(", ")
                    }
                );
            }
            println!("{} mailing list(s)", lists.len());
        }
    }
    Ok(())
}

async fn member(transaction: &mut Transaction<'_>, command: MemberCommand) -> anyhow::Result<()> {
    match command {
        MemberCommand::Add { list, members } => {
            for member in &members {
                let member = admin::add_member(transaction, &list, member).await?;
                println!("added member {member} to mailing list {list}");
            }
        }
        MemberCommand::Remove { list, members } => {
            for member in &members {
                admin::remove_member(transaction, &list, member).await?;
                println!("removed member {member} from mailing list {list}");
            }
        }
    }
    Ok(())
}

async fn import_file(
    transaction: &mut Transaction<'_>,
    command: ImportCommand,
) -> anyhow::Result<()> {
    let (format, file, domain, common) = match command {
        ImportCommand::Virtual {
            file,
            domain,
            common,
        } => (Format::Virtual, file, domain, common),
        ImportCommand::Aliases {
            file,
            domain,
            common,
        } => (Format::Aliases, file, Some(domain), common),
    };
    let options = ImportOptions {
        domain,
        owner: common.owner,
        dry_run: common.dry_run,
    };
    let report = import::import_file(transaction, format, &file, &options).await?;
    for notice in &report.notices {
        println!("note: {notice}");
    }
    for change in &report.changes {
        println!("{change}");
    }
    if report.dry_run {
        println!(
            "dry run: {} entries read, {} change(s) would be made, {} note(s); nothing was changed",
            report.entries,
            report.changes.len(),
            report.notices.len()
        );
    } else {
        println!(
            "{} entries read, {} change(s) made, {} note(s)",
            report.entries,
            report.changes.len(),
            report.notices.len()
        );
    }
    Ok(())
}
