//! The client IP from arbitrary forwarding headers: never a panic; an untrusted peer is the
//! client whatever the headers say; behind a trusted proxy the answer is the peer or an
//! address written in the headers.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Request};
use keygate::head::RequestHead;
use keygate::validate::{ClientIp, ForwardedHeader, PeerAddr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let peer: SocketAddr = if selector & 1 == 0 {
        SocketAddr::from(([10, 0, 0, 1], 443))
    } else {
        SocketAddr::from(([203, 0, 113, 9], 443))
    };
    let mut builder = Request::get("/");
    let mut text = String::new();
    for value in rest.split(|b| *b == 0xFF).take(4) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            text.push_str(&String::from_utf8_lossy(value.as_bytes()));
            builder = builder.header("x-forwarded-for", value.clone());
            builder = builder.header("forwarded", value);
        }
    }
    let Ok(mut req) = builder.body(()) else {
        return;
    };
    req.extensions_mut().insert(PeerAddr(peer));
    let trusting = || ClientIp::builder().trusted_proxies(["10.0.0.0/8", "fd00::/8"]);
    let (Ok(xff), Ok(forwarded)) = (
        trusting().build(),
        trusting().header(ForwardedHeader::Forwarded).build(),
    ) else {
        return;
    };
    for resolver in [ClientIp::new(), xff, forwarded] {
        let found = resolver.resolve(&RequestHead::of(&req));
        if selector & 1 == 1 {
            assert_eq!(found, Some(peer.ip()), "an untrusted peer is the client");
        }
        if let Some(ip) = found {
            let written = match ip {
                IpAddr::V4(v4) => text.contains(&v4.to_string()),
                IpAddr::V6(v6) => {
                    text.to_ascii_lowercase().contains(&v6.to_string())
                        || v6.to_ipv4_mapped().is_some()
                        || text.contains(':')
                }
            };
            assert!(ip == peer.ip() || written, "{ip} from {text:?}");
        }
    }
});
