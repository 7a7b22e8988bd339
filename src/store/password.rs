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

/// [`hash`], on tokio's blocking pool: argon2 takes tens of milliseconds on purpose, which
/// must not stall the async workers serving other requests. Without a runtime, here.
pub(crate) async fn hash_off_thread(password: Option<&str>) -> Result<Option<String>, StoreError> {
    let Some(password) = password else {
        return Ok(None);
    };
    let password = zeroize::Zeroizing::new(password.to_owned());
    off_thread(move || hash(&password))
        .await
        .unwrap_or_else(|| {
            Err(StoreError::Backend(BackendError::plain(
                "argon2: the blocking pool is shutting down",
            )))
        })
        .map(Some)
}

/// [`verify`], on tokio's blocking pool (see [`hash_off_thread`]).
pub(crate) async fn verify_off_thread(password: &str, stored: Option<String>) -> bool {
    let password = zeroize::Zeroizing::new(password.to_owned());
    off_thread(move || verify(&password, stored.as_deref()))
        .await
        .unwrap_or(false)
}

/// Runs `work` on tokio's blocking pool when there is a runtime, here otherwise. `None`
/// when the runtime is shutting down; a panic in `work` is passed on.
async fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => match handle.spawn_blocking(work).await {
            Ok(value) => Some(value),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        },
        Err(_) => Some(work()),
    }
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

    /// A sign-in does not hold the async worker while argon2 runs: on a one-thread runtime,
    /// another task makes progress before the check ends (inline, the check would finish in
    /// its first poll, before the other task ran at all).
    #[tokio::test(flavor = "current_thread")]
    async fn argon2_runs_off_the_async_worker() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stored = hash("hunter2").unwrap();
        let ticks = AtomicUsize::new(0);
        let done = AtomicBool::new(false);
        let (seen, ()) = tokio::join!(
            async {
                let ok = verify_off_thread("hunter2", Some(stored)).await;
                done.store(true, Ordering::Relaxed);
                assert!(ok);
                ticks.load(Ordering::Relaxed)
            },
            async {
                while !done.load(Ordering::Relaxed) {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        );
        assert!(seen > 0, "the check held the only worker");
    }
}
