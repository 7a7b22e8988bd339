//! The limiter conformance suite on the in-memory store, on a fake clock.

mod limiter_conformance;

use keygate::clock::FakeClock;
use keygate::ratelimit::{Decision, MemoryLimiter, Quota};

struct Memory(MemoryLimiter<String>);

impl limiter_conformance::Subject for Memory {
    async fn decide(&self, key: &str, quotas: &[Quota], cost: u32) -> Decision {
        self.0
            .decide(&key.to_owned(), quotas, cost)
            .expect("the memory limiter decides")
    }

    async fn refund(&self, key: &str, quotas: &[Quota], cost: u32) {
        self.0.refund(&key.to_owned(), quotas, cost);
    }
}

async fn memory() -> (Memory, FakeClock) {
    let clock = limiter_conformance::clock();
    let limiter = MemoryLimiter::builder()
        .clock(clock.clone())
        .build()
        .expect("limiter");
    (Memory(limiter), clock)
}

limiter_conformance!(memory);
