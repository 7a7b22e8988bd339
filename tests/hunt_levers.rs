//! Attack on the levers pulled for speed: the in-memory limiter's one-window charge
//! (`charge_one`) and its clamp after a backward clock step, and the key format's
//! arithmetic alphabet check. Black-box: the public `MemoryLimiter` on fake clocks, and
//! `KeyFormat::check`.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::clock::{Clock, FakeClock};
use keygate::key::{Environment, FormatError, KeyFormat};
use keygate::ratelimit::{Decision, MemoryLimiter, Quota};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000 * SEC;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("not zero")
}

fn at(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn limiter_on(clock: &FakeClock) -> MemoryLimiter<u32> {
    MemoryLimiter::builder()
        .clock(clock.clone())
        .build()
        .expect("limiter")
}

fn admitted(limiter: &MemoryLimiter<u32>, key: u32, quotas: &[Quota], n: usize) -> usize {
    (0..n)
        .filter(|_| limiter.decide(&key, quotas, 1).expect("decided").allowed)
        .count()
}

// ---------------------------------------------------------------------------------------
// 1. charge_one and clamp
// ---------------------------------------------------------------------------------------

/// Held. Real threads on one one-window key (charge_one), some of them giving back part of
/// what they took, on a clock that does not move: what stays taken is exactly the capacity
/// once the key is drained, whatever the interleaving. The same with the quota named twice
/// (the general `charge`, one cell).
#[test]
fn held_threads_on_one_window_never_over_admit_with_refunds_racing() {
    let quota = Quota::per_hour(nz(500));
    for quotas in [vec![quota], vec![quota, quota]] {
        let clock = FakeClock::new(at(T0));
        let limiter = limiter_on(&clock);
        let taken = AtomicUsize::new(0);
        let given = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..4usize {
                let (limiter, taken, given, quotas) = (&limiter, &taken, &given, &quotas);
                scope.spawn(move || {
                    for i in 0..400usize {
                        if limiter.decide(&1, quotas, 1).expect("decided").allowed {
                            taken.fetch_add(1, Ordering::Relaxed);
                            if (i + t) % 3 == 0 {
                                limiter.refund(&1, quotas, 1);
                                given.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        // Drain what is left, alone.
        let rest = admitted(&limiter, 1, &quotas, 1000);
        let kept = taken.load(Ordering::Relaxed) + rest - given.load(Ordering::Relaxed);
        assert_eq!(kept, 500, "{} windows: tokens kept", quotas.len());
    }
}

/// Held. After a backward clock step every refusal clamps the cell; with threads refusing
/// and clamping at once, none admits anything while the (stepped) clock stands still, and
/// after exactly k intervals exactly k are admitted, across threads: a clamp neither loses
/// a token nor gives one.
#[test]
fn held_clamps_racing_from_threads_give_exactly_the_refill() {
    let quota = Quota::per_minute(nz(60));
    for quotas in [vec![quota], vec![Quota::per_day(nz(100_000)), quota]] {
        let clock = FakeClock::new(at(T0));
        let limiter = limiter_on(&clock);
        assert_eq!(admitted(&limiter, 1, &quotas, 100), 60);
        clock.rewind(Duration::from_secs(3600));
        let count = |n: usize| {
            let got = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    let (limiter, got, quotas) = (&limiter, &got, &quotas);
                    scope.spawn(move || {
                        got.fetch_add(admitted(limiter, 1, quotas, n), Ordering::Relaxed);
                    });
                }
            });
            got.load(Ordering::Relaxed)
        };
        assert_eq!(count(50), 0, "empty after the step back");
        clock.advance(Duration::from_secs(7));
        assert_eq!(count(50), 7, "seven seconds refill seven tokens");
    }
}

/// A clock that, the first time it is read after being armed, runs a hook (another
/// request, on the same thread, while this one holds the time it read): the reading is
/// returned as it was before the hook ran. This is a request preempted between reading
/// the clock and charging its bucket.
#[derive(Clone, Default)]
struct StaleClock {
    now: Arc<AtomicU64>,
    hook: Arc<Mutex<Option<Hook>>>,
}

type Hook = Box<dyn FnOnce() + Send>;

impl Clock for StaleClock {
    fn now(&self) -> SystemTime {
        at(self.now_nanos())
    }

    fn now_nanos(&self) -> u64 {
        let read = self.now.load(Ordering::SeqCst);
        let hook = self.hook.lock().expect("hook").take();
        if let Some(hook) = hook {
            hook();
        }
        read
    }
}

/// Found by this hunt. A request that read the clock, then was preempted while other
/// requests, later, drained its key, refuses (right) but takes the gap between its stale
/// horizon and the cell's TAT for a backward clock step and clamps the cell to its own
/// horizon: every token charged in the time it was away is given back. Here 10 a second
/// admits 30 requests within one second (10 at once, 10 a second later, then 10 more
/// that the clamp gave).
#[test]
fn a_stale_refusal_does_not_clamp_away_later_charges() {
    let quota = Quota::per_second(nz(10));
    let wide = Quota::per_day(nz(1_000_000));
    for quotas in [vec![quota], vec![quota, wide], vec![wide, quota]] {
        let clock = StaleClock::default();
        clock.now.store(T0, Ordering::SeqCst);
        let limiter: MemoryLimiter<u32> = MemoryLimiter::builder()
            .clock(clock.clone())
            .build()
            .expect("limiter");
        let mut count = admitted(&limiter, 1, &quotas, 20);
        assert_eq!(count, 10);
        let later = Arc::new(AtomicUsize::new(0));
        {
            let (limiter, later, clock2, quotas) = (
                limiter.clone(),
                Arc::clone(&later),
                clock.clone(),
                quotas.clone(),
            );
            *clock.hook.lock().expect("hook") = Some(Box::new(move || {
                clock2.now.store(T0 + SEC, Ordering::SeqCst);
                later.fetch_add(admitted(&limiter, 1, &quotas, 20), Ordering::SeqCst);
            }));
        }
        // The stale request: read T0, then the others ran at T0 + 1 s.
        let stale = limiter.decide(&1, &quotas, 1).expect("decided");
        assert!(!stale.allowed, "the key was empty at either time");
        count += later.load(Ordering::SeqCst);
        assert_eq!(count, 20, "10 at T0, 10 refilled by T0 + 1 s");
        // Still T0 + 1 s: nothing left.
        let after = admitted(&limiter, 1, &quotas, 20);
        assert_eq!(
            count + after,
            20,
            "{} windows: {after} more admitted at T0 + 1 s after a stale refusal clamped the cell",
            quotas.len()
        );
    }
}

/// Held. The numbers of a one-window key (charge_one) are those of the same quota named
/// twice (one cell, the general charge) and of the quota with a window that never binds,
/// in either order, over a long pseudo-random run: costs 0, 1, a few, the capacity, above
/// it, `u32::MAX`; refunds; the clock moving forward, standing, and stepping back.
#[test]
fn held_one_window_numbers_agree_with_the_general_charge() {
    let quotas = [
        Quota::per_second(nz(10)),
        Quota::per_minute(nz(7)).with_burst(nz(3)),
        Quota::new(nz(1), Duration::from_nanos(1)).expect("1 ns"),
        Quota::new(nz(5), Duration::from_secs(95 * 365 * 86_400)).expect("95 years"),
        Quota::per_day(nz(u32::MAX)),
    ];
    for quota in quotas {
        // Never binds on costs up to 4: more tokens than the run takes, and a horizon no
        // backward step here reaches.
        let free = Quota::new(nz(u32::MAX), Duration::from_secs(95 * 365 * 86_400)).expect("free");
        let shapes: [Vec<Quota>; 4] = [
            vec![quota],
            vec![quota, quota],
            vec![quota, free],
            vec![free, quota],
        ];
        let clock = FakeClock::new(at(T0));
        let limiter = limiter_on(&clock);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let cap = quota.capacity().get();
        let interval = quota.interval().as_nanos() as u64;
        for round in 0..3000 {
            let r = next();
            let cost = match r % 16 {
                0 => 0,
                1 => cap,
                2 => cap.saturating_add(1),
                3 => u32::MAX,
                4..=6 => (r >> 8) as u32 % 4 + 1,
                _ => 1,
            };
            let decisions: Vec<Decision> = (0..shapes.len() as u32)
                .map(|key| {
                    limiter
                        .decide(&key, &shapes[key as usize], cost)
                        .expect("decided")
                })
                .collect();
            for (shape, d) in shapes.iter().zip(&decisions).skip(1) {
                if shape.contains(&free) && (cost > 4 || cap == u32::MAX) {
                    // A cost the run repeats drains the free window too, and a quota as
                    // large as it ties on remaining (the later reset is then reported).
                    continue;
                }
                // A free window reports only when it is the tighter one on remaining,
                // which it never is; compare what the quota says.
                assert_eq!(
                    (d.allowed, d.quota, &d.numbers, d.reset_in),
                    (
                        decisions[0].allowed,
                        decisions[0].quota,
                        &decisions[0].numbers,
                        decisions[0].reset_in
                    ),
                    "{quota}, round {round}, cost {cost}, shape {shape:?}"
                );
            }
            if decisions[0].allowed && r % 5 == 0 && cost > 0 {
                for (key, shape) in shapes.iter().enumerate() {
                    limiter.refund(&(key as u32), shape, cost);
                }
            }
            match (r >> 32) % 10 {
                0..=3 => {}
                4..=7 => {
                    clock.advance(Duration::from_nanos(interval.saturating_mul((r >> 40) % 3)))
                }
                8 => clock.advance(Duration::from_nanos((r >> 20) % (interval.max(2)))),
                _ => clock.rewind(Duration::from_nanos(
                    interval.saturating_mul((r >> 40) % 5).min(SEC * 3600),
                )),
            }
        }
    }
}

/// Held. The ends of time: a clock at 0 and a clock at and near `u64::MAX` nanoseconds,
/// a fresh key and a key charged before the jump, one window and two: no panic, never an
/// admission from a saturated time, and a refusal that says to wait.
#[test]
fn held_the_ends_of_time_neither_panic_nor_admit_from_a_saturated_clock() {
    let quota = Quota::per_second(nz(3));
    let long = Quota::new(nz(5), Duration::from_secs(95 * 365 * 86_400)).expect("95 years");
    for quotas in [vec![quota], vec![quota, long], vec![long]] {
        let clock = FakeClock::new(UNIX_EPOCH);
        let limiter = limiter_on(&clock);
        // At 0: a fresh bucket admits its capacity.
        let cap = quotas
            .iter()
            .map(|q| q.capacity().get() as usize)
            .min()
            .unwrap_or(0);
        assert_eq!(admitted(&limiter, 1, &quotas, 10), cap, "at the epoch");
        for ns in [u64::MAX, u64::MAX - 1, u64::MAX - SEC] {
            clock.set(at(ns));
            for key in [1, 2] {
                for cost in [0, 1, u32::MAX] {
                    let d = limiter.decide(&key, &quotas, cost).expect("decided");
                    // One second before the end, a short window still fits.
                    if ns > u64::MAX - SEC {
                        assert!(!d.allowed, "admitted at {ns} ns, cost {cost}");
                    }
                    if !d.allowed {
                        assert!(d.numbers.retry_after > 0, "{d:?}");
                    }
                }
            }
            limiter.refund(&1, &quotas, u32::MAX);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. the key format check
// ---------------------------------------------------------------------------------------

fn formats() -> Vec<KeyFormat> {
    vec![
        KeyFormat::default(),
        KeyFormat::new("sk_", "sk_test_").expect("format"),
        KeyFormat::new("~", "!").expect("format"),
    ]
}

/// Held. Every single-byte substitution of a valid key (every byte value that leaves valid
/// UTF-8, at every position, prefix and checksum included) is refused, and so is every
/// multi-byte character put in place of a byte or inserted, every deletion and every
/// insertion, without a panic.
#[test]
fn held_every_single_substitution_of_a_valid_key_is_refused() {
    let multibyte = [
        'é',
        '٣',
        'Ａ',
        'ｚ',
        '\u{ff10}',
        '\u{10FFFF}',
        '\u{200b}',
        'İ',
    ];
    for format in formats() {
        for env in [Environment::Live, Environment::Test] {
            for _ in 0..3 {
                let key = format.generate(env).expect("random");
                let key = key.expose_secret();
                assert_eq!(format.check(key), Ok(Some(env)));
                let bytes = key.as_bytes();
                for pos in 0..bytes.len() {
                    for byte in 0..=u8::MAX {
                        if byte == bytes[pos] {
                            continue;
                        }
                        let mut changed = bytes.to_vec();
                        changed[pos] = byte;
                        if let Ok(text) = std::str::from_utf8(&changed) {
                            assert!(
                                format.check(text).is_err(),
                                "{text:?} (byte {byte:#04x} at {pos}) accepted"
                            );
                        }
                    }
                    for c in multibyte {
                        let mut replaced = String::from(&key[..pos]);
                        replaced.push(c);
                        replaced.push_str(&key[pos + 1..]);
                        assert!(format.check(&replaced).is_err(), "{replaced:?}");
                        let mut inserted = String::from(&key[..pos]);
                        inserted.push(c);
                        inserted.push_str(&key[pos..]);
                        assert!(format.check(&inserted).is_err(), "{inserted:?}");
                    }
                    let mut deleted = String::from(&key[..pos]);
                    deleted.push_str(&key[pos + 1..]);
                    assert!(format.check(&deleted).is_err(), "{deleted:?}");
                    for c in ['0', 'z', 'Z', '_'] {
                        let mut inserted = String::from(&key[..pos]);
                        inserted.push(c);
                        inserted.push_str(&key[pos..]);
                        assert!(format.check(&inserted).is_err(), "{inserted:?}");
                    }
                }
            }
        }
    }
}

/// Held. The body alone, with each byte outside the alphabet at each position: refused
/// as `Alphabet` (not as a checksum mismatch, nor accepted), including the bytes one
/// either side of each alphabet range and their case-folded images (`@`, `[`, `` ` ``,
/// `{`, `/`, `:`, and 0x40|0x80...).
#[test]
fn held_every_byte_outside_the_alphabet_is_an_alphabet_error_at_every_position() {
    let format = KeyFormat::default();
    let key = format.generate(Environment::Live).expect("random");
    let key = key.expose_secret();
    let prefix = format.prefix(Environment::Live).len();
    for pos in prefix..key.len() {
        for byte in 0..0x80u8 {
            if byte.is_ascii_alphanumeric() {
                continue;
            }
            let mut changed = key.as_bytes().to_vec();
            changed[pos] = byte;
            let text = std::str::from_utf8(&changed).expect("ascii");
            assert_eq!(
                format.check(text),
                Err(FormatError::Alphabet),
                "byte {byte:#04x} at {pos}"
            );
        }
    }
}

/// Held. Checksum edges: the six digits at their largest (`zzzzzz`, above `u32::MAX`),
/// all `0`, and the right CRC written with a leading digit that pushes it past 2^32 are
/// refused; lengths from 0 to 100 after each prefix are refused unless exactly 30.
#[test]
fn held_checksum_and_length_edges_are_refused() {
    let format = KeyFormat::default();
    let key = format.generate(Environment::Test).expect("random");
    let key = key.expose_secret();
    let body = &key[..key.len() - 6];
    for checksum in ["zzzzzz", "000000", "ZZZZZZ", "4gfFC3", "4gfFC4"] {
        let candidate = format!("{body}{checksum}");
        if candidate != key {
            assert_eq!(format.check(&candidate), Err(FormatError::Checksum));
        }
    }
    // The right value plus 2^32 (which a comparison done in 32 bits would accept).
    let crc = u64::from(crc32fast::hash(body.as_bytes())) + (1u64 << 32);
    let alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut digits = [b'0'; 6];
    let mut v = crc;
    for slot in digits.iter_mut().rev() {
        *slot = alphabet[(v % 62) as usize];
        v /= 62;
    }
    let wrapped = format!("{body}{}", std::str::from_utf8(&digits).expect("ascii"));
    assert_eq!(format.check(&wrapped), Err(FormatError::Checksum));
    for prefix in ["kg_live_", "kg_test_", "", "kg_", "KG_LIVE_"] {
        for len in 0..=100 {
            let candidate = format!("{prefix}{}", "a".repeat(len));
            assert!(format.check(&candidate).is_err(), "{candidate:?}");
        }
    }
}

/// A refusal stays a refusal (commit `71f014f`, until now without a test). On a key with
/// two windows, the refusing window is clamped after a backward clock step, and the clamp
/// reads the clock again: here that read runs a refund of the whole key, as another request
/// giving back its tokens at that instant would. The decision then re-reads the cells to
/// report the bucket's numbers, and finds every window open again; it must still say
/// "refused", for this request took nothing (an "allowed" here would be one request over
/// the quota, admitted without a charge).
#[test]
fn a_refund_during_a_refusal_does_not_turn_it_into_an_admission() {
    // Two windows (the general charge) and one (`charge_one`, which reports the step that
    // refused rather than reading its cell again).
    let two = vec![Quota::per_day(nz(1_000)), Quota::per_second(nz(2))];
    for quotas in [two, vec![Quota::per_second(nz(2))]] {
        refund_during_a_refusal(quotas);
    }
}

fn refund_during_a_refusal(quotas: Vec<Quota>) {
    let clock = StaleClock::default();
    clock.now.store(T0 + 100 * SEC, Ordering::SeqCst);
    let limiter: MemoryLimiter<u32> = MemoryLimiter::builder()
        .clock(clock.clone())
        .build()
        .expect("limiter");
    assert_eq!(
        admitted(&limiter, 1, &quotas, 3),
        2,
        "the second window drained"
    );
    // The clock steps back 100 s: the drained window's TAT lies past now + its burst.
    clock.now.store(T0, Ordering::SeqCst);
    let refunded = Arc::new(AtomicUsize::new(0));
    {
        let (limiter, clock2, refunded, quotas) = (
            limiter.clone(),
            clock.clone(),
            Arc::clone(&refunded),
            quotas.clone(),
        );
        // The decision's own clock read passes; the clamp's, the second, runs the refund.
        *clock.hook.lock().expect("hook") = Some(Box::new(move || {
            *clock2.hook.lock().expect("hook") = Some(Box::new(move || {
                limiter.refund(&1, &quotas, u32::MAX);
                refunded.fetch_add(1, Ordering::SeqCst);
            }));
        }));
    }
    let decision = limiter.decide(&1, &quotas, 1).expect("decided");
    assert_eq!(
        refunded.load(Ordering::SeqCst),
        1,
        "the refund ran inside the refusal"
    );
    assert!(
        !decision.allowed,
        "a refused request reported as allowed: {decision:?}"
    );
}
