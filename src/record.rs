//! What a store knows about a key ([`KeyRecord`]) and what a handler learns about the
//! caller once the key is accepted ([`Principal`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::key::{Environment, KeyId};
use crate::quota::Quota;

/// The lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Usable.
    Active,
    /// Switched off by its owner or an operator; can be switched back on.
    Disabled,
    /// Revoked for good (for instance by a new key replacing all of an owner's keys).
    Revoked,
    /// Soft-deleted: the record stays for audit, the key reads as unknown.
    Deleted,
}

impl Status {
    /// `"active"`, `"disabled"`, `"revoked"` or `"deleted"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Revoked => "revoked",
            Self::Deleted => "deleted",
        }
    }
}

/// The account a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Stable identifier.
    pub id: String,
    /// Display name (a username, an organisation).
    pub name: String,
    /// An inactive owner's keys are all refused with `owner_inactive`.
    pub active: bool,
}

impl Owner {
    /// An active owner.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            active: true,
        }
    }
}

/// A set of scope names such as `read` or `messages:write`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scopes(Vec<String>);

impl Scopes {
    /// No scopes.
    pub const fn none() -> Self {
        Self(Vec::new())
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.iter().any(|s| s == scope)
    }

    /// The first scope of `required` that this set lacks, if any.
    pub fn first_missing<'a>(&self, required: &'a Scopes) -> Option<&'a str> {
        required
            .0
            .iter()
            .find(|s| !self.contains(s))
            .map(String::as_str)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scopes, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Parses a comma- or space-separated list, ignoring blanks and duplicates.
    pub fn parse(list: &str) -> Self {
        list.split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl<S: Into<String>> FromIterator<S> for Scopes {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut out: Vec<String> = Vec::new();
        for scope in iter {
            let scope = scope.into();
            if !out.contains(&scope) {
                out.push(scope);
            }
        }
        Self(out)
    }
}

impl<S: Into<String>, const N: usize> From<[S; N]> for Scopes {
    fn from(scopes: [S; N]) -> Self {
        scopes.into_iter().collect()
    }
}

impl<S: Into<String>> From<Vec<S>> for Scopes {
    fn from(scopes: Vec<S>) -> Self {
        scopes.into_iter().collect()
    }
}

impl From<&[&str]> for Scopes {
    fn from(scopes: &[&str]) -> Self {
        scopes.iter().copied().collect()
    }
}

/// Where a key may be used from. Empty lists mean "anywhere".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restrictions {
    /// Client networks allowed to use the key (IPv4 and IPv6 CIDR blocks).
    pub ips: Vec<IpNet>,
    /// Sites the key may be used for, matched exactly (see `validate::SiteResolver`).
    pub sites: Vec<String>,
}

impl Restrictions {
    /// Whether `ip` is inside one of the allowed networks (always true without any).
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match IPv4 networks.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        if self.ips.is_empty() {
            return true;
        }
        let ip = canonical_ip(ip);
        self.ips.iter().any(|net| net.contains(&ip))
    }

    /// Whether `site` is one of the allowed sites (always true without any).
    pub fn allows_site(&self, site: &str) -> bool {
        self.sites.is_empty() || self.sites.iter().any(|s| s == site)
    }

    /// Parses an address or CIDR block; a bare address becomes a /32 or /128.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidNetwork`] naming the input.
    pub fn parse_network(text: &str) -> Result<IpNet, ConfigError> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(net.trunc());
        }
        text.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| ConfigError::InvalidNetwork(text.to_owned()))
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address unchanged.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Everything the layers need to know about a key, as a [`KeyLookup`](crate::lookup::KeyLookup)
/// returns it. The secret is not here: stores find records by
/// [`KeyHash`](crate::key::KeyHash).
///
/// Build one with [`KeyRecord::new`] and set the public fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KeyRecord {
    /// Public identifier.
    pub id: KeyId,
    /// The owning account; `None` when the owner no longer exists.
    pub owner: Option<Owner>,
    /// Human name of the key.
    pub name: String,
    /// What the key is for, in the owner's words.
    #[serde(default)]
    pub description: String,
    /// The use case the key was made for; fixed at creation.
    #[serde(default)]
    pub use_case: String,
    /// Live or test.
    pub environment: Environment,
    /// Lifecycle state.
    pub status: Status,
    /// When the key stops working, if ever.
    pub expires_at: Option<SystemTime>,
    /// What the key may do.
    pub scopes: Scopes,
    /// Where the key may be used from.
    pub restrictions: Restrictions,
    /// Rate-limit windows of this key (empty: the layer's default), e.g. 10 a second and
    /// 1000 an hour. Every window must admit a request.
    #[serde(default)]
    pub quotas: Vec<Quota>,
    /// Free-form data for the application (plan, tenant, labels…).
    pub metadata: serde_json::Value,
    /// When the key was created, as its store knows it.
    #[serde(default)]
    pub created_at: Option<SystemTime>,
    /// When the key was last used, to the minute, as the store had it when it made this
    /// record: what a store's `get` and `list` return is current; a record on the request
    /// path (a lookup's, a cache's) may be older, and [`KeyRecord::last_use`] adds the uses
    /// reported through it since.
    #[serde(default)]
    pub last_used_at: Option<SystemTime>,
    /// The client IP address of the use at [`last_used_at`](Self::last_used_at), when the
    /// layer knew it (its `ClientIp` resolver gave one); written with it, and as current as
    /// it ([`KeyRecord::last_use_ip`] is the live one).
    #[serde(default)]
    pub last_used_ip: Option<IpAddr>,
    /// Bumped by the store on every change: the token of optimistic concurrency (an
    /// HTTP API's `ETag`).
    #[serde(default)]
    pub version: u64,
    /// The key whose rate-limit bucket this one shares (`None`: its own): an OAuth2 access
    /// token shares its client's (`KeyId::new(client id)`), so that every token of one
    /// client draws on one budget. [`PerKey`](crate::ratelimit::PerKey) keys buckets by it
    /// when it is set. Fixed at creation.
    #[serde(default)]
    pub rate_bucket: Option<KeyId>,
    /// Where this record's uses are reported (the store's hook), with its throttle.
    #[serde(skip)]
    usage: Usage,
}

/// `last_used_at` is reported at most this often per key.
pub const LAST_USED_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a key's uses go: the hook a store hands out with the records it makes, so that an
/// accepted request records the key's last use without the layers knowing the store.
///
/// The auth layer reports a use at most once per [`LAST_USED_RESOLUTION`] per record, from
/// the request path: `used` must return at once (queue the write, do it elsewhere).
/// [`MemoryStore`](crate::store::MemoryStore) and `SqlStore` attach one; a lookup of your own
/// may attach its own with [`KeyRecord::with_usage`].
pub trait UsageSink: Send + Sync + 'static {
    /// `key` was used at `at`, by a client at `ip` when the layer knew it.
    fn used(&self, key: &KeyId, at: SystemTime, ip: Option<IpAddr>);
}

/// A record's usage hook: the sink, and when a use was last reported (nanoseconds since
/// the epoch), shared by every clone of the record (a cached record is one `Arc`).
#[derive(Clone, Default)]
struct Usage(Option<Arc<UsageCell>>);

struct UsageCell {
    sink: Arc<dyn UsageSink>,
    last: std::sync::atomic::AtomicU64,
    /// The client IP of the use at `last` (set once a minute at most, never on the fast
    /// path).
    ip: std::sync::Mutex<Option<IpAddr>>,
}

impl fmt::Debug for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Usage(hook)"
        } else {
            "Usage(none)"
        })
    }
}

/// A hook is not data: two records equal in every field are equal, hooked or not.
impl PartialEq for Usage {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl KeyRecord {
    /// Whether the key can be used at all at `now`: active, not expired, its owner active.
    /// What `validate::check` demands before the route's own rules (IP, site, scopes,
    /// environment); a test keeps the two in step.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.status == Status::Active
            && self.expires_at.is_none_or(|at| now < at)
            && self.owner.as_ref().is_some_and(|o| o.active)
    }

    /// An active record with no scopes, restrictions, expiry or metadata.
    pub fn new(id: KeyId, owner: Owner, environment: Environment) -> Self {
        Self {
            id,
            owner: Some(owner),
            name: String::new(),
            description: String::new(),
            use_case: String::new(),
            environment,
            status: Status::Active,
            expires_at: None,
            scopes: Scopes::none(),
            restrictions: Restrictions::default(),
            quotas: Vec::new(),
            metadata: serde_json::Value::Null,
            created_at: None,
            last_used_at: None,
            last_used_ip: None,
            version: 0,
            rate_bucket: None,
            usage: Usage::default(),
        }
    }

    /// Reports this record's uses to `sink`, at most once per [`LAST_USED_RESOLUTION`]
    /// (counted from [`last_used_at`](Self::last_used_at)). Stores call it on the records
    /// they hand out; call it on the records of a lookup of your own.
    #[must_use]
    pub fn with_usage(mut self, sink: Arc<dyn UsageSink>) -> Self {
        let last = self.last_used_at.map_or(0, crate::clock::nanos_since_epoch);
        self.usage = Usage(Some(Arc::new(UsageCell {
            sink,
            last: std::sync::atomic::AtomicU64::new(last),
            ip: std::sync::Mutex::new(self.last_used_ip),
        })));
        self
    }

    /// When the key was last used: [`last_used_at`](Self::last_used_at) as stored, or a
    /// later use reported through the record's hook since (the hook keeps its time in the
    /// record, shared by every clone of it).
    pub fn last_use(&self) -> Option<SystemTime> {
        let reported = self
            .usage
            .0
            .as_ref()
            .map(|cell| cell.last.load(std::sync::atomic::Ordering::Acquire))
            .filter(|nanos| *nanos > 0)
            .map(|nanos| SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos));
        self.last_used_at.max(reported)
    }

    /// The client IP address of the use at [`last_use`](Self::last_use):
    /// [`last_used_ip`](Self::last_used_ip) as stored, or that of a later use reported
    /// through the record's hook since.
    pub fn last_use_ip(&self) -> Option<IpAddr> {
        match &self.usage.0 {
            Some(cell) => *cell
                .ip
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            None => self.last_used_ip,
        }
    }

    /// The same as [`with_usage`](Self::with_usage), unless the record has a hook already
    /// (an edited copy of a stored record): that one is kept, so that a use reported through
    /// any earlier copy of the record still counts.
    pub(crate) fn with_usage_kept(self, sink: Arc<dyn UsageSink>) -> Self {
        if self.usage.0.is_some() {
            self
        } else {
            self.with_usage(sink)
        }
    }

    /// Reports a use at `now_ns` (nanoseconds since the epoch) to the record's hook, unless
    /// one was reported within [`LAST_USED_RESOLUTION`] of it (before or after; a clock
    /// stepped back further reports again): one atomic read on the request path, a compare-and-swap
    /// and the sink's call once a minute. `ip` (the client's address, when it can be known)
    /// is asked only then, so that resolving it costs nothing on the other requests.
    pub(crate) fn note_use(&self, now_ns: u64, ip: impl FnOnce() -> Option<IpAddr>) {
        use std::sync::atomic::Ordering;
        let Some(cell) = &self.usage.0 else { return };
        let window = u64::try_from(LAST_USED_RESOLUTION.as_nanos()).unwrap_or(u64::MAX);
        let last = cell.last.load(Ordering::Relaxed);
        // Within a minute of the last report, either way: an instant read just before it
        // (by a request on another thread, or preempted) is the same minute, not a clock
        // stepped back, and a clock saturated at `u64::MAX` stays in its minute. 0 is
        // "never reported": what is stored is at least 1, so that a clock at the epoch
        // reports once, then once a minute.
        if last != 0 && now_ns.abs_diff(last) < window {
            return;
        }
        if cell
            .last
            .compare_exchange(last, now_ns.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let ip = ip();
            *cell
                .ip
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = ip;
            let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(now_ns);
            cell.sink.used(&self.id, now, ip);
        }
    }

    /// Sets the name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the scopes.
    #[must_use]
    pub fn with_scopes(mut self, scopes: impl Into<Scopes>) -> Self {
        self.scopes = scopes.into();
        self
    }

    /// Sets the status.
    #[must_use]
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        self
    }

    /// Sets the expiry.
    #[must_use]
    pub fn with_expiry(mut self, expires_at: SystemTime) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// Sets the restrictions.
    #[must_use]
    pub fn with_restrictions(mut self, restrictions: Restrictions) -> Self {
        self.restrictions = restrictions;
        self
    }

    /// Sets the rate-limit windows.
    #[must_use]
    pub fn with_quotas(mut self, quotas: impl IntoIterator<Item = Quota>) -> Self {
        self.quotas = quotas.into_iter().collect();
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// The authenticated caller: put into the request extensions by the auth layer.
///
/// Cheap to clone (one `Arc`). With the `axum` feature it is also an extractor:
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use keygate::Principal;
///
/// async fn me(principal: Principal) -> String {
///     format!("hello {}", principal.key_id())
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Principal {
    record: Arc<KeyRecord>,
}

impl Principal {
    /// Wraps an accepted record.
    pub fn new(record: Arc<KeyRecord>) -> Self {
        Self { record }
    }

    /// The key's public identifier.
    pub fn key_id(&self) -> &KeyId {
        &self.record.id
    }

    /// The owning account. Always present on an accepted key.
    pub fn owner(&self) -> Option<&Owner> {
        self.record.owner.as_ref()
    }

    /// The key's environment.
    pub fn environment(&self) -> Environment {
        self.record.environment
    }

    /// The key's scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.record.scopes
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &serde_json::Value {
        &self.record.metadata
    }

    /// The whole record.
    pub fn record(&self) -> &KeyRecord {
        &self.record
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.record.id)
            .field("owner", &self.record.owner.as_ref().map(|o| &o.id))
            .field("environment", &self.record.environment)
            .finish_non_exhaustive()
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Principal", 6)?;
        s.serialize_field("key_id", &self.record.id)?;
        s.serialize_field("key_name", &self.record.name)?;
        s.serialize_field("owner", &self.record.owner)?;
        s.serialize_field("environment", &self.record.environment)?;
        s.serialize_field("scopes", &self.record.scopes)?;
        s.serialize_field("metadata", &self.record.metadata)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_v4_v6_and_mapped() {
        let r = Restrictions {
            ips: vec![
                Restrictions::parse_network("10.0.0.0/8").unwrap(),
                Restrictions::parse_network("2001:db8::/32").unwrap(),
                Restrictions::parse_network("192.0.2.7").unwrap(),
            ],
            sites: vec![],
        };
        let cases = [
            ("v4 inside", "10.1.2.3", true),
            ("v4 outside", "11.0.0.1", false),
            ("v4 host", "192.0.2.7", true),
            ("v4 host neighbour", "192.0.2.8", false),
            ("v6 inside", "2001:db8::1", true),
            ("v6 outside", "2001:db9::1", false),
            ("v4-mapped v6", "::ffff:10.9.9.9", true),
        ];
        for (name, ip, expected) in cases {
            assert_eq!(r.allows_ip(ip.parse().unwrap()), expected, "{name}");
        }
        assert!(Restrictions::default().allows_ip("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn bad_networks_name_the_input() {
        for bad in ["10.0.0.0/33", "not-an-ip", "", "10.0.0"] {
            let err = Restrictions::parse_network(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn scopes_parse_and_missing() {
        let have = Scopes::parse("read, messages:write read");
        assert_eq!(have.iter().collect::<Vec<_>>(), ["read", "messages:write"]);
        assert_eq!(have.first_missing(&Scopes::from(["read"])), None);
        assert_eq!(
            have.first_missing(&Scopes::from(["read", "admin"])),
            Some("admin")
        );
    }

    // The levers hunt's attacks on `note_use` taking nanoseconds.

    /// Counts the reports and keeps the times reported.
    #[derive(Default)]
    struct Reports(std::sync::Mutex<Vec<SystemTime>>);

    impl UsageSink for Reports {
        fn used(&self, _: &KeyId, at: SystemTime, _: Option<IpAddr>) {
            self.0.lock().unwrap().push(at);
        }
    }

    fn hooked() -> (KeyRecord, Arc<Reports>) {
        let reports = Arc::new(Reports::default());
        let record = KeyRecord::new(KeyId::new("key_1"), Owner::new("o", "o"), Environment::Live)
            .with_usage(Arc::clone(&reports) as Arc<dyn UsageSink>);
        (record, reports)
    }

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    /// Held. Uses every second of a minute report once, and ask the IP once; the use a
    /// minute after the report reports again and asks again; the time reported is the
    /// instant given.
    #[test]
    fn held_the_ip_is_asked_only_when_a_use_is_reported() {
        let (record, reports) = hooked();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let ip = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(IpAddr::from([192, 0, 2, 1]))
        };
        for s in 0..60 {
            for _ in 0..50 {
                record.note_use(T0 + s * SEC, ip);
            }
        }
        assert_eq!(reports.0.lock().unwrap().len(), 1);
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        record.note_use(T0 + 60 * SEC, ip);
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 2);
        let at = |ns: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
        assert_eq!(*reports.0.lock().unwrap(), [at(T0), at(T0 + 60 * SEC)]);
        assert_eq!(record.last_use_ip(), Some(IpAddr::from([192, 0, 2, 1])));
    }

    /// Held. Real threads noting uses at one instant: one report.
    #[test]
    fn held_threads_noting_one_instant_report_once() {
        let (record, reports) = hooked();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2000 {
                        record.note_use(T0, || None);
                    }
                });
            }
        });
        assert_eq!(reports.0.lock().unwrap().len(), 1);
    }

    /// Found by the levers hunt. Two requests on two threads read the clock a millisecond
    /// apart and note their uses in the other order: the earlier instant is taken for a
    /// backward clock step and reported again (and the record's last use goes back), so a
    /// busy key reports several times a minute, each time resolving the client IP.
    #[test]
    fn an_instant_read_just_before_the_last_report_is_not_reported_again() {
        let (record, reports) = hooked();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let ip = || {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        };
        record.note_use(T0 + 1_000_000, ip);
        record.note_use(T0, ip);
        record.note_use(T0 + 500_000, ip);
        let reported = reports.0.lock().unwrap().clone();
        assert_eq!(
            reported.len(),
            1,
            "uses within one millisecond reported {reported:?}"
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            record.last_use(),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(T0 + 1_000_000))
        );
        // A real step back (more than the resolution) is still reported, once.
        record.note_use(T0 - 3600 * SEC, ip);
        record.note_use(T0 - 3600 * SEC + SEC, ip);
        assert_eq!(reports.0.lock().unwrap().len(), 2);
    }

    /// Found by the levers hunt. A clock at the end of `u64` nanoseconds (the year 2554, where
    /// the layers' clocks saturate) reports every request, and asks the IP every time: the
    /// throttle's `last + minute` saturates and `now < last + minute` is never true.
    #[test]
    fn a_saturated_clock_reports_once_a_minute_not_every_request() {
        let (record, reports) = hooked();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        for _ in 0..100 {
            record.note_use(u64::MAX, || {
                asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            });
        }
        assert_eq!(reports.0.lock().unwrap().len(), 1, "reports at u64::MAX ns");
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// Found by the levers hunt (minor). A clock at or before the epoch (0 ns, as the clocks
    /// read any time before 1970) on a key never used: the "never reported" 0 and the instant
    /// are the same, and the key's uses are never reported, however long it is used.
    #[test]
    fn a_clock_at_the_epoch_reports_a_use_once() {
        let (record, reports) = hooked();
        for _ in 0..100 {
            record.note_use(0, || None);
        }
        assert_eq!(
            *reports.0.lock().unwrap(),
            [SystemTime::UNIX_EPOCH],
            "uses at the epoch"
        );
        // The first minute after it is the same minute.
        record.note_use(59 * SEC, || None);
        assert_eq!(reports.0.lock().unwrap().len(), 1);
        record.note_use(61 * SEC, || None);
        assert_eq!(reports.0.lock().unwrap().len(), 2);
    }
}
