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
//!
//! # Layout
//!
//! - `device`: the in-memory smoltcp device (two packet queues), so smoltcp never touches a file
//!   descriptor;
//! - `intake`: packets from the TUN, checked and sorted into flows before smoltcp sees them;
//! - `flow`: per-flow state, accepting and refusing held SYNs, and the application's side of an
//!   open flow (`recv`, `send`, `close`, `abort`);
//! - `poll`: running smoltcp, its timers, and turning socket states into [`Event`]s.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::HardwareAddress;

use crate::map::{AddressMap, DeviceKey, FlowTarget};

use self::device::Queues;
use self::flow::{Flow, Tuple};

pub(crate) mod device;
mod flow;
mod intake;
mod poll;
#[cfg(test)]
mod tests;

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
    /// smoltcp leaves TCP checksums out of what it sends: whoever writes the packets to the TUN
    /// has the kernel finish them (checksum offload, see `Tun::checksum_offload`).
    pub tcp_checksum_offload: bool,
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
            tcp_checksum_offload: false,
        }
    }
}

/// What is known of a packet's TCP checksum when it is handed to the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxChecksum {
    /// Complete: the stack checks it.
    Complete,
    /// Left to be finished (the TUN's checksum offload, `NEEDS_CSUM`): the field holds the
    /// pseudo-header's sum only. The kernel marks only segments of this host's own sockets so;
    /// they never crossed a wire, so there is nothing for a checksum to catch.
    Partial,
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
    /// The application closed its sending side after its last byte had been read, and the flow
    /// is over in the same step (a `Closed` follows at once): what [`Stack::recv`] would have
    /// answered with [`FlowError::Finished`], had the flow lasted until the next read.
    Finished(FlowId),
    /// The flow is over (closed both ways, reset, aborted, or its handshake was cancelled); the
    /// id is no longer valid.
    Closed(FlowId),
    /// A UDP datagram to a mapped address. Answers go back with [`Stack::send_datagram`], a
    /// refusal with [`Stack::udp_unreachable`].
    Datagram {
        /// The application's address and port.
        src: SocketAddr,
        /// The virtual address and port it sent to.
        dst: SocketAddr,
        /// Where the datagram goes.
        target: FlowTarget,
        /// The payload.
        payload: Vec<u8>,
    },
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
    /// Dropped: truncated, bad length, bad checksum, bad version.
    pub malformed: u64,
    /// Dropped: IPv4 or IPv6 fragments (never reassembled).
    pub fragments: u64,
    /// Dropped: IPv6 with extension headers (the kernel's TCP carries none).
    pub ipv6_extension_headers: u64,
    /// Dropped: IPv6 to a multicast address (the kernel's own neighbour and listener messages).
    pub multicast: u64,
    /// Dropped before anything else looked at them: the source is not the interface's own
    /// address, so another host routed the packet in (this host forwards IP). `np up` serves
    /// its own host only; a neighbour must never reach a device as this host's identity.
    pub foreign_source: u64,
    /// Dropped: neither TCP nor UDP (ICMP, say).
    pub not_tcp: u64,
    /// UDP datagrams to mapped addresses, and written back to applications.
    pub udp_datagrams_in: u64,
    pub udp_datagrams_out: u64,
    /// UDP datagrams dropped for being longer than a session carries.
    pub udp_oversized: u64,
    /// TCP or UDP to an address that is not mapped.
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
        let mut queues = Queues::new(config.max_queued_packets.max(1), config.mtu, config.tcp_checksum_offload);
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
}
