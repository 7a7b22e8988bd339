use std::net::{IpAddr, SocketAddr};

use http::header::FORWARDED;
use http::HeaderName;
use ipnet::IpNet;

use crate::error::ConfigError;
use crate::head::RequestHead;
use crate::record::{canonical_ip, Restrictions};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The connection's peer address, for servers whose own connection info keygate does not
/// read: put it into the request extensions (hyper: once per connection). axum's
/// `ConnectInfo<SocketAddr>` (feature `axum`) and tonic's `TcpConnectInfo` (feature `tonic`)
/// are read without it. tonic over TLS puts a `TlsConnectInfo<TcpConnectInfo>` in the
/// request instead, which keygate does not read (it would tie the `tonic` feature to a TLS
/// stack): copy its `get_ref().remote_addr()` into a `PeerAddr` in a `map_request` layer,
/// as `examples/grpc.rs` does for TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Which header trusted proxies write the client chain into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Finds the client's IP address.
///
/// The answer is the connection's peer address ([`PeerAddr`], axum's
/// `ConnectInfo<SocketAddr>` with the `axum` feature, tonic's `TcpConnectInfo` with the
/// `tonic` feature), unless that peer is a trusted proxy: then the
/// forwarding header is read from right to left, skipping trusted proxies, and the first
/// untrusted hop is the client. A header from an untrusted peer is ignored, so a client
/// cannot claim any address it likes; a hop that does not parse ends the walk with no
/// answer, and keys restricted by IP are then refused.
///
/// ```
/// use keygate::validate::{ClientIp, PeerAddr};
/// use keygate::head::RequestHead;
///
/// let resolver = ClientIp::builder().trusted_proxies(["10.0.0.0/8"]).build().unwrap();
/// let mut req = http::Request::get("/")
///     .header("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.0.0.3")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert(PeerAddr("10.0.0.2:4000".parse().unwrap()));
/// // 10.0.0.3 is trusted, 203.0.113.9 is not: it is the client. 198.51.100.7 may be forged.
/// assert_eq!(resolver.resolve(&RequestHead::of(&req)), Some("203.0.113.9".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
}

/// Settings for a [`ClientIp`], from [`ClientIp::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ClientIpBuilder {
    trusted: Vec<String>,
    header: ForwardedHeader,
}

impl ClientIpBuilder {
    /// Trusts proxies in these networks (addresses or CIDR blocks), added to earlier ones.
    pub fn trusted_proxies<I, S>(mut self, networks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.trusted
            .extend(networks.into_iter().map(|n| n.as_ref().to_owned()));
        self
    }

    /// Reads this header from trusted proxies (default `X-Forwarded-For`).
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Checks the networks and builds the resolver.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidNetwork`] naming the first network that does not parse.
    pub fn build(self) -> Result<ClientIp, ConfigError> {
        let trusted = self
            .trusted
            .iter()
            .map(|net| Restrictions::parse_network(net))
            .collect::<Result<_, _>>()?;
        Ok(ClientIp {
            trusted,
            header: self.header,
        })
    }
}

impl ClientIp {
    /// The peer address, no proxies trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resolver that trusts proxies of your own.
    pub fn builder() -> ClientIpBuilder {
        ClientIpBuilder::default()
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's IP address, if it can be known.
    pub fn resolve(&self, head: &RequestHead<'_>) -> Option<IpAddr> {
        match self.walk(head) {
            Walk::Client(ip) => Some(ip),
            Walk::Unreadable(_) | Walk::NoPeer => None,
        }
    }

    /// What can be known of the client: its address, or only the nearest trusted hop
    /// (a forwarding header that does not parse), or nothing (no peer address).
    pub(crate) fn walk(&self, head: &RequestHead<'_>) -> Walk {
        let Some(peer) = peer_addr(head) else {
            return Walk::NoPeer;
        };
        let peer = canonical_ip(peer.ip());
        if !self.is_trusted(peer) {
            return Walk::Client(peer);
        }
        let mut nearest = peer;
        // One iterator type for both headers: no allocation per request.
        let (name, element): (&HeaderName, fn(&str) -> Option<&str>) = match self.header {
            ForwardedHeader::XForwardedFor => (&X_FORWARDED_FOR, xff_element),
            ForwardedHeader::Forwarded => (&FORWARDED, forwarded_for),
        };
        for hop in hops_from_right(head, name, element) {
            let Some(ip) = hop.and_then(parse_hop) else {
                return Walk::Unreadable(nearest);
            };
            if !self.is_trusted(ip) {
                return Walk::Client(ip);
            }
            nearest = ip;
        }
        // Every hop trusted: the leftmost is the client; no header: the peer is.
        Walk::Client(nearest)
    }
}

/// See [`ClientIp::walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walk {
    /// The client's address.
    Client(IpAddr),
    /// A trusted proxy at this address forwarded a hop that does not parse.
    Unreadable(IpAddr),
    /// The request carries no peer address at all.
    NoPeer,
}

/// The comma-separated elements of every instance of `name`, rightmost first, each mapped
/// by `element` (`None` = unreadable). Each element is read on its own, so bytes a client
/// put on the left of a line (even bytes that are not text) never spoil the hops that
/// trusted proxies appended on its right.
fn hops_from_right<'a>(
    head: &RequestHead<'a>,
    name: &HeaderName,
    element: fn(&'a str) -> Option<&'a str>,
) -> impl Iterator<Item = Option<&'a str>> + 'a {
    head.headers
        .get_all(name)
        .iter()
        .rev()
        .flat_map(move |value| {
            value.as_bytes().rsplit(|b| *b == b',').map(move |part| {
                std::str::from_utf8(part)
                    .ok()
                    .map(|text| text.trim_matches([' ', '\t']))
                    .and_then(element)
            })
        })
}

/// An `X-Forwarded-For` element is the address itself.
fn xff_element(element: &str) -> Option<&str> {
    Some(element)
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(canonical_ip(addr.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .map(canonical_ip)
}

fn peer_addr(head: &RequestHead<'_>) -> Option<SocketAddr> {
    if let Some(PeerAddr(addr)) = head.extensions.get::<PeerAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = head
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0);
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = head
        .extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
    {
        return Some(addr);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        resolver: &ClientIp,
        peer: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let mut builder = http::Request::get("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut req = builder.body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        }
        resolver
            .resolve(&RequestHead::of(&req))
            .map(|ip| ip.to_string())
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn client_ip_table() {
        let none = ClientIp::new();
        let proxies = ClientIp::builder()
            .trusted_proxies(["10.0.0.0/8", "fd00::/8"])
            .build()
            .unwrap();
        let fwd = ClientIp::builder()
            .trusted_proxies(["10.0.0.0/8", "fd00::/8"])
            .header(ForwardedHeader::Forwarded)
            .build()
            .unwrap();
        let xff = "x-forwarded-for";
        let cases: Vec<(
            &str,
            &ClientIp,
            Option<&str>,
            Vec<(&str, &str)>,
            Option<&str>,
        )> = vec![
            ("no peer", &none, None, vec![], None),
            (
                "peer only",
                &none,
                Some("203.0.113.1:5000"),
                vec![],
                Some("203.0.113.1"),
            ),
            (
                "xff ignored without trust",
                &none,
                Some("203.0.113.1:5000"),
                vec![(xff, "1.1.1.1")],
                Some("203.0.113.1"),
            ),
            (
                "xff from untrusted peer ignored",
                &proxies,
                Some("203.0.113.1:5000"),
                vec![(xff, "1.1.1.1")],
                Some("203.0.113.1"),
            ),
            (
                "trusted peer, one hop",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "198.51.100.2")],
                Some("198.51.100.2"),
            ),
            (
                "rightmost untrusted wins",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "6.6.6.6, 198.51.100.2, 10.0.0.9")],
                Some("198.51.100.2"),
            ),
            (
                "split over two headers",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "6.6.6.6"), (xff, "198.51.100.2, 10.0.0.9")],
                Some("198.51.100.2"),
            ),
            (
                "all trusted: leftmost",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "10.0.0.7, 10.0.0.9")],
                Some("10.0.0.7"),
            ),
            (
                "trusted, no header",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![],
                Some("10.0.0.1"),
            ),
            (
                "garbage hop fails closed",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "1.1.1.1, nonsense")],
                None,
            ),
            (
                "hop with port",
                &proxies,
                Some("10.0.0.1:5000"),
                vec![(xff, "198.51.100.2:443")],
                Some("198.51.100.2"),
            ),
            (
                "v6 hop",
                &proxies,
                Some("[fd00::1]:5000"),
                vec![(xff, "2001:db8::7")],
                Some("2001:db8::7"),
            ),
            (
                "mapped v4 peer trusted",
                &proxies,
                Some("[::ffff:10.0.0.1]:5000"),
                vec![(xff, "198.51.100.2")],
                Some("198.51.100.2"),
            ),
            (
                "forwarded header",
                &fwd,
                Some("10.0.0.1:5000"),
                vec![(
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.4",
                )],
                Some("2001:db8:cafe::17"),
            ),
            (
                "forwarded obfuscated",
                &fwd,
                Some("10.0.0.1:5000"),
                vec![("forwarded", "for=_hidden")],
                None,
            ),
            (
                "forwarded ignores xff",
                &fwd,
                Some("10.0.0.1:5000"),
                vec![(xff, "1.1.1.1")],
                Some("10.0.0.1"),
            ),
        ];
        for (name, resolver, peer, headers, expected) in cases {
            assert_eq!(
                resolve(resolver, peer, &headers).as_deref(),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn bad_proxy_networks() {
        let err = ClientIp::builder()
            .trusted_proxies(["10.0.0.0/8", "nope"])
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::InvalidNetwork("nope".into()));
    }
}
