//! The head of a request: what every policy looks at (method, URI, headers, extensions),
//! borrowed, and what is read from it before anything else (is it gRPC?).

use http::header::CONTENT_TYPE;
use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Uri};

/// The parts of a request a predicate may look at.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions.
    pub extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// Borrows the head of a request.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// The request's content type when it is gRPC, echoed on the reply so that gRPC-Web clients
/// get their own content type back: `application/grpc`, `application/grpc+proto` (any
/// `+suffix`), `application/grpc-web`, `application/grpc-web-text` (and their `+suffix`
/// forms), compared without regard to case, optionally followed by `;` parameters.
/// `application/grpcx` is not gRPC.
pub(crate) fn is_grpc(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get(CONTENT_TYPE)
        .filter(|v| is_grpc_type(v.as_bytes()))
        .cloned()
}

fn is_grpc_type(value: &[u8]) -> bool {
    const BASE: &[u8] = b"application/grpc";
    let Some((head, rest)) = value.split_at_checked(BASE.len()) else {
        return false;
    };
    if !head.eq_ignore_ascii_case(BASE) {
        return false;
    }
    let ends = |rest: &[u8]| matches!(rest.first(), None | Some(b'+' | b';' | b' ' | b'\t'));
    if ends(rest) {
        return true;
    }
    for variant in [&b"-web-text"[..], b"-web"] {
        if let Some((head, tail)) = rest.split_at_checked(variant.len()) {
            if head.eq_ignore_ascii_case(variant) && ends(tail) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_grpc() {
        let cases = [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc+json", true),
            ("APPLICATION/GRPC", true),
            ("Application/gRPC+Proto", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-web", true),
            ("application/grpc-web+proto", true),
            ("application/grpc-web-text", true),
            ("application/GRPC-WEB-TEXT+proto", true),
            ("application/grpcx", false),
            ("application/grpc-webx", false),
            ("application/grpc-other", false),
            ("application/grp", false),
            ("application/json", false),
            ("text/grpc", false),
            ("", false),
        ];
        for (value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_grpc(&headers).is_some(), expected, "{value:?}");
        }
        assert!(is_grpc(&HeaderMap::new()).is_none());
    }
}
