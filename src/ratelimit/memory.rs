use std::fmt;
use std::future::Ready;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::decision::most_restrictive;
use super::decision::Decision;
use super::gcra::{is_full, step, Step};
use super::store::{BucketKey, LimiterStore};
use crate::answer::Answer;
use crate::clock::{Clock, CoarseClock};
use crate::error::ConfigError;
use crate::quota::Quota;
use crate::quota::MAX_WINDOWS;

/// Cells one bucket holds at most: the windows of two routes that share it.
const MAX_CELLS: usize = 2 * MAX_WINDOWS;

/// Buckets tracked at most by default.
pub(crate) const DEFAULT_MAX_BUCKETS: usize = 1_000_000;

const SHARDS: usize = 64;
/// A shard is swept for full buckets every this many new buckets.
const SWEEP_EVERY: usize = 1024;

/// Token buckets in memory: one `AtomicU64` per (key, window), updated by a
/// compare-and-swap loop, in a lock-free map ([papaya]) split in 64 shards.
///
/// - No lock and no allocation once a key's bucket exists.
/// - A bucket is created only when a request is admitted; a refusal against a full bucket
///   (a cost above the capacity) creates nothing.
/// - **Eviction is built in.** A full bucket holds no information (it reads the same as no
///   bucket), so every 1024 new buckets a shard drops its full ones; no task to spawn,
///   no sweep to call.
/// - **Hard cap** ([`max_buckets`](MemoryLimiterBuilder::max_buckets), default 1 000 000). At the
///   cap the whole store is swept for full buckets (at most once a second); if none was
///   full, the new key is refused with [`LimiterError::Full`] (the layers answer 503
///   `auth_unavailable` and log a warning) rather than grow without bound or forget the
///   state of keys being limited. Keys that already have a bucket are not affected.
///   Memory per tracked bucket is in BENCHMARKS.md.
///
/// Clones share one store.
pub struct MemoryLimiter<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    shards: Box<[Shard<K>]>,
    hasher: ahash::RandomState,
    clock: Arc<dyn Clock>,
    max: usize,
    /// Buckets tracked, kept on insert and sweep (never on the hot path).
    total: AtomicUsize,
    /// When the whole store was last swept because it was at its cap.
    last_full_sweep: AtomicU64,
}

struct Shard<K> {
    map: papaya::HashMap<K, Bucket, ahash::RandomState>,
    created: AtomicUsize,
}

/// One key's windows, each cell tagged with the quota it counts (see [`tag`]), so that
/// requests naming different sets of windows for one bucket (two routes sharing a bucket
/// name, a key's quotas changed) each charge the cells of their own quotas and share the
/// ones they have in common, instead of starting the bucket afresh. Up to two cells live
/// inside the map entry itself (no allocation of their own, one cache line fewer per
/// request); more go to the heap.
enum Bucket {
    /// Tag 0: no window in that cell.
    Inline([AtomicU64; 2], [u32; 2]),
    /// One pointer, so that the two-window bucket stays as small as it was.
    Heap(Box<HeapCells>),
}

/// More than two windows: their cells and tags.
type HeapCells = (Box<[AtomicU64]>, Box<[u32]>);

/// A quota's tag in a bucket: the two numbers its GCRA steps depend on, mixed into 32
/// bits, never 0. Two different quotas of one bucket sharing a tag (about one chance in
/// four billion) would share a cell: each still limits, by the stricter state.
fn tag(quota: &Quota) -> u32 {
    let mixed = (u64::from(quota.capacity().get()) ^ quota.interval_ns().rotate_left(29))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((mixed >> 32) as u32).max(1)
}

impl Bucket {
    /// A bucket of these windows, each starting from `tats` (0: full).
    fn with(windows: impl ExactSizeIterator<Item = (u32, u64)>) -> Self {
        if windows.len() <= 2 {
            let mut cells = [AtomicU64::new(0), AtomicU64::new(0)];
            let mut tags = [0; 2];
            for (i, (tag, tat)) in windows.enumerate().take(2) {
                tags[i] = tag;
                cells[i] = AtomicU64::new(tat);
            }
            Self::Inline(cells, tags)
        } else {
            let (tags, cells): (Vec<u32>, Vec<AtomicU64>) =
                windows.map(|(tag, tat)| (tag, AtomicU64::new(tat))).unzip();
            Self::Heap(Box::new((
                cells.into_boxed_slice(),
                tags.into_boxed_slice(),
            )))
        }
    }

    fn new(quotas: &[Quota]) -> Self {
        Self::with(quotas.iter().map(|q| (tag(q), 0)))
    }

    fn cells(&self) -> &[AtomicU64] {
        match self {
            Self::Inline(cells, tags) => {
                let len = tags.iter().take_while(|t| **t != 0).count();
                cells.get(..len).unwrap_or(cells)
            }
            Self::Heap(heap) => &heap.0,
        }
    }

    fn tags(&self) -> &[u32] {
        match self {
            Self::Inline(_, tags) => {
                let len = tags.iter().take_while(|t| **t != 0).count();
                tags.get(..len).unwrap_or(tags)
            }
            Self::Heap(heap) => &heap.1,
        }
    }

    /// The cell of each quota, in order; `None` when one has no cell here.
    fn positions(&self, quotas: &[Quota]) -> Option<[usize; MAX_WINDOWS]> {
        let tags = self.tags();
        let mut at = [0; MAX_WINDOWS];
        for (slot, quota) in at.iter_mut().zip(quotas) {
            let tag = tag(quota);
            *slot = tags.iter().position(|t| *t == tag)?;
        }
        Some(at)
    }

    /// This bucket with a cell for each of `quotas` added: the cells it has keep their
    /// state. A bucket holds up to [`MAX_CELLS`], so that two routes of up to
    /// [`MAX_WINDOWS`] windows each share one bucket for good; past that (a third set of
    /// windows on one bucket), cells no quota here names go first.
    fn widened(&self, quotas: &[Quota]) -> Self {
        let mut windows: Vec<(u32, u64)> = quotas
            .iter()
            .map(|q| {
                let tag = tag(q);
                let tat = self
                    .tags()
                    .iter()
                    .position(|t| *t == tag)
                    .and_then(|i| self.cells().get(i))
                    .map_or(0, |c| c.load(Ordering::Acquire));
                (tag, tat)
            })
            .collect();
        for (tag, cell) in self.tags().iter().zip(self.cells()) {
            if windows.len() < MAX_CELLS && !windows.iter().any(|(t, _)| t == tag) {
                windows.push((*tag, cell.load(Ordering::Acquire)));
            }
        }
        windows.dedup_by_key(|(t, _)| *t);
        Self::with(windows.into_iter())
    }

    fn is_full(&self, now: u64) -> bool {
        self.cells()
            .iter()
            .all(|c| is_full(c.load(Ordering::Acquire), now))
    }
}

/// The shard of a key's hash. papaya hashes the key again with the same seed, indexes its
/// table with the low bits and tags slots with the top 7: the shard takes bits from the
/// middle, so that neither is the same for every key of a shard (with the top bits, every
/// probe in a shard compared keys, and a get at 10 000 keys cost 780 instructions).
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// Why the in-memory limiter could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimiterError {
    /// The store tracks as many buckets as its cap allows, none of them full.
    #[error("the rate limiter tracks its maximum number of buckets")]
    Full,
    /// No quota, or more than [`MAX_WINDOWS`].
    #[error("a bucket needs between 1 and 8 quotas, got {0}")]
    Windows(usize),
}

/// Settings for a [`MemoryLimiter`], from [`MemoryLimiter::builder`].
#[must_use]
pub struct MemoryLimiterBuilder<K> {
    max: usize,
    clock: Arc<dyn Clock>,
    key: std::marker::PhantomData<fn(K)>,
}

impl<K> fmt::Debug for MemoryLimiterBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiterBuilder")
            .field("max_buckets", &self.max)
            .finish_non_exhaustive()
    }
}

impl<K: BucketKey> MemoryLimiterBuilder<K> {
    /// The most buckets tracked at once (default 1 000 000).
    pub fn max_buckets(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// Reads time from `clock` (a [`FakeClock`](crate::clock::FakeClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] when the cap is 0.
    pub fn build(self) -> Result<MemoryLimiter<K>, ConfigError> {
        if self.max == 0 {
            return Err(ConfigError::Zero("max buckets"));
        }
        Ok(MemoryLimiter::build(self.max, self.clock))
    }
}

impl<K> Clone for MemoryLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: BucketKey> fmt::Debug for MemoryLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("buckets", &self.len())
            .field("max_buckets", &self.inner.max)
            .finish_non_exhaustive()
    }
}

impl<K: BucketKey> Default for MemoryLimiter<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: BucketKey> MemoryLimiter<K> {
    /// A store on the system clock, capped at 1 000 000 buckets.
    pub fn new() -> Self {
        Self::build(DEFAULT_MAX_BUCKETS, Arc::new(CoarseClock))
    }

    /// A store with settings of your own: its cap, its clock.
    pub fn builder() -> MemoryLimiterBuilder<K> {
        MemoryLimiterBuilder {
            max: DEFAULT_MAX_BUCKETS,
            clock: Arc::new(CoarseClock),
            key: std::marker::PhantomData,
        }
    }

    /// A store capped at `max` (above 0) on `clock`.
    pub(crate) fn build(max: usize, clock: Arc<dyn Clock>) -> Self {
        let hasher = ahash::RandomState::new();
        let shards = (0..SHARDS)
            .map(|_| Shard {
                map: papaya::HashMap::builder().hasher(hasher.clone()).build(),
                created: AtomicUsize::new(0),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                shards,
                hasher,
                clock,
                max,
                total: AtomicUsize::new(0),
                last_full_sweep: AtomicU64::new(0),
            }),
        }
    }

    /// Buckets tracked now.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.map.len()).sum()
    }

    /// Whether no bucket is tracked (one atomic load: cheap enough for every request).
    pub fn is_empty(&self) -> bool {
        self.inner.total.load(Ordering::Relaxed) == 0
    }

    /// Drops every full bucket now (the store also does this by itself).
    pub fn sweep(&self) {
        let now = self.inner.clock.now_nanos();
        for shard in self.inner.shards.iter() {
            self.sweep_shard(shard, now);
        }
    }

    fn sweep_shard(&self, shard: &Shard<K>, now: u64) {
        let mut removed = 0usize;
        shard.map.pin().retain(|_, b| {
            let keep = !b.is_full(now);
            removed += usize::from(!keep);
            keep
        });
        let _ = self
            .inner
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(removed))
            });
    }

    fn shard(&self, key: &K) -> &Shard<K> {
        &self.inner.shards[shard_of(self.inner.hasher.hash_one(key))]
    }

    /// Decides a request of `cost` against `key`'s bucket. See [`LimiterStore::check`].
    ///
    /// # Errors
    ///
    /// [`LimiterError`] when the store is at its cap or `quotas` has the wrong length.
    pub fn decide(&self, key: &K, quotas: &[Quota], cost: u32) -> Result<Decision, LimiterError> {
        if quotas.is_empty() || quotas.len() > MAX_WINDOWS {
            return Err(LimiterError::Windows(quotas.len()));
        }
        let now = self.inner.clock.now_nanos();
        let shard = self.shard(key);
        let map = shard.map.pin();
        // The bucket must have a cell for each window. Another request may put in a bucket
        // of another shape at any moment: check after every get or insert, and widen the
        // bucket (keeping the state of the cells it has) when a window has no cell.
        let mut found = None;
        for _ in 0..3 {
            match map.get(key) {
                Some(bucket) => match bucket.positions(quotas) {
                    Some(at) => {
                        found = Some((bucket, at));
                        break;
                    }
                    None => {
                        let _ = map.insert(key.clone(), bucket.widened(quotas));
                    }
                },
                None => {
                    // A refusal against a full bucket needs no state: decide first.
                    let fresh =
                        most_restrictive(quotas.iter().map(|q| (q, step(0, now, q, cost))), now);
                    if let Some(decision) = fresh.filter(|d| !d.allowed) {
                        return Ok(decision);
                    }
                    self.make_room(shard, now)?;
                    if map
                        .try_insert_with(key.clone(), || Bucket::new(quotas))
                        .is_ok()
                    {
                        self.inner.total.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let (bucket, at) = found.ok_or(LimiterError::Windows(quotas.len()))?;
        let cells = bucket.cells();
        let cell_of = |i: usize| at.get(i).and_then(|&c| cells.get(c));
        let mut steps = [Step::NONE; MAX_WINDOWS];
        for (i, quota) in quotas.iter().enumerate() {
            let Some(cell) = cell_of(i) else {
                return Err(LimiterError::Windows(quotas.len()));
            };
            let mut tat = cell.load(Ordering::Acquire);
            loop {
                let s = step(tat, now, quota, cost);
                if !s.allowed {
                    if s.new_tat < tat {
                        // The clock stepped back: keep the clamped TAT (best effort).
                        let _ = cell.compare_exchange(
                            tat,
                            s.new_tat,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    // Give back what earlier windows took, then report the refusal.
                    for (j, earlier) in quotas.iter().enumerate().take(i) {
                        if let Some(cell) = cell_of(j) {
                            give_back(cell, earlier, cost);
                        }
                    }
                    let current = quotas.iter().enumerate().filter_map(|(j, q)| {
                        let tat = cell_of(j)?.load(Ordering::Acquire);
                        Some((q, step(tat, now, q, cost)))
                    });
                    return most_restrictive(current, now).ok_or(LimiterError::Windows(0));
                }
                match cell.compare_exchange_weak(
                    tat,
                    s.new_tat,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        steps[i] = s;
                        break;
                    }
                    Err(actual) => tat = actual,
                }
            }
        }
        most_restrictive(quotas.iter().zip(steps), now).ok_or(LimiterError::Windows(0))
    }

    /// Gives `cost` tokens back to every window of `key`'s bucket.
    pub fn refund(&self, key: &K, quotas: &[Quota], cost: u32) {
        let map = self.shard(key).map.pin();
        if let Some(bucket) = map.get(key) {
            let Some(at) = bucket.positions(quotas) else {
                return;
            };
            for (quota, i) in quotas.iter().zip(at) {
                if let Some(cell) = bucket.cells().get(i) {
                    give_back(cell, quota, cost);
                }
            }
        }
    }

    /// The state of `key`'s bucket without charging it: `None` when the key has no bucket
    /// (it is full).
    pub fn peek(&self, key: &K, quotas: &[Quota], cost: u32) -> Option<Decision> {
        let now = self.inner.clock.now_nanos();
        let map = self.shard(key).map.pin();
        let bucket = map.get(key)?;
        let at = bucket.positions(quotas)?;
        let cells = bucket.cells();
        let steps = quotas.iter().zip(at).filter_map(|(q, i)| {
            let tat = cells.get(i)?.load(Ordering::Acquire);
            Some((q, step(tat, now, q, cost)))
        });
        most_restrictive(steps, now)
    }

    fn make_room(&self, shard: &Shard<K>, now: u64) -> Result<(), LimiterError> {
        let created = shard.created.fetch_add(1, Ordering::Relaxed) + 1;
        if created % SWEEP_EVERY == 0 {
            self.sweep_shard(shard, now);
        }
        if self.inner.total.load(Ordering::Relaxed) >= self.inner.max {
            // At the cap: drop every full bucket (a whole-store sweep, so at most once a
            // second), then refuse if none was full.
            let last = self.inner.last_full_sweep.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 1_000_000_000
                && self
                    .inner
                    .last_full_sweep
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                self.sweep();
            }
            if self.inner.total.load(Ordering::Relaxed) >= self.inner.max {
                tracing::warn!(target: "keygate", "rate limiter at its bucket cap; refusing a new key");
                return Err(LimiterError::Full);
            }
        }
        Ok(())
    }
}

fn give_back(cell: &AtomicU64, quota: &Quota, cost: u32) {
    let charge = quota.interval_ns().saturating_mul(u64::from(cost));
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
        Some(t.saturating_sub(charge))
    });
}

impl Step {
    const NONE: Step = Step {
        allowed: true,
        new_tat: 0,
        remaining: 0,
        full_at: 0,
        retry_after: 0,
    };
}

impl<K: BucketKey> LimiterStore<K> for MemoryLimiter<K> {
    type Error = LimiterError;
    type Future = Ready<Result<Decision, LimiterError>>;

    fn check(
        &self,
        key: &K,
        quotas: &[Quota],
        cost: u32,
    ) -> Answer<Result<Decision, LimiterError>, Self::Future> {
        Answer::Now(self.decide(key, quotas, cost))
    }

    fn refund(&self, key: &K, quotas: &[Quota], cost: u32) {
        MemoryLimiter::refund(self, key, quotas, cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of one shard must spread over papaya's slot tags (the top 7 bits of the
    /// same hash) and its home slots (the low bits): else every get in a shard walks a
    /// probe sequence comparing keys.
    #[test]
    fn a_shard_leaves_papayas_bits_uniform() {
        let hasher = ahash::RandomState::new();
        let mut tags = std::collections::HashSet::new();
        let mut homes = std::collections::HashSet::new();
        for i in 0..200_000u32 {
            let hash = hasher.hash_one(i);
            if shard_of(hash) == 0 {
                tags.insert(hash >> 57);
                homes.insert(hash & 1023);
            }
        }
        assert!(tags.len() > 120, "{} of 128 tags in one shard", tags.len());
        assert!(
            homes.len() > 900,
            "{} of 1024 home slots in one shard",
            homes.len()
        );
    }

    /// Two routes of a full set of windows each share one bucket name: every window keeps
    /// its cell whichever route comes, so the strict one limits (with at most
    /// `MAX_WINDOWS` cells a bucket, each route's visit dropped the other's cells and the
    /// next visit found its minute window full again).
    #[test]
    fn two_full_sets_of_windows_share_one_bucket_for_good() {
        use std::num::NonZeroU32;
        use std::time::{Duration, UNIX_EPOCH};

        use crate::clock::FakeClock;

        let nz = |n| NonZeroU32::new(n).unwrap();
        let limiter: MemoryLimiter<u32> = MemoryLimiter::builder()
            .clock(FakeClock::new(
                UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            ))
            .build()
            .unwrap();
        let strict: Vec<Quota> = std::iter::once(Quota::per_minute(nz(2)))
            .chain((0..MAX_WINDOWS as u32 - 1).map(|i| Quota::per_hour(nz(1000 + i))))
            .collect();
        let other: Vec<Quota> = (0..MAX_WINDOWS as u32)
            .map(|i| Quota::per_day(nz(5000 + i)))
            .collect();
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += usize::from(limiter.decide(&7, &strict, 1).unwrap().allowed);
            assert!(limiter.decide(&7, &other, 1).unwrap().allowed);
        }
        assert_eq!(admitted, 2, "2 a minute, whatever the other route does");
    }
}
