//! The audit trail: who changed which key or owner, how, when and from where.
//!
//! Every lifecycle write of a store ([`KeyStore`](super::KeyStore) and
//! [`OwnerStore`](super::OwnerStore)) records its events in the same transaction as the
//! write itself: a write that commits has its events, one that does not has none. The events
//! name the [`Actor`] of the store handle that made the write
//! ([`KeyStore::acting`](super::KeyStore::acting)); a handle never given one records
//! [`Actor::system`]. Read them back with [`KeyStore::audit`](super::KeyStore::audit),
//! newest first.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use keygate::key::Environment;
//! use keygate::store::{Actor, AuditAction, AuditQuery, KeyStore, MemoryStore, NewKey, OwnerStore};
//!
//! let store = MemoryStore::new().acting(Actor::new("ops:ada").with_ip("192.0.2.7".parse().ok()));
//! store.add_owner("ada", None).await?;
//! let created = store.create(NewKey::new("ada", "ci", Environment::Test)).await?;
//! let events = store.audit(AuditQuery::default().with_key(created.record.id.clone())).await?;
//! assert_eq!(events[0].action, AuditAction::Created);
//! assert_eq!(events[0].actor, "ops:ada");
//! # Ok::<_, keygate::store::StoreError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::key::KeyId;
use crate::record::Status;

/// The longest actor name kept, in bytes; a longer one is cut (at a character boundary).
pub const MAX_ACTOR_LEN: usize = 256;

/// Who makes a store's writes, as the audit trail records it: a name (`"keyctl:ada"`,
/// `"owner:ada"`, `"system"`) and, when known, the client's IP address.
///
/// The name is free text chosen by the application; control characters in it are replaced
/// by `?` and it is cut to [`MAX_ACTOR_LEN`] bytes, so that no actor can forge lines
/// wherever the trail is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Actor {
    /// Who: a user, a tool, a service.
    pub who: String,
    /// From where, when known.
    pub ip: Option<IpAddr>,
}

impl Actor {
    /// An actor named `who`, with no IP address.
    pub fn new(who: impl Into<String>) -> Self {
        let who: String = who.into();
        let mut clean = String::with_capacity(who.len().min(MAX_ACTOR_LEN));
        for c in who.chars() {
            let c = if c.is_control() { '?' } else { c };
            if clean.len() + c.len_utf8() > MAX_ACTOR_LEN {
                break;
            }
            clean.push(c);
        }
        Self {
            who: clean,
            ip: None,
        }
    }

    /// The actor of a handle never given one: `"system"`, no IP address.
    pub fn system() -> Self {
        Self::new("system")
    }

    /// The same actor, from `ip` (an address, or `None` when it is not known).
    #[must_use]
    pub fn with_ip(mut self, ip: impl Into<Option<IpAddr>>) -> Self {
        self.ip = ip.into();
        self
    }
}

impl Default for Actor {
    fn default() -> Self {
        Self::system()
    }
}

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditAction {
    /// An owner was added.
    OwnerAdded,
    /// An owner was disabled (every key of theirs refused).
    OwnerDisabled,
    /// An owner was enabled.
    OwnerEnabled,
    /// An owner's password was set or cleared (the password is never recorded).
    PasswordSet,
    /// A key was created.
    Created,
    /// A key's mutable fields were changed.
    Updated,
    /// A key was disabled.
    Disabled,
    /// A key was enabled.
    Enabled,
    /// A key was (soft-)deleted.
    Deleted,
    /// A key was given a new secret.
    Rotated,
    /// A key was revoked (by `revoke_all`, `replace_keys`, `revoke_client`, `report_leak` or
    /// a status change).
    Revoked,
    /// An OAuth2 client was created. The event's [`key_id`](AuditEvent::key_id) is the
    /// client's id (`kgc_…`).
    ClientCreated,
    /// An OAuth2 client was revoked (its tokens' `Revoked` events come with it). The event's
    /// [`key_id`](AuditEvent::key_id) is the client's id (`kgc_…`).
    ClientRevoked,
    /// A key's secret was reported found in public (a secret-scanning alert), by
    /// [`KeyStore::report_leak`](super::KeyStore::report_leak). Its statuses are the key's
    /// before and after the report; the `Revoked` event comes with it when the report revoked
    /// the key.
    LeakReported,
}

impl AuditAction {
    /// Every action, in declaration order.
    pub const ALL: [Self; 14] = [
        Self::OwnerAdded,
        Self::OwnerDisabled,
        Self::OwnerEnabled,
        Self::PasswordSet,
        Self::Created,
        Self::Updated,
        Self::Disabled,
        Self::Enabled,
        Self::Deleted,
        Self::Rotated,
        Self::Revoked,
        Self::ClientCreated,
        Self::ClientRevoked,
        Self::LeakReported,
    ];

    /// The snake_case name: `"owner_added"`, `"created"`, `"revoked"`…
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OwnerAdded => "owner_added",
            Self::OwnerDisabled => "owner_disabled",
            Self::OwnerEnabled => "owner_enabled",
            Self::PasswordSet => "password_set",
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Disabled => "disabled",
            Self::Enabled => "enabled",
            Self::Deleted => "deleted",
            Self::Rotated => "rotated",
            Self::Revoked => "revoked",
            Self::ClientCreated => "client_created",
            Self::ClientRevoked => "client_revoked",
            Self::LeakReported => "leak_reported",
        }
    }

    /// The action of a key's status change to `to`.
    pub(crate) const fn of_status(to: Status) -> Self {
        match to {
            Status::Active => Self::Enabled,
            Status::Disabled => Self::Disabled,
            Status::Revoked => Self::Revoked,
            Status::Deleted => Self::Deleted,
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An action name that is not one of [`AuditAction`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit action")]
pub struct UnknownAction;

impl FromStr for AuditAction {
    type Err = UnknownAction;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or(UnknownAction)
    }
}

/// One recorded change. Serialized (serde) with `at` as serde's `SystemTime`, the statuses
/// and the action in lowercase/snake_case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditEvent {
    /// The event's id: increasing in the order events are recorded (the cursor of
    /// [`AuditQuery::before`]).
    pub id: u64,
    /// When, on the store's clock.
    pub at: SystemTime,
    /// The name of the owner concerned (the key's owner for a key's event).
    pub owner: String,
    /// The key concerned; `None` for an owner's event. For an OAuth2 client's event
    /// ([`AuditAction::ClientCreated`], [`AuditAction::ClientRevoked`]) the client's id
    /// (`kgc_…`), so that [`AuditQuery::with_key`]`(KeyId::new(client id))` finds them.
    pub key_id: Option<KeyId>,
    /// Who made the change ([`Actor::who`]).
    pub actor: String,
    /// From where ([`Actor::ip`]).
    pub ip: Option<IpAddr>,
    /// What happened.
    pub action: AuditAction,
    /// The key's status before, for an event that changes it (or sets it: `Created` has
    /// none before).
    pub old_status: Option<Status>,
    /// The key's status after, for an event that changes or sets it.
    pub new_status: Option<Status>,
}

/// Which events [`KeyStore::audit`](super::KeyStore::audit) returns: newest first, those of
/// `owner` and/or `key` when set, with ids below `before` when set, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditQuery {
    /// Only this owner's events (by owner name).
    pub owner: Option<String>,
    /// Only this key's events.
    pub key: Option<KeyId>,
    /// Only events with an id below this one: the cursor of the next page is the last id
    /// of the previous page.
    pub before: Option<u64>,
    /// The most events returned: 0 means [`DEFAULT_AUDIT_LIMIT`], and at most
    /// [`MAX_AUDIT_LIMIT`] are returned whatever is asked.
    pub limit: usize,
}

/// The page size of an [`AuditQuery`] whose limit is 0.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;
/// The largest page of an [`AuditQuery`].
pub const MAX_AUDIT_LIMIT: usize = 1000;

impl AuditQuery {
    /// Only `owner`'s events.
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Only `key`'s events.
    #[must_use]
    pub fn with_key(mut self, key: KeyId) -> Self {
        self.key = Some(key);
        self
    }

    /// Only events older than the event `id` (the next page).
    #[must_use]
    pub fn with_before(mut self, id: u64) -> Self {
        self.before = Some(id);
        self
    }

    /// At most `limit` events (0: the default, 100; capped at 1000).
    #[must_use]
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The number of events a page holds at most.
    pub(crate) fn page_size(&self) -> usize {
        match self.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(MAX_AUDIT_LIMIT),
        }
    }

    /// Whether an event passes the filters (not the limit).
    pub(crate) fn matches(&self, event: &AuditEvent) -> bool {
        self.before.is_none_or(|before| event.id < before)
            && self.owner.as_ref().is_none_or(|o| *o == event.owner)
            && self
                .key
                .as_ref()
                .is_none_or(|k| event.key_id.as_ref() == Some(k))
    }
}

/// An event about to be recorded: what the write knows; the store adds its id, the time
/// and the actor.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) owner: String,
    pub(crate) key_id: Option<KeyId>,
    pub(crate) action: AuditAction,
    pub(crate) old_status: Option<Status>,
    pub(crate) new_status: Option<Status>,
}

impl Entry {
    /// An owner's event.
    pub(crate) fn owner(owner: &str, action: AuditAction) -> Self {
        Self {
            owner: owner.to_owned(),
            key_id: None,
            action,
            old_status: None,
            new_status: None,
        }
    }

    /// A key's event with no status change.
    pub(crate) fn key(owner: &str, key: &KeyId, action: AuditAction) -> Self {
        Self {
            owner: owner.to_owned(),
            key_id: Some(key.clone()),
            action,
            old_status: None,
            new_status: None,
        }
    }

    /// A key's event that moves its status.
    pub(crate) fn status(
        owner: &str,
        key: &KeyId,
        action: AuditAction,
        old: Option<Status>,
        new: Status,
    ) -> Self {
        Self {
            old_status: old,
            new_status: Some(new),
            ..Self::key(owner, key, action)
        }
    }

    /// The event as recorded.
    pub(crate) fn recorded(self, id: u64, at: SystemTime, actor: &Actor) -> AuditEvent {
        AuditEvent {
            id,
            at,
            owner: self.owner,
            key_id: self.key_id,
            actor: actor.who.clone(),
            ip: actor.ip,
            action: self.action,
            old_status: self.old_status,
            new_status: self.new_status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_name_themselves_in_snake_case() {
        for action in AuditAction::ALL {
            assert_eq!(action.to_string(), action.as_str());
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
            assert_eq!(
                serde_json::to_value(action).unwrap(),
                serde_json::Value::String(action.as_str().to_owned())
            );
        }
        assert_eq!(AuditAction::OwnerAdded.as_str(), "owner_added");
        assert!("Created".parse::<AuditAction>().is_err());
    }

    #[test]
    fn actors_cannot_forge_lines_or_grow_without_bound() {
        assert_eq!(Actor::new("a\nb\x1b").who, "a?b?");
        assert_eq!(Actor::new("é".repeat(200)).who.len(), MAX_ACTOR_LEN);
        assert_eq!(Actor::default(), Actor::system());
        assert_eq!(Actor::system().who, "system");
    }

    #[test]
    fn page_sizes() {
        assert_eq!(AuditQuery::default().page_size(), 100);
        assert_eq!(AuditQuery::default().with_limit(5).page_size(), 5);
        assert_eq!(AuditQuery::default().with_limit(5000).page_size(), 1000);
    }
}
