//! The pure core: smoltcp terminating the TCP flows that arrive from the TUN, with no IO and no
//! clock of its own. Packets go in with [`Stack::handle_packet`], packets to write to the TUN
//! come out of [`Stack::poll_transmit`], what happened comes out of [`Stack::poll_event`], and
//! [`Stack::poll_at`] says when to call [`Stack::handle_timeout`].
//!
//! # The deferred SYN-ACK
//!
//! A SYN to a mapped address is not given to smoltcp: the stack keeps it and emits
//! [`Event::NewFlow`]. The caller opens the flow on the device and then calls
//! [`Stack::accept_flow`], which creates a smoltcp socket listening on exactly that address and
//! port and feeds it the kept SYN, so the SYN-ACK goes out only now; or it calls
//! [`Stack::refuse_flow`], which answers the SYN with a reset ("connection refused") or an ICMP
//! unreachable ("no route to host"). Until then, retransmitted SYNs of the flow are absorbed.
//!
//! # Order of calls
//!
//! After feeding input (`handle_packet`, `handle_timeout`, `accept_flow`, `send`, `recv`, ...),
//! drain `poll_event` and `poll_transmit` until both return `None`, then wait until `poll_at`.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpListenEndpoint};

use crate::map::{AddressMap, DeviceKey, FlowTarget};
use crate::packet::{self, Segment, Unusable};

/// Tuning of the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// The MTU of the TUN interface, and so of smoltcp. 65535 (the largest a TUN takes): these
    /// packets never leave the machine, and per-packet cost (a TUN read, a checksum setup, a
    /// smoltcp poll) dominates, so one 64 KiB segment instead of 45 of 1460 bytes is what makes
    /// bulk transfer fast.
    pub mtu: usize,
    /// Receive buffer per flow (application → device), so also the largest window we offer.
    /// Above 64 KiB, window scaling is negotiated.
    pub rx_buffer: usize,
    /// Send buffer per flow (device → application).
    pub tx_buffer: usize,
    /// Handshakes waiting for the device (SYN held, no SYN-ACK yet); further new SYNs are dropped
    /// (the application retries), so a SYN flood costs at most this many held SYNs.
    pub max_pending: usize,
    /// Flows in total (pending and open); a SYN beyond it is refused with a reset.
    pub max_flows: usize,
    /// How long an accepted flow may wait for the application's ACK of our SYN-ACK. A SYN from
    /// a spoofed or vanished source is never completed; without a deadline smoltcp would
    /// retransmit forever while the flow held its session slot and the device's connection.
    pub handshake_timeout: std::time::Duration,
    /// Packets waiting to be written to the TUN; smoltcp waits when the queue is full.
    pub max_queued_packets: usize,
    /// Seed for smoltcp's initial sequence numbers.
    pub seed: u64,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            mtu: 65535,
            // 1 MiB each way: a window of 16 maximal segments. On the loopback-like TUN path the
            // RTT is tens of microseconds, so this is far above the bandwidth-delay product, and
            // the buffers are allocated zeroed (lazily mapped) so idle flows cost little.
            rx_buffer: 1 << 20,
            tx_buffer: 1 << 20,
            max_pending: 256,
            max_flows: 4096,
            handshake_timeout: std::time::Duration::from_secs(10),
            max_queued_packets: 4096,
            seed: 0,
        }
    }
}

/// Identifies a flow for the life of a [`Stack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How to turn a flow down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseKind {
    /// A TCP reset: the application sees "connection refused".
    Refused,
    /// An ICMP destination unreachable: the application sees "no route to host".
    Unreachable,
}

/// What the stack reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An application sent a SYN to a mapped address: open the flow, then call
    /// [`Stack::accept_flow`] or [`Stack::refuse_flow`].
    NewFlow {
        /// The flow.
        id: FlowId,
        /// The application's address and port.
        src: SocketAddr,
        /// The virtual address and port it connected to.
        dst: SocketAddr,
        /// Where the flow goes.
        target: FlowTarget,
    },
    /// Data (or the end of the stream) can be read with [`Stack::recv`]. Reported again only
    /// after a `recv` has emptied the buffer.
    Readable(FlowId),
    /// [`Stack::send`] accepted less than offered earlier, and there is room now.
    Writable(FlowId),
    /// The flow is over (closed both ways, reset, aborted, or its handshake was cancelled); the
    /// id is no longer valid.
    Closed(FlowId),
}

/// Why a flow operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// No such flow (never existed, or already reported closed).
    #[error("no such flow")]
    Unknown,
    /// The flow was already accepted or refused.
    #[error("the flow is not waiting to be accepted")]
    NotPending,
    /// The flow has not been accepted yet.
    #[error("the flow has not been accepted")]
    Pending,
    /// The application closed its sending side and every byte has been read.
    #[error("the application finished sending")]
    Finished,
    /// The connection is closed or reset in this direction.
    #[error("the connection is closed")]
    Closed,
}

/// Counters of what the stack has seen and done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets given to `handle_packet`.
    pub packets_in: u64,
    /// Packets written out by `poll_transmit`.
    pub packets_out: u64,
    /// Dropped: truncated, bad length, bad checksum, bad version, fragment.
    pub malformed: u64,
    /// Dropped before anything else looked at them: the source is not the interface's own
    /// address, so another host routed the packet in (this host forwards IP). `np up` serves
    /// its own host only; a neighbour must never reach a device as this host's identity.
    pub foreign_source: u64,
    /// Dropped: not TCP.
    pub not_tcp: u64,
    /// TCP to an address that is not mapped.
    pub unmapped: u64,
    /// New SYNs dropped because too many handshakes were pending.
    pub pending_full: u64,
    /// Accepted flows whose handshake the application never completed.
    pub handshake_timeouts: u64,
    /// Retransmitted SYNs absorbed while their flow was pending.
    pub syn_retransmits: u64,
    /// Flows reported with [`Event::NewFlow`].
    pub flows_new: u64,
    /// Flows accepted.
    pub flows_accepted: u64,
    /// Flows refused (by the caller, or because of `max_flows`).
    pub flows_refused: u64,
    /// Resets the stack wrote itself (refusals and segments of unknown flows).
    pub resets_sent: u64,
    /// ICMP unreachables written.
    pub unreachables_sent: u64,
    /// Packets dropped because the transmit queue was full.
    pub tx_queue_full: u64,
}

/// A flow's 4-tuple: the application's end and the virtual end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tuple {
    src: SocketAddr,
    dst: SocketAddr,
}

struct Flow {
    tuple: Tuple,
    target: FlowTarget,
    state: FlowState,
}

enum FlowState {
    /// The SYN is held until the caller accepts or refuses.
    Pending {
        syn: Vec<u8>,
        seg: Segment,
    },
    Open(OpenFlow),
}

struct OpenFlow {
    handle: SocketHandle,
    /// When the SYN-ACK went out; `None` once the handshake completed.
    handshake_since: Option<Instant>,
    /// `Readable` reported and not yet followed by a `recv` that emptied the buffer.
    read_reported: bool,
    /// `recv` returned `Finished`.
    eof_read: bool,
    /// `send` took less than offered; report `Writable` when there is room.
    write_blocked: bool,
}

/// The in-memory device smoltcp reads from and writes to.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    max_tx: usize,
    mtu: usize,
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < self.max_tx).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

/// smoltcp terminating the TCP flows of a TUN interface. See the module documentation.
pub struct Stack {
    config: StackConfig,
    map: AddressMap,
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    flows: HashMap<FlowId, Flow>,
    by_tuple: HashMap<Tuple, FlowId>,
    pending: usize,
    /// Accepted flows still in SYN-RECEIVED; with `pending`, the half-open handshakes that
    /// `max_pending` bounds.
    half_open: usize,
    /// The earliest handshake deadline of a half-open flow.
    next_deadline: Option<Instant>,
    next_id: u64,
    events: VecDeque<Event>,
    /// smoltcp time 0.
    base: Instant,
    /// The latest time given to any input method.
    now: Instant,
    /// Input arrived that smoltcp has not processed yet.
    dirty: bool,
    stats: Stats,
}

impl Stack {
    /// A stack answering for the addresses of `map`, starting at `now`.
    pub fn new(config: StackConfig, map: AddressMap, now: Instant) -> Self {
        let mut queues = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            max_tx: config.max_queued_packets.max(1),
            mtu: config.mtu,
        };
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut queues, smoltcp::time::Instant::ZERO);
        // Accept packets to any address (every device address and routed host is "us"), and
        // answer any source: the default routes only make smoltcp consider every destination
        // reachable (with an IP medium there is no next hop to resolve).
        iface.set_any_ip(true);
        iface.routes_mut().update(|routes| routes.clear());
        let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(0, 0, 0, 1));
        let _ = iface.routes_mut().add_default_ipv6_route(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1));
        Stack {
            config,
            map,
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            flows: HashMap::new(),
            by_tuple: HashMap::new(),
            pending: 0,
            half_open: 0,
            next_deadline: None,
            next_id: 0,
            events: VecDeque::new(),
            base: now,
            now,
            dirty: false,
            stats: Stats::default(),
        }
    }

    /// The address map.
    pub fn map(&self) -> &AddressMap {
        &self.map
    }

    /// The address map, to add or remove devices and routes. Open flows are not affected.
    pub fn map_mut(&mut self) -> &mut AddressMap {
        &mut self.map
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Flows (pending and open).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Flows waiting to be accepted or refused.
    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Flows per device, pending ones included.
    pub fn flows_per_device(&self) -> HashMap<DeviceKey, usize> {
        let mut out = HashMap::new();
        for flow in self.flows.values() {
            *out.entry(flow.target.device.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Take a packet read from the TUN. A packet whose source is not the interface's own address
    /// (see [`AddressMap::is_interface_addr`]), and anything that is not a well-formed TCP
    /// segment to a mapped address, is dropped and counted.
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        self.advance(now);
        self.stats.packets_in += 1;
        // First of all, whose packet it is: only this host's own (its source address is the
        // interface's). Anything else was forwarded in from another host and gets no flow, no
        // reset, no ICMP: nothing that would tell it a device is there.
        match packet::source(packet) {
            None => {
                self.stats.malformed += 1;
                return;
            }
            Some(src) if !self.map.is_interface_addr(src) => {
                self.stats.foreign_source += 1;
                tracing::trace!(%src, "dropped a packet from another host");
                return;
            }
            Some(_) => {}
        }
        let seg = match packet::parse_tcp(packet) {
            Ok(seg) => seg,
            Err(Unusable::Malformed) => {
                self.stats.malformed += 1;
                return;
            }
            Err(Unusable::NotTcp) => {
                self.stats.not_tcp += 1;
                return;
            }
        };
        let tuple = Tuple { src: seg.src, dst: seg.dst };
        if let Some(&id) = self.by_tuple.get(&tuple) {
            return self.segment_of_known_flow(id, seg, packet);
        }
        if !seg.is_syn() {
            // Not a flow we know: a reset tells the application so (nothing answers a reset).
            if !seg.is_rst() {
                self.reply(packet::reset_for(&seg));
                self.stats.resets_sent += 1;
            }
            return;
        }
        let Some(target) = self.map.lookup(seg.dst.ip(), seg.dst.port()) else {
            // An unassigned address in our subnet: say so rather than let connect() hang.
            self.stats.unmapped += 1;
            self.reply(packet::unreachable_for(&seg));
            self.stats.unreachables_sent += 1;
            return;
        };
        if self.pending + self.half_open >= self.config.max_pending {
            self.stats.pending_full += 1;
            return;
        }
        if self.flows.len() >= self.config.max_flows {
            self.stats.flows_refused += 1;
            self.stats.resets_sent += 1;
            self.reply(packet::reset_for(&seg));
            return;
        }
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.stats.flows_new += 1;
        tracing::trace!(flow = %id, src = %seg.src, dst = %seg.dst, "new flow");
        self.events.push_back(Event::NewFlow { id, src: seg.src, dst: seg.dst, target: target.clone() });
        self.flows.insert(id, Flow { tuple, target, state: FlowState::Pending { syn: packet.to_vec(), seg } });
        self.by_tuple.insert(tuple, id);
        self.pending += 1;
    }

    fn segment_of_known_flow(&mut self, id: FlowId, seg: Segment, packet: &[u8]) {
        let Some(flow) = self.flows.get(&id) else { return };
        match &flow.state {
            FlowState::Pending { .. } if seg.is_syn() => self.stats.syn_retransmits += 1,
            FlowState::Pending { .. } if seg.is_rst() => {
                // The application gave up before the device answered.
                self.forget(id);
                self.events.push_back(Event::Closed(id));
            }
            FlowState::Pending { .. } => {}
            // A listening socket on the same address and port would take a stray SYN as a new
            // connection; smoltcp retransmits its own SYN-ACK, so a repeated SYN adds nothing.
            FlowState::Open(_) if seg.is_syn() => {}
            FlowState::Open(_) => {
                self.queues.rx.push_back(packet.to_vec());
                self.dirty = true;
            }
        }
    }

    /// The device has connected: answer the held SYN with a SYN-ACK.
    pub fn accept_flow(&mut self, id: FlowId, now: Instant) -> Result<(), FlowError> {
        self.advance(now);
        let flow = self.flows.get(&id).ok_or(FlowError::Unknown)?;
        let FlowState::Pending { .. } = flow.state else { return Err(FlowError::NotPending) };
        let tuple = flow.tuple;
        // Let smoltcp see everything queued so far first, so the new listener sees only its SYN.
        self.poll_now();
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.config.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.config.tx_buffer]),
        );
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint { addr: Some(tuple.dst.ip().into()), port: tuple.dst.port() };
        if socket.listen(endpoint).is_err() {
            return Err(FlowError::Closed);
        }
        let handle = self.sockets.add(socket);
        let Some(flow) = self.flows.get_mut(&id) else { return Err(FlowError::Unknown) };
        let old = std::mem::replace(
            &mut flow.state,
            FlowState::Open(OpenFlow {
                handle,
                handshake_since: Some(now),
                read_reported: false,
                eof_read: false,
                write_blocked: false,
            }),
        );
        self.pending -= 1;
        if let FlowState::Pending { syn, .. } = old {
            self.queues.rx.push_back(syn);
        }
        self.poll_now();
        if !self.flows.contains_key(&id) {
            // smoltcp left the socket listening, so `poll_now` ended the flow.
            return Err(FlowError::Closed);
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let took_it = socket.state() == tcp::State::SynReceived
            && socket.remote_endpoint().map(|e| SocketAddr::new(e.addr.into(), e.port)) == Some(tuple.src);
        if !took_it {
            // smoltcp refused the SYN (it cannot, for one we parsed, but never leave a listener
            // that could take another flow's SYN).
            socket.abort();
            self.dirty = true;
            return Err(FlowError::Closed);
        }
        self.stats.flows_accepted += 1;
        Ok(())
    }

    /// The device could not open the flow: answer the held SYN with a reset or an unreachable.
    pub fn refuse_flow(&mut self, id: FlowId, kind: RefuseKind) -> Result<(), FlowError> {
        let flow = self.flows.get(&id).ok_or(FlowError::Unknown)?;
        let FlowState::Pending { seg, .. } = &flow.state else { return Err(FlowError::NotPending) };
        let reply = match kind {
            RefuseKind::Refused => {
                self.stats.resets_sent += 1;
                packet::reset_for(seg)
            }
            RefuseKind::Unreachable => {
                self.stats.unreachables_sent += 1;
                packet::unreachable_for(seg)
            }
        };
        self.stats.flows_refused += 1;
        self.forget(id);
        self.reply(reply);
        Ok(())
    }

    /// Read what the application sent. `Ok(0)` means nothing is buffered now (wait for
    /// [`Event::Readable`]); `Err(Finished)` means the application closed its sending side.
    pub fn recv(&mut self, id: FlowId, buf: &mut [u8]) -> Result<usize, FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
        let result = match socket.recv_slice(buf) {
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => {
                open.eof_read = true;
                Err(FlowError::Finished)
            }
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                tcp::State::Listen | tcp::State::SynReceived => Ok(0),
                _ => Err(FlowError::Closed),
            },
        };
        if socket.recv_queue() == 0 {
            open.read_reported = false;
        }
        // A read opens the window; smoltcp sends the update when polled.
        self.dirty = true;
        result
    }

    /// Queue bytes for the application; returns how many were taken (fewer when the buffer is
    /// full: wait for [`Event::Writable`]). Before the handshake completes nothing is taken.
    pub fn send(&mut self, id: FlowId, data: &[u8]) -> Result<usize, FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
        let n = if socket.may_send() {
            socket.send_slice(data).map_err(|_| FlowError::Closed)?
        } else if matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived) {
            0
        } else {
            return Err(FlowError::Closed);
        };
        if n < data.len() {
            open.write_blocked = true;
        }
        if n > 0 {
            self.dirty = true;
        }
        Ok(n)
    }

    /// Close the sending side toward the application (a FIN after the queued data).
    pub fn close(&mut self, id: FlowId) -> Result<(), FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        self.sockets.get_mut::<tcp::Socket>(open.handle).close();
        self.dirty = true;
        Ok(())
    }

    /// Reset the flow. A pending flow is refused.
    pub fn abort(&mut self, id: FlowId) -> Result<(), FlowError> {
        match open_flow(&mut self.flows, id) {
            Ok(open) => {
                self.sockets.get_mut::<tcp::Socket>(open.handle).abort();
                self.dirty = true;
                Ok(())
            }
            Err(FlowError::Pending) => self.refuse_flow(id, RefuseKind::Refused),
            Err(e) => Err(e),
        }
    }

    /// Let timers run: call at the instant [`Stack::poll_at`] returned.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.dirty = true;
    }

    /// The next packet to write to the TUN.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.poll_if_dirty();
        let was_full = self.queues.tx.len() >= self.queues.max_tx;
        let packet = self.queues.tx.pop_front()?;
        if was_full {
            // smoltcp stopped sending when the queue was full; let it continue.
            self.dirty = true;
        }
        self.stats.packets_out += 1;
        Some(packet)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.poll_if_dirty();
        self.events.pop_front()
    }

    /// When to call [`Stack::handle_timeout`] next (`now` if there is work already), or `None`
    /// if no timer is running.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        self.advance(now);
        if self.dirty || !self.events.is_empty() || !self.queues.tx.is_empty() {
            return Some(self.now);
        }
        let smol = self.iface.poll_at(self.smol_now(), &self.sockets);
        let smol = smol.map(|at| self.base + Duration::from_micros(at.total_micros().max(0) as u64));
        match (smol, self.next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn advance(&mut self, now: Instant) {
        // Time never goes backwards for smoltcp, whatever the caller passes.
        if now > self.now {
            self.now = now;
        }
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        let micros = self.now.saturating_duration_since(self.base).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn reply(&mut self, packet: Vec<u8>) {
        if packet.is_empty() {
            return;
        }
        if self.queues.tx.len() >= self.queues.max_tx {
            self.stats.tx_queue_full += 1;
            return;
        }
        self.queues.tx.push_back(packet);
    }

    fn forget(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.remove(&id) {
            self.by_tuple.remove(&flow.tuple);
            match flow.state {
                FlowState::Pending { .. } => self.pending -= 1,
                FlowState::Open(open) => {
                    self.sockets.remove(open.handle);
                }
            }
        }
    }

    fn poll_if_dirty(&mut self) {
        if self.dirty {
            self.poll_now();
        }
    }

    /// Run smoltcp, then turn socket states into events.
    fn poll_now(&mut self) {
        self.dirty = false;
        let now = self.smol_now();
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
        let mut closed = Vec::new();
        let (mut half_open, mut next_deadline) = (0, None::<Instant>);
        let deadline_after = self.config.handshake_timeout;
        for (&id, flow) in &mut self.flows {
            let FlowState::Open(open) = &mut flow.state else { continue };
            if let Some(since) = open.handshake_since {
                let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
                if socket.state() != tcp::State::SynReceived {
                    open.handshake_since = None;
                } else if self.now >= since + deadline_after {
                    // Never completed: give up (a reset to the claimed source) and end the flow.
                    socket.abort();
                    self.dirty = true;
                    self.stats.handshake_timeouts += 1;
                    closed.push(id);
                    continue;
                } else {
                    half_open += 1;
                    let d = since + deadline_after;
                    next_deadline = Some(next_deadline.map_or(d, |n: Instant| n.min(d)));
                }
            }
            let socket = self.sockets.get::<tcp::Socket>(open.handle);
            let state = socket.state();
            let fin_received = matches!(
                state,
                tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
            );
            if !open.read_reported && (socket.can_recv() || (fin_received && !open.eof_read)) {
                open.read_reported = true;
                self.events.push_back(Event::Readable(id));
            }
            if open.write_blocked && socket.may_send() && socket.send_queue() < socket.send_capacity() {
                open.write_blocked = false;
                self.events.push_back(Event::Writable(id));
            }
            // Done when smoltcp is closed, or waiting out TIME-WAIT with nothing left to read
            // (a late retransmission then gets a reset from us, which the application ignores).
            // A reset in SYN-RECEIVED sends a smoltcp socket back to LISTEN (RFC 793), where it
            // would take the next SYN to this address and port from anyone: the flow is over.
            let done = matches!(state, tcp::State::Closed | tcp::State::Listen)
                || (state == tcp::State::TimeWait && !socket.can_recv());
            if done {
                closed.push(id);
            }
        }
        self.half_open = half_open;
        self.next_deadline = next_deadline;
        for id in closed {
            tracing::trace!(flow = %id, "flow closed");
            self.forget(id);
            self.events.push_back(Event::Closed(id));
        }
    }
}

fn open_flow(flows: &mut HashMap<FlowId, Flow>, id: FlowId) -> Result<&mut OpenFlow, FlowError> {
    match flows.get_mut(&id).map(|f| &mut f.state) {
        None => Err(FlowError::Unknown),
        Some(FlowState::Pending { .. }) => Err(FlowError::Pending),
        Some(FlowState::Open(open)) => Ok(open),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{Prefix, DEFAULT_SUBNET};
    use proptest::prelude::*;
    use smoltcp::iface::SocketHandle;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpCidr, IpProtocol, Ipv4Packet, TcpControl, TcpOption, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    const DEVICE: &str = "100.80.0.2";
    const APP: &str = "100.80.0.1";

    fn map() -> AddressMap {
        let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
        map.add_device("pi".into(), None).expect("device");
        map.add_route("192.168.1.0/24".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
        map.add_route("fd00::/64".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
        map
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// A TCP segment from `src` to `dst`, built with smoltcp::wire.
    fn segment(
        src: SocketAddr,
        dst: SocketAddr,
        control: TcpControl,
        seq: i32,
        ack: Option<i32>,
        data: &[u8],
    ) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(seq),
            ack_number: ack.map(TcpSeqNumber),
            window_len: 65535,
            window_scale: (control == TcpControl::Syn).then_some(7),
            max_seg_size: (control == TcpControl::Syn).then_some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: data,
        };
        let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
        packet::ip_packet(src.ip(), dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
            repr.emit(&mut TcpPacket::new_unchecked(buf), &s, &d, &ChecksumCapabilities::default())
        })
    }

    fn syn(src: &str, dst: &str) -> Vec<u8> {
        segment(sa(src), sa(dst), TcpControl::Syn, 1000, None, &[])
    }

    struct Harness {
        stack: Stack,
        now: Instant,
        events: Vec<Event>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(StackConfig { rx_buffer: 256 * 1024, tx_buffer: 256 * 1024, ..StackConfig::default() })
        }

        fn with(config: StackConfig) -> Self {
            let now = Instant::now();
            Harness { stack: Stack::new(config, map(), now), now, events: Vec::new() }
        }

        fn input(&mut self, packet: &[u8]) {
            self.stack.handle_packet(packet, self.now);
        }

        /// Everything the stack has to say, events kept in `self.events`.
        fn output(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            loop {
                let mut progress = false;
                while let Some(ev) = self.stack.poll_event() {
                    self.events.push(ev);
                    progress = true;
                }
                while let Some(p) = self.stack.poll_transmit() {
                    out.push(p);
                    progress = true;
                }
                if !progress {
                    return out;
                }
            }
        }

        fn new_flows(&mut self) -> Vec<FlowId> {
            let ids = self.events.iter().filter_map(|e| match e {
                Event::NewFlow { id, .. } => Some(*id),
                _ => None,
            });
            let ids = ids.collect();
            self.events.retain(|e| !matches!(e, Event::NewFlow { .. }));
            ids
        }
    }

    fn tcp_of(packet: &[u8]) -> (SocketAddr, SocketAddr, TcpControl, Option<TcpSeqNumber>, Vec<TcpOption<'static>>) {
        let seg = packet::parse_tcp(packet).expect("a tcp segment");
        let ip = Ipv4Packet::new_checked(packet).ok();
        let mut opts = Vec::new();
        if let Some(ip) = ip {
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            let mut rest = tcp.options();
            while !rest.is_empty() {
                let Ok((next, opt)) = TcpOption::parse(rest) else { break };
                if let TcpOption::WindowScale(w) = opt {
                    opts.push(TcpOption::WindowScale(w));
                }
                rest = next;
            }
        }
        (seg.src, seg.dst, seg.control, seg.ack, opts)
    }

    #[test]
    fn the_syn_ack_waits_for_accept() {
        let mut h = Harness::new();
        let syn = syn("100.80.0.1:40000", "100.80.0.2:22");
        h.input(&syn);
        assert!(h.output().is_empty(), "no answer before the device has connected");
        let ids = h.new_flows();
        assert_eq!(ids.len(), 1);
        assert_eq!(h.stack.pending_count(), 1);

        // A retransmitted SYN is the same flow.
        h.now += Duration::from_secs(1);
        h.input(&syn);
        assert!(h.output().is_empty());
        assert!(h.new_flows().is_empty());
        assert_eq!(h.stack.stats().syn_retransmits, 1);

        h.stack.accept_flow(ids[0], h.now).expect("accept");
        let out = h.output();
        assert_eq!(out.len(), 1);
        let (src, dst, control, ack, opts) = tcp_of(&out[0]);
        assert_eq!((src, dst), (sa("100.80.0.2:22"), sa("100.80.0.1:40000")));
        assert_eq!(control, TcpControl::Syn);
        assert_eq!(ack, Some(TcpSeqNumber(1001)));
        assert!(
            opts.iter().any(|o| matches!(o, TcpOption::WindowScale(s) if *s > 0)),
            "window scaling offered: {opts:?}"
        );
        assert_eq!(h.stack.pending_count(), 0);
        assert_eq!(h.stack.accept_flow(ids[0], h.now), Err(FlowError::NotPending));
        assert_eq!(h.stack.flows_per_device().get(&"pi".into()), Some(&1));
    }

    #[test]
    fn a_handshake_reset_by_the_application_ends_the_flow_and_leaves_no_listener() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.output();
        let ids = h.new_flows();
        h.stack.accept_flow(ids[0], h.now).expect("accept");
        assert_eq!(h.output().len(), 1, "a SYN-ACK");
        // The application gave up meanwhile: its kernel answers the SYN-ACK with a reset.
        h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, &[]));
        h.output();
        assert!(h.events.contains(&Event::Closed(ids[0])), "{:?}", h.events);
        assert_eq!(h.stack.flows_per_device().get(&"pi".into()).copied().unwrap_or(0), 0);
        // The next connection to that port is a flow of its own and gets its own SYN-ACK (a
        // socket left listening would have taken its SYN).
        h.input(&syn("100.80.0.1:40001", "100.80.0.2:22"));
        h.output();
        let ids = h.new_flows();
        assert_eq!(ids.len(), 1);
        h.stack.accept_flow(ids[0], h.now).expect("accept the next flow");
        let out = h.output();
        assert_eq!(out.len(), 1);
        let (src, dst, control, ..) = tcp_of(&out[0]);
        assert_eq!((src, dst, control), (sa("100.80.0.2:22"), sa("100.80.0.1:40001"), TcpControl::Syn));
    }

    #[test]
    fn new_flow_reports_the_target() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.input(&syn("100.80.0.1:40001", "192.168.1.10:80"));
        h.input(&syn("[fd6e:7000::6450:1]:40002", "[fd00::10]:443"));
        h.output();
        let targets: Vec<_> = h
            .events
            .iter()
            .filter_map(|e| match e {
                Event::NewFlow { target, .. } => Some(target.target.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(targets, ["localhost:22", "192.168.1.10:80", "[fd00::10]:443"]);
    }

    #[test]
    fn the_syn_ack_is_retransmitted_on_the_fake_clock() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.output();
        let id = h.new_flows()[0];
        h.stack.accept_flow(id, h.now).expect("accept");
        assert_eq!(h.output().len(), 1);
        let at = h.stack.poll_at(h.now).expect("a retransmission timer");
        assert!(at > h.now, "nothing to do before the timer");
        h.now = at;
        h.stack.handle_timeout(h.now);
        let out = h.output();
        assert_eq!(out.len(), 1, "SYN-ACK again");
        assert_eq!(tcp_of(&out[0]).2, TcpControl::Syn);
    }

    #[test]
    fn refused_and_unreachable_flows() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.input(&syn("100.80.0.1:40001", "100.80.0.2:23"));
        h.output();
        let ids = h.new_flows();
        h.stack.refuse_flow(ids[0], RefuseKind::Refused).expect("refuse");
        h.stack.refuse_flow(ids[1], RefuseKind::Unreachable).expect("refuse");
        let out = h.output();
        assert_eq!(out.len(), 2);
        let (src, dst, control, ack, _) = tcp_of(&out[0]);
        assert_eq!(
            (src, dst, control, ack),
            (sa("100.80.0.2:22"), sa("100.80.0.1:40000"), TcpControl::Rst, Some(TcpSeqNumber(1001)))
        );
        assert_eq!(packet::parse_tcp(&out[1]).err(), Some(Unusable::NotTcp), "an ICMP message");
        assert_eq!(h.stack.flow_count(), 0);
        assert_eq!(h.stack.accept_flow(ids[0], h.now), Err(FlowError::Unknown));
    }

    #[test]
    fn an_unassigned_address_is_unreachable_and_stray_segments_are_reset() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.99:22"));
        let out = h.output();
        assert_eq!(out.len(), 1);
        assert_eq!(packet::parse_tcp(&out[0]).err(), Some(Unusable::NotTcp));
        assert_eq!(h.stack.stats().unmapped, 1);

        h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::None, 5, Some(77), b"hi"));
        let out = h.output();
        assert_eq!(out.len(), 1);
        let seg = packet::parse_tcp(&out[0]).expect("reset");
        assert!(seg.is_rst());
        assert_eq!(seg.seq, TcpSeqNumber(77));
        // Nothing answers a reset.
        h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 5, None, b""));
        assert!(h.output().is_empty());
        assert!(h.events.is_empty());
    }

    #[test]
    fn a_reset_while_pending_cancels_the_flow() {
        let mut h = Harness::new();
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.output();
        let id = h.new_flows()[0];
        h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, b""));
        h.output();
        assert_eq!(h.events, [Event::Closed(id)]);
        assert_eq!(h.stack.accept_flow(id, h.now), Err(FlowError::Unknown));
        assert_eq!(h.stack.pending_count(), 0);
    }

    #[test]
    fn an_accepted_handshake_never_completed_times_out_and_frees_its_place() {
        let mut h =
            Harness::with(StackConfig { max_pending: 2, rx_buffer: 4096, tx_buffer: 4096, ..StackConfig::default() });
        for port in [40000, 40001] {
            h.input(&syn(&format!("100.80.0.1:{port}"), "100.80.0.2:22"));
        }
        h.output();
        let ids = h.new_flows();
        let accepted_at = h.now;
        for id in &ids {
            h.stack.accept_flow(*id, h.now).expect("accept");
        }
        h.output();
        // Both are half-open (SYN-ACK sent, never ACKed): a third SYN finds no place.
        h.input(&syn("100.80.0.1:40002", "100.80.0.2:22"));
        h.output();
        assert!(h.new_flows().is_empty());
        assert_eq!(h.stack.stats().pending_full, 1);
        // At the deadline both end, and the place is free again.
        let mut guard = 0;
        while h.stack.flow_count() > 0 && guard < 100 {
            let at = h.stack.poll_at(h.now).expect("a timer while flows are half-open");
            h.now = at.max(h.now);
            h.stack.handle_timeout(h.now);
            h.output();
            guard += 1;
        }
        assert_eq!(h.stack.flow_count(), 0);
        assert_eq!(h.stack.stats().handshake_timeouts, 2);
        assert!(h.now >= accepted_at + Duration::from_secs(10), "ended before the deadline");
        assert_eq!(h.events.iter().filter(|e| matches!(e, Event::Closed(_))).count(), 2);
        h.input(&syn("100.80.0.1:40003", "100.80.0.2:22"));
        h.output();
        assert_eq!(h.new_flows().len(), 1);
    }

    #[test]
    fn a_syn_flood_keeps_memory_bounded() {
        let mut h = Harness::new();
        for i in 0..10_000u32 {
            let src =
                SocketAddr::new(Ipv4Addr::from(0x6450_0000u32 + 1 + (i >> 14)).into(), 1024 + (i & 0x3fff) as u16);
            let port = 1 + (i % 1000) as u16;
            h.input(&segment(
                src,
                SocketAddr::new(DEVICE.parse().expect("ip"), port),
                TcpControl::Syn,
                i as i32,
                None,
                &[],
            ));
            if i % 100 == 0 {
                h.output();
            }
        }
        assert!(h.output().is_empty(), "a held SYN is never answered");
        assert_eq!(h.stack.pending_count(), 256);
        assert_eq!(h.stack.flow_count(), 256);
        assert_eq!(h.stack.stats().pending_full, 10_000 - 256);
        assert_eq!(h.new_flows().len(), 256);
        assert_eq!(h.stack.sockets.iter().count(), 0, "no socket before accept");
    }

    #[test]
    fn the_flow_cap_refuses_with_a_reset() {
        let mut h = Harness::with(StackConfig { max_flows: 2, ..StackConfig::default() });
        for port in [40000, 40001, 40002] {
            h.input(&syn(&format!("{APP}:{port}"), &format!("{DEVICE}:22")));
        }
        let out = h.output();
        assert_eq!(h.new_flows().len(), 2);
        assert_eq!(out.len(), 1);
        assert!(packet::parse_tcp(&out[0]).expect("rst").is_rst());
    }

    #[test]
    fn packets_from_other_hosts_are_dropped_before_anything_sees_them() {
        let mut h = Harness::new();
        let foreign = [
            // A neighbour routing the subnet through this host, to a device and to a routed host.
            syn("198.19.254.2:40000", "100.80.0.2:22"),
            syn("198.19.254.2:40001", "192.168.1.10:80"),
            // Another address of this host is still not the interface's (the kernel never picks
            // one of them for a route into the interface).
            syn("10.77.0.1:40000", "100.80.0.2:22"),
            // Device addresses, the subnet's network and broadcast, loopback, unspecified.
            syn("100.80.0.2:40000", "100.80.0.2:22"),
            syn("100.80.0.0:40000", "100.80.0.2:22"),
            syn("100.80.255.255:40000", "100.80.0.2:22"),
            syn("127.0.0.1:40000", "100.80.0.2:22"),
            syn("0.0.0.0:40000", "100.80.0.2:22"),
            // IPv6 from anything but the interface's IPv6 address, the IPv4 one mapped included.
            syn("[fd00::1]:40000", "[fd00::10]:22"),
            syn("[::ffff:100.80.0.1]:40000", "[fd00::10]:22"),
            syn("[fd6e:7000::6450:2]:40000", "[fd00::10]:22"),
            // Not a SYN, which would otherwise get a reset; to an unmapped address, which would
            // otherwise get an ICMP unreachable.
            segment(sa("198.19.254.2:40000"), sa("100.80.0.2:22"), TcpControl::None, 5, Some(77), b"hi"),
            syn("198.19.254.2:40000", "100.80.0.99:22"),
        ];
        let udp = packet::ip_packet(
            "198.19.254.2".parse().expect("ip"),
            DEVICE.parse().expect("ip"),
            IpProtocol::Udp,
            8,
            |b| b.copy_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]),
        );
        for p in foreign.iter().chain([&udp]) {
            h.input(p);
        }
        assert!(h.output().is_empty(), "no answer of any kind to another host");
        assert!(h.events.is_empty(), "{:?}", h.events);
        assert_eq!(h.stack.flow_count(), 0);
        let st = h.stack.stats();
        assert_eq!(st.foreign_source, foreign.len() as u64 + 1);
        assert_eq!((st.malformed, st.not_tcp, st.unmapped, st.resets_sent, st.unreachables_sent), (0, 0, 0, 0, 0));

        // The same SYNs from the interface's own addresses open flows.
        h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
        h.input(&syn("[fd6e:7000::6450:1]:40000", "[fd00::10]:22"));
        h.output();
        assert_eq!(h.new_flows().len(), 2);
        // A foreign packet that would belong to one of them, but for its source, is dropped.
        h.input(&segment(sa("198.19.254.2:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, &[]));
        h.output();
        assert!(h.events.is_empty(), "{:?}", h.events);
        assert_eq!(h.stack.pending_count(), 2);
    }

    #[test]
    fn garbage_is_counted_and_dropped() {
        let mut h = Harness::new();
        let good = syn("100.80.0.1:40000", "100.80.0.2:22");
        let good6 = syn("[fd6e:7000::6450:1]:40000", "[fd00::10]:22");
        let mut bad_ip_checksum = good.clone();
        bad_ip_checksum[10] ^= 0xff;
        let mut bad_tcp_checksum = good.clone();
        let last = bad_tcp_checksum.len() - 1;
        bad_tcp_checksum[last] ^= 0xff;
        let mut bad_total_len = good.clone();
        bad_total_len[2..4].copy_from_slice(&2000u16.to_be_bytes());
        let mut short_total_len = good.clone();
        short_total_len[2..4].copy_from_slice(&30u16.to_be_bytes());
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x4f;
        let mut fragment = good.clone();
        fragment[6] = 0x20; // more fragments
        let mut bad_v6_len = good6.clone();
        bad_v6_len[4..6].copy_from_slice(&9000u16.to_be_bytes());
        let mut v6_tcp_checksum = good6.clone();
        let last6 = v6_tcp_checksum.len() - 1;
        v6_tcp_checksum[last6] ^= 0x01;
        let udp = packet::ip_packet(APP.parse().expect("ip"), DEVICE.parse().expect("ip"), IpProtocol::Udp, 8, |b| {
            b.copy_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0])
        });
        let icmp = packet::ip_packet(APP.parse().expect("ip"), DEVICE.parse().expect("ip"), IpProtocol::Icmp, 8, |b| {
            b.copy_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
        });
        let malformed = [
            vec![],
            vec![0x45],
            vec![0x60; 39],
            vec![0xff; 100],
            good[..20].to_vec(),
            good[..good.len() - 1].to_vec(),
            good6[..50].to_vec(),
            bad_ip_checksum,
            bad_tcp_checksum,
            bad_total_len,
            short_total_len,
            bad_ihl,
            fragment,
            bad_v6_len,
            v6_tcp_checksum,
        ];
        for p in &malformed {
            h.input(p);
        }
        h.input(&udp);
        h.input(&icmp);
        assert!(h.output().is_empty());
        assert!(h.events.is_empty());
        assert_eq!(h.stack.stats().malformed, malformed.len() as u64);
        assert_eq!(h.stack.stats().not_tcp, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn no_packet_from_another_host_gets_an_answer_or_a_flow(
            src in any::<u32>(),
            dst in prop_oneof![Just(0x6450_0002u32), Just(0xc0a8_010au32), any::<u32>()],
            ports in any::<(u16, u16)>(),
            control in prop_oneof![Just(TcpControl::Syn), Just(TcpControl::None), Just(TcpControl::Fin), Just(TcpControl::Psh)],
            ack in any::<Option<i32>>(),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assume!(src != 0x6450_0001);
            let mut h = Harness::new();
            let (s, d) = (SocketAddr::from((Ipv4Addr::from(src), ports.0)), SocketAddr::from((Ipv4Addr::from(dst), ports.1)));
            h.input(&segment(s, d, control, 1000, ack, &data));
            prop_assert!(h.output().is_empty());
            prop_assert!(h.events.is_empty());
            prop_assert_eq!(h.stack.stats().foreign_source, 1);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = Harness::new();
            h.input(&bytes);
            h.output();
        }

        #[test]
        fn mutated_segments_never_panic(
            edits in proptest::collection::vec((0usize..80, any::<u8>()), 1..6),
            cut in 0usize..80,
            v6 in any::<bool>(),
        ) {
            let mut h = Harness::new();
            // An open flow, so mutated segments also reach smoltcp.
            let (app, dev) = if v6 { ("[fd6e:7000::6450:1]:40000", "[fd00::10]:22") } else { ("100.80.0.1:40000", "100.80.0.2:22") };
            h.input(&syn(app, dev));
            h.output();
            let id = h.new_flows()[0];
            h.stack.accept_flow(id, h.now).expect("accept");
            h.output();
            let mut p = segment(sa(app), sa(dev), TcpControl::Psh, 1001, Some(1), b"0123456789abcdef");
            for (at, byte) in edits {
                if let Some(b) = p.get_mut(at) { *b = byte; }
            }
            p.truncate(p.len().saturating_sub(cut % 4 * cut));
            h.input(&p);
            h.output();
            let mut buf = [0u8; 64];
            let _ = h.stack.recv(id, &mut buf);
        }
    }

    /// An application on the other side of the TUN: a second smoltcp interface.
    struct App {
        iface: Interface,
        sockets: SocketSet<'static>,
        queues: Queues,
        base: Instant,
    }

    impl App {
        fn new(now: Instant) -> Self {
            let mut queues = Queues { rx: VecDeque::new(), tx: VecDeque::new(), max_tx: 4096, mtu: 65535 };
            let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, smoltcp::time::Instant::ZERO);
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::v4(100, 80, 0, 1), 16)).expect("addr");
            });
            let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(100, 80, 0, 2));
            App { iface, sockets: SocketSet::new(Vec::new()), queues, base: now }
        }

        fn connect(&mut self, dst: &str, local_port: u16) -> SocketHandle {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 512 * 1024]),
                tcp::SocketBuffer::new(vec![0; 512 * 1024]),
            );
            s.set_nagle_enabled(false);
            s.connect(self.iface.context(), sa(dst), local_port).expect("connect");
            self.sockets.add(s)
        }

        fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(h)
        }

        fn poll(&mut self, now: Instant) {
            let t = smoltcp::time::Instant::from_micros(now.duration_since(self.base).as_micros() as i64);
            self.iface.poll(t, &mut self.queues, &mut self.sockets);
        }
    }

    /// Move packets both ways until neither side has anything to say; the clock advances 1 ms
    /// per round, enough for delayed ACKs.
    fn exchange(h: &mut Harness, app: &mut App) {
        for _ in 0..10_000 {
            app.poll(h.now);
            let mut moved = false;
            while let Some(p) = app.queues.tx.pop_front() {
                h.input(&p);
                moved = true;
            }
            for p in h.output() {
                app.queues.rx.push_back(p);
                moved = true;
            }
            if !moved {
                // Jump to the next timer of either side if it is near (delayed ACKs,
                // retransmissions); otherwise the exchange is over.
                let app_now = smoltcp::time::Instant::from_micros(h.now.duration_since(app.base).as_micros() as i64);
                let app_next = app
                    .iface
                    .poll_delay(app_now, &app.sockets)
                    .map(|d| h.now + Duration::from_micros(d.total_micros()));
                let next = [h.stack.poll_at(h.now), app_next].into_iter().flatten().min();
                match next {
                    Some(t) if t <= h.now + Duration::from_millis(200) => {
                        h.now = t.max(h.now);
                        h.stack.handle_timeout(h.now);
                        continue;
                    }
                    _ => return,
                }
            }
            h.now += Duration::from_millis(1);
            h.stack.handle_timeout(h.now);
        }
        panic!("no quiescence");
    }

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }

    #[test]
    fn a_whole_flow_data_both_ways_and_fin() {
        let mut h = Harness::new();
        let mut app = App::new(h.now);
        let c = app.connect("100.80.0.2:22", 40000);
        exchange(&mut h, &mut app);
        assert_eq!(app.socket(c).state(), tcp::State::SynSent);
        let id = h.new_flows()[0];
        h.stack.accept_flow(id, h.now).expect("accept");

        // The device speaks first (an SSH banner) before the handshake has completed.
        assert_eq!(h.stack.send(id, b"SSH-2.0-x\r\n"), Ok(0));
        exchange(&mut h, &mut app);
        assert_eq!(app.socket(c).state(), tcp::State::Established);
        assert!(h.events.contains(&Event::Writable(id)));
        h.events.clear();

        // 1 MiB each way through 256 KiB buffers: flow control both ways.
        let up = pattern(1 << 20, 1);
        let down = pattern(1 << 20, 2);
        let (mut up_sent, mut down_sent) = (0, 0);
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 100_000];
        let mut rounds = 0;
        while got_up.len() < up.len() || got_down.len() < down.len() {
            rounds += 1;
            assert!(rounds < 10_000, "stalled at {} / {}", got_up.len(), got_down.len());
            if up_sent < up.len() && app.socket(c).can_send() {
                up_sent += app.socket(c).send_slice(&up[up_sent..]).expect("app send");
            }
            if down_sent < down.len() {
                down_sent += h.stack.send(id, &down[down_sent..]).expect("send");
            }
            loop {
                let n = h.stack.recv(id, &mut buf).expect("recv");
                if n == 0 {
                    break;
                }
                got_up.extend_from_slice(&buf[..n]);
            }
            while app.socket(c).can_recv() {
                let n = app.socket(c).recv_slice(&mut buf).expect("app recv");
                got_down.extend_from_slice(&buf[..n]);
            }
            exchange(&mut h, &mut app);
        }
        assert!(got_up == up, "application → device bytes intact");
        assert!(got_down == down, "device → application bytes intact");
        assert!(h.events.contains(&Event::Readable(id)));
        assert!(h.events.contains(&Event::Writable(id)), "the send buffer filled and drained");

        // The application closes first; the stack sees the end of the stream, then closes too.
        h.events.clear();
        app.socket(c).close();
        exchange(&mut h, &mut app);
        assert_eq!(h.events, [Event::Readable(id)]);
        assert_eq!(h.stack.recv(id, &mut buf), Err(FlowError::Finished));
        h.stack.send(id, b"bye").expect("half-closed: still sending");
        h.stack.close(id).expect("close");
        exchange(&mut h, &mut app);
        let mut tail = [0u8; 8];
        assert_eq!(app.socket(c).recv_slice(&mut tail), Ok(3));
        assert!(h.events.contains(&Event::Closed(id)), "{:?}", h.events);
        assert_eq!(h.stack.flow_count(), 0);
        assert_eq!(h.stack.sockets.iter().count(), 0);
        assert_eq!(h.stack.recv(id, &mut buf), Err(FlowError::Unknown));
    }

    #[test]
    fn the_device_closes_first_and_abort_resets() {
        let mut h = Harness::new();
        let mut app = App::new(h.now);
        let c1 = app.connect("100.80.0.2:22", 40000);
        let c2 = app.connect("192.168.1.10:80", 40001);
        exchange(&mut h, &mut app);
        let ids = h.new_flows();
        assert_eq!(ids.len(), 2);
        for id in &ids {
            h.stack.accept_flow(*id, h.now).expect("accept");
        }
        exchange(&mut h, &mut app);
        assert_eq!(app.socket(c1).state(), tcp::State::Established);
        assert_eq!(app.socket(c2).state(), tcp::State::Established);

        h.stack.send(ids[0], b"last words").expect("send");
        h.stack.close(ids[0]).expect("close");
        h.stack.abort(ids[1]).expect("abort");
        exchange(&mut h, &mut app);
        assert_eq!(app.socket(c1).state(), tcp::State::CloseWait);
        assert_eq!(app.socket(c2).state(), tcp::State::Closed, "reset");
        assert!(h.events.contains(&Event::Closed(ids[1])));
        app.socket(c1).close();
        exchange(&mut h, &mut app);
        assert!(h.events.contains(&Event::Closed(ids[0])), "{:?}", h.events);
        assert_eq!(h.stack.flow_count(), 0);
    }

    #[test]
    fn many_flows_to_one_port_stay_apart() {
        let mut h = Harness::new();
        let mut app = App::new(h.now);
        let conns: Vec<_> = (0..20).map(|i| app.connect("100.80.0.2:22", 41000 + i)).collect();
        exchange(&mut h, &mut app);
        let ids = h.new_flows();
        assert_eq!(ids.len(), 20);
        // Accept in reverse order, one per exchange, while the others keep retransmitting SYNs.
        for id in ids.iter().rev() {
            h.stack.accept_flow(*id, h.now).expect("accept");
            h.now += Duration::from_secs(1);
            exchange(&mut h, &mut app);
        }
        for (i, id) in ids.iter().enumerate() {
            h.stack.send(*id, format!("flow {i}").as_bytes()).expect("send");
        }
        exchange(&mut h, &mut app);
        for (i, c) in conns.iter().enumerate() {
            let mut buf = [0u8; 32];
            let n = app.socket(*c).recv_slice(&mut buf).expect("recv");
            assert_eq!(&buf[..n], format!("flow {i}").as_bytes());
        }
    }
}
