//! One session as a sans-IO connection, in the shape of quinn-proto's `Connection`: bytes from
//! the peer and the time go in; sealed records, events and the next deadline come out.
//!
//! It holds the [`Mux`], the [`Sealer`] and the [`Opener`], and owns everything between the
//! byte stream and the flows: record framing, the truncation rule (a session ends with a `Close`
//! frame; a bare end of stream is a truncation), keepalive timing, and each flow's received
//! bytes until the application takes them. The mux's credit is the only flow control: `send`
//! takes what the peer's credit allows, and taking received bytes grants credit back.
//!
//! A session can outlive its transport ([`MuxConfig::resume`]): every record carries (or a
//! timer sends) an `Ack` of the peer's records opened so far, sealed records are kept until
//! acknowledged, and when the transport breaks the connection is *suspended* rather than ended:
//! flows keep their state while the shell finds a new transport and calls
//! [`Connection::resume`], which runs the exchange of [`crate::resume`] and resends exactly the
//! records the peer lacks. Acknowledgements are sent whether or not this side resumes.
//!
//! No tokio, no clock reads, no sockets: the driver (`driver.rs`, for `np forward` and `npd`)
//! and `np up`'s bridge are shells that move bytes between a socket and this.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::Frame;
use crate::handshake::Role;
use crate::mux::{AssocId, AssocStats, Event, FlowId, Mux, MuxConfig, Pull, UdpCounters};
use crate::record::{Opener, Sealer, HEADER_LEN, MAX_RECORD_PLAINTEXT, TAG_LEN};
use crate::resume::{Exchange, ResumeConfig, ResumeKey, Step};
use crate::retain::Retained;
use crate::{SessionError, SessionKeys};

/// Bytes of the peer's records opened past which an `Ack` is sent at once, in a record of its
/// own if nothing else is going out. Acks ride on every record sent anyway, so this only
/// matters for a one-way transfer whose receiver sends little; an eighth of the default
/// retain limit keeps the sender well clear of its limit (one 9-byte frame per 1 MiB).
const ACK_BYTES: usize = 1 << 20;
/// How long an `Ack` may wait for a record to ride on: an idle receiver still lets the sender
/// forget what it keeps (and a sender with a small retain limit is never stuck on it).
const ACK_DELAY: Duration = Duration::from_millis(200);
/// Received chunks shorter than this are copied into the flow's queue; longer ones stay slices
/// of the decrypted record. A slice keeps the whole receive buffer it came from alive, so a peer
/// sending one byte per record on many unread flows could otherwise make each byte of credit
/// pin a buffer; at this size a queued chunk pins at most a few times its own length.
const COPY_BELOW: usize = MAX_RECORD_PLAINTEXT / 4;

/// Something the application must react to.
#[derive(Debug, Clone)]
pub enum ConnEvent {
    /// The peer asks to open a flow to `target`: [`Connection::accept`] or [`Connection::refuse`].
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
    /// Bytes (or the peer's Fin) are waiting in [`Connection::recv`]. Sent when a flow's queue
    /// goes from empty to not empty, so read until [`Recv::Empty`] after it.
    Readable {
        /// The flow.
        flow: FlowId,
    },
    /// A flow whose `send` was cut short by credit may send again.
    Writable {
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
    /// The client opened a UDP association (device side): send its datagrams to `target`, or
    /// refuse it with [`Connection::udp_close`].
    UdpOpened {
        /// The association.
        assoc: AssocId,
        /// `host:port`.
        target: String,
    },
    /// A whole datagram of an association.
    Datagram {
        /// The association.
        assoc: AssocId,
        /// The payload.
        bytes: Bytes,
    },
    /// The association ended (the peer's close, idle, evicted); it no longer exists.
    UdpClosed {
        /// The association.
        assoc: AssocId,
        /// Why.
        reason: String,
    },
    /// The session is over: [`SessionError::Closed`] for an orderly end, anything else for a
    /// failure (tampering, truncation, abuse, timeout). Every flow is gone.
    Ended {
        /// Why.
        error: SessionError,
    },
}

impl PartialEq for ConnEvent {
    fn eq(&self, other: &Self) -> bool {
        use ConnEvent::*;
        match (self, other) {
            (FlowOpened { flow: a, target: x }, FlowOpened { flow: b, target: y }) => a == b && x == y,
            (FlowAccepted { flow: a }, FlowAccepted { flow: b })
            | (Readable { flow: a }, Readable { flow: b })
            | (Writable { flow: a }, Writable { flow: b }) => a == b,
            (FlowRefused { flow: a, reason: x }, FlowRefused { flow: b, reason: y })
            | (FlowReset { flow: a, reason: x }, FlowReset { flow: b, reason: y })
            | (UdpOpened { assoc: a, target: x }, UdpOpened { assoc: b, target: y })
            | (UdpClosed { assoc: a, reason: x }, UdpClosed { assoc: b, reason: y }) => a == b && x == y,
            (Datagram { assoc: a, bytes: x }, Datagram { assoc: b, bytes: y }) => a == b && x == y,
            // Errors carry an `io::Error`, which has no equality: compare what they say.
            (Ended { error: a }, Ended { error: b }) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// What [`Connection::recv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were taken.
    Data(usize),
    /// The peer finished the flow and every byte has been taken. The flow's receive side is
    /// gone; do not ask again.
    Fin,
    /// Nothing yet: a [`ConnEvent::Readable`] follows when there is.
    Empty,
}

/// What [`Connection::recv_bytes`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Received bytes (never empty).
    Data(Bytes),
    /// The peer finished the flow: no more data.
    Fin,
    /// Nothing yet: a [`ConnEvent::Readable`] follows when there is.
    Empty,
}

/// A flow's received bytes not yet taken.
#[derive(Debug, Default)]
struct Inbox {
    chunks: VecDeque<Bytes>,
    fin: bool,
    /// The application will never read this flow: take what arrives at once (granting credit so
    /// the peer can reach its Fin) and drop it.
    discard: bool,
}

impl Inbox {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && !self.fin
    }
}

/// Where a connection's transport stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportState {
    /// Records flow.
    Live,
    /// The transport broke (or a resume attempt failed): give the connection a new one with
    /// [`Connection::resume`] before [`Connection::poll_timeout`] passes, or the session ends.
    Suspended,
    /// A resume exchange is under way on a new transport.
    Resuming,
}

enum Transport {
    Live,
    Suspended { since: Instant },
    Resuming { since: Instant, exchange: Exchange },
}

/// The sans-IO session. See the module docs.
pub struct Connection {
    role: Role,
    mux: Mux,
    sealer: Sealer,
    opener: Opener,
    inboxes: HashMap<FlowId, Inbox>,
    events: VecDeque<ConnEvent>,
    ended: Option<SessionError>,
    /// Records sealed and bytes of plaintext moved, for tests and metrics.
    stats: ConnStats,
    resume: Option<ResumeConfig>,
    resume_key: Option<ResumeKey>,
    transport: Transport,
    /// Records sealed and not yet acknowledged (empty unless `resume` is set; the count of the
    /// peer's acknowledgements is checked either way).
    retained: Retained,
    /// Bytes to send before any new record: the resume exchange's messages, resent records.
    pending: VecDeque<Bytes>,
    /// The count of the peer's records our latest `Ack` (or resume proof) told it about.
    ack_sent: u64,
    /// Plaintext opened since then, and when the first of it was.
    unacked_bytes: usize,
    unacked_since: Option<Instant>,
    /// An `Ack` is due now, in a record of its own if need be.
    ack_now: bool,
    /// Why the last resume attempt failed, for the shell's logs.
    resume_error: Option<SessionError>,
    /// The latest time given to any call: when a transport was lost, for the calls that are not
    /// given the time.
    clock: Instant,
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Records sealed.
    pub records_sent: u64,
    /// Records opened.
    pub records_received: u64,
    /// Resumes completed.
    pub resumes: u64,
    /// Records resent by resumes.
    pub records_resent: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("flows", &self.inboxes.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection for the side whose handshake produced `keys`.
    pub fn new(keys: &SessionKeys, config: MuxConfig, now: Instant) -> Connection {
        let sealer = Sealer::with_counter(keys.send_key(), 0, config.records_per_key);
        let opener = Opener::with_counter(keys.recv_key(), 0, config.records_per_key);
        let resume = config.resume;
        let resume_key = match resume {
            Some(_) => ResumeKey::derive(keys)
                .inspect_err(|e| tracing::warn!(error = %e, "no resume key: this session cannot resume"))
                .ok(),
            None => None,
        };
        Connection {
            role: keys.role(),
            mux: Mux::new(keys.role(), config, now),
            sealer,
            opener,
            inboxes: HashMap::new(),
            events: VecDeque::new(),
            ended: None,
            stats: ConnStats::default(),
            resume,
            resume_key,
            transport: Transport::Live,
            retained: Retained::default(),
            pending: VecDeque::new(),
            ack_sent: 0,
            unacked_bytes: 0,
            unacked_since: None,
            ack_now: false,
            resume_error: None,
            clock: now,
        }
    }

    /// The session's tunables.
    pub fn config(&self) -> &MuxConfig {
        self.mux.config()
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    // ---- input ----

    /// Bytes read from the peer.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        // Late bytes of a transport already given up are not part of the stream any more.
        if self.ended.is_some() || matches!(self.transport, Transport::Suspended { .. }) {
            return;
        }
        self.opener.push(bytes);
        self.process_input(now);
    }

    /// The receive buffer, to read from a socket straight into it (append only, e.g. tokio's
    /// `try_read_buf`); then call [`Connection::process_input`]. Saves [`Connection::handle_input`]'s copy.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        self.opener.recv_buffer()
    }

    /// Lends out the receive buffer, so a reader can fill it while the connection is used
    /// elsewhere (a reader task reading without holding the session's lock). Give it back with
    /// [`Connection::handle_input_buffer`]; bytes received meanwhile are an error of the caller.
    pub fn lend_input_buffer(&mut self) -> BytesMut {
        std::mem::take(self.opener.recv_buffer())
    }

    /// Takes back the buffer from [`Connection::lend_input_buffer`], with what was read into
    /// it appended, and processes it.
    pub fn handle_input_buffer(&mut self, buf: BytesMut, now: Instant) {
        self.opener.give_back_buffer(buf);
        if self.ended.is_some() || matches!(self.transport, Transport::Suspended { .. }) {
            self.opener.discard_partial();
            return;
        }
        self.process_input(now);
    }

    /// Opens and handles every complete record in the receive buffer.
    pub fn process_input(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if !self.advance_resume(now) {
            return;
        }
        while self.ended.is_none() {
            match self.opener.next() {
                Ok(Some(record)) => {
                    self.stats.records_received += 1;
                    // A record of nothing but an `Ack` is acknowledged only by the next record
                    // that goes anyway: answering it would make two idle peers trade Acks
                    // forever (QUIC's "ack-eliciting" rule).
                    if !crate::frame::is_ack_only(&record) {
                        self.unacked_bytes += record.len();
                        self.unacked_since.get_or_insert(now);
                        if self.unacked_bytes >= ACK_BYTES {
                            self.ack_now = true;
                        }
                    }
                    if let Err(e) = self.mux.handle_frames(record.freeze(), now) {
                        self.drain_mux();
                        self.end(e);
                        return;
                    }
                    self.drain_mux();
                }
                Ok(None) => return,
                Err(e) => {
                    self.end(e);
                    return;
                }
            }
        }
    }

    /// The peer's end of stream. Orderly only after the peer's `Close`; otherwise the session
    /// was cut ([`SessionError::Truncated`]), maybe by an attacker hiding the rest.
    ///
    /// A session that resumes is suspended instead (the peer resends the rest on the next
    /// transport; a truncation by an attacker is no different from a relay that died).
    pub fn handle_eof(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let err = match self.opener.finish() {
            Err(e) => e,
            Ok(()) => SessionError::Truncated,
        };
        self.transport_lost(err, self.clock);
    }

    /// The transport failed. A session that resumes is suspended instead.
    pub fn handle_io_error(&mut self, err: std::io::Error) {
        self.transport_lost(err.into(), self.clock);
    }

    // ---- resumption ----

    /// Where the transport stands.
    pub fn transport_state(&self) -> TransportState {
        match self.transport {
            Transport::Live => TransportState::Live,
            Transport::Suspended { .. } => TransportState::Suspended,
            Transport::Resuming { .. } => TransportState::Resuming,
        }
    }

    /// Since when the session has been without a working transport, if it is.
    pub fn suspended_since(&self) -> Option<Instant> {
        match self.transport {
            Transport::Live => None,
            Transport::Suspended { since } | Transport::Resuming { since, .. } => Some(since),
        }
    }

    /// Why the latest resume attempt failed (the shell logs it and tries another transport).
    pub fn resume_error(&self) -> Option<&SessionError> {
        self.resume_error.as_ref()
    }

    /// Bytes of sealed records kept until the peer acknowledges them.
    pub fn retained_bytes(&self) -> usize {
        self.retained.bytes()
    }

    /// Can this session resume (it is configured to, and has not ended)?
    pub fn is_resumable(&self) -> bool {
        self.ended.is_none() && self.resume.is_some() && self.resume_key.is_some()
    }

    /// Starts resuming on a new transport: what the old one still held is forgotten, and the
    /// next transmit is this side's resume `Hello`. Called while suspended, or while live to move
    /// to another transport at once (the old one is then given up), or while resuming to start
    /// over on yet another transport.
    pub fn resume(&mut self, now: Instant) -> Result<(), SessionError> {
        self.check()?;
        if !self.is_resumable() {
            return Err(SessionError::ResumeRefused("this session does not keep records to resend"));
        }
        let since = self.suspended_since().unwrap_or(now);
        let (exchange, hello) = Exchange::start(self.role, self.opener.counter())?;
        self.opener.discard_partial();
        self.pending.clear();
        self.pending.push_back(Bytes::from(hello));
        self.transport = Transport::Resuming { since, exchange };
        self.mux.set_data_paused(true);
        tracing::debug!(opened = self.opener.counter(), sealed = self.sealer.counter(), "resuming");
        Ok(())
    }

    /// Runs the resume exchange on what has arrived. Returns whether records may be opened.
    fn advance_resume(&mut self, now: Instant) -> bool {
        loop {
            let Transport::Resuming { exchange, .. } = &mut self.transport else {
                return matches!(self.transport, Transport::Live) && self.ended.is_none();
            };
            let Some(key) = &self.resume_key else {
                return false;
            };
            match exchange.handle_input(key, self.opener.recv_buffer()) {
                Ok(Step::Wait) => return false,
                Ok(Step::SendProof(proof)) => self.pending.push_back(Bytes::from(proof)),
                Ok(Step::Done { peer_opened }) => self.resumed(peer_opened, now),
                Err(e) => {
                    tracing::debug!(error = %e, "resume attempt failed");
                    let since = self.suspended_since().unwrap_or(now);
                    self.transport = Transport::Suspended { since };
                    self.pending.clear();
                    self.opener.discard_partial();
                    self.resume_error = Some(e);
                    return false;
                }
            }
        }
    }

    /// The peer proved itself and has opened `peer_opened` of our records: resend the rest.
    fn resumed(&mut self, peer_opened: u64, now: Instant) {
        let Transport::Resuming { since, exchange } = std::mem::replace(&mut self.transport, Transport::Live) else {
            return;
        };
        // An honest peer's count lies between its last acknowledgement and what we sealed; a
        // peer with the session's keys that claims otherwise is broken, and resending could
        // not help.
        if peer_opened > self.sealer.counter() {
            self.end(SessionError::Protocol("the peer resumed after a record never sent"));
            return;
        }
        if peer_opened < self.retained.acked() {
            self.end(SessionError::Protocol("the peer resumed from before its own acknowledgement"));
            return;
        }
        self.retained.ack(peer_opened);
        let resent: usize = self.retained.all().map(|b| b.len()).sum();
        self.stats.records_resent += self.sealer.counter() - peer_opened;
        self.pending.extend(self.retained.all());
        self.ack_sent = exchange.opened();
        self.mux.touch(now);
        self.stats.resumes += 1;
        self.resume_error = None;
        self.update_pause();
        tracing::debug!(
            resent_records = self.sealer.counter() - peer_opened,
            resent_bytes = resent,
            suspended_ms = now.saturating_duration_since(since).as_millis() as u64,
            "session resumed"
        );
    }

    /// The transport is gone: suspend if the session can resume, else end.
    fn transport_lost(&mut self, err: SessionError, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        if !self.is_resumable() {
            self.end(err);
            return;
        }
        match self.transport {
            Transport::Live => {
                tracing::debug!(error = %err, "transport lost: session suspended");
                self.transport = Transport::Suspended { since: now };
            }
            Transport::Resuming { since, .. } => {
                tracing::debug!(error = %err, "transport lost while resuming");
                self.transport = Transport::Suspended { since };
                self.resume_error = Some(err);
            }
            Transport::Suspended { .. } => {}
        }
        self.pending.clear();
        self.opener.discard_partial();
        self.mux.set_data_paused(true);
        // A session may wait out its whole resume window (its client gone for good, as often as
        // not): it keeps what it must resend and nothing else. Spare buffers of a bulk transfer
        // came to 5 MB a session; npd held 130 MB after a benchmark's sessions were left
        // suspended.
        self.opener.shed_spares();
        self.retained.shed_spares();
    }

    /// Are sealed records kept? Not once the session ended: nothing will be resent.
    fn retaining(&self) -> bool {
        self.resume.is_some() && self.ended.is_none()
    }

    /// Data goes out only while live and within the retain limit.
    fn update_pause(&mut self) {
        let over = self.resume.is_some_and(|r| self.retained.bytes() >= r.retain_limit);
        self.mux.set_data_paused(over || !matches!(self.transport, Transport::Live));
    }

    // ---- output ----

    /// Appends sealed records to `buf` until at least `max` bytes are in it or nothing more is
    /// pending. Returns how many bytes were appended.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>, max: usize) -> usize {
        self.poll_transmit_with(now, buf, max, &mut |_, _, _| 0)
    }

    /// [`Connection::poll_transmit`], pulling the bytes of flows in pull mode
    /// ([`Connection::offer`]) straight from the application's buffers into the records through
    /// `pull` (see [`Mux::poll_transmit_with`](crate::mux::Mux::poll_transmit_with)).
    ///
    /// A session that resumes keeps a copy of what it seals here; the shells that move many
    /// bytes use [`Connection::poll_transmit_bytes`] instead, which keeps them without a copy.
    pub fn poll_transmit_with(&mut self, now: Instant, buf: &mut Vec<u8>, max: usize, pull: &mut Pull<'_>) -> usize {
        let begin = buf.len();
        while buf.len() < max {
            let Some(bytes) = self.pending.pop_front() else { break };
            buf.extend_from_slice(&bytes);
        }
        if !self.pending.is_empty() {
            return buf.len() - begin;
        }
        let start = buf.len();
        let first = self.sealer.counter();
        self.seal_records(now, buf, max, pull);
        if self.retaining() && buf.len() > start {
            self.retained.push(first, self.sealer.counter() - first, Bytes::copy_from_slice(&buf[start..]));
            self.update_pause();
        }
        buf.len() - begin
    }

    /// What to write to the transport next, at least about `max` bytes if that much is pending
    /// (it may be less: one call returns one piece): the resume exchange, resent records, or
    /// newly sealed ones. The records are kept for a resume without a copy (this and the
    /// retained copy share the buffer).
    pub fn poll_transmit_bytes(&mut self, now: Instant, max: usize) -> Option<Bytes> {
        if let Some(bytes) = self.pending.pop_front() {
            return Some(bytes);
        }
        if !self.wants_transmit() {
            // Not even a buffer to make.
            return None;
        }
        // One record may go past `max`; a huge `max` still starts with a sane allocation.
        // A spent batch of at least this size is sealed into again (later calls of a write ask
        // for less).
        let capacity = max.min(1 << 20) + HEADER_LEN + MAX_RECORD_PLAINTEXT + TAG_LEN;
        let mut buf = self.retained.reusable(capacity).unwrap_or_else(|| Vec::with_capacity(capacity));
        let first = self.sealer.counter();
        self.seal_records(now, &mut buf, max, &mut |_, _, _| 0);
        if buf.is_empty() {
            return None;
        }
        let bytes = Bytes::from(buf);
        if self.retaining() {
            self.retained.push(first, self.sealer.counter() - first, bytes.clone());
            self.update_pause();
        }
        Some(bytes)
    }

    /// Seals records of what the mux has to send (and any `Ack` due) into `buf` until `max`.
    fn seal_records(&mut self, now: Instant, buf: &mut Vec<u8>, max: usize, pull: &mut Pull<'_>) {
        self.clock = self.clock.max(now);
        if !matches!(self.transport, Transport::Live) {
            return;
        }
        while buf.len() < max {
            let start = buf.len();
            buf.extend_from_slice(&[0u8; HEADER_LEN]);
            // Every record tells the peer how far we have opened, when that moved: it lets the
            // peer forget what it keeps, at 9 bytes a record.
            let opened = self.opener.counter();
            let ack = opened > self.ack_sent && self.ended.is_none();
            if ack {
                Frame::Ack { records: opened }.encode(buf);
            }
            let room = MAX_RECORD_PLAINTEXT - (buf.len() - start - HEADER_LEN);
            let wrote = self.mux.poll_transmit_with(now, buf, room, pull);
            // A lone Ack goes only when due; otherwise it waits to ride on the next record.
            let lone_ack_due = ack && self.ack_now;
            if !(wrote || lone_ack_due) {
                buf.truncate(start);
                break;
            }
            if ack {
                self.ack_sent = opened;
                self.unacked_bytes = 0;
                self.unacked_since = None;
                self.ack_now = false;
            }
            buf.extend_from_slice(&[0u8; TAG_LEN]);
            let sealed = match buf.get_mut(start..) {
                Some(record) => self.sealer.seal_in_slice(record),
                None => Err(SessionError::Truncated),
            };
            if let Err(e) = sealed {
                buf.truncate(start);
                self.end(e);
                break;
            }
            self.stats.records_sent += 1;
        }
    }

    /// Is anything waiting for [`Connection::poll_transmit`]?
    pub fn wants_transmit(&self) -> bool {
        !self.pending.is_empty()
            || (matches!(self.transport, Transport::Live)
                && (self.mux.wants_transmit() || (self.ack_now && self.opener.counter() > self.ack_sent)))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] should next run; `None` once ended.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        if let (Some(since), Some(r)) = (self.suspended_since(), self.resume) {
            return Some(since + r.window);
        }
        let ack = self.unacked_since.filter(|_| !self.ack_now).map(|t| t + ACK_DELAY);
        match (self.mux.poll_timeout(), ack) {
            (Some(m), Some(a)) => Some(m.min(a)),
            (m, a) => m.or(a),
        }
    }

    /// Runs the timers: keepalives, a delayed `Ack`, the resume window.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if self.ended.is_some() {
            return;
        }
        if let (Some(since), Some(r)) = (self.suspended_since(), self.resume) {
            if now >= since + r.window {
                self.end(SessionError::ResumeExpired(r.window.as_secs()));
            }
            return;
        }
        if self.is_resumable() && self.mux.idle_expired(now) {
            // Nothing heard for the idle timeout: the transport is dead even if the socket
            // has not said so; the shell finds another.
            self.transport_lost(SessionError::Closed("keepalive timeout".into()), now);
            return;
        }
        if self.unacked_since.is_some_and(|t| now >= t + ACK_DELAY) {
            self.ack_now = true;
        }
        self.mux.handle_timeout(now);
        self.drain_mux();
        // Timers fire when the session is quiet; reads are rare then.
        self.opener.shed_spares();
        self.retained.shed_spares();
    }

    /// Should the shell read more from the peer? Not once ended, and not while so many answers
    /// are queued that the peer is evidently not reading ours (reading on would let it make us
    /// queue without bound; pausing pushes back on its writes).
    pub fn wants_input(&self) -> bool {
        self.ended.is_none() && !self.mux.is_backlogged() && !matches!(self.transport, Transport::Suspended { .. })
    }

    /// Has the session ended, and is everything (the final `Close`) transmitted? Then the
    /// shell shuts the stream down.
    pub fn is_drained(&self) -> bool {
        self.ended.is_some()
            && (!matches!(self.transport, Transport::Live) || (self.pending.is_empty() && !self.mux.wants_transmit()))
    }

    /// Why the session ended, if it has.
    pub fn error(&self) -> Option<&SessionError> {
        self.ended.as_ref()
    }

    /// Ends the session: a `Close` carrying `reason` is the last record transmitted, and every
    /// flow is gone.
    pub fn close(&mut self, reason: &str) {
        self.end(SessionError::Closed(reason.to_owned()));
    }

    // ---- flows ----

    /// Opens a flow to `target` (`host:port`). Data may be sent at once, within the early
    /// budget; [`ConnEvent::FlowAccepted`] or [`ConnEvent::FlowRefused`] follows.
    pub fn open(&mut self, target: &str) -> Result<FlowId, SessionError> {
        self.check()?;
        self.mux.open(target)
    }

    /// Accepts a flow the peer opened.
    pub fn accept(&mut self, flow: FlowId) -> Result<(), SessionError> {
        self.check()?;
        self.mux.accept(flow)
    }

    /// Refuses a flow the peer opened.
    pub fn refuse(&mut self, flow: FlowId, reason: &str) -> Result<(), SessionError> {
        self.check()?;
        self.inboxes.remove(&flow);
        self.mux.refuse(flow, reason)
    }

    /// Queues as much of `data` as the flow's credit allows; returns how much that was. When
    /// less than all, a [`ConnEvent::Writable`] follows once the peer grants more.
    pub fn send(&mut self, flow: FlowId, data: &[u8]) -> Result<usize, SessionError> {
        self.check()?;
        self.mux.send(flow, data)
    }

    /// [`Connection::send`] for owned bytes: what credit allows is split off the front of `data`
    /// and queued without a copy; returns how much that was.
    pub fn send_bytes(&mut self, flow: FlowId, data: &mut Bytes) -> Result<usize, SessionError> {
        self.check()?;
        self.mux.send_bytes(flow, data)
    }

    /// Pull mode instead of [`Connection::send`]: the application holds `available` bytes of
    /// `flow` in its own buffer, to be pulled into records by
    /// [`Connection::poll_transmit_with`] as credit allows (one copy fewer than `send`).
    pub fn offer(&mut self, flow: FlowId, available: u64) -> Result<(), SessionError> {
        self.check()?;
        self.mux.offer(flow, available)
    }

    /// Bytes `send` would take on this flow now.
    pub fn send_credit(&self, flow: FlowId) -> u64 {
        self.mux.send_credit(flow)
    }

    /// Asks for a [`ConnEvent::Writable`] once the flow has credit again, for a caller that
    /// checks [`Connection::send_credit`] before reading its source rather than offering bytes
    /// `send` may refuse. A no-op while the flow has credit.
    pub fn want_writable(&mut self, flow: FlowId) {
        if self.ended.is_none() && self.mux.send_credit(flow) == 0 {
            // Offered with no credit, a byte is refused and the mux remembers to report the
            // next grant: exactly the flag this needs.
            let _ = self.mux.send(flow, &[0]);
        }
    }

    /// Hands `f` the flow's received bytes, chunk by chunk, until it takes less than it was
    /// given; `f` returns how many it took. Credit for what was taken goes back to the peer.
    pub fn recv_with(&mut self, flow: FlowId, mut f: impl FnMut(&[u8]) -> usize) -> Result<Recv, SessionError> {
        self.check()?;
        let Some(inbox) = self.inboxes.get_mut(&flow) else {
            return if self.mux.has_flow(flow) { Ok(Recv::Empty) } else { Err(SessionError::UnknownFlow(flow)) };
        };
        let mut taken = 0;
        while let Some(front) = inbox.chunks.front_mut() {
            let n = f(front).min(front.len());
            front.advance(n);
            taken += n;
            if !front.is_empty() {
                break;
            }
            inbox.chunks.pop_front();
        }
        let result = if taken > 0 {
            Recv::Data(taken)
        } else if inbox.chunks.is_empty() && inbox.fin {
            self.inboxes.remove(&flow);
            Recv::Fin
        } else {
            Recv::Empty
        };
        if taken > 0 {
            self.mux.consumed(flow, taken);
        }
        Ok(result)
    }

    /// The flow's next received chunk, handed over whole (a slice of the opened record, no
    /// copy). Credit for it goes back to the peer at once, so a caller holds at most one chunk
    /// per call beyond the window: write it out before asking for the next.
    pub fn recv_bytes(&mut self, flow: FlowId) -> Result<Chunk, SessionError> {
        self.check()?;
        let Some(inbox) = self.inboxes.get_mut(&flow) else {
            return if self.mux.has_flow(flow) { Ok(Chunk::Empty) } else { Err(SessionError::UnknownFlow(flow)) };
        };
        match inbox.chunks.pop_front() {
            Some(bytes) => {
                self.mux.consumed(flow, bytes.len());
                Ok(Chunk::Data(bytes))
            }
            None if inbox.fin => {
                self.inboxes.remove(&flow);
                Ok(Chunk::Fin)
            }
            None => Ok(Chunk::Empty),
        }
    }

    /// Copies received bytes into `buf`.
    pub fn recv(&mut self, flow: FlowId, buf: &mut [u8]) -> Result<Recv, SessionError> {
        let mut filled = 0;
        self.recv_with(flow, |chunk| {
            let n = chunk.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            n
        })
    }

    /// Bytes received on the flow and not yet taken.
    pub fn recv_pending(&self, flow: FlowId) -> usize {
        self.inboxes.get(&flow).map_or(0, |i| i.chunks.iter().map(Bytes::len).sum())
    }

    /// Half-closes our direction of the flow once what is queued has gone (a Fin).
    pub fn finish(&mut self, flow: FlowId) -> Result<(), SessionError> {
        self.check()?;
        self.mux.finish(flow)
    }

    /// Aborts the flow in both directions (a Reset to the peer). Unknown flows are ignored.
    pub fn abort(&mut self, flow: FlowId, reason: &str) {
        self.inboxes.remove(&flow);
        if self.ended.is_none() {
            self.mux.reset(flow, reason);
        }
    }

    /// The application will read nothing more from this flow (it finished its side and went
    /// away): what is queued is dropped, what arrives is dropped at once with its credit
    /// granted back, so the peer can still send its Fin.
    pub fn discard(&mut self, flow: FlowId) {
        let pending = self.recv_pending(flow);
        if !self.mux.has_flow(flow) {
            self.inboxes.remove(&flow);
            return;
        }
        let inbox = self.inboxes.entry(flow).or_default();
        inbox.chunks.clear();
        inbox.discard = true;
        if inbox.fin {
            self.inboxes.remove(&flow);
        }
        self.mux.consumed(flow, pending);
    }

    /// Does the flow still exist (in the mux, or with bytes waiting)?
    pub fn has_flow(&self, flow: FlowId) -> bool {
        self.mux.has_flow(flow) || self.inboxes.contains_key(&flow)
    }

    // ---- UDP associations ----

    /// Does this session carry UDP (negotiated at the handshake)?
    pub fn has_udp(&self) -> bool {
        self.mux.config().udp
    }

    /// Opens a UDP association to `target` (`host:port`); see [`Mux::udp_open`].
    pub fn udp_open(&mut self, target: &str, now: Instant) -> Result<AssocId, SessionError> {
        self.check()?;
        let r = self.mux.udp_open(target, now);
        // An eviction may have queued an event.
        self.drain_mux();
        r
    }

    /// Queues one datagram; `false` if it was dropped (and counted).
    pub fn udp_send(&mut self, assoc: AssocId, bytes: Bytes, now: Instant) -> bool {
        self.ended.is_none() && self.mux.udp_send(assoc, bytes, now)
    }

    /// Ends (or, on the device, refuses) an association.
    pub fn udp_close(&mut self, assoc: AssocId, reason: &str) {
        if self.ended.is_none() {
            self.mux.udp_close(assoc, reason);
        }
    }

    /// Does the association exist?
    pub fn has_assoc(&self, assoc: AssocId) -> bool {
        self.mux.has_assoc(assoc)
    }

    /// What each live association carried.
    pub fn udp_stats(&self) -> Vec<AssocStats> {
        self.mux.udp_stats()
    }

    /// Session-wide UDP counters (drops, expiries, evictions).
    pub fn udp_counters(&self) -> UdpCounters {
        self.mux.udp_counters()
    }

    // ---- internals ----

    fn check(&self) -> Result<(), SessionError> {
        match &self.ended {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn end(&mut self, err: SessionError) {
        if self.ended.is_some() {
            return;
        }
        tracing::debug!(error = %err, "session ended");
        // Tells the peer why (a no-op if it closed first); the Close is the last record out.
        match &err {
            SessionError::Closed(reason) => self.mux.close(reason),
            other => self.mux.close(&other.to_string()),
        }
        self.inboxes.clear();
        self.retained.clear();
        if !matches!(self.transport, Transport::Live) {
            // No transport to say goodbye on.
            self.pending.clear();
        }
        self.ended = Some(err.clone());
        self.events.push_back(ConnEvent::Ended { error: err });
    }

    fn drain_mux(&mut self) {
        while let Some(ev) = self.mux.poll_event() {
            match ev {
                Event::FlowOpened { flow, target } => self.events.push_back(ConnEvent::FlowOpened { flow, target }),
                Event::FlowAccepted { flow } => self.events.push_back(ConnEvent::FlowAccepted { flow }),
                Event::FlowRefused { flow, reason } => {
                    self.inboxes.remove(&flow);
                    self.events.push_back(ConnEvent::FlowRefused { flow, reason });
                }
                Event::FlowData { flow, bytes } => {
                    let inbox = self.inboxes.entry(flow).or_default();
                    if inbox.discard {
                        self.mux.consumed(flow, bytes.len());
                        continue;
                    }
                    let was_empty = inbox.is_empty();
                    let bytes = if bytes.len() < COPY_BELOW { Bytes::copy_from_slice(&bytes) } else { bytes };
                    inbox.chunks.push_back(bytes);
                    if was_empty {
                        self.events.push_back(ConnEvent::Readable { flow });
                    }
                }
                Event::FlowFin { flow } => {
                    let inbox = self.inboxes.entry(flow).or_default();
                    if inbox.discard {
                        self.inboxes.remove(&flow);
                        continue;
                    }
                    let was_empty = inbox.is_empty();
                    inbox.fin = true;
                    if was_empty {
                        self.events.push_back(ConnEvent::Readable { flow });
                    }
                }
                Event::FlowReset { flow, reason } => {
                    self.inboxes.remove(&flow);
                    self.events.push_back(ConnEvent::FlowReset { flow, reason });
                }
                Event::FlowWritable { flow } => self.events.push_back(ConnEvent::Writable { flow }),
                Event::UdpOpened { assoc, target } => self.events.push_back(ConnEvent::UdpOpened { assoc, target }),
                Event::Datagram { assoc, bytes } => {
                    // A copy, so a queued datagram never pins the whole record it came in.
                    let bytes = if bytes.len() < COPY_BELOW { Bytes::copy_from_slice(&bytes) } else { bytes };
                    self.events.push_back(ConnEvent::Datagram { assoc, bytes });
                }
                Event::UdpClosed { assoc, reason } => self.events.push_back(ConnEvent::UdpClosed { assoc, reason }),
                Event::Acked { records } => {
                    if records > self.sealer.counter() {
                        self.end(SessionError::Protocol("acknowledgement of a record never sent"));
                        return;
                    }
                    self.retained.ack(records);
                    self.update_pause();
                }
                Event::Closed { reason } => self.end(SessionError::Closed(reason)),
            }
        }
    }
}

#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod tests;
