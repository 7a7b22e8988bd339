//! Property tests: no header value, path, method or body makes key extraction, the bypass
//! predicate, the key-format check, the auth layer or the renderers panic, and each of them
//! keeps the promises the design makes (visible-ASCII bounded secrets, segment-exact
//! bypass, checksum-guarded keys, one rejection envelope).
//!
//! Case counts stay moderate so the whole file runs in a few seconds; no case persists
//! failures to disk (proptest prints the minimal failing input instead).

// Test code: a failed `unwrap` is a failed test, which is what we want.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use keygate::bypass::{Bypass, DefaultBypass};
use keygate::extract::{ExtractError, Extractor, Scheme, SchemeKind};
use keygate::head::RequestHead;
use keygate::key::Environment;
use keygate::key::{ApiKey, FormatError, KeyFormat, KeyId};

/// The documented shape of a key: 24 random base62 characters, then a 6-character checksum.
const RANDOM_LEN: usize = 24;
const CHECKSUM_LEN: usize = 6;
/// The documented default bound on a key's length.
const DEFAULT_MAX_LEN: usize = 256;
use keygate::quota::RateLimit;
use keygate::record::{Owner, Restrictions, Status};
use keygate::reject::{JsonEnvelope, ProblemJson, Reason, Rejection, Renderer};
use keygate::store::MemoryStore;
use keygate::validate::{PeerAddr, SiteResolver};
use keygate::{AuthLayer, Principal};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::subsequence;
use proptest::test_runner::{Config, TestRunner};
use tower::{service_fn, Layer, ServiceExt};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// A byte `HeaderValue::from_bytes` accepts (visible ASCII, space, tab, obs-text), biased
/// towards the visible ASCII that keys are made of.
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ]
}

/// Arbitrary header-value bytes, sometimes around the default 256-byte bound, sometimes
/// shaped like a key.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(header_byte(), 0..40),
        1 => vec(header_byte(), 240..300),
        1 => vec(0x21u8..=0x7e, 250..262),
        2 => "(kg_live_|kg_test_|kg_)[0-9A-Za-z]{28,32}".prop_map(String::into_bytes),
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    header_bytes().prop_filter_map("not a header value", |b| HeaderValue::from_bytes(&b).ok())
}

/// `Bearer`/`Basic` in any case, another scheme, or nothing.
fn auth_scheme_word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Bearer".to_owned()),
        Just("Basic".to_owned()),
        "[bB][eE][aA][rR][eE][rR]",
        "[bB][aA][sS][iI][cC]",
        Just("Digest".to_owned()),
        Just(String::new()),
    ]
}

/// `Authorization` values: a scheme word, blanks, then arbitrary bytes or the base64 of
/// arbitrary bytes.
fn authorization_value() -> impl Strategy<Value = HeaderValue> {
    let rest = prop_oneof![
        header_bytes(),
        vec(any::<u8>(), 0..80).prop_map(|raw| {
            base64::engine::general_purpose::STANDARD
                .encode(raw)
                .into_bytes()
        }),
        ("[!-9;-~]{0,40}", prop::option::of("[!-~]{0,4}")).prop_map(|(user, pw)| {
            let plain = format!("{user}:{}", pw.unwrap_or_default());
            base64::engine::general_purpose::STANDARD
                .encode(plain)
                .into_bytes()
        }),
    ];
    (
        "[ \t]{0,2}",
        auth_scheme_word(),
        "[ \t]{0,3}",
        rest,
        "[ \t]{0,2}",
    )
        .prop_filter_map("not a header value", |(lead, word, gap, rest, trail)| {
            let mut bytes = [lead.as_bytes(), word.as_bytes(), gap.as_bytes()].concat();
            bytes.extend_from_slice(&rest);
            bytes.extend_from_slice(trail.as_bytes());
            HeaderValue::from_bytes(&bytes).ok()
        })
}

/// Query strings full of `api_key`, percent signs, pluses and ampersands.
fn query_string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("api_key=".to_owned()),
        Just("api%5Fkey=".to_owned()),
        Just("api_key".to_owned()),
        Just("&".to_owned()),
        Just("=".to_owned()),
        Just("+".to_owned()),
        Just("%".to_owned()),
        Just("%ff".to_owned()),
        Just("%2".to_owned()),
        "%[0-9a-fA-F]{2}",
        "[a-zA-Z0-9_.~-]{1,12}",
        "[!-~]{1,3}",
        "(kg_live_|kg_test_)[0-9A-Za-z]{30}",
    ];
    vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

/// `/p` with an arbitrary query, as a `Uri` (query strings `Uri` refuses are skipped).
fn query_uri() -> impl Strategy<Value = Uri> {
    query_string().prop_filter_map("not a URI", |q| Uri::try_from(format!("/p?{q}")).ok())
}

/// Path material: dots, encoded slashes and backslashes, doubled slashes, `swagger`.
fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("/".to_owned()),
        1 => Just("//".to_owned()),
        2 => Just(".".to_owned()),
        2 => Just("..".to_owned()),
        1 => Just("%2e".to_owned()),
        1 => Just("%2E".to_owned()),
        1 => Just("%2f".to_owned()),
        1 => Just("%2F".to_owned()),
        1 => Just("%5c".to_owned()),
        1 => Just("%5C".to_owned()),
        1 => Just("%25".to_owned()),
        1 => Just("%".to_owned()),
        1 => Just("\\".to_owned()),
        2 => Just("swagger".to_owned()),
        1 => Just("Swagger".to_owned()),
        1 => Just("%20".to_owned()),
        1 => "%[0-9a-fA-F]{2}",
        4 => "[a-zA-Z0-9._~-]{1,8}",
    ]
}

/// Raw path text, mostly rooted and often under `/swagger` (where a wrong answer matters).
fn raw_path() -> impl Strategy<Value = String> {
    let head = prop_oneof![
        Just("/swagger".to_owned()),
        Just("/swagger/".to_owned()),
        Just("/".to_owned()),
        Just(String::new()),
        Just("/v1".to_owned()),
    ];
    let query = prop::option::weighted(0.2, "[a-z0-9=&%./]{0,8}");
    (head, vec(path_piece(), 0..8), query).prop_map(|(head, pieces, query)| {
        let mut path = head + &pieces.concat();
        if let Some(q) = query {
            path.push('?');
            path.push_str(&q);
        }
        path
    })
}

/// Paths `http::Uri` accepts.
fn path_uri() -> impl Strategy<Value = Uri> {
    raw_path().prop_filter_map("not a URI", |p| Uri::try_from(p).ok())
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
        Just(Method::PATCH),
        Just(Method::OPTIONS),
        "[A-Z]{1,8}".prop_filter_map("not a method", |m| Method::from_bytes(m.as_bytes()).ok()),
    ]
}

fn non_options_method() -> impl Strategy<Value = Method> {
    method().prop_filter("OPTIONS", |m| m != Method::OPTIONS)
}

/// Every scheme, the opt-in query one included.
fn all_schemes() -> Vec<Scheme> {
    vec![
        Scheme::x_api_key(),
        Scheme::Bearer,
        Scheme::Basic,
        Scheme::query("api_key").unwrap(),
    ]
}

/// A non-empty subset of the schemes, in any order.
fn schemes() -> impl Strategy<Value = Vec<Scheme>> {
    subsequence(all_schemes(), 1..=4).prop_shuffle()
}

/// Percent-encodes every byte outside the unreserved set (so `+` stays a plus).
fn percent_encode_all(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

// ---------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary `X-API-KEY` and `Authorization` values (repeated, mixed) and query strings:
    /// extraction never panics, and an extracted secret is non-empty visible ASCII no
    /// longer than `max_len()`.
    #[test]
    fn extraction_yields_only_bounded_visible_ascii(
        schemes in schemes(),
        max_len in prop_oneof![Just(DEFAULT_MAX_LEN), 1usize..64],
        api_keys in vec(header_value(), 0..3),
        authorizations in vec(authorization_value(), 0..3),
        uri in query_uri(),
    ) {
        let extractor = Extractor::builder().schemes(schemes).max_len(max_len).build().unwrap();
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        for value in api_keys {
            req.headers_mut().append("x-api-key", value);
        }
        for value in authorizations {
            req.headers_mut().append(AUTHORIZATION, value);
        }
        if let Ok(credential) = extractor.extract(&req) {
            let secret = credential.secret();
            prop_assert!(!secret.is_empty());
            prop_assert!(
                secret.len() <= extractor.max_len(),
                "{} > {}",
                secret.len(),
                extractor.max_len()
            );
            prop_assert!(secret.bytes().all(|b| b.is_ascii_graphic()), "{secret:?}");
            // The scheme reported is one that is configured.
            let configured = extractor.schemes().iter().any(|s| {
                matches!(
                    (s, credential.scheme()),
                    (Scheme::Header(_), SchemeKind::Header)
                        | (Scheme::Bearer, SchemeKind::Bearer)
                        | (Scheme::Basic, SchemeKind::Basic)
                        | (Scheme::Query(_), SchemeKind::Query)
                )
            });
            prop_assert!(configured, "{:?} not configured", credential.scheme());
        }
    }

    /// The same visible-ASCII key placed in any combination of the configured schemes
    /// (Bearer in any case with any blanks, Basic with an empty password, a fully
    /// percent-encoded query parameter) comes back exactly.
    #[test]
    fn one_key_in_many_places_round_trips(
        key in "[!-~]{1,80}",
        places in subsequence(vec![0u8, 1, 2, 3], 1..=4),
        bearer in "[bB][eE][aA][rR][eE][rR]",
        gap in "[ \t]{1,3}",
        trail in "[ \t]{0,2}",
    ) {
        let extractor = Extractor::builder().schemes(all_schemes()).build().unwrap();
        let mut builder = Request::builder().uri("/p");
        for place in &places {
            builder = match place {
                0 => builder.header("x-api-key", key.as_str()),
                1 => builder.header(AUTHORIZATION, format!("{bearer}{gap}{key}{trail}")),
                2 if !key.contains(':') => builder.header(AUTHORIZATION, basic(&key)),
                2 => builder,
                _ => builder.uri(format!("/p?x=1&api_key={}", percent_encode_all(&key))),
            };
        }
        let req = builder.body(()).unwrap();
        let only_basic_with_colon = places == [2] && key.contains(':');
        match extractor.extract(&req) {
            Ok(credential) => prop_assert_eq!(credential.secret(), key.as_str()),
            Err(e) => prop_assert!(
                only_basic_with_colon && e == ExtractError::Missing,
                "{e:?} for {places:?}"
            ),
        }
    }

    /// Two different well-formed keys in one request are always ambiguous, whichever two
    /// places they are in, including the same header repeated.
    #[test]
    fn two_different_keys_are_ambiguous(
        a in "[!-9;-~]{1,60}",
        b in "[!-9;-~]{1,60}",
        place_a in 0u8..4,
        place_b in 0u8..4,
    ) {
        prop_assume!(a != b);
        let extractor = Extractor::builder().schemes(all_schemes()).build().unwrap();
        let mut req = Request::builder().uri("/p").body(()).unwrap();
        let mut query = Vec::new();
        for (key, place) in [(&a, place_a), (&b, place_b)] {
            // Values are appended, so one header may carry both keys.
            let (name, value) = match place {
                0 => ("x-api-key", key.clone()),
                1 => ("authorization", format!("Bearer {key}")),
                2 => ("authorization", basic(key)),
                _ => {
                    query.push(format!("api_key={}", percent_encode_all(key)));
                    continue;
                }
            };
            req.headers_mut().append(name, HeaderValue::from_str(&value).unwrap());
        }
        if !query.is_empty() {
            *req.uri_mut() = Uri::try_from(format!("/p?{}", query.join("&"))).unwrap();
        }
        prop_assert_eq!(
            extractor.extract(&req).map(|c| c.secret().to_owned()),
            Err(ExtractError::Ambiguous)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bypass
// ---------------------------------------------------------------------------------------

/// Percent-decodes `%XX` pairs; any other `%` stays as it is.
fn percent_decode(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(u8::try_from(hi * 16 + lo).unwrap());
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The design's rule, written independently: `/swagger` or below it, on whole segments,
/// with no `\`, no empty segment but a trailing one, no `.`/`..` segment (plain or
/// encoded), and no encoded `/`, `\` or `%`.
fn swagger_path_is_safe(path: &str) -> bool {
    if path != "/swagger" && !path.starts_with("/swagger/") {
        return false;
    }
    if path.contains(['\\', ';']) {
        return false;
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            if i + 1 != segments.len() {
                return false;
            }
            continue;
        }
        let decoded = percent_decode(segment);
        if decoded
            .iter()
            .any(|b| matches!(b, b'/' | b'\\' | b'%' | b';') || b.is_ascii_control())
        {
            return false;
        }
        if decoded.len() <= 2 && decoded.iter().all(|&b| b == b'.') {
            return false;
        }
    }
    true
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = percent_decode(segment);
        decoded == b"." || decoded == b".."
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// Non-OPTIONS requests are bypassed only below `/swagger`, never with a dot segment,
    /// an encoded slash, backslash or percent, a backslash or a doubled slash, and exactly
    /// when the design's rule says so.
    #[test]
    fn default_bypass_only_lets_clean_swagger_paths_through(
        method in non_options_method(),
        uri in path_uri(),
    ) {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        let bypassed = DefaultBypass::default().bypass(&RequestHead::of(&req));
        let path = req.uri().path();
        if bypassed {
            prop_assert!(path == "/swagger" || path.starts_with("/swagger/"), "{path}");
            prop_assert!(!has_dot_segment(path), "{path}");
            let lower = path.to_ascii_lowercase();
            for bad in ["%2f", "%5c", "%25", "\\"] {
                prop_assert!(!lower.contains(bad), "{path} contains {bad}");
            }
            prop_assert!(!path[1..].trim_end_matches('/').contains("//"), "{path}");
        }
        prop_assert_eq!(bypassed, swagger_path_is_safe(path), "{}", path);
    }

    /// OPTIONS requests outside `/swagger` are bypassed exactly when they are real CORS
    /// preflights: `Origin` and `Access-Control-Request-Method` present, not gRPC.
    #[test]
    fn options_is_bypassed_only_as_a_real_preflight(
        uri in path_uri(),
        origin in any::<bool>(),
        request_method in any::<bool>(),
        content_type in prop::option::of(content_type()),
    ) {
        let mut builder = Request::builder().method(Method::OPTIONS).uri(uri);
        if origin {
            builder = builder.header("origin", "https://a.example");
        }
        if request_method {
            builder = builder.header("access-control-request-method", "POST");
        }
        if let Some(content_type) = &content_type {
            builder = builder.header(CONTENT_TYPE, content_type.clone());
        }
        let req = builder.body(()).unwrap();
        let bypassed = DefaultBypass::default().bypass(&RequestHead::of(&req));
        let grpc = content_type.as_ref().is_some_and(|v| is_grpc_model(v.as_bytes()));
        let expected = (origin && request_method && !grpc) || swagger_path_is_safe(req.uri().path());
        prop_assert_eq!(bypassed, expected);
    }

    /// Plain segments below `/swagger` are bypassed (the predicate is not just `false`).
    #[test]
    fn plain_swagger_paths_are_bypassed(
        method in non_options_method(),
        segments in vec("[a-zA-Z0-9_~-][a-zA-Z0-9._~-]{0,8}", 0..4),
        trailing_slash in any::<bool>(),
    ) {
        let mut path = String::from("/swagger");
        for s in &segments {
            path.push('/');
            path.push_str(s);
        }
        if trailing_slash {
            path.push('/');
        }
        let req = Request::builder().method(method).uri(path.as_str()).body(()).unwrap();
        prop_assert!(DefaultBypass::default().bypass(&RequestHead::of(&req)), "{path}");
    }
}

// ---------------------------------------------------------------------------------------
// Key format
// ---------------------------------------------------------------------------------------

fn environment() -> impl Strategy<Value = Environment> {
    prop_oneof![Just(Environment::Live), Just(Environment::Test)]
}

fn prefix_len(env: Environment) -> usize {
    KeyFormat::default().prefix(env).len()
}

proptest! {
    #![proptest_config(config(512))]

    /// Any string: no panic, and acceptance implies the documented shape.
    #[test]
    fn check_accepts_only_the_documented_shape(
        candidate in prop_oneof![
            any::<String>(),
            "(kg_live_|kg_test_)\\PC{0,34}",
            "(kg_live_|kg_test_)[0-9A-Za-z]{29,31}",
        ],
    ) {
        let format = KeyFormat::default();
        if let Ok(env) = format.check(&candidate) {
            let env = env.unwrap();
            let rest = candidate.strip_prefix(format.prefix(env)).unwrap();
            prop_assert_eq!(rest.len(), RANDOM_LEN + CHECKSUM_LEN);
            prop_assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }

    /// A string of exactly the right shape with a random body is refused by the checksum
    /// (a false accept has probability about 2^-35 per case).
    #[test]
    fn random_keys_of_the_right_shape_are_refused(
        env in environment(),
        body in "[0-9A-Za-z]{30}",
    ) {
        let format = KeyFormat::default();
        let candidate = format!("{}{body}", format.prefix(env));
        prop_assert_eq!(format.check(&candidate), Err(FormatError::Checksum));
    }

    /// A generated key passes; the same key with any one character after the prefix
    /// changed to another base62 character never does; a non-base62 character is an
    /// alphabet error; a shorter or longer key is a shape error.
    #[test]
    fn one_changed_character_is_always_caught(
        env in environment(),
        index in 0..RANDOM_LEN + CHECKSUM_LEN,
        replacement in 0usize..61,
        junk in "[^0-9A-Za-z]",
        cut in 1usize..=RANDOM_LEN + CHECKSUM_LEN,
    ) {
        let format = KeyFormat::default();
        let key = format.generate(env).unwrap();
        let secret = key.expose_secret();
        prop_assert_eq!(format.check(secret), Ok(Some(env)));

        let at = prefix_len(env) + index;
        let original = secret.as_bytes()[at];
        let position = BASE62.iter().position(|&c| c == original).unwrap();
        // 61 other characters: skip the original one.
        let new = BASE62[(position + 1 + replacement) % 62];
        prop_assert_ne!(new, original);
        let mut typo = secret.as_bytes().to_vec();
        typo[at] = new;
        let typo = String::from_utf8(typo).unwrap();
        prop_assert_eq!(format.check(&typo), Err(FormatError::Checksum), "index {}", index);

        let mut alien = secret.to_owned();
        alien.replace_range(at..=at, &junk);
        let expected = if junk.len() == 1 { FormatError::Alphabet } else { FormatError::Shape };
        prop_assert_eq!(format.check(&alien), Err(expected));

        let shorter = &secret[..secret.len() - cut];
        prop_assert_eq!(format.check(shorter), Err(FormatError::Shape));
        let longer = format!("{secret}{}", &secret[secret.len() - cut..]);
        prop_assert_eq!(format.check(&longer), Err(FormatError::Shape));
    }

    /// Custom prefixes: `KeyFormat::new` never panics, and when neither prefix starts the
    /// other, keys of both environments round-trip.
    #[test]
    fn custom_prefixes_round_trip(
        live in prop_oneof![3 => "[!-~]{1,8}", 1 => "\\PC{0,8}"],
        test in prop_oneof![3 => "[!-~]{1,8}", 1 => "\\PC{0,8}"],
    ) {
        let Ok(format) = KeyFormat::new(&live, &test) else {
            return Ok(());
        };
        prop_assume!(!test.starts_with(&live) && !live.starts_with(&test));
        for env in [Environment::Live, Environment::Test] {
            let key = format.generate(env).unwrap();
            prop_assert!(key.expose_secret().starts_with(format.prefix(env)));
            prop_assert_eq!(format.check(key.expose_secret()), Ok(Some(env)));
        }
    }
}

/// A test prefix that starts with the live prefix (`sk_` / `sk_test_`): both environments'
/// keys must still check, the length telling the prefixes apart.
#[test]
fn overlapping_prefixes_round_trip() {
    let format = KeyFormat::new("sk_", "sk_test_").unwrap();
    let key = format.generate(Environment::Test).unwrap();
    assert_eq!(
        format.check(key.expose_secret()),
        Ok(Some(Environment::Test))
    );
}

// ---------------------------------------------------------------------------------------
// The whole layer
// ---------------------------------------------------------------------------------------

/// Keys in a store, one per outcome the layer can reach.
struct Fixture {
    store: MemoryStore,
    /// Stored keys and their ids.
    keys: Vec<(ApiKey, KeyId)>,
    /// Well-formed, never stored.
    unknown: ApiKey,
}

impl Fixture {
    fn new() -> Self {
        let store = MemoryStore::new();
        let owner = Owner::new("o1", "ada");
        let mut inactive = owner.clone();
        inactive.active = false;
        let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        type Edit = Box<dyn Fn(keygate::record::KeyRecord) -> keygate::record::KeyRecord>;
        let specs: Vec<(Environment, Owner, Edit)> = vec![
            (
                Environment::Live,
                owner.clone(),
                Box::new(|r| r.with_scopes(["read", "write"])),
            ),
            (
                Environment::Test,
                owner.clone(),
                Box::new(|r| r.with_scopes(["read"])),
            ),
            (
                Environment::Live,
                owner.clone(),
                Box::new(|r| r.with_status(Status::Disabled)),
            ),
            (
                Environment::Live,
                owner.clone(),
                Box::new(|r| r.with_status(Status::Deleted)),
            ),
            (
                Environment::Live,
                owner.clone(),
                Box::new(move |r| r.with_expiry(past)),
            ),
            (Environment::Live, inactive, Box::new(|r| r)),
            (
                Environment::Live,
                owner.clone(),
                Box::new(|r| {
                    r.with_restrictions(Restrictions {
                        ips: vec!["10.0.0.0/8".parse().unwrap()],
                        sites: vec![],
                    })
                }),
            ),
            (
                Environment::Live,
                owner,
                Box::new(|r| {
                    r.with_restrictions(Restrictions {
                        ips: vec![],
                        sites: vec!["123".into()],
                    })
                }),
            ),
        ];
        let mut keys = Vec::new();
        for (env, owner, edit) in specs {
            let mut id = None;
            let key = store
                .issue(owner, env, |r| {
                    let r = edit(r);
                    id = Some(r.id.clone());
                    r
                })
                .unwrap();
            keys.push((key, id.unwrap()));
        }
        let unknown = KeyFormat::default().generate(Environment::Live).unwrap();
        Self {
            store,
            keys,
            unknown,
        }
    }

    /// Key number `i`, where one past the stored keys is the unknown one.
    fn secret(&self, i: usize) -> &str {
        match self.keys.get(i % (self.keys.len() + 1)) {
            Some((key, _)) => key.expose_secret(),
            None => self.unknown.expose_secret(),
        }
    }
}

/// A header value: raw bytes, or a fixture key placed in a scheme.
#[derive(Debug, Clone)]
enum Value {
    Raw(HeaderValue),
    Key(usize),
    Bearer(usize, String),
    Basic(usize),
}

#[derive(Debug, Clone)]
struct RequestSpec {
    method: Method,
    uri: Uri,
    /// Most requests carry one fixture key in one scheme, so every outcome is reached.
    primary: Option<(usize, Place)>,
    headers: Vec<(HeaderName, Value)>,
    body: Vec<u8>,
    peer: Option<SocketAddr>,
    variant: u8,
}

/// Where the primary key goes.
#[derive(Debug, Clone, Copy)]
enum Place {
    Header,
    Bearer,
    Basic,
    Query,
}

fn key_index() -> impl Strategy<Value = usize> {
    0usize..16
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        3 => Just(Place::Header),
        2 => Just(Place::Bearer),
        1 => Just(Place::Basic),
        1 => Just(Place::Query),
    ]
}

fn header_entry() -> impl Strategy<Value = (HeaderName, Value)> {
    let key_value = prop_oneof![
        2 => header_value().prop_map(Value::Raw),
        1 => key_index().prop_map(Value::Key),
    ];
    let auth_value = prop_oneof![
        3 => authorization_value().prop_map(Value::Raw),
        1 => (key_index(), "[bB][eE][aA][rR][eE][rR]").prop_map(|(i, w)| Value::Bearer(i, w)),
        1 => key_index().prop_map(Value::Basic),
    ];
    let other_name = prop_oneof![
        Just(HeaderName::from_static("origin")),
        Just(HeaderName::from_static("access-control-request-method")),
        Just(HeaderName::from_static("x-forwarded-for")),
        Just(HeaderName::from_static("host")),
        Just(HeaderName::from_static("forwarded")),
        "x-[a-z0-9-]{1,10}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ];
    prop_oneof![
        2 => key_value.prop_map(|v| (HeaderName::from_static("x-api-key"), v)),
        2 => auth_value.prop_map(|v| (AUTHORIZATION, v)),
        2 => content_type().prop_map(|v| (CONTENT_TYPE, Value::Raw(v))),
        2 => (other_name, header_value()).prop_map(|(n, v)| (n, Value::Raw(v))),
    ]
}

fn content_type() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        Just(HeaderValue::from_static("application/grpc")),
        Just(HeaderValue::from_static("application/grpc+proto")),
        Just(HeaderValue::from_static("APPLICATION/GRPC")),
        Just(HeaderValue::from_static("application/grpc-web-text")),
        Just(HeaderValue::from_static("application/json")),
        Just(HeaderValue::from_static("application/grpcx")),
        Just(HeaderValue::from_static("application/grpc-webx")),
        header_value(),
    ]
}

/// The design's rule for gRPC requests, written independently of the crate's.
fn is_grpc_model(value: &[u8]) -> bool {
    let lower = value.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix(b"application/grpc") else {
        return false;
    };
    let rest = rest
        .strip_prefix(b"-web-text")
        .or_else(|| rest.strip_prefix(b"-web"))
        .unwrap_or(rest);
    matches!(rest.first(), None | Some(b'+' | b';' | b' ' | b'\t'))
}

/// The design's rule for a real CORS preflight.
fn is_preflight_model(req: &Request<impl Sized>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key("origin")
        && req.headers().contains_key("access-control-request-method")
        && !req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| is_grpc_model(v.as_bytes()))
}

fn request_spec() -> impl Strategy<Value = RequestSpec> {
    let uri = prop_oneof![
        3 => path_uri(),
        1 => "/api/(123|999|%31%32%33)/[a-z]{1,5}".prop_map(|p| Uri::try_from(p).unwrap()),
        1 => query_uri(),
    ];
    let peer = prop::option::of(prop_oneof![
        Just(SocketAddr::from(([10, 1, 2, 3], 4000))),
        Just(SocketAddr::from(([192, 0, 2, 1], 4000))),
    ]);
    (
        method(),
        uri,
        prop::option::weighted(0.7, (key_index(), place())),
        vec(header_entry(), 0..4),
        vec(any::<u8>(), 0..64),
        peer,
        0u8..3,
    )
        .prop_map(
            |(method, uri, primary, headers, body, peer, variant)| RequestSpec {
                method,
                uri,
                primary,
                headers,
                body,
                peer,
                variant,
            },
        )
}

/// `uri` with `api_key=<key>` added to its query (made origin-form).
fn with_query_key(uri: &Uri, key: &str) -> Uri {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    let param = format!("api_key={}", percent_encode_all(key));
    let text = match uri.query() {
        Some(query) => format!("{path}?{query}&{param}"),
        None => format!("{path}?{param}"),
    };
    Uri::try_from(text).unwrap()
}

fn build_request(spec: &RequestSpec, fixture: &Fixture) -> Request<Full<Bytes>> {
    let mut headers = spec.headers.clone();
    let mut uri = spec.uri.clone();
    match spec.primary {
        Some((i, Place::Header)) => {
            headers.push((HeaderName::from_static("x-api-key"), Value::Key(i)))
        }
        Some((i, Place::Bearer)) => {
            headers.push((AUTHORIZATION, Value::Bearer(i, "Bearer".into())))
        }
        Some((i, Place::Basic)) => headers.push((AUTHORIZATION, Value::Basic(i))),
        Some((i, Place::Query)) => uri = with_query_key(&uri, fixture.secret(i)),
        None => {}
    }
    let mut req = Request::builder()
        .method(spec.method.clone())
        .uri(uri)
        .body(Full::new(Bytes::from(spec.body.clone())))
        .unwrap();
    for (name, value) in &headers {
        let value = match value {
            Value::Raw(v) => v.clone(),
            Value::Key(i) => HeaderValue::from_str(fixture.secret(*i)).unwrap(),
            Value::Bearer(i, word) => {
                HeaderValue::from_str(&format!("{word} {}", fixture.secret(*i))).unwrap()
            }
            Value::Basic(i) => HeaderValue::from_str(&basic(fixture.secret(*i))).unwrap(),
        };
        req.headers_mut().append(name.clone(), value);
    }
    if let Some(peer) = spec.peer {
        req.extensions_mut().insert(PeerAddr(peer));
    }
    req
}

/// The inner service: 200, marked so that the test tells it from a rejection, naming the
/// principal it was given.
async fn inner(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"inner")));
    res.headers_mut()
        .insert("x-inner", HeaderValue::from_static("1"));
    if let Some(principal) = req.extensions().get::<Principal>() {
        res.headers_mut().insert(
            "x-key-id",
            HeaderValue::from_str(principal.key_id().as_str()).unwrap(),
        );
    }
    Ok(res)
}

fn check_response(
    fixture: &Fixture,
    spec: &RequestSpec,
    bypassed: bool,
    grpc: bool,
    res: Response<Bytes>,
    rejection: Option<Rejection>,
) -> Result<(), TestCaseError> {
    let status = res.status().as_u16();
    prop_assert!(
        [200, 400, 401, 403, 429, 503].contains(&status),
        "status {status}"
    );
    if res.headers().contains_key("x-inner") {
        prop_assert_eq!(status, 200);
        prop_assert!(rejection.is_none());
        match res.headers().get("x-key-id") {
            // Accepted: the principal is one of the stored keys, sent in the request.
            Some(id) => {
                let id = id.to_str().unwrap();
                let index = fixture.keys.iter().position(|(_, k)| k.as_str() == id);
                prop_assert!(index.is_some(), "unknown principal {id}");
                // Only the full, test, IP- and site-restricted keys can be accepted.
                prop_assert!(
                    [0, 1, 6, 7].contains(&index.unwrap()),
                    "key {index:?} accepted"
                );
            }
            // No principal: only a bypassed request reaches the inner service.
            None => prop_assert!(
                bypassed,
                "{spec:?} reached the inner service unauthenticated"
            ),
        }
        return Ok(());
    }
    prop_assert!(!bypassed, "a bypassed request was rejected");
    let rejection = rejection.expect("a rejection response carries its Rejection");
    prop_assert_eq!(
        res.headers().get(CACHE_CONTROL).map(HeaderValue::as_bytes),
        Some(&b"no-store"[..])
    );
    if grpc {
        prop_assert_eq!(status, 200);
        let grpc_status = res.headers().get("grpc-status").expect("grpc-status");
        prop_assert_eq!(
            grpc_status.to_str().unwrap(),
            rejection.grpc_code().as_u8().to_string()
        );
        prop_assert!([3u8, 7, 8, 14, 16].contains(&rejection.grpc_code().as_u8()));
        prop_assert!(res.headers().contains_key("grpc-message"));
        return Ok(());
    }
    prop_assert_ne!(status, 200);
    prop_assert_eq!(status, rejection.status().as_u16());
    prop_assert_eq!(
        res.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes),
        Some(&b"application/json"[..])
    );
    if status == 401 {
        prop_assert!(res.headers().contains_key(WWW_AUTHENTICATE));
    }
    let body: serde_json::Value = serde_json::from_slice(res.body())
        .map_err(|e| TestCaseError::fail(format!("body is not JSON: {e}")))?;
    prop_assert_eq!(body["code"].as_str(), Some(rejection.code()));
    prop_assert!(body["message"].is_string());
    prop_assert!(body.get("data").is_some(), "no data in {body}");
    prop_assert_eq!(body.as_object().map(|o| o.len()), Some(3), "{}", body);
    Ok(())
}

/// Arbitrary method, path, query, headers (keys of every kind among them), peer and body
/// through the full layer: never a panic, only statuses from the table, the inner service
/// reached only with a principal or a bypass, and every rejection in the envelope (or in
/// gRPC form for gRPC requests), with `Cache-Control: no-store`.
#[test]
fn the_layer_answers_every_request_from_the_table() {
    let fixture = Fixture::new();
    let base = AuthLayer::builder(fixture.store.clone())
        .schemes(all_schemes())
        .site(SiteResolver::PathSegment(1))
        .build()
        .unwrap();
    let layers = [
        base.clone(),
        base.require_scopes(["write"]),
        base.require_environment(Environment::Live),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(config(512));
    let outcomes = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let result = runner.run(&request_spec(), |spec| {
        let req = build_request(&spec, &fixture);
        let bypassed = DefaultBypass::default().bypass(&RequestHead::of(&req));
        let preflight = bypassed && is_preflight_model(&req);
        let grpc = req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| is_grpc_model(v.as_bytes()));
        let service = layers[usize::from(spec.variant)].layer(service_fn(inner));
        let (res, rejection) = rt.block_on(async {
            let res = service.oneshot(req).await.unwrap();
            let rejection = res.extensions().get::<Rejection>().cloned();
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            (Response::from_parts(parts, bytes), rejection)
        });
        let outcome = rejection.as_ref().map_or("passed", |r| r.code()).to_owned();
        let mut seen = outcomes.borrow_mut();
        *seen.entry(outcome).or_default() += 1;
        if grpc && rejection.is_some() {
            *seen.entry("grpc rejection".to_owned()).or_default() += 1;
        }
        if bypassed {
            *seen.entry("bypassed".to_owned()).or_default() += 1;
        }
        drop(seen);
        if preflight {
            *outcomes
                .borrow_mut()
                .entry("preflight".to_owned())
                .or_default() += 1;
            // Answered by keygate itself: 204, nothing from the service, no rejection.
            prop_assert_eq!(res.status().as_u16(), 204);
            prop_assert!(!res.headers().contains_key("x-inner"));
            prop_assert!(rejection.is_none());
            prop_assert!(res.body().is_empty());
            return Ok(());
        }
        check_response(&fixture, &spec, bypassed, grpc, res, rejection)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let outcomes = outcomes.into_inner();
    // The generator reaches the interesting outcomes, not just 401s (each of these is
    // expected well over ten times in 512 cases).
    for outcome in [
        "passed",
        "bypassed",
        "grpc rejection",
        "missing_api_key",
        "invalid_api_key",
        "ambiguous_credentials",
        "api_key_disabled",
        "api_key_expired",
        "owner_inactive",
        "ip_not_allowed",
    ] {
        assert!(
            outcomes.contains_key(outcome),
            "{outcome} never seen: {outcomes:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

fn rate_limit_info() -> impl Strategy<Value = RateLimit> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(limit, remaining, reset, retry_after)| RateLimit {
            limit,
            remaining,
            reset,
            retry_after,
        },
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// The JSON envelope and problem+json, for every reason, opaque or not, with or without
    /// arbitrary 429 numbers and key ids: valid JSON carrying the rejection's own status,
    /// code and message, the numbers exactly, and never the key id.
    #[test]
    fn renderers_always_produce_valid_json(
        reason in proptest::sample::select(Reason::ALL.to_vec()),
        info in prop::option::of(rate_limit_info()),
        opaque in any::<bool>(),
        key_id in prop::option::of("key_[0-9A-Za-z]{16}"),
        type_base in prop::option::of(any::<String>()),
    ) {
        let mut rejection = Rejection::new(reason).opaque(opaque);
        if let Some(info) = info {
            rejection = rejection.with_rate_limit(info);
        }
        if let Some(id) = &key_id {
            rejection = rejection.with_key_id(KeyId::new(id.as_str()));
        }

        let res = JsonEnvelope.render(&rejection);
        prop_assert_eq!(res.status(), rejection.status());
        prop_assert_eq!(&res.headers()[CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(res.body())
            .map_err(|e| TestCaseError::fail(format!("envelope is not JSON: {e}")))?;
        prop_assert_eq!(body["code"].as_str(), Some(rejection.code()));
        prop_assert_eq!(body["message"].as_str(), Some(rejection.message()));
        match info {
            Some(i) => prop_assert_eq!(
                &body["data"],
                &serde_json::json!({
                    "limit": i.limit,
                    "remaining": i.remaining,
                    "reset": i.reset,
                    "retry_after": i.retry_after,
                })
            ),
            None => prop_assert!(body["data"].is_null()),
        }
        if let Some(id) = &key_id {
            prop_assert!(!String::from_utf8_lossy(res.body()).contains(id.as_str()));
        }

        let problem = match &type_base {
            Some(base) => ProblemJson::new().type_base(base.clone()),
            None => ProblemJson::new(),
        };
        let res = problem.render(&rejection);
        prop_assert_eq!(res.status(), rejection.status());
        prop_assert_eq!(&res.headers()[CONTENT_TYPE], "application/problem+json");
        let body: serde_json::Value = serde_json::from_slice(res.body())
            .map_err(|e| TestCaseError::fail(format!("problem is not JSON: {e}")))?;
        prop_assert_eq!(body["status"].as_u64(), Some(u64::from(rejection.status().as_u16())));
        prop_assert_eq!(body["code"].as_str(), Some(rejection.code()));
        prop_assert_eq!(body["detail"].as_str(), Some(rejection.message()));
        let expected_type = match &type_base {
            Some(base) => format!("{base}{}", rejection.code()),
            None => "about:blank".to_owned(),
        };
        prop_assert_eq!(body["type"].as_str(), Some(expected_type.as_str()));
        if let Some(i) = info {
            prop_assert_eq!(body["limit"].as_u64(), Some(i.limit));
            prop_assert_eq!(body["retry_after"].as_u64(), Some(i.retry_after));
        }
    }
}
