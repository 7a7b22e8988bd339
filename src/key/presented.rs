//! The key a request presented, on its way to a lookup.

use std::cell::OnceCell;
use std::fmt;
use std::sync::OnceLock;

use siphasher::sip128::SipHasher24;

use super::KeyHash;

/// A key as a client presented it, on its way to a [`KeyLookup`](crate::lookup::KeyLookup):
/// the SHA-256 [`KeyHash`] that stores know keys by, computed on first use, and a
/// fingerprint that caches in this process know it by.
///
/// A lookup never reads the secret: it asks for [`hash`](Self::hash). Only
/// [`CachedLookup`](crate::lookup::CachedLookup) uses the fingerprint, so that a cache hit
/// costs no SHA-256 at all.
///
/// # Why the fingerprint is safe as a cache key
///
/// The fingerprint is SipHash-2-4 with a 128-bit output, keyed by 256 random bits drawn
/// from the OS once per process (two keys: one for secrets, one for hashes, so that the
/// two can never meet). SipHash is a pseudorandom function: without its key, outputs are
/// unpredictable and collisions cannot be aimed at. A cache hit on a wrong key needs a
/// client's made-up secret to collide with one of the `n` cached fingerprints: after `q`
/// guesses the chance is at most `q·n / 2¹²⁸` (a billion guesses against a million
/// cached keys: below 10⁻²¹), far below the chance of guessing a key outright, which the
/// failed-attempt lockout already bounds. The key never leaves the process memory, is
/// never printed, and differs on every start, so nothing learnt from one process (timing
/// of a fingerprint comparison included: fingerprints are ordinary 128-bit integers,
/// compared in variable time) says anything about another process or about a secret.
///
/// Should the OS refuse randomness, the fingerprint falls back to the first 128 bits of
/// the key's SHA-256 (and every lookup hashes, as without a cache): still collision-free in
/// practice, only not faster.
pub struct PresentedKey<'a> {
    source: Source<'a>,
    fingerprint: Fingerprint,
    hash: OnceCell<KeyHash>,
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Secret(&'a str),
    Hash(KeyHash),
}

impl<'a> PresentedKey<'a> {
    /// The key a client sent.
    pub fn new(secret: &'a str) -> Self {
        let (fingerprint, hash) = match prf() {
            Some(keys) => (
                Fingerprint(keys.secrets.hash(secret.as_bytes()).as_u128()),
                None,
            ),
            None => {
                let hash = KeyHash::of(secret);
                (Fingerprint::truncated(&hash), Some(hash))
            }
        };
        Self {
            source: Source::Secret(secret),
            fingerprint,
            hash: hash.map_or_else(OnceCell::new, OnceCell::from),
        }
    }

    /// A key known only by its hash (an admin tool that looks up a stored key).
    pub fn from_hash(hash: KeyHash) -> PresentedKey<'static> {
        let fingerprint = match prf() {
            Some(keys) => Fingerprint(keys.hashes.hash(hash.as_bytes()).as_u128()),
            None => Fingerprint::truncated(&hash),
        };
        PresentedKey {
            source: Source::Hash(hash),
            fingerprint,
            hash: OnceCell::from(hash),
        }
    }

    /// The SHA-256 of the key, computed on the first call.
    pub fn hash(&self) -> &KeyHash {
        self.hash.get_or_init(|| match self.source {
            Source::Secret(secret) => KeyHash::of(secret),
            Source::Hash(hash) => hash,
        })
    }

    /// Whether the SHA-256 was computed already (tests count the hashing).
    #[cfg(test)]
    pub(crate) fn is_hashed(&self) -> bool {
        self.hash.get().is_some()
    }

    /// The per-process fingerprint.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl From<KeyHash> for PresentedKey<'static> {
    fn from(hash: KeyHash) -> Self {
        Self::from_hash(hash)
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresentedKey(<redacted>)")
    }
}

/// A presented key's per-process fingerprint: 128 bits of keyed SipHash-2-4 (see
/// [`PresentedKey`]). Uniformly distributed, so its low bits serve as a hash as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint(pub(crate) u128);

impl Fingerprint {
    fn truncated(hash: &KeyHash) -> Self {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        Self(u128::from_le_bytes(bytes))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// The two keyed PRFs of this process, or `None` when the OS gave no randomness.
struct Prf {
    secrets: SipHasher24,
    hashes: SipHasher24,
}

fn prf() -> Option<&'static Prf> {
    static PRF: OnceLock<Option<Prf>> = OnceLock::new();
    PRF.get_or_init(|| {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).ok()?;
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&seed[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        let prf = Prf {
            secrets: SipHasher24::new_with_keys(word(0), word(1)),
            hashes: SipHasher24::new_with_keys(word(2), word(3)),
        };
        // Wiped: the keys live on only inside the hashers.
        seed.fill(0);
        Some(prf)
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_stores_hash_and_computed_once_on_demand() {
        let key = PresentedKey::new("kg_live_abc");
        assert!(!key.is_hashed());
        assert_eq!(*key.hash(), KeyHash::of("kg_live_abc"));
        assert!(key.is_hashed());
        let known = PresentedKey::from_hash(KeyHash::of("kg_live_abc"));
        assert_eq!(*known.hash(), KeyHash::of("kg_live_abc"));
    }

    #[test]
    fn fingerprints_are_per_secret_and_keyed() {
        let a = PresentedKey::new("kg_live_a").fingerprint();
        assert_eq!(a, PresentedKey::new("kg_live_a").fingerprint());
        assert_ne!(a, PresentedKey::new("kg_live_b").fingerprint());
        // Keyed: not the hash's first bytes, and a hash is not mistaken for a secret.
        assert_ne!(a, Fingerprint::truncated(&KeyHash::of("kg_live_a")));
        assert_ne!(
            a,
            PresentedKey::from_hash(KeyHash::of("kg_live_a")).fingerprint()
        );
    }

    #[test]
    fn debug_shows_nothing_of_the_key() {
        let text = format!("{:?}", PresentedKey::new("kg_live_abc"));
        assert!(!text.contains("abc"), "{text}");
    }

    /// Held in the third hunt. The fingerprint is a per-process secret-derived value:
    /// its `Debug` (reached through the auth layer's `Found`) prints none of its bits, and a
    /// cache's `Debug` shows neither the secrets nor the hashes it holds.
    #[test]
    fn fingerprints_and_caches_print_nothing_of_their_keys() {
        let key = PresentedKey::new("kg_live_abc");
        let fingerprint = key.fingerprint();
        let text = format!("{fingerprint:?} {key:?}");
        for shown in [
            fingerprint.0.to_string(),
            format!("{:x}", fingerprint.0),
            format!("{:x}", fingerprint.0 as u64),
            (fingerprint.0 as u64).to_string(),
        ] {
            assert!(!text.contains(&shown), "{text}");
        }
        let cache = crate::lookup::CachedLookup::new(|_: KeyHash| async {
            Ok::<_, crate::error::BoxError>(None)
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            use crate::lookup::KeyLookup;
            cache.lookup(&key).await.unwrap();
        });
        let text = format!("{cache:?}");
        assert!(!text.contains("abc"), "{text}");
        assert!(!text.contains(&key.hash().to_hex()[..12]), "{text}");
    }
}
