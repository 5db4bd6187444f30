//! Many TCP flows in one session: a pure state machine in the style of `quinn-proto`.
//!
//! Input: [`Mux::handle_frames`] (one record's plaintext), [`Mux::handle_timeout`] and the
//! application's commands ([`Mux::open`], [`Mux::send`], [`Mux::consumed`], ...).
//! Output: [`Mux::poll_transmit`] (plaintext to seal into a record), [`Mux::poll_event`] and
//! [`Mux::poll_timeout`]. After any input, drain events and transmits, then re-arm the timer.
//!
//! Flow control is per flow and credit based: the sender may have at most the window
//! (initial window plus granted credit) outstanding, and the receiver grants credit only as the
//! application consumes data. So a stalled flow only stops itself, and the bytes any one flow can
//! make the receiver hold are bounded by the window.
//!
//! Nothing the peer sends makes the mux grow without bound (the peer may be hostile, however
//! well authenticated):
//! - a `Ping` is answered by at most one pending `Pong` (a newer Ping replaces it);
//! - credit grants are coalesced per flow, so they are bounded by the number of flows;
//! - the peer may have at most [`MuxConfig::max_peer_flows`] flows at once, and at most
//!   [`MuxConfig::early_budget`] bytes on flows not yet accepted, summed over the session (a
//!   sender keeps to both limits itself, so exceeding one is abuse and ends the session);
//! - the answers the application queues (`OpenOk`, `OpenErr`, `Reset`) are counted, and past
//!   [`MuxConfig::max_control_backlog`] [`Mux::is_backlogged`] tells the driver to stop reading
//!
//! # Layout
//!
//! - `send`: a flow's send half (credit, queued bytes, our `Fin`) and [`Mux::send`],
//!   [`Mux::finish`];
//! - `recv`: a flow's receive half (window, credit to grant back, the peer's `Fin`) and
//!   [`Mux::consumed`];
//! - `input`: frames from the peer ([`Mux::handle_frames`]);
//! - `transmit`: frame scheduling ([`Mux::poll_transmit`]);
//! - here: the flows' lifecycle (open, accept, refuse, reset, retire) and the session's timers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::recv::{RecvHalf, RecvState};
use self::send::{SendHalf, SendState};
use crate::frame::{Frame, MAX_TEXT};
use crate::handshake::Role;
use crate::SessionError;

mod input;
mod recv;
mod send;
#[cfg(test)]
mod tests;
mod transmit;
mod udp;

pub use transmit::Pull;
pub use udp::{AssocId, AssocStats, UdpCounters};

/// A flow's id: odd when the client opened it, even when the device did.
pub type FlowId = u32;

/// Tunables of a [`Mux`].
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Bytes a sender may send on a new flow before any credit arrives, and the most a receiver
    /// ever buffers per flow.
    pub initial_window: u32,
    /// Send a `Ping` after this long without sending anything.
    pub keepalive_interval: Duration,
    /// Declare the session dead after this long without receiving anything.
    pub idle_timeout: Duration,
    /// Most flows either side may have open at once (including flows not yet accepted). Both
    /// ends must agree: a sender never opens more, so a peer that does is closed for abuse.
    pub max_peer_flows: usize,
    /// Bytes a sender may have sent on flows the receiver has not accepted yet, summed over the
    /// session. Both ends must agree (a sender holds back data past it until its flow is
    /// accepted), so a peer that sends more is closed for abuse. It caps what a peer can make
    /// the receiver buffer before the application has even decided to take a flow.
    pub early_budget: u32,
    /// Control frames (answers to the peer's opens, resets, ...) queued for sending past which
    /// [`Mux::is_backlogged`] says to stop reading from the peer until it reads from us.
    pub max_control_backlog: usize,
    /// Records sealed under one key before the driver's record layer rekeys (both ends must
    /// agree: it is part of the protocol, not a local tuning). Lowered only by tests.
    pub records_per_key: u64,
    /// Whether this session carries UDP associations. Negotiated at the handshake (a peer
    /// that does not know the UDP frames would end the session on the first one), so it is
    /// set per session, never by a flag.
    pub udp: bool,
    /// A UDP association with no datagram either way for this long ends (both ends run it;
    /// the first to fire tells the other).
    pub udp_idle_timeout: Duration,
    /// Most UDP associations a session holds at once. Both ends must agree: the client evicts
    /// its least recently used one to open past it, so a peer that opens more is closed for
    /// abuse. Each costs the device a socket.
    pub max_udp_assocs: usize,
    /// Bytes of UDP frames queued for sending past which datagrams are dropped (and counted).
    pub max_udp_queued: usize,
    /// Keep sealed records until acknowledged so the session can resume on a new transport;
    /// `None`: a broken transport ends the session (acknowledgements are sent either way).
    pub resume: Option<crate::resume::ResumeConfig>,
}

/// Pings a peer may send in a burst, and per second after it. A peer of ours pings once per
/// keepalive interval, and only when idle; a peer that pings faster is flooding, and every Ping
/// costs the receiver a record to open and a Pong to seal, so past this the session is ended
/// for abuse rather than left to take the device's CPU from everyone else's sessions.
pub const PING_BURST: f64 = 32.0;
pub const PINGS_PER_SEC: f64 = 8.0;

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            initial_window: 1 << 20,
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_peer_flows: 1024,
            // A TLS ClientHello or an SSH banner fits many times over; no client of ours sends
            // more than that before the answer.
            early_budget: 256 * 1024,
            // Answers to a full set of opened flows fit, so a legitimate burst of opens never
            // pauses the reader; each frame is at most ~1 KiB (a reason text).
            max_control_backlog: 1024,
            records_per_key: crate::record::DEFAULT_RECORDS_PER_KEY,
            udp: false,
            // What NAT gateways keep an unanswered UDP mapping for (RFC 4787 asks for at least
            // two minutes only for answered ones; 30 s is the common floor for DNS-like use).
            udp_idle_timeout: Duration::from_secs(30),
            // Each is a socket on the device; mosh or a resolver needs a handful.
            max_udp_assocs: 256,
            // Four full records: a burst at line rate waits at most a few records behind TCP.
            max_udp_queued: 256 * 1024,
            resume: None,
        }
    }
}

/// Something the application must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer asks to open a flow to `target`; answer with [`Mux::accept`] or [`Mux::refuse`].
    FlowOpened {
        /// The new flow.
        flow: FlowId,
        /// `host:port` to dial.
        target: String,
    },
    /// A flow we opened was accepted.
    FlowAccepted {
        /// The flow.
        flow: FlowId,
    },
    /// A flow we opened was refused; it no longer exists.
    FlowRefused {
        /// The flow.
        flow: FlowId,
        /// The peer's reason.
        reason: String,
    },
    /// Bytes arrived; report them with [`Mux::consumed`] once the application took them.
    FlowData {
        /// The flow.
        flow: FlowId,
        /// The bytes (a slice of the decrypted record, not a copy).
        bytes: Bytes,
    },
    /// The peer will send no more on this flow.
    FlowFin {
        /// The flow.
        flow: FlowId,
    },
    /// The peer aborted the flow; it no longer exists.
    FlowReset {
        /// The flow.
        flow: FlowId,
        /// The peer's reason.
        reason: String,
    },
    /// A flow whose `send` was cut short by credit has credit again.
    FlowWritable {
        /// The flow.
        flow: FlowId,
    },
    /// The client opened a UDP association to `target` (device side). Refuse it with
    /// [`Mux::udp_close`]; otherwise send its datagrams there.
    UdpOpened {
        /// The association.
        assoc: AssocId,
        /// `host:port` to send to.
        target: String,
    },
    /// A datagram of an association.
    Datagram {
        /// The association.
        assoc: AssocId,
        /// The payload (a slice of the decrypted record).
        bytes: Bytes,
    },
    /// The peer ended the association, or it went idle or was evicted here; it no longer exists.
    UdpClosed {
        /// The association.
        assoc: AssocId,
        /// Why.
        reason: String,
    },
    /// The peer has opened this many of our records (its `Ack`; checked by the connection).
    Acked {
        /// Records opened.
        records: u64,
    },
    /// The session ended (peer's `Close` or keepalive timeout).
    Closed {
        /// Why.
        reason: String,
    },
}

/// Where a flow stands in its opening (each direction's own state is in its half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    /// We sent `Open`, no answer yet.
    Opening,
    /// The peer sent `Open`, we have not answered.
    Incoming,
    /// Accepted.
    Open,
}

/// One flow: its opening state, and a half per direction.
#[derive(Debug)]
struct Flow {
    state: FlowState,
    send: SendHalf,
    recv: RecvHalf,
    /// Bytes sent (ours) or received (the peer's) before the flow was accepted; they count
    /// against the session's early budget until it is answered or gone.
    early: u64,
}

impl Flow {
    fn new(state: FlowState, window: u32) -> Flow {
        Flow { state, send: SendHalf::new(window), recv: RecvHalf::new(window), early: 0 }
    }

    /// Accepted, and over both ways: nothing more can happen on it.
    fn is_done(&self) -> bool {
        self.state == FlowState::Open
            && self.send.state == SendState::Finished
            && self.recv.state == RecvState::Finished
    }
}

/// The multiplexer of one session.
#[derive(Debug)]
pub struct Mux {
    role: Role,
    config: MuxConfig,
    flows: HashMap<FlowId, Flow>,
    next_local: FlowId,
    highest_peer: FlowId,
    peer_flows: usize,
    local_flows: usize,
    /// Bytes we sent, and the peer sent, on flows not yet accepted (see `Flow::early`).
    early_sent: u64,
    early_recv: u64,
    control: VecDeque<Frame>,
    /// The answer to the latest `Ping`, not yet sent: one at most, however many Pings arrive.
    pong: Option<u64>,
    /// Pings the peer may still send now (refilled with time, see [`PING_BURST`]).
    ping_tokens: f64,
    ping_refilled: Instant,
    /// Flows with a coalesced `Credit` to send (each at most once: those in
    /// `RecvState::Granting`, and stale ids of flows whose peer finished or that are gone).
    credit_ready: VecDeque<FlowId>,
    /// The send rotation: every flow with something to send, once (it is added when it gets
    /// work and put back after each turn while work remains, see `SendHalf::has_work`), and
    /// stale ids of flows that are gone.
    ready: VecDeque<FlowId>,
    events: VecDeque<Event>,
    last_send: Instant,
    last_recv: Instant,
    next_ping: u64,
    closed: Option<String>,
    udp: udp::Assocs,
    /// No data frames go out while set: the connection holds as many unacknowledged records as
    /// it may (see `Mux::set_data_paused`).
    data_paused: bool,
}

impl Mux {
    /// A multiplexer for the side that played `role` in the handshake (the initiator is the
    /// client and opens odd flow ids).
    pub fn new(role: Role, config: MuxConfig, now: Instant) -> Mux {
        Mux {
            role,
            config,
            flows: HashMap::new(),
            next_local: match role {
                Role::Initiator => 1,
                Role::Responder => 2,
            },
            highest_peer: 0,
            peer_flows: 0,
            local_flows: 0,
            early_sent: 0,
            early_recv: 0,
            control: VecDeque::new(),
            pong: None,
            ping_tokens: PING_BURST,
            ping_refilled: now,
            credit_ready: VecDeque::new(),
            ready: VecDeque::new(),
            events: VecDeque::new(),
            last_send: now,
            last_recv: now,
            next_ping: 0,
            closed: None,
            udp: udp::Assocs::new(),
            data_paused: false,
        }
    }

    fn is_local(&self, flow: FlowId) -> bool {
        (flow % 2 == 1) == (self.role == Role::Initiator)
    }

    /// Was this id valid once (so late frames for it are ignored, not an error)?
    fn is_past(&self, flow: FlowId) -> bool {
        flow != 0 && if self.is_local(flow) { flow < self.next_local } else { flow <= self.highest_peer }
    }

    fn remove_flow(&mut self, flow: FlowId) {
        let Some(f) = self.flows.remove(&flow) else {
            return;
        };
        if self.is_local(flow) {
            self.local_flows = self.local_flows.saturating_sub(1);
            self.early_sent = self.early_sent.saturating_sub(f.early);
        } else {
            self.peer_flows = self.peer_flows.saturating_sub(1);
            self.early_recv = self.early_recv.saturating_sub(f.early);
        }
    }

    /// Drops every flow (the session ended).
    fn clear_flows(&mut self) {
        self.flows.clear();
        self.ready.clear();
        self.credit_ready.clear();
        self.control.clear();
        self.pong = None;
        self.peer_flows = 0;
        self.local_flows = 0;
        self.early_sent = 0;
        self.early_recv = 0;
        self.udp.clear();
    }

    fn maybe_retire(&mut self, flow: FlowId) {
        if self.flows.get(&flow).is_some_and(Flow::is_done) {
            self.remove_flow(flow);
        }
    }

    fn check_open(&self) -> Result<(), SessionError> {
        match &self.closed {
            Some(r) => Err(SessionError::Closed(r.clone())),
            None => Ok(()),
        }
    }

    /// Ends the session locally: queues a `Close` frame (the last thing transmitted) and drops
    /// every flow and any data not yet transmitted.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason.to_owned());
        self.clear_flows();
        self.control.push_back(Frame::Close { reason: reason.to_owned() });
    }

    /// Is the session over?
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the session ended, if it did.
    pub fn close_reason(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Opens a flow to `target` (`host:port`). Data may be sent right away, before the peer
    /// accepts, within the initial window.
    pub fn open(&mut self, target: &str) -> Result<FlowId, SessionError> {
        self.check_open()?;
        if target.len() > MAX_TEXT {
            return Err(SessionError::Protocol("target too long"));
        }
        // The peer holds us to the same limit (and would close the session).
        if self.local_flows >= self.config.max_peer_flows {
            return Err(SessionError::Limit("too many flows open in this session"));
        }
        let flow = self.next_local;
        self.next_local = flow.checked_add(2).ok_or(SessionError::Protocol("flow ids exhausted"))?;
        self.local_flows += 1;
        self.flows.insert(flow, Flow::new(FlowState::Opening, self.config.initial_window));
        self.control.push_back(Frame::Open { flow, target: target.to_owned() });
        Ok(flow)
    }

    /// Accepts a flow the peer opened.
    pub fn accept(&mut self, flow: FlowId) -> Result<(), SessionError> {
        self.check_open()?;
        match self.flows.get_mut(&flow) {
            Some(f) if f.state == FlowState::Incoming => {
                f.state = FlowState::Open;
                self.early_recv = self.early_recv.saturating_sub(f.early);
                f.early = 0;
                self.control.push_back(Frame::OpenOk { flow });
                Ok(())
            }
            _ => Err(SessionError::UnknownFlow(flow)),
        }
    }

    /// Refuses a flow the peer opened; it no longer exists.
    pub fn refuse(&mut self, flow: FlowId, reason: &str) -> Result<(), SessionError> {
        self.check_open()?;
        match self.flows.get(&flow) {
            Some(f) if f.state == FlowState::Incoming => {
                self.remove_flow(flow);
                self.control.push_back(Frame::OpenErr { flow, reason: reason.to_owned() });
                Ok(())
            }
            _ => Err(SessionError::UnknownFlow(flow)),
        }
    }

    /// Aborts `flow` in both directions. A flow that no longer exists is ignored.
    pub fn reset(&mut self, flow: FlowId, reason: &str) {
        if self.closed.is_some() || !self.flows.contains_key(&flow) {
            return;
        }
        self.remove_flow(flow);
        self.control.push_back(Frame::Reset { flow, reason: reason.to_owned() });
    }

    /// Does the flow still exist?
    pub fn has_flow(&self, flow: FlowId) -> bool {
        self.flows.contains_key(&flow)
    }
    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The session's tunables.
    pub fn config(&self) -> &MuxConfig {
        &self.config
    }

    /// When [`Mux::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let t = (self.last_send + self.config.keepalive_interval).min(self.last_recv + self.config.idle_timeout);
        Some(self.udp.deadline().map_or(t, |d| d.min(t)))
    }

    /// Stops (or restarts) sending flow data: control frames still go out. Flows see this as
    /// their credit running out (the peer grants none for data it has not received), so it is
    /// backpressure, never loss.
    pub fn set_data_paused(&mut self, paused: bool) {
        self.data_paused = paused;
    }

    /// Has nothing been received for the idle timeout?
    pub fn idle_expired(&self, now: Instant) -> bool {
        now >= self.last_recv + self.config.idle_timeout
    }

    /// Restarts the keepalive clocks (a new transport was just set up).
    pub fn touch(&mut self, now: Instant) {
        self.last_recv = now;
        self.last_send = now;
    }

    /// Runs timers: queues a keepalive `Ping` or declares the session dead.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if now >= self.last_recv + self.config.idle_timeout {
            let reason = "keepalive timeout";
            self.close(reason);
            self.events.push_back(Event::Closed { reason: reason.to_owned() });
            return;
        }
        self.udp_sweep(now);
        if now >= self.last_send + self.config.keepalive_interval {
            if !self.wants_transmit() {
                self.control.push_back(Frame::Ping { id: self.next_ping });
                self.next_ping += 1;
            }
            // Counts as sending from now on (a transmit is pending), so the timer does not fire
            // again before it happens.
            self.last_send = now;
        }
    }
}
