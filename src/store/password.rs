//! Owner passwords: argon2id, verified in constant time, with the same work done for an
//! unknown owner as for a known one.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::{BackendError, StoreError};
use crate::key::RandomError;

/// A PHC string (`$argon2id$v=19$…`) for `password`, with a fresh random salt.
pub(crate) fn hash(password: &str) -> Result<String, StoreError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(RandomError)?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| StoreError::Backend(BackendError::plain(format!("argon2 salt: {e}"))))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StoreError::Backend(BackendError::plain(format!("argon2: {e}"))))
}

/// Whether `password` matches `stored`. With no stored hash (an unknown owner, or an owner
/// without a password) a dummy hash is checked instead, so that the time taken does not
/// tell the cases apart; the answer is then always `false`.
pub(crate) fn verify(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash("keygate dummy password").unwrap_or_default());
    let (phc, real) = match stored {
        Some(phc) => (phc, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    // argon2's verifier compares the digests in constant time.
    let matches = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    matches && real
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_salted() {
        let a = hash("hunter2").unwrap();
        let b = hash("hunter2").unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "salted");
        assert!(verify("hunter2", Some(&a)));
        assert!(!verify("hunter3", Some(&a)));
        assert!(!verify("keygate dummy password", None));
        assert!(!verify("x", Some("not a phc string")));
    }
}
