//! Routes decrypted messages from the control plane: answers to whoever waits for them (by
//! request or query id), requests to the daemon or policy service.

use crate::msg::TunnelMsg;
use np_control_client::Incoming;
use np_identity::Name;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// A message with its verified sender.
#[derive(Clone, Debug)]
pub struct FromPeer {
    pub from: Name,
    pub msg: TunnelMsg,
}

type Waiters = Arc<Mutex<HashMap<[u8; 16], oneshot::Sender<FromPeer>>>>;

/// Hands answers to waiters. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    waiters: Waiters,
}

/// Requests waiting for the daemon, at most, in all and from one sender.
const MAX_WAITING: usize = 256;
const MAX_WAITING_PER_SENDER: usize = 32;
/// Requests handed to the consumer ahead of its `recv`: small, so that the order in which
/// senders are served is decided here, fairly, rather than by arrival into a long channel.
const HANDED_AHEAD: usize = 4;

/// Requests waiting for the daemon, one queue per sender, served in turn: a sender that floods
/// fills only its own queue, and every other sender's request is next within one round, however
/// many the flooder has waiting.
#[derive(Default)]
struct Fair {
    queues: HashMap<Name, VecDeque<FromPeer>>,
    /// Senders with something waiting, in serving order.
    turn: VecDeque<Name>,
    total: usize,
}

impl Fair {
    fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Queues `fp`; returns whether something was dropped (this one, or another of the
    /// longest queue's to make room for a sender with fewer waiting).
    fn push(&mut self, fp: FromPeer) -> bool {
        let mine = self.queues.get(&fp.from).map_or(0, VecDeque::len);
        if mine >= MAX_WAITING_PER_SENDER {
            return true;
        }
        let mut dropped = false;
        if self.total >= MAX_WAITING {
            // Full: the newest request of whoever has the most waiting makes room, unless that
            // is this sender itself.
            let longest = self.queues.iter().max_by_key(|(_, q)| q.len()).map(|(n, q)| (n.clone(), q.len()));
            match longest {
                Some((name, len)) if len > mine + 1 => {
                    if let Some(q) = self.queues.get_mut(&name) {
                        q.pop_back();
                        self.total -= 1;
                    }
                    dropped = true;
                }
                _ => return true,
            }
        }
        let q = self.queues.entry(fp.from.clone()).or_default();
        if q.is_empty() {
            self.turn.push_back(fp.from.clone());
        }
        q.push_back(fp);
        self.total += 1;
        dropped
    }

    /// The next request, from the sender whose turn it is.
    fn pop(&mut self) -> Option<FromPeer> {
        while let Some(name) = self.turn.pop_front() {
            let Some(q) = self.queues.get_mut(&name) else { continue };
            let Some(fp) = q.pop_front() else {
                self.queues.remove(&name);
                continue;
            };
            self.total -= 1;
            if q.is_empty() {
                self.queues.remove(&name);
            } else {
                self.turn.push_back(name);
            }
            return Some(fp);
        }
        None
    }
}

impl Router {
    /// Starts routing `incoming`; requests (session requests, policy queries) go to the returned
    /// receiver, senders served in turn (see [`Fair`]).
    pub fn start(mut incoming: Incoming) -> (Router, mpsc::Receiver<FromPeer>) {
        let waiters: Waiters = Arc::default();
        let (tx, rx) = mpsc::channel(HANDED_AHEAD);
        let w = waiters.clone();
        tokio::spawn(async move {
            let mut fair = Fair::default();
            let mut dropped: u64 = 0;
            loop {
                let m = tokio::select! {
                    biased;
                    permit = tx.reserve(), if !fair.is_empty() => {
                        let Ok(permit) = permit else { return };
                        if let Some(fp) = fair.pop() {
                            permit.send(fp);
                        }
                        continue;
                    }
                    m = incoming.recv() => match m {
                        Some(m) => m,
                        None => break,
                    },
                };
                let Some(msg) = TunnelMsg::decode(&m.payload) else {
                    tracing::warn!(from = %m.from, "dropping a message that does not parse");
                    continue;
                };
                let id = match &msg {
                    TunnelMsg::SessionRefused { request_id, .. } => Some(*request_id),
                    TunnelMsg::PolicyAnswer { query_id, .. } => Some(*query_id),
                    TunnelMsg::SessionsEnded { request_id, .. } => Some(*request_id),
                    TunnelMsg::SessionStatus { query_id, .. } => Some(*query_id),
                    _ => None,
                };
                let fp = FromPeer { from: m.from, msg };
                match id {
                    Some(id) => {
                        let waiter = w.lock().ok().and_then(|mut m| m.remove(&id));
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(fp);
                            }
                            None => tracing::debug!(from = %fp.from, "answer nobody waits for (late or duplicate)"),
                        }
                    }
                    None => {
                        // Dropping is what a lost request looks like to its sender, who times
                        // out with a clear message; it happens to those with the most waiting.
                        let from = fp.from.clone();
                        if fair.push(fp) {
                            dropped += 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(%from, dropped, "request queue full; dropping requests of the sender with the most waiting");
                            }
                        }
                    }
                }
            }
            // The connection is gone; hand over what is still waiting, then end.
            while let Some(fp) = fair.pop() {
                if tx.send(fp).await.is_err() {
                    return;
                }
            }
        });
        (Router { waiters }, rx)
    }

    /// Registers interest in the answer with id `id`.
    pub fn expect(&self, id: [u8; 16]) -> oneshot::Receiver<FromPeer> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.waiters.lock() {
            m.insert(id, tx);
        }
        rx
    }

    /// Stops waiting for `id`.
    pub fn forget(&self, id: &[u8; 16]) {
        if let Ok(mut m) = self.waiters.lock() {
            m.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(from: &str, i: u8) -> FromPeer {
        let msg =
            TunnelMsg::EndSessions { request_id: [i; 16], device: "d".into(), identity: "@x".parse().expect("n") };
        FromPeer { from: from.parse().expect("name"), msg }
    }

    #[test]
    fn a_flooding_sender_fills_only_its_own_queue_and_others_are_served_in_turn() {
        let mut f = Fair::default();
        let mut dropped = 0;
        for i in 0..1000u32 {
            dropped += usize::from(f.push(req("@mallory", i as u8)));
        }
        assert_eq!(f.total, MAX_WAITING_PER_SENDER);
        assert_eq!(dropped, 1000 - MAX_WAITING_PER_SENDER);
        assert!(!f.push(req("@alice", 1)));
        // Alice is second in line, not behind everything Mallory sent.
        let first_two: Vec<String> = (0..2).filter_map(|_| f.pop()).map(|p| p.from.to_string()).collect();
        assert_eq!(first_two, ["@mallory", "@alice"]);
    }

    #[test]
    fn when_full_the_longest_queue_makes_room() {
        let mut f = Fair::default();
        // Many senders fill the total; a new one still gets in, at the expense of the longest.
        for s in 0..(MAX_WAITING / MAX_WAITING_PER_SENDER) {
            for i in 0..MAX_WAITING_PER_SENDER {
                f.push(req(&format!("@s{s}"), i as u8));
            }
        }
        assert_eq!(f.total, MAX_WAITING);
        assert!(f.push(req("@alice", 0)), "someone else's request made room");
        assert_eq!(f.total, MAX_WAITING);
        let mut seen_alice = false;
        for _ in 0..(MAX_WAITING / MAX_WAITING_PER_SENDER) + 1 {
            seen_alice |= f.pop().is_some_and(|p| p.from.as_str() == "@alice");
        }
        assert!(seen_alice, "alice is served within one round");
    }
}
