//! The envelope of one SMTP transaction, as the session hands it to the
//! transaction handler: sender, MAIL parameters and accepted recipients.

use smtp_proto::{
    MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8,
    RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS,
};

use crate::policy::address::Address;

/// BODY parameter of MAIL (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

impl BodyType {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
        }
    }
}

/// RET parameter of MAIL (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnReturn {
    Full,
    Headers,
}

impl DsnReturn {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnReturn::Full => "FULL",
            DsnReturn::Headers => "HDRS",
        }
    }
}

/// MAIL FROM parameters that wsmtp supports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParameters {
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<DsnReturn>,
    /// ENVID, decoded from xtext.
    pub envid: Option<String>,
}

impl MailParameters {
    /// Converts parsed MAIL flags; BINARYMIME is not offered, so it is an error.
    pub fn from_flags(
        flags: u64,
        size: usize,
        envid: Option<String>,
    ) -> Result<MailParameters, &'static str> {
        if flags & MAIL_BODY_BINARYMIME != 0 {
            return Err("BODY=BINARYMIME");
        }
        let body = if flags & MAIL_BODY_8BITMIME != 0 {
            Some(BodyType::EightBitMime)
        } else if flags & smtp_proto::MAIL_BODY_7BIT != 0 {
            Some(BodyType::SevenBit)
        } else {
            None
        };
        let ret = if flags & MAIL_RET_FULL != 0 {
            Some(DsnReturn::Full)
        } else if flags & MAIL_RET_HDRS != 0 {
            Some(DsnReturn::Headers)
        } else {
            None
        };
        Ok(MailParameters {
            size: (size > 0).then_some(size as u64),
            body,
            smtputf8: flags & MAIL_SMTPUTF8 != 0,
            ret,
            envid,
        })
    }
}

/// NOTIFY parameter of RCPT (RFC 3461 §4.1), kept as given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notify(u64);

impl Notify {
    pub fn from_flags(flags: u64) -> Option<Notify> {
        let bits = flags
            & (RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY);
        (bits != 0).then_some(Notify(bits))
    }

    /// The parameter value, e.g. `SUCCESS,FAILURE` or `NEVER`.
    pub fn value(self) -> String {
        if self.0 & RCPT_NOTIFY_NEVER != 0 {
            return "NEVER".to_string();
        }
        let mut parts = Vec::new();
        for (bit, name) in [
            (RCPT_NOTIFY_SUCCESS, "SUCCESS"),
            (RCPT_NOTIFY_FAILURE, "FAILURE"),
            (RCPT_NOTIFY_DELAY, "DELAY"),
        ] {
            if self.0 & bit != 0 {
                parts.push(name);
            }
        }
        parts.join(",")
    }
}

/// A recipient as requested by RCPT, after syntax checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub address: Address,
    /// True for `<Postmaster>` written without a domain (RFC 5321 §4.5.1);
    /// `address` is then postmaster at the server's host name.
    pub bare_postmaster: bool,
    /// ORCPT address (type rfc822), decoded from xtext.
    pub orcpt: Option<String>,
    pub notify: Option<Notify>,
}

/// The envelope of the open transaction.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// Queue id: names the transaction in logs, Received headers and the queue.
    pub id: uuid::Uuid,
    /// None for the null reverse-path `<>`.
    pub sender: Option<Address>,
    pub parameters: MailParameters,
    pub recipients: Vec<Recipient>,
}

impl Envelope {
    /// The sender as written in logs and in the queue: empty for `<>`.
    pub fn sender_text(&self) -> String {
        self.sender
            .as_ref()
            .map(Address::to_smtp)
            .unwrap_or_default()
    }

    pub fn queue_id(&self) -> String {
        self.id.simple().to_string()
    }
}

/// Encodes a value as xtext (RFC 3461 §4): `+`, `=`, controls, space and
/// non-ASCII bytes become `+XX`.
pub fn xtext_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    #[test]
    fn notify_values() {
        assert_eq!(
            Notify::from_flags(RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY).map(Notify::value),
            Some("FAILURE,DELAY".into())
        );
        assert_eq!(
            Notify::from_flags(RCPT_NOTIFY_NEVER).map(Notify::value),
            Some("NEVER".into())
        );
        assert_eq!(Notify::from_flags(0), None);
    }
}
