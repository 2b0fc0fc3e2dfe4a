//! The command line: `serve`, `check`, `reload`, `route`, `migrate`,
//! `queue …` and `accounts …`.
//!
//! Every command takes `--config PATH` (default `config.yaml`). Errors go to
//! stderr and make the process exit non-zero.

pub mod accounts;
pub mod queue_commands;
pub mod reload;
pub mod route;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use queue_commands::QueueCommand;

#[derive(Parser, Debug)]
#[command(
    name = "wsmtp",
    version,
    about = "SMTP front proxy with account-aware relay routing"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        default_value = "config.yaml",
        env = "WSMTP_CONFIG"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the SMTP listener, the router and the delivery workers (applies
    /// queue migrations at start).
    Serve {
        /// Tiers to run, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "listener,router,delivery"
        )]
        roles: Vec<serve::Role>,
    },
    /// Validate the configuration and the relay rules and print every
    /// problem with its key or file and line.
    Check,
    /// Validate the configuration, then make the running server (the
    /// process in `pid_file`) reload it, and print the server's outcome.
    Reload {
        /// Seconds to wait for the server to report its outcome.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Show, without sending anything, what wsmtp would do with each
    /// recipient and which rule or directory entry decides it.
    Route(route::RouteArgs),
    /// Create the queue database if missing and apply the migrations.
    Migrate,
    /// Inspect and manage the queue: list, show, retry, hold, release,
    /// delete and stats.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Manage the account directory: domains, accounts, addresses, forwards,
    /// auto-replies and mailing lists; import legacy alias files.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Serve { .. }) {
        restore_sigpipe();
    }
    match cli.command {
        Command::Check => check(&cli.config),
        Command::Reload { timeout } => {
            reload::run(&cli.config, std::time::Duration::from_secs(timeout))
        }
        Command::Serve { roles } => {
            with_config(&cli.config, |config| runtime(serve::serve(config, roles)))
        }
        Command::Route(args) => with_config_and_filter(&cli.config, Some("warn"), |config| {
            runtime(route::run(config, args))
        }),
        Command::Migrate => with_config(&cli.config, |config| {
            runtime(queue_commands::migrate(config))
        }),
        // Like the accounts commands below, the queue commands print their
        // own results.
        Command::Queue(command) => with_config_and_filter(&cli.config, Some("warn"), |config| {
            runtime(queue_commands::run(config, command))
        }),
        // The accounts commands print their own results, so the info lines
        // of the migration that runs first are noise there.
        Command::Accounts(command) => with_config_and_filter(&cli.config, Some("warn"), |config| {
            runtime(accounts::run(config, command))
        }),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!(
                "{}: OK ({} listener(s), {} local domain(s), {} relay domain(s), {} downstream group(s), {} rule(s), {} list entries, {} rate limit class(es), queue {})",
                path.display(),
                config.listeners.len(),
                config.relay.local_domains.len(),
                config.relay.relay_domains.len(),
                config.groups.len(),
                config.rules.rules().len(),
                config.lists.entry_count(),
                config.rate_limits.classes.len(),
                if config.queue.is_some() {
                    "configured"
                } else {
                    "not configured"
                }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn with_config(path: &Path, command: impl FnOnce(Config) -> anyhow::Result<()>) -> ExitCode {
    with_config_and_filter(path, None, command)
}

/// Loads the configuration, starts logging with `filter` in place of the
/// configured `log.filter` when given (`RUST_LOG` still overrides both), and
/// runs the command.
fn with_config_and_filter(
    path: &Path,
    filter: Option<&str>,
    command: impl FnOnce(Config) -> anyhow::Result<()>,
) -> ExitCode {
    let mut config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(filter) = filter {
        config.log.filter = filter.to_owned();
    }
    crate::logging::init(&config.log, None);
    match command(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// Lets a command that prints into a pipe end quietly when the reader goes
/// away (`wsmtp queue list | head`), as Unix tools do. Rust programs start
/// with SIGPIPE ignored, which turns that into a panic in `println!`. The
/// server keeps SIGPIPE ignored, so a client that disconnects is an error
/// on its socket rather than the end of the process.
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to the default has no
    // preconditions, and no other thread runs yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
