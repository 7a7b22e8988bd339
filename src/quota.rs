//! Rate-limit quotas: `n` requests per period with a burst, as text (`60/min;10`) or in
//! code, shared by key records and the limiters.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The numbers a limiter reports for the most restrictive window of a key: the
/// `X-RateLimit-*` headers, and a 429's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// The window's capacity.
    pub limit: u64,
    /// Requests left now.
    pub remaining: u64,
    /// Unix seconds when the bucket is full again (rounded up).
    pub reset: u64,
    /// Whole seconds to wait before a retry can succeed (rounded up; 0 when admitted).
    pub retry_after: u64,
}

/// The most windows (quotas) one key may have, e.g. 10 a second and 1000 an hour.
pub const MAX_WINDOWS: usize = 8;

/// A token bucket: `capacity` requests at once (the burst), refilled at `capacity` per
/// `period`, one token every `period / capacity`.
///
/// Constructors read the way people speak: `Quota::per_minute(n)` is *n requests a minute*
/// (a burst of `n`, one more every `60 s / n`). Nothing can be zero.
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use keygate::ratelimit::Quota;
///
/// let sixty = NonZeroU32::new(60).unwrap();
/// let q = Quota::per_minute(sixty);
/// assert_eq!(q.capacity().get(), 60);
/// assert_eq!(q.period(), Duration::from_secs(60));
/// assert_eq!(q.interval(), Duration::from_secs(1));
/// assert_eq!("60/min".parse::<Quota>().unwrap(), q);
/// // 10 at once, refilled at 60 a minute:
/// assert_eq!(q.with_burst(NonZeroU32::new(10).unwrap()).capacity().get(), 10);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Quota {
    capacity: NonZeroU32,
    /// Nanoseconds per token, at least 1.
    interval_ns: u64,
    /// The rate as spoken: `count` per `per`.
    count: NonZeroU32,
    per: Duration,
}

/// The longest a bucket may take to refill: 100 years. Time arithmetic stays far from
/// overflow, and no sensible quota needs more.
pub(crate) const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 86_400);
const MAX_REFILL_NS: u64 = 100 * 365 * 86_400 * 1_000_000_000;

/// `n`, or 1 for 0: for defaults written as literals.
pub(crate) const fn nonzero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

const fn nanos(d: Duration) -> u64 {
    let n = d.as_nanos();
    if n > u64::MAX as u128 {
        u64::MAX
    } else {
        n as u64
    }
}

impl Quota {
    /// `n` requests per `period`, burst `n`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] when `period` is zero, [`ConfigError::InvalidQuota`] when it is
    /// longer than 100 years.
    pub fn new(n: NonZeroU32, period: Duration) -> Result<Self, ConfigError> {
        if period.is_zero() {
            return Err(ConfigError::Zero("quota period"));
        }
        if period > MAX_REFILL {
            return Err(ConfigError::InvalidQuota(format!(
                "{n} per {}s: the period is longer than 100 years",
                period.as_secs()
            )));
        }
        Ok(Self::make(n, period))
    }

    const fn make(n: NonZeroU32, period: Duration) -> Self {
        let interval = nanos(period) / n.get() as u64;
        Self {
            capacity: n,
            interval_ns: if interval == 0 { 1 } else { interval },
            count: n,
            per: period,
        }
    }

    /// `n` requests a second.
    pub const fn per_second(n: NonZeroU32) -> Self {
        Self::make(n, Duration::from_secs(1))
    }

    /// `n` requests a minute.
    pub const fn per_minute(n: NonZeroU32) -> Self {
        Self::make(n, Duration::from_secs(60))
    }

    /// `n` requests an hour.
    pub const fn per_hour(n: NonZeroU32) -> Self {
        Self::make(n, Duration::from_secs(3600))
    }

    /// `n` requests a day.
    pub const fn per_day(n: NonZeroU32) -> Self {
        Self::make(n, Duration::from_secs(86_400))
    }

    /// The same refill rate with a different burst. A burst whose refill would take longer
    /// than 100 years is lowered to the largest that does not.
    #[must_use]
    pub const fn with_burst(mut self, capacity: NonZeroU32) -> Self {
        let most = MAX_REFILL_NS / self.interval_ns;
        let most = if most > u32::MAX as u64 {
            u32::MAX
        } else {
            most as u32
        };
        self.capacity = if (capacity.get() as u64) > most as u64 {
            nonzero(most)
        } else {
            capacity
        };
        self
    }

    /// The most requests admitted at once: `X-RateLimit-Limit`.
    pub const fn capacity(&self) -> NonZeroU32 {
        self.capacity
    }

    /// Time to refill one token.
    pub const fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// Time to refill an empty bucket.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.burst_ns())
    }

    pub(crate) const fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// `capacity × interval`: how far ahead of now the bucket's clock may run.
    pub(crate) const fn burst_ns(&self) -> u64 {
        self.interval_ns.saturating_mul(self.capacity.get() as u64)
    }

    /// Parses `60/min`, `10/s`, `1000/hour`, `5000/day`, or a burst form `10/s;burst=20`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidQuota`] naming the input.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidQuota(text.to_owned());
        let (rate, burst) = match text.split_once(';') {
            Some((rate, burst)) => (rate, Some(burst.trim())),
            None => (text, None),
        };
        let (count, unit) = rate.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count).ok_or_else(bad)?;
        let unit = unit.trim();
        let period = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            // Any other period, as Display writes it: 120s, 500ms, 250ns.
            _ => {
                let (digits, make): (&str, fn(u64) -> Duration) =
                    if let Some(d) = unit.strip_suffix("ms") {
                        (d, Duration::from_millis)
                    } else if let Some(d) = unit.strip_suffix("ns") {
                        (d, Duration::from_nanos)
                    } else if let Some(d) = unit.strip_suffix('s') {
                        (d, Duration::from_secs)
                    } else {
                        return Err(bad());
                    };
                let n: u64 = digits.parse().map_err(|_| bad())?;
                make(n)
            }
        };
        if period.is_zero() || period > MAX_REFILL {
            return Err(bad());
        }
        let mut quota = Self::make(count, period);
        if let Some(burst) = burst {
            let value = burst.strip_prefix("burst=").ok_or_else(bad)?;
            let value: u32 = value.trim().parse().map_err(|_| bad())?;
            let value = NonZeroU32::new(value).ok_or_else(bad)?;
            quota = quota.with_burst(value);
            if quota.capacity != value {
                // The burst would take longer than MAX_REFILL to refill.
                return Err(bad());
            }
        }
        Ok(quota)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.count)?;
        let per = self.per;
        match per.as_secs() {
            1 if per.subsec_nanos() == 0 => f.write_str("s")?,
            60 if per.subsec_nanos() == 0 => f.write_str("min")?,
            3600 if per.subsec_nanos() == 0 => f.write_str("hour")?,
            86_400 if per.subsec_nanos() == 0 => f.write_str("day")?,
            secs if per.subsec_nanos() == 0 => write!(f, "{secs}s")?,
            _ if per.subsec_nanos() % 1_000_000 == 0 => write!(f, "{}ms", per.as_millis())?,
            _ => write!(f, "{}ns", per.as_nanos())?,
        }
        if self.capacity != self.count {
            write!(f, ";burst={}", self.capacity)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Quota({self})")
    }
}

impl FromStr for Quota {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Quota {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Quota> for String {
    fn from(q: Quota) -> Self {
        q.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn parse_table() {
        let cases = [
            ("60/min", Some(Quota::per_minute(nz(60)))),
            ("10/s", Some(Quota::per_second(nz(10)))),
            ("1000/hour", Some(Quota::per_hour(nz(1000)))),
            ("5000/day", Some(Quota::per_day(nz(5000)))),
            (
                "10/s;burst=20",
                Some(Quota::per_second(nz(10)).with_burst(nz(20))),
            ),
            ("0/min", None),
            (
                "5/120s",
                Some(Quota::new(nz(5), Duration::from_secs(120)).unwrap()),
            ),
            (
                "10/500ms",
                Some(Quota::new(nz(10), Duration::from_millis(500)).unwrap()),
            ),
            (
                "10/2s;burst=50",
                Some(
                    Quota::new(nz(10), Duration::from_secs(2))
                        .unwrap()
                        .with_burst(nz(50)),
                ),
            ),
            ("1/0s", None),
            ("1/day;burst=200000", None),
            ("1/5000000000s", None),
            ("60", None),
            ("60/fortnight", None),
            ("-1/s", None),
            ("10/s;burst=0", None),
            ("10/s;bust=2", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(Quota::parse(text).ok(), expected, "{text}");
            if let Some(q) = expected {
                assert_eq!(
                    Quota::parse(&q.to_string()).unwrap(),
                    q,
                    "round trip {text}"
                );
            }
        }
        assert!(Quota::parse("0/min")
            .unwrap_err()
            .to_string()
            .contains("0/min"));
    }

    #[test]
    fn arithmetic() {
        let q = Quota::per_minute(nz(60));
        assert_eq!(q.interval(), Duration::from_secs(1));
        assert_eq!(q.period(), Duration::from_secs(60));
        let fast = Quota::new(nz(u32::MAX), Duration::from_nanos(1)).unwrap();
        assert_eq!(fast.interval_ns(), 1);
        assert!(Quota::new(nz(1), Duration::ZERO).is_err());
        assert!(Quota::new(nz(1), Duration::from_secs(u64::MAX)).is_err());
        // A burst that would take more than 100 years to refill is lowered.
        let day = Quota::per_day(nz(1)).with_burst(nz(200_000));
        assert!(day.period() <= MAX_REFILL);
        let json = serde_json::to_string(&Quota::per_hour(nz(1000))).unwrap();
        assert_eq!(json, "\"1000/hour\"");
    }
}
