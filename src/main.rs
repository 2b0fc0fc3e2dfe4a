//! The wsmtp command line; see `wsmtp --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    wsmtp::cli::run(wsmtp::cli::Cli::parse())
}
