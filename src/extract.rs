//! Finding the key in a request: an ordered list of [`Scheme`]s.
//!
//! Every configured scheme is read. The same key in two places is fine (a client that
//! sends both `X-API-KEY` and `Authorization: Bearer` with one key); two different keys,
//! or one header repeated with different values, is [`ExtractError::Ambiguous`]
//! (400 `ambiguous_credentials`): guessing which one the client meant is how
//! authentication bypasses are born. A value that is not visible ASCII or is longer than
//! [`Extractor::max_len`] is [`ExtractError::Malformed`] (401 `invalid_api_key`) and never
//! reaches a lookup.
//!
//! ```
//! use http::Request;
//! use keygate::extract::{Extractor, Scheme, ExtractError};
//!
//! let extractor = Extractor::builder()
//!     .schemes([Scheme::header("X-Mobid-Key")?, Scheme::Bearer])
//!     .build()?;
//! let req = Request::get("/v1/health")
//!     .header("x-mobid-key", "qk_abc")
//!     .header("authorization", "Bearer qk_abc")
//!     .body(())?;
//! assert_eq!(extractor.extract(&req).unwrap().secret(), "qk_abc");
//!
//! let req = Request::get("/").header("authorization", "Bearer other").header("x-mobid-key", "qk_abc").body(())?;
//! assert_eq!(extractor.extract(&req).unwrap_err(), ExtractError::Ambiguous);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

use base64::Engine as _;
use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, Request, Uri};
use zeroize::Zeroizing;

use crate::error::ConfigError;

/// Default bound on a presented key's length, in bytes.
pub(crate) const DEFAULT_MAX_LEN: usize = 256;

/// One place a key can be found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// A header carrying the bare key, such as `X-API-KEY` or `X-Mobid-Key`.
    Header(HeaderName),
    /// `Authorization: Bearer <key>` (the scheme name is case-insensitive).
    Bearer,
    /// `Authorization: Basic base64(<key>:)`: the key as username and an empty password, as
    /// `curl -u KEY:` sends it.
    Basic,
    /// A query parameter such as `?api_key=…`.
    ///
    /// **Risky, and off unless you add it**: URLs end up in access logs, proxy logs,
    /// browser history and `Referer` headers, so a key sent this way should be treated as
    /// leaked. Offer it only where clients cannot set headers.
    Query(String),
}

impl Scheme {
    /// `X-API-KEY`, the default.
    pub fn x_api_key() -> Self {
        Self::Header(HeaderName::from_static("x-api-key"))
    }

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

    /// A query parameter by name (see the warning on [`Scheme::Query`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError::EmptyQueryName`] when `name` is empty.
    pub fn query(name: &str) -> Result<Self, ConfigError> {
        if name.is_empty() {
            return Err(ConfigError::EmptyQueryName);
        }
        Ok(Self::Query(name.to_owned()))
    }

    fn kind(&self) -> SchemeKind {
        match self {
            Self::Header(_) => SchemeKind::Header,
            Self::Bearer => SchemeKind::Bearer,
            Self::Basic => SchemeKind::Basic,
            Self::Query(_) => SchemeKind::Query,
        }
    }
}

/// Which kind of scheme a key came from (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemeKind {
    /// A named header.
    Header,
    /// `Authorization: Bearer`.
    Bearer,
    /// `Authorization: Basic`.
    Basic,
    /// A query parameter.
    Query,
}

/// Why no usable key came out of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// No configured scheme carried a key.
    #[error("no API key in any configured scheme")]
    Missing,
    /// Two different keys in one request.
    #[error("more than one different API key in the request")]
    Ambiguous,
    /// A key was sent but cannot be one: too long, not visible ASCII, bad Basic encoding,
    /// an empty bearer token.
    #[error("the API key is malformed")]
    Malformed,
}

/// A key found in a request. Borrowed from the request where possible.
pub struct Credential<'a> {
    secret: Found<'a>,
    scheme: SchemeKind,
    places: Places,
}

/// A key as found: borrowed from the request, or decoded out of it (Basic, the query) into
/// memory that is wiped when dropped.
enum Found<'a> {
    Borrowed(&'a str),
    Decoded(Zeroizing<String>),
}

impl std::ops::Deref for Found<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Self::Borrowed(text) => text,
            Self::Decoded(text) => text,
        }
    }
}

/// The headers a key was found in: which header schemes (by index), whether
/// `Authorization`, and whether one of them carried it more than once. Enough to mark
/// exactly those headers sensitive, without looking at any other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Places {
    headers: u32,
    /// A header scheme past the 32nd carried it (no bit for it: mark all of those).
    beyond: bool,
    authorization: bool,
    repeated: bool,
}

impl Credential<'_> {
    /// The presented secret. Never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Where it was found (the first scheme that carried it).
    pub fn scheme(&self) -> SchemeKind {
        self.scheme
    }

    /// Every header it was found in.
    pub(crate) fn places(&self) -> Places {
        self.places
    }
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("secret", &"<redacted>")
            .field("scheme", &self.scheme)
            .finish()
    }
}

/// Ordered key-extraction schemes. The default reads `X-API-KEY`, then
/// `Authorization: Bearer`, then Basic.
#[derive(Debug, Clone)]
pub struct Extractor {
    schemes: Vec<Scheme>,
    max_len: usize,
    bearer: bool,
    basic: bool,
}

impl Default for Extractor {
    fn default() -> Self {
        Self {
            schemes: vec![Scheme::x_api_key(), Scheme::Bearer, Scheme::Basic],
            max_len: DEFAULT_MAX_LEN,
            bearer: true,
            basic: true,
        }
    }
}

/// Settings for an [`Extractor`], from [`Extractor::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ExtractorBuilder {
    schemes: Vec<Scheme>,
    max_len: usize,
}

impl ExtractorBuilder {
    /// Reads these schemes, in order, replacing earlier ones (a scheme given twice counts
    /// once).
    pub fn schemes(mut self, schemes: impl IntoIterator<Item = Scheme>) -> Self {
        self.schemes.clear();
        for scheme in schemes {
            if !self.schemes.contains(&scheme) {
                self.schemes.push(scheme);
            }
        }
        self
    }

    /// The longest key accepted, in bytes (default 256).
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// Checks the settings and builds the extractor.
    ///
    /// # Errors
    ///
    /// [`ConfigError::NoSchemes`] without any scheme, [`ConfigError::Zero`] for a zero
    /// length.
    pub fn build(self) -> Result<Extractor, ConfigError> {
        if self.schemes.is_empty() {
            return Err(ConfigError::NoSchemes);
        }
        if self.max_len == 0 {
            return Err(ConfigError::Zero("max_len"));
        }
        Ok(Extractor {
            bearer: self.schemes.contains(&Scheme::Bearer),
            basic: self.schemes.contains(&Scheme::Basic),
            schemes: self.schemes,
            max_len: self.max_len,
        })
    }
}

impl Extractor {
    /// An extractor of your own: its schemes, in order, and the longest key it accepts.
    pub fn builder() -> ExtractorBuilder {
        let defaults = Self::default();
        ExtractorBuilder {
            schemes: defaults.schemes,
            max_len: defaults.max_len,
        }
    }

    /// The longest key accepted, in bytes.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The configured schemes, in order.
    pub fn schemes(&self) -> &[Scheme] {
        &self.schemes
    }

    /// Whether `Authorization: Bearer` is one of the schemes (it decides the
    /// `WWW-Authenticate` challenge).
    pub fn uses_bearer(&self) -> bool {
        self.bearer
    }

    /// Marks the headers a key was found in as sensitive, so that a `Debug` of the headers
    /// (a trace layer, a log line) shows `Sensitive`, and HTTP/2 never indexes them if the
    /// request is forwarded. One lookup per header that carried the key.
    pub(crate) fn mark_sensitive(&self, headers: &mut HeaderMap, places: Places) {
        let mark = |headers: &mut HeaderMap, name: &HeaderName| {
            if places.repeated {
                // The same key sent twice under one name (rare): mark every copy.
                if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
                    for value in entry.iter_mut() {
                        value.set_sensitive(true);
                    }
                }
            } else if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        };
        if places.authorization {
            mark(headers, &AUTHORIZATION);
        }
        let mut bits = places.headers;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(Scheme::Header(name)) = self.schemes.get(i) {
                mark(headers, name);
            }
        }
        if places.beyond {
            for scheme in self.schemes.iter().skip(32) {
                if let Scheme::Header(name) = scheme {
                    mark(headers, name);
                }
            }
        }
    }

    /// Marks every header that could carry a key as sensitive: for requests that pass
    /// without one (a client that sends its key everywhere sends it to `/swagger` too).
    pub(crate) fn mark_all_sensitive(&self, headers: &mut HeaderMap) {
        let everywhere = Places {
            headers: u32::MAX,
            beyond: true,
            authorization: self.bearer || self.basic,
            repeated: true,
        };
        if self.schemes.iter().any(|s| matches!(s, Scheme::Header(_))) || everywhere.authorization {
            self.mark_sensitive(headers, everywhere);
        }
    }

    /// Finds the key in a request.
    ///
    /// # Errors
    ///
    /// See [`ExtractError`].
    pub fn extract<'r, B>(&self, req: &'r Request<B>) -> Result<Credential<'r>, ExtractError> {
        self.extract_parts(req.headers(), req.uri())
    }

    /// Finds the key given the headers and URI of a request.
    ///
    /// # Errors
    ///
    /// See [`ExtractError`].
    pub fn extract_parts<'r>(
        &self,
        headers: &'r HeaderMap,
        uri: &'r Uri,
    ) -> Result<Credential<'r>, ExtractError> {
        let mut found: Option<Credential<'r>> = None;
        let mut authorization_read = false;
        // `place`: the header scheme's index, or `None` for `Authorization` and the query.
        let mut offer = |secret: Found<'r>,
                         scheme: SchemeKind,
                         place: Option<usize>|
         -> Result<(), ExtractError> {
            if !self.well_formed(secret.as_bytes()) {
                return Err(ExtractError::Malformed);
            }
            let credential = match &mut found {
                None => found.insert(Credential {
                    secret,
                    scheme,
                    places: Places::default(),
                }),
                Some(first) if *first.secret == *secret => first,
                Some(_) => return Err(ExtractError::Ambiguous),
            };
            let places = &mut credential.places;
            match (scheme, place) {
                (SchemeKind::Header, Some(i)) => {
                    match u32::try_from(i).ok().and_then(|i| 1u32.checked_shl(i)) {
                        Some(bit) => {
                            places.repeated |= places.headers & bit != 0;
                            places.headers |= bit;
                        }
                        None => {
                            places.repeated = true;
                            places.beyond = true;
                        }
                    }
                }
                (SchemeKind::Bearer | SchemeKind::Basic, _) => {
                    places.repeated |= places.authorization;
                    places.authorization = true;
                }
                _ => {}
            }
            Ok(())
        };
        for (i, scheme) in self.schemes.iter().enumerate() {
            match scheme {
                Scheme::Header(name) => {
                    for value in headers.get_all(name) {
                        // Any UTF-8 here; `offer` refuses all but visible ASCII.
                        let text = std::str::from_utf8(value.as_bytes())
                            .map_err(|_| ExtractError::Malformed)?;
                        offer(Found::Borrowed(text), scheme.kind(), Some(i))?;
                    }
                }
                Scheme::Bearer | Scheme::Basic => {
                    // One pass over `Authorization` serves both schemes.
                    if authorization_read {
                        continue;
                    }
                    authorization_read = true;
                    for value in headers.get_all(AUTHORIZATION) {
                        // A non-ASCII Authorization header cannot be one of ours; if it
                        // claims one of our schemes it is malformed, otherwise not ours.
                        let Ok(text) = value.to_str() else {
                            if self.claims_our_scheme(value.as_bytes()) {
                                return Err(ExtractError::Malformed);
                            }
                            continue;
                        };
                        if let Some((secret, kind)) = self.authorization(text)? {
                            offer(secret, kind, None)?;
                        }
                    }
                }
                Scheme::Query(name) => {
                    for (key, value) in query_pairs(uri.query().unwrap_or("")) {
                        if decode(key).as_deref() == Some(name.as_str()) {
                            let value = decode(value).ok_or(ExtractError::Malformed)?;
                            offer(value, SchemeKind::Query, None)?;
                        }
                    }
                }
            }
        }
        found.ok_or(ExtractError::Missing)
    }

    /// A secret we accept the shape of: not empty, at most `max_len` bytes, visible ASCII
    /// only (no spaces or controls). Written without an early exit so that it compiles to a
    /// few wide instructions; a key is short.
    fn well_formed(&self, secret: &[u8]) -> bool {
        !secret.is_empty()
            && secret.len() <= self.max_len
            && secret
                .iter()
                .fold(true, |ok, &b| ok & (b.wrapping_sub(b'!') <= b'~' - b'!'))
    }

    /// Reads one `Authorization` value. `Ok(None)` when it uses a scheme not configured.
    fn authorization<'r>(
        &self,
        value: &'r str,
    ) -> Result<Option<(Found<'r>, SchemeKind)>, ExtractError> {
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let (name, rest) = match value.find([' ', '\t']) {
            Some(at) => (&value[..at], value[at..].trim_start_matches([' ', '\t'])),
            None => (value, ""),
        };
        if self.bearer && name.eq_ignore_ascii_case("bearer") {
            if rest.is_empty() || rest.contains([' ', '\t']) {
                return Err(ExtractError::Malformed);
            }
            return Ok(Some((Found::Borrowed(rest), SchemeKind::Bearer)));
        }
        if self.basic && name.eq_ignore_ascii_case("basic") {
            // base64 of max_len + 1 bytes, plus padding: anything longer is refused
            // before decoding.
            if rest.is_empty() || rest.len() > (self.max_len + 1).div_ceil(3) * 4 {
                return Err(ExtractError::Malformed);
            }
            // The decoded `key:` is wiped when dropped; only the key itself is kept.
            let decoded = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .map_err(|_| ExtractError::Malformed)?,
            );
            let text = std::str::from_utf8(&decoded).map_err(|_| ExtractError::Malformed)?;
            return match text.split_once(':') {
                // The key is the username; the password must be empty.
                Some((user, "")) => Ok(Some((
                    Found::Decoded(Zeroizing::new(user.to_owned())),
                    SchemeKind::Basic,
                ))),
                _ => Err(ExtractError::Malformed),
            };
        }
        Ok(None)
    }

    fn claims_our_scheme(&self, value: &[u8]) -> bool {
        let claims = |name: &[u8]| {
            value.len() > name.len()
                && value[..name.len()].eq_ignore_ascii_case(name)
                && matches!(value[name.len()], b' ' | b'\t')
        };
        (self.bearer && claims(b"bearer")) || (self.basic && claims(b"basic"))
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Percent-decodes a query component (`+` is a space); `None` for invalid UTF-8.
fn decode(component: &str) -> Option<Found<'_>> {
    if !component.contains(['%', '+']) {
        return Some(Found::Borrowed(component));
    }
    // It may be the key: wiped when dropped, as the decoded copy is.
    let replaced = Zeroizing::new(component.replace('+', " "));
    percent_encoding::percent_decode_str(&replaced)
        .decode_utf8()
        .ok()
        .map(|s| Found::Decoded(Zeroizing::new(s.into_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    fn all_schemes() -> Extractor {
        Extractor::builder()
            .schemes([
                Scheme::x_api_key(),
                Scheme::header("X-Mobid-Key").unwrap(),
                Scheme::Bearer,
                Scheme::Basic,
                Scheme::query("api_key").unwrap(),
            ])
            .build()
            .unwrap()
    }

    #[test]
    fn extraction_table() {
        type Case = (
            &'static str,
            Vec<(&'static str, String)>,
            &'static str,
            Result<&'static str, ExtractError>,
        );
        let long = "k".repeat(DEFAULT_MAX_LEN + 1);
        let max = "k".repeat(DEFAULT_MAX_LEN);
        let cases: Vec<Case> = vec![
            ("nothing", vec![], "/", Err(ExtractError::Missing)),
            ("x-api-key", vec![("x-api-key", "k1".into())], "/", Ok("k1")),
            (
                "custom header",
                vec![("x-mobid-key", "qk_1".into())],
                "/",
                Ok("qk_1"),
            ),
            (
                "bearer",
                vec![("authorization", "Bearer k1".into())],
                "/",
                Ok("k1"),
            ),
            (
                "bearer lower case",
                vec![("authorization", "bearer k1".into())],
                "/",
                Ok("k1"),
            ),
            (
                "bearer upper case",
                vec![("authorization", "BEARER k1".into())],
                "/",
                Ok("k1"),
            ),
            (
                "bearer extra spaces",
                vec![("authorization", "Bearer   k1 ".into())],
                "/",
                Ok("k1"),
            ),
            (
                "bearer empty",
                vec![("authorization", "Bearer ".into())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "bearer alone",
                vec![("authorization", "Bearer".into())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "bearer two tokens",
                vec![("authorization", "Bearer a b".into())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "other auth scheme",
                vec![("authorization", "Digest abc".into())],
                "/",
                Err(ExtractError::Missing),
            ),
            (
                "basic key as user",
                vec![("authorization", basic("k1:"))],
                "/",
                Ok("k1"),
            ),
            (
                "basic lower case",
                vec![("authorization", basic("k1:").replace("Basic", "basic"))],
                "/",
                Ok("k1"),
            ),
            (
                "basic with password",
                vec![("authorization", basic("k1:pw"))],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "basic without colon",
                vec![("authorization", basic("k1"))],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "basic bad base64",
                vec![("authorization", "Basic %%%".into())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "basic too long",
                vec![("authorization", basic(&format!("{long}:")))],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "basic invalid utf8",
                vec![(
                    "authorization",
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, b':'])
                    ),
                )],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "same key twice",
                vec![
                    ("x-api-key", "k1".into()),
                    ("authorization", "Bearer k1".into()),
                ],
                "/",
                Ok("k1"),
            ),
            (
                "same key three schemes",
                vec![("x-api-key", "k1".into()), ("authorization", basic("k1:"))],
                "/",
                Ok("k1"),
            ),
            (
                "two different keys",
                vec![
                    ("x-api-key", "k1".into()),
                    ("authorization", "Bearer k2".into()),
                ],
                "/",
                Err(ExtractError::Ambiguous),
            ),
            (
                "header repeated, same",
                vec![("x-api-key", "k1".into()), ("x-api-key", "k1".into())],
                "/",
                Ok("k1"),
            ),
            (
                "header repeated, different",
                vec![("x-api-key", "k1".into()), ("x-api-key", "k2".into())],
                "/",
                Err(ExtractError::Ambiguous),
            ),
            (
                "two authorization headers",
                vec![
                    ("authorization", "Bearer k1".into()),
                    ("authorization", "Bearer k2".into()),
                ],
                "/",
                Err(ExtractError::Ambiguous),
            ),
            (
                "space inside key",
                vec![("x-api-key", "k 1".into())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "empty header",
                vec![("x-api-key", String::new())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "too long",
                vec![("x-api-key", long.clone())],
                "/",
                Err(ExtractError::Malformed),
            ),
            (
                "exactly max",
                vec![("x-api-key", max.clone())],
                "/",
                Ok("max"),
            ),
        ];
        let extractor = all_schemes();
        for (name, headers, uri, expected) in cases {
            let mut builder = Request::get(uri);
            for (h, v) in &headers {
                builder = builder.header(*h, v.as_str());
            }
            let req = builder.body(()).unwrap();
            let got = extractor.extract(&req).map(|c| c.secret().to_owned());
            let expected = expected.map(|s| {
                if s == "max" {
                    max.clone()
                } else {
                    s.to_owned()
                }
            });
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn defaults_are_x_api_key_bearer_basic_and_no_query() {
        let extractor = Extractor::default();
        let req = Request::get("/?api_key=k1").body(()).unwrap();
        assert_eq!(extractor.extract(&req).unwrap_err(), ExtractError::Missing);
        let req = Request::get("/")
            .header("x-mobid-key", "k1")
            .body(())
            .unwrap();
        assert_eq!(extractor.extract(&req).unwrap_err(), ExtractError::Missing);
        assert_eq!(
            extractor.schemes(),
            [Scheme::x_api_key(), Scheme::Bearer, Scheme::Basic]
        );
    }

    #[test]
    fn non_ascii_header_values_are_malformed() {
        let extractor = Extractor::default();
        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut().insert(
            "x-api-key",
            http::HeaderValue::from_bytes(b"k\xe91").unwrap(),
        );
        assert_eq!(
            extractor.extract(&req).unwrap_err(),
            ExtractError::Malformed
        );

        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut().insert(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer k\xe91").unwrap(),
        );
        assert_eq!(
            extractor.extract(&req).unwrap_err(),
            ExtractError::Malformed
        );

        // Not our scheme at all: ignored.
        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut().insert(
            "authorization",
            http::HeaderValue::from_bytes(b"Digest \xe9").unwrap(),
        );
        assert_eq!(extractor.extract(&req).unwrap_err(), ExtractError::Missing);
    }

    #[test]
    fn query_scheme_when_enabled() {
        let extractor = all_schemes();
        let cases = [
            ("plain", "/v1?api_key=k1", Ok("k1".to_owned())),
            ("encoded", "/v1?a=1&api%5Fkey=k%31", Ok("k1".to_owned())),
            (
                "encoded space",
                "/v1?api_key=k+1",
                Err(ExtractError::Malformed),
            ),
            (
                "repeated different",
                "/v1?api_key=k1&api_key=k2",
                Err(ExtractError::Ambiguous),
            ),
            ("bad utf8", "/v1?api_key=%ff", Err(ExtractError::Malformed)),
            ("other param", "/v1?key=k1", Err(ExtractError::Missing)),
        ];
        for (name, uri, expected) in cases {
            let req = Request::get(uri).body(()).unwrap();
            assert_eq!(
                extractor.extract(&req).map(|c| c.secret().to_owned()),
                expected,
                "{name}"
            );
        }
        let req = Request::get("/?api_key=k1")
            .header("x-mobid-key", "k2")
            .body(())
            .unwrap();
        assert_eq!(
            extractor.extract(&req).unwrap_err(),
            ExtractError::Ambiguous
        );
    }

    #[test]
    fn reports_the_first_scheme() {
        let req = Request::get("/")
            .header("authorization", "Bearer k1")
            .body(())
            .unwrap();
        let extractor = Extractor::default();
        assert_eq!(
            extractor.extract(&req).unwrap().scheme(),
            SchemeKind::Bearer
        );
        assert!(!format!("{:?}", extractor.extract(&req).unwrap()).contains("k1"));
    }

    #[test]
    fn config_errors() {
        assert_eq!(
            Extractor::builder().schemes([]).build().unwrap_err(),
            ConfigError::NoSchemes
        );
        assert!(Scheme::header("bad header").is_err());
        assert!(Scheme::query("").is_err());
        assert!(Extractor::builder().max_len(0).build().is_err());
    }

    // The fourth hunt: every byte against the branch-free shape check.

    /// What the code before the branch-free check accepted: `to_str` (visible ASCII or tab),
    /// then non-empty, at most `max_len`, every byte `is_ascii_graphic`.
    fn old_well_formed(secret: &[u8], max_len: usize) -> bool {
        !secret.is_empty() && secret.len() <= max_len && secret.iter().all(u8::is_ascii_graphic)
    }

    /// Held in the fourth hunt. Every byte 0..=255, at the start, middle and end of a key, in
    /// X-API-KEY, a custom header, Bearer, Basic and the query: only 0x21..=0x7e is accepted
    /// (`:` cannot be a Basic username), everything else is Malformed, never Missing, never a
    /// panic, and the shape check agrees with the old one on every input.
    #[test]
    fn every_byte_in_every_scheme_is_accepted_only_when_visible_ascii() {
        use base64::engine::general_purpose::STANDARD;
        let extractor = all_schemes();
        for b in 0..=255u8 {
            for single in [vec![b], vec![b; 3]] {
                assert_eq!(
                    extractor.well_formed(&single),
                    old_well_formed(&single, extractor.max_len),
                    "{b:#04x}"
                );
            }
            let graphic = (0x21..=0x7e).contains(&b);
            for at in 0..3 {
                let mut secret = b"ab".to_vec();
                secret.insert(at, b);
                let text = String::from_utf8(secret.clone()).ok();
                let expect = |ok: bool| -> Result<String, ExtractError> {
                    if ok {
                        Ok(text.clone().unwrap())
                    } else {
                        Err(ExtractError::Malformed)
                    }
                };
                let run = |req: Request<()>| extractor.extract(&req).map(|c| c.secret().to_owned());
                // Headers: only what a HeaderValue can hold (no controls but tab, no DEL).
                for name in ["x-api-key", "x-mobid-key"] {
                    if let Ok(value) = http::HeaderValue::from_bytes(&secret) {
                        let mut req = Request::get("/").body(()).unwrap();
                        req.headers_mut().insert(name, value);
                        assert_eq!(run(req), expect(graphic), "{name} {b:#04x} at {at}");
                    }
                }
                let mut bearer = b"Bearer ".to_vec();
                bearer.extend_from_slice(&secret);
                if let Ok(value) = http::HeaderValue::from_bytes(&bearer) {
                    let mut req = Request::get("/").body(()).unwrap();
                    req.headers_mut().insert("authorization", value);
                    let got = run(req);
                    // A space or tab at either end is separator or trailing blank: the
                    // key is `ab` then.
                    if matches!(b, b' ' | b'\t') && at != 1 {
                        assert_eq!(got, Ok("ab".to_owned()), "bearer {b:#04x} at {at}");
                    } else {
                        assert_eq!(got, expect(graphic), "bearer {b:#04x} at {at}");
                    }
                }
                let mut user = secret.clone();
                user.push(b':');
                let mut req = Request::get("/").body(()).unwrap();
                req.headers_mut().insert(
                    "authorization",
                    http::HeaderValue::try_from(format!("Basic {}", STANDARD.encode(&user)))
                        .unwrap(),
                );
                assert_eq!(
                    run(req),
                    expect(graphic && b != b':'),
                    "basic {b:#04x} at {at}"
                );
                let encoded: String = secret.iter().map(|c| format!("%{c:02X}")).collect();
                let uri = format!("/?api_key={encoded}");
                let req = Request::get(uri.as_str()).body(()).unwrap();
                assert_eq!(run(req), expect(graphic), "query {b:#04x} at {at}");
            }
        }
        // Multi-byte UTF-8, empty and too long: Malformed in every scheme.
        let long = "k".repeat(extractor.max_len + 1);
        for secret in ["é", "k€y", "😀", "", long.as_str()] {
            let requests = [
                Request::get("/").header("x-api-key", secret).body(()),
                Request::get("/").header("x-mobid-key", secret).body(()),
                Request::get("/")
                    .header("authorization", format!("Bearer {secret}"))
                    .body(()),
                Request::get("/")
                    .header(
                        "authorization",
                        format!("Basic {}", STANDARD.encode(format!("{secret}:"))),
                    )
                    .body(()),
            ];
            for req in requests {
                let req = req.unwrap();
                assert_eq!(
                    extractor.extract(&req).map(|c| c.secret().to_owned()),
                    Err(ExtractError::Malformed),
                    "{secret:?} in {:?}",
                    req.headers()
                );
            }
            let encoded: String = secret.bytes().map(|c| format!("%{c:02X}")).collect();
            let uri = format!("/?api_key={encoded}");
            let req = Request::get(uri.as_str()).body(()).unwrap();
            assert_eq!(
                extractor.extract(&req).map(|c| c.secret().to_owned()),
                Err(ExtractError::Malformed),
                "{secret:?} in the query"
            );
        }
        let max = "k".repeat(extractor.max_len);
        let req = Request::get("/")
            .header("x-api-key", &max)
            .body(())
            .unwrap();
        assert_eq!(extractor.extract(&req).unwrap().secret(), max);
    }

    /// A key decoded out of the request (Basic, a percent-encoded query) lives in memory
    /// wiped on drop; one read from a header is borrowed and never copied.
    #[test]
    fn decoded_keys_are_held_for_wiping_and_header_keys_are_borrowed() {
        let extractor = all_schemes();
        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut()
            .insert("authorization", basic("k1:").parse().unwrap());
        let credential = extractor.extract(&req).unwrap();
        assert!(matches!(credential.secret, Found::Decoded(_)));
        assert_eq!(credential.secret(), "k1");

        let req = Request::get("/p?api_key=k%31").body(()).unwrap();
        assert!(matches!(
            extractor.extract(&req).unwrap().secret,
            Found::Decoded(_)
        ));

        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut().insert("x-api-key", "k1".parse().unwrap());
        assert!(matches!(
            extractor.extract(&req).unwrap().secret,
            Found::Borrowed(_)
        ));
    }

    /// Held in the fifth hunt. With `Found` in place of `Cow`, ambiguity still compares the
    /// keys' text, whatever mix of borrowed (headers, a plain query) and decoded (Basic, a
    /// percent-encoded query) forms a request carries them in: one key in every form is one
    /// credential, reported under the first scheme; any form differing by one byte is
    /// ambiguous, in either order.
    #[test]
    fn decoded_and_borrowed_forms_of_a_key_compare_by_text() {
        let extractor = all_schemes();
        let request = |headers: &[(&'static str, String)], uri: &str| {
            let mut req = Request::get(uri).body(()).unwrap();
            for (name, value) in headers {
                req.headers_mut()
                    .append(*name, http::HeaderValue::from_str(value).unwrap());
            }
            req
        };
        // Every form of k1 at once.
        let req = request(
            &[
                ("x-api-key", "k1".into()),
                ("x-mobid-key", "k1".into()),
                ("authorization", basic("k1:")),
            ],
            "/?api_key=k%31&api_key=k1",
        );
        let credential = extractor.extract(&req).unwrap();
        assert_eq!(credential.secret(), "k1");
        assert_eq!(credential.scheme(), SchemeKind::Header);
        // Decoded against decoded: Basic and an encoded query.
        let req = request(&[("authorization", basic("k1:"))], "/?api_key=%6B1");
        let credential = extractor.extract(&req).unwrap();
        assert_eq!(credential.secret(), "k1");
        assert_eq!(credential.scheme(), SchemeKind::Basic);
        // One byte apart, each pair of forms, in both orders where the order can vary.
        type Case<'a> = (&'a str, Vec<(&'static str, String)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                "basic vs header",
                vec![("x-api-key", "k1".into()), ("authorization", basic("k2:"))],
                "/",
            ),
            (
                "basic vs encoded query",
                vec![("authorization", basic("k1:"))],
                "/?api_key=k%32",
            ),
            (
                "basic vs plain query",
                vec![("authorization", basic("k1:"))],
                "/?api_key=k2",
            ),
            (
                "encoded vs plain query",
                vec![],
                "/?api_key=k%31&api_key=k2",
            ),
            (
                "plain vs encoded query",
                vec![],
                "/?api_key=k2&api_key=k%31",
            ),
            (
                "header vs encoded query",
                vec![("x-api-key", "k2".into())],
                "/?api_key=k%31",
            ),
            (
                "prefix",
                vec![("x-api-key", "k1".into()), ("authorization", basic("k12:"))],
                "/",
            ),
            ("case", vec![("x-api-key", "K1".into())], "/?api_key=%6B1"),
        ];
        for (name, headers, uri) in cases {
            assert_eq!(
                extractor
                    .extract(&request(&headers, uri))
                    .map(|c| c.secret().to_owned()),
                Err(ExtractError::Ambiguous),
                "{name}"
            );
        }
    }
}
