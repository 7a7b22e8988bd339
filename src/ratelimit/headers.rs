use std::cell::RefCell;

use bytes::BytesMut;
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

/// The header values of a decision's limit, remaining tokens and reset time, made without
/// allocating in the common cases:
///
/// - numbers below 10 000 (most limits and remainders) are static;
/// - a limit and a reset time (Unix seconds, the same for a second) come from small
///   per-thread tables of the last ones made, one table each so that a hot key's limit and
///   reset never evict each other: formatted once per thread, and a clone is a
///   reference-count increment on memory no other thread touches;
/// - other numbers (the remaining tokens of a large quota, which seldom repeat) are written
///   into a per-thread block of 256 bytes that the values made from it share: one
///   allocation per dozen numbers or more, instead of one or two per value (a value an
///   application keeps keeps its block, 256 bytes, alive).
fn values(limit: u64, remaining: u64, reset: u64) -> [HeaderValue; 3] {
    if limit < STATIC_BELOW && remaining < STATIC_BELOW && reset < STATIC_BELOW {
        return [limit, remaining, reset].map(|n| small(n).unwrap_or_else(|| HeaderValue::from(n)));
    }
    thread_local! {
        static MADE: RefCell<Made> = RefCell::new(Made::default());
    }
    MADE.try_with(|made| {
        let mut made = made.try_borrow_mut().ok()?;
        let Made {
            limits,
            resets,
            room,
        } = &mut *made;
        Some([
            recent(limits, limit),
            small(remaining).unwrap_or_else(|| formatted(room, remaining)),
            recent(resets, reset),
        ])
    })
    .ok()
    .flatten()
    .unwrap_or_else(|| [limit, remaining, reset].map(HeaderValue::from))
}

const SLOTS: usize = 8;

/// What one thread made: see [`values`].
#[derive(Default)]
struct Made {
    limits: [Option<(u64, HeaderValue)>; SLOTS],
    resets: [Option<(u64, HeaderValue)>; SLOTS],
    room: BytesMut,
}

/// The value of `n` from `table`, made (and kept there) on a miss.
fn recent(table: &mut [Option<(u64, HeaderValue)>; SLOTS], n: u64) -> HeaderValue {
    if let Some(value) = small(n) {
        return value;
    }
    match table.get_mut((n % SLOTS as u64) as usize) {
        Some(Some((number, value))) if *number == n => value.clone(),
        // A value kept in the table gets its own bytes: a shared block would stay alive
        // as long as the table holds one of its values.
        Some(slot) => {
            let value = HeaderValue::from(n);
            *slot = Some((n, value.clone()));
            value
        }
        None => HeaderValue::from(n),
    }
}

/// The static value of a number below [`STATIC_BELOW`].
fn small(n: u64) -> Option<HeaderValue> {
    if n < STATIC_BELOW {
        let at = n as usize * 4;
        if let Some(text) = DIGITS.get(at..at + digits(n)) {
            return Some(HeaderValue::from_static(text));
        }
    }
    None
}

/// `n` written into `room` (a fresh block when this one is full), as a value sharing it.
fn formatted(room: &mut BytesMut, n: u64) -> HeaderValue {
    const BLOCK: usize = 256;
    let mut buf = [0u8; 20];
    let text = decimal(n, &mut buf);
    if room.capacity() - room.len() < text.len() {
        *room = BytesMut::with_capacity(BLOCK);
    }
    room.extend_from_slice(text);
    HeaderValue::from_maybe_shared(room.split().freeze()).unwrap_or_else(|_| HeaderValue::from(n))
}

/// `n` in decimal, written at the end of `buf`: two digits a step, from a table of the
/// pairs `00` to `99`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    const PAIRS: [u8; 200] = {
        let mut out = [0u8; 200];
        let mut i = 0;
        while i < 100 {
            out[i * 2] = b'0' + (i / 10) as u8;
            out[i * 2 + 1] = b'0' + (i % 10) as u8;
            i += 1;
        }
        out
    };
    let mut at = buf.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        buf[at] = PAIRS[pair];
        buf[at + 1] = PAIRS[pair + 1];
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        buf[at] = PAIRS[pair];
        buf[at + 1] = PAIRS[pair + 1];
    } else {
        at -= 1;
        buf[at] = b'0' + n as u8;
    }
    &buf[at..]
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
                let numbers = &decision.numbers;
                let [limit, remaining, reset] =
                    values(numbers.limit, numbers.remaining, numbers.reset);
                slot.insert(limit);
                headers.insert(X_REMAINING.clone(), remaining);
                headers.insert(X_RESET.clone(), reset);
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

    /// `n` made as a limit, checked to read the same made as remaining and as a reset.
    fn number(n: u64) -> HeaderValue {
        let [limit, remaining, reset] = values(n, n, n);
        assert_eq!(limit, remaining);
        assert_eq!(limit, reset);
        limit
    }

    /// `n` made as the remaining tokens, beside a static limit and a far reset time.
    fn fresh(n: u64) -> HeaderValue {
        let [limit, remaining, reset] = values(60, n, n ^ (1 << 62));
        assert_eq!(limit, "60");
        assert_eq!(reset.to_str().unwrap(), (n ^ (1 << 62)).to_string());
        remaining
    }

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

    fn decision(limit: u64, remaining: u64, reset: u64) -> Decision {
        Decision {
            allowed: true,
            quota: crate::quota::Quota::per_minute(crate::quota::nonzero(60)),
            numbers: crate::quota::RateLimit {
                limit,
                remaining,
                reset,
                retry_after: 0,
            },
            reset_in: 1,
        }
    }

    /// Held in the fourth hunt. Every number to 20 000 and around every power of ten and of
    /// two up to u64::MAX reads back as written, interleaved so that the per-thread slots
    /// are replaced between two uses of one number; the static table's edges (9 999, 10 000)
    /// included.
    #[test]
    fn every_number_to_twenty_thousand_and_the_edges_read_back() {
        for n in 0..20_000u64 {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
            assert_eq!(fresh(n).to_str().unwrap(), n.to_string());
            let far = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63;
            assert_eq!(number(far).to_str().unwrap(), far.to_string());
            assert_eq!(fresh(far).to_str().unwrap(), far.to_string());
            // The same slot (n % 8) again, other number: both stay right.
            assert_eq!(number(far + 8).to_str().unwrap(), (far + 8).to_string());
            assert_eq!(number(far).to_str().unwrap(), far.to_string());
        }
        for shift in 0..64 {
            for n in [(1u64 << shift) - 1, 1 << shift, (1 << shift) + 1] {
                assert_eq!(number(n).to_str().unwrap(), n.to_string());
                assert_eq!(fresh(n).to_str().unwrap(), n.to_string());
            }
        }
        let mut ten = 1u64;
        while let Some(next) = ten.checked_mul(10) {
            for n in [ten - 1, ten, ten + 1, next - 1] {
                assert_eq!(number(n).to_str().unwrap(), n.to_string());
            }
            ten = next;
        }
        for n in [u64::MAX, u64::MAX - 1, u64::MAX - 8, 10_000, 9_999] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
            assert_eq!(fresh(n).to_str().unwrap(), n.to_string());
        }
        // From other threads too (their own tables).
        std::thread::scope(|scope| {
            for t in 0..2u64 {
                scope.spawn(move || {
                    for n in (10_000 + t..30_000).step_by(2) {
                        assert_eq!(number(n).to_str().unwrap(), n.to_string());
                    }
                });
            }
        });
    }

    /// Held in the fourth hunt. An inner layer's headers are never overwritten by an outer
    /// one's, in every style; a limit header set by the application keeps the whole legacy
    /// group out, as before `try_entry`.
    #[test]
    fn an_inner_layers_headers_are_left_alone() {
        for style in [HeaderStyle::Legacy, HeaderStyle::Both, HeaderStyle::Ietf] {
            let mut headers = HeaderMap::new();
            style.apply(&decision(5, 4, 1_700_000_001), &mut headers);
            let inner = headers.clone();
            style.apply(&decision(60_000, 59_999, 1_800_000_000), &mut headers);
            assert_eq!(headers, inner, "{style:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(X_LIMIT.clone(), HeaderValue::from_static("app"));
        HeaderStyle::Legacy.apply(&decision(5, 4, 1), &mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[&X_LIMIT], "app");
        let mut headers = HeaderMap::new();
        HeaderStyle::Legacy.apply(&decision(u64::MAX, 0, u64::MAX), &mut headers);
        assert_eq!(headers[&X_LIMIT], u64::MAX.to_string().as_str());
        assert_eq!(headers[&X_REMAINING], "0");
        assert_eq!(headers[&X_RESET], u64::MAX.to_string().as_str());
    }
}
