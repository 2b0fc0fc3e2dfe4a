//! SMTP AUTH credentials: checks a login name and password against the
//! account directory, limits failed attempts per client, and decides which
//! senders an authenticated client may use.
//!
//! The [`Authenticator`] never waits on the database: accounts and their
//! password hashes come from the in-memory directory snapshot. A login name
//! is any address of an account or the account's name (see
//! [`crate::directory::Snapshot::account_by_login`]).
//!
//! Timing: argon2 verification runs on the blocking thread pool, at most
//! one per CPU at a time, so a burst of attempts queues up instead of taking
//! 19 MiB of memory per attempt at once. A login that does not exist, or an
//! account without a password, is checked against a dummy hash, so the time
//! of a reply does not tell which login names exist. After each failure the
//! reply waits `auth.failure_delay`.
//!
//! Logs: one `authentication attempt` line per checked attempt, with the
//! client IP, mechanism, login name (made printable) and outcome. The
//! password never reaches a log call.

pub mod limiter;
pub mod password;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::config::{AuthSettings, Mechanism};
use crate::directory::{Directory, Lookup, Snapshot, normalise_address};
use crate::policy::address::Address;
use limiter::FailureLimiter;
use password::Verification;

/// The identities and password that a client sent in one AUTH exchange.
pub struct Credentials {
    /// The authorization identity (PLAIN only); None when it was empty.
    pub authorization: Option<String>,
    /// The authentication identity: the login name.
    pub login: String,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("authorization", &self.authorization)
            .field("login", &self.login)
            .field("password", &"(hidden)")
            .finish()
    }
}

/// The result of one AUTH attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthResult {
    /// The credentials are valid; the account's name.
    Success(String),
    /// Wrong login name or password, or an authorization identity other
    /// than the login's account.
    Failed,
    /// The client reached `auth.max_failures` in the current window.
    Blocked,
    /// The directory has not been loaded yet.
    Unavailable,
}

/// The outcome of one attempt, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// No account has this login name.
    UnknownLogin,
    /// The account has no password set.
    NoPassword,
    WrongPassword,
    /// The account's stored hash could not be read.
    InvalidStoredHash,
    /// PLAIN named an authorization identity of another account.
    AuthorizationMismatch,
    Blocked,
    DirectoryUnavailable,
    InternalError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::UnknownLogin => "unknown login",
            Outcome::NoPassword => "no password set",
            Outcome::WrongPassword => "wrong password",
            Outcome::InvalidStoredHash => "invalid stored hash",
            Outcome::AuthorizationMismatch => "authorization identity differs",
            Outcome::Blocked => "blocked after too many failures",
            Outcome::DirectoryUnavailable => "directory not loaded",
            Outcome::InternalError => "internal error",
        }
    }
}

/// Checks credentials for every listener of the process.
pub struct Authenticator {
    directory: Arc<Directory>,
    settings: AuthSettings,
    limiter: FailureLimiter,
    /// Bounds concurrent argon2 verifications.
    verifications: Semaphore,
}

impl Authenticator {
    pub fn new(directory: Arc<Directory>, settings: AuthSettings) -> Authenticator {
        password::prepare_dummy_hash();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Authenticator {
            directory,
            limiter: FailureLimiter::new(
                settings.max_failures,
                settings.failure_window,
                limiter::DEFAULT_CAPACITY,
            ),
            settings,
            verifications: Semaphore::new(cpus),
        }
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// True when AUTH from this client is rejected until its window ends.
    pub fn is_blocked(&self, client: IpAddr) -> bool {
        self.limiter.is_blocked(client, Instant::now())
    }

    /// Checks one set of credentials. A failure returns only after
    /// `auth.failure_delay`.
    pub async fn authenticate(
        &self,
        client: IpAddr,
        mechanism: Mechanism,
        credentials: Credentials,
    ) -> AuthResult {
        let login = credentials.login.clone();
        let (result, outcome) = self.check(client, credentials).await;
        let account = match &result {
            AuthResult::Success(account) => account.as_str(),
            _ => "",
        };
        log_attempt(client, mechanism, &login, outcome, account);
        if result == AuthResult::Failed && !self.settings.failure_delay.is_zero() {
            tokio::time::sleep(self.settings.failure_delay).await;
        }
        result
    }

    async fn check(&self, client: IpAddr, credentials: Credentials) -> (AuthResult, Outcome) {
        let Some(snapshot) = self.directory.snapshot() else {
            return (AuthResult::Unavailable, Outcome::DirectoryUnavailable);
        };
        let Some(reservation) = self.limiter.reserve(client, Instant::now()) else {
            return (AuthResult::Blocked, Outcome::Blocked);
        };

        let account = snapshot.account_by_login(&credentials.login);
        let stored = account.and_then(|account| account.password_hash.clone());
        let verification = self.verify(stored, credentials.password).await;

        let outcome = match (account, verification) {
            (_, Err(())) => Outcome::InternalError,
            (None, _) => Outcome::UnknownLogin,
            (Some(account), _) if account.password_hash.is_none() => Outcome::NoPassword,
            (Some(_), Ok(Verification::Mismatch)) => Outcome::WrongPassword,
            (Some(account), Ok(Verification::InvalidHash)) => {
                tracing::warn!(account = %account.name, "the stored password hash is not a valid argon2 PHC string; set the password again");
                Outcome::InvalidStoredHash
            }
            (Some(account), Ok(Verification::Match)) => {
                match credentials.authorization.as_deref() {
                    Some(authorization)
                        if !same_account(&snapshot, authorization, &account.name) =>
                    {
                        Outcome::AuthorizationMismatch
                    }
                    _ => {
                        drop(reservation);
                        return (AuthResult::Success(account.name.clone()), Outcome::Success);
                    }
                }
            }
        };
        if outcome == Outcome::InternalError {
            drop(reservation);
            return (AuthResult::Failed, outcome);
        }
        let count = reservation.failed(Instant::now());
        if count.limit_reached {
            tracing::warn!(
                client_ip = %client,
                failures = count.failures,
                window_seconds = self.settings.failure_window.as_secs(),
                "too many authentication failures; AUTH from this client is rejected until the window ends"
            );
        }
        (AuthResult::Failed, outcome)
    }

    /// Verifies on the blocking pool; Err when the verification task failed.
    async fn verify(&self, stored: Option<String>, password: Vec<u8>) -> Result<Verification, ()> {
        let Ok(_permit) = self.verifications.acquire().await else {
            return Err(());
        };
        let task = tokio::task::spawn_blocking(move || match stored {
            Some(stored) => password::verify_password(&stored, &password),
            None => {
                password::verify_dummy(&password);
                Verification::Mismatch
            }
        });
        task.await.map_err(|error| {
            tracing::error!(error = %error, "password verification task failed");
        })
    }

    /// Checks whether an authenticated client may use `sender` as MAIL FROM.
    /// `<>` (None) is always allowed. With `auth.sender_must_match` the
    /// sender must belong to the account, as a RCPT lookup would find it:
    /// one of its addresses, a `+tag` form of one, or an address that only
    /// its catch-all covers. Without a loaded directory the sender is
    /// rejected.
    pub fn sender_allowed(&self, account: &str, sender: Option<&Address>) -> bool {
        let Some(sender) = sender else {
            return true;
        };
        if !self.settings.sender_must_match {
            return true;
        }
        let Some(snapshot) = self.directory.snapshot() else {
            return false;
        };
        sender_belongs_to(&snapshot, account, sender)
    }
}

/// True when the directory routes `sender` to the account named `account`.
pub fn sender_belongs_to(snapshot: &Snapshot, account: &str, sender: &Address) -> bool {
    let address = normalise_address(&sender.to_smtp());
    matches!(snapshot.lookup(&address), Lookup::Account { account: owner, .. } if owner.name == account)
}

/// True when `authorization` names the account `account`, by name or address.
fn same_account(snapshot: &Snapshot, authorization: &str, account: &str) -> bool {
    snapshot
        .account_by_login(authorization)
        .is_some_and(|found| found.name == account)
}

/// Writes the log line of one attempt. It takes no password, so none can be
/// logged; the login name is made printable and cut to 256 characters.
pub fn log_attempt(
    client: IpAddr,
    mechanism: Mechanism,
    login: &str,
    outcome: Outcome,
    account: &str,
) {
    let login = printable(login);
    if outcome == Outcome::Success {
        tracing::info!(
            client_ip = %client,
            mechanism = mechanism.as_str(),
            login = %login,
            account,
            outcome = outcome.as_str(),
            "authentication attempt"
        );
    } else {
        tracing::info!(
            client_ip = %client,
            mechanism = mechanism.as_str(),
            login = %login,
            outcome = outcome.as_str(),
            "authentication attempt"
        );
    }
}

/// Replaces control characters, so a login name cannot forge log lines.
pub fn printable(text: &str) -> String {
    text.chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{Account, DomainEntry, DomainKind, Owner};

    fn snapshot(hash: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.domains.insert(
            "example.com".into(),
            DomainEntry {
                kind: DomainKind::Local,
                legacy_group: None,
            },
        );
        for (index, (name, address, hash)) in [
            ("alice", "alice@example.com", Some(hash.to_string())),
            ("bob", "bob@example.com", None),
        ]
        .into_iter()
        .enumerate()
        {
            snapshot.accounts.push(Account {
                id: index as i64,
                name: name.into(),
                addresses: vec![address.into()],
                mailbox: None,
                forwards: vec![],
                relay_group: None,
                auto_reply: None,
                password_hash: hash,
            });
            snapshot
                .addresses
                .insert(address.into(), Owner::Account(index as u32));
            snapshot.account_names.insert(name.into(), index as u32);
        }
        snapshot
            .addresses
            .insert("@example.com".into(), Owner::Account(1));
        snapshot
    }

    fn authenticator(hash: &str, max_failures: u32) -> Authenticator {
        let directory = Arc::new(Directory::new());
        directory.replace(snapshot(hash));
        Authenticator::new(
            directory,
            AuthSettings {
                max_failures,
                failure_delay: std::time::Duration::ZERO,
                ..AuthSettings::default()
            },
        )
    }

    fn credentials(authorization: Option<&str>, login: &str, password: &str) -> Credentials {
        Credentials {
            authorization: authorization.map(str::to_string),
            login: login.to_string(),
            password: password.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn outcomes_of_attempts() {
        let hash = password::hash_password(b"secret").expect("hash");
        let auth = authenticator(&hash, 100);
        let client: IpAddr = "192.0.2.1".parse().expect("ip");
        let cases = [
            (
                credentials(None, "alice@example.com", "secret"),
                AuthResult::Success("alice".into()),
                Outcome::Success,
            ),
            (
                credentials(None, "ALICE@Example.com", "secret"),
                AuthResult::Success("alice".into()),
                Outcome::Success,
            ),
            (
                credentials(Some("alice"), "alice@example.com", "secret"),
                AuthResult::Success("alice".into()),
                Outcome::Success,
            ),
            (
                credentials(Some("bob"), "alice", "secret"),
                AuthResult::Failed,
                Outcome::AuthorizationMismatch,
            ),
            (
                credentials(None, "alice", "wrong"),
                AuthResult::Failed,
                Outcome::WrongPassword,
            ),
            (
                credentials(None, "bob", "secret"),
                AuthResult::Failed,
                Outcome::NoPassword,
            ),
            (
                credentials(None, "nobody@example.com", "secret"),
                AuthResult::Failed,
                Outcome::UnknownLogin,
            ),
        ];
        for (credentials, result, outcome) in cases {
            let login = credentials.login.clone();
            assert_eq!(
                auth.check(client, credentials).await,
                (result, outcome),
                "{login}"
            );
        }
    }

    #[tokio::test]
    async fn failures_block_the_client() {
        let hash = password::hash_password(b"secret").expect("hash");
        let auth = authenticator(&hash, 2);
        let client: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..2 {
            let result = auth
                .authenticate(client, Mechanism::Plain, credentials(None, "alice", "x"))
                .await;
            assert_eq!(result, AuthResult::Failed);
        }
        assert!(auth.is_blocked(client));
        let result = auth
            .authenticate(
                client,
                Mechanism::Plain,
                credentials(None, "alice", "secret"),
            )
            .await;
        assert_eq!(result, AuthResult::Blocked);
    }

    #[tokio::test]
    async fn unloaded_directory_is_unavailable() {
        let auth = Authenticator::new(Arc::new(Directory::new()), AuthSettings::default());
        let result = auth
            .authenticate(
                "192.0.2.1".parse().expect("ip"),
                Mechanism::Login,
                credentials(None, "alice", "secret"),
            )
            .await;
        assert_eq!(result, AuthResult::Unavailable);
    }

    #[test]
    fn senders_of_an_account() {
        let auth = authenticator("unused", 5);
        let address = |text: &str| Address::parse(text).expect("address");
        assert!(auth.sender_allowed("alice", None));
        assert!(auth.sender_allowed("alice", Some(&address("alice@example.com"))));
        assert!(auth.sender_allowed("alice", Some(&address("Alice+news@Example.com"))));
        assert!(!auth.sender_allowed("alice", Some(&address("bob@example.com"))));
        assert!(!auth.sender_allowed("alice", Some(&address("alice@example.org"))));
        // bob has the catch-all, so addresses of no other account are his.
        assert!(auth.sender_allowed("bob", Some(&address("anyone@example.com"))));
        assert!(!auth.sender_allowed("bob", Some(&address("alice@example.com"))));
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let text = format!("{:?}", credentials(None, "alice", "hunter2"));
        assert!(text.contains("alice"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    /// Collects formatted log output.
    #[derive(Clone, Default)]
    struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("log buffer lock")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn attempt_log_omits_password() {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);

        let hash = password::hash_password(b"right-password-1").expect("hash");
        let auth = authenticator(&hash, 100);
        let client: IpAddr = "192.0.2.7".parse().expect("ip");
        for password in ["right-password-1", "wrong-password-2"] {
            auth.authenticate(
                client,
                Mechanism::Plain,
                credentials(None, "alice@example.com", password),
            )
            .await;
        }
        auth.authenticate(
            client,
            Mechanism::Login,
            credentials(None, "ghost\r\nforged", "ghost-password-3"),
        )
        .await;

        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("client_ip=192.0.2.7"), "{text}");
        assert!(lines[0].contains("login=alice@example.com"), "{text}");
        assert!(lines[0].contains("account=\"alice\""), "{text}");
        assert!(lines[0].contains("outcome=\"success\""), "{text}");
        assert!(lines[1].contains("outcome=\"wrong password\""), "{text}");
        assert!(lines[2].contains("login=ghost??forged"), "{text}");
        assert!(lines[2].contains("outcome=\"unknown login\""), "{text}");
        for password in ["right-password-1", "wrong-password-2", "ghost-password-3"] {
            assert!(!text.contains(password), "{text}");
        }
    }

    #[test]
    fn log_text_is_printable() {
        assert_eq!(printable("alice\r\nfake line"), "alice??fake line");
        assert_eq!(printable(&"x".repeat(300)).len(), 256);
    }
}
