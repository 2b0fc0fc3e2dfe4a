//! `wsmtp accounts password NAME [--password-file PATH | --clear]`: sets or
//! removes the SMTP AUTH password of an account.
//!
//! The password never comes from the command line, where other users could
//! read it in the process list: it is the first line of `--password-file`,
//! or one line of standard input. On a terminal it is asked for twice,
//! without echo. It is read and hashed before the database transaction
//! starts, so a slow typist does not hold a transaction open.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use deadpool_postgres::Object;

use crate::auth::password::hash_password;
use crate::directory::admin;

/// Passwords longer than this are rejected, so that a PLAIN response with a
/// login name of ordinary length fits one AUTH line of the default
/// `limits.max_command_line` (2048 octets, about 1500 before base64).
const MAX_PASSWORD_OCTETS: usize = 1024;

#[derive(Args, Debug)]
pub struct PasswordArgs {
    /// Account name.
    pub name: String,
    /// Read the password from the first line of this file instead of
    /// standard input.
    #[arg(long, value_name = "PATH", conflicts_with = "clear")]
    pub password_file: Option<PathBuf>,
    /// Remove the password, so the account can no longer authenticate.
    #[arg(long)]
    pub clear: bool,
}

/// Runs the command on a pooled connection.
pub async fn run(mut client: Object, args: PasswordArgs) -> anyhow::Result<()> {
    if args.clear {
        admin::set_password_hash(&mut **client, &args.name, None).await?;
        println!("removed the password of account {}", args.name);
        return Ok(());
    }
    // Fail before asking for a password that could not be stored.
    let exists = client
        .query_opt("SELECT 1 FROM accounts WHERE name = $1", &[&args.name])
        .await?
        .is_some();
    if !exists {
        return Err(admin::AdminError::NotFound {
            what: "account",
            value: args.name.clone(),
        }
        .into());
    }

    let name = args.name.clone();
    let hash = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let password = read_password(&name, args.password_file.as_deref())?;
        check_password(&password)?;
        Ok(hash_password(password.as_bytes())?)
    })
    .await
    .context("the password task failed")??;

    admin::set_password_hash(&mut **client, &args.name, Some(&hash)).await?;
    println!("set the password of account {}", args.name);
    Ok(())
}

/// Reads the new password from the file, the terminal or standard input.
fn read_password(name: &str, file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?;
        return first_line(text.as_bytes())?
            .with_context(|| format!("the password file {} is empty", path.display()));
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("New password for account {name}: "))
            .context("cannot read the password from the terminal")?;
        let second = rpassword::prompt_password("Repeat the password: ")
            .context("cannot read the password from the terminal")?;
        if first != second {
            anyhow::bail!("the two passwords differ; nothing was changed");
        }
        return Ok(first);
    }
    first_line(std::io::stdin().lock())?
        .context("no password on standard input; write it as one line, or use --password-file")
}

/// Reads the first line without its line ending; None when there is no
/// input.
fn first_line(mut reader: impl BufRead) -> anyhow::Result<Option<String>> {
    let mut line = String::new();
    let read = reader
        .read_line(&mut line)
        .context("cannot read the password: it must be UTF-8 text")?;
    if read == 0 {
        return Ok(None);
    }
    let line = line.strip_suffix('\n').unwrap_or(&line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    Ok(Some(line.to_owned()))
}

/// Rejects passwords that AUTH PLAIN could not carry or that are empty.
fn check_password(password: &str) -> anyhow::Result<()> {
    if password.is_empty() {
        anyhow::bail!("the password is empty; nothing was changed");
    }
    if password.contains('\0') {
        anyhow::bail!("the password contains a NUL character, which AUTH PLAIN cannot carry");
    }
    if password.len() > MAX_PASSWORD_OCTETS {
        anyhow::bail!(
            "the password is {} octets long; the maximum is {MAX_PASSWORD_OCTETS}",
            password.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_strips_line_endings() {
        let line = |input: &str| first_line(input.as_bytes()).expect("read");
        assert_eq!(line("secret\n"), Some("secret".to_owned()));
        assert_eq!(line("secret\r\nignored\n"), Some("secret".to_owned()));
        assert_eq!(line("no newline"), Some("no newline".to_owned()));
        assert_eq!(line(" spaces kept \n"), Some(" spaces kept ".to_owned()));
        assert_eq!(line(""), None);
    }

    #[test]
    fn unusable_passwords_are_rejected() {
        assert!(check_password("").is_err());
        assert!(check_password("a\0b").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_OCTETS + 1)).is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_OCTETS)).is_ok());
    }
}
