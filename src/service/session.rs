//! Session tokens for the management API: `kgs_<payload>.<tag>`, the payload (format,
//! expiry, the owner's credentials version, owner name) signed with HMAC-SHA256 under the
//! service's secret.
//!
//! Stateless, so every instance given the same secret accepts every instance's sessions,
//! and nothing is written per sign-in. A token ends at its expiry, and as soon as the
//! owner's credentials version moves on (a new password, the owner disabled: the owner is
//! read on every call), never to come back.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::clock::nanos_since_epoch;

const PREFIX: &str = "kgs_";
const VERSION: u8 = 2;
/// Domain separation: a tag made here cannot be one made for anything else with the key.
const CONTEXT: &[u8] = b"keygate session v2\0";
/// The longest token read (an owner name is at most 256 bytes).
const MAX_TOKEN: usize = 512;

/// The signing secret (at least 32 bytes), wiped when dropped.
#[derive(Clone)]
pub(crate) struct Signer {
    secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub(crate) fn new(secret: Vec<u8>) -> Self {
        Self {
            secret: Zeroizing::new(secret),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut mac = super::cursor::hmac(&self.secret);
        mac.update(CONTEXT);
        mac
    }

    /// A token for `owner` at credentials version `credentials`, valid until `expires`.
    pub(crate) fn issue(
        &self,
        owner: &str,
        credentials: u64,
        expires: SystemTime,
    ) -> Zeroizing<String> {
        let mut payload = Vec::with_capacity(17 + owner.len());
        payload.push(VERSION);
        payload.extend_from_slice(&(nanos_since_epoch(expires) / 1_000_000_000).to_be_bytes());
        payload.extend_from_slice(&credentials.to_be_bytes());
        payload.extend_from_slice(owner.as_bytes());
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        let mut token = Zeroizing::new(String::with_capacity(MAX_TOKEN));
        token.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// The owner a token names and the credentials version it was issued at, if its tag is
    /// right (compared in constant time) and it has not expired at `now`.
    pub(crate) fn verify(&self, token: &str, now: SystemTime) -> Option<(String, u64)> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let (payload, tag) = token.strip_prefix(PREFIX)?.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag).ok()?;
        let (&version, rest) = payload.split_first()?;
        let (expires, rest) = rest.split_at_checked(8)?;
        let (credentials, owner) = rest.split_at_checked(8)?;
        if version != VERSION {
            return None;
        }
        let expires = u64::from_be_bytes(expires.try_into().ok()?);
        let now_secs = nanos_since_epoch(now) / 1_000_000_000;
        if now_secs >= expires {
            return None;
        }
        let credentials = u64::from_be_bytes(credentials.try_into().ok()?);
        Some((String::from_utf8(owner.to_vec()).ok()?, credentials))
    }
}

/// `now + ttl`, saturating.
pub(crate) fn expiry(now: SystemTime, ttl: Duration) -> SystemTime {
    now.checked_add(ttl).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(vec![7; 32])
    }

    #[test]
    fn a_token_names_its_owner_until_it_expires() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = signer().issue("ada", 3, now + Duration::from_secs(900));
        assert!(token.starts_with("kgs_"));
        assert_eq!(signer().verify(&token, now), Some(("ada".to_owned(), 3)));
        assert_eq!(
            signer().verify(&token, now + Duration::from_secs(899)),
            Some(("ada".to_owned(), 3))
        );
        assert_eq!(
            signer().verify(&token, now + Duration::from_secs(900)),
            None
        );
    }

    #[test]
    fn forged_or_altered_tokens_are_refused() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = signer().issue("ada", 3, now + Duration::from_secs(900));
        // Another secret.
        assert_eq!(Signer::new(vec![8; 32]).verify(&token, now), None);
        // Another owner with the same tag.
        let (payload, tag) = token.split_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&payload[4..]).unwrap();
        *raw.last_mut().unwrap() = b'b';
        let forged = format!("kgs_{}.{tag}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(signer().verify(&forged, now), None);
        // A later expiry, or a later credentials version, with the same tag.
        for at in [1, 16] {
            raw = URL_SAFE_NO_PAD.decode(&payload[4..]).unwrap();
            raw[at] = 0xff;
            let forged = format!("kgs_{}.{tag}", URL_SAFE_NO_PAD.encode(&raw));
            assert_eq!(signer().verify(&forged, now), None);
        }
        // Truncated, empty, garbage, oversized.
        for bad in [
            "",
            "kgs_",
            "kgs_.",
            &token[..token.len() - 1],
            "Bearer x",
            &"a".repeat(10_000),
        ] {
            assert_eq!(signer().verify(bad, now), None, "{bad:.20}");
        }
    }
}
