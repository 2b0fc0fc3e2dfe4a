//! Password hashes for SMTP AUTH: argon2id with the argon2 crate's default
//! parameters (argon2 0.6: 19 MiB of memory, 2 passes, 1 lane) and a random
//! 16-byte salt from the operating system's generator, stored as a PHC
//! string such as `$argon2id$v=19$m=19456,t=2,p=1$…`.
//!
//! Hashing and verification are slow on purpose (tens of milliseconds in a
//! release build), so async callers run them on the blocking thread pool.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// The hash that a login without a usable stored hash is checked against,
/// so such a login costs as much time as a real one. It is made once per
/// process with the same parameters as [`hash_password`], so its cost tracks
/// hashes set by `wsmtp accounts password`.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    hash_password(b"wsmtp dummy password for unknown logins")
        .unwrap_or_else(|error| panic!("argon2 cannot hash with its default parameters: {error}"))
});

/// Hashing failed; with default parameters only a failing random generator
/// causes this.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes a password with a fresh random salt and returns the PHC string.
///
/// # Errors
///
/// [`HashError`] when the operating system's random generator fails.
pub fn hash_password(password: &[u8]) -> Result<String, HashError> {
    Argon2::default()
        .hash_password(password)
        .map(|hash| hash.to_string())
        .map_err(|error| HashError(error.to_string()))
}

/// The result of checking a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    Match,
    Mismatch,
    /// The stored text is not a PHC string that argon2 can verify; the
    /// password was checked against the dummy hash instead, and fails.
    InvalidHash,
}

/// Checks a password against a stored PHC string. The comparison of the
/// hash outputs is in constant time (the `password-hash` crate's `Output`).
pub fn verify_password(stored: &str, password: &[u8]) -> Verification {
    let Ok(parsed) = PasswordHash::new(stored) else {
        verify_dummy(password);
        return Verification::InvalidHash;
    };
    match Argon2::default().verify_password(password, &parsed) {
        Ok(()) => Verification::Match,
        Err(argon2::password_hash::Error::PasswordInvalid) => Verification::Mismatch,
        Err(_) => {
            verify_dummy(password);
            Verification::InvalidHash
        }
    }
}

/// Spends the time of one verification; the result is always a mismatch.
pub fn verify_dummy(password: &[u8]) {
    if let Ok(parsed) = PasswordHash::new(&DUMMY_HASH) {
        let _ = Argon2::default().verify_password(password, &parsed);
    }
}

/// Makes the dummy hash now, so the first unknown login is not slower
/// than later ones.
pub fn prepare_dummy_hash() {
    LazyLock::force(&DUMMY_HASH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_with_default_parameters() {
        let hash = hash_password(b"correct horse").expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(!hash.contains("correct horse"));
    }

    #[test]
    fn salts_differ() {
        let first = hash_password(b"same").expect("hash");
        let second = hash_password(b"same").expect("hash");
        assert_ne!(first, second);
    }

    #[test]
    fn verification_outcomes() {
        let hash = hash_password(b"correct horse").expect("hash");
        assert_eq!(
            verify_password(&hash, b"correct horse"),
            Verification::Match
        );
        assert_eq!(
            verify_password(&hash, b"correct horsf"),
            Verification::Mismatch
        );
        assert_eq!(verify_password(&hash, b""), Verification::Mismatch);
        assert_eq!(
            verify_password("not a hash", b"correct horse"),
            Verification::InvalidHash
        );
        assert_eq!(
            verify_password("$unknown$v=1$abc$def", b"x"),
            Verification::InvalidHash
        );
    }

    #[test]
    fn dummy_hash_has_the_default_parameters() {
        assert!(
            DUMMY_HASH.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            *DUMMY_HASH
        );
    }
}
