//! The pure core of `np up`: the TCP [`Stack`] and each device's session [`Connection`] in one
//! state machine. Packets from the TUN, bytes from each device's relay connection and the time
//! go in; packets for the TUN, bytes for each relay connection, requests to set up a session and
//! the next deadline come out. No tokio, no sockets, no clock reads: the shell (`shell.rs`) does
//! the I/O, and tests drive it with packets in memory.
//!
//! Each TCP flow is joined to one mux flow of its device's session:
//! - smoltcp readable → `send` into the mux flow, as far as the flow's credit allows;
//! - mux data → `stack.send`, taken straight from the decrypted record; what smoltcp took is
//!   credited back to the device;
//! - the application's FIN ↔ the mux flow's Fin, a reset ↔ an abort;
//! - the device's accept/refuse of the mux flow ↔ the SYN-ACK, or a reset/unreachable.
//!
//! The mux's credit and smoltcp's windows are the only flow control: there are no channels or
//! tasks in between, and a flow with nothing in flight holds no buffer of its own.
//!
//! A flow waits for its device's session if there is none: the first such flow asks for one
//! ([`Action::Connect`]). When a session ends, flows still waiting for the device's answer are
//! retried once on a new session (the old one may have been stale: the relay restarted, the
//! network changed); open flows are reset.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use crate::map::MapError;
use std::time::{Duration, Instant};

use np_session::{ConnEvent, Connection, MuxConfig, Recv, SessionError, SessionKeys};

use crate::map::{AddressMap, DeviceKey};
use crate::stack::{Event, FlowError, FlowId, RefuseKind, RxChecksum, Stack, StackConfig};

/// A session of a device, for the life of the bridge (a new one after an old one ended gets a new
/// id), so the shell can tell a dead session's socket from its successor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set up a session to `device` (the request names `first_target`), then call
    /// [`Bridge::connected`] with `link`.
    Connect {
        /// The session-to-be.
        link: LinkId,
        /// Its device.
        device: DeviceKey,
        /// What the flow that needs it goes to.
        first_target: String,
    },
}

/// A session the shell set up: its keys and, for the logs, the id both ends know it by.
pub struct Established {
    /// From the handshake.
    pub keys: SessionKeys,
    /// The session id (hex) that npd logs too.
    pub session: String,
    /// Whether the session carries UDP (negotiated at its handshake).
    pub udp: bool,
}

/// Why a session could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupFailed {
    /// What the flows waiting for it see.
    pub kind: RefuseKind,
    /// For the logs and `np status`.
    pub reason: String,
}

/// How the application hears of a flow the device refused. npd words a target it could not
/// reach as the operating system did ("No route to host", "Network is unreachable") or as
/// "timed out": the application sees "no route to host" for those, as it would have dialling
/// directly, and "connection refused" for everything else (refused by the target, or not
/// permitted).
pub fn refusal_kind(reason: &str) -> RefuseKind {
    let r = reason.to_ascii_lowercase();
    if ["no route to host", "network is unreachable", "timed out"].iter().any(|w| r.contains(w)) {
        RefuseKind::Unreachable
    } else {
        RefuseKind::Refused
    }
}

/// Tunables of the bridge.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// How long a flow may wait for its device (session setup plus the device's answer) before
    /// the application is told "unreachable".
    pub open_timeout: Duration,
    /// The sessions' tunables (both ends must agree).
    pub mux: MuxConfig,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig { open_timeout: Duration::from_secs(20), mux: MuxConfig::default() }
    }
}

enum LinkState {
    /// Being set up; these flows wait for it.
    Connecting {
        waiting: Vec<FlowId>,
    },
    Up {
        conn: Box<Connection>,
        by_mux: HashMap<u32, FlowId>,
        session: String,
    },
    /// Ended; the connection stays until its last records (the `Close`) are transmitted.
    Ending {
        conn: Box<Connection>,
    },
}

struct Link {
    device: DeviceKey,
    state: LinkState,
}

/// Where a TCP flow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for its device's session.
    Waiting,
    /// Asked the device; no answer yet.
    Opening,
    /// Accepted: bytes move.
    Open,
}

struct Flow {
    target: String,
    link: LinkId,
    mux: u32,
    phase: Phase,
    /// Retried on a new session already (at most once).
    retried: bool,
    /// The application's FIN was passed on as the mux flow's Fin.
    up_done: bool,
    /// The device's Fin was passed on as our FIN to the application.
    down_done: bool,
    span: tracing::Span,
}

/// Counters of the bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Sessions set up.
    pub sessions: u64,
    /// Flows opened on a new session after their first one ended before answering.
    pub retried: u64,
    /// Flows refused or timed out before opening.
    pub failed_opens: u64,
    /// Bytes from applications to devices, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The stack and the sessions. See the module docs.
pub struct Bridge {
    stack: Stack,
    config: BridgeConfig,
    links: HashMap<LinkId, Link>,
    /// The live (connecting or up) link of each device.
    current: HashMap<DeviceKey, LinkId>,
    next_link: u64,
    flows: HashMap<FlowId, Flow>,
    /// Open deadlines in the order they were set (all are `open_timeout` from their start).
    deadlines: VecDeque<(Instant, FlowId)>,
    /// Why each device's last session ended or failed, for `np status`.
    last_error: HashMap<DeviceKey, String>,
    actions: VecDeque<Action>,
    stats: BridgeStats,
    udp: udp::Udp,
}

impl Bridge {
    /// A bridge for the devices in `map`.
    pub fn new(stack_config: StackConfig, map: AddressMap, config: BridgeConfig, now: Instant) -> Bridge {
        Bridge {
            stack: Stack::new(stack_config, map, now),
            config,
            links: HashMap::new(),
            current: HashMap::new(),
            next_link: 1,
            flows: HashMap::new(),
            deadlines: VecDeque::new(),
            last_error: HashMap::new(),
            actions: VecDeque::new(),
            stats: BridgeStats::default(),
            udp: udp::Udp::default(),
        }
    }

    /// The TCP stack (for its map and counters).
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// Counters.
    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// A packet read from the TUN.
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        self.stack.handle_packet(packet, now);
    }

    /// [`Bridge::handle_packet`] with what the TUN said of the packet's TCP checksum.
    pub fn handle_packet_with(&mut self, packet: &[u8], checksum: RxChecksum, now: Instant) {
        self.stack.handle_packet_with(packet, checksum, now);
    }

    /// [`Stack::handle_packet_owned`].
    pub fn handle_packet_owned(&mut self, packet: Vec<u8>, now: Instant) {
        self.stack.handle_packet_owned(packet, now);
    }

    /// [`Bridge::handle_packet_owned`] with what the TUN said of the packet's TCP checksum.
    pub fn handle_packet_owned_with(&mut self, packet: Vec<u8>, checksum: RxChecksum, now: Instant) {
        self.stack.handle_packet_owned_with(packet, checksum, now);
    }

    /// [`Stack::packet_buffer`].
    pub fn packet_buffer(&mut self, len: usize) -> Vec<u8> {
        self.stack.packet_buffer(len)
    }

    /// The next packet for the TUN. Call [`Bridge::process`] first.
    pub fn poll_packet(&mut self) -> Option<Vec<u8>> {
        self.stack.poll_transmit()
    }

    /// Takes back a packet from [`Bridge::poll_packet`] once written, to reuse its buffer.
    pub fn recycle(&mut self, packet: Vec<u8>) {
        self.stack.recycle(packet);
    }

    /// The next thing for the shell to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Sets up `device`'s session now rather than on its first flow (`np up --eager`).
    pub fn connect(&mut self, device: &DeviceKey, first_target: &str) {
        if !self.current.contains_key(device) {
            self.start_link(device.clone(), first_target, Vec::new());
        }
    }

    /// The shell finished setting up `link`.
    pub fn connected(&mut self, link: LinkId, result: Result<Established, SetupFailed>, now: Instant) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let LinkState::Connecting { waiting } = &mut l.state else { return };
        let waiting = std::mem::take(waiting);
        let device = l.device.clone();
        match result {
            Ok(est) => {
                self.stats.sessions += 1;
                tracing::debug!(device = %device, session = %est.session, link = %link, "session up");
                l.state = LinkState::Up {
                    conn: Box::new(Connection::new(
                        &est.keys,
                        MuxConfig { udp: est.udp, ..self.config.mux.clone() },
                        now,
                    )),
                    by_mux: HashMap::new(),
                    session: est.session,
                };
                self.last_error.remove(&device);
                for id in waiting {
                    self.open_on(link, id);
                }
                self.udp_link_ready(link, true, now);
            }
            Err(failed) => {
                tracing::debug!(device = %device, link = %link, reason = %failed.reason, "session setup failed");
                self.links.remove(&link);
                self.current.remove(&device);
                self.last_error.insert(device, failed.reason.clone());
                for id in waiting {
                    self.fail_open(id, failed.kind);
                }
                self.udp_link_ready(link, false, now);
            }
        }
    }

    /// The receive buffer of `link`'s connection, to read its socket into (then call
    /// [`Bridge::link_input`]); `None` if the link is gone or should not be read now (it ended, or
    /// the device is not reading our answers).
    pub fn link_input_buffer(&mut self, link: LinkId) -> Option<&mut bytes::BytesMut> {
        match self.links.get_mut(&link).map(|l| &mut l.state) {
            Some(LinkState::Up { conn, .. }) if conn.wants_input() => Some(conn.input_buffer()),
            _ => None,
        }
    }

    /// Does `link` want its socket read?
    pub fn link_wants_input(&self, link: LinkId) -> bool {
        matches!(self.links.get(&link).map(|l| &l.state), Some(LinkState::Up { conn, .. }) if conn.wants_input())
    }

    /// Bytes were read into [`Bridge::link_input_buffer`].
    pub fn link_input(&mut self, link: LinkId, now: Instant) {
        if let Some(conn) = self.conn_mut(link) {
            conn.process_input(now);
        }
    }

    /// The relay connection of `link` reached end of stream.
    pub fn link_eof(&mut self, link: LinkId) {
        if let Some(conn) = self.conn_mut(link) {
            conn.handle_eof();
        }
    }

    /// A device that appeared while the interface is up: an address derived from its name.
    pub fn add_device(&mut self, device: DeviceKey) -> Result<Ipv4Addr, MapError> {
        let addr = self.stack.map_mut().add_device_derived(device.clone())?;
        tracing::info!(device = %device, %addr, "device added");
        Ok(addr)
    }

    /// A device that was removed or revoked: its address and routes go (new flows to them are
    /// refused as unmapped), and its session ends, which resets its open flows.
    pub fn remove_device(&mut self, device: &DeviceKey) {
        self.stack.map_mut().remove_device(device);
        if let Some(link) = self.current.get(device).copied() {
            if let Some(conn) = self.conn_mut(link) {
                conn.close("the device was removed");
            }
        }
        tracing::info!(device = %device, "device removed");
    }

    /// The relay connection of `link` failed.
    pub fn link_error(&mut self, link: LinkId, err: std::io::Error) {
        if let Some(conn) = self.conn_mut(link) {
            conn.handle_io_error(err);
        }
    }

    /// Appends `link`'s sealed records to `buf` (up to about `max` bytes). `None` once the link is
    /// over and everything is out: the shell closes its socket.
    pub fn poll_link_transmit(&mut self, link: LinkId, now: Instant, buf: &mut Vec<u8>, max: usize) -> Option<usize> {
        let l = self.links.get_mut(&link)?;
        let n = match &mut l.state {
            LinkState::Up { conn, by_mux, .. } => {
                // Pull mode (see `pump`): each flow's bytes go from smoltcp's buffer into the
                // record being sealed, and what is left becomes the flow's new offer.
                let stack = &mut self.stack;
                let stats = &mut self.stats;
                let mut ended = Vec::new();
                let n = conn.poll_transmit_with(now, buf, max, &mut |mux, out, want| {
                    let Some(&id) = by_mux.get(&mux) else { return 0 };
                    let mut took = 0;
                    while took < want {
                        match stack.recv_with(id, |data| {
                            let n = data.len().min(want - took);
                            out.extend_from_slice(&data[..n]);
                            n
                        }) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => took += n,
                        }
                    }
                    stats.bytes_up += took as u64;
                    match stack.recv_pending(id) {
                        Ok(left) => left as u64,
                        // The application's FIN is behind the last byte: this read used it up,
                        // so it must go on as the flow's Fin right after this transmit.
                        Err(FlowError::Finished) => {
                            ended.push((id, mux));
                            0
                        }
                        Err(_) => 0,
                    }
                });
                for (id, mux) in ended {
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.up_done = true;
                    }
                    if conn.finish(mux).is_err() {
                        tracing::debug!(flow = %id, "finishing the flow failed");
                    }
                }
                n
            }
            LinkState::Ending { conn } => conn.poll_transmit(now, buf, max),
            LinkState::Connecting { .. } => return Some(0),
        };
        let drained = match &l.state {
            LinkState::Up { conn, .. } | LinkState::Ending { conn } => conn.is_drained(),
            LinkState::Connecting { .. } => false,
        };
        if n == 0 && drained {
            self.links.remove(&link);
            return None;
        }
        Some(n)
    }

    /// `np status`'s word on each device's session.
    pub fn describe(&self, device: &DeviceKey) -> String {
        match self.current.get(device).and_then(|l| self.links.get(l)).map(|l| &l.state) {
            Some(LinkState::Connecting { .. }) => "connecting".into(),
            Some(LinkState::Up { session, .. }) => format!("established (session {session})"),
            Some(LinkState::Ending { .. }) | None => match self.last_error.get(device) {
                Some(e) => format!("ended: {e}"),
                None => "none yet".into(),
            },
        }
    }

    /// Flows per device.
    pub fn flows_per_device(&self) -> HashMap<DeviceKey, usize> {
        self.stack.flows_per_device()
    }

    /// When [`Bridge::handle_timeout`] should next run.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let mut at = self.stack.poll_at(now);
        let mut earliest = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        for l in self.links.values() {
            if let LinkState::Up { conn, .. } | LinkState::Ending { conn } = &l.state {
                earliest(conn.poll_timeout());
            }
        }
        earliest(self.deadlines.front().map(|(t, _)| *t));
        at
    }

    /// Runs whatever timers are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.stack.handle_timeout(now);
        for l in self.links.values_mut() {
            if let LinkState::Up { conn, .. } | LinkState::Ending { conn } = &mut l.state {
                if conn.poll_timeout().is_some_and(|t| t <= now) {
                    conn.handle_timeout(now);
                }
            }
        }
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let waiting = self.flows.get(&id).is_some_and(|f| f.phase != Phase::Open);
            if waiting {
                if let Some(f) = self.flows.get(&id) {
                    f.span.in_scope(|| tracing::debug!("the device did not answer in time"));
                }
                self.fail_open(id, RefuseKind::Unreachable);
            }
        }
    }

    /// Reacts to everything that happened: the stack's events and the sessions' events, moving
    /// bytes both ways, until nothing more happens. Call after any input and before polling output.
    pub fn process(&mut self, now: Instant) {
        loop {
            let mut progress = false;
            while let Some(ev) = self.stack.poll_event() {
                progress = true;
                self.stack_event(ev, now);
            }
            let ids: Vec<LinkId> = self.links.keys().copied().collect();
            for link in ids {
                while let Some(ev) = self.conn_mut(link).and_then(|c| c.poll_event()) {
                    progress = true;
                    self.conn_event(link, ev, now);
                }
            }
            if !progress {
                return;
            }
        }
    }

    // ---- internals ----

    fn conn_mut(&mut self, link: LinkId) -> Option<&mut Connection> {
        match &mut self.links.get_mut(&link)?.state {
            LinkState::Up { conn, .. } | LinkState::Ending { conn } => Some(conn),
            LinkState::Connecting { .. } => None,
        }
    }

    fn start_link(&mut self, device: DeviceKey, first_target: &str, waiting: Vec<FlowId>) -> LinkId {
        let link = LinkId(self.next_link);
        self.next_link += 1;
        self.links.insert(link, Link { device: device.clone(), state: LinkState::Connecting { waiting } });
        self.current.insert(device.clone(), link);
        self.actions.push_back(Action::Connect { link, device, first_target: first_target.to_owned() });
        link
    }

    fn stack_event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::NewFlow { id, target, .. } => {
                let span = tracing::debug_span!(
                    "flow",
                    flow = id.0,
                    session = tracing::field::Empty,
                    mux_flow = tracing::field::Empty
                );
                span.in_scope(|| tracing::debug!(target = %target.target, "new flow"));
                self.flows.insert(
                    id,
                    Flow {
                        target: target.target.clone(),
                        link: LinkId(0),
                        mux: 0,
                        phase: Phase::Waiting,
                        retried: false,
                        up_done: false,
                        down_done: false,
                        span,
                    },
                );
                self.deadlines.push_back((now + self.config.open_timeout, id));
                self.route(id, &target.device);
            }
            Event::Readable(id) | Event::Writable(id) => self.pump(id),
            Event::Finished(id) => {
                // The application's FIN, told once the flow is already gone from the stack: pass
                // it on as the flow's Fin, so the `Closed` that follows finds both sides done.
                let Some(f) = self.flows.get_mut(&id) else { return };
                if f.phase != Phase::Open || f.up_done {
                    return;
                }
                f.up_done = true;
                if let Some(LinkState::Up { conn, .. }) = self.links.get_mut(&f.link).map(|l| &mut l.state) {
                    if conn.finish(f.mux).is_err() {
                        f.span.in_scope(|| tracing::debug!("finishing the flow failed"));
                    }
                }
            }
            Event::Datagram { src, dst, target, payload } => self.udp_datagram(src, dst, target, payload, now),
            Event::Closed(id) => {
                let Some(f) = self.flows.remove(&id) else { return };
                f.span.in_scope(|| tracing::debug!("flow closed"));
                match f.phase {
                    Phase::Waiting => self.unwait(f.link, id),
                    Phase::Opening | Phase::Open => {
                        let clean = f.up_done && f.down_done;
                        if let Some(LinkState::Up { conn, by_mux, .. }) =
                            self.links.get_mut(&f.link).map(|l| &mut l.state)
                        {
                            by_mux.remove(&f.mux);
                            if clean {
                                // Both Fins went through; the mux retires the flow by itself.
                                conn.discard(f.mux);
                            } else {
                                conn.abort(f.mux, "the application closed the connection");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Puts a new (or retried) flow on its device's session, setting one up if needed.
    fn route(&mut self, id: FlowId, device: &DeviceKey) {
        match self.current.get(device).copied() {
            Some(link) => match self.links.get_mut(&link).map(|l| &mut l.state) {
                Some(LinkState::Connecting { waiting }) => {
                    waiting.push(id);
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.link = link;
                    }
                }
                Some(LinkState::Up { .. }) => self.open_on(link, id),
                _ => {
                    self.current.remove(device);
                    self.route(id, device);
                }
            },
            None => {
                let target = self.flows.get(&id).map(|f| f.target.clone()).unwrap_or_default();
                let link = self.start_link(device.clone(), &target, vec![id]);
                if let Some(f) = self.flows.get_mut(&id) {
                    f.link = link;
                }
            }
        }
    }

    fn unwait(&mut self, link: LinkId, id: FlowId) {
        if let Some(LinkState::Connecting { waiting }) = self.links.get_mut(&link).map(|l| &mut l.state) {
            waiting.retain(|w| *w != id);
        }
    }

    /// Asks the device for the flow.
    fn open_on(&mut self, link: LinkId, id: FlowId) {
        let Some(f) = self.flows.get_mut(&id) else { return };
        let Some(LinkState::Up { conn, by_mux, session }) = self.links.get_mut(&link).map(|l| &mut l.state) else {
            return;
        };
        match conn.open(&f.target) {
            Ok(mux) => {
                f.link = link;
                f.mux = mux;
                f.phase = Phase::Opening;
                f.span.record("session", session.as_str());
                f.span.record("mux_flow", mux);
                by_mux.insert(mux, id);
            }
            Err(e) => {
                f.span.in_scope(|| tracing::debug!(error = %e, "cannot open a flow on the session"));
                let kind =
                    if matches!(e, SessionError::Limit(_)) { RefuseKind::Refused } else { RefuseKind::Unreachable };
                self.fail_open(id, kind);
            }
        }
    }

    fn fail_open(&mut self, id: FlowId, kind: RefuseKind) {
        let Some(f) = self.flows.remove(&id) else { return };
        self.stats.failed_opens += 1;
        match f.phase {
            Phase::Waiting => self.unwait(f.link, id),
            Phase::Opening | Phase::Open => {
                if let Some(LinkState::Up { conn, by_mux, .. }) = self.links.get_mut(&f.link).map(|l| &mut l.state) {
                    by_mux.remove(&f.mux);
                    conn.abort(f.mux, "gave up waiting");
                }
            }
        }
        let _ = self.stack.refuse_flow(id, kind);
    }

    fn conn_event(&mut self, link: LinkId, ev: ConnEvent, now: Instant) {
        let by_mux = |s: &Self, mux: u32| match s.links.get(&link).map(|l| &l.state) {
            Some(LinkState::Up { by_mux, .. }) => by_mux.get(&mux).copied(),
            _ => None,
        };
        match ev {
            ConnEvent::FlowOpened { flow, .. } => {
                // A device never opens flows toward a client.
                if let Some(conn) = self.conn_mut(link) {
                    let _ = conn.refuse(flow, "clients accept no flows");
                }
            }
            ConnEvent::FlowAccepted { flow } => {
                let Some(id) = by_mux(self, flow) else { return };
                match self.stack.accept_flow(id, now) {
                    Ok(()) => {
                        if let Some(f) = self.flows.get_mut(&id) {
                            f.phase = Phase::Open;
                            f.span.in_scope(|| tracing::debug!("flow open"));
                        }
                        self.pump(id);
                    }
                    Err(e) => {
                        tracing::debug!(flow = id.0, error = %e, "flow gone before it opened");
                        self.drop_flow(link, id, flow, "the application went away");
                    }
                }
            }
            ConnEvent::FlowRefused { flow, reason } => {
                let Some((id, f)) = self.unmap(link, flow) else { return };
                // Not at info: per-flow info logs carry no addresses, and the reason may name the target.
                f.span.in_scope(|| tracing::debug!(%reason, "flow refused by the device"));
                self.stats.failed_opens += 1;
                let _ = self.stack.refuse_flow(id, refusal_kind(&reason));
            }
            ConnEvent::Readable { flow } | ConnEvent::Writable { flow } => {
                if let Some(id) = by_mux(self, flow) {
                    self.pump(id);
                }
            }
            ConnEvent::FlowReset { flow, reason } => {
                let Some((id, f)) = self.unmap(link, flow) else { return };
                f.span.in_scope(|| tracing::debug!(%reason, "flow reset by the device"));
                let _ = self.stack.abort(id);
            }
            ConnEvent::UdpOpened { assoc, .. } => {
                // A device never opens associations (its mux refuses to, and ours ends a
                // session whose device tries).
                if let Some(conn) = self.conn_mut(link) {
                    conn.udp_close(assoc, "clients accept no associations");
                }
            }
            ConnEvent::Datagram { assoc, bytes } => self.udp_answer(link, assoc, &bytes),
            ConnEvent::UdpClosed { assoc, reason } => self.udp_closed(link, assoc, &reason),
            ConnEvent::Ended { error } => self.link_ended(link, error),
        }
    }

    /// Forgets the flow that mux flow `mux` of `link` carried (the device refused or reset it).
    fn unmap(&mut self, link: LinkId, mux: u32) -> Option<(FlowId, Flow)> {
        let Some(LinkState::Up { by_mux, .. }) = self.links.get_mut(&link).map(|l| &mut l.state) else { return None };
        let id = by_mux.remove(&mux)?;
        self.flows.remove(&id).map(|f| (id, f))
    }

    fn drop_flow(&mut self, link: LinkId, id: FlowId, mux: u32, reason: &str) {
        self.flows.remove(&id);
        if let Some(LinkState::Up { conn, by_mux, .. }) = self.links.get_mut(&link).map(|l| &mut l.state) {
            by_mux.remove(&mux);
            conn.abort(mux, reason);
        }
    }

    fn link_ended(&mut self, link: LinkId, error: SessionError) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let device = l.device.clone();
        let state = std::mem::replace(&mut l.state, LinkState::Connecting { waiting: Vec::new() });
        let LinkState::Up { conn, by_mux, session } = state else {
            l.state = state;
            return;
        };
        tracing::info!(device = %device, session = %session, error = %error, "session ended");
        l.state = LinkState::Ending { conn };
        self.udp_link_ended(link);
        if self.current.get(&device) == Some(&link) {
            self.current.remove(&device);
        }
        self.last_error.insert(device.clone(), error.to_string());
        let stale = error.is_stale();
        let mut ids: Vec<FlowId> = by_mux.into_values().collect();
        ids.sort();
        for id in ids {
            let Some(f) = self.flows.get_mut(&id) else { continue };
            if f.phase == Phase::Opening && stale && !f.retried {
                // The device never answered on that session: ask again on a new one.
                f.retried = true;
                f.phase = Phase::Waiting;
                self.stats.retried += 1;
                f.span.in_scope(|| tracing::debug!("session ended before the device answered; retrying"));
                self.route(id, &device);
            } else if f.phase == Phase::Opening {
                self.fail_open(id, RefuseKind::Unreachable);
            } else {
                self.flows.remove(&id);
                let _ = self.stack.abort(id);
            }
        }
    }

    /// Moves what can be moved between the flow's TCP socket and its mux flow.
    fn pump(&mut self, id: FlowId) {
        let Some(f) = self.flows.get_mut(&id) else { return };
        if f.phase != Phase::Open {
            return;
        }
        let Some(LinkState::Up { conn, .. }) = self.links.get_mut(&f.link).map(|l| &mut l.state) else { return };
        let mut failed = false;

        // Device → application: straight from the decrypted record into smoltcp's buffer.
        while !f.down_done {
            let mut stack_err = None;
            let stack = &mut self.stack;
            let got = conn.recv_with(f.mux, |chunk| match stack.send(id, chunk) {
                Ok(n) => n,
                Err(e) => {
                    stack_err = Some(e);
                    0
                }
            });
            if stack_err.is_some() {
                failed = true;
                break;
            }
            match got {
                // Again: the queue may hold more chunks than the first call took.
                Ok(Recv::Data(n)) => self.stats.bytes_down += n as u64,
                Ok(Recv::Fin) => {
                    f.down_done = true;
                    let _ = self.stack.close(id);
                }
                // Nothing left, or smoltcp's buffer is full (its Writable brings us back).
                Ok(Recv::Empty) => break,
                Err(_) => failed = true,
            }
            if failed {
                break;
            }
        }

        // Application → device: offered, not copied. The connection pulls the bytes straight
        // from smoltcp's buffer into a record when it transmits (`poll_link_transmit`), as
        // credit allows, and learns there what is left; here it only hears what is waiting.
        let mux = f.mux;
        if !f.up_done && !failed {
            match self.stack.recv_pending(id) {
                Ok(n) => failed = conn.offer(mux, n as u64).is_err(),
                Err(FlowError::Finished) => {
                    f.up_done = true;
                    failed = conn.finish(mux).is_err();
                }
                Err(_) => {}
            }
        }
        if failed {
            let mux = f.mux;
            f.span.in_scope(|| tracing::debug!("flow failed; resetting both sides"));
            let link = f.link;
            self.drop_flow(link, id, mux, "the flow failed");
            let _ = self.stack.abort(id);
        }
    }
}

#[cfg(test)]
mod tests;
mod udp;

pub use udp::{UdpStatus, MAX_WAITING};
