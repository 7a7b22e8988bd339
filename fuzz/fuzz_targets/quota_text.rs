//! Quota text: never a panic, and every quota it accepts reads back the same from the
//! text it writes.
#![no_main]

use keygate::ratelimit::Quota;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(quota) = Quota::parse(text) {
        let written = quota.to_string();
        let again = Quota::parse(&written);
        assert_eq!(again.as_ref(), Ok(&quota), "{text:?} -> {written:?}");
        // The documented longest refill: 100 years.
        assert!(quota.period() <= std::time::Duration::from_secs(100 * 365 * 86_400));
    }
});
