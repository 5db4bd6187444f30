//! The tokio shell around the [`Bridge`]: reads packets from the TUN and bytes from each
//! device's relay connection into it, writes what it has for them back, sets up sessions when it
//! asks, and runs its timers. One task, one event loop: no task or channel per flow.
//!
//! The loop waits on: the TUN being readable, any relay connection being readable (while its
//! session wants input) or writable (while records wait), a session setup finishing, a status
//! request, the bridge's next deadline, and shutdown. Nothing spins or sleeps a fixed time.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use np_session::{MuxConfig, SessionKeys};

use crate::bridge::UdpStatus;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::bridge::{Action, Bridge, BridgeConfig, BridgeStats, Established, LinkId, SetupFailed};
use crate::map::{AddressMap, DeviceKey, MapError, Prefix};
use crate::stack::RxChecksum;
use crate::stack::{StackConfig, Stats};
use crate::tun::{Tun, TunError, VNET_HDR_LEN};
use crate::vnet;
use tun_rs::AsyncDevice;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sets up sessions to devices (the session request, the relay join and the handshake).
pub trait Dialer: Send + Sync + 'static {
    /// A session to `device`, whose request names `first_target` (what the flow that needs it
    /// goes to). Resolves with the relay connection, paired and past the handshake.
    fn dial(&self, device: DeviceKey, first_target: String) -> BoxFuture<'static, Result<Dialed, SetupFailed>>;
}

/// A session set up by a [`Dialer`].
pub struct Dialed {
    /// The relay connection, paired with the device.
    pub stream: TcpStream,
    /// From the handshake.
    pub keys: SessionKeys,
    /// The session id both ends log (hex).
    pub session: String,
    /// Whether the session carries UDP (both ends have it).
    pub udp: bool,
}

/// Configuration of [`Netstack`].
#[derive(Debug, Clone)]
pub struct NetstackConfig {
    /// Interface name.
    pub name: String,
    /// Devices, their addresses, and routed prefixes.
    pub map: AddressMap,
    /// Tuning of the TCP stack (the MTU is also the interface's).
    pub stack: StackConfig,
    /// How long a flow may take to open before the application is told "unreachable".
    pub open_timeout: Duration,
    /// The sessions' tunables (both ends must agree).
    pub mux: MuxConfig,
    /// Devices whose sessions are set up at once rather than on their first flow, each with the
    /// target its request names.
    pub eager: Vec<(DeviceKey, String)>,
}

impl Default for NetstackConfig {
    fn default() -> Self {
        NetstackConfig {
            name: "np0".into(),
            map: AddressMap::default(),
            stack: StackConfig::default(),
            open_timeout: Duration::from_secs(20),
            mux: MuxConfig::default(),
            eager: Vec::new(),
        }
    }
}

/// Why the netstack stopped.
#[derive(Debug, thiserror::Error)]
pub enum NetstackError {
    /// Setting up the interface failed.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// Reading or writing the TUN failed.
    #[error("TUN interface I/O: {0}")]
    Io(#[from] io::Error),
}

/// What `np status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Interface name.
    pub interface: String,
    /// The interface's address and subnet.
    pub interface_addr: Ipv4Addr,
    /// The subnet.
    pub subnet: Prefix,
    /// Devices and their addresses.
    pub devices: Vec<(DeviceKey, Ipv4Addr)>,
    /// The interface's IPv6 address (none on a host with IPv6 turned off).
    pub interface_addr_v6: Option<std::net::Ipv6Addr>,
    /// Each device's IPv6 address (the same device as its IPv4 one).
    pub devices_v6: HashMap<DeviceKey, std::net::Ipv6Addr>,
    /// Routed prefixes.
    pub routes: Vec<(Prefix, DeviceKey)>,
    /// Flows per device (pending and open).
    pub flows: HashMap<DeviceKey, usize>,
    /// Counters of the stack.
    pub stats: Stats,
    /// Each device's session, in words (`established (session …)`, `connecting`, `ended: …`).
    pub sessions: Vec<(DeviceKey, String)>,
    /// Counters of the bridge.
    pub bridge: BridgeStats,
    /// Each live UDP association, with what it carried.
    pub udp: Vec<UdpStatus>,
}

/// What a [`StatusHandle`] asks of the running netstack.
enum Command {
    Status(oneshot::Sender<Status>),
    AddDevice(DeviceKey, oneshot::Sender<Result<Ipv4Addr, MapError>>),
    RemoveDevice(DeviceKey),
}

/// Asks a running netstack for its [`Status`], and changes its devices while it runs.
#[derive(Debug, Clone)]
pub struct StatusHandle(mpsc::Sender<Command>);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Status(_) => "Status",
            Command::AddDevice(..) => "AddDevice",
            Command::RemoveDevice(_) => "RemoveDevice",
        })
    }
}

impl StatusHandle {
    /// The current status, or `None` if the netstack has stopped.
    pub async fn snapshot(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::Status(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Gives a new device an address derived from its name
    /// ([`AddressMap::add_device_derived`]); flows to it are served from now on. `None` if the
    /// netstack has stopped.
    pub async fn add_device(&self, device: DeviceKey) -> Option<Result<Ipv4Addr, MapError>> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::AddDevice(device, tx)).await.ok()?;
        rx.await.ok()
    }

    /// Takes a device's address and routes away and ends its session (its open flows are
    /// reset): it was removed or revoked.
    pub async fn remove_device(&self, device: DeviceKey) {
        let _ = self.0.send(Command::RemoveDevice(device)).await;
    }
}

/// The largest packet a TUN read returns (the MTU is at most 65535).
const MAX_PACKET: usize = 65536;
/// Packets at least this long are handed to the stack in the buffer they were read into.
const OWNED_MIN: usize = 16 * 1024;
/// TUN packets handled before the bridge reacts and writes out.
const RX_BATCH: usize = 64;
/// Bytes of sealed records gathered for one write to a relay connection: up to eight records of
/// what is pending (eight measured a little better than four).
const WRITE_BATCH: usize = 8 * (np_session::MAX_RECORD_PLAINTEXT + 20);

/// The TUN interface and its TCP stack. Create with [`Netstack::new`] (which brings the interface
/// up), then [`Netstack::serve`].
pub struct Netstack {
    tun: Tun,
    config: NetstackConfig,
    status_tx: mpsc::Sender<Command>,
    status_rx: mpsc::Receiver<Command>,
}

impl Netstack {
    /// Bring up the interface (removing a stale one of the same name) and its routes.
    pub fn new(config: NetstackConfig) -> Result<Self, NetstackError> {
        let mtu = u16::try_from(config.stack.mtu).unwrap_or(u16::MAX);
        let tun = Tun::create(&config.name, &config.map, mtu)?;
        let (status_tx, status_rx) = mpsc::channel(8);
        Ok(Netstack { tun, config, status_tx, status_rx })
    }

    /// Bring up the interface and serve until `shutdown` resolves; the interface is gone when
    /// this returns.
    pub async fn run<D: Dialer>(
        config: NetstackConfig,
        dialer: D,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetstackError> {
        Netstack::new(config)?.serve(dialer, shutdown).await
    }

    /// A handle for [`Status`] snapshots.
    pub fn status(&self) -> StatusHandle {
        StatusHandle(self.status_tx.clone())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.tun.name()
    }

    /// Why the kernel does not drop packets forwarded into the interface, or `None` if it does
    /// (see [`Tun::create`]).
    pub fn forward_guard_missing(&self) -> Option<&str> {
        self.tun.forward_guard_missing()
    }

    /// The interface's IPv6 address, if it has one (not on a host with IPv6 turned off).
    pub fn addr_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.tun.addr_v6()
    }

    /// Serve flows until `shutdown` resolves, then remove the interface.
    pub async fn serve<D: Dialer>(self, dialer: D, shutdown: impl Future<Output = ()>) -> Result<(), NetstackError> {
        let Netstack { tun, config, status_tx, status_rx } = self;
        drop(status_tx);
        let mut stack_config = config.stack.clone();
        let offload = tun.checksum_offload();
        stack_config.tcp_checksum_offload = offload;
        if stack_config.seed == 0 {
            stack_config.seed = random_seed();
        }
        let bridge_config = BridgeConfig { open_timeout: config.open_timeout, mux: config.mux.clone() };
        let mut bridge = Bridge::new(stack_config, config.map.clone(), bridge_config, Instant::now());
        for (device, target) in &config.eager {
            bridge.connect(device, target);
        }
        let (dialed_tx, dialed_rx) = mpsc::unbounded_channel();
        let mut shell = Shell {
            bridge,
            tun,
            dialer: Arc::new(dialer),
            links: HashMap::new(),
            dials: HashMap::new(),
            dialed_tx,
            stall: config.mux.idle_timeout,
            offload,
        };
        let result = shell.run(dialed_rx, status_rx, shutdown).await;
        for dial in shell.dials.values() {
            dial.abort();
        }
        result
    }
}

/// A relay connection and the records waiting to be written to it.
struct LinkIo {
    stream: TcpStream,
    out: Vec<u8>,
    written: usize,
    /// Since when the socket has taken nothing although records wait.
    stalled_since: Option<Instant>,
}

/// What a relay connection is ready for.
enum Ready {
    Read(LinkId),
    Write,
}

struct Shell<D: Dialer> {
    bridge: Bridge,
    tun: Tun,
    dialer: Arc<D>,
    links: HashMap<LinkId, LinkIo>,
    dials: HashMap<LinkId, AbortHandle>,
    dialed_tx: mpsc::UnboundedSender<(LinkId, Result<Dialed, SetupFailed>)>,
    /// A relay connection that takes nothing for this long ends its session.
    stall: Duration,
    /// Packets on the TUN carry a virtio-net header (checksum offload; see `vnet`).
    offload: bool,
}

impl<D: Dialer> Shell<D> {
    async fn run(
        &mut self,
        mut dialed_rx: mpsc::UnboundedReceiver<(LinkId, Result<Dialed, SetupFailed>)>,
        mut status_rx: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetstackError> {
        tokio::pin!(shutdown);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut packet = vec![0u8; MAX_PACKET];
        let mut hdr = [0u8; VNET_HDR_LEN];
        loop {
            self.flush().await;
            let now = Instant::now();
            let deadline = self.deadline(now);
            if let Some(at) = deadline {
                timer.as_mut().reset(at.into());
            }
            let ready = std::future::poll_fn(|cx| self.poll_links(cx));
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                read = read_packet(self.tun.device(), self.offload, &mut hdr, &mut packet) => {
                    let mut n = read?;
                    let now = Instant::now();
                    // Read straight into a buffer the stack keeps (no copy for a data segment).
                    for i in 0..RX_BATCH {
                        if i > 0 {
                            n = match try_read_packet(self.tun.device(), self.offload, &mut hdr, &mut packet) {
                                Ok(n) => n,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e.into()),
                            };
                        }
                        let checksum = if self.offload { vnet::rx(&hdr) } else { Some(RxChecksum::Complete) };
                        let Some(checksum) = checksum else {
                            tracing::debug!(len = n, "dropped a segment run from the TUN (segmentation offload is off)");
                            continue;
                        };
                        if n >= OWNED_MIN {
                            let next = self.bridge.packet_buffer(MAX_PACKET);
                            let mut full = std::mem::replace(&mut packet, next);
                            full.truncate(n);
                            self.bridge.handle_packet_owned_with(full, checksum, now);
                        } else {
                            // Small (an ACK, a SYN): a copy is cheaper than another buffer.
                            self.bridge.handle_packet_with(&packet[..n.min(packet.len())], checksum, now);
                        }
                    }
                }
                ready = ready => match ready {
                    Ready::Read(link) => self.read_link(link),
                    // `flush` writes at the top of the loop.
                    Ready::Write => {}
                },
                Some((link, result)) = dialed_rx.recv() => self.dialed(link, result),
                Some(command) = status_rx.recv() => match command {
                    Command::Status(reply) => {
                        let _ = reply.send(self.status());
                    }
                    Command::AddDevice(device, reply) => {
                        let _ = reply.send(self.bridge.add_device(device));
                    }
                    Command::RemoveDevice(device) => self.bridge.remove_device(&device),
                },
                () = &mut timer, if deadline.is_some() => self.timeout(Instant::now()),
            }
        }
    }

    /// The bridge's next deadline, or a stalled connection's.
    fn deadline(&mut self, now: Instant) -> Option<Instant> {
        let stalls = self.links.values().filter_map(|l| l.stalled_since.map(|t| t + self.stall));
        self.bridge.poll_timeout(now).into_iter().chain(stalls).min()
    }

    fn timeout(&mut self, now: Instant) {
        self.bridge.handle_timeout(now);
        let stall = self.stall;
        for (link, io) in &self.links {
            if io.stalled_since.is_some_and(|t| now >= t + stall) {
                // The device (or relay) reads nothing: it is gone or hostile, and our records
                // would pile up. The session is over.
                let err = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the relay connection took nothing for {}s", stall.as_secs()),
                );
                self.bridge.link_error(*link, err);
            }
        }
    }

    /// Which relay connection can be read (its session wants input) or written (records wait).
    fn poll_links(&self, cx: &mut std::task::Context<'_>) -> Poll<Ready> {
        for (link, io) in &self.links {
            if self.bridge.link_wants_input(*link) && io.stream.poll_read_ready(cx).is_ready() {
                return Poll::Ready(Ready::Read(*link));
            }
            if io.written < io.out.len() && io.stream.poll_write_ready(cx).is_ready() {
                return Poll::Ready(Ready::Write);
            }
        }
        Poll::Pending
    }

    fn read_link(&mut self, link: LinkId) {
        let Some(io) = self.links.get(&link) else { return };
        // A few reads at most, so one busy session cannot keep the loop from the others and the TUN.
        for _ in 0..4 {
            let Some(buf) = self.bridge.link_input_buffer(link) else { return };
            match io.stream.try_read_buf(buf) {
                Ok(0) => {
                    self.bridge.link_eof(link);
                    return;
                }
                Ok(_) => self.bridge.link_input(link, Instant::now()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.bridge.link_error(link, e);
                    return;
                }
            }
        }
    }

    fn dialed(&mut self, link: LinkId, result: Result<Dialed, SetupFailed>) {
        self.dials.remove(&link);
        let now = Instant::now();
        match result {
            Ok(d) => {
                let _ = d.stream.set_nodelay(true);
                self.links.insert(link, LinkIo { stream: d.stream, out: Vec::new(), written: 0, stalled_since: None });
                self.bridge.connected(link, Ok(Established { keys: d.keys, session: d.session, udp: d.udp }), now);
            }
            Err(failed) => self.bridge.connected(link, Err(failed), now),
        }
    }

    /// Lets the bridge react, then writes out everything it has: packets to the TUN, records to
    /// each relay connection, and sets up the sessions it asks for.
    async fn flush(&mut self) {
        loop {
            let now = Instant::now();
            self.bridge.process(now);
            while let Some(action) = self.bridge.poll_action() {
                match action {
                    Action::Connect { link, device, first_target } => {
                        let dial = self.dialer.dial(device, first_target);
                        let tx = self.dialed_tx.clone();
                        let task = tokio::spawn(async move {
                            let _ = tx.send((link, dial.await));
                        });
                        self.dials.insert(link, task.abort_handle());
                    }
                }
            }
            while let Some(mut packet) = self.bridge.poll_packet() {
                let sent = if self.offload {
                    let hdr = vnet::tx(&mut packet);
                    self.tun.device().send_vectored(&[IoSlice::new(&hdr), IoSlice::new(&packet)]).await
                } else {
                    self.tun.device().send(&packet).await
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "writing to the TUN failed; packet dropped");
                }
                self.bridge.recycle(packet);
            }
            if !self.write_links(now) {
                return;
            }
        }
    }

    /// Writes each relay connection's records as far as its socket takes them. Returns whether
    /// something happened that the bridge must react to (a connection failed or finished, or
    /// records took bytes from the stack).
    fn write_links(&mut self, now: Instant) -> bool {
        let mut react = false;
        let mut gone = Vec::new();
        for (&link, io) in self.links.iter_mut() {
            loop {
                if io.written == io.out.len() {
                    io.out.clear();
                    io.written = 0;
                    match self.bridge.poll_link_transmit(link, now, &mut io.out, WRITE_BATCH) {
                        None => {
                            gone.push(link);
                            break;
                        }
                        Some(0) => {
                            io.stalled_since = None;
                            break;
                        }
                        // Records pulled bytes out of smoltcp's buffers (see `Bridge::pump`):
                        // the windows opened, and the stack must say so to the applications.
                        Some(_) => react = true,
                    }
                }
                match io.stream.try_write(&io.out[io.written..]) {
                    Ok(n) => {
                        io.written += n;
                        io.stalled_since = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        io.stalled_since.get_or_insert(now);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(link = %link, error = %e, "writing to the relay failed");
                        self.bridge.link_error(link, e);
                        io.out.clear();
                        io.written = 0;
                        react = true;
                        break;
                    }
                }
            }
        }
        for link in gone {
            if let Some(mut io) = self.links.remove(&link) {
                // The session is over and its Close is out: end the stream politely.
                tokio::spawn(async move {
                    let _ = io.stream.shutdown().await;
                });
            }
        }
        react
    }

    fn status(&self) -> Status {
        let stack = self.bridge.stack();
        let map = stack.map();
        Status {
            interface: self.tun.name().to_owned(),
            interface_addr: map.interface_addr(),
            subnet: map.subnet(),
            devices: map.devices().map(|(a, d)| (d.clone(), a)).collect(),
            interface_addr_v6: self.tun.addr_v6(),
            devices_v6: map.devices().map(|(a, d)| (d.clone(), map.v6_of(a))).collect(),
            routes: map.routes().map(|(p, d)| (p, d.clone())).collect(),
            flows: stack.flows_per_device(),
            stats: stack.stats().clone(),
            sessions: map.devices().map(|(_, d)| (d.clone(), self.bridge.describe(d))).collect(),
            bridge: self.bridge.stats(),
            udp: self.bridge.udp_status(),
        }
    }
}

/// Reads a packet into `packet` (its virtio-net header, if the interface has them, into `hdr`);
/// returns the packet's length.
async fn read_packet(
    tun: &AsyncDevice,
    vnet: bool,
    hdr: &mut [u8; VNET_HDR_LEN],
    packet: &mut [u8],
) -> io::Result<usize> {
    loop {
        tun.readable().await?;
        match try_read_packet(tun, vnet, hdr, packet) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// [`read_packet`] if one is waiting, else `WouldBlock`.
fn try_read_packet(
    tun: &AsyncDevice,
    vnet: bool,
    hdr: &mut [u8; VNET_HDR_LEN],
    packet: &mut [u8],
) -> io::Result<usize> {
    if !vnet {
        return tun.try_recv(packet);
    }
    let n = tun.try_recv_vectored(&mut [IoSliceMut::new(hdr), IoSliceMut::new(packet)])?;
    Ok(n.saturating_sub(VNET_HDR_LEN))
}

/// A seed for smoltcp's initial sequence numbers: not secret, only different per run.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
