//! Decoding of SASL responses in an SMTP AUTH exchange (RFC 4954): the
//! base64 lines, the PLAIN message (RFC 4616) and the two LOGIN values.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::reply::Reply;
use crate::auth::Credentials;

/// The LOGIN mechanism's challenges: base64 of `Username:` and `Password:`.
pub const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// Decodes one client response line, CRLF included or not. `*` cancels the
/// exchange and `=` is an empty initial response (RFC 4954).
///
/// # Errors
///
/// The reply that ends the exchange: 501 5.0.0 for `*`, 501 5.5.2 for
/// invalid base64.
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, Reply> {
    let text = line.strip_suffix(b"\r\n").unwrap_or(line);
    let text = text.trim_ascii();
    match text {
        b"*" => Err(Reply::auth_cancelled()),
        b"=" => Ok(Vec::new()),
        _ => STANDARD
            .decode(text)
            .map_err(|_| Reply::auth_invalid_base64()),
    }
}

/// Parses a PLAIN message: `[authzid] NUL authcid NUL password`, all UTF-8
/// except the password, which is checked as bytes.
///
/// # Errors
///
/// 501 5.5.2 when the message does not have that form or an identity is
/// empty or not UTF-8.
pub fn parse_plain(message: &[u8]) -> Result<Credentials, Reply> {
    let mut parts = message.split(|byte| *byte == 0);
    let (Some(authorization), Some(login), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reply::auth_malformed_response(
            "PLAIN expects authorization identity, NUL, user name, NUL, password",
        ));
    };
    let authorization = utf8(authorization, "authorization identity")?;
    let login = utf8(login, "user name")?;
    if login.is_empty() {
        return Err(Reply::auth_malformed_response("empty user name"));
    }
    if password.is_empty() {
        return Err(Reply::auth_malformed_response("empty password"));
    }
    Ok(Credentials {
        authorization: (!authorization.is_empty()).then_some(authorization),
        login,
        password: password.to_vec(),
    })
}

/// Checks a LOGIN user name.
///
/// # Errors
///
/// 501 5.5.2 when it is empty or not UTF-8.
pub fn parse_login_name(value: &[u8]) -> Result<String, Reply> {
    let login = utf8(value, "user name")?;
    if login.is_empty() {
        return Err(Reply::auth_malformed_response("empty user name"));
    }
    Ok(login)
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, Reply> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Reply::auth_malformed_response(&format!("{what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    #[test]
    fn responses_decode() {
        assert_eq!(
            decode_response(format!("{}\r\n", encode(b"abc")).as_bytes()),
            Ok(b"abc".to_vec())
        );
        assert_eq!(decode_response(b"=\r\n"), Ok(Vec::new()));
        assert_eq!(decode_response(b"*\r\n"), Err(Reply::auth_cancelled()));
        assert_eq!(
            decode_response(b"not base64!\r\n"),
            Err(Reply::auth_invalid_base64())
        );
        assert_eq!(
            decode_response(b"YWJj=\r\n"),
            Err(Reply::auth_invalid_base64())
        );
    }

    #[test]
    fn plain_message_parts() {
        let credentials = parse_plain(b"\0alice@example.com\0secret").expect("valid");
        assert_eq!(credentials.authorization, None);
        assert_eq!(credentials.login, "alice@example.com");
        assert_eq!(credentials.password, b"secret");

        let credentials = parse_plain(b"alice\0alice@example.com\0p\0ss").err();
        assert!(credentials.is_some(), "a fourth part is rejected");

        let credentials = parse_plain(b"bob\0alice\0secret").expect("valid");
        assert_eq!(credentials.authorization.as_deref(), Some("bob"));

        for malformed in [
            &b"alice\0secret"[..],
            b"\0\0secret",
            b"\0alice\0",
            b"\0\xff\0secret",
            b"",
        ] {
            let reply = parse_plain(malformed).expect_err("malformed");
            assert_eq!(reply.code(), 501, "{malformed:?}");
        }
    }

    #[test]
    fn login_challenges_decode_to_their_prompts() {
        assert_eq!(
            STANDARD.decode(USERNAME_CHALLENGE).expect("b64"),
            b"Username:"
        );
        assert_eq!(
            STANDARD.decode(PASSWORD_CHALLENGE).expect("b64"),
            b"Password:"
        );
        assert!(parse_login_name(b"").is_err());
        assert_eq!(parse_login_name(b"alice").as_deref(), Ok("alice"));
    }
}
