//! Key material: the secret ([`ApiKey`]), its stored form ([`KeyHash`]), the key on its way
//! to a lookup ([`PresentedKey`]), the public identifier ([`KeyId`]) and the key format
//! ([`KeyFormat`]).
//!
//! A generated key reads `<prefix><24 random characters><6 checksum characters>`, for
//! example `kg_live_4fJ0qkVd9sLq2mXcB7tRwZ1a0k3XyB`. The random part comes from the OS
//! CSPRNG in a base62 alphabet (about 143 bits of entropy, safe in any header, URL or
//! shell). The checksum is the CRC-32 of prefix and random part, so a mistyped, truncated or
//! random string is refused by [`KeyFormat::check`] before any lookup is spent on it. The
//! checksum is public: someone set on guessing can still forge well-formed keys, which reach
//! the lookup (and are cached as unknown); the failed-attempt limiter is what stops a flood
//! of those.
//!
//! ```
//! use keygate::key::{KeyFormat, KeyHash};
//! use keygate::key::Environment;
//!
//! let format = KeyFormat::new("kg_live_", "qk_").unwrap();
//! let key = format.generate(Environment::Test).unwrap();
//! assert!(key.expose_secret().starts_with("qk_"));
//! assert_eq!(format.check(key.expose_secret()), Ok(Some(Environment::Test)));
//! // The secret never shows through `Debug` or `Display`.
//! assert!(!format!("{key:?} {key}").contains(key.expose_secret()));
//! // Stores keep only the hash.
//! assert_eq!(key.hash(), KeyHash::of(key.expose_secret()));
//! ```

mod presented;

pub(crate) use presented::Fingerprint;
pub use presented::PresentedKey;

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::ConfigError;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in a generated key: 24 × log2(62) ≈ 142.9 bits of entropy.
pub(crate) const RANDOM_LEN: usize = 24;
/// Checksum characters in a generated key: the CRC-32 of prefix and random part in base62.
pub(crate) const CHECKSUM_LEN: usize = 6;
/// Longest prefix [`KeyFormat`] accepts.
pub(crate) const MAX_PREFIX_LEN: usize = 32;

/// An API key as a client presents it: the secret.
///
/// `Debug` and `Display` print `ApiKey(<redacted>)`; the only way to read the secret is
/// [`ApiKey::expose_secret`], and the memory is zeroed on drop.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

/// Constant-time in the contents (the lengths are not secret).
impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ApiKey {}

impl ApiKey {
    /// Wraps a secret, for instance one read from a configuration file.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Zeroizing::new(secret.into()))
    }

    /// The secret itself. Show it once to its owner, never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The SHA-256 hash that stores know the key by.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// The key as a lookup takes it.
    pub fn presented(&self) -> PresentedKey<'_> {
        PresentedKey::new(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The SHA-256 of a key: what stores keep and look keys up by.
///
/// Equality is constant-time. Keys are high-entropy random strings, so an unsalted fast
/// hash is the right tool here (as for GitHub or Stripe tokens): a password hash would only
/// slow every request down without making a 143-bit secret any harder to guess.
#[derive(Clone, Copy)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Wraps 32 raw hash bytes, as read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 64 bits: uniformly distributed, a hash table's hash as they are.
    pub(crate) fn prefix(&self) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(word)
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }

    /// Parses 64 hex characters.
    ///
    /// # Errors
    ///
    /// [`InvalidHash`] when the text is not 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, InvalidHash> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(InvalidHash);
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or(InvalidHash)?;
            let lo = hex_value(pair[1]).ok_or(InvalidHash)?;
            *slot = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl PartialEq for KeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyHash {}

impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The value is already a uniform digest; its first 8 bytes are plenty for a table.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(head));
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        write!(f, "KeyHash({}…)", &hex[..12])
    }
}

/// The public identifier of a key: safe to log, to show in dashboards and to put in URLs.
///
/// Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyId(Arc<str>);

impl KeyId {
    /// Wraps an existing identifier.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// A fresh random identifier, `key_` followed by 16 base62 characters.
    ///
    /// # Errors
    ///
    /// [`RandomError`] when the OS random source fails.
    pub fn generate() -> Result<Self, RandomError> {
        let mut id = String::with_capacity(20);
        id.push_str("key_");
        push_random(&mut id, 16)?;
        Ok(Self(id.into()))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The OS random source failed (keys and ids come from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the OS random source failed")]
pub struct RandomError(#[source] pub getrandom::Error);

/// A key hash that is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid key hash: expected 64 hex digits")]
pub struct InvalidHash;

/// Why [`KeyFormat::check`] refused a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// No configured prefix, or the wrong length after it.
    #[error("the key does not have the expected prefix and length")]
    Shape,
    /// A character outside the base62 alphabet.
    #[error("the key contains a character outside its alphabet")]
    Alphabet,
    /// The checksum does not match: a typo, a truncated copy or an invented key.
    #[error("the key checksum does not match")]
    Checksum,
}

/// How keys look: a prefix per environment, a random base62 body, a CRC-32 checksum.
///
/// [`KeyFormat::default`] uses `kg_live_` and `kg_test_`. [`KeyFormat::any`] accepts keys
/// of any shape (keys imported from an older system); they then go to the lookup unchecked.
#[derive(Clone, Debug)]
pub struct KeyFormat {
    inner: Option<Prefixes>,
}

#[derive(Clone, Debug)]
struct Prefixes {
    live: Box<str>,
    test: Box<str>,
}

impl Default for KeyFormat {
    fn default() -> Self {
        Self {
            inner: Some(Prefixes {
                live: "kg_live_".into(),
                test: "kg_test_".into(),
            }),
        }
    }
}

impl KeyFormat {
    /// A format with the given prefixes, e.g. `KeyFormat::new("mid_live_", "qk_")`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidPrefix`] when a prefix is empty, longer than
    /// 32 bytes, not visible ASCII, or both prefixes are equal.
    pub fn new(live_prefix: &str, test_prefix: &str) -> Result<Self, ConfigError> {
        for prefix in [live_prefix, test_prefix] {
            if prefix.is_empty()
                || prefix.len() > MAX_PREFIX_LEN
                || !prefix.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::InvalidPrefix(prefix.to_owned()));
            }
        }
        if live_prefix == test_prefix {
            return Err(ConfigError::InvalidPrefix(test_prefix.to_owned()));
        }
        Ok(Self {
            inner: Some(Prefixes {
                live: live_prefix.into(),
                test: test_prefix.into(),
            }),
        })
    }

    /// Accepts any visible-ASCII key without a format or checksum check: for keys issued
    /// by another system. Generating keys still uses the default prefixes.
    pub fn any() -> Self {
        Self { inner: None }
    }

    /// The prefix of an environment's keys.
    pub fn prefix(&self, environment: Environment) -> &str {
        match (&self.inner, environment) {
            (Some(p), Environment::Live) => &p.live,
            (Some(p), Environment::Test) => &p.test,
            (None, Environment::Live) => "kg_live_",
            (None, Environment::Test) => "kg_test_",
        }
    }

    /// Generates a key for an environment from the OS CSPRNG.
    ///
    /// # Errors
    ///
    /// [`RandomError`] when the OS random source fails.
    pub fn generate(&self, environment: Environment) -> Result<ApiKey, RandomError> {
        let prefix = self.prefix(environment);
        let mut key = String::with_capacity(prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
        key.push_str(prefix);
        push_random(&mut key, RANDOM_LEN)?;
        let crc = crc32fast::hash(key.as_bytes());
        push_base62_fixed(&mut key, crc);
        Ok(ApiKey(Zeroizing::new(key)))
    }

    /// Checks shape and checksum without any I/O. Returns the environment the prefix names,
    /// or `None` for [`KeyFormat::any`].
    ///
    /// # Errors
    ///
    /// A [`FormatError`] saying what is wrong.
    pub fn check(&self, candidate: &str) -> Result<Option<Environment>, FormatError> {
        let Some(prefixes) = &self.inner else {
            return Ok(None);
        };
        // The length decides between prefixes where one starts the other (`sk_`, `sk_test_`):
        // two distinct prefixes of one length cannot both match.
        let body_len = RANDOM_LEN + CHECKSUM_LEN;
        let (environment, rest) = [
            (Environment::Live, &*prefixes.live),
            (Environment::Test, &*prefixes.test),
        ]
        .into_iter()
        .find_map(|(env, prefix)| {
            candidate
                .strip_prefix(prefix)
                .filter(|rest| rest.len() == body_len)
                .map(|rest| (env, rest))
        })
        .ok_or(FormatError::Shape)?;
        // One branch-free pass over the body, of a length known here, in arithmetic rather
        // than table lookups so that it compiles to a few wide compares.
        let Ok(body) = <&[u8; RANDOM_LEN + CHECKSUM_LEN]>::try_from(rest.as_bytes()) else {
            return Err(FormatError::Shape);
        };
        if !body.iter().fold(true, |ok, &byte| ok & is_base62(byte)) {
            return Err(FormatError::Alphabet);
        }
        let checksum = rest
            .as_bytes()
            .get(RANDOM_LEN..)
            .unwrap_or(&[])
            .iter()
            .fold(0u64, |sum, &byte| {
                sum * 62 + u64::from(BASE62[usize::from(byte)])
            });
        let body = &candidate[..candidate.len() - CHECKSUM_LEN];
        let expected = u64::from(crc32fast::hash(body.as_bytes()));
        if bool::from(checksum.ct_eq(&expected)) {
            Ok(Some(environment))
        } else {
            Err(FormatError::Checksum)
        }
    }
}

/// Whether `byte` is in [`ALPHABET`] (`0-9`, `A-Z`, `a-z`), without a table: setting bit
/// 0x20 folds `A-Z` onto `a-z` and moves nothing else into that range.
const fn is_base62(byte: u8) -> bool {
    (byte.wrapping_sub(b'0') < 10) | ((byte | 0x20).wrapping_sub(b'a') < 26)
}

/// Base62 digit values by byte; 0xff for bytes outside the alphabet.
const BASE62: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 62 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// `prefix` followed by `n` uniformly random base62 characters from the OS CSPRNG (client
/// ids and client secrets are made so).
pub(crate) fn random_base62(prefix: &str, n: usize) -> Result<String, RandomError> {
    let mut out = String::with_capacity(prefix.len() + n);
    out.push_str(prefix);
    push_random(&mut out, n)?;
    Ok(out)
}

/// Appends `n` uniformly random base62 characters (rejection sampling, no modulo bias).
fn push_random(out: &mut String, n: usize) -> Result<(), RandomError> {
    let mut pushed = 0;
    let mut buf = [0u8; 64];
    while pushed < n {
        getrandom::fill(&mut buf).map_err(RandomError)?;
        for byte in buf {
            // 248 = 4 × 62: bytes at or above it would bias the alphabet.
            if byte < 248 {
                out.push(char::from(ALPHABET[usize::from(byte % 62)]));
                pushed += 1;
                if pushed == n {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn push_base62_fixed(out: &mut String, value: u32) {
    let mut digits = [b'0'; CHECKSUM_LEN];
    let mut v = value;
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    out.extend(digits.iter().map(|&d| char::from(d)));
}

/// The environment a key belongs to: live keys touch real data, test keys do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Production traffic.
    Live,
    /// Sandbox traffic.
    Test,
}

impl Environment {
    /// `"live"` or `"test"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = UnknownEnvironment;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "live" => Ok(Self::Live),
            "test" => Ok(Self::Test),
            _ => Err(UnknownEnvironment(s.to_owned())),
        }
    }
}

/// An environment name other than `live` or `test`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown environment {0:?}: expected \"live\" or \"test\"")]
pub struct UnknownEnvironment(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic alphabet test agrees with the table on every byte.
    #[test]
    fn the_alphabet_test_agrees_with_the_table() {
        for byte in 0..=u8::MAX {
            assert_eq!(
                is_base62(byte),
                BASE62[usize::from(byte)] != 0xff,
                "{byte:#04x}"
            );
        }
    }

    /// The README gives GitHub `\bkg_(live|test)_[0-9A-Za-z]{30}\b` for secret scanning:
    /// every generated key matches it.
    #[test]
    fn generated_keys_match_the_pattern_registered_with_github() {
        let format = KeyFormat::default();
        for environment in [Environment::Live, Environment::Test] {
            for _ in 0..200 {
                let key = format.generate(environment).unwrap();
                let body = key
                    .expose_secret()
                    .strip_prefix(format.prefix(environment))
                    .unwrap();
                assert_eq!(body.len(), 30);
                assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()), "{body}");
            }
        }
    }

    #[test]
    fn generated_keys_pass_their_own_check_and_are_distinct() {
        let format = KeyFormat::default();
        let a = format.generate(Environment::Live).unwrap();
        let b = format.generate(Environment::Live).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 8 + RANDOM_LEN + CHECKSUM_LEN);
        assert_eq!(format.check(a.expose_secret()), Ok(Some(Environment::Live)));
        let t = format.generate(Environment::Test).unwrap();
        assert!(t.expose_secret().starts_with("kg_test_"));
        assert_eq!(format.check(t.expose_secret()), Ok(Some(Environment::Test)));
    }

    #[test]
    fn custom_prefix_as_in_the_mid_docs() {
        let format = KeyFormat::new("mid_live_", "qk_").unwrap();
        let key = format.generate(Environment::Test).unwrap();
        assert!(key.expose_secret().starts_with("qk_"));
        assert_eq!(
            format.check(key.expose_secret()),
            Ok(Some(Environment::Test))
        );
        // The MID sample key is not in our format: refused before any lookup.
        assert_eq!(
            format.check("qk_63ccde4e11274c33b9255224"),
            Err(FormatError::Shape)
        );
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let format = KeyFormat::default();
        let key = format.generate(Environment::Live).unwrap();
        let secret = key.expose_secret();
        let prefix_len = format.prefix(Environment::Live).len();
        for i in prefix_len..secret.len() {
            for &replacement in ALPHABET {
                if secret.as_bytes()[i] == replacement {
                    continue;
                }
                let mut bytes = secret.as_bytes().to_vec();
                bytes[i] = replacement;
                let typo = String::from_utf8(bytes).unwrap();
                assert_eq!(format.check(&typo), Err(FormatError::Checksum), "{i}");
            }
        }
    }

    #[test]
    fn check_edge_cases() {
        let format = KeyFormat::default();
        let key = format.generate(Environment::Live).unwrap();
        let s = key.expose_secret();
        let cases: &[(&str, String, FormatError)] = &[
            ("empty", String::new(), FormatError::Shape),
            ("prefix only", "kg_live_".into(), FormatError::Shape),
            ("truncated", s[..s.len() - 1].into(), FormatError::Shape),
            ("extended", format!("{s}0"), FormatError::Shape),
            (
                "unknown prefix",
                s.replacen("kg_live_", "kg_prod_", 1),
                FormatError::Shape,
            ),
            (
                "punctuation in body",
                format!("{}-{}", &s[..9], &s[10..]),
                FormatError::Alphabet,
            ),
            (
                "swapped env",
                s.replacen("kg_live_", "kg_test_", 1),
                FormatError::Checksum,
            ),
        ];
        for (name, input, expected) in cases {
            assert_eq!(format.check(input), Err(*expected), "{name}");
        }
    }

    #[test]
    fn invalid_prefixes_are_config_errors() {
        for (live, test) in [("", "t_"), ("a b", "t_"), ("same", "same"), ("é_", "t_")] {
            assert!(KeyFormat::new(live, test).is_err(), "{live:?} {test:?}");
        }
        assert!(KeyFormat::new(&"x".repeat(33), "t_").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let key = ApiKey::new("kg_live_supersecret");
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.to_string(), "<redacted>");
    }

    #[test]
    fn hash_hex_round_trip_and_equality() {
        let h = KeyHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyHash::from_hex(&h.to_hex()).unwrap(), h);
        assert_ne!(KeyHash::of("abd"), h);
        assert!(KeyHash::from_hex("zz").is_err());
        assert!(KeyHash::from_hex(&"g".repeat(64)).is_err());
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn key_ids_are_random() {
        let a = KeyId::generate().unwrap();
        let b = KeyId::generate().unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("key_"));
        assert_eq!(a.as_str().len(), 20);
    }

    // The fourth hunt: the branch-free alphabet fold and the checksum.

    /// The check as it was before the branch-free fold: digit by digit, out at the first
    /// byte outside the alphabet.
    fn old_check(format: &KeyFormat, candidate: &str) -> Result<Option<Environment>, FormatError> {
        let Some(prefixes) = &format.inner else {
            return Ok(None);
        };
        let body_len = RANDOM_LEN + CHECKSUM_LEN;
        let (environment, rest) = [
            (Environment::Live, &*prefixes.live),
            (Environment::Test, &*prefixes.test),
        ]
        .into_iter()
        .find_map(|(env, prefix)| {
            candidate
                .strip_prefix(prefix)
                .filter(|rest| rest.len() == body_len)
                .map(|rest| (env, rest))
        })
        .ok_or(FormatError::Shape)?;
        let mut checksum: u64 = 0;
        for (i, byte) in rest.bytes().enumerate() {
            let value = BASE62[usize::from(byte)];
            if value == 0xff {
                return Err(FormatError::Alphabet);
            }
            if i >= RANDOM_LEN {
                checksum = checksum * 62 + u64::from(value);
            }
        }
        let body = &candidate[..candidate.len() - CHECKSUM_LEN];
        if checksum == u64::from(crc32fast::hash(body.as_bytes())) {
            Ok(Some(environment))
        } else {
            Err(FormatError::Checksum)
        }
    }

    /// Held in the fourth hunt. Every ASCII byte in every position of prefix and body, every
    /// multi-byte UTF-8 character of the same byte length in every position, the largest
    /// checksum digits, and prefixes that start one another: the check never panics, refuses
    /// every byte outside the alphabet, and agrees with the old check on every input.
    #[test]
    fn every_byte_in_every_position_agrees_with_the_old_check() {
        let formats = [
            KeyFormat::default(),
            KeyFormat::new("sk_", "sk_test_").unwrap(),
            KeyFormat::new("sk_test_", "sk_").unwrap(),
            KeyFormat::new("a", "ab").unwrap(),
        ];
        let mut seen = 0;
        for format in &formats {
            for env in [Environment::Live, Environment::Test] {
                let key = format.generate(env).unwrap();
                let secret = key.expose_secret();
                let prefix_len = format.prefix(env).len();
                assert_eq!(format.check(secret), Ok(Some(env)));
                let mut check = |candidate: &str| {
                    let new = format.check(candidate);
                    assert_eq!(new, old_check(format, candidate), "{candidate:?}");
                    seen += 1;
                    new
                };
                for i in 0..secret.len() {
                    for b in 0..=127u8 {
                        let mut bytes = secret.as_bytes().to_vec();
                        bytes[i] = b;
                        let candidate = String::from_utf8(bytes).unwrap();
                        let got = check(&candidate);
                        if i >= prefix_len && BASE62[usize::from(b)] == 0xff {
                            assert_eq!(got, Err(FormatError::Alphabet), "{b:#04x} at {i}");
                        }
                        if candidate != secret && got.is_ok() {
                            // Only another prefix of this format may still match.
                            assert!(i < prefix_len, "{candidate:?} passed");
                        }
                    }
                    for wide in ["é", "€", "😀", "\u{80}"] {
                        if i + wide.len() > secret.len() {
                            continue;
                        }
                        let candidate =
                            format!("{}{wide}{}", &secret[..i], &secret[i + wide.len()..]);
                        assert_eq!(candidate.len(), secret.len());
                        assert!(check(&candidate).is_err(), "{candidate:?}");
                    }
                }
                // The largest digits: a checksum far above u32::MAX, no overflow.
                let body = &secret[..secret.len() - CHECKSUM_LEN];
                assert_eq!(
                    check(&format!("{body}{}", "z".repeat(CHECKSUM_LEN))),
                    Err(FormatError::Checksum)
                );
                // The other environment's prefix on this body, and no prefix at all.
                let other = match env {
                    Environment::Live => Environment::Test,
                    Environment::Test => Environment::Live,
                };
                let swapped = format!("{}{}", format.prefix(other), &secret[prefix_len..]);
                assert!(check(&swapped).is_err());
                assert_eq!(check(&secret[prefix_len..]), Err(FormatError::Shape));
            }
        }
        assert!(seen > 30_000);
    }
}
