use super::gcra::Step;
use crate::quota::Quota;
use crate::quota::RateLimit;

const SEC: u64 = 1_000_000_000;

/// A limiter's verdict on one request, reported for its most restrictive window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether every window admitted the request.
    pub allowed: bool,
    /// The reported window.
    pub quota: Quota,
    /// Its numbers: limit, remaining, reset, retry after.
    pub numbers: RateLimit,
    /// Seconds from now until `reset` (rounded up), for the IETF `RateLimit` field.
    pub reset_in: u64,
}

impl Decision {
    pub(crate) fn from_step(step: &Step, quota: &Quota, now: u64) -> Self {
        Self {
            allowed: step.allowed,
            quota: *quota,
            numbers: RateLimit {
                limit: u64::from(quota.capacity().get()),
                remaining: step.remaining,
                reset: step.full_at.div_ceil(SEC),
                retry_after: step.retry_after.div_ceil(SEC),
            },
            reset_in: step.full_at.saturating_sub(now).div_ceil(SEC),
        }
    }
}

/// Chooses the window to report: a refusing one (the longest wait) over any admitting one;
/// among admitting ones the fewest remaining, then the latest reset.
pub(crate) fn most_restrictive<'a>(
    steps: impl Iterator<Item = (&'a Quota, Step)>,
    now: u64,
) -> Option<Decision> {
    let mut best: Option<(&Quota, Step)> = None;
    for (quota, step) in steps {
        let better = match &best {
            None => true,
            Some((_, b)) => match (step.allowed, b.allowed) {
                (false, true) => true,
                (true, false) => false,
                (false, false) => step.retry_after > b.retry_after,
                (true, true) => {
                    (step.remaining, std::cmp::Reverse(step.full_at))
                        < (b.remaining, std::cmp::Reverse(b.full_at))
                }
            },
        };
        if better {
            best = Some((quota, step));
        }
    }
    best.map(|(quota, step)| Decision::from_step(&step, quota, now))
}
