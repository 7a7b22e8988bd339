//! Audit event ids as owners see them: a keyed permutation of the store's id, written as 16
//! hex digits.
//!
//! The store numbers events in one sequence for every owner, so the gaps between one
//! owner's ids would count everyone else's activity. Shown through a secret permutation
//! (a four-round Feistel network over the id's two 32-bit halves, HMAC-SHA256 as the round
//! function), the ids are distinct, stable across calls and instances sharing the session
//! secret, and say nothing of their neighbours; the service maps them back for `before`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const ROUNDS: u8 = 4;

/// The permutation's key, derived from the service's secret.
#[derive(Clone)]
pub(crate) struct EventIds {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for EventIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventIds(..)")
    }
}

/// HMAC-SHA256 under `key` (the service's one construction: event ids here, session
/// tokens in `session`). HMAC takes a key of any length, so this cannot fail.
pub(super) fn hmac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

impl EventIds {
    pub(crate) fn new(secret: &[u8]) -> Self {
        let mut mac = hmac(secret);
        mac.update(b"keygate audit event ids v1\0");
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        Self { key }
    }

    fn round(&self, round: u8, half: u32) -> u32 {
        let mut mac = hmac(&*self.key);
        mac.update(&[round]);
        mac.update(&half.to_be_bytes());
        let out = mac.finalize().into_bytes();
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }

    /// The id an owner sees for the store's event `id`.
    pub(crate) fn show(&self, id: u64) -> String {
        let (mut l, mut r) = ((id >> 32) as u32, id as u32);
        for i in 0..ROUNDS {
            (l, r) = (r, l ^ self.round(i, r));
        }
        format!("{:016x}", (u64::from(l) << 32) | u64::from(r))
    }

    /// The store's event id behind a shown one; `None` for anything [`show`](Self::show)
    /// did not write.
    pub(crate) fn read(&self, shown: &str) -> Option<u64> {
        if shown.len() != 16 || !shown.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let value = u64::from_str_radix(shown, 16).ok()?;
        let (mut l, mut r) = ((value >> 32) as u32, value as u32);
        for i in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.round(i, l), l);
        }
        Some((u64::from(l) << 32) | u64::from(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_hide_their_order() {
        let ids = EventIds::new(&[9; 32]);
        let shown: Vec<String> = (1..=50).map(|id| ids.show(id)).collect();
        for (i, s) in shown.iter().enumerate() {
            assert_eq!(s.len(), 16);
            assert_eq!(ids.read(s), Some(i as u64 + 1));
        }
        let mut sorted = shown.clone();
        sorted.sort();
        assert_ne!(sorted, shown, "shown ids do not sort like the store's");
        let unique: std::collections::HashSet<_> = shown.iter().collect();
        assert_eq!(unique.len(), shown.len());
        // Another secret, other ids.
        assert_ne!(EventIds::new(&[8; 32]).show(1), ids.show(1));
        for bad in [
            "",
            "12",
            "zzzzzzzzzzzzzzzz",
            "0123456789abcdef0",
            "+123456789abcdef",
        ] {
            assert_eq!(ids.read(bad), None, "{bad}");
        }
    }
}
