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
//!   until the peer reads what we have to say.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{encode_data_header, Frame, FrameReader, DATA_HEADER, MAX_TEXT};
use crate::handshake::Role;
use crate::record::MAX_RECORD_PLAINTEXT;
use crate::SessionError;

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
    /// The session ended (peer's `Close` or keepalive timeout).
    Closed {
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    /// We sent `Open`, no answer yet.
    Opening,
    /// The peer sent `Open`, we have not answered.
    Incoming,
    /// Accepted.
    Open,
}

#[derive(Debug)]
struct Flow {
    state: FlowState,
    /// Bytes `send` may still accept.
    send_credit: u64,
    send_queue: BytesMut,
    send_blocked: bool,
    fin_pending: bool,
    fin_sent: bool,
    scheduled: bool,
    /// Bytes received in total, and the most the peer may have sent (window plus grants).
    recv_total: u64,
    recv_limit: u64,
    recv_consumed: u64,
    /// Consumed but not yet granted back.
    credit_pending: u64,
    /// In `Mux::credit_ready`: a `Credit` frame goes out at the next transmit.
    credit_queued: bool,
    fin_received: bool,
    /// Bytes sent (ours) or received (the peer's) before the flow was accepted; they count
    /// against the session's early budget until it is answered or gone.
    early: u64,
}

impl Flow {
    fn new(state: FlowState, window: u32) -> Flow {
        Flow {
            state,
            send_credit: u64::from(window),
            send_queue: BytesMut::new(),
            send_blocked: false,
            fin_pending: false,
            fin_sent: false,
            scheduled: false,
            recv_total: 0,
            recv_limit: u64::from(window),
            recv_consumed: 0,
            credit_pending: 0,
            credit_queued: false,
            fin_received: false,
            early: 0,
        }
    }

    fn has_send_work(&self) -> bool {
        !self.send_queue.is_empty() || (self.fin_pending && !self.fin_sent)
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
    /// Flows with a coalesced `Credit` to send (each at most once, see `Flow::credit_queued`).
    credit_ready: VecDeque<FlowId>,
    ready: VecDeque<FlowId>,
    events: VecDeque<Event>,
    last_send: Instant,
    last_recv: Instant,
    next_ping: u64,
    closed: Option<String>,
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
    }

    fn maybe_retire(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.get(&flow) {
            if f.state == FlowState::Open && f.fin_sent && f.fin_received {
                self.remove_flow(flow);
            }
        }
    }

    fn schedule(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.get_mut(&flow) {
            if !f.scheduled && f.has_send_work() {
                f.scheduled = true;
                self.ready.push_back(flow);
            }
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

    /// Queues as much of `data` as the flow's credit allows and returns how much that was.
    /// When it is less than `data.len()`, a [`Event::FlowWritable`] follows once credit arrives.
    pub fn send(&mut self, flow: FlowId, data: &[u8]) -> Result<usize, SessionError> {
        self.check_open()?;
        let f = self.flows.get_mut(&flow).ok_or(SessionError::UnknownFlow(flow))?;
        if f.state == FlowState::Incoming {
            return Err(SessionError::Protocol("flow not accepted yet"));
        }
        if f.fin_pending {
            return Err(SessionError::Protocol("flow already finished"));
        }
        let mut allowed = f.send_credit;
        if f.state == FlowState::Opening {
            // Before the answer, the session's early budget limits us too; past it the data
            // waits for the flow's OpenOk (which wakes the writer, see `FlowWritable`).
            allowed = allowed.min(u64::from(self.config.early_budget).saturating_sub(self.early_sent));
        }
        let n = data.len().min(usize::try_from(allowed).unwrap_or(usize::MAX));
        if n < data.len() {
            f.send_blocked = true;
        }
        if n > 0 {
            f.send_queue.extend_from_slice(&data[..n]);
            f.send_credit -= n as u64;
            if f.state == FlowState::Opening {
                f.early += n as u64;
                self.early_sent += n as u64;
            }
            self.schedule(flow);
        }
        Ok(n)
    }

    /// Credit `send` would accept on this flow right now.
    pub fn send_credit(&self, flow: FlowId) -> u64 {
        self.flows.get(&flow).map_or(0, |f| f.send_credit)
    }

    /// The application took `n` received bytes of `flow`; grant the peer credit for them.
    /// A flow that no longer exists is ignored.
    pub fn consumed(&mut self, flow: FlowId, n: usize) {
        if self.closed.is_some() {
            return;
        }
        let threshold = u64::from(self.config.initial_window / 4).max(1);
        let Some(f) = self.flows.get_mut(&flow) else {
            return;
        };
        // Never grant for more than was received: a confused caller must not open the window.
        let n = (n as u64).min(f.recv_total - f.recv_consumed);
        f.recv_consumed += n;
        f.credit_pending += n;
        // One pending grant per flow at most: it is sized when it is sent, so however often the
        // application consumes while the peer does not read, nothing piles up.
        if f.credit_pending >= threshold && !f.fin_received && !f.credit_queued {
            f.credit_queued = true;
            self.credit_ready.push_back(flow);
        }
    }

    /// Half-closes our direction of `flow` once queued data is sent.
    pub fn finish(&mut self, flow: FlowId) -> Result<(), SessionError> {
        self.check_open()?;
        let f = self.flows.get_mut(&flow).ok_or(SessionError::UnknownFlow(flow))?;
        if f.state == FlowState::Incoming {
            return Err(SessionError::Protocol("flow not accepted yet"));
        }
        f.fin_pending = true;
        self.schedule(flow);
        Ok(())
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

    /// Processes one record's plaintext (one or more frames). An error is fatal: the session is
    /// closed and a `Close` frame carrying the reason is queued.
    pub fn handle_frames(&mut self, plaintext: Bytes, now: Instant) -> Result<(), SessionError> {
        self.check_open()?;
        self.last_recv = now;
        let refill = now.saturating_duration_since(self.ping_refilled).as_secs_f64() * PINGS_PER_SEC;
        self.ping_tokens = (self.ping_tokens + refill).min(PING_BURST);
        self.ping_refilled = now;
        let mut reader = FrameReader::new(plaintext);
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e)),
            };
            if let Err(e) = self.handle_frame(frame) {
                return Err(self.fail(e));
            }
            if self.closed.is_some() {
                return Ok(());
            }
        }
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        self.close(&e.to_string());
        e
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Open { flow, target } => {
                if flow == 0 || self.is_local(flow) {
                    return Err(SessionError::Protocol("peer opened a flow with our parity"));
                }
                if flow <= self.highest_peer {
                    return Err(SessionError::Protocol("flow id reused"));
                }
                self.highest_peer = flow;
                // A sender keeps to the same limit (`open`), so only an abusive peer gets here;
                // refusing each extra Open instead would queue an answer per frame.
                if self.peer_flows >= self.config.max_peer_flows {
                    return Err(SessionError::Limit("peer opened more flows than a session allows"));
                }
                self.peer_flows += 1;
                self.flows.insert(flow, Flow::new(FlowState::Incoming, self.config.initial_window));
                self.events.push_back(Event::FlowOpened { flow, target });
            }
            Frame::OpenOk { flow } => {
                let past_local = self.is_local(flow) && self.is_past(flow);
                match self.flows.get_mut(&flow) {
                    Some(f) if f.state == FlowState::Opening => {
                        f.state = FlowState::Open;
                        self.early_sent = self.early_sent.saturating_sub(f.early);
                        f.early = 0;
                        self.events.push_back(Event::FlowAccepted { flow });
                        if f.send_blocked && f.send_credit > 0 {
                            // It was held back by the early budget.
                            f.send_blocked = false;
                            self.events.push_back(Event::FlowWritable { flow });
                        }
                        self.maybe_retire(flow);
                    }
                    Some(_) => return Err(SessionError::Protocol("unexpected OpenOk")),
                    None if past_local => {}
                    None => return Err(SessionError::Protocol("OpenOk for unknown flow")),
                }
            }
            Frame::OpenErr { flow, reason } => match self.flows.get(&flow) {
                Some(f) if f.state == FlowState::Opening => {
                    self.remove_flow(flow);
                    self.events.push_back(Event::FlowRefused { flow, reason });
                }
                Some(_) => return Err(SessionError::Protocol("unexpected OpenErr")),
                None if self.is_local(flow) && self.is_past(flow) => {}
                None => return Err(SessionError::Protocol("OpenErr for unknown flow")),
            },
            Frame::Data { flow, bytes } => {
                let past = self.is_past(flow);
                let Some(f) = self.flows.get_mut(&flow) else {
                    return if past { Ok(()) } else { Err(SessionError::Protocol("data for unknown flow")) };
                };
                if f.state == FlowState::Opening {
                    return Err(SessionError::Protocol("data before OpenOk"));
                }
                if f.fin_received {
                    return Err(SessionError::Protocol("data after Fin"));
                }
                let total = f.recv_total + bytes.len() as u64;
                if total > f.recv_limit {
                    return Err(SessionError::Protocol("flow credit exceeded"));
                }
                f.recv_total = total;
                if f.state == FlowState::Incoming {
                    f.early += bytes.len() as u64;
                    self.early_recv += bytes.len() as u64;
                    if self.early_recv > u64::from(self.config.early_budget) {
                        return Err(SessionError::Limit("peer sent more data before acceptance than a session allows"));
                    }
                }
                if !bytes.is_empty() {
                    self.events.push_back(Event::FlowData { flow, bytes });
                }
            }
            Frame::Credit { flow, bytes } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.send_credit = f.send_credit.saturating_add(u64::from(bytes));
                    if f.send_blocked && bytes > 0 {
                        f.send_blocked = false;
                        self.events.push_back(Event::FlowWritable { flow });
                    }
                } else if !self.is_past(flow) {
                    return Err(SessionError::Protocol("credit for unknown flow"));
                }
            }
            Frame::Fin { flow } => {
                let past = self.is_past(flow);
                match self.flows.get_mut(&flow) {
                    Some(f) if f.state != FlowState::Opening && !f.fin_received => {
                        f.fin_received = true;
                        self.events.push_back(Event::FlowFin { flow });
                        self.maybe_retire(flow);
                    }
                    Some(_) => return Err(SessionError::Protocol("unexpected Fin")),
                    None if past => {}
                    None => return Err(SessionError::Protocol("Fin for unknown flow")),
                }
            }
            Frame::Reset { flow, reason } => {
                if self.flows.contains_key(&flow) {
                    self.remove_flow(flow);
                    self.events.push_back(Event::FlowReset { flow, reason });
                } else if !self.is_past(flow) {
                    return Err(SessionError::Protocol("Reset for unknown flow"));
                }
            }
            // Only the newest Ping needs an answer: it proves we are alive as well as all of them.
            Frame::Ping { id } => {
                if self.ping_tokens < 1.0 {
                    return Err(SessionError::Limit("peer sent Pings faster than a session allows"));
                }
                self.ping_tokens -= 1.0;
                self.pong = Some(id);
            }
            Frame::Pong { .. } => {}
            Frame::Close { reason } => {
                self.closed = Some(reason.clone());
                self.clear_flows();
                self.events.push_back(Event::Closed { reason });
            }
        }
        Ok(())
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Is there anything to transmit?
    pub fn wants_transmit(&self) -> bool {
        self.pong.is_some() || !self.control.is_empty() || !self.credit_ready.is_empty() || !self.ready.is_empty()
    }

    /// Are so many control frames waiting to be sent that the driver should stop reading from
    /// the peer until it has sent some? Reading on would let a peer that never reads make us
    /// queue answers (to its opens, ...) without bound; pausing pushes back on its writes.
    pub fn is_backlogged(&self) -> bool {
        self.control.len() >= self.config.max_control_backlog
    }

    /// Control frames waiting to be sent (for tests and metrics).
    pub fn control_backlog(&self) -> usize {
        self.control.len() + usize::from(self.pong.is_some()) + self.credit_ready.len()
    }

    /// The session's tunables.
    pub fn config(&self) -> &MuxConfig {
        &self.config
    }

    /// Plaintext for one record (at most [`MAX_RECORD_PLAINTEXT`] bytes), if anything is pending.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.poll_transmit_into(now, &mut out, MAX_RECORD_PLAINTEXT).then_some(out)
    }

    /// Appends pending frames to `out`, at most `max` bytes (at least 2 KiB is assumed, so any
    /// control frame fits). Control frames go first, then data round-robin over the flows that
    /// have some, so no flow starves the others. Returns whether anything was written.
    pub fn poll_transmit_into(&mut self, now: Instant, out: &mut Vec<u8>, max: usize) -> bool {
        let start = out.len();
        let used = |out: &Vec<u8>| out.len() - start;
        if let Some(id) = self.pong.take() {
            Frame::Pong { id }.encode(out);
        }
        while let Some(&flow) = self.credit_ready.front() {
            if used(out) + 9 > max {
                break;
            }
            self.credit_ready.pop_front();
            let Some(f) = self.flows.get_mut(&flow) else {
                continue;
            };
            f.credit_queued = false;
            if f.fin_received || f.credit_pending == 0 {
                continue;
            }
            // The window opens only now that the peer is told, so a peer cannot use a grant it
            // has not been sent.
            let grant = u32::try_from(f.credit_pending).unwrap_or(u32::MAX);
            f.credit_pending -= u64::from(grant);
            f.recv_limit += u64::from(grant);
            Frame::Credit { flow, bytes: grant }.encode(out);
        }
        while let Some(f) = self.control.front() {
            if used(out) > 0 && used(out) + f.encoded_len() > max {
                break;
            }
            if let Some(f) = self.control.pop_front() {
                f.encode(out);
            }
        }
        let rounds = self.ready.len();
        for _ in 0..rounds {
            let room = max.saturating_sub(used(out));
            if room <= DATA_HEADER {
                break;
            }
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(f) = self.flows.get_mut(&id) else {
                continue;
            };
            f.scheduled = false;
            if !f.send_queue.is_empty() {
                let chunk = f.send_queue.len().min(room - DATA_HEADER);
                encode_data_header(out, id, chunk);
                out.extend_from_slice(&f.send_queue[..chunk]);
                f.send_queue.advance(chunk);
            }
            if f.send_queue.is_empty() && f.fin_pending && !f.fin_sent {
                let fin = Frame::Fin { flow: id };
                if used(out) + fin.encoded_len() <= max {
                    fin.encode(out);
                    f.fin_sent = true;
                }
            }
            if f.has_send_work() {
                f.scheduled = true;
                self.ready.push_back(id);
            } else {
                self.maybe_retire(id);
            }
        }
        let wrote = used(out) > 0;
        if wrote {
            self.last_send = now;
        }
        wrote
    }

    /// When [`Mux::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        Some((self.last_send + self.config.keepalive_interval).min(self.last_recv + self.config.idle_timeout))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Pair {
        now: Instant,
        client: Mux,
        device: Mux,
        client_events: Vec<Event>,
        device_events: Vec<Event>,
    }

    impl Pair {
        fn new(config: MuxConfig) -> Pair {
            let now = Instant::now();
            Pair {
                now,
                client: Mux::new(Role::Initiator, config.clone(), now),
                device: Mux::new(Role::Responder, config, now),
                client_events: Vec::new(),
                device_events: Vec::new(),
            }
        }

        /// Moves records both ways until nothing is pending.
        fn pump(&mut self) {
            loop {
                let mut moved = false;
                while let Some(p) = self.client.poll_transmit(self.now) {
                    assert!(p.len() <= MAX_RECORD_PLAINTEXT);
                    self.device.handle_frames(p.into(), self.now).expect("device handles");
                    moved = true;
                }
                while let Some(p) = self.device.poll_transmit(self.now) {
                    assert!(p.len() <= MAX_RECORD_PLAINTEXT);
                    self.client.handle_frames(p.into(), self.now).expect("client handles");
                    moved = true;
                }
                while let Some(e) = self.client.poll_event() {
                    self.client_events.push(e);
                }
                while let Some(e) = self.device.poll_event() {
                    self.device_events.push(e);
                }
                if !moved {
                    return;
                }
            }
        }

        fn device_data(&mut self, flow: FlowId, consume: bool) -> Vec<u8> {
            let mut v = Vec::new();
            self.device_events.retain(|e| match e {
                Event::FlowData { flow: f, bytes } if *f == flow => {
                    v.extend_from_slice(bytes);
                    false
                }
                _ => true,
            });
            if consume {
                self.device.consumed(flow, v.len());
            }
            v
        }

        fn client_data(&mut self, flow: FlowId) -> Vec<u8> {
            let mut v = Vec::new();
            self.client_events.retain(|e| match e {
                Event::FlowData { flow: f, bytes } if *f == flow => {
                    v.extend_from_slice(bytes);
                    false
                }
                _ => true,
            });
            self.client.consumed(flow, v.len());
            v
        }
    }

    fn small_window() -> MuxConfig {
        MuxConfig { initial_window: 4096, ..MuxConfig::default() }
    }

    #[test]
    fn open_accept_data_both_ways_half_close() {
        let mut p = Pair::new(MuxConfig::default());
        let flow = p.client.open("127.0.0.1:22").expect("open");
        assert_eq!(flow % 2, 1);
        // Data may follow Open before the device accepts.
        assert_eq!(p.client.send(flow, b"early").expect("send"), 5);
        p.pump();
        assert_eq!(p.device_events.remove(0), Event::FlowOpened { flow, target: "127.0.0.1:22".into() });
        assert_eq!(p.device_data(flow, true), b"early");
        assert!(p.device.send(flow, b"x").is_err(), "no sending before accept");
        p.device.accept(flow).expect("accept");
        p.device.send(flow, b"banner").expect("send");
        p.pump();
        assert_eq!(p.client_events.remove(0), Event::FlowAccepted { flow });
        assert_eq!(p.client_data(flow), b"banner");

        p.client.finish(flow).expect("finish");
        assert!(p.client.send(flow, b"late").is_err());
        p.pump();
        assert!(p.device_events.contains(&Event::FlowFin { flow }));
        // The other direction still works after the half-close.
        p.device.send(flow, b"still here").expect("send");
        p.device.finish(flow).expect("finish");
        p.pump();
        assert_eq!(p.client_data(flow), b"still here");
        assert!(p.client_events.contains(&Event::FlowFin { flow }));
        // Both directions done: the flow is retired on both sides.
        assert!(!p.client.has_flow(flow));
        assert!(!p.device.has_flow(flow));
    }

    #[test]
    fn refuse_and_reset() {
        let mut p = Pair::new(MuxConfig::default());
        let a = p.client.open("10.0.0.1:80").expect("open");
        let b = p.client.open("10.0.0.2:80").expect("open");
        assert_eq!(b, a + 2);
        p.pump();
        p.device.refuse(a, "not permitted").expect("refuse");
        p.device.accept(b).expect("accept");
        p.pump();
        assert!(p.client_events.contains(&Event::FlowRefused { flow: a, reason: "not permitted".into() }));
        assert!(!p.client.has_flow(a));
        assert!(p.client.send(a, b"x").is_err());
        // Reset from the device while the client is still sending: late data is ignored.
        p.client.send(b, b"in flight").expect("send");
        p.device.reset(b, "target closed");
        let to_device = p.client.poll_transmit(p.now).expect("data");
        p.pump();
        p.device.handle_frames(to_device.into(), p.now).expect("late data ignored");
        assert!(p.client_events.contains(&Event::FlowReset { flow: b, reason: "target closed".into() }));
        assert!(!p.client.has_flow(b));
    }

    #[test]
    fn stalled_flow_does_not_block_another() {
        let mut p = Pair::new(small_window());
        let stalled = p.client.open("a:1").expect("open");
        let live = p.client.open("b:1").expect("open");
        p.pump();
        p.device.accept(stalled).expect("accept");
        p.device.accept(live).expect("accept");
        p.pump();
        let chunk = vec![7u8; 1000];
        let mut stalled_sent = 0;
        let mut live_got = 0;
        for _ in 0..200 {
            stalled_sent += p.client.send(stalled, &chunk).expect("send");
            let n = p.client.send(live, &chunk).expect("send");
            p.pump();
            // The device application reads `live` but never `stalled`.
            live_got += p.device_data(live, true).len();
            assert!(n > 0, "live flow must never be blocked");
        }
        assert_eq!(stalled_sent, 4096, "stalled flow stops exactly at its window");
        assert_eq!(live_got, 200 * 1000);
        assert_eq!(p.device_data(stalled, false).len(), 4096);
        // The stalled flow resumes once consumed, with a FlowWritable event.
        p.device.consumed(stalled, 4096);
        p.pump();
        assert!(p.client_events.contains(&Event::FlowWritable { flow: stalled }));
        assert!(p.client.send_credit(stalled) > 0);
    }

    #[test]
    fn exceeding_credit_is_a_protocol_error() {
        let now = Instant::now();
        let mut device = Mux::new(Role::Responder, small_window(), now);
        let mut rec = Vec::new();
        Frame::Open { flow: 1, target: "x:1".into() }.encode(&mut rec);
        device.handle_frames(rec.into(), now).expect("open");
        device.accept(1).expect("accept");
        let mut rec = Vec::new();
        Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }.encode(&mut rec);
        device.handle_frames(rec.into(), now).expect("within window");
        let mut rec = Vec::new();
        Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 1]) }.encode(&mut rec);
        assert!(matches!(device.handle_frames(rec.into(), now), Err(SessionError::Protocol("flow credit exceeded"))));
        assert!(device.is_closed());
        // A Close frame telling the peer why is queued.
        let out = device.poll_transmit(now).expect("close frame");
        let mut r = FrameReader::new(out.into());
        assert!(matches!(r.next_frame(), Ok(Some(Frame::Close { .. }))));
    }

    #[test]
    fn many_flows_round_robin_and_window_bound() {
        let mut p = Pair::new(small_window());
        let flows: Vec<FlowId> = (0..20).map(|i| p.client.open(&format!("h:{i}")).expect("open")).collect();
        p.pump();
        for f in &flows {
            p.device.accept(*f).expect("accept");
        }
        p.pump();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = vec![0usize; flows.len()];
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); flows.len()];
        while sent.iter().any(|s| *s < data.len()) {
            for (i, f) in flows.iter().enumerate() {
                sent[i] += p.client.send(*f, &data[sent[i]..]).expect("send");
            }
            p.pump();
            for (i, f) in flows.iter().enumerate() {
                got[i].extend(p.device_data(*f, true));
            }
        }
        for g in got {
            assert_eq!(g, data);
        }
    }

    #[test]
    fn keepalive_ping_and_idle_timeout() {
        let mut p = Pair::new(MuxConfig::default());
        let t0 = p.now;
        assert_eq!(p.client.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        // Idle for 15 s: both send a Ping, both answer with a Pong.
        p.now = t0 + Duration::from_secs(15);
        p.client.handle_timeout(p.now);
        p.device.handle_timeout(p.now);
        assert!(p.client.wants_transmit());
        p.pump();
        assert!(!p.client.is_closed() && !p.device.is_closed());
        // Keep pinging every 15 s with pumping: never times out.
        for i in 2..10 {
            p.now = t0 + Duration::from_secs(15 * i);
            p.client.handle_timeout(p.now);
            p.device.handle_timeout(p.now);
            p.pump();
        }
        assert!(!p.client.is_closed());
        // Now the device goes silent: the client pings but hears nothing for 45 s.
        let silent_from = p.now;
        while let Some(t) = p.client.poll_timeout() {
            assert!(t >= p.now);
            p.now = t;
            p.client.handle_timeout(p.now);
            while p.client.poll_transmit(p.now).is_some() {}
        }
        assert_eq!(p.now, silent_from + Duration::from_secs(45));
        assert_eq!(p.client.poll_event(), Some(Event::Closed { reason: "keepalive timeout".into() }));
        assert!(p.client.open("x:1").is_err());
    }

    #[test]
    fn peer_close_ends_session() {
        let mut p = Pair::new(MuxConfig::default());
        let f = p.client.open("x:1").expect("open");
        p.pump();
        p.device.close("shutting down");
        p.pump();
        assert!(p.client_events.contains(&Event::Closed { reason: "shutting down".into() }));
        assert!(p.client.send(f, b"x").is_err());
    }

    #[test]
    fn flow_id_rules() {
        let now = Instant::now();
        let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
        let frame = |f: Frame| {
            let mut v = Vec::new();
            f.encode(&mut v);
            Bytes::from(v)
        };
        // Even ids belong to the device.
        assert!(device.handle_frames(frame(Frame::Open { flow: 2, target: "x".into() }), now).is_err());
        let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
        device.handle_frames(frame(Frame::Open { flow: 5, target: "x".into() }), now).expect("open");
        assert!(device.handle_frames(frame(Frame::Open { flow: 3, target: "x".into() }), now).is_err());
        let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
        assert!(device.handle_frames(frame(Frame::Data { flow: 9, bytes: Bytes::new() }), now).is_err());
    }

    /// Well-formed frames a hostile client may send: small flow ids so they hit live flows.
    fn hostile_frame() -> impl Strategy<Value = Frame> {
        let flow = (0u32..24).prop_map(|i| 2 * i + 1);
        prop_oneof![
            flow.clone().prop_map(|flow| Frame::Open { flow, target: "x:1".into() }),
            (flow.clone(), 0usize..3000).prop_map(|(flow, n)| Frame::Data { flow, bytes: Bytes::from(vec![1u8; n]) }),
            (flow.clone(), any::<u32>()).prop_map(|(flow, bytes)| Frame::Credit { flow, bytes }),
            flow.clone().prop_map(|flow| Frame::Reset { flow, reason: "r".into() }),
            flow.prop_map(|flow| Frame::Fin { flow }),
            any::<u64>().prop_map(|id| Frame::Ping { id }),
        ]
    }

    fn record(frames: &[Frame]) -> Bytes {
        let mut v = Vec::new();
        for f in frames {
            f.encode(&mut v);
        }
        Bytes::from(v)
    }

    fn frames_of(out: Vec<u8>) -> Vec<Frame> {
        let mut r = FrameReader::new(out.into());
        let mut v = Vec::new();
        while let Some(f) = r.next_frame().expect("own frames parse") {
            v.push(f);
        }
        v
    }

    #[test]
    fn too_many_peer_flows_is_abuse() {
        let now = Instant::now();
        let cfg = MuxConfig { max_peer_flows: 2, ..MuxConfig::default() };
        let mut device = Mux::new(Role::Responder, cfg.clone(), now);
        let opens: Vec<Frame> = [1, 3, 5].iter().map(|&flow| Frame::Open { flow, target: "x:1".into() }).collect();
        assert!(matches!(device.handle_frames(record(&opens), now), Err(SessionError::Limit(_))));
        assert!(device.is_closed());
        // A sender keeps to the same limit itself, so a well-behaved peer never gets there.
        let mut client = Mux::new(Role::Initiator, cfg, now);
        client.open("x:1").expect("first");
        client.open("x:1").expect("second");
        assert!(matches!(client.open("x:1"), Err(SessionError::Limit(_))));
        assert!(!client.is_closed(), "a local refusal does not end the session");
    }

    #[test]
    fn flows_come_back_to_the_limit_when_they_end() {
        let cfg = MuxConfig { max_peer_flows: 2, ..MuxConfig::default() };
        let mut p = Pair::new(cfg);
        for round in 0..5 {
            let a = p.client.open("a:1").expect("open a");
            let b = p.client.open("b:1").expect("open b");
            p.pump();
            p.device.refuse(a, "no").expect("refuse");
            p.device.accept(b).expect("accept");
            p.pump();
            p.client.reset(b, "done");
            p.pump();
            assert!(!p.device.is_closed() && !p.client.is_closed(), "round {round}");
        }
    }

    #[test]
    fn a_burst_of_pings_leaves_one_pong() {
        let t0 = Instant::now();
        let mut device = Mux::new(Role::Responder, MuxConfig::default(), t0);
        // A peer that pings (within the allowed rate) and never reads: one answer waits.
        for i in 0..100u64 {
            let pings: Vec<Frame> = (0..4).map(|j| Frame::Ping { id: i * 4 + j }).collect();
            device.handle_frames(record(&pings), t0 + Duration::from_millis(500 * i)).expect("pings");
            assert!(device.control_backlog() <= 1, "backlog {}", device.control_backlog());
            assert!(!device.is_backlogged());
        }
        // The one answer is to the newest Ping.
        let out = device.poll_transmit(t0).expect("pong");
        assert_eq!(frames_of(out), vec![Frame::Pong { id: 399 }]);
        assert!(device.poll_transmit(t0).is_none());
    }

    #[test]
    fn a_ping_flood_ends_the_session_for_abuse() {
        let t0 = Instant::now();
        let mut device = Mux::new(Role::Responder, MuxConfig::default(), t0);
        let burst: Vec<Frame> = (0..PING_BURST as u64).map(|id| Frame::Ping { id }).collect();
        device.handle_frames(record(&burst), t0).expect("a burst is fine");
        // One second later, PINGS_PER_SEC more are fine; one beyond is a flood.
        let later = t0 + Duration::from_secs(1);
        let more: Vec<Frame> = (0..PINGS_PER_SEC as u64).map(|id| Frame::Ping { id }).collect();
        device.handle_frames(record(&more), later).expect("the refill");
        let r = device.handle_frames(record(&[Frame::Ping { id: 9 }]), later);
        assert!(matches!(r, Err(SessionError::Limit(_))), "{r:?}");
        assert!(device.is_closed());
    }

    #[test]
    fn credit_grants_are_coalesced_per_flow() {
        let now = Instant::now();
        let mut device = Mux::new(Role::Responder, small_window(), now);
        device.handle_frames(record(&[Frame::Open { flow: 1, target: "x:1".into() }]), now).expect("open");
        device.accept(1).expect("accept");
        let _ = device.poll_transmit(now);
        device
            .handle_frames(record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }]), now)
            .expect("data");
        // The application consumes byte by byte, crossing the grant threshold many times.
        for _ in 0..4096 {
            device.consumed(1, 1);
        }
        assert_eq!(device.control_backlog(), 1);
        // Data past the original window is not yet allowed: the grant has not been sent.
        let more = record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 1]) }]);
        let mut probe = Mux::new(Role::Responder, small_window(), now);
        probe.handle_frames(record(&[Frame::Open { flow: 1, target: "x:1".into() }]), now).expect("open");
        probe.accept(1).expect("accept");
        probe
            .handle_frames(record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }]), now)
            .expect("data");
        probe.consumed(1, 4096);
        assert!(matches!(probe.handle_frames(more.clone(), now), Err(SessionError::Protocol("flow credit exceeded"))));
        // One Credit frame carries everything consumed.
        let out = device.poll_transmit(now).expect("credit");
        assert_eq!(frames_of(out), vec![Frame::Credit { flow: 1, bytes: 4096 }]);
        device.handle_frames(more, now).expect("within the granted window");
    }

    #[test]
    fn early_data_is_capped_per_session() {
        let cfg = MuxConfig { early_budget: 10_000, ..small_window() };
        let mut p = Pair::new(cfg.clone());
        let flows: Vec<FlowId> = (0..3).map(|i| p.client.open(&format!("h:{i}")).expect("open")).collect();
        let mut sent = 0;
        for f in &flows {
            sent += p.client.send(*f, &[5u8; 4096]).expect("send");
        }
        // The sender holds itself to the budget, even though each flow's window is 4096.
        assert_eq!(sent, 10_000);
        p.pump();
        assert!(!p.device.is_closed());
        // Accepting a flow gives its bytes back to the budget: the held-back flow may go on.
        p.device.accept(flows[0]).expect("accept");
        p.device.accept(flows[2]).expect("accept");
        p.pump();
        assert!(p.client_events.contains(&Event::FlowWritable { flow: flows[2] }));
        assert_eq!(p.client.send(flows[2], &[5u8; 4096]).expect("send"), 4096 - (10_000 - 2 * 4096));

        // A peer that does not keep to the budget is closed for abuse.
        let now = Instant::now();
        let mut device = Mux::new(Role::Responder, cfg, now);
        let mut frames = Vec::new();
        for flow in [1, 3, 5] {
            frames.push(Frame::Open { flow, target: "x:1".into() });
            frames.push(Frame::Data { flow, bytes: Bytes::from(vec![0u8; 4000]) });
        }
        assert!(matches!(device.handle_frames(record(&frames), now), Err(SessionError::Limit(_))));
    }

    #[test]
    fn refused_and_reset_flows_return_their_early_bytes() {
        let now = Instant::now();
        let cfg = MuxConfig { early_budget: 4096, ..small_window() };
        let mut device = Mux::new(Role::Responder, cfg, now);
        for round in 0..10u32 {
            let flow = 2 * round + 1;
            let data = Bytes::from(vec![0u8; 4096]);
            device
                .handle_frames(
                    record(&[Frame::Open { flow, target: "x:1".into() }, Frame::Data { flow, bytes: data }]),
                    now,
                )
                .expect("within budget");
            if round % 2 == 0 {
                device.refuse(flow, "no").expect("refuse");
            } else {
                device.handle_frames(record(&[Frame::Reset { flow, reason: "bye".into() }]), now).expect("reset");
            }
            while device.poll_transmit(now).is_some() {}
        }
    }

    #[test]
    fn unanswered_control_frames_ask_the_reader_to_pause() {
        let now = Instant::now();
        let cfg = MuxConfig { max_control_backlog: 8, ..MuxConfig::default() };
        let mut device = Mux::new(Role::Responder, cfg, now);
        let mut flow = 1;
        // Open, refused, open, refused...: each answer waits, as the peer never reads.
        while !device.is_backlogged() {
            device.handle_frames(record(&[Frame::Open { flow, target: "x:1".into() }]), now).expect("open");
            while device.poll_event().is_some() {}
            device.refuse(flow, "no").expect("refuse");
            flow += 2;
            assert!(flow < 100, "never backlogged");
        }
        assert_eq!(device.control_backlog(), 8);
        // Once the peer reads (we transmit), reading may go on.
        while device.poll_transmit(now).is_some() {}
        assert!(!device.is_backlogged());
    }

    proptest! {
        #[test]
        fn prop_garbage_frames_error_not_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let now = Instant::now();
            for role in [Role::Initiator, Role::Responder] {
                let mut m = Mux::new(role, small_window(), now);
                let _ = m.open("x:1");
                let _ = m.handle_frames(Bytes::from(data.clone()), now);
                while m.poll_transmit(now).is_some() {}
                while m.poll_event().is_some() {}
            }
        }

        /// A peer that never reads sends any well-formed frames; the application answers as npd
        /// does, and transmits only when the mux says it is backlogged (the driver pauses reading
        /// then). What waits to be sent stays bounded, however many records arrive.
        #[test]
        fn prop_a_peer_that_never_reads_leaves_a_bounded_backlog(
            records in proptest::collection::vec(proptest::collection::vec(hostile_frame(), 1..200), 1..40),
        ) {
            let now = Instant::now();
            let cfg = MuxConfig { initial_window: 4096, max_peer_flows: 8, max_control_backlog: 16, early_budget: 8192, ..MuxConfig::default() };
            let mut device = Mux::new(Role::Responder, cfg, now);
            for frames in records {
                if device.handle_frames(record(&frames), now).is_err() {
                    break;
                }
                while let Some(ev) = device.poll_event() {
                    match ev {
                        Event::FlowOpened { flow, .. } => {
                            let _ = if flow % 4 == 1 { device.refuse(flow, "no") } else { device.accept(flow) };
                        }
                        Event::FlowData { flow, bytes } => device.consumed(flow, bytes.len()),
                        _ => {}
                    }
                }
                // Under 16 before the record; it adds at most an answer and a grant per flow
                // (8) and one Pong.
                prop_assert!(device.control_backlog() <= 16 + 8 + 8 + 1, "backlog {}", device.control_backlog());
                if device.is_backlogged() {
                    while device.poll_transmit(now).is_some() {}
                }
            }
        }

        #[test]
        fn prop_credit_never_exceeded(sizes in proptest::collection::vec(1usize..10_000, 1..40), consume_every in 1usize..5) {
            let mut p = Pair::new(small_window());
            let f = p.client.open("x:1").expect("open");
            p.pump();
            p.device.accept(f).expect("accept");
            let mut unconsumed = 0usize;
            for (i, s) in sizes.iter().enumerate() {
                let _ = p.client.send(f, &vec![1u8; *s]).expect("send");
                p.pump(); // would panic on a credit violation
                unconsumed += p.device_data(f, false).len();
                prop_assert!(unconsumed <= 4096);
                if i % consume_every == 0 {
                    p.device.consumed(f, unconsumed);
                    unconsumed = 0;
                }
            }
        }
    }
}
