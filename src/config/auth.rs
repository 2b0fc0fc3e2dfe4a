//! SMTP AUTH settings: the top-level `auth` section (failure limits and the
//! sender rule, shared by every listener of the process) and the per-listener
//! `listeners[].auth` key that offers AUTH on a listener.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Checker, Text};

/// A SASL mechanism that a listener may offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// RFC 4616: authorization id, user name and password in one response.
    Plain,
    /// The LOGIN mechanism: user name and password in two responses.
    Login,
}

impl Mechanism {
    /// The name as written in EHLO and in the AUTH command.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// AUTH on one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerAuth {
    /// Offered mechanisms, in the order EHLO lists them.
    pub mechanisms: Vec<Mechanism>,
    /// AUTH is only offered and accepted over TLS (STARTTLS or implicit).
    pub require_tls: bool,
}

/// Process-wide AUTH settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthSettings {
    /// Failed attempts from one client within `failure_window` after which
    /// AUTH from that client gets 454 until the window ends.
    pub max_failures: u32,
    /// Length of the window that starts with a client's first failure.
    pub failure_window: Duration,
    /// Wait before the 535 reply to a failed attempt.
    pub failure_delay: Duration,
    /// MAIL FROM of an authenticated client must be an address of its account.
    pub sender_must_match: bool,
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            max_failures: 5,
            failure_window: Duration::from_secs(15 * 60),
            failure_delay: Duration::from_secs(1),
            sender_must_match: true,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    max_failures: Option<Spanned<u64>>,
    failure_window: Option<Text>,
    failure_delay: Option<Text>,
    sender_must_match: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerAuth {
    mechanisms: Option<Spanned<Vec<Mechanism>>>,
    require_tls: Option<bool>,
}

pub(super) fn convert_auth(raw: &RawAuth, checker: &mut Checker) -> AuthSettings {
    let defaults = AuthSettings::default();
    AuthSettings {
        max_failures: checker.bounded(
            "auth.max_failures",
            &raw.max_failures,
            u64::from(defaults.max_failures),
            1,
            10_000,
        ) as u32,
        failure_window: checker.duration(
            "auth.failure_window",
            &raw.failure_window,
            defaults.failure_window,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        ),
        failure_delay: checker.duration(
            "auth.failure_delay",
            &raw.failure_delay,
            defaults.failure_delay,
            Duration::ZERO,
            Duration::from_secs(30),
        ),
        sender_must_match: raw.sender_must_match.unwrap_or(defaults.sender_must_match),
    }
}

/// Converts `listeners[index].auth`. `has_tls` is true when the listener
/// has a certificate, which `require_tls` needs.
pub(super) fn convert_listener_auth(
    raw: &RawListenerAuth,
    index: usize,
    has_tls: bool,
    line: u64,
    checker: &mut Checker,
) -> ListenerAuth {
    let mut mechanisms = Vec::new();
    match &raw.mechanisms {
        Some(listed) => {
            for mechanism in &listed.value {
                if !mechanisms.contains(mechanism) {
                    mechanisms.push(*mechanism);
                }
            }
            if mechanisms.is_empty() {
                checker.problem(
                    format!("listeners[{index}].auth.mechanisms"),
                    listed.referenced.line(),
                    "no mechanism listed; list plain, login or both, or remove the auth key",
                );
            }
        }
        None => mechanisms = vec![Mechanism::Plain, Mechanism::Login],
    }
    let require_tls = raw.require_tls.unwrap_or(true);
    if require_tls && !has_tls {
        checker.problem(
            format!("listeners[{index}].auth.require_tls"),
            line,
            "AUTH requires TLS but the listener has no tls key; add a certificate or set require_tls: false",
        );
    }
    ListenerAuth {
        mechanisms,
        require_tls,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const QUEUE: &str = "queue:\n  url: postgres://postgres@127.0.0.1/x\n";

    #[test]
    fn defaults_when_auth_is_left_out() {
        let text = format!(
            "listeners:\n  - address: 127.0.0.1:2525\n    auth: {{require_tls: false}}\n{QUEUE}"
        );
        let config = Config::parse(&text, None).expect("valid");
        let auth = config.listeners[0].auth.as_ref().expect("auth on listener");
        assert_eq!(
            auth.mechanisms,
            vec![super::Mechanism::Plain, super::Mechanism::Login]
        );
        assert!(!auth.require_tls);
        assert_eq!(config.auth, super::AuthSettings::default());
    }

    #[test]
    fn listener_without_auth_key_offers_none() {
        let config = Config::parse("listeners:\n  - address: 127.0.0.1:2525\n", None)
            .expect("minimal config");
        assert!(config.listeners[0].auth.is_none());
    }

    #[test]
    fn auth_problems_are_reported() {
        let text = "\
listeners:
  - address: 127.0.0.1:2525
    auth:
      mechanisms: []
auth:
  max_failures: 0
  failure_window: soon
";
        let problems = Config::parse(text, None).expect_err("invalid");
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "listeners[0].auth.mechanisms",
            "listeners[0].auth.require_tls",
            "listeners[0].auth",
            "auth.max_failures",
            "auth.failure_window",
        ] {
            assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
        }
    }

    #[test]
    fn unknown_mechanism_is_rejected() {
        let text = format!(
            "listeners:\n  - address: 127.0.0.1:2525\n    auth: {{mechanisms: [cram-md5], require_tls: false}}\n{QUEUE}"
        );
        let problems = Config::parse(&text, None).expect_err("unknown mechanism");
        assert_eq!(problems[0].line, 3, "{problems:?}");
    }
}
