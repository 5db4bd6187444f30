//! Presence: which records are held by a live connection of their owner (`Request::Hold`).
//!
//! A device daemon holds its `device/NAME` record; when the last authenticated connection of its
//! identity that holds it closes, readers see it disconnected at once instead of waiting for
//! three missed heartbeats. Only the owner's own authenticated connections can hold or release
//! its keys (the key is the owner's name with the record key, and only `serve` opens and closes
//! connections here, after authentication), so no other identity, and no connection that never
//! authenticated, can make a record look gone. The heartbeat stays for half-open connections,
//! which look held until TCP notices: readers also judge the record's age.
//!
//! In memory only: after a restart everything is [`Presence::Unknown`] until daemons reconnect
//! and hold again, and readers fall back on the heartbeat.

use np_control_proto::{Presence, MAX_HOLDS};
use np_identity::Name;
use std::collections::HashMap;
use std::sync::Mutex;

/// Keys remembered at most. Held keys are bounded by connections times [`MAX_HOLDS`]; the rest
/// are keys whose holders all left, dropped first when the table is full (they then read as
/// `Unknown`, which falls back on the heartbeat: the behaviour before presence existed).
const MAX_KEYS: usize = 100_000;

/// Why a hold was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HoldError {
    /// The connection closed meanwhile (a request still in flight when it ended).
    #[error("the connection is closing")]
    Closed,
    /// The connection already holds the most keys allowed.
    #[error("a connection holds at most {MAX_HOLDS} keys")]
    TooMany,
    /// Every slot of the table is held by a live connection.
    #[error("the presence table is full")]
    Full,
}

type Key = (Name, String);

struct Entry {
    /// Connections holding it now.
    holders: Vec<u64>,
    /// When the first of the current holders took it.
    since_ms: u64,
    /// When the last holder left (none hold it now).
    gone_ms: Option<u64>,
}

#[derive(Default)]
struct Table {
    keys: HashMap<Key, Entry>,
    /// Authenticated connections still open, with what each holds.
    conns: HashMap<u64, Vec<Key>>,
}

/// The presence of every held record. Pure bookkeeping; the connection code calls it.
#[derive(Default)]
pub struct PresenceTable {
    t: Mutex<Table>,
}

impl PresenceTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.t.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An authenticated connection starts; only open connections can hold.
    pub fn open(&self, conn: u64) {
        self.lock().conns.entry(conn).or_default();
    }

    /// `conn` (a connection of `owner`) holds `owner`'s record `key`. Holding it again is a no-op.
    pub fn hold(&self, conn: u64, owner: &Name, key: &str, now_ms: u64) -> Result<(), HoldError> {
        let mut t = self.lock();
        let t = &mut *t;
        let held = t.conns.get_mut(&conn).ok_or(HoldError::Closed)?;
        let k: Key = (owner.clone(), key.to_string());
        if held.contains(&k) {
            return Ok(());
        }
        if held.len() >= MAX_HOLDS {
            return Err(HoldError::TooMany);
        }
        if !t.keys.contains_key(&k) && t.keys.len() >= MAX_KEYS {
            t.keys.retain(|_, e| !e.holders.is_empty());
            if t.keys.len() >= MAX_KEYS {
                return Err(HoldError::Full);
            }
        }
        held.push(k.clone());
        let e = t.keys.entry(k).or_insert(Entry { holders: Vec::new(), since_ms: now_ms, gone_ms: None });
        if e.holders.is_empty() {
            e.since_ms = now_ms;
            e.gone_ms = None;
        }
        e.holders.push(conn);
        Ok(())
    }

    /// `conn` closed: it holds nothing any more. Returns the keys it was the last holder of.
    pub fn close(&self, conn: u64, now_ms: u64) -> Vec<(Name, String)> {
        let mut t = self.lock();
        let Some(held) = t.conns.remove(&conn) else { return Vec::new() };
        let mut gone = Vec::new();
        for k in held {
            if let Some(e) = t.keys.get_mut(&k) {
                e.holders.retain(|c| *c != conn);
                if e.holders.is_empty() {
                    e.gone_ms = Some(now_ms);
                    gone.push(k);
                }
            }
        }
        gone
    }

    /// The presence of `owner`'s record `key`.
    pub fn of(&self, owner: &Name, key: &str) -> Presence {
        let t = self.lock();
        // A lookup by a borrowed pair would need a custom key type; a record key is short.
        match t.keys.get(&(owner.clone(), key.to_string())) {
            None => Presence::Unknown,
            Some(e) if !e.holders.is_empty() => Presence::Connected { since_ms: e.since_ms },
            Some(e) => Presence::Disconnected { at_ms: e.gone_ms.unwrap_or(e.since_ms) },
        }
    }
}

/// One presence from two sources (this node and the others, or two other nodes): held anywhere
/// is held (since the earliest), else gone at the latest time any source saw it go; `Unknown`
/// only when neither knows.
pub fn either(a: Presence, b: Presence) -> Presence {
    use Presence::*;
    match (a, b) {
        (Connected { since_ms: x }, Connected { since_ms: y }) => Connected { since_ms: x.min(y) },
        (c @ Connected { .. }, _) | (_, c @ Connected { .. }) => c,
        (Disconnected { at_ms: x }, Disconnected { at_ms: y }) => Disconnected { at_ms: x.max(y) },
        (d @ Disconnected { .. }, Unknown) | (Unknown, d @ Disconnected { .. }) => d,
        (Unknown, Unknown) => Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        s.parse().expect("name")
    }

    #[test]
    fn gone_only_when_the_last_holder_closes() {
        let p = PresenceTable::default();
        let dev = n("@alice_device");
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Unknown);
        p.open(1);
        p.open(2);
        p.hold(1, &dev, "device/pi4", 10).expect("hold");
        p.hold(1, &dev, "device/pi4", 11).expect("again: no-op");
        p.hold(2, &dev, "device/pi4", 20).expect("second connection");
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Connected { since_ms: 10 });
        assert!(p.close(2, 30).is_empty(), "the first connection still holds it");
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Connected { since_ms: 10 });
        assert_eq!(p.close(1, 40), vec![(dev.clone(), "device/pi4".to_string())]);
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Disconnected { at_ms: 40 });
        // Back again: connected since the new hold.
        p.open(3);
        p.hold(3, &dev, "device/pi4", 50).expect("hold");
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Connected { since_ms: 50 });
    }

    #[test]
    fn a_connection_that_never_held_it_cannot_release_it() {
        let p = PresenceTable::default();
        let dev = n("@alice_device");
        p.open(1);
        p.hold(1, &dev, "device/pi4", 10).expect("hold");
        // Another identity's connection, and one of the same identity holding something else.
        p.open(2);
        p.hold(2, &n("@mallory"), "device/pi4", 11).expect("its own key");
        p.open(3);
        p.hold(3, &dev, "device/nas", 12).expect("hold");
        p.close(2, 20);
        p.close(3, 21);
        // Never opened (not authenticated), closed twice.
        p.close(4, 22);
        p.close(2, 23);
        assert_eq!(p.of(&dev, "device/pi4"), Presence::Connected { since_ms: 10 });
        assert_eq!(p.of(&dev, "device/nas"), Presence::Disconnected { at_ms: 21 });
    }

    #[test]
    fn closed_connections_cannot_hold_and_holds_are_bounded() {
        let p = PresenceTable::default();
        let dev = n("@alice_device");
        assert_eq!(p.hold(1, &dev, "k", 1), Err(HoldError::Closed), "never opened");
        p.open(1);
        for i in 0..MAX_HOLDS {
            p.hold(1, &dev, &format!("k{i}"), 1).expect("within the limit");
        }
        assert_eq!(p.hold(1, &dev, "one-more", 1), Err(HoldError::TooMany));
        p.close(1, 2);
        // A request still in flight when its connection closed holds nothing.
        assert_eq!(p.hold(1, &dev, "late", 3), Err(HoldError::Closed));
        assert_eq!(p.of(&dev, "late"), Presence::Unknown);
    }

    #[test]
    fn two_sources_of_presence() {
        use Presence::*;
        let (c1, c5) = (Connected { since_ms: 1 }, Connected { since_ms: 5 });
        let (d2, d9) = (Disconnected { at_ms: 2 }, Disconnected { at_ms: 9 });
        assert_eq!(either(c5, c1), c1, "held since the earliest");
        assert_eq!(either(d9, c5), c5, "held anywhere is held");
        assert_eq!(either(Unknown, c1), c1);
        assert_eq!(either(d2, d9), d9, "gone at the latest");
        assert_eq!(either(Unknown, d2), d2);
        assert_eq!(either(Unknown, Unknown), Unknown);
    }
}
