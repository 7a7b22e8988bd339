//! The bypass rule on arbitrary paths: a path let through under `/swagger` never has a
//! segment a router could read as `.` or `..`, a `;`, a control character, or an encoded
//! separator, however it is encoded.
#![no_main]

use http::{Method, Request};
use keygate::bypass::{Bypass, DefaultBypass};
use keygate::head::{RequestHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for method in [Method::GET, Method::OPTIONS, Method::POST] {
        let Ok(req) = Request::builder().method(method).uri(text).body(()) else {
            return;
        };
        if !DefaultBypass::default().bypass(&RequestHead::of(&req)) {
            continue;
        }
        let path = req.uri().path();
        assert!(path == "/swagger" || path.starts_with("/swagger/"), "{path}");
        assert!(!path.contains(['\\', ';']), "{path}");
        let rest = &path[1..];
        let segments: Vec<&str> = rest.split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            assert!(!segment.is_empty() || i + 1 == segments.len(), "{path}");
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
            assert!(decoded != b"." && decoded != b"..", "{path}");
            assert!(
                !decoded
                    .iter()
                    .any(|b| matches!(b, b'/' | b'\\' | b'%' | b';') || b.is_ascii_control()),
                "{path}"
            );
        }
    }
});
