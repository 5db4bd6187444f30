//! UDP through the bridge: each (application address, virtual address) pair is one
//! association on its device's session, opened by its first datagram, the way a NAT keeps one
//! mapping per pair. Answers come back as UDP packets on the TUN; an association the device
//! refuses (not permitted, port unreachable there, or an npd that knows no UDP) gets an ICMP
//! port unreachable, so a resolver fails at once instead of waiting for its timeout.
//!
//! Everything is bounded: associations by the session's cap (the mux evicts the least recently
//! used one, and its mapping goes with it), the datagrams queued in the session by its UDP queue
//! (excess dropped and counted there), and the datagrams waiting for a session being set up by
//! [`MAX_WAITING`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use np_session::AssocId;

use super::{Bridge, LinkId, LinkState};
use crate::map::{DeviceKey, FlowTarget};

/// Datagrams kept, over all devices, while their sessions are set up: enough for a resolver's
/// first queries and retries; more are dropped (the application retries, as on a real network).
pub const MAX_WAITING: usize = 64;

/// The pair a datagram travels between: the application's address, the virtual one.
type Pair = (SocketAddr, SocketAddr);

#[derive(Debug)]
struct Mapping {
    link: LinkId,
    assoc: AssocId,
}

/// A datagram waiting for its device's session.
struct Waiting {
    src: SocketAddr,
    dst: SocketAddr,
    target: FlowTarget,
    payload: Vec<u8>,
}

/// The UDP state of the bridge.
#[derive(Default)]
pub(super) struct Udp {
    by_pair: HashMap<Pair, Mapping>,
    by_assoc: HashMap<(LinkId, AssocId), Pair>,
    waiting: HashMap<LinkId, Vec<Waiting>>,
    waiting_count: usize,
    /// Datagrams dropped because too many waited for sessions.
    pub dropped_waiting: u64,
    /// Associations refused (by the device, or because its npd carries no UDP).
    pub refused: u64,
}

/// One association, for `np status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpStatus {
    /// Its device.
    pub device: DeviceKey,
    /// The application's address and the virtual one it sends to.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// What the device sends to.
    pub target: String,
    /// Datagrams and bytes each way (up: to the device).
    pub datagrams_up: u64,
    pub bytes_up: u64,
    pub datagrams_down: u64,
    pub bytes_down: u64,
}

/// Whether the end of an association should tell the application its datagrams are not
/// delivered: yes for a refusal or an unreachable port, no for our own idle timer or eviction.
fn is_refusal(reason: &str) -> bool {
    reason != "idle" && !reason.starts_with("evicted")
}

impl Bridge {
    /// A datagram from the TUN: onto its association, opened (and its session set up) if
    /// needed.
    pub(super) fn udp_datagram(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        target: FlowTarget,
        payload: Vec<u8>,
        now: Instant,
    ) {
        let pair = (src, dst);
        if let Some(m) = self.udp.by_pair.get(&pair) {
            let (link, assoc) = (m.link, m.assoc);
            if let Some(LinkState::Up { conn, .. }) = self.links.get_mut(&link).map(|l| &mut l.state) {
                if conn.has_assoc(assoc) {
                    // Dropped and counted by the session when its queue is full.
                    conn.udp_send(assoc, Bytes::from(payload), now);
                    return;
                }
            }
            self.udp_forget(link, assoc);
        }
        match self.current.get(&target.device).copied() {
            Some(link) => match self.links.get_mut(&link).map(|l| &mut l.state) {
                Some(LinkState::Up { conn, .. }) => {
                    if !conn.has_udp() {
                        tracing::debug!(device = %target.device, "the device's npd carries no UDP");
                        self.udp.refused += 1;
                        self.stack.udp_unreachable(src, dst, &payload);
                        return;
                    }
                    match conn.udp_open(&target.target, now) {
                        Ok(assoc) => {
                            conn.udp_send(assoc, Bytes::from(payload), now);
                            self.udp.by_pair.insert(pair, Mapping { link, assoc });
                            self.udp.by_assoc.insert((link, assoc), pair);
                        }
                        Err(e) => tracing::debug!(error = %e, "cannot open a UDP association"),
                    }
                }
                Some(LinkState::Connecting { .. }) => self.udp_wait(link, Waiting { src, dst, target, payload }),
                _ => {
                    self.current.remove(&target.device);
                    self.udp_datagram(src, dst, target, payload, now);
                }
            },
            None => {
                // The request names the association, so a device that permits only UDP admits it.
                let first = format!("udp/{}", target.target);
                let link = self.start_link(target.device.clone(), &first, Vec::new());
                self.udp_wait(link, Waiting { src, dst, target, payload });
            }
        }
    }

    fn udp_wait(&mut self, link: LinkId, w: Waiting) {
        if self.udp.waiting_count >= MAX_WAITING {
            self.udp.dropped_waiting += 1;
            return;
        }
        self.udp.waiting_count += 1;
        self.udp.waiting.entry(link).or_default().push(w);
    }

    /// `link`'s session is up, or failed: its waiting datagrams go, or are refused.
    pub(super) fn udp_link_ready(&mut self, link: LinkId, up: bool, now: Instant) {
        let Some(waiting) = self.udp.waiting.remove(&link) else { return };
        self.udp.waiting_count = self.udp.waiting_count.saturating_sub(waiting.len());
        for w in waiting {
            if up {
                self.udp_datagram(w.src, w.dst, w.target, w.payload, now);
            } else {
                self.stack.udp_unreachable(w.src, w.dst, &w.payload);
            }
        }
    }

    /// `link`'s session ended: its associations are gone (the next datagram opens a new one).
    pub(super) fn udp_link_ended(&mut self, link: LinkId) {
        let gone: Vec<(LinkId, AssocId)> = self.udp.by_assoc.keys().filter(|(l, _)| *l == link).copied().collect();
        for (l, a) in gone {
            self.udp_forget(l, a);
        }
        if let Some(w) = self.udp.waiting.remove(&link) {
            self.udp.waiting_count = self.udp.waiting_count.saturating_sub(w.len());
        }
    }

    fn udp_forget(&mut self, link: LinkId, assoc: AssocId) -> Option<Pair> {
        let pair = self.udp.by_assoc.remove(&(link, assoc))?;
        if self.udp.by_pair.get(&pair).is_some_and(|m| m.link == link && m.assoc == assoc) {
            self.udp.by_pair.remove(&pair);
        }
        Some(pair)
    }

    /// A datagram from the device: to the application, from the address it sent to.
    pub(super) fn udp_answer(&mut self, link: LinkId, assoc: AssocId, bytes: &[u8]) {
        if let Some(&(src, dst)) = self.udp.by_assoc.get(&(link, assoc)) {
            self.stack.send_datagram(dst, src, bytes);
        }
    }

    /// The association ended (refused, idle on either side, or evicted).
    pub(super) fn udp_closed(&mut self, link: LinkId, assoc: AssocId, reason: &str) {
        let Some((src, dst)) = self.udp_forget(link, assoc) else { return };
        if is_refusal(reason) {
            tracing::debug!(%reason, "UDP association refused by the device");
            self.udp.refused += 1;
            self.stack.udp_unreachable(src, dst, &[]);
        }
    }

    /// Each live association, with what it carried.
    pub fn udp_status(&self) -> Vec<UdpStatus> {
        let mut out = Vec::new();
        for l in self.links.values() {
            let LinkState::Up { conn, .. } = &l.state else { continue };
            let link = self.current.get(&l.device).copied();
            for s in conn.udp_stats() {
                let Some(&(src, dst)) = link.and_then(|link| self.udp.by_assoc.get(&(link, s.assoc))) else { continue };
                out.push(UdpStatus {
                    device: l.device.clone(),
                    src,
                    dst,
                    target: s.target,
                    datagrams_up: s.datagrams_sent,
                    bytes_up: s.bytes_sent,
                    datagrams_down: s.datagrams_received,
                    bytes_down: s.bytes_received,
                });
            }
        }
        out.sort_by(|a, b| (&a.device, a.src, a.dst).cmp(&(&b.device, b.src, b.dst)));
        out
    }

    /// Associations live, datagrams waiting for sessions.
    pub fn udp_counts(&self) -> (usize, usize) {
        (self.udp.by_pair.len(), self.udp.waiting_count)
    }
}

#[cfg(test)]
mod tests {
    use super::is_refusal;

    #[test]
    fn only_refusals_become_port_unreachable() {
        assert!(is_refusal("udp/localhost:9 is not in the device's permit-open list (localhost:22)"));
        assert!(is_refusal("udp/localhost:9: port unreachable"));
        assert!(!is_refusal("idle"));
        assert!(!is_refusal("evicted for a newer association"));
    }
}
