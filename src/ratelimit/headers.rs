use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::decision::Decision;

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Header values for small numbers, made once: most limits and remainders are below 1024,
/// and a static value costs no allocation and no shared reference count per response.
fn number(n: u64) -> HeaderValue {
    static SMALL: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = SMALL.get_or_init(|| {
        (0..1024u32)
            .map(|i| HeaderValue::from_static(Box::leak(i.to_string().into_boxed_str())))
            .collect()
    });
    usize::try_from(n)
        .ok()
        .and_then(|i| table.get(i))
        .cloned()
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
        if matches!(self, Self::Legacy | Self::Both) && !headers.contains_key(&X_LIMIT) {
            headers.insert(X_LIMIT.clone(), number(decision.numbers.limit));
            headers.insert(X_REMAINING.clone(), number(decision.numbers.remaining));
            headers.insert(X_RESET.clone(), HeaderValue::from(decision.numbers.reset));
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
