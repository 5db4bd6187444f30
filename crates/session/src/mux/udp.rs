//! UDP associations: whole datagrams beside the TCP flows, in a session that negotiated them.
//!
//! The client opens an association to a `host:port` (`UdpOpen`), then datagrams go either way
//! (`Datagram`) until either side ends it (`UdpClose`): the client when it evicts it for a new
//! one, the device when it refuses the target, and either when the association has been idle
//! for [`MuxConfig::udp_idle_timeout`]. The side that ends one tells the other, so neither keeps
//! sending into an association the other forgot.
//!
//! Datagrams have no flow control, as on a real network: the bytes queued for sending are capped
//! ([`MuxConfig::max_udp_queued`]) and a datagram past the cap, or longer than [`MAX_DATAGRAM`],
//! is dropped and counted. So UDP never holds back the TCP flows' credit or control frames,
//! and a UDP flood costs a bounded queue. The number of associations is capped per session
//! ([`MuxConfig::max_udp_assocs`]); the client evicts its least recently used one to open past
//! it, so a peer that opens more is abusive and the session ends, as for flows.
//!
//! [`MuxConfig::udp_idle_timeout`]: super::MuxConfig::udp_idle_timeout
//! [`MuxConfig::max_udp_queued`]: super::MuxConfig::max_udp_queued
//! [`MuxConfig::max_udp_assocs`]: super::MuxConfig::max_udp_assocs

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::{Event, Mux};
use crate::frame::{Frame, MAX_DATAGRAM, MAX_TEXT};
use crate::handshake::Role;
use crate::SessionError;

/// An association's id: odd, chosen by the client.
pub type AssocId = u32;

/// What one association carried, for `np status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssocStats {
    /// The association.
    pub assoc: AssocId,
    /// `host:port` it was opened to.
    pub target: String,
    /// Datagrams and their bytes queued for the peer.
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    /// Datagrams and their bytes from the peer.
    pub datagrams_received: u64,
    pub bytes_received: u64,
}

/// Session-wide UDP counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams dropped because the send queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams dropped for being longer than [`MAX_DATAGRAM`].
    pub dropped_oversized: u64,
    /// Datagrams for an association that no longer exists (either side ended it meanwhile).
    pub dropped_unknown: u64,
    /// Associations ended for being idle.
    pub expired: u64,
    /// Associations the client ended to make room for a new one.
    pub evicted: u64,
}

#[derive(Debug)]
struct Assoc {
    last: Instant,
    stats: AssocStats,
}

/// The UDP state of one mux.
#[derive(Debug)]
pub(super) struct Assocs {
    map: HashMap<AssocId, Assoc>,
    next_local: AssocId,
    highest_peer: AssocId,
    /// Frames to send, in order (an association's `UdpOpen` before its datagrams).
    out: VecDeque<Frame>,
    /// Encoded bytes in `out`.
    queued: usize,
    /// No association expires before this (recomputed at each sweep; activity only delays).
    deadline: Option<Instant>,
    counters: UdpCounters,
}

impl Assocs {
    pub(super) fn new() -> Assocs {
        Assocs {
            map: HashMap::new(),
            next_local: 1,
            highest_peer: 0,
            out: VecDeque::new(),
            queued: 0,
            deadline: None,
            counters: UdpCounters::default(),
        }
    }

    fn push(&mut self, f: Frame) {
        self.queued += f.encoded_len();
        self.out.push_back(f);
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.out.clear();
        self.queued = 0;
        self.deadline = None;
    }

    pub(super) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

impl Mux {
    fn check_udp(&self) -> Result<(), SessionError> {
        self.check_open()?;
        if self.config.udp {
            Ok(())
        } else {
            Err(SessionError::Protocol("this session does not carry UDP (the device's npd is too old)"))
        }
    }

    fn arm_udp_timer(&mut self, now: Instant) {
        let t = now + self.config.udp_idle_timeout;
        self.udp.deadline = Some(self.udp.deadline.map_or(t, |d| d.min(t)));
    }

    /// Opens a UDP association to `target` (`host:port`); datagrams may follow at once. At the
    /// cap the least recently used association is ended first ([`Event::UdpClosed`] for it).
    /// Only the client opens associations.
    pub fn udp_open(&mut self, target: &str, now: Instant) -> Result<AssocId, SessionError> {
        self.check_udp()?;
        if self.role != Role::Initiator {
            return Err(SessionError::Protocol("only the client opens UDP associations"));
        }
        if target.len() > MAX_TEXT {
            return Err(SessionError::Protocol("target too long"));
        }
        if self.udp.queued >= self.config.max_udp_queued {
            self.udp.counters.dropped_queue_full += 1;
            return Err(SessionError::Limit("UDP send queue full"));
        }
        if self.udp.map.len() >= self.config.max_udp_assocs {
            let lru = self.udp.map.iter().min_by_key(|(_, a)| a.last).map(|(id, _)| *id);
            if let Some(old) = lru {
                self.udp.counters.evicted += 1;
                self.end_assoc(old, "evicted for a newer association");
            }
        }
        let assoc = self.udp.next_local;
        self.udp.next_local = assoc.checked_add(2).ok_or(SessionError::Protocol("association ids exhausted"))?;
        let stats = AssocStats { assoc, target: target.to_owned(), ..AssocStats::default() };
        self.udp.map.insert(assoc, Assoc { last: now, stats });
        self.udp.push(Frame::UdpOpen { assoc, target: target.to_owned() });
        self.arm_udp_timer(now);
        Ok(assoc)
    }

    /// Queues one datagram; `false` if it was dropped (and counted): no such association, too
    /// long, or the send queue is full.
    pub fn udp_send(&mut self, assoc: AssocId, bytes: Bytes, now: Instant) -> bool {
        if self.closed.is_some() {
            return false;
        }
        let Some(a) = self.udp.map.get_mut(&assoc) else {
            self.udp.counters.dropped_unknown += 1;
            return false;
        };
        if bytes.len() > MAX_DATAGRAM {
            self.udp.counters.dropped_oversized += 1;
            return false;
        }
        let frame = Frame::Datagram { assoc, bytes };
        if self.udp.queued + frame.encoded_len() > self.config.max_udp_queued {
            self.udp.counters.dropped_queue_full += 1;
            return false;
        }
        a.last = now;
        a.stats.datagrams_sent += 1;
        a.stats.bytes_sent += (frame.encoded_len() - crate::frame::DATAGRAM_HEADER) as u64;
        self.udp.push(frame);
        true
    }

    /// Ends an association (a `UdpClose` to the peer). Unknown ones are ignored.
    pub fn udp_close(&mut self, assoc: AssocId, reason: &str) {
        if self.closed.is_some() || !self.udp.map.contains_key(&assoc) {
            return;
        }
        self.udp.map.remove(&assoc);
        self.udp.push(Frame::UdpClose { assoc, reason: reason.to_owned() });
    }

    /// Ends an association on our side's initiative: the peer and the application are told.
    fn end_assoc(&mut self, assoc: AssocId, reason: &str) {
        self.udp_close(assoc, reason);
        self.events.push_back(Event::UdpClosed { assoc, reason: reason.to_owned() });
    }

    /// Does the association exist?
    pub fn has_assoc(&self, assoc: AssocId) -> bool {
        self.udp.map.contains_key(&assoc)
    }

    /// What each live association carried.
    pub fn udp_stats(&self) -> Vec<AssocStats> {
        let mut v: Vec<AssocStats> = self.udp.map.values().map(|a| a.stats.clone()).collect();
        v.sort_by_key(|s| s.assoc);
        v
    }

    /// Session-wide UDP counters.
    pub fn udp_counters(&self) -> UdpCounters {
        self.udp.counters
    }

    /// Bytes of UDP frames waiting to be sent.
    pub fn udp_queued(&self) -> usize {
        self.udp.queued
    }

    /// Ends the associations idle for the idle timeout.
    pub(super) fn udp_sweep(&mut self, now: Instant) {
        if self.udp.deadline.is_none_or(|d| now < d) {
            return;
        }
        let idle = self.config.udp_idle_timeout;
        let expired: Vec<AssocId> =
            self.udp.map.iter().filter(|(_, a)| now >= a.last + idle).map(|(id, _)| *id).collect();
        for assoc in expired {
            self.udp.counters.expired += 1;
            self.end_assoc(assoc, "idle");
        }
        self.udp.deadline = self.udp.map.values().map(|a| a.last + idle).min();
    }

    /// Handles a UDP frame from the peer.
    pub(super) fn handle_udp_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        if !self.config.udp {
            return Err(SessionError::Protocol("UDP frame in a session without UDP"));
        }
        match frame {
            Frame::UdpOpen { assoc, target } => {
                if self.role != Role::Responder || assoc % 2 == 0 {
                    return Err(SessionError::Protocol("peer opened an association it may not"));
                }
                if assoc <= self.udp.highest_peer {
                    return Err(SessionError::Protocol("association id reused"));
                }
                self.udp.highest_peer = assoc;
                // The client evicts to keep to the same cap (`udp_open`): only abuse gets here.
                if self.udp.map.len() >= self.config.max_udp_assocs {
                    return Err(SessionError::Limit("peer opened more UDP associations than a session allows"));
                }
                let stats = AssocStats { assoc, target: target.clone(), ..AssocStats::default() };
                self.udp.map.insert(assoc, Assoc { last: now, stats });
                self.arm_udp_timer(now);
                self.events.push_back(Event::UdpOpened { assoc, target });
            }
            Frame::Datagram { assoc, bytes } => {
                let past = self.is_past_assoc(assoc);
                match self.udp.map.get_mut(&assoc) {
                    Some(a) => {
                        a.last = now;
                        a.stats.datagrams_received += 1;
                        a.stats.bytes_received += bytes.len() as u64;
                        self.events.push_back(Event::Datagram { assoc, bytes });
                    }
                    None if past => self.udp.counters.dropped_unknown += 1,
                    None => return Err(SessionError::Protocol("datagram for unknown association")),
                }
            }
            Frame::UdpClose { assoc, reason } => {
                if self.udp.map.remove(&assoc).is_some() {
                    self.events.push_back(Event::UdpClosed { assoc, reason });
                } else if !self.is_past_assoc(assoc) {
                    return Err(SessionError::Protocol("UdpClose for unknown association"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Was this association id valid once (late frames for it are dropped, not an error)?
    fn is_past_assoc(&self, assoc: AssocId) -> bool {
        assoc % 2 == 1
            && match self.role {
                Role::Initiator => assoc < self.udp.next_local,
                Role::Responder => assoc <= self.udp.highest_peer,
            }
    }

    /// Appends queued UDP frames to `out` (which already holds `used` bytes of this record)
    /// while they fit in `room`; the first one goes whenever it fits `max` at all.
    pub(super) fn transmit_udp(&mut self, out: &mut Vec<u8>, used: usize, room: usize, max: usize) {
        let mut used = used;
        let mut first = true;
        while let Some(f) = self.udp.out.front() {
            let len = f.encoded_len();
            if used + len > max || (!first && used + len > room) {
                break;
            }
            if let Some(f) = self.udp.out.pop_front() {
                f.encode(out);
                self.udp.queued = self.udp.queued.saturating_sub(len);
                used += len;
            }
            first = false;
        }
    }
}
