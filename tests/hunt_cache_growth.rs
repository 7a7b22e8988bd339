//! Attacks on the lookup cache's growth (fab6502: it starts at `capacity` and doubles, up to
//! `max_capacity`, while found, usable keys are evicted before their TTL: a thirty-second of
//! its room within one TTL).
//!
//! Attacked, black-box through the public API (`CachedLookup` over `MemoryStore` and over
//! lookup closures, `FakeClock` time):
//!
//! - Memory, without a valid key: floods of well-formed made-up keys; keys that are found
//!   but unusable (disabled, revoked, deleted, expired, owner inactive); a negative TTL an
//!   hour long beside a one-second TTL; the clock stepping back and far forward between
//!   rounds. **Held**: none of it grows the cache.
//! - Memory, with one valid key (or a few): the attacker's own key, looked up now and then
//!   among a flood of made-up keys (each sent twice, so that S3-FIFO promotes them and they
//!   push the key out of its hot queue), is evicted while fresh over and over, and every
//!   eviction counted. **FINDING** (`finding_…`): one key and a flood grew a cache of 64 to
//!   256, four keys one of 1 024 to 2 048, and it kept going towards the max: made-up keys were a
//!   reason to grow after all. Fixed in `src/lookup/cache.rs`: within a count (one TTL, or
//!   until the cache grows) a key evicted again is not counted again, so k keys in use can
//!   grow it to 64 k entries at most.
//! - Bounds: capacity 1, `usize::MAX`, capacity == max, max one above the capacity, max
//!   `usize::MAX`, capacity above the default max; `ConfigError::Conflict` for max below
//!   capacity (`Zero` first when the capacity is zero); TTLs of `Duration::MAX`; the clock
//!   stepping back and forth by a year between lookups. **Held**: no panic, never past the
//!   max, the capacity is the start times a power of two or the max.
//! - Honesty after growth: disabling, deleting, revoking all of an owner's keys and
//!   switching an owner off through the store, `invalidate` and `invalidate_all`, once the
//!   cache grew and while many threads make it grow. **Held**: refused at once.
//! - Concurrency: four threads missing at once over a store of 3 000 keys while it grows.
//!   **Held**: each thread sees the capacity never shrink and always a power-of-two multiple
//!   of the start; one log line per doubling (one grower at a time).
//! - Secrets: the growth lines (info) and the warning at the max carry no key material (no
//!   secret, no part of one, no hash, no key id). **Held**.
//!
//! Index lines after growth are checked in the crate's own tests (src/lookup/cache.rs),
//! where the index is visible.

mod common;

use common::capture::Capture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::clock::FakeClock;
use keygate::error::{BoxError, ConfigError};
use keygate::key::{ApiKey, Environment, KeyFormat, KeyHash, KeyId, PresentedKey};
use keygate::lookup::{CachedLookup, KeyLookup};
use keygate::record::{KeyRecord, Owner, Status};
use keygate::store::{KeyStore, MemoryStore, OwnerStore};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A well-formed key no store has.
fn made_up() -> ApiKey {
    KeyFormat::default().generate(Environment::Live).unwrap()
}

/// A store with `n` usable keys of owner `owner`, and their secrets.
fn store_with(store: &MemoryStore, owner: &str, n: usize) -> Vec<ApiKey> {
    (0..n)
        .map(|_| {
            store
                .issue(Owner::new(owner, owner), Environment::Live, |r| r)
                .unwrap()
        })
        .collect()
}

/// The id of a key the store knows.
fn id_of(store: &MemoryStore, key: &ApiKey) -> KeyId {
    store
        .lookup(&key.presented())
        .now()
        .ok()
        .unwrap()
        .unwrap()
        .unwrap()
        .id
        .clone()
}

/// A lookup that finds every key (one usable record) and counts its calls.
fn finds_everything() -> (impl KeyLookup<Error = BoxError> + Clone, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let record = Arc::new(KeyRecord::new(
        KeyId::new("key_1"),
        Owner::new("o", "o"),
        Environment::Live,
    ));
    let backend = move |_: KeyHash| {
        counted.fetch_add(1, Ordering::Relaxed);
        let found = Some(Arc::clone(&record));
        async move { Ok::<_, BoxError>(found) }
    };
    (backend, calls)
}

/// Whether `capacity` is `first` times a power of two, or `max`.
fn doubled_from(first: u64, max: u64, capacity: u64) -> bool {
    capacity == max
        || (capacity >= first
            && capacity % first == 0
            && (capacity / first).is_power_of_two()
            && capacity <= max)
}

/// The status the cache answers for `key` (`None`: unknown).
async fn status<L: KeyLookup>(cache: &CachedLookup<L>, key: &ApiKey) -> Option<Status> {
    cache
        .lookup(&key.presented())
        .await
        .unwrap()
        .map(|r| r.status)
}

/// Whether the cache answers `key` at once (a hit).
fn hit<L: KeyLookup>(cache: &CachedLookup<L>, key: &ApiKey) -> bool {
    cache.lookup(&key.presented()).now().is_ok()
}

const GREW: &str = "the key cache grew";
const AT_ITS_MOST: &str = "the key cache is at its most";

// ---------------------------------------------------------------------------------------
// Memory: an attacker with one key, or a few
// ---------------------------------------------------------------------------------------

/// Runs the flood: `rounds` made-up keys, each looked up twice, and the attacker's `keys`
/// looked up once every `every` of them. How many times the attacker's keys missed (were
/// evicted while fresh, since the clock stands still).
async fn flood(
    cache: &CachedLookup<MemoryStore>,
    keys: &[ApiKey],
    rounds: usize,
    every: usize,
) -> usize {
    let mut misses = 0;
    for i in 0..rounds {
        let fake = made_up();
        for _ in 0..2 {
            assert!(cache.lookup(&fake.presented()).await.unwrap().is_none());
        }
        if i % every == 0 {
            for key in keys {
                if !hit(cache, key) {
                    misses += 1;
                }
                assert_eq!(status(cache, key).await, Some(Status::Active));
            }
        }
    }
    misses
}

/// FINDING: an attacker holding one valid key grows the cache with a flood of made-up keys.
/// Its own key, looked up now and then among made-up keys sent twice each (S3-FIFO promotes
/// those, and they push the key out of the hot queue), is evicted while fresh again and
/// again; each eviction was counted as another key in use evicted, so one key did what a
/// thirty-second of the cache's room in distinct keys in use should take: 64 → 256 with one
/// key, 1 024 → 2 048 with four, and on towards the max as the flood goes on. The documentation
/// promises "unknown keys are no reason to grow". Fixed: a key counts once within a count
/// (one TTL, or until the cache grows), so the flood leaves the cache as it was; one key can
/// grow a cache smaller than 64 to 64 at most.
#[tokio::test]
async fn finding_one_valid_key_and_a_flood_of_made_up_keys_grow_the_cache() {
    for (capacity, keys, every) in [(64usize, 1usize, 200usize), (1024, 4, 1200)] {
        let store = MemoryStore::builder()
            .clock(FakeClock::new(start()))
            .build();
        let mine = store_with(&store, "attacker", keys);
        let cache = CachedLookup::builder(store.clone())
            .capacity(capacity)
            .max_capacity(1 << 20)
            .ttl(Duration::from_secs(30))
            .negative_ttl(Duration::from_secs(5))
            .clock(FakeClock::new(start()))
            .build_over_store()
            .unwrap();
        let misses = flood(&cache, &mine, 60_000, every).await;
        assert!(misses >= 5, "the flood evicted the key {misses} times only");
        assert_eq!(
            cache.capacity(),
            capacity as u64,
            "{keys} valid key(s) and made-up keys grew a cache of {capacity} \
             ({misses} evictions of a fresh key)"
        );
        assert!(cache.len() <= capacity + 2, "{}", cache.len());
    }

    // At the smallest sizes a single eviction is a thirty-second of the room: one key can
    // grow a cache of 1 to 64, and no further.
    let store = MemoryStore::builder()
        .clock(FakeClock::new(start()))
        .build();
    let mine = store_with(&store, "attacker", 1);
    let cache = CachedLookup::builder(store.clone())
        .capacity(1)
        .max_capacity(1 << 20)
        .clock(FakeClock::new(start()))
        .build_over_store()
        .unwrap();
    flood(&cache, &mine, 20_000, 1).await;
    assert!(cache.capacity() <= 64, "{}", cache.capacity());
    assert!(doubled_from(1, 1 << 20, cache.capacity()));
}

// ---------------------------------------------------------------------------------------
// Memory: no valid key at all
// ---------------------------------------------------------------------------------------

/// Held: made-up keys and keys that are found but cannot be used — disabled, revoked,
/// deleted, expired, their owner switched off — flooded through a small cache whose
/// negative TTL (an hour) is far longer than its TTL (a second), with the clock stepping
/// back an hour and forward a day between rounds: the cache never grows, and stays within
/// its room.
#[tokio::test]
async fn held_made_up_and_unusable_keys_never_grow_the_cache() {
    let clock = FakeClock::new(start());
    let store = MemoryStore::builder().clock(clock.clone()).build();
    // Far enough back that the clock's rewinds below do not bring these keys back.
    let past = start() - Duration::from_secs(30 * 86_400);
    let mut unusable = Vec::new();
    for i in 0..60 {
        let edit = move |mut r: KeyRecord| {
            match i % 5 {
                0 => r.status = Status::Disabled,
                1 => r.status = Status::Revoked,
                2 => r.status = Status::Deleted,
                3 => r.expires_at = Some(past),
                _ => {
                    let mut owner = Owner::new("off", "off");
                    owner.active = false;
                    r.owner = Some(owner);
                }
            }
            r
        };
        let owner = if i % 5 == 4 { "off" } else { "o" };
        unusable.push(
            store
                .issue(Owner::new(owner, owner), Environment::Live, edit)
                .unwrap(),
        );
    }
    let cache = CachedLookup::builder(store.clone())
        .capacity(16)
        .max_capacity(1 << 16)
        .ttl(Duration::from_secs(1))
        .negative_ttl(Duration::from_secs(3600))
        .clock(clock.clone())
        .build_over_store()
        .unwrap();
    for round in 0..6 {
        for key in &unusable {
            for _ in 0..2 {
                let found = cache.lookup(&key.presented()).await.unwrap().unwrap();
                assert!(!found.usable_at(cache_now(&clock)), "{:?}", found.status);
            }
        }
        for _ in 0..400 {
            let fake = made_up();
            for _ in 0..2 {
                assert!(cache.lookup(&fake.presented()).await.unwrap().is_none());
            }
        }
        assert_eq!(cache.capacity(), 16, "round {round}");
        assert!(cache.len() <= 18, "round {round}: {}", cache.len());
        match round % 3 {
            0 => clock.rewind(Duration::from_secs(3600)),
            1 => clock.advance(Duration::from_secs(86_400)),
            _ => clock.advance(Duration::from_millis(500)),
        }
    }
}

fn cache_now(clock: &FakeClock) -> SystemTime {
    use keygate::clock::Clock;
    clock.now()
}

/// FINDING (the same as above, by another road): a key its owner switches off and on through
/// the store, among made-up keys, is refused at once each time it is off, and while on it
/// was evicted by the flood and counted again each time: it grew a cache of 64 to 128 or
/// 256. Fixed
/// with the above: one key, counted once.
#[tokio::test]
async fn finding_a_key_flipping_on_and_off_among_made_up_keys_grows_the_cache() {
    let store = MemoryStore::builder()
        .clock(FakeClock::new(start()))
        .build();
    let mine = store_with(&store, "attacker", 1);
    let id = id_of(&store, &mine[0]);
    let cache = CachedLookup::builder(store.clone())
        .capacity(64)
        .max_capacity(1 << 16)
        .clock(FakeClock::new(start()))
        .build_over_store()
        .unwrap();
    for i in 0..20_000 {
        let fake = made_up();
        for _ in 0..2 {
            cache.lookup(&fake.presented()).await.unwrap();
        }
        if i % 100 == 0 {
            let to = if i % 200 == 0 {
                Status::Disabled
            } else {
                Status::Active
            };
            store.set_status(&id, to).await.unwrap();
            assert_eq!(status(&cache, &mine[0]).await, Some(to), "at once");
        }
    }
    assert_eq!(cache.capacity(), 64);
}

// ---------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------

/// Looks up `keys` distinct keys in turn, `passes` times.
async fn working_set<L: KeyLookup>(cache: &CachedLookup<L>, keys: usize, passes: usize) {
    for _ in 0..passes {
        for n in 0..keys {
            let secret = format!("in-use-{n}");
            assert!(cache
                .lookup(&PresentedKey::new(&secret))
                .await
                .unwrap()
                .is_some());
        }
    }
}

/// Held: a working set larger than the max, through every edge of capacity and max: the
/// capacity ends a power-of-two multiple of the start or the max, never past the max, and
/// the entries stay within it.
#[tokio::test]
async fn held_growth_stops_at_the_max_on_every_edge() {
    let cases: [(usize, Option<usize>, u64); 9] = [
        (1, Some(1), 1),
        (1, Some(2), 2),
        (1, None, 1_000_000),
        (64, Some(65), 65),
        (64, Some(64), 64),
        (3, Some(1_000), 1_000),
        (100, Some(150), 150),
        (7, Some(usize::MAX), u64::MAX),
        (2_000_000, None, 2_000_000),
    ];
    for (capacity, max, expected_max) in cases {
        let (backend, _calls) = finds_everything();
        let mut builder = CachedLookup::builder(backend)
            .capacity(capacity)
            .ttl(Duration::from_secs(3600))
            .clock(FakeClock::new(start()));
        if let Some(max) = max {
            builder = builder.max_capacity(max);
        }
        let cache = builder.build().unwrap();
        assert_eq!(cache.max_capacity(), expected_max, "{capacity} {max:?}");
        assert_eq!(cache.capacity(), capacity as u64);
        working_set(&cache, 1_500, 3).await;
        let grown = cache.capacity();
        assert!(
            doubled_from(capacity as u64, expected_max, grown),
            "{capacity} {max:?}: {grown}"
        );
        assert!(grown <= expected_max);
        assert!(
            cache.len() as u64 <= grown + 2,
            "{capacity} {max:?}: {} entries in {grown}",
            cache.len()
        );
        if expected_max <= 1_000 {
            assert_eq!(grown, expected_max, "{capacity} {max:?}: 1 500 keys in use");
        }
    }
}

/// Held: a capacity of `usize::MAX` builds (it allocates nothing up front), answers, and
/// cannot grow; TTLs of `Duration::MAX` and a clock stepping back and forth by a year
/// between lookups make no panic, and growth stays within its bounds.
#[tokio::test]
async fn held_extreme_settings_and_clock_steps_do_not_panic() {
    let (backend, _calls) = finds_everything();
    let huge = CachedLookup::builder(backend)
        .capacity(usize::MAX)
        .build()
        .unwrap();
    assert_eq!(huge.capacity(), u64::MAX);
    assert_eq!(huge.max_capacity(), u64::MAX);
    working_set(&huge, 300, 2).await;
    assert_eq!(huge.capacity(), u64::MAX);
    assert_eq!(huge.len(), 300);

    let (backend, _calls) = finds_everything();
    let forever = CachedLookup::builder(backend)
        .capacity(8)
        .max_capacity(512)
        .ttl(Duration::MAX)
        .negative_ttl(Duration::MAX)
        .clock(FakeClock::new(start()))
        .build()
        .unwrap();
    working_set(&forever, 1_000, 2).await;
    assert_eq!(forever.capacity(), 512);

    let clock = FakeClock::new(start());
    let (backend, _calls) = finds_everything();
    let stepping = CachedLookup::builder(backend)
        .capacity(8)
        .max_capacity(100)
        .ttl(Duration::from_secs(30))
        .clock(clock.clone())
        .build()
        .unwrap();
    let year = Duration::from_secs(365 * 86_400);
    for n in 0..3_000 {
        match n % 4 {
            0 => clock.rewind(year),
            2 => clock.advance(year),
            _ => {}
        }
        let secret = format!("in-use-{}", n % 700);
        assert!(stepping
            .lookup(&PresentedKey::new(&secret))
            .await
            .unwrap()
            .is_some());
        let capacity = stepping.capacity();
        assert!(doubled_from(8, 100, capacity), "{capacity}");
    }
    assert!(stepping.len() <= 102, "{}", stepping.len());
}

/// Held: a max below the capacity is a `Conflict`, at every edge; a zero capacity is `Zero`
/// whatever the max; a max equal to the capacity is a cache of fixed size.
#[test]
fn held_a_max_below_the_capacity_is_refused_at_every_edge() {
    let backend = |_: KeyHash| async { Ok::<_, BoxError>(None) };
    for (capacity, max) in [
        (2, 1),
        (1, 0),
        (100_001, 100_000),
        (usize::MAX, usize::MAX - 1),
        (2_000_000, 1_000_000),
    ] {
        let err = CachedLookup::builder(backend)
            .capacity(capacity)
            .max_capacity(max)
            .build()
            .err();
        assert!(
            matches!(err, Some(ConfigError::Conflict(_))),
            "{capacity} {max}: {err:?}"
        );
        let err = CachedLookup::builder(MemoryStore::new())
            .capacity(capacity)
            .max_capacity(max)
            .build_over_store()
            .err();
        assert!(matches!(err, Some(ConfigError::Conflict(_))), "{err:?}");
    }
    for max in [0, 1, usize::MAX] {
        let err = CachedLookup::builder(backend)
            .capacity(0)
            .max_capacity(max)
            .build()
            .err();
        assert!(matches!(err, Some(ConfigError::Zero(_))), "{max}: {err:?}");
    }
    for n in [1, 1_000_000, usize::MAX] {
        let fixed = CachedLookup::builder(backend)
            .capacity(n)
            .max_capacity(n)
            .build()
            .unwrap();
        assert_eq!(fixed.capacity(), fixed.max_capacity());
    }
}

// ---------------------------------------------------------------------------------------
// Honesty after growth
// ---------------------------------------------------------------------------------------

/// Held: once the cache over a store grew eightfold and more, every kind of change made
/// through the store is refused at the very next lookup — a key disabled, one deleted, all
/// of an owner's keys revoked, an owner switched off — while the keys left alone are still
/// hits; `invalidate` drops one key and `invalidate_all` every key.
#[tokio::test]
async fn held_a_grown_cache_refuses_changed_keys_at_once() {
    let store = MemoryStore::builder()
        .clock(FakeClock::new(start()))
        .build();
    let a = store_with(&store, "alice", 300);
    let b = store_with(&store, "bob", 100);
    let c = store_with(&store, "carol", 100);
    let cache = CachedLookup::builder(store.clone())
        .capacity(32)
        .ttl(Duration::from_secs(3600))
        .clock(FakeClock::new(start()))
        .build_over_store()
        .unwrap();
    let all: Vec<&ApiKey> = a.iter().chain(&b).chain(&c).collect();
    for _ in 0..4 {
        for key in &all {
            assert_eq!(status(&cache, key).await, Some(Status::Active));
        }
    }
    assert!(cache.capacity() >= 512, "{}", cache.capacity());
    assert!(doubled_from(32, 1_000_000, cache.capacity()));
    let cached = all.iter().filter(|k| hit(&cache, k)).count();
    assert!(cached >= 450, "{cached} of 500 cached after growth");
    let left_alone: Vec<&ApiKey> = a[9..].iter().filter(|k| hit(&cache, k)).collect();

    let disabled = id_of(&store, &a[7]);
    store.set_status(&disabled, Status::Disabled).await.unwrap();
    assert_eq!(status(&cache, &a[7]).await, Some(Status::Disabled));
    let deleted = id_of(&store, &a[8]);
    store.set_status(&deleted, Status::Deleted).await.unwrap();
    assert_ne!(status(&cache, &a[8]).await, Some(Status::Active));
    store.revoke_all("bob").await.unwrap();
    for key in &b {
        assert_eq!(status(&cache, key).await, Some(Status::Revoked));
    }
    store.set_owner_active("carol", false).await.unwrap();
    for key in &c {
        let record = cache.lookup(&key.presented()).await.unwrap().unwrap();
        assert!(!record.usable_at(start()), "carol's key still usable");
    }
    let still = left_alone.iter().filter(|k| hit(&cache, k)).count();
    assert!(
        still + 10 >= left_alone.len(),
        "{still} of {} keys left alone still cached",
        left_alone.len()
    );

    cache.invalidate(&a[9].hash());
    assert!(!hit(&cache, &a[9]));
    assert!(hit(&cache, &a[10]));
    assert_eq!(status(&cache, &a[9]).await, Some(Status::Active));
    let grown = cache.capacity();
    cache.invalidate_all();
    assert!(cache.is_empty());
    assert!(!hit(&cache, &a[10]));
    assert_eq!(cache.capacity(), grown, "never shrinks");
}

/// Runs `threads` OS threads, each with a current-thread runtime and the capture's
/// subscriber, on `work`, started together.
fn on_threads<F, Fut>(threads: usize, capture: &Capture, work: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (work, barrier, dispatch) =
                (Arc::clone(&work), Arc::clone(&barrier), capture.dispatch());
            std::thread::spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                barrier.wait();
                runtime.block_on(work(t));
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

/// Held: four threads miss at once over a store of 3 000 keys while the cache grows from 16;
/// a fifth disables keys meanwhile. Every thread sees the capacity only rise, always the
/// start times a power of two; one growth line is logged per doubling (one grower at a
/// time); a key disabled during growth is refused at once and after, by every thread.
#[test]
fn held_concurrent_misses_grow_it_one_doubling_at_a_time() {
    let store = MemoryStore::builder()
        .clock(FakeClock::new(start()))
        .build();
    let keys = Arc::new(store_with(&store, "o", 3_000));
    let ids: Vec<KeyId> = keys.iter().map(|k| id_of(&store, k)).collect();
    let cache = CachedLookup::builder(store.clone())
        .capacity(16)
        .max_capacity(1 << 14)
        .ttl(Duration::from_secs(3600))
        .clock(FakeClock::new(start()))
        .build_over_store()
        .unwrap();
    let capture = Capture::default();
    let disabled: Arc<Vec<usize>> = Arc::new((0..3_000).step_by(97).collect());
    let (c, k, s, d) = (
        cache.clone(),
        Arc::clone(&keys),
        store.clone(),
        Arc::clone(&disabled),
    );
    let ids = Arc::new(ids);
    on_threads(5, &capture, move |t| {
        let (cache, keys, store, disabled, ids) = (
            c.clone(),
            Arc::clone(&k),
            s.clone(),
            Arc::clone(&d),
            Arc::clone(&ids),
        );
        async move {
            if t == 4 {
                for &n in disabled.iter() {
                    store.set_status(&ids[n], Status::Disabled).await.unwrap();
                    assert_eq!(
                        status(&cache, &keys[n]).await,
                        Some(Status::Disabled),
                        "key {n} disabled during growth"
                    );
                    tokio::task::yield_now().await;
                }
                return;
            }
            let mut seen = 16;
            for pass in 0..3 {
                for i in 0..keys.len() {
                    let n = (i * 7 + t * 750 + pass * 31) % keys.len();
                    cache.lookup(&keys[n].presented()).await.unwrap().unwrap();
                    let now = cache.capacity();
                    assert!(now >= seen, "thread {t}: {seen} then {now}");
                    assert!(doubled_from(16, 1 << 14, now), "{now}");
                    seen = now;
                }
            }
        }
    });
    let grown = cache.capacity();
    assert!(grown >= 1024, "{grown}");
    let doublings = (grown / 16).trailing_zeros() as usize;
    let log = capture.text();
    assert_eq!(log.matches(GREW).count(), doublings, "{log}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for &n in disabled.iter() {
        assert_eq!(
            rt.block_on(status(&cache, &keys[n])),
            Some(Status::Disabled)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------

/// Held: the growth lines and the warning at the max, logged while issued keys are evicted
/// and looked up again, carry no key material: no secret, no ten characters of one after its
/// prefix, no hash, no key id. The warning is logged once.
#[test]
fn held_growth_logs_carry_no_key_material() {
    let store = MemoryStore::builder()
        .clock(FakeClock::new(start()))
        .build();
    let keys = store_with(&store, "o", 400);
    let cache = CachedLookup::builder(store.clone())
        .capacity(16)
        .max_capacity(128)
        .ttl(Duration::from_secs(3600))
        .clock(FakeClock::new(start()))
        .build_over_store()
        .unwrap();
    let capture = Capture::default();
    let (c, k) = (cache.clone(), keys.clone());
    on_threads(1, &capture, move |_| {
        let (cache, keys) = (c.clone(), k.clone());
        async move {
            for _ in 0..3 {
                for key in &keys {
                    assert!(cache.lookup(&key.presented()).await.unwrap().is_some());
                }
            }
        }
    });
    assert_eq!(cache.capacity(), 128);
    let log = capture.text();
    assert_eq!(log.matches(GREW).count(), 3, "16 → 32 → 64 → 128: {log}");
    assert_eq!(log.matches(AT_ITS_MOST).count(), 1, "{log}");
    for key in &keys {
        let secret = key.expose_secret();
        let tail = &secret[secret.len() - 20..];
        for window in tail.as_bytes().windows(10) {
            let piece = std::str::from_utf8(window).unwrap();
            assert!(
                !log.contains(piece),
                "a piece of a secret in the log: {log}"
            );
        }
        assert!(!log.contains(&key.hash().to_hex()), "{log}");
        assert!(!log.contains(id_of(&store, key).as_str()), "{log}");
    }
}
