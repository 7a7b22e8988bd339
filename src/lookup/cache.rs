use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use quick_cache::sync::{Cache, PlaceholderGuard};
use quick_cache::{Lifecycle, UnitWeighter};

use super::{Change, ChangeFeed, KeyLookup, LookupResult};
use crate::answer::Answer;
use crate::clock::{Clock, CoarseClock};
use crate::error::BoxError;
use crate::error::ConfigError;
use crate::key::{Fingerprint, KeyHash, PresentedKey};
use crate::record::KeyRecord;

/// A bounded cache in front of a [`KeyLookup`].
///
/// - Usable keys are kept for [`ttl`](CachedLookup::ttl) (default 30 s); unknown keys, and
///   keys that cannot be used (deleted, revoked, disabled, expired, owner inactive), for the
///   shorter [`negative_ttl`](CachedLookup::negative_ttl) (default 5 s): a key created or
///   switched back on a moment ago starts working within that time even in another
///   process, and a deleted key's refusal is cached exactly as long as an unknown key's.
/// - **It grows to hold the working set.** It starts with room for
///   [`capacity`](CachedLookupBuilder::capacity) entries (default 100 000) and doubles, up
///   to [`max_capacity`](CachedLookupBuilder::max_capacity) (default 1 000 000), whenever
///   keys in use are evicted before their TTL: a thirty-second of its entries' worth of
///   distinct keys within one TTL (a key evicted again counts once). It never shrinks.
///   Unknown keys are no reason to grow: a flood of made-up keys can at most evict keys in
///   use, and eviction is S3-FIFO ([quick_cache]), which keeps hot keys when never-repeated
///   keys pass through. At its most, a key in use evicted while fresh makes the cache log
///   a warning once, naming the setting. Memory per entry is in BENCHMARKS.md.
/// - Entries are found by the key's per-process fingerprint (see [`PresentedKey`]): a hit
///   computes no SHA-256; the hash is computed on a miss only, for the backend.
/// - Many concurrent requests for one uncached key make one backend call; the others wait
///   for its answer.
/// - [`invalidate`](CachedLookup::invalidate) drops one key at once (the stores call it on
///   every change), found by its hash through an index kept beside the entries.
/// - Backend errors are not cached.
///
/// Clones share one cache.
///
/// Why quick_cache and not moka: a hit here must cost tens of nanoseconds, and
/// `benches/cache.rs` measured moka's `get` at several times quick_cache's (see
/// BENCHMARKS.md). Time-to-live is kept per entry and checked on read, against the
/// [`Clock`], so tests can move time by hand.
pub struct CachedLookup<L> {
    inner: Arc<Inner<L>>,
}

type Entries = Cache<Fingerprint, Entry, UnitWeighter, ByFingerprint, Evictions>;

/// This miss's hold on the cache's placeholder for a key.
type Guard<'a> = PlaceholderGuard<'a, Fingerprint, Entry, UnitWeighter, ByFingerprint, Evictions>;

/// The cache doubles once keys in use evicted before their TTL, within one TTL, reach this
/// fraction of its capacity.
const GROW_AFTER: u64 = 32;

/// Entries a cache may grow to by default.
const DEFAULT_MAX_CAPACITY: usize = 1_000_000;

struct Inner<L> {
    backend: L,
    cache: Entries,
    /// The cache's room, and the keys in use evicted before their TTL (counted by its
    /// evictions): what makes it grow.
    pressure: Arc<Pressure>,
    /// Held by the one request that grows the cache.
    growing: Mutex<()>,
    /// Which fingerprint each cached hash is under, so that a change named by its hash
    /// finds its entry.
    index: Arc<Index>,
    ttl: u64,
    negative_ttl: u64,
    /// The clock of the TTLs.
    clock: Arc<dyn Clock>,
    /// Bumped by every invalidation, one stripe per group of keys (by hash) and one for
    /// all: an answer read from the backend before an invalidation of its stripe (or of
    /// all) is not kept after it (it may be the very answer the invalidation was about),
    /// while changes to other keys leave it alone (a stream of them, notified by other
    /// instances or made up by whoever can publish, cannot keep the cache cold).
    generations: Box<[AtomicU64]>,
    everything: AtomicU64,
}

/// Generation stripes (128 KiB a cache): a change to one key discards the answers in
/// flight for 1 / 16 384 of the keys, so that even a flood of a million made-up changes a
/// second rarely discards the one answer being read.
const STRIPES: usize = 16_384;

/// What an answer was read under: its stripe's generation and the global one.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Generation(u64, u64);

#[derive(Clone)]
struct Entry {
    record: Option<Arc<KeyRecord>>,
    /// The first 64 bits of the key's hash: its place in the index.
    slot: u64,
    /// Which filing in the index this entry is: an eviction unfiles its own line only,
    /// never a later one for the same key (the same fingerprint, cached again meanwhile).
    filing: u64,
    /// Nanoseconds since the epoch; an entry is fresh in `inserted..expires`, so a clock
    /// stepping backwards cannot keep it alive.
    inserted: u64,
    expires: u64,
}

impl Entry {
    fn fresh_at(&self, now: u64) -> bool {
        (self.inserted..self.expires).contains(&now)
    }
}

/// Hash prefix → (fingerprint, filing), in shards. One fingerprint per prefix: when two
/// cached keys' hashes share 64 bits (about never), the older entry is dropped, so that no
/// change can miss a cached key. Each filing has its own number, so that removing an old
/// entry (evicted, replaced, found stale) never unfiles the line of a newer entry for the
/// same key.
struct Index {
    shards: Box<[Mutex<Lines>]>,
    filings: AtomicU64,
}

/// One shard of the index: hash prefix → (fingerprint, filing number).
type Lines = HashMap<u64, (Fingerprint, u64), ByFingerprint>;

const INDEX_SHARDS: usize = 16;

impl Index {
    fn new() -> Self {
        Self {
            shards: (0..INDEX_SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(ByFingerprint)))
                .collect(),
            filings: AtomicU64::new(0),
        }
    }

    fn shard(&self, slot: u64) -> std::sync::MutexGuard<'_, Lines> {
        // The top bits pick the shard; the map hashes with the low ones.
        let i = (slot >> 60) as usize % INDEX_SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Files `fingerprint` under `slot` as a new filing: its number, and the fingerprint
    /// it replaces, if another.
    fn insert(&self, slot: u64, fingerprint: Fingerprint, filing: u64) -> Option<Fingerprint> {
        self.shard(slot)
            .insert(slot, (fingerprint, filing))
            .map(|(old, _)| old)
            .filter(|old| *old != fingerprint)
    }

    /// A number for the next filing.
    fn next_filing(&self) -> u64 {
        self.filings.fetch_add(1, Ordering::Relaxed)
    }

    fn take(&self, slot: u64) -> Option<Fingerprint> {
        self.shard(slot)
            .remove(&slot)
            .map(|(fingerprint, _)| fingerprint)
    }

    /// Unfiles `slot` if it still holds this very filing of `fingerprint`.
    fn unfile(&self, slot: u64, fingerprint: Fingerprint, filing: u64) {
        let mut shard = self.shard(slot);
        if shard.get(&slot) == Some(&(fingerprint, filing)) {
            shard.remove(&slot);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
}

/// Fingerprints and hash prefixes are uniformly distributed already: hashing them again
/// would only cost time.
#[derive(Clone, Copy, Default)]
struct ByFingerprint;

impl BuildHasher for ByFingerprint {
    type Hasher = Folded;

    fn build_hasher(&self) -> Folded {
        Folded(0)
    }
}

struct Folded(u64);

impl Hasher for Folded {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `u64` and `Fingerprint` keys; kept correct for any other.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }

    fn write_u128(&mut self, value: u128) {
        self.0 ^= value as u64 ^ (value >> 64) as u64;
    }
}

/// The cache's room and the keys in use it evicted before their TTL: what makes it grow.
struct Pressure {
    /// Room the cache has now (kept here: quick_cache's own figure takes every shard's
    /// lock), changed only by the one request that grows it; and the most it may have.
    capacity: AtomicU64,
    max_capacity: u64,
    /// How many keys in use were evicted within the count (what growth reads without a
    /// lock): the keys in `counted`.
    evicted: AtomicU64,
    counted: Mutex<Counted>,
    /// The cache at its most said so once.
    warned: AtomicBool,
}

/// The keys in use evicted within one TTL since `since` (ns since the epoch), or since the
/// cache last grew. Each counts once: a key evicted again and again (its holder's own key,
/// pushed out by a flood of made-up keys between its requests) is one key in use, not a
/// working set, so a few keys cannot make the cache grow far past them.
#[derive(Default)]
struct Counted {
    since: u64,
    keys: HashSet<Fingerprint, ByFingerprint>,
}

impl Pressure {
    fn new(capacity: u64, max_capacity: u64) -> Self {
        Self {
            capacity: AtomicU64::new(capacity),
            max_capacity,
            evicted: AtomicU64::new(0),
            counted: Mutex::default(),
            warned: AtomicBool::new(false),
        }
    }

    /// The cache has all the room it may have: it says so once instead of growing.
    fn full(&self) -> bool {
        self.capacity.load(Ordering::Relaxed) >= self.max_capacity
    }

    /// Whether the keys in use evicted within the count call for a cache of `capacity`
    /// to double: a thirty-second of it.
    fn pressed(&self, capacity: u64) -> bool {
        self.evicted.load(Ordering::Relaxed) >= (capacity / GROW_AFTER).max(1)
    }

    /// Counts keys in use evicted at `now`, each once; the count starts afresh once a TTL
    /// has passed since it started (or the clock stepped back).
    fn evicted(&self, keys: &[Fingerprint], now: u64, ttl: u64) {
        if self.full() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    target: "keygate",
                    "the key cache is at its most and full: keys in use are evicted before \
                     their TTL and looked up again; raise CachedLookupBuilder::max_capacity to \
                     the keys in use within a TTL"
                );
            }
            return;
        }
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if now < counted.since || now - counted.since >= ttl {
            counted.since = now;
            counted.keys.clear();
        }
        counted.keys.extend(keys.iter().copied());
        self.evicted
            .store(counted.keys.len() as u64, Ordering::Relaxed);
    }

    /// Starts the count afresh (the cache grew).
    fn restart(&self) {
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        counted.keys.clear();
        self.evicted.store(0, Ordering::Relaxed);
    }
}

/// Whether a lookup's answer is a key that can be used at `now` (ns since the epoch): the
/// answers kept for the long TTL, and the only ones whose eviction makes the cache grow.
fn usable(record: Option<&KeyRecord>, now: u64) -> bool {
    record.is_some_and(|r| r.usable_at(UNIX_EPOCH + Duration::from_nanos(now)))
}

/// Keeps the index in step with the cache's own evictions, once the cache's lock is
/// released, and counts the usable keys evicted while fresh.
#[derive(Clone)]
struct Evictions {
    index: Arc<Index>,
    clock: Arc<dyn Clock>,
    pressure: Arc<Pressure>,
    ttl: u64,
}

impl Lifecycle<Fingerprint, Entry> for Evictions {
    type RequestState = Vec<(Fingerprint, Entry)>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, state: &mut Self::RequestState, key: Fingerprint, value: Entry) {
        state.push((key, value));
    }

    fn end_request(&self, state: Self::RequestState) {
        if state.is_empty() {
            return;
        }
        let now = self.clock.now_nanos();
        let mut in_use = Vec::new();
        for (fingerprint, entry) in state {
            self.index.unfile(entry.slot, fingerprint, entry.filing);
            // Only a found key kept for the long TTL counts: unknown keys, and records
            // that cannot be used, say nothing about the working set.
            if entry.fresh_at(now) && usable(entry.record.as_deref(), now) {
                in_use.push(fingerprint);
            }
        }
        if !in_use.is_empty() {
            self.pressure.evicted(&in_use, now, self.ttl);
        }
    }
}

impl<L> Clone for CachedLookup<L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<L> fmt::Debug for CachedLookup<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedLookup")
            .field("entries", &self.inner.cache.len())
            .field(
                "capacity",
                &self.inner.pressure.capacity.load(Ordering::Relaxed),
            )
            .field("ttl_ns", &self.inner.ttl)
            .field("negative_ttl_ns", &self.inner.negative_ttl)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`CachedLookup`].
#[derive(Debug, Clone)]
struct Settings {
    capacity: usize,
    /// `None`: the default, or the capacity if that is larger.
    max_capacity: Option<usize>,
    ttl: Duration,
    negative_ttl: Duration,
}

impl<L: KeyLookup> CachedLookup<L> {
    /// A cache with the default settings.
    pub fn new(backend: L) -> Self {
        Self::build(backend, Settings::default(), Arc::new(CoarseClock))
    }

    /// A cache with settings of your own: capacity, TTLs, clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keygate::lookup::CachedLookup;
    /// use keygate::store::MemoryStore;
    ///
    /// let cache = CachedLookup::builder(MemoryStore::new())
    ///     .capacity(1_000_000)
    ///     .ttl(Duration::from_secs(60))
    ///     .negative_ttl(Duration::from_secs(2))
    ///     .build_over_store()?; // over a KeyStore: kept honest by its changes
    /// assert_eq!(cache.capacity(), 1_000_000);
    /// # Ok::<_, keygate::ConfigError>(())
    /// ```
    pub fn builder(backend: L) -> CachedLookupBuilder<L> {
        CachedLookupBuilder {
            backend,
            settings: Settings::default(),
            clock: Arc::new(CoarseClock),
        }
    }

    fn build(backend: L, settings: Settings, clock: Arc<dyn Clock>) -> Self {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let index = Arc::new(Index::new());
        let ttl = nanos(settings.ttl);
        let capacity = u64::try_from(settings.capacity).unwrap_or(u64::MAX);
        let max_capacity = settings
            .max_capacity
            .unwrap_or(DEFAULT_MAX_CAPACITY.max(settings.capacity));
        let max_capacity = u64::try_from(max_capacity).unwrap_or(u64::MAX);
        let pressure = Arc::new(Pressure::new(capacity, max_capacity));
        let evictions = Evictions {
            index: Arc::clone(&index),
            clock: Arc::clone(&clock),
            pressure: Arc::clone(&pressure),
            ttl,
        };
        Self {
            inner: Arc::new(Inner {
                backend,
                cache: Cache::with(
                    settings.capacity,
                    capacity,
                    UnitWeighter,
                    ByFingerprint,
                    evictions,
                ),
                pressure,
                growing: Mutex::new(()),
                index,
                ttl,
                negative_ttl: nanos(settings.negative_ttl),
                generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
                everything: AtomicU64::new(0),
                clock,
            }),
        }
    }

    /// A cache over a [`KeyStore`](crate::store::KeyStore) that the store keeps honest: every
    /// change made through the store (or its clones) in this process drops the keys it
    /// touched from the cache at once. Changes made by another process show after the TTL,
    /// or at once when a bridge announces them to the store: PostgreSQL's `NOTIFY`
    /// (`SqlStore::listen`, feature `postgres`) or a Redis channel
    /// (`RedisChanges`, feature `redis`). A [`Change::All`](super::Change::All) (a lost
    /// subscription) empties the cache.
    /// With settings of your own: [`builder`](Self::builder) and
    /// [`build_over_store`](CachedLookupBuilder::build_over_store).
    pub fn over_store(store: L) -> Self
    where
        L: ChangeFeed,
    {
        let cache = Self::new(store);
        cache.subscribe();
        cache
    }

    /// Registers this cache with its store's change listeners.
    fn subscribe(&self)
    where
        L: ChangeFeed,
    {
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .backend
            .subscribe(Arc::new(move |change: Change<'_>| match weak.upgrade() {
                Some(inner) => {
                    match change {
                        Change::Local(hash) | Change::Remote(hash) => inner.forget(hash),
                        Change::All => inner.forget_all(),
                    }
                    true
                }
                None => false,
            }));
    }

    /// How long a found key is cached.
    pub fn ttl(&self) -> Duration {
        Duration::from_nanos(self.inner.ttl)
    }

    /// How long an unknown key is cached.
    pub fn negative_ttl(&self) -> Duration {
        Duration::from_nanos(self.inner.negative_ttl)
    }

    /// The entries the cache has room for now: it grows up to
    /// [`max_capacity`](Self::max_capacity) while keys in use are evicted before their TTL.
    pub fn capacity(&self) -> u64 {
        self.inner.pressure.capacity.load(Ordering::Relaxed)
    }

    /// The most entries the cache may grow to.
    pub fn max_capacity(&self) -> u64 {
        self.inner.pressure.max_capacity
    }

    /// Entries cached now (fresh or not yet swept).
    pub fn len(&self) -> usize {
        self.inner.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.inner.cache.is_empty()
    }

    /// Drops one key, so that the next request reads the backend.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.inner.forget(hash);
    }

    /// Drops every key.
    pub fn invalidate_all(&self) {
        self.inner.forget_all();
    }

    /// The backend behind the cache.
    pub fn backend(&self) -> &L {
        &self.inner.backend
    }
}

/// Settings for a [`CachedLookup`], from [`CachedLookup::builder`].
#[must_use]
pub struct CachedLookupBuilder<L> {
    backend: L,
    settings: Settings,
    clock: Arc<dyn Clock>,
}

impl<L> fmt::Debug for CachedLookupBuilder<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedLookupBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<L: KeyLookup> CachedLookupBuilder<L> {
    /// The entries the cache has room for at first (default 100 000); it grows from there
    /// to [`max_capacity`](Self::max_capacity) while keys in use are evicted before their
    /// TTL.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.settings.capacity = capacity;
        self
    }

    /// The most entries the cache may grow to: by default 1 000 000, or the
    /// [`capacity`](Self::capacity) when that is more. The same as the capacity: a cache
    /// of fixed size. Size it to the keys in use within a TTL (memory per entry is in
    /// BENCHMARKS.md).
    pub fn max_capacity(mut self, max_capacity: usize) -> Self {
        self.settings.max_capacity = Some(max_capacity);
        self
    }

    /// How long a found key is cached (default 30 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long an unknown key is cached (default 5 s).
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.settings.negative_ttl = negative_ttl;
        self
    }

    /// The clock of the TTLs (a [`FakeClock`](crate::clock::FakeClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the cache. Over a [`KeyStore`](crate::store::KeyStore), use
    /// [`build_over_store`](Self::build_over_store), which also keeps it honest.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] when the capacity or a TTL is zero,
    /// [`ConfigError::Conflict`] when the max capacity is below the capacity.
    pub fn build(self) -> Result<CachedLookup<L>, ConfigError> {
        if self.settings.capacity == 0 {
            return Err(ConfigError::Zero("cache capacity"));
        }
        if self
            .settings
            .max_capacity
            .is_some_and(|max| max < self.settings.capacity)
        {
            return Err(ConfigError::Conflict(
                "the cache's max_capacity is below its capacity",
            ));
        }
        if self.settings.ttl.is_zero() {
            return Err(ConfigError::Zero("cache ttl"));
        }
        if self.settings.negative_ttl.is_zero() {
            return Err(ConfigError::Zero("cache negative ttl"));
        }
        Ok(CachedLookup::build(self.backend, self.settings, self.clock))
    }

    /// Builds the cache over a store that keeps it honest, as
    /// [`CachedLookup::over_store`] does with the default settings.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn build_over_store(self) -> Result<CachedLookup<L>, ConfigError>
    where
        L: ChangeFeed,
    {
        let cache = self.build()?;
        cache.subscribe();
        Ok(cache)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            max_capacity: None,
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
        }
    }
}

impl<L> Inner<L> {
    fn stripe(&self, slot: u64) -> &AtomicU64 {
        // `slot` is the hash's prefix: uniform bits.
        &self.generations[(slot % STRIPES as u64) as usize]
    }

    fn generation(&self, slot: u64) -> Generation {
        Generation(
            self.stripe(slot).load(Ordering::SeqCst),
            self.everything.load(Ordering::SeqCst),
        )
    }

    /// Drops the key with this hash, wherever it is cached.
    fn forget(&self, hash: &KeyHash) {
        self.stripe(hash.prefix()).fetch_add(1, Ordering::SeqCst);
        if let Some(fingerprint) = self.index.take(hash.prefix()) {
            self.cache.remove(&fingerprint);
        }
    }

    /// Doubles the cache (up to its max) once keys in use evicted before their TTL, within
    /// one TTL, reach a thirty-second of its capacity. Called after each insert (a miss).
    fn grow_if_pressed(&self) {
        let pressure = &self.pressure;
        let pressed =
            || !pressure.full() && pressure.pressed(pressure.capacity.load(Ordering::Relaxed));
        if !pressed() {
            return;
        }
        // One request grows it (asked again under the lock); the others go on.
        let Ok(_growing) = self.growing.try_lock() else {
            return;
        };
        if !pressed() {
            return;
        }
        let current = pressure.capacity.load(Ordering::Relaxed);
        let next = current.saturating_mul(2).min(pressure.max_capacity);
        self.cache.set_capacity(next);
        pressure.capacity.store(next, Ordering::Relaxed);
        pressure.restart();
        tracing::info!(
            target: "keygate",
            entries = next,
            "the key cache grew: keys in use were evicted before their TTL"
        );
    }

    /// Drops every key (and any answer read from the backend before now).
    fn forget_all(&self) {
        self.everything.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
        self.index.clear();
    }

    /// Drops one entry and its index line (if that line is still this filing's).
    fn drop_entry(&self, fingerprint: Fingerprint, slot: u64, filing: u64) {
        self.cache.remove(&fingerprint);
        self.index.unfile(slot, fingerprint, filing);
    }

    /// Files an entry in the index under its filing number (dropping an older entry filed
    /// under the same prefix).
    fn file(&self, fingerprint: Fingerprint, slot: u64, filing: u64) {
        if let Some(older) = self.index.insert(slot, fingerprint, filing) {
            self.cache.remove(&older);
        }
    }

    fn fresh(&self, fingerprint: &Fingerprint) -> Option<Option<Arc<KeyRecord>>> {
        let entry = self.cache.get(fingerprint)?;
        entry
            .fresh_at(self.clock.now_nanos())
            .then_some(entry.record)
    }

    fn entry(&self, record: Option<Arc<KeyRecord>>, slot: u64, filing: u64, now: u64) -> Entry {
        // Only a key that can be used gets the long TTL. A record that cannot (deleted,
        // revoked, disabled, expired, its owner inactive) is kept no longer than an unknown
        // key: the two must not be told apart by how long their refusals are cached, and a
        // key switched back on works again as soon as an unknown one would.
        let ttl = if usable(record.as_deref(), now) {
            self.ttl
        } else {
            self.negative_ttl
        };
        Entry {
            record,
            slot,
            filing,
            inserted: now,
            expires: now.saturating_add(ttl),
        }
    }
}

impl<L: KeyLookup> Inner<L> {
    /// Asks the backend, with the generation read before: an invalidation after that
    /// point may concern the answer.
    async fn ask(&self, hash: KeyHash) -> (LookupResult<BoxError>, Generation) {
        let generation = self.generation(hash.prefix());
        let answer = self
            .backend
            .lookup(&PresentedKey::from_hash(hash))
            .await
            .map_err(Into::into);
        (answer, generation)
    }

    /// After an answer read at `generation` was cached under `fingerprint`: if any
    /// invalidation came since, the entry goes (it may hold the old answer). Filed in the
    /// index before this check, so that an invalidation after it finds the entry.
    fn settle(&self, fingerprint: Fingerprint, slot: u64, filing: u64, generation: Generation) {
        if self.generation(slot) != generation {
            self.drop_entry(fingerprint, slot, filing);
        }
    }

    /// Asks the backend and caches its answer: through `guard` when this miss holds the
    /// cache's placeholder for the key, else by a plain insert.
    async fn fill(
        &self,
        fingerprint: Fingerprint,
        hash: KeyHash,
        guard: Option<Guard<'_>>,
    ) -> LookupResult<BoxError> {
        let slot = hash.prefix();
        let (answer, generation) = self.ask(hash).await;
        let record = answer?;
        let filing = self.index.next_filing();
        let entry = |now| self.entry(record.clone(), slot, filing, now);
        match guard {
            // Holding the placeholder, no other entry for the key can be replaced: filed
            // first, so that a change from here on finds the entry.
            Some(guard) => {
                self.file(fingerprint, slot, filing);
                let _ = guard.insert(entry(self.clock.now_nanos()));
            }
            // A plain insert may replace an entry another miss just filed and inserted; its
            // eviction unfiles that filing's line, so this one is filed after. A change in
            // between bumps the generation, and `settle` drops this entry.
            None => {
                self.cache
                    .insert(fingerprint, entry(self.clock.now_nanos()));
                self.file(fingerprint, slot, filing);
            }
        }
        self.settle(fingerprint, slot, filing, generation);
        self.grow_if_pressed();
        Ok(record)
    }

    async fn miss(
        self: Arc<Self>,
        fingerprint: Fingerprint,
        hash: KeyHash,
    ) -> LookupResult<BoxError> {
        // A stale entry is removed and the guard taken again; after a few rounds of racing
        // other removers, ask the backend directly rather than spin.
        for _ in 0..3 {
            match self.cache.get_value_or_guard_async(&fingerprint).await {
                Ok(entry) if entry.fresh_at(self.clock.now_nanos()) => return Ok(entry.record),
                Ok(stale) => self.drop_entry(fingerprint, stale.slot, stale.filing),
                Err(guard) => return self.fill(fingerprint, hash, Some(guard)).await,
            }
        }
        self.fill(fingerprint, hash, None).await
    }
}

impl<L: KeyLookup> KeyLookup for CachedLookup<L> {
    type Error = BoxError;
    type Future = CachedFuture;

    fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<BoxError>, CachedFuture> {
        let fingerprint = key.fingerprint();
        if let Some(hit) = self.inner.fresh(&fingerprint) {
            return Answer::Now(Ok(hit));
        }
        let miss = Arc::clone(&self.inner).miss(fingerprint, *key.hash());
        Answer::Later(CachedFuture(Box::pin(miss)))
    }
}

/// The future of a [`CachedLookup`] miss: one backend call for every concurrent miss of a
/// key, its answer cached. (A hit is answered at once and has no future.)
pub struct CachedFuture(Pin<Box<dyn Future<Output = LookupResult<BoxError>> + Send>>);

impl fmt::Debug for CachedFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CachedFuture")
    }
}

impl Future for CachedFuture {
    type Output = LookupResult<BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::clock::FakeClock;
    use crate::key::Environment;
    use crate::key::KeyId;
    use crate::record::Status;
    use crate::record::{KeyRecord, Owner};

    /// A key issued by `store`, and its id.
    fn issued(store: &crate::store::MemoryStore) -> (crate::key::ApiKey, crate::key::KeyId) {
        let key = store
            .issue(
                crate::record::Owner::new("o", "o"),
                crate::key::Environment::Live,
                |r| r,
            )
            .unwrap();
        let record = store.lookup(&key.presented()).now().ok().unwrap().unwrap();
        (key, record.unwrap().id.clone())
    }

    fn record() -> Arc<KeyRecord> {
        Arc::new(KeyRecord::new(
            KeyId::new("key_1"),
            Owner::new("o", "o"),
            Environment::Live,
        ))
    }

    /// A backend that knows one hash, counts its calls, and fails while `fail` is set.
    #[derive(Clone)]
    struct Counting {
        known: KeyHash,
        calls: Arc<AtomicUsize>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl KeyLookup for Counting {
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = LookupResult<BoxError>> + Send>>;

        fn lookup(&self, key: &PresentedKey<'_>) -> Answer<LookupResult<BoxError>, Self::Future> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let found = (*key.hash() == self.known).then(record);
            let fail = self.fail.load(Ordering::SeqCst);
            Answer::Later(Box::pin(async move {
                tokio::task::yield_now().await;
                if fail {
                    Err("backend down".into())
                } else {
                    Ok(found)
                }
            }))
        }
    }

    fn setup() -> (CachedLookup<Counting>, Counting, FakeClock) {
        let backend = Counting {
            known: KeyHash::of("known"),
            calls: Arc::default(),
            fail: Arc::default(),
        };
        let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let cache = CachedLookup::builder(backend.clone())
            .capacity(1_000)
            .ttl(Duration::from_secs(30))
            .negative_ttl(Duration::from_secs(5))
            .clock(clock.clone())
            .build()
            .unwrap();
        (cache, backend, clock)
    }

    #[tokio::test]
    async fn hits_skip_the_backend_until_the_ttl_ends() {
        let (cache, backend, clock) = setup();
        let known = PresentedKey::new("known");
        assert!(
            cache.lookup(&known).now().ok().is_none(),
            "cold cache must not answer"
        );
        assert!(cache.lookup(&known).await.unwrap().is_some());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(29));
        assert!(cache.lookup(&known).now().ok().unwrap().unwrap().is_some());
        assert!(cache.lookup(&known).await.unwrap().is_some());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(1));
        assert!(
            cache.lookup(&known).now().ok().is_none(),
            "expired at exactly the TTL"
        );
        assert!(cache.lookup(&known).await.unwrap().is_some());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn unknown_keys_are_cached_for_the_shorter_ttl() {
        let (cache, backend, clock) = setup();
        let unknown = PresentedKey::new("unknown");
        assert!(cache.lookup(&unknown).await.unwrap().is_none());
        clock.advance(Duration::from_secs(4));
        assert!(matches!(cache.lookup(&unknown).now().ok(), Some(Ok(None))));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(1));
        assert!(cache.lookup(&unknown).now().ok().is_none());
    }

    #[tokio::test]
    async fn a_clock_stepping_back_does_not_extend_an_entry() {
        let (cache, _backend, clock) = setup();
        let known = PresentedKey::new("known");
        cache.lookup(&known).await.unwrap();
        clock.rewind(Duration::from_secs(3600));
        assert!(cache.lookup(&known).now().ok().is_none());
    }

    #[tokio::test]
    async fn invalidate_drops_one_key() {
        let (cache, backend, _clock) = setup();
        let known = PresentedKey::new("known");
        let unknown = PresentedKey::new("unknown");
        cache.lookup(&known).await.unwrap();
        cache.lookup(&unknown).await.unwrap();
        cache.invalidate(known.hash());
        assert!(cache.lookup(&known).now().ok().is_none());
        assert!(cache.lookup(&unknown).now().ok().is_some());
        cache.lookup(&known).await.unwrap();
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
        cache.invalidate_all();
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let (cache, backend, _clock) = setup();
        let known = PresentedKey::new("known");
        backend.fail.store(true, Ordering::SeqCst);
        assert!(cache.lookup(&known).await.is_err());
        assert!(cache.lookup(&known).now().ok().is_none());
        backend.fail.store(false, Ordering::SeqCst);
        assert!(cache.lookup(&known).await.unwrap().is_some());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_make_one_backend_call() {
        let (cache, backend, _clock) = setup();
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let answer = cache.lookup(&PresentedKey::new("known"));
                    answer.await.map(|r| r.is_some())
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().unwrap());
        }
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn size_stays_bounded() {
        let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
        let cache = CachedLookup::builder(backend)
            .capacity(100)
            .negative_ttl(Duration::from_secs(30))
            .build()
            .unwrap();
        for i in 0..10_000 {
            cache
                .lookup(&PresentedKey::new(&i.to_string()))
                .await
                .unwrap();
        }
        assert!(cache.len() <= 110, "{} entries", cache.len());
    }

    #[test]
    fn zero_settings_are_refused() {
        let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
        let d = Duration::from_secs(1);
        let b = || CachedLookup::builder(backend).ttl(d).negative_ttl(d);
        assert!(b().capacity(0).build().is_err());
        assert!(b().ttl(Duration::ZERO).build().is_err());
        assert!(b().negative_ttl(Duration::ZERO).build().is_err());
        assert!(b().capacity(1).build().is_ok());
    }

    #[tokio::test]
    async fn unusable_records_are_cached_no_longer_than_unknown_keys() {
        use crate::key::Environment;
        use crate::key::KeyId;
        use crate::record::{KeyRecord, Owner, Status};

        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let backend = move |hash: KeyHash| {
            c.fetch_add(1, Ordering::SeqCst);
            let status = if hash == KeyHash::of("deleted") {
                Status::Deleted
            } else {
                Status::Active
            };
            let record =
                KeyRecord::new(KeyId::new("key_1"), Owner::new("o", "o"), Environment::Live)
                    .with_status(status);
            async move { Ok::<_, BoxError>(Some(Arc::new(record))) }
        };
        let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let cache = CachedLookup::builder(backend)
            .clock(clock.clone())
            .build()
            .unwrap();
        for key in ["deleted", "active"] {
            cache.lookup(&PresentedKey::new(key)).await.unwrap();
        }
        clock.advance(Duration::from_secs(5));
        assert!(
            cache
                .lookup(&PresentedKey::new("deleted"))
                .now()
                .ok()
                .is_none(),
            "gone with the negative TTL"
        );
        assert!(
            cache
                .lookup(&PresentedKey::new("active"))
                .now()
                .ok()
                .is_some(),
            "kept for the TTL"
        );
    }

    #[tokio::test]
    async fn a_configured_cache_over_a_store_stays_honest() {
        use crate::record::Status;
        use crate::store::{KeyStore, MemoryStore};

        let store = MemoryStore::new();
        let (key, id) = issued(&store);
        let cache = CachedLookup::builder(store.clone())
            .capacity(10)
            .ttl(Duration::from_secs(3600))
            .build_over_store()
            .unwrap();
        let record = cache.lookup(&key.presented()).await.unwrap().unwrap();
        assert_eq!(record.status, Status::Active);
        store.set_status(&id, Status::Disabled).await.unwrap();
        let record = cache.lookup(&key.presented()).await.unwrap().unwrap();
        assert_eq!(
            record.status,
            Status::Disabled,
            "the change reached the cache"
        );
    }

    /// A cache over a backend that knows every key named `in-use-<n>` (each a usable
    /// record), and counts its calls.
    fn growing(
        capacity: usize,
        max: Option<usize>,
    ) -> (
        CachedLookup<impl KeyLookup<Error = BoxError>>,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let known: Arc<std::collections::HashSet<KeyHash>> = Arc::new(
            (0..4_000)
                .map(|n| KeyHash::of(&format!("in-use-{n}")))
                .collect(),
        );
        let backend = move |hash: KeyHash| {
            counted.fetch_add(1, Ordering::SeqCst);
            let found = known.contains(&hash).then(record);
            async move { Ok::<_, BoxError>(found) }
        };
        let mut builder = CachedLookup::builder(backend)
            .capacity(capacity)
            .ttl(Duration::from_secs(3600))
            .negative_ttl(Duration::from_secs(3600))
            .clock(FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000)));
        if let Some(max) = max {
            builder = builder.max_capacity(max);
        }
        (builder.build().unwrap(), calls)
    }

    /// Looks `names` up in turn, `passes` times; the backend calls of the last pass.
    async fn visit(
        cache: &CachedLookup<impl KeyLookup<Error = BoxError>>,
        calls: &AtomicUsize,
        names: &[String],
        passes: usize,
    ) -> usize {
        let mut last = 0;
        for _ in 0..passes {
            let before = calls.load(Ordering::SeqCst);
            for name in names {
                cache.lookup(&PresentedKey::new(name)).await.unwrap();
            }
            last = calls.load(Ordering::SeqCst) - before;
        }
        last
    }

    /// Issue 8: a working set larger than the cache's first size is held once the cache has
    /// grown (it doubles while keys in use are evicted before their TTL); a cache of fixed
    /// size keeps missing them.
    #[tokio::test]
    async fn the_cache_grows_to_hold_the_keys_in_use() {
        let names: Vec<String> = (0..500).map(|n| format!("in-use-{n}")).collect();
        let (cache, calls) = growing(64, None);
        assert_eq!(cache.capacity(), 64);
        assert_eq!(cache.max_capacity(), 1_000_000);
        visit(&cache, &calls, &names, 4).await;
        // Its shards split the room evenly and the keys not quite: a few may still miss.
        let misses = visit(&cache, &calls, &names, 1).await;
        assert!(
            misses <= names.len() / 50,
            "{misses} of {} keys in use missed after the cache grew",
            names.len()
        );
        assert!(
            (512..=1024).contains(&cache.capacity()),
            "{}",
            cache.capacity()
        );

        let (fixed, calls) = growing(64, Some(64));
        visit(&fixed, &calls, &names, 4).await;
        assert!(visit(&fixed, &calls, &names, 1).await > 400);
        assert_eq!(fixed.capacity(), 64);
    }

    /// Growth stops at the max capacity.
    #[tokio::test]
    async fn the_cache_grows_no_further_than_its_max() {
        let names: Vec<String> = (0..2_000).map(|n| format!("in-use-{n}")).collect();
        let (cache, calls) = growing(64, Some(300));
        visit(&cache, &calls, &names, 3).await;
        assert_eq!(cache.capacity(), 300, "64, 128, 256, then the max");
        assert!(cache.len() <= 300 + 2, "{}", cache.len());
    }

    /// An attack on the growth: a flood of made-up keys (their answers are cached, and
    /// evicted, as unknown) is no reason to grow, however long it lasts, and neither are
    /// found keys that cannot be used.
    #[tokio::test]
    async fn unknown_keys_do_not_make_the_cache_grow() {
        let made_up: Vec<String> = (0..20_000).map(|n| format!("made-up-{n}")).collect();
        let (cache, calls) = growing(64, None);
        visit(&cache, &calls, &made_up, 1).await;
        assert_eq!(cache.capacity(), 64);

        let disabled = |_: KeyHash| async {
            let mut record =
                KeyRecord::new(KeyId::new("key_1"), Owner::new("o", "o"), Environment::Live);
            record.status = Status::Disabled;
            Ok::<_, BoxError>(Some(Arc::new(record)))
        };
        let cache = CachedLookup::builder(disabled)
            .capacity(64)
            .ttl(Duration::from_secs(3600))
            .negative_ttl(Duration::from_secs(3600))
            .clock(FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000)))
            .build()
            .unwrap();
        for name in &made_up {
            cache.lookup(&PresentedKey::new(name)).await.unwrap();
        }
        assert_eq!(cache.capacity(), 64);
    }

    /// Keys in use evicted count towards growth within one TTL only: the same number spread
    /// over a longer time is a cache that holds its working set.
    #[test]
    fn evictions_count_within_one_ttl() {
        let keys = |from: u128, n: u128| (from..from + n).map(Fingerprint).collect::<Vec<_>>();
        let pressure = Pressure::new(1_000, 1_000_000);
        pressure.evicted(&keys(0, 3), 1_000, 100);
        pressure.evicted(&keys(3, 3), 1_099, 100);
        assert_eq!(pressure.evicted.load(Ordering::Relaxed), 6);
        pressure.evicted(&keys(0, 6), 1_099, 100);
        assert_eq!(
            pressure.evicted.load(Ordering::Relaxed),
            6,
            "a key evicted again counts once"
        );
        pressure.evicted(&keys(0, 3), 1_100, 100);
        assert_eq!(pressure.evicted.load(Ordering::Relaxed), 3, "a TTL later");
        pressure.evicted(&keys(0, 2), 500, 100);
        assert_eq!(
            pressure.evicted.load(Ordering::Relaxed),
            2,
            "the clock stepped back"
        );
        pressure.restart();
        assert_eq!(
            pressure.evicted.load(Ordering::Relaxed),
            0,
            "the cache grew"
        );
        pressure.evicted(&keys(0, 1), 501, 100);
        assert_eq!(pressure.evicted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_max_capacity_below_the_capacity_is_refused() {
        let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
        let err = CachedLookup::builder(backend)
            .capacity(100)
            .max_capacity(99)
            .build()
            .err();
        assert!(matches!(err, Some(ConfigError::Conflict(_))), "{err:?}");
        let fixed = CachedLookup::builder(backend)
            .capacity(2_000_000)
            .build()
            .unwrap();
        assert_eq!(
            fixed.max_capacity(),
            2_000_000,
            "a larger capacity is the max"
        );
    }

    #[tokio::test]
    async fn a_hit_computes_no_sha256() {
        let (cache, _backend, _clock) = setup();
        let first = PresentedKey::new("known");
        assert!(cache.lookup(&first).await.unwrap().is_some());
        assert!(first.is_hashed(), "a miss hashes, for the backend");
        let again = PresentedKey::new("known");
        assert!(cache.lookup(&again).now().ok().unwrap().unwrap().is_some());
        assert!(
            !again.is_hashed(),
            "a hit found the key by its fingerprint alone"
        );
    }

    #[tokio::test]
    async fn a_key_cached_twice_under_one_hash_is_dropped_by_one_change() {
        // Looked up by its secret and by its hash: two fingerprints, one hash. A change
        // named by the hash must leave neither answer in the cache.
        let (cache, backend, _clock) = setup();
        let by_secret = PresentedKey::new("known");
        let by_hash = PresentedKey::from_hash(KeyHash::of("known"));
        cache.lookup(&by_secret).await.unwrap();
        cache.lookup(&by_hash).await.unwrap();
        cache.invalidate(&KeyHash::of("known"));
        assert!(cache.lookup(&by_secret).now().ok().is_none());
        assert!(cache.lookup(&by_hash).now().ok().is_none());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_change_during_a_backend_read_is_not_cached_over() {
        // The backend reads the old record, the store changes and says so, then the read
        // returns: its answer must not be cached.
        let release = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let (r, c) = (Arc::clone(&release), Arc::clone(&calls));
        let backend = move |_: KeyHash| {
            let (release, calls) = (Arc::clone(&r), Arc::clone(&c));
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    release.notified().await;
                }
                Ok::<_, BoxError>(Some(record()))
            }
        };
        let cache = CachedLookup::builder(backend).build().unwrap();
        let slow = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .lookup(&PresentedKey::new("k"))
                    .await
                    .map(|r| r.is_some())
            }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        cache.invalidate(&KeyHash::of("k"));
        release.notify_one();
        assert!(slow.await.unwrap().unwrap());
        assert!(
            cache.lookup(&PresentedKey::new("k")).now().ok().is_none(),
            "the answer read before the change was dropped"
        );
    }

    #[tokio::test]
    async fn changes_to_other_keys_during_a_backend_read_leave_its_answer() {
        // A stream of changes to other keys (another instance's writes, or made-up
        // notifications) must not keep a key from being cached.
        let release = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let (r, c) = (Arc::clone(&release), Arc::clone(&calls));
        let backend = move |_: KeyHash| {
            let (release, calls) = (Arc::clone(&r), Arc::clone(&c));
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    release.notified().await;
                }
                Ok::<_, BoxError>(Some(record()))
            }
        };
        let cache = CachedLookup::builder(backend).build().unwrap();
        let slow = tokio::spawn({
            let cache = cache.clone();
            async move { cache.lookup(&PresentedKey::new("k")).await.is_ok() }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let k = KeyHash::of("k").prefix() % STRIPES as u64;
        let mut others = 0;
        for i in 0..10_000 {
            let other = KeyHash::of(&format!("other {i}"));
            if other.prefix() % STRIPES as u64 != k {
                cache.invalidate(&other);
                others += 1;
            }
        }
        assert!(others > 9_000);
        release.notify_one();
        assert!(slow.await.unwrap());
        assert!(
            matches!(cache.lookup(&PresentedKey::new("k")).now(), Ok(Ok(Some(_)))),
            "the answer stayed cached"
        );
    }

    #[tokio::test]
    async fn the_index_follows_evictions() {
        let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
        let cache = CachedLookup::builder(backend)
            .capacity(100)
            .negative_ttl(Duration::from_secs(30))
            .build()
            .unwrap();
        for i in 0..10_000 {
            cache
                .lookup(&PresentedKey::new(&i.to_string()))
                .await
                .unwrap();
        }
        let (entries, filed) = (cache.len(), cache.inner.index.len());
        assert!(
            filed <= entries + 2,
            "{filed} index lines for {entries} entries"
        );
        cache.invalidate_all();
        assert_eq!(cache.inner.index.len(), 0);
    }

    // The third hunt's attacks on the index: evictions and interleavings.

    /// A fake clock that runs a hook on a read of the time: the hook says whether it fired
    /// (then it is dropped) or should be tried again on the next read. The hook is taken out
    /// while it runs, so that reads of the time inside it do not run it again. It stands for
    /// another thread that runs exactly between two steps of the cache.
    #[derive(Clone)]
    struct HookClock {
        time: FakeClock,
        hook: Arc<Mutex<Option<Hook>>>,
    }

    type Hook = Box<dyn FnMut() -> bool + Send>;

    impl HookClock {
        fn new() -> Self {
            Self {
                time: FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000)),
                hook: Arc::default(),
            }
        }

        fn arm(&self, hook: impl FnMut() -> bool + Send + 'static) {
            *self.hook.lock().unwrap() = Some(Box::new(hook));
        }

        fn armed(&self) -> bool {
            self.hook.lock().unwrap().is_some()
        }
    }

    impl Clock for HookClock {
        fn now(&self) -> std::time::SystemTime {
            self.time.now()
        }

        fn now_nanos(&self) -> u64 {
            let hook = self.hook.lock().unwrap().take();
            if let Some(mut hook) = hook {
                if !hook() {
                    let mut slot = self.hook.lock().unwrap();
                    if slot.is_none() {
                        *slot = Some(hook);
                    }
                }
            }
            self.time.now_nanos()
        }
    }

    /// Polls a future once (every backend here answers at once).
    fn at_once<F: std::future::IntoFuture>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future.into_future());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(value) => value,
            Poll::Pending => panic!("the lookup did not answer at once"),
        }
    }

    /// Found by the third hunt, fixed by filing numbers. Request A's insert evicts key K's entry;
    /// the eviction's index line is unfiled in `end_request`, after the cache's lock is released.
    /// Request B for K runs in that window (here: inside A's read of the time, which `end_request`
    /// does before unfiling): a miss, K read from the store and cached again under the same
    /// fingerprint, filed under the same index line. Then A unfiles that line, because it still
    /// names K's fingerprint. K's fresh entry is now in the cache with no index line: disabling K
    /// in the store drops nothing, and the disabled key keeps being answered as active for the
    /// whole TTL.
    #[tokio::test]
    async fn an_eviction_unfiling_after_a_refill_leaves_a_disabled_key_cached() {
        use crate::store::{KeyStore, MemoryStore};

        let store = MemoryStore::new();
        let (secret, id) = issued(&store);
        let clock = HookClock::new();
        let cache = CachedLookup::builder(store.clone())
            .capacity(64)
            .ttl(Duration::from_secs(3600))
            .negative_ttl(Duration::from_secs(3600))
            .clock(clock.clone())
            .build_over_store()
            .unwrap();
        let key = secret.presented();
        let fingerprint = key.fingerprint();
        assert!(cache.lookup(&key).await.unwrap().is_some());

        // Armed: on the first read of the time after K's entry is gone (the evicting insert's
        // `end_request`), request B looks K up again.
        let b = cache.clone();
        let refill = secret.expose_secret().to_owned();
        clock.arm(move || {
            if b.inner.cache.peek(&fingerprint).is_some() {
                return false;
            }
            let found = at_once(b.lookup(&PresentedKey::new(&refill)))
                .unwrap()
                .is_some();
            assert!(found, "B finds K in the store");
            true
        });
        // Other requests fill the cache until K is evicted: unknown keys, each sent twice
        // (a hit marks an entry referenced, and S3-FIFO promotes it to the hot queue, which
        // must then give up its oldest unreferenced entry: K).
        let mut i = 0;
        while clock.armed() {
            i += 1;
            assert!(i < 10_000, "K was never evicted");
            for _ in 0..2 {
                if !clock.armed() {
                    break;
                }
                cache
                    .lookup(&PresentedKey::new(&format!("unknown-{i}")))
                    .await
                    .unwrap();
            }
        }
        assert!(
            cache.inner.cache.peek(&fingerprint).is_some(),
            "B's entry for K is cached"
        );

        store.set_status(&id, Status::Disabled).await.unwrap();
        let record = cache.lookup(&key).await.unwrap().unwrap();
        assert_eq!(
            record.status,
            Status::Disabled,
            "the store's change must reach a key cached again during its eviction"
        );
    }

    /// Held in the third hunt. A lookup by the secret and one by the hash of the same key (two
    /// fingerprints, one index line) interleaved: the second runs entirely between the
    /// first's filing and its insert. Filing the second drops the first's placeholder, so
    /// the first answer is not cached over it; a change then leaves no answer in the cache.
    #[tokio::test]
    async fn a_lookup_by_hash_inside_a_lookup_by_secret_leaves_nothing_a_change_misses() {
        use crate::store::{KeyStore, MemoryStore};

        let store = MemoryStore::new();
        let secret = store
            .issue(Owner::new("o", "o"), Environment::Live, |r| r)
            .unwrap();
        let hash = secret.hash();
        let id = store
            .lookup(&secret.presented())
            .now()
            .ok()
            .unwrap()
            .unwrap()
            .unwrap()
            .id
            .clone();
        let clock = HookClock::new();
        let cache = CachedLookup::builder(store.clone())
            .ttl(Duration::from_secs(3600))
            .clock(clock.clone())
            .build_over_store()
            .unwrap();
        let by_secret = secret.presented();
        let by_hash = PresentedKey::from_hash(hash);
        let (f1, f2) = (by_secret.fingerprint(), by_hash.fingerprint());
        // Fires on the first read of the time once the secret's fingerprint is filed: that
        // is the miss's read for its entry, between `file` and the guard's insert.
        let c = cache.clone();
        clock.arm(move || {
            if c.inner
                .index
                .shard(hash.prefix())
                .get(&hash.prefix())
                .map(|(f, _)| *f)
                != Some(f1)
            {
                return false;
            }
            assert!(at_once(c.lookup(&PresentedKey::from_hash(hash)))
                .unwrap()
                .is_some());
            true
        });
        assert!(cache.lookup(&by_secret).await.unwrap().is_some());
        assert!(!clock.armed(), "the hash lookup ran inside the secret's");
        let cached = [f1, f2]
            .iter()
            .filter(|f| cache.inner.cache.peek(*f).is_some())
            .count();
        assert!(cached <= 1, "two entries under one index line");

        store.set_status(&id, Status::Disabled).await.unwrap();
        for key in [&by_secret, &by_hash] {
            let record = cache.lookup(key).await.unwrap().unwrap();
            assert_eq!(record.status, Status::Disabled);
        }
    }

    /// Held in the third hunt. Every presented form of one key (X-API-KEY, Bearer, Basic) is the
    /// same secret, so one fingerprint: a change drops the one entry all of them hit.
    #[tokio::test]
    async fn every_header_form_of_a_key_hits_one_entry_that_a_change_drops() {
        use crate::extract::Extractor;
        use crate::store::{KeyStore, MemoryStore};
        use base64::Engine as _;

        let store = MemoryStore::new();
        let (secret, id) = issued(&store);
        let cache = CachedLookup::builder(store.clone())
            .ttl(Duration::from_secs(3600))
            .build_over_store()
            .unwrap();
        let s = secret.expose_secret();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{s}:"));
        let requests: Vec<http::Request<()>> = vec![
            http::Request::get("/")
                .header("x-api-key", s)
                .body(())
                .unwrap(),
            http::Request::get("/")
                .header("authorization", format!("Bearer {s}"))
                .body(())
                .unwrap(),
            http::Request::get("/")
                .header("authorization", format!("bearer   {s}"))
                .body(())
                .unwrap(),
            http::Request::get("/")
                .header("authorization", format!("Basic {basic}"))
                .body(())
                .unwrap(),
        ];
        let extractor = Extractor::default();
        let mut fingerprints = Vec::new();
        for req in &requests {
            let Ok(credential) = extractor.extract(req) else {
                continue;
            };
            let key = PresentedKey::new(credential.secret());
            fingerprints.push(key.fingerprint());
            assert!(cache.lookup(&key).await.unwrap().is_some());
        }
        assert!(fingerprints.len() >= 3);
        assert!(fingerprints.iter().all(|f| *f == fingerprints[0]));
        assert_eq!(cache.len(), 1);
        store.set_status(&id, Status::Disabled).await.unwrap();
        for req in &requests {
            let Ok(credential) = extractor.extract(req) else {
                continue;
            };
            let record = cache
                .lookup(&PresentedKey::new(credential.secret()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(record.status, Status::Disabled);
        }
    }

    /// Held in the fourth hunt. A flood of never-repeated unknown keys (each sent twice, so
    /// that S3-FIFO promotes and evicts from both queues) through the smallest capacities,
    /// with a known key looked up among them: the index never holds more lines than the cache
    /// entries (plus the two a request may have in flight), and a change still drops the
    /// known key wherever the flood left it.
    #[tokio::test]
    async fn a_flood_through_a_tiny_cache_leaves_no_stray_index_lines() {
        use crate::store::{KeyStore, MemoryStore};

        for capacity in [1usize, 2, 3, 7] {
            let store = MemoryStore::new();
            let secret = store
                .issue(Owner::new("o", "o"), Environment::Live, |r| r)
                .unwrap();
            let id = store
                .lookup(&secret.presented())
                .now()
                .ok()
                .unwrap()
                .unwrap()
                .unwrap()
                .id
                .clone();
            let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000));
            let cache = CachedLookup::builder(store.clone())
                .capacity(capacity)
                .ttl(Duration::from_secs(3600))
                .negative_ttl(Duration::from_secs(3600))
                .clock(clock.clone())
                .build_over_store()
                .unwrap();
            for i in 0..3_000 {
                for _ in 0..2 {
                    cache
                        .lookup(&PresentedKey::new(&format!("unknown-{i}")))
                        .await
                        .unwrap();
                }
                if i % 7 == 0 {
                    assert!(cache.lookup(&secret.presented()).await.unwrap().is_some());
                }
                let (entries, filed) = (cache.len(), cache.inner.index.len());
                assert!(
                    filed <= entries + 2,
                    "capacity {capacity}: {filed} index lines for {entries} entries"
                );
            }
            store.set_status(&id, Status::Disabled).await.unwrap();
            let record = cache.lookup(&secret.presented()).await.unwrap().unwrap();
            assert_eq!(record.status, Status::Disabled, "capacity {capacity}");
        }
    }

    // The growth hunt (tests/hunt_cache_growth.rs has the black-box attacks).

    /// Held in the growth hunt. Keys in use looked up in turn with a flood of unknown keys
    /// between them, through a cache that grows from 4: the index never holds more lines
    /// than the cache entries (plus the two a request may have in flight) while it grows,
    /// and a change through the store drops a key wherever growth left it.
    #[tokio::test]
    async fn a_growing_cache_leaves_no_stray_index_lines() {
        use crate::store::{KeyStore, MemoryStore};

        let store = MemoryStore::new();
        let keys: Vec<_> = (0..300).map(|_| issued(&store)).collect();
        let cache = CachedLookup::builder(store.clone())
            .capacity(4)
            .max_capacity(4_096)
            .ttl(Duration::from_secs(3600))
            .negative_ttl(Duration::from_secs(3600))
            .clock(FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000)))
            .build_over_store()
            .unwrap();
        for pass in 0..3 {
            for (i, (secret, _)) in keys.iter().enumerate() {
                assert!(cache.lookup(&secret.presented()).await.unwrap().is_some());
                for _ in 0..2 {
                    let unknown = format!("unknown-{pass}-{i}");
                    assert!(cache
                        .lookup(&PresentedKey::new(&unknown))
                        .await
                        .unwrap()
                        .is_none());
                }
                let (entries, filed) = (cache.len(), cache.inner.index.len());
                assert!(
                    filed <= entries + 2,
                    "{filed} index lines for {entries} entries at {}",
                    cache.capacity()
                );
            }
        }
        assert!(cache.capacity() >= 256, "{}", cache.capacity());
        for (secret, id) in keys.iter().step_by(37) {
            store.set_status(id, Status::Disabled).await.unwrap();
            let record = cache.lookup(&secret.presented()).await.unwrap().unwrap();
            assert_eq!(record.status, Status::Disabled);
        }
        cache.invalidate_all();
        assert_eq!(cache.inner.index.len(), 0);
    }

    /// Held in the growth hunt. Doubling near the top of `u64` saturates at the max, marks
    /// the cache at its most, and the cache still answers; a max one above the capacity is
    /// reached in one step.
    #[test]
    fn growth_at_the_top_saturates_at_the_max() {
        let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
        for (capacity, max) in [
            (usize::MAX / 2 + 1, usize::MAX),
            (usize::MAX - 1, usize::MAX),
            (64, 65),
        ] {
            let cache = CachedLookup::builder(backend)
                .capacity(capacity)
                .max_capacity(max)
                .build()
                .unwrap();
            for _ in 0..3 {
                cache
                    .inner
                    .pressure
                    .evicted
                    .store(u64::MAX, Ordering::Relaxed);
                cache.inner.grow_if_pressed();
            }
            assert_eq!(cache.capacity(), max as u64);
            assert!(cache.inner.pressure.full());
            assert!(at_once(cache.lookup(&PresentedKey::new("k")))
                .unwrap()
                .is_none());
        }
    }
}
