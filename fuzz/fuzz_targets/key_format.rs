//! Key formats: never a panic on any candidate or any pair of prefixes, and a key a format
//! generates always passes its own check, while one changed character never does.
#![no_main]

use keygate::key::KeyFormat;
use keygate::key::Environment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = KeyFormat::default().check(text);
    let _ = KeyFormat::any().check(text);
    let mut parts = text.splitn(3, '\u{1}');
    let (Some(live), Some(test)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(format) = KeyFormat::new(live, test) else {
        return;
    };
    if let Some(candidate) = parts.next() {
        let _ = format.check(candidate);
    }
    for environment in [Environment::Live, Environment::Test] {
        let Ok(key) = format.generate(environment) else {
            return;
        };
        let secret = key.expose_secret();
        assert_eq!(format.check(secret), Ok(Some(environment)), "{live:?} {test:?}");
        // One character of the body changed: refused by the checksum or the alphabet.
        let mut changed = secret.as_bytes().to_vec();
        let at = changed.len() - 1 - (data.len() % 8);
        changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
        if let Ok(changed) = String::from_utf8(changed) {
            assert!(format.check(&changed).is_err(), "{changed:?} passed");
        }
    }
});
