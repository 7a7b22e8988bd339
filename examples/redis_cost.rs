//! What a `RedisLimiter` decision costs this process, without HTTP around it: `TASKS`
//! tasks (default 32) on one runtime thread each make decisions on one key, `DECISIONS` in
//! all (default 200 000), against `KEYGATE_REDIS_URL` (default `redis://127.0.0.1:6379/`).
//! Prints decisions per second and this process's CPU time (user + system, from
//! `/proc/self/stat`) per decision: the client side of the limiter, which
//! `scripts/e2e.sh` measures only mixed with the HTTP server's own work.
//!
//! `cargo run --release --example redis_cost`

use std::num::NonZeroU32;
use std::process::ExitCode;
use std::time::Instant;

use keygate::ratelimit::{Quota, RedisLimiter};

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// This process's CPU time so far, in clock ticks (utime + stime).
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (tasks, decisions) = match (env_number("TASKS", 32), env_number("DECISIONS", 200_000)) {
        (Ok(t), Ok(d)) if t > 0 && d >= t => (t, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        _ => {
            eprintln!("TASKS must be above zero, and DECISIONS at least TASKS");
            return ExitCode::from(2);
        }
    };
    let url =
        std::env::var("KEYGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let limiter: RedisLimiter<String> = match RedisLimiter::builder(url)
        .prefix("keygate:cost:")
        .connect()
        .await
    {
        Ok(limiter) => limiter,
        Err(e) => {
            eprintln!("cannot build the limiter: {e}");
            return ExitCode::FAILURE;
        }
    };
    let quota = [Quota::per_second(NonZeroU32::MAX)];
    let key = "cost".to_owned();
    // Warm up: the connection, the script.
    for _ in 0..1000 {
        if let Err(e) = limiter.decide(&key, &quota, 1).await {
            eprintln!("Redis cannot decide: {e}");
            return ExitCode::FAILURE;
        }
    }
    let per_task = decisions / tasks;
    let (Some(before), started) = (cpu_ticks(), Instant::now()) else {
        eprintln!("cannot read /proc/self/stat");
        return ExitCode::FAILURE;
    };
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let limiter = limiter.clone();
        let key = key.clone();
        set.spawn(async move {
            let mut failed = 0u64;
            for _ in 0..per_task {
                if limiter.decide(&key, &quota, 1).await.is_err() {
                    failed += 1;
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(done) = set.join_next().await {
        failed += done.unwrap_or(per_task);
    }
    let elapsed = started.elapsed();
    let Some(after) = cpu_ticks() else {
        eprintln!("cannot read /proc/self/stat");
        return ExitCode::FAILURE;
    };
    // Linux reports ticks of 1/100 s (USER_HZ) in /proc.
    let cpu_us = (after - before) as f64 * 10_000.0;
    let done = (per_task * tasks) as f64;
    println!(
        "{} decisions ({failed} failed) by {tasks} tasks in {:.2} s: {:.0} decisions/s, {:.2} µs CPU per decision",
        per_task * tasks,
        elapsed.as_secs_f64(),
        done / elapsed.as_secs_f64(),
        cpu_us / done
    );
    ExitCode::SUCCESS
}
