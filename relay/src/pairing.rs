//! Which authenticated connection pairs with which: a pure state machine, no IO and no clock.
//!
//! The shell feeds it verified Joins ([`Pairing::join`]), disconnections ([`Pairing::withdraw`],
//! [`Pairing::end`]) and the time ([`Pairing::expire`] at [`Pairing::poll_timeout`]), and acts
//! on the decisions it returns.

use crate::refusal::Refusal;
use np_identity::Name;
use np_relay_proto::Role;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// What identifies one session: a third party who learns the session id but is neither of the
/// two named identities lands on a different key and can never pair into it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PairKey {
    /// Session id chosen by the client.
    pub session: [u8; 16],
    /// The client's identity.
    pub client: Name,
    /// The device's identity.
    pub device: Name,
}

impl PairKey {
    /// The key a verified Join by `identity` as `role`, naming `peer`, belongs to.
    pub fn new(identity: &Name, role: Role, session: [u8; 16], peer: &Name) -> Self {
        let (client, device) = match role {
            Role::Client => (identity.clone(), peer.clone()),
            Role::Device => (peer.clone(), identity.clone()),
        };
        PairKey { session, client, device }
    }

    /// The identity that plays `role` in this session.
    pub fn identity(&self, role: Role) -> &Name {
        match role {
            Role::Client => &self.client,
            Role::Device => &self.device,
        }
    }
}

/// Whose share of the relay a side's place counts against. A client's places count against the
/// client; a device's against the device *for that client*: the device takes part in every
/// requester's sessions, so counted against the device alone, one permitted client could fill
/// its places and lock every other requester (its managers among them) out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Share {
    /// The identity holding the place.
    pub identity: Name,
    /// For a device's place: the client it serves.
    pub for_client: Option<Name>,
}

impl Share {
    /// The share a Join as `role` for `key` counts against.
    pub fn of(key: &PairKey, role: Role) -> Share {
        match role {
            Role::Client => Share { identity: key.client.clone(), for_client: None },
            Role::Device => Share { identity: key.device.clone(), for_client: Some(key.client.clone()) },
        }
    }
}

/// What to do with a connection whose Join verified.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<C> {
    /// First side of its session: tell it to wait.
    Wait,
    /// Second side: pair it with `first`, which was waiting.
    Pair {
        /// The waiting connection.
        first: C,
    },
    /// Refuse and close.
    Refuse(Refusal),
}

/// Limits the state machine enforces.
#[derive(Clone, Debug)]
pub struct PairingLimits {
    /// How long a first side waits.
    pub deadline: Duration,
    /// How long an expired session is remembered.
    pub expired_memory: Duration,
    /// Sessions per identity: per client, and per device for each client ([`Share`]).
    pub max_per_identity: usize,
    /// Sessions in total.
    pub max_sessions: usize,
}

#[derive(Debug)]
struct Entry<C> {
    client: Option<C>,
    device: Option<C>,
    /// `Some` while waiting for the second side.
    deadline: Option<Instant>,
}

impl<C> Entry<C> {
    fn slot(&mut self, role: Role) -> &mut Option<C> {
        match role {
            Role::Client => &mut self.client,
            Role::Device => &mut self.device,
        }
    }
}

/// The pairing table. `C` identifies a connection in the shell.
#[derive(Debug)]
pub struct Pairing<C> {
    limits: PairingLimits,
    sessions: HashMap<PairKey, Entry<C>>,
    per_identity: HashMap<Share, usize>,
    /// Waiting deadlines in the order they were set (so in time order); entries that paired or
    /// withdrew stay until their time comes and are skipped then.
    deadlines: VecDeque<(Instant, PairKey)>,
    /// Sessions whose first side timed out, oldest first, with when to forget them.
    expired: VecDeque<(Instant, PairKey)>,
    expired_set: HashSet<PairKey>,
    waiting: usize,
}

impl<C: Copy + Eq> Pairing<C> {
    /// An empty table.
    pub fn new(limits: PairingLimits) -> Self {
        Pairing {
            limits,
            sessions: HashMap::new(),
            per_identity: HashMap::new(),
            deadlines: VecDeque::new(),
            expired: VecDeque::new(),
            expired_set: HashSet::new(),
            waiting: 0,
        }
    }

    /// A verified Join of `conn` as `role` for `key` at `now`.
    pub fn join(&mut self, key: &PairKey, role: Role, conn: C, now: Instant) -> Decision<C> {
        self.forget_expired(now);
        if self.expired_set.contains(key) {
            return Decision::Refuse(Refusal::DeadlinePassed);
        }
        let identity = key.identity(role);
        let share = Share::of(key, role);
        let held = self.per_identity.get(&share).copied().unwrap_or(0);
        match self.sessions.get_mut(key) {
            Some(entry) => {
                if entry.slot(role).is_some() {
                    return Decision::Refuse(Refusal::Duplicate(role));
                }
                if entry.deadline.is_some_and(|d| d <= now) {
                    return Decision::Refuse(Refusal::DeadlinePassed);
                }
                let Some(first) = *entry.slot(role.other()) else {
                    // An entry always holds at least one side; treat a broken one as absent.
                    return Decision::Refuse(Refusal::DeadlinePassed);
                };
                if held >= self.limits.max_per_identity {
                    return Decision::Refuse(Refusal::TooManyForIdentity(identity.clone()));
                }
                *entry.slot(role) = Some(conn);
                entry.deadline = None;
                self.waiting -= 1;
                *self.per_identity.entry(share).or_insert(0) += 1;
                Decision::Pair { first }
            }
            None => {
                if held >= self.limits.max_per_identity {
                    return Decision::Refuse(Refusal::TooManyForIdentity(identity.clone()));
                }
                if self.sessions.len() >= self.limits.max_sessions {
                    return Decision::Refuse(Refusal::RelayFull);
                }
                let deadline = now + self.limits.deadline;
                let mut entry = Entry { client: None, device: None, deadline: Some(deadline) };
                *entry.slot(role) = Some(conn);
                self.sessions.insert(key.clone(), entry);
                self.deadlines.push_back((deadline, key.clone()));
                self.waiting += 1;
                *self.per_identity.entry(share).or_insert(0) += 1;
                Decision::Wait
            }
        }
    }

    /// A waiting `conn` went away before its peer came. Returns false (and changes nothing) if
    /// it is not waiting, e.g. because it was paired in the meantime.
    pub fn withdraw(&mut self, key: &PairKey, conn: C) -> bool {
        let Some(entry) = self.sessions.get(key) else {
            return false;
        };
        if entry.deadline.is_none() {
            return false;
        }
        let role = if entry.client == Some(conn) {
            Role::Client
        } else if entry.device == Some(conn) {
            Role::Device
        } else {
            return false;
        };
        self.sessions.remove(key);
        self.waiting -= 1;
        self.release(Share::of(key, role));
        true
    }

    /// A paired session ended; frees its place and both identities' counts.
    pub fn end(&mut self, key: &PairKey) {
        let Some(entry) = self.sessions.get(key) else {
            return;
        };
        if entry.deadline.is_some() {
            return;
        }
        self.sessions.remove(key);
        self.release(Share::of(key, Role::Client));
        self.release(Share::of(key, Role::Device));
    }

    /// Waiting connections whose deadline is at or before `now`: refuse them
    /// ([`Refusal::DeadlinePassed`]). Their sessions are remembered as expired for a while.
    pub fn expire(&mut self, now: Instant) -> Vec<C> {
        let mut out = Vec::new();
        while let Some((deadline, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            let Some((deadline, key)) = self.deadlines.pop_front() else {
                break;
            };
            let still_waiting = self.sessions.get(&key).is_some_and(|e| e.deadline == Some(deadline));
            if !still_waiting {
                continue;
            }
            let Some(entry) = self.sessions.remove(&key) else {
                continue;
            };
            self.waiting -= 1;
            for (role, conn) in [(Role::Client, entry.client), (Role::Device, entry.device)] {
                if let Some(conn) = conn {
                    out.push(conn);
                    self.release(Share::of(&key, role));
                }
            }
            if self.expired_set.insert(key.clone()) {
                self.expired.push_back((now + self.limits.expired_memory, key));
            }
        }
        self.forget_expired(now);
        out
    }

    /// When [`Pairing::expire`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let d = self.deadlines.front().map(|(t, _)| *t);
        let e = self.expired.front().map(|(t, _)| *t);
        match (d, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sessions held, waiting or paired.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions whose first side is waiting.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Sessions remembered as expired.
    pub fn expired(&self) -> usize {
        self.expired.len()
    }

    /// Sessions `identity` takes part in, over all its shares.
    pub fn held_by(&self, identity: &Name) -> usize {
        self.per_identity.iter().filter(|(s, _)| &s.identity == identity).map(|(_, n)| n).sum()
    }

    fn release(&mut self, share: Share) {
        if let Some(n) = self.per_identity.get_mut(&share) {
            *n -= 1;
            if *n == 0 {
                self.per_identity.remove(&share);
            }
        }
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some((until, _)) = self.expired.front() {
            if *until > now {
                break;
            }
            if let Some((_, key)) = self.expired.pop_front() {
                self.expired_set.remove(&key);
            }
        }
        // Bound the memory of expired sessions like the live ones.
        while self.expired.len() > self.limits.max_sessions {
            if let Some((_, key)) = self.expired.pop_front() {
                self.expired_set.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        s.parse().expect("valid name")
    }

    fn limits() -> PairingLimits {
        PairingLimits {
            deadline: Duration::from_secs(10),
            expired_memory: Duration::from_secs(60),
            max_per_identity: 3,
            max_sessions: 5,
        }
    }

    fn key(s: u8) -> PairKey {
        PairKey::new(&name("@alice"), Role::Client, [s; 16], &name("@dev"))
    }

    #[test]
    fn client_then_device_pair() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        let dkey = PairKey::new(&name("@dev"), Role::Device, [1; 16], &name("@alice"));
        assert_eq!(dkey, key(1));
        assert_eq!(p.join(&dkey, Role::Device, 2, t0 + Duration::from_secs(9)), Decision::Pair { first: 1 });
        assert_eq!((p.sessions(), p.waiting()), (1, 0));
        assert!(p.expire(t0 + Duration::from_secs(11)).is_empty());
        assert!(!p.withdraw(&key(1), 1), "paired connections do not withdraw");
        p.end(&key(1));
        assert_eq!(p.sessions(), 0);
        assert_eq!(p.held_by(&name("@alice")), 0);
        assert_eq!(p.held_by(&name("@dev")), 0);
    }

    #[test]
    fn duplicates_are_refused_waiting_or_paired() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        assert_eq!(p.join(&key(1), Role::Client, 2, t0), Decision::Refuse(Refusal::Duplicate(Role::Client)));
        assert_eq!(p.join(&key(1), Role::Device, 3, t0), Decision::Pair { first: 1 });
        assert_eq!(p.join(&key(1), Role::Device, 4, t0), Decision::Refuse(Refusal::Duplicate(Role::Device)));
        assert_eq!(p.held_by(&name("@alice")), 1);
    }

    #[test]
    fn third_party_lands_elsewhere() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        // Mallory knows the session id and claims to be a device for @alice.
        let m = PairKey::new(&name("@mallory"), Role::Device, [1; 16], &name("@alice"));
        assert_eq!(p.join(&m, Role::Device, 2, t0), Decision::Wait);
        assert_eq!(p.sessions(), 2);
    }

    #[test]
    fn first_side_expires_and_late_side_is_refused() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert!(p.expire(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(p.expire(t0 + Duration::from_secs(10)), vec![1]);
        assert_eq!((p.sessions(), p.waiting(), p.expired()), (0, 0, 1));
        assert_eq!(p.held_by(&name("@alice")), 0);
        assert_eq!(
            p.join(&key(1), Role::Device, 2, t0 + Duration::from_secs(11)),
            Decision::Refuse(Refusal::DeadlinePassed)
        );
        assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(70)));
        assert!(p.expire(t0 + Duration::from_secs(70)).is_empty());
        assert_eq!((p.expired(), p.poll_timeout()), (0, None));
    }

    #[test]
    fn late_side_before_expire_ran_is_refused() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        assert_eq!(
            p.join(&key(1), Role::Device, 2, t0 + Duration::from_secs(10)),
            Decision::Refuse(Refusal::DeadlinePassed)
        );
    }

    #[test]
    fn withdraw_frees_the_session() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        assert_eq!(p.join(&key(1), Role::Client, 1, t0), Decision::Wait);
        assert!(!p.withdraw(&key(1), 9));
        assert!(p.withdraw(&key(1), 1));
        assert_eq!((p.sessions(), p.waiting()), (0, 0));
        // Its stale deadline expires nothing.
        assert!(p.expire(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(p.expired(), 0);
        assert_eq!(p.join(&key(1), Role::Client, 3, t0), Decision::Wait);
    }

    #[test]
    fn per_identity_and_total_limits() {
        let t0 = Instant::now();
        let mut p = Pairing::new(limits());
        for s in 0..3 {
            assert_eq!(p.join(&key(s), Role::Client, s as u32, t0), Decision::Wait);
        }
        assert_eq!(p.join(&key(3), Role::Client, 3, t0), Decision::Refuse(Refusal::TooManyForIdentity(name("@alice"))));
        // Device side of an existing session still fits (its own count is 0).
        assert_eq!(p.join(&key(0), Role::Device, 10, t0), Decision::Pair { first: 0 });
        let other = |s: u8| PairKey::new(&name("@bob"), Role::Client, [s; 16], &name("@dev"));
        assert_eq!(p.join(&other(1), Role::Client, 20, t0), Decision::Wait);
        assert_eq!(p.join(&other(2), Role::Client, 21, t0), Decision::Wait);
        assert_eq!(p.join(&other(3), Role::Client, 22, t0), Decision::Refuse(Refusal::RelayFull));
        // The second side of a waiting session is not refused by a full relay.
        assert_eq!(p.join(&other(2), Role::Device, 23, t0), Decision::Pair { first: 21 });
        p.end(&key(0));
        assert_eq!(p.join(&other(3), Role::Client, 22, t0), Decision::Wait);
    }

    #[test]
    fn a_client_at_its_share_leaves_the_device_places_for_other_clients() {
        let t0 = Instant::now();
        let mut p = Pairing::new(PairingLimits { max_sessions: 100, ..limits() });
        let bob = |s: u8| PairKey::new(&name("@bob"), Role::Client, [s; 16], &name("@dev"));
        // @bob fills his share and the device's share for him (3 each).
        for s in 0..3u8 {
            assert_eq!(p.join(&bob(s), Role::Client, u32::from(s), t0), Decision::Wait);
            assert_eq!(p.join(&bob(s), Role::Device, 100 + u32::from(s), t0), Decision::Pair { first: u32::from(s) });
        }
        assert_eq!(p.join(&bob(9), Role::Device, 109, t0), Decision::Refuse(Refusal::TooManyForIdentity(name("@dev"))));
        // The device still joins @alice's sessions: before shares, @bob's three had used its places.
        assert_eq!(p.join(&key(1), Role::Client, 50, t0), Decision::Wait);
        assert_eq!(p.join(&key(1), Role::Device, 51, t0), Decision::Pair { first: 50 });
        assert_eq!(p.held_by(&name("@dev")), 4);
        p.end(&bob(0));
        assert_eq!(p.held_by(&name("@dev")), 3);
        assert_eq!(p.join(&bob(9), Role::Device, 109, t0), Decision::Wait);
    }

    #[test]
    fn expired_memory_is_bounded() {
        let t0 = Instant::now();
        let mut p = Pairing::new(PairingLimits { max_per_identity: 100, ..limits() });
        for round in 0..4u8 {
            for s in 0..5u8 {
                let k = key(round * 5 + s);
                assert_eq!(p.join(&k, Role::Client, 0, t0), Decision::Wait);
            }
            assert_eq!(p.expire(t0 + Duration::from_secs(10)).len(), 5);
        }
        assert_eq!(p.expired(), 5);
    }
}
