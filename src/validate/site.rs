use std::borrow::Cow;

use http::header::HOST;
use http::HeaderName;

use crate::error::ConfigError;
use crate::head::RequestHead;

/// Where the site of a request comes from, for keys limited to some sites.
///
/// It is consulted only for keys that have a site allowlist; a request whose site cannot
/// be found is refused for such keys (`site_not_allowed`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SiteResolver {
    /// The path segment at this index (0-based): `PathSegment(1)` reads `123` from
    /// `/api/123/resource`. Percent-encoded segments are decoded.
    PathSegment(usize),
    /// A header's value.
    Header(HeaderName),
    /// The host (URI authority, else the `Host` header), lower-cased, without the port.
    Host,
}

impl SiteResolver {
    /// A header by name.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidHeaderName`] when `name` is not a valid header name.
    pub fn header(name: &str) -> Result<Self, ConfigError> {
        HeaderName::from_bytes(name.as_bytes())
            .map(Self::Header)
            .map_err(|_| ConfigError::InvalidHeaderName(name.to_owned()))
    }

    /// The site of a request, if it has one.
    pub fn resolve<'a>(&self, head: &RequestHead<'a>) -> Option<Cow<'a, str>> {
        match self {
            Self::PathSegment(index) => {
                let segment = head.uri.path().strip_prefix('/')?.split('/').nth(*index)?;
                if segment.is_empty() {
                    return None;
                }
                let decoded = percent_encoding::percent_decode_str(segment)
                    .decode_utf8()
                    .ok()?;
                (!decoded.is_empty() && !decoded.contains('/')).then_some(decoded)
            }
            Self::Header(name) => {
                let value = head.headers.get(name)?.to_str().ok()?.trim();
                (!value.is_empty()).then_some(Cow::Borrowed(value))
            }
            Self::Host => {
                let header = match head.headers.get(HOST) {
                    Some(value) => {
                        let value = value.to_str().ok()?;
                        let authority: http::uri::Authority = value.parse().ok()?;
                        Some(authority)
                    }
                    None => None,
                };
                let host = match (head.uri.host(), &header) {
                    // An absolute URI and a Host header that disagree: routers and apps read
                    // one or the other, so neither can be trusted as the site.
                    (Some(uri), Some(h)) if !uri.eq_ignore_ascii_case(h.host()) => return None,
                    (Some(uri), _) => uri,
                    (None, Some(h)) => h.host(),
                    (None, None) => return None,
                };
                lower(host).map(|s| Cow::Owned(s.into_owned()))
            }
        }
    }
}

fn lower(host: &str) -> Option<Cow<'_, str>> {
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)]
    fn site_table() {
        let cases: Vec<(&str, SiteResolver, &str, Vec<(&str, &str)>, Option<&str>)> = vec![
            (
                "segment",
                SiteResolver::PathSegment(1),
                "/api/123/resource",
                vec![],
                Some("123"),
            ),
            (
                "segment encoded",
                SiteResolver::PathSegment(1),
                "/api/a%20b/x",
                vec![],
                Some("a b"),
            ),
            (
                "segment encoded slash",
                SiteResolver::PathSegment(1),
                "/api/a%2Fb/x",
                vec![],
                None,
            ),
            (
                "segment missing",
                SiteResolver::PathSegment(3),
                "/api/123",
                vec![],
                None,
            ),
            (
                "segment empty",
                SiteResolver::PathSegment(1),
                "/api//x",
                vec![],
                None,
            ),
            (
                "header",
                SiteResolver::header("x-site").unwrap(),
                "/",
                vec![("x-site", "shop-1")],
                Some("shop-1"),
            ),
            (
                "header missing",
                SiteResolver::header("x-site").unwrap(),
                "/",
                vec![],
                None,
            ),
            (
                "host header",
                SiteResolver::Host,
                "/",
                vec![("host", "Shop.Example.com:8080")],
                Some("shop.example.com"),
            ),
            (
                "absolute uri",
                SiteResolver::Host,
                "http://api.example.com/x",
                vec![],
                Some("api.example.com"),
            ),
            (
                "bad host header",
                SiteResolver::Host,
                "/",
                vec![("host", "a b")],
                None,
            ),
        ];
        for (name, resolver, uri, headers, expected) in cases {
            let mut builder = http::Request::get(uri);
            for (h, v) in headers {
                builder = builder.header(h, v);
            }
            let req = builder.body(()).unwrap();
            assert_eq!(
                resolver.resolve(&RequestHead::of(&req)).as_deref(),
                expected,
                "{name}"
            );
        }
    }
}
