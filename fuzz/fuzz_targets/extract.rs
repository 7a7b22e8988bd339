//! Key extraction from arbitrary headers and URIs: never a panic, and a key it returns is
//! visible ASCII, within the length bound, and present in the request.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use keygate::extract::{Extractor, Scheme};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF: the URI, then (name, value) pairs.
    let mut fields = data.split(|b| *b == 0xFF);
    let uri = fields
        .next()
        .and_then(|u| Uri::try_from(u).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = HeaderMap::new();
    let names = ["x-api-key", "authorization", "x-mobid-key", "authorization", "x-api-key"];
    for (i, value) in fields.enumerate().take(8) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(names[i % names.len()]), value);
        }
    }
    let Ok(custom) = Scheme::header("X-Mobid-Key") else {
        return;
    };
    let Ok(query) = Scheme::query("api_key") else {
        return;
    };
    for extractor in [
        Extractor::default(),
        Extractor::builder()
            .schemes([Scheme::x_api_key(), Scheme::Bearer, Scheme::Basic, custom, query])
            .build()
            .unwrap_or_default(),
    ] {
        if let Ok(credential) = extractor.extract_parts(&headers, &uri) {
            let secret = credential.secret();
            assert!(!secret.is_empty());
            assert!(secret.len() <= extractor.max_len());
            assert!(secret.bytes().all(|b| b.is_ascii_graphic()), "{secret:?}");
        }
    }
});
