use std::sync::Arc;

use super::store::BucketKey;
use super::Quota;
use crate::head::RequestHead;
use crate::key::KeyId;
use crate::record::Principal;

/// What a [`RateLimitLayer`](super::RateLimitLayer) keys its buckets by.
///
/// Any `Fn(&RequestHead<'_>) -> Option<K>` is one (`None` leaves the request unlimited):
///
/// ```
/// use keygate::head::RequestHead;
/// use keygate::validate::ClientIp;
///
/// let resolver = ClientIp::new();
/// let by_ip = move |head: &RequestHead<'_>| resolver.resolve(head);
/// # fn takes(_: impl keygate::ratelimit::KeyFn) {}
/// # takes(by_ip);
/// ```
///
/// [`PerKey`] keys by the authenticated key and takes the quotas from its record.
pub trait KeyFn: Send + Sync + 'static {
    /// The bucket key.
    type Key: BucketKey;

    /// The request's bucket and the quotas it carries with it (empty: the layer's default).
    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(Self::Key, &'a [Quota])>;
}

impl<F, K> KeyFn for F
where
    F: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
    K: BucketKey,
{
    type Key = K;

    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(K, &'a [Quota])> {
        self(head).map(|k| (k, &[][..]))
    }
}

/// Keys buckets by the authenticated key (the [`Principal`] an auth layer put in the
/// request), with the key record's quotas, in the key's main bucket or a named one. A key
/// whose record names a [`rate_bucket`](crate::record::KeyRecord::rate_bucket) (an OAuth2
/// access token: its client's id) uses that key's buckets instead, so that keys sharing one
/// share one budget.
#[derive(Debug, Clone, Default)]
pub struct PerKey {
    bucket: Option<Arc<str>>,
}

impl PerKey {
    /// The key's main bucket.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bucket of its own, e.g. for one expensive route.
    pub fn bucket(name: impl Into<Arc<str>>) -> Self {
        Self {
            bucket: Some(name.into()),
        }
    }
}

impl KeyFn for PerKey {
    type Key = (KeyId, Option<Arc<str>>);

    fn key<'a>(&self, head: &RequestHead<'a>) -> Option<(Self::Key, &'a [Quota])> {
        let record = head.extensions.get::<Principal>()?.record();
        let quotas: &'a [Quota] = if self.bucket.is_some() {
            &[]
        } else {
            &record.quotas
        };
        // The bucket of the key it shares one with (an OAuth2 client's tokens), else its own:
        // one `Arc` clone either way.
        let id = record.rate_bucket.as_ref().unwrap_or(&record.id).clone();
        Some(((id, self.bucket.clone()), quotas))
    }
}
