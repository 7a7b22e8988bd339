use std::cell::RefCell;

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::decision::Decision;

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Every number below [`STATIC_BELOW`] in decimal, one per 4-byte slot, left-aligned:
/// static header values for most limits and remainders, with no table to build and
/// nothing allocated.
const STATIC_BELOW: u64 = 10_000;
static DIGITS: &str = {
    const LEN: usize = STATIC_BELOW as usize * 4;
    static BYTES: [u8; LEN] = {
        let mut out = [b'0'; LEN];
        let mut n = 0;
        while n < STATIC_BELOW as usize {
            let len = digits(n as u64);
            let mut rest = n;
            let mut i = len;
            while i > 0 {
                i -= 1;
                out[n * 4 + i] = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            n += 1;
        }
        out
    };
    match std::str::from_utf8(&BYTES) {
        Ok(text) => text,
        Err(_) => panic!("digits are ASCII"),
    }
};

const fn digits(n: u64) -> usize {
    if n < 10 {
        1
    } else if n < 100 {
        2
    } else if n < 1000 {
        3
    } else {
        4
    }
}

/// The header value of a number, made without allocating in the common cases:
///
/// - numbers below 10 000 (most limits and remainders) are static;
/// - others come from a small per-thread table of the last ones made, keyed by value: a
///   key's limit, and the reset time (Unix seconds, the same for a second), are formatted
///   once per thread, and a clone is a reference-count increment on memory no other thread
///   touches.
fn number(n: u64) -> HeaderValue {
    if n < STATIC_BELOW {
        let at = n as usize * 4;
        if let Some(text) = DIGITS.get(at..at + digits(n)) {
            return HeaderValue::from_static(text);
        }
    }
    const SLOTS: usize = 8;
    thread_local! {
        static RECENT: RefCell<[Option<(u64, HeaderValue)>; SLOTS]> =
            const { RefCell::new([const { None }; SLOTS]) };
    }
    RECENT
        .try_with(|recent| {
            let mut recent = recent.try_borrow_mut().ok()?;
            let slot = recent.get_mut((n % SLOTS as u64) as usize)?;
            match slot {
                Some((number, value)) if *number == n => Some(value.clone()),
                _ => {
                    let value = HeaderValue::from(n);
                    *slot = Some((n, value.clone()));
                    Some(value)
                }
            }
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// Which rate-limit headers go on responses of limited requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (Unix seconds):
    /// the default, what most clients read.
    #[default]
    Legacy,
    /// The IETF draft fields (draft-ietf-httpapi-ratelimit-headers):
    /// `RateLimit-Policy: "60/min";q=60;w=60` and `RateLimit: "60/min";r=12;t=48`.
    Ietf,
    /// Both of the above.
    Both,
    /// No rate-limit headers (`Retry-After` still goes on a 429).
    None,
}

impl HeaderStyle {
    /// Writes the headers for `decision`. A header already present is left alone, so an
    /// inner, more specific limiter's numbers win over an outer one's.
    pub fn apply(self, decision: &Decision, headers: &mut HeaderMap) {
        if matches!(self, Self::Legacy | Self::Both) {
            // One hash and probe both asks and fills.
            if let Ok(Entry::Vacant(slot)) = headers.try_entry(X_LIMIT.clone()) {
                slot.insert(number(decision.numbers.limit));
                headers.insert(X_REMAINING.clone(), number(decision.numbers.remaining));
                headers.insert(X_RESET.clone(), number(decision.numbers.reset));
            }
        }
        if matches!(self, Self::Ietf | Self::Both) && !headers.contains_key(&RATELIMIT) {
            let name = decision.quota.to_string();
            let window = decision.quota.period().as_secs().max(1);
            let policy = format!(
                "\"{name}\";q={};w={window}",
                decision.quota.capacity().get()
            );
            let limit = format!(
                "\"{name}\";r={};t={}",
                decision.numbers.remaining, decision.reset_in
            );
            if let (Ok(policy), Ok(limit)) =
                (HeaderValue::try_from(policy), HeaderValue::try_from(limit))
            {
                headers.insert(POLICY.clone(), policy);
                headers.insert(RATELIMIT.clone(), limit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_as_written() {
        for n in (0..12_000).chain([1_700_000_000, 1_700_000_008, u64::MAX, 1_700_000_000]) {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
        // Two numbers in one slot replace each other and both stay right.
        for n in [2_000_000_000u64, 2_000_000_008, 2_000_000_000] {
            assert_eq!(number(n), HeaderValue::from(n));
        }
    }
}
