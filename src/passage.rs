//! What keygate's layers tell each other about a request, in request extensions that only
//! they can read: a route layer inside a `Router::layer` of the same state learns that the
//! key was accepted already, and what was charged for it.

use std::sync::atomic::{AtomicU64, Ordering};

/// One layer state (a gate, a limiter), named by a number from a counter: never reused,
/// never an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerId(u64);

impl LayerId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Put in a request by the auth layer that accepted its key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Accepted(pub(crate) LayerId);

/// The tokens a limiter charged to a request's bucket so far.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Charged {
    pub(crate) by: LayerId,
    pub(crate) tokens: u32,
}
