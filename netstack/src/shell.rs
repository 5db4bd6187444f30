//! The tokio driver around [`Stack`]: reads packets from the TUN, writes the stack's packets back,
//! asks the [`Opener`] to open each new flow, and pumps each flow's bytes between smoltcp and the
//! opener's stream.
//!
//! One task owns the stack and waits on: the TUN being readable, a flow task saying its stream
//! has data or room (a shared set of flow ids plus a `Notify`), an open finishing, the stack's
//! next timer, and shutdown. Nothing spins or sleeps a fixed time.
//!
//! Each open flow has two tasks. The reader reads the stream into chunks and sends them through a
//! bounded channel; the driver moves them into smoltcp only as fast as smoltcp's send buffer
//! takes them (so a full buffer stops the reads). The writer writes chunks the driver read out of
//! smoltcp; the driver reads smoltcp only while that channel has room (so a slow stream closes the
//! TCP window toward the application).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{AbortHandle, JoinHandle};

use crate::map::{AddressMap, DeviceKey, FlowTarget, Prefix};
use crate::stack::{Event, FlowError, FlowId, RefuseKind, Stack, StackConfig, Stats};
use crate::tun::{Tun, TunError};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens flows on the far side (an encrypted session to the device).
pub trait Opener: Send + Sync + 'static {
    /// The flow's byte stream once open.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// Open a flow to `to.target` on `to.device`. Resolve only once the device has connected to
    /// the target: the application gets its SYN-ACK then.
    fn open(&self, to: FlowTarget) -> BoxFuture<'static, Result<Self::Stream, OpenRefused>>;
}

/// Why a flow could not be opened; `kind` decides what the application sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRefused {
    /// Refused (the target refused, or the device does not permit it) or unreachable.
    pub kind: RefuseKind,
    /// For the logs.
    pub reason: String,
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
}

impl Default for NetstackConfig {
    fn default() -> Self {
        NetstackConfig {
            name: "np0".into(),
            map: AddressMap::default(),
            stack: StackConfig::default(),
            open_timeout: Duration::from_secs(20),
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
    /// Routed prefixes.
    pub routes: Vec<(Prefix, DeviceKey)>,
    /// Flows per device (pending and open).
    pub flows: HashMap<DeviceKey, usize>,
    /// Counters of the stack.
    pub stats: Stats,
}

/// Asks a running netstack for its [`Status`].
#[derive(Debug, Clone)]
pub struct StatusHandle(mpsc::Sender<oneshot::Sender<Status>>);

impl StatusHandle {
    /// The current status, or `None` if the netstack has stopped.
    pub async fn snapshot(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// Bytes per chunk moved between smoltcp and a stream (one maximal segment).
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction per flow: with smoltcp's buffer, what a stalled flow holds.
const CHUNKS_QUEUED: usize = 4;
/// TUN packets handled before the stack's output is written out.
const RX_BATCH: usize = 64;

/// The TUN interface and its TCP stack. Create with [`Netstack::new`] (which brings the interface
/// up), then [`Netstack::serve`].
pub struct Netstack {
    tun: Tun,
    config: NetstackConfig,
    status_tx: mpsc::Sender<oneshot::Sender<Status>>,
    status_rx: mpsc::Receiver<oneshot::Sender<Status>>,
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
    pub async fn run<O: Opener>(
        config: NetstackConfig,
        opener: O,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetstackError> {
        Netstack::new(config)?.serve(opener, shutdown).await
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

    /// Serve flows until `shutdown` resolves, then remove the interface.
    pub async fn serve<O: Opener>(self, opener: O, shutdown: impl Future<Output = ()>) -> Result<(), NetstackError> {
        let Netstack { tun, config, status_tx, status_rx } = self;
        drop(status_tx);
        let mut stack_config = config.stack.clone();
        if stack_config.seed == 0 {
            stack_config.seed = random_seed();
        }
        let (opened_tx, opened_rx) = mpsc::unbounded_channel();
        let mut driver = Driver {
            stack: Stack::new(stack_config, config.map.clone(), Instant::now()),
            tun,
            opener: Arc::new(opener),
            open_timeout: config.open_timeout,
            flows: HashMap::new(),
            opening: HashMap::new(),
            opened_tx,
            wake: Arc::new(Wake::default()),
            buf: vec![0u8; CHUNK],
        };
        let result = driver.run(opened_rx, status_rx, shutdown).await;
        for flow in driver.flows.values() {
            flow.reader.abort();
            flow.writer.abort();
        }
        for open in driver.opening.values() {
            open.abort();
        }
        result
    }
}

/// Flow ids whose tasks have news, and the notification that wakes the driver.
#[derive(Default)]
struct Wake {
    ids: Mutex<HashSet<FlowId>>,
    notify: Notify,
}

impl Wake {
    fn wake(&self, id: FlowId) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(id);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<FlowId> {
        self.ids.lock().map(|mut ids| ids.drain().collect()).unwrap_or_default()
    }
}

/// From a flow's reader task to the driver.
enum Up {
    Data(Vec<u8>),
    /// The stream failed: reset the flow.
    Failed,
}

/// The driver's side of an open flow.
struct FlowIo {
    /// Chunks read from the stream; closed when the stream ended.
    up_rx: mpsc::Receiver<Up>,
    /// A chunk smoltcp has not taken all of yet.
    up_partial: Option<(Vec<u8>, usize)>,
    /// The stream ended and the FIN is queued.
    up_closed: bool,
    /// Chunks for the stream; `None` once the application's FIN has been passed on.
    down_tx: Option<mpsc::Sender<Vec<u8>>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

struct Driver<O: Opener> {
    stack: Stack,
    tun: Tun,
    opener: Arc<O>,
    open_timeout: Duration,
    flows: HashMap<FlowId, FlowIo>,
    opening: HashMap<FlowId, AbortHandle>,
    opened_tx: mpsc::UnboundedSender<(FlowId, Result<O::Stream, OpenRefused>)>,
    wake: Arc<Wake>,
    buf: Vec<u8>,
}

impl<O: Opener> Driver<O> {
    async fn run(
        &mut self,
        mut opened_rx: mpsc::UnboundedReceiver<(FlowId, Result<O::Stream, OpenRefused>)>,
        mut status_rx: mpsc::Receiver<oneshot::Sender<Status>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetstackError> {
        tokio::pin!(shutdown);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut packet = vec![0u8; 65536];
        loop {
            self.flush().await;
            let deadline = self.stack.poll_at(Instant::now());
            if let Some(at) = deadline {
                timer.as_mut().reset(at.into());
            }
            let wake = self.wake.clone();
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                read = self.tun.device().recv(&mut packet) => {
                    let n = read?;
                    let now = Instant::now();
                    self.stack.handle_packet(&packet[..n], now);
                    for _ in 1..RX_BATCH {
                        match self.tun.device().try_recv(&mut packet) {
                            Ok(n) => self.stack.handle_packet(&packet[..n], now),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                () = wake.notify.notified() => {
                    for id in self.wake.take() {
                        self.pump(id);
                    }
                }
                Some((id, result)) = opened_rx.recv() => self.opened(id, result),
                Some(reply) = status_rx.recv() => {
                    let _ = reply.send(self.status());
                }
                () = &mut timer, if deadline.is_some() => self.stack.handle_timeout(Instant::now()),
            }
        }
    }

    /// Handle events and write packets until the stack has nothing more to say.
    async fn flush(&mut self) {
        loop {
            let mut progress = false;
            while let Some(event) = self.stack.poll_event() {
                progress = true;
                self.event(event);
            }
            while let Some(packet) = self.stack.poll_transmit() {
                progress = true;
                if let Err(e) = self.tun.device().send(&packet).await {
                    tracing::debug!(error = %e, "writing to the TUN failed; packet dropped");
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::NewFlow { id, target, .. } => {
                tracing::debug!(flow = %id, device = %target.device, target = %target.target, "opening flow");
                let open = self.opener.open(target);
                let timeout = self.open_timeout;
                let tx = self.opened_tx.clone();
                let task = tokio::spawn(async move {
                    let result = match tokio::time::timeout(timeout, open).await {
                        Ok(r) => r,
                        Err(_) => Err(OpenRefused { kind: RefuseKind::Unreachable, reason: "open timed out".into() }),
                    };
                    let _ = tx.send((id, result));
                });
                self.opening.insert(id, task.abort_handle());
            }
            Event::Readable(id) | Event::Writable(id) => self.pump(id),
            Event::Closed(id) => {
                if let Some(open) = self.opening.remove(&id) {
                    open.abort();
                }
                if let Some(flow) = self.flows.remove(&id) {
                    tracing::debug!(flow = %id, "flow closed");
                    // The writer finishes what is queued and closes the stream; the reader has
                    // nowhere to send to any more.
                    flow.reader.abort();
                }
            }
        }
    }

    fn opened(&mut self, id: FlowId, result: Result<O::Stream, OpenRefused>) {
        self.opening.remove(&id);
        match result {
            Ok(stream) => {
                if let Err(e) = self.stack.accept_flow(id, Instant::now()) {
                    tracing::debug!(flow = %id, error = %e, "flow gone before it opened");
                    return;
                }
                let (mut read_half, mut write_half) = tokio::io::split(stream);
                let (up_tx, up_rx) = mpsc::channel(CHUNKS_QUEUED);
                let (down_tx, mut down_rx) = mpsc::channel::<Vec<u8>>(CHUNKS_QUEUED);
                let wake = self.wake.clone();
                let reader = tokio::spawn(async move {
                    loop {
                        let mut chunk = vec![0u8; CHUNK];
                        let up = match read_half.read(&mut chunk).await {
                            Ok(0) => break,
                            Ok(n) => {
                                chunk.truncate(n);
                                Up::Data(chunk)
                            }
                            Err(_) => Up::Failed,
                        };
                        let failed = matches!(up, Up::Failed);
                        if up_tx.send(up).await.is_err() {
                            return;
                        }
                        wake.wake(id);
                        if failed {
                            return;
                        }
                    }
                    drop(up_tx);
                    wake.wake(id);
                });
                let wake = self.wake.clone();
                let writer = tokio::spawn(async move {
                    while let Some(chunk) = down_rx.recv().await {
                        // Room in the channel again: the driver may read more from smoltcp.
                        wake.wake(id);
                        if write_half.write_all(&chunk).await.is_err() {
                            // Dropping the receiver tells the driver to reset the flow.
                            drop(down_rx);
                            wake.wake(id);
                            return;
                        }
                    }
                    let _ = write_half.shutdown().await;
                });
                self.flows.insert(
                    id,
                    FlowIo { up_rx, up_partial: None, up_closed: false, down_tx: Some(down_tx), reader, writer },
                );
                tracing::debug!(flow = %id, "flow open");
            }
            Err(refused) => {
                tracing::debug!(flow = %id, reason = %refused.reason, kind = ?refused.kind, "flow refused");
                let _ = self.stack.refuse_flow(id, refused.kind);
            }
        }
    }

    /// Move what can be moved between the flow's stream tasks and smoltcp.
    fn pump(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let stack = &mut self.stack;

        // Stream → application, as far as smoltcp's send buffer takes it.
        loop {
            if let Some((chunk, offset)) = &mut flow.up_partial {
                match stack.send(id, &chunk[*offset..]) {
                    Ok(n) => *offset += n,
                    Err(_) => {
                        flow.up_partial = None;
                        break;
                    }
                }
                if *offset < chunk.len() {
                    break;
                }
                flow.up_partial = None;
            }
            match flow.up_rx.try_recv() {
                Ok(Up::Data(chunk)) => flow.up_partial = Some((chunk, 0)),
                Ok(Up::Failed) => {
                    let _ = stack.abort(id);
                    return;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if !flow.up_closed {
                        flow.up_closed = true;
                        let _ = stack.close(id);
                    }
                    break;
                }
            }
        }

        // Application → stream, while the writer has room.
        let mut down_done = false;
        while let Some(down_tx) = &flow.down_tx {
            let permit = match down_tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    // The stream failed.
                    let _ = stack.abort(id);
                    down_done = true;
                    break;
                }
            };
            match stack.recv(id, &mut self.buf) {
                Ok(0) => break,
                Ok(n) => permit.send(self.buf[..n].to_vec()),
                Err(FlowError::Finished) => {
                    // The application's FIN: the writer shuts the stream's write side down.
                    down_done = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if down_done {
            flow.down_tx = None;
        }
    }

    fn status(&self) -> Status {
        let map = self.stack.map();
        Status {
            interface: self.tun.name().to_owned(),
            interface_addr: map.interface_addr(),
            subnet: map.subnet(),
            devices: map.devices().map(|(a, d)| (d.clone(), a)).collect(),
            routes: map.routes().map(|(p, d)| (p, d.clone())).collect(),
            flows: self.stack.flows_per_device(),
            stats: self.stack.stats().clone(),
        }
    }
}

/// A seed for smoltcp's initial sequence numbers: not secret, only different per run.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
