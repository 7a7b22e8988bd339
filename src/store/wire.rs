//! How a change names its keys between instances: lower-case hex hashes, comma-separated,
//! at most [`HASHES_PER_PAYLOAD`] in one payload (6 499 bytes, well under PostgreSQL's
//! 8 000-byte `NOTIFY` limit). Used by PostgreSQL's `NOTIFY` and by the Redis channel.

use crate::key::KeyHash;

/// Hashes in one payload: 64 hex digits and a comma each.
pub(crate) const HASHES_PER_PAYLOAD: usize = 100;

/// The payloads that name these hashes (none for none).
pub(crate) fn payloads(hashes: &[KeyHash]) -> impl Iterator<Item = String> + '_ {
    hashes.chunks(HASHES_PER_PAYLOAD).map(|chunk| {
        let mut payload = String::with_capacity(chunk.len() * 65);
        for (i, hash) in chunk.iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(&hash.to_hex());
        }
        payload
    })
}

/// The hashes a payload names, or `None` when any part of it is not a hash (payloads are
/// untrusted: anyone who can connect may send one).
#[cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]
pub(crate) fn parse(payload: &str) -> Option<Vec<KeyHash>> {
    if payload.len() > HASHES_PER_PAYLOAD * 65 {
        return None;
    }
    payload
        .split(',')
        .map(|part| KeyHash::from_hex(part).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_parse_back() {
        let hashes: Vec<KeyHash> = (0..2_345).map(|i| KeyHash::of(&format!("k{i}"))).collect();
        let written: Vec<String> = payloads(&hashes).collect();
        assert_eq!(written.len(), 24);
        let mut back = Vec::new();
        for payload in &written {
            assert!(payload.len() < 7_000, "{}", payload.len());
            back.extend(parse(payload).expect("our own payload"));
        }
        assert_eq!(back, hashes);
        assert_eq!(payloads(&[]).count(), 0);
    }

    #[test]
    fn malformed_payloads_are_refused_whole() {
        let good = KeyHash::of("a").to_hex();
        for (case, payload) in [
            ("empty", String::new()),
            ("garbage", "garbage".to_owned()),
            ("trailing comma", format!("{good},")),
            ("one bad of two", format!("{good},zz")),
            ("short", good[..63].to_owned()),
            ("too long", vec![good.as_str(); 101].join(",")),
            ("non-ascii", "\u{e9}".repeat(32)),
        ] {
            assert_eq!(parse(&payload), None, "{case}");
        }
        assert_eq!(
            parse(&good.to_uppercase()),
            Some(vec![KeyHash::of("a")]),
            "hex is read in either case"
        );
    }
}
