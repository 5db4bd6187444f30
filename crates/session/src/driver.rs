//! The tokio shell for `np forward` and `npd`: runs a [`Connection`] over one byte stream and
//! hands its flows out as [`FlowStream`]s (`AsyncRead + AsyncWrite`).
//!
//! Two tasks per session. The reader borrows the connection's receive buffer, reads into it
//! without holding the lock, then takes the lock once to hand it back: the connection opens the
//! records and queues each flow's bytes. The writer takes the lock to have the connection seal up
//! to [`WRITE_BATCH`] bytes of records, releases it, and writes them with one call. Flows lock
//! the shared state once per `poll_read`/`poll_write` call, never per byte. Everything about the
//! protocol (framing, truncation, keepalives, credit) is the connection's; this file only moves
//! bytes and wakes tasks.
//!
//! A session configured to resume ([`MuxConfig::resume`]) outlives its stream: when the stream
//! breaks the connection is suspended, the owner learns it from
//! [`SessionHandle::transport_lost`], finds a new stream (rejoins the relay) and hands it over
//! with [`SessionHandle::resume_with`]. Each stream has its own reader and writer, numbered by an
//! epoch so that a late read from an old stream is never taken for the new one's bytes; the old
//! writer runs the connection's timers (the resume window) until a new stream arrives.
//!
//! Memory stays bounded against a hostile peer: the reader pauses while the connection says not
//! to read (the peer is not reading our answers), a write that makes no progress for the idle
//! timeout ends the session, and incoming flows wait in a bounded channel.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The time for the mux: tokio's clock, so that a test on a paused clock drives the whole
/// session (timers and rate limits alike) in virtual time.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use bytes::{Bytes, BytesMut};

use crate::connection::{Chunk, ConnEvent, Connection, Recv, TransportState};
use crate::mux::AssocId;

mod udp;
use crate::mux::{FlowId, MuxConfig};
use crate::record::{HEADER_LEN, MAX_RECORD_PLAINTEXT, TAG_LEN};
use crate::{SessionError, SessionKeys};
pub use udp::{UdpAssoc, UdpSender};

/// Bytes of records the writer gathers before one socket write: up to eight full records (what
/// is pending, never waited for), enough to amortise the syscall and the lock; eight measured a
/// little better than four in the bench (`np forward` 1.27x to 1.41x the tunnel, noisy).
pub const WRITE_BATCH: usize = 8 * (MAX_RECORD_PLAINTEXT + HEADER_LEN + TAG_LEN);

/// [`FlowStream::carry`] reads from the local stream into at most this many buffers of this
/// size, reused: 1 MiB, the default window, which bounds what the session queues for a flow
/// (its queue's buffer grew to that much before). A flow that moved little holds little: a
/// buffer is made only when the others are in flight.
const CARRY_BUFFERS: usize = 8;
/// The most [`FlowStream::carry`] takes from a flow for one write to the local stream. Taking
/// returns credit, so this is also how far beyond its window a flow's bytes may be held here.
const DOWN_BATCH: usize = 256 * 1024;
const CARRY_BUFFER: usize = 128 * 1024;
/// A flow's first read buffer: below the mmap threshold, so a short flow maps no memory.
const CARRY_BUFFER_FIRST: usize = 16 * 1024;

/// Why opening a flow failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The device refused the flow (not permitted, or the target could not be reached).
    #[error("refused by device: {0}")]
    Refused(String),
    /// The session is gone or the request was invalid.
    #[error(transparent)]
    Session(#[from] SessionError),
}

#[derive(Default)]
struct Slot {
    /// The peer's Fin was read: reads return end of stream.
    fin: bool,
    reset: Option<String>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    open_tx: Option<oneshot::Sender<Result<(), OpenError>>>,
}

impl Slot {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

struct Shared {
    conn: Connection,
    slots: HashMap<FlowId, Slot>,
    incoming: Option<mpsc::Sender<IncomingFlow>>,
    /// Each live association's queue of received datagrams.
    udp_slots: HashMap<AssocId, mpsc::Sender<Bytes>>,
    /// Associations the client opened, for the device's application.
    incoming_udp: Option<mpsc::Sender<UdpAssoc>>,
    /// Datagrams dropped because their association's queue was full.
    udp_dropped: u64,
    /// The stream in use: bumped by each [`SessionHandle::resume_with`]. A reader or writer of
    /// an earlier one stops.
    epoch: u64,
}

struct Inner {
    shared: Mutex<Shared>,
    transmit: Notify,
    /// The writer sent something: a reader paused on a backlog may go on.
    drained: Notify,
    done: watch::Sender<Option<SessionError>>,
    /// The transport's state and epoch, as of the last dispatch.
    transport: watch::Sender<(TransportState, u64)>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the connection half-updated in a way that
        // matters more than losing the session; keep going with the inner value.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the connection's events to the flows, and wakes the writer if there is output.
    fn dispatch(self: &Arc<Self>, st: &mut Shared) {
        while let Some(ev) = st.conn.poll_event() {
            match ev {
                ConnEvent::FlowOpened { flow, target } => {
                    st.slots.insert(flow, Slot::default());
                    let incoming = IncomingFlow { inner: self.clone(), flow, target, answered: false };
                    // The channel holds as many as the mux lets the peer open, so it is full only
                    // if the application stopped taking flows; refuse rather than queue.
                    let refused = match &st.incoming {
                        Some(tx) => tx.try_send(incoming).err().map(|e| match e {
                            mpsc::error::TrySendError::Full(i) => (i, "too many flows waiting for an answer"),
                            mpsc::error::TrySendError::Closed(i) => (i, "incoming flows not accepted"),
                        }),
                        None => Some((incoming, "incoming flows not accepted")),
                    };
                    if let Some((mut inc, reason)) = refused {
                        // Nobody takes incoming flows here (a client, or a dropped receiver).
                        inc.answered = true;
                        st.slots.remove(&flow);
                        let _ = st.conn.refuse(flow, reason);
                    }
                }
                ConnEvent::FlowAccepted { flow } => {
                    if let Some(tx) = st.slots.get_mut(&flow).and_then(|s| s.open_tx.take()) {
                        let _ = tx.send(Ok(()));
                    }
                }
                ConnEvent::FlowRefused { flow, reason } => {
                    if let Some(tx) = st.slots.get_mut(&flow).and_then(|s| s.open_tx.take()) {
                        let _ = tx.send(Err(OpenError::Refused(reason)));
                    }
                }
                ConnEvent::Readable { flow } => {
                    if let Some(w) = st.slots.get_mut(&flow).and_then(|s| s.read_waker.take()) {
                        w.wake();
                    }
                }
                ConnEvent::Writable { flow } => {
                    if let Some(w) = st.slots.get_mut(&flow).and_then(|s| s.write_waker.take()) {
                        w.wake();
                    }
                }
                ConnEvent::FlowReset { flow, reason } => {
                    if let Some(slot) = st.slots.get_mut(&flow) {
                        slot.reset = Some(reason);
                        slot.wake();
                    }
                }
                ConnEvent::UdpOpened { assoc, target } => {
                    let rx = st.udp_slot(assoc);
                    let a = UdpAssoc::new(self.clone(), assoc, target, rx);
                    // Holds as many as the mux lets the client open; full only if the
                    // application stopped taking them.
                    let refused = match &st.incoming_udp {
                        Some(tx) => tx.try_send(a).err().map(|e| match e {
                            mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
                        }),
                        None => Some(a),
                    };
                    if let Some(mut a) = refused {
                        // Its drop would lock the state we hold: end it here instead.
                        a.ended = true;
                        st.udp_slots.remove(&assoc);
                        st.conn.udp_close(assoc, "UDP associations not accepted");
                    }
                }
                ConnEvent::Datagram { assoc, bytes } => st.udp_deliver(assoc, bytes),
                ConnEvent::UdpClosed { assoc, .. } => {
                    // Dropping the sender ends the association's `recv`.
                    st.udp_slots.remove(&assoc);
                }
                ConnEvent::Ended { error } => {
                    st.udp_slots.clear();
                    st.incoming_udp = None;
                    for slot in st.slots.values_mut() {
                        if let Some(tx) = slot.open_tx.take() {
                            let _ = tx.send(Err(OpenError::Session(error.clone())));
                        }
                        slot.wake();
                    }
                    st.incoming = None;
                    self.done.send_replace(Some(error));
                }
            }
        }
        if st.conn.wants_transmit() || st.conn.is_drained() {
            self.transmit.notify_one();
        }
        let now = (st.conn.transport_state(), st.epoch);
        self.transport.send_if_modified(|t| std::mem::replace(t, now) != now);
    }
}

/// A running session. Cloning shares it; dropping the last clone closes it.
#[derive(Clone)]
pub struct SessionHandle {
    guard: Arc<HandleGuard>,
}

struct HandleGuard {
    inner: Arc<Inner>,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.conn.close("session handle dropped");
        self.inner.dispatch(&mut st);
    }
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle").finish_non_exhaustive()
    }
}

impl SessionHandle {
    /// Opens a flow to `target` (`host:port` as the device will dial it) and waits for the
    /// device's answer.
    pub async fn open(&self, target: &str) -> Result<FlowStream, OpenError> {
        let inner = &self.guard.inner;
        let (tx, rx) = oneshot::channel();
        let stream = {
            let mut st = inner.lock();
            let flow = st.conn.open(target)?;
            st.slots.insert(flow, Slot { open_tx: Some(tx), ..Slot::default() });
            inner.transmit.notify_one();
            // Created before awaiting so that a cancelled `open` still cleans up on drop.
            FlowStream::new(inner.clone(), flow)
        };
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(OpenError::Session(SessionError::Closed("session ended".into()))),
        }
    }

    /// Closes the session: a `Close` frame is sent and every flow fails.
    pub fn close(&self, reason: &str) {
        let inner = &self.guard.inner;
        let mut st = inner.lock();
        st.conn.close(reason);
        inner.dispatch(&mut st);
    }

    /// Waits until the session ends and returns why (`Closed` for an orderly end).
    pub async fn closed(&self) -> SessionError {
        let mut rx = self.guard.inner.done.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return SessionError::Closed("session ended".into());
            }
        }
    }

    /// The error that ended the session, if it has ended.
    pub fn error(&self) -> Option<SessionError> {
        self.guard.inner.lock().conn.error().cloned()
    }

    /// Where the session's transport stands.
    pub fn transport_state(&self) -> TransportState {
        self.guard.inner.lock().conn.transport_state()
    }

    /// Waits until the transport is lost (the session suspended: hand it a new stream with
    /// [`SessionHandle::resume_with`]); `Err` once the session has ended instead.
    pub async fn transport_lost(&self) -> Result<(), SessionError> {
        let mut rx = self.guard.inner.transport.subscribe();
        let mut done = self.guard.inner.done.subscribe();
        loop {
            if let Some(e) = done.borrow_and_update().clone() {
                return Err(e);
            }
            if rx.borrow_and_update().0 == TransportState::Suspended {
                return Ok(());
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(SessionError::Closed("session ended".into())) },
                r = done.changed() => if r.is_err() { return Err(SessionError::Closed("session ended".into())) },
            }
        }
    }

    /// Waits until the resume begun by [`SessionHandle::resume_with`] has finished: `Ok(true)`
    /// when the session is live again, `Ok(false)` when the attempt failed (the session is
    /// suspended again; [`SessionHandle::resume_error`] says why), `Err` when the session ended.
    pub async fn resumed(&self) -> Result<bool, SessionError> {
        let mut rx = self.guard.inner.transport.subscribe();
        let mut done = self.guard.inner.done.subscribe();
        loop {
            if let Some(e) = done.borrow_and_update().clone() {
                return Err(e);
            }
            match rx.borrow_and_update().0 {
                TransportState::Live => return Ok(true),
                TransportState::Suspended => return Ok(false),
                TransportState::Resuming => {}
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(SessionError::Closed("session ended".into())) },
                r = done.changed() => if r.is_err() { return Err(SessionError::Closed("session ended".into())) },
            }
        }
    }

    /// Why the latest resume attempt failed.
    pub fn resume_error(&self) -> Option<SessionError> {
        self.guard.inner.lock().conn.resume_error().cloned()
    }

    /// Resumes the session over `stream` (a new transport to the same peer, e.g. the relay
    /// rejoined): the resume exchange runs on it, then the records the peer lacks are resent.
    /// Any earlier stream is given up. See [`SessionHandle::resumed`] for the outcome.
    pub fn resume_with<S>(&self, stream: S) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let inner = &self.guard.inner;
        let epoch = {
            let mut st = inner.lock();
            st.conn.resume(now())?;
            st.epoch += 1;
            inner.dispatch(&mut st);
            st.epoch
        };
        spawn_io(inner.clone(), stream, epoch);
        Ok(())
    }
}

/// The device side of a session: yields the client's flow requests.
pub struct DeviceSession {
    handle: SessionHandle,
    incoming: mpsc::Receiver<IncomingFlow>,
    incoming_udp: Option<mpsc::Receiver<UdpAssoc>>,
}

impl std::fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSession").finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// The next flow the client asks for; `None` once the session has ended.
    pub async fn next_flow(&mut self) -> Option<IncomingFlow> {
        self.incoming.recv().await
    }

    /// The session, to close it or wait for its end.
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// The UDP associations the client opens, once (`None` after the first call). Each must be
    /// checked against the permits and refused ([`UdpAssoc::close`]) or served.
    pub fn take_udp(&mut self) -> Option<mpsc::Receiver<UdpAssoc>> {
        self.incoming_udp.take()
    }
}

/// A flow the client asked for. Answer with [`IncomingFlow::accept`] (or
/// [`IncomingFlow::accept_with`]) or [`IncomingFlow::refuse`]; dropping it refuses.
pub struct IncomingFlow {
    inner: Arc<Inner>,
    flow: FlowId,
    target: String,
    answered: bool,
}

impl std::fmt::Debug for IncomingFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingFlow").field("flow", &self.flow).field("target", &self.target).finish()
    }
}

impl IncomingFlow {
    /// Where the client wants to go (`host:port`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The flow's id.
    pub fn id(&self) -> FlowId {
        self.flow
    }

    /// Refuses the flow; the client sees `reason`.
    pub fn refuse(mut self, reason: &str) {
        self.answered = true;
        let mut st = self.inner.lock();
        st.slots.remove(&self.flow);
        let _ = st.conn.refuse(self.flow, reason);
        self.inner.transmit.notify_one();
    }

    /// Accepts the flow and returns it as a byte stream.
    pub fn accept(mut self) -> Result<FlowStream, SessionError> {
        self.answered = true;
        let mut st = self.inner.lock();
        st.conn.accept(self.flow)?;
        self.inner.transmit.notify_one();
        Ok(FlowStream::new(self.inner.clone(), self.flow))
    }

    /// Accepts the flow and pumps bytes between it and `stream` (typically the dialled
    /// `TcpStream`) until both directions end. Returns bytes moved (to stream, from stream).
    pub fn accept_with<S>(self, stream: S) -> Result<tokio::task::JoinHandle<io::Result<(u64, u64)>>, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let flow = self.accept()?;
        Ok(tokio::spawn(flow.carry(stream)))
    }
}

impl Drop for IncomingFlow {
    fn drop(&mut self) {
        if !self.answered {
            let mut st = self.inner.lock();
            st.slots.remove(&self.flow);
            let _ = st.conn.refuse(self.flow, "not answered");
            self.inner.transmit.notify_one();
        }
    }
}

/// One flow as a byte stream: `AsyncRead + AsyncWrite`, so it can be
/// `tokio::io::copy_bidirectional`-ed with a local socket. `shutdown` half-closes.
pub struct FlowStream {
    inner: Arc<Inner>,
    flow: FlowId,
    write_closed: bool,
}

impl std::fmt::Debug for FlowStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowStream").field("flow", &self.flow).finish()
    }
}

/// The flow's slot, or why it cannot be read or written any more.
fn live_slot(slots: &mut HashMap<FlowId, Slot>, flow: FlowId) -> io::Result<&mut Slot> {
    let slot = slots.get_mut(&flow).ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "flow gone"))?;
    if let Some(reason) = &slot.reset {
        return Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("flow reset by peer: {reason}")));
    }
    Ok(slot)
}

fn session_io_error(e: &SessionError) -> io::Error {
    let kind = match e {
        SessionError::Closed(_) => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e.clone())
}

impl FlowStream {
    fn new(inner: Arc<Inner>, flow: FlowId) -> FlowStream {
        FlowStream { inner, flow, write_closed: false }
    }

    /// The flow's id.
    pub fn id(&self) -> FlowId {
        self.flow
    }
}

impl FlowStream {
    /// Queues as much of `data` as credit allows without copying it (split off its front);
    /// `Pending` while there is no credit at all.
    pub fn poll_send_bytes(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<usize>> {
        let len = data.len();
        self.poll_queue(cx, len, |conn, flow| conn.send_bytes(flow, data))
    }

    /// `poll_write` and `poll_send_bytes`: `queue` hands the connection up to `len` bytes.
    fn poll_queue(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        queue: impl FnOnce(&mut Connection, FlowId) -> Result<usize, SessionError>,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "flow shut down")));
        }
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        let slot = match live_slot(&mut st.slots, self.flow) {
            Ok(slot) => slot,
            Err(e) => return Poll::Ready(Err(e)),
        };
        match queue(&mut st.conn, self.flow) {
            Ok(0) if len > 0 => {
                slot.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) => {
                self.inner.transmit.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(session_io_error(&e))),
        }
    }

    /// Takes the received chunks waiting, up to about `max` bytes, into `into` (whole chunks,
    /// uncopied); `Ready(Ok(true))` once the peer's Fin is behind them. `Pending` only while
    /// nothing at all waits.
    fn poll_recv_batch(&mut self, cx: &mut Context<'_>, into: &mut Vec<Bytes>, max: usize) -> Poll<io::Result<bool>> {
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        let slot = match live_slot(&mut st.slots, self.flow) {
            Ok(slot) => slot,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let mut taken = 0;
        let fin = loop {
            if slot.fin {
                break true;
            }
            if taken >= max {
                break false;
            }
            match st.conn.recv_bytes(self.flow) {
                Ok(Chunk::Data(bytes)) => {
                    taken += bytes.len();
                    into.push(bytes);
                }
                Ok(Chunk::Fin) => slot.fin = true,
                Ok(Chunk::Empty) if taken == 0 => {
                    slot.read_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Ok(Chunk::Empty) => break false,
                Err(e) => return Poll::Ready(Err(session_io_error(&e))),
            }
        };
        if taken > 0 && st.conn.wants_transmit() {
            // What was taken returned credit: the peer may send on.
            self.inner.transmit.notify_one();
        }
        Poll::Ready(Ok(fin))
    }

    /// Carries bytes both ways between this flow and `stream` (a local TCP connection) until
    /// both directions have ended, passing each half-close on. What `copy_bidirectional` does,
    /// without its buffers: bytes read from `stream` are queued in the session as they are
    /// (owned, not copied), and received chunks are written to `stream` straight from the
    /// opened record. Returns the bytes moved (to `stream`, from `stream`); the first error
    /// either way ends both.
    pub async fn carry<S>(mut self, stream: S) -> io::Result<(u64, u64)>
    where
        S: AsyncRead + AsyncWrite,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let flow = Mutex::new(&mut self);
        let down = async {
            let mut moved = 0u64;
            // Every chunk waiting goes out in one vectored write: a write per chunk cost npd a
            // system call, and often a preemption by the woken reader, per record.
            let mut chunks: Vec<Bytes> = Vec::new();
            loop {
                let fin = std::future::poll_fn(|cx| {
                    flow.lock().unwrap_or_else(|p| p.into_inner()).poll_recv_batch(cx, &mut chunks, DOWN_BATCH)
                })
                .await?;
                moved += write_chunks(&mut wr, &mut chunks).await?;
                if fin {
                    wr.shutdown().await?;
                    return Ok::<u64, io::Error>(moved);
                }
            }
        };
        let up = async {
            let mut moved = 0u64;
            // Buffers reused once the chunks read into them have been sealed and sent. Fresh
            // memory for every read cost more than the copy it saves (page faults and zeroing:
            // np forward's CPU per GB went up a fifth), so a read goes into the first buffer
            // that can be reclaimed, and a new one is made only while fewer than cover the
            // flow's window (the most the session queues for it) exist.
            //
            // A flow starts with one small buffer (from the heap, not a fresh mapping: most flows
            // are short or interactive) and moves to full-size ones once a read fills it.
            let mut pool: Vec<BytesMut> = Vec::new();
            let mut size = CARRY_BUFFER_FIRST;
            let mut at = 0;
            loop {
                if pool.get(at).is_none_or(|b| b.capacity() - b.len() < size / 4) {
                    at = match pool.iter_mut().position(|b| b.try_reclaim(size)) {
                        Some(i) => i,
                        None if pool.len() < CARRY_BUFFERS => {
                            pool.push(BytesMut::with_capacity(size));
                            pool.len() - 1
                        }
                        None => {
                            // All in flight (the writer is behind): a fresh one, for now.
                            let i = (at + 1) % pool.len();
                            pool[i] = BytesMut::with_capacity(size);
                            i
                        }
                    };
                }
                let buf = &mut pool[at];
                let room = buf.capacity() - buf.len();
                let n = rd.read_buf(buf).await?;
                if n == 0 {
                    std::future::poll_fn(|cx| {
                        Pin::new(&mut **flow.lock().unwrap_or_else(|p| p.into_inner())).poll_shutdown(cx)
                    })
                    .await?;
                    return Ok::<u64, io::Error>(moved);
                }
                let mut chunk = buf.split().freeze();
                if n == room && size < CARRY_BUFFER {
                    // A bulk transfer: full-size buffers from now on (the small one is freed
                    // once its chunk has been sent).
                    size = CARRY_BUFFER;
                    pool.clear();
                    at = 0;
                }
                moved += chunk.len() as u64;
                while !chunk.is_empty() {
                    std::future::poll_fn(|cx| {
                        flow.lock().unwrap_or_else(|p| p.into_inner()).poll_send_bytes(cx, &mut chunk)
                    })
                    .await?;
                }
            }
        };
        tokio::try_join!(down, up)
    }
}

/// Writes `chunks` whole (vectored, resuming after short writes) and empties the list; returns
/// the bytes written.
async fn write_chunks<W: AsyncWrite + Unpin>(wr: &mut W, chunks: &mut Vec<Bytes>) -> io::Result<u64> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let (mut first, mut written) = (0, 0);
    while first < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = chunks[first..].iter().map(|b| io::IoSlice::new(b)).collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
        while n > 0 {
            let len = chunks[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bytes::Buf::advance(&mut chunks[first], n);
                n = 0;
            }
        }
    }
    chunks.clear();
    debug_assert_eq!(written, total);
    Ok(total as u64)
}

impl AsyncRead for FlowStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut guard = this.inner.lock();
        let st = &mut *guard;
        let slot = match live_slot(&mut st.slots, this.flow) {
            Ok(slot) => slot,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if slot.fin || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let read = st.conn.recv_with(this.flow, |chunk| {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            n
        });
        match read {
            Ok(Recv::Data(_)) => {
                if st.conn.wants_transmit() {
                    this.inner.transmit.notify_one();
                }
                Poll::Ready(Ok(()))
            }
            Ok(Recv::Fin) => {
                slot.fin = true;
                Poll::Ready(Ok(()))
            }
            Ok(Recv::Empty) => {
                slot.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(session_io_error(&e))),
        }
    }
}

impl AsyncWrite for FlowStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_queue(cx, data.len(), |conn, flow| conn.send(flow, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        let mut st = this.inner.lock();
        if let Some(e) = st.conn.error() {
            return Poll::Ready(Err(session_io_error(e)));
        }
        if st.conn.has_flow(this.flow) {
            if let Err(e) = st.conn.finish(this.flow) {
                return Poll::Ready(Err(session_io_error(&e)));
            }
            this.inner.transmit.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for FlowStream {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.slots.remove(&self.flow);
        // Our side finished: let queued data and the Fin go out, discard what still arrives.
        // Otherwise nobody will read or write this flow again: abort it.
        if self.write_closed {
            st.conn.discard(self.flow);
        } else {
            st.conn.abort(self.flow, "flow dropped");
        }
        if st.conn.wants_transmit() {
            self.inner.transmit.notify_one();
        }
    }
}

/// Starts the client side of a session over `stream` (already connected and paired at the
/// relay, handshake done). Must be called within a tokio runtime.
pub fn client_session<S>(stream: S, keys: SessionKeys, config: MuxConfig) -> SessionHandle
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    start(stream, keys, config, None)
}

/// Starts the device side of a session over `stream`. Must be called within a tokio runtime.
pub fn device_session<S>(stream: S, keys: SessionKeys, config: MuxConfig) -> DeviceSession
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // No more flows can wait for an answer than the peer may have open; the same for
    // associations.
    let (tx, rx) = mpsc::channel(config.max_peer_flows.max(1));
    let (udp_tx, udp_rx) = mpsc::channel(config.max_udp_assocs.max(1));
    let handle = start(stream, keys, config, Some(tx));
    handle.guard.inner.lock().incoming_udp = Some(udp_tx);
    DeviceSession { handle, incoming: rx, incoming_udp: Some(udp_rx) }
}

fn start<S>(
    stream: S,
    keys: SessionKeys,
    config: MuxConfig,
    incoming: Option<mpsc::Sender<IncomingFlow>>,
) -> SessionHandle
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (done, _) = watch::channel(None);
    let conn = Connection::new(&keys, config, now());
    drop(keys);
    let inner = Arc::new(Inner {
        shared: Mutex::new(Shared {
            conn,
            slots: HashMap::new(),
            incoming,
            udp_slots: HashMap::new(),
            incoming_udp: None,
            udp_dropped: 0,
            epoch: 0,
        }),
        transmit: Notify::new(),
        drained: Notify::new(),
        done,
        transport: watch::channel((TransportState::Live, 0)).0,
    });
    spawn_io(inner.clone(), stream, 0);
    SessionHandle { guard: Arc::new(HandleGuard { inner }) }
}

/// Starts the reader and writer of one stream.
fn spawn_io<S>(inner: Arc<Inner>, stream: S, epoch: u64)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let write_timeout = inner.lock().conn.config().idle_timeout;
    let (rd, wr) = tokio::io::split(stream);
    tokio::spawn(read_loop(inner.clone(), rd, epoch));
    tokio::spawn(write_loop(inner, wr, write_timeout, epoch));
}

/// Is this stream's epoch over, or the session, or its transport (nothing more to read)?
fn stream_over(st: &Shared, epoch: u64) -> bool {
    st.epoch != epoch || st.conn.error().is_some() || st.conn.transport_state() == TransportState::Suspended
}

/// Resolves when the stream of `epoch` is given up for a newer one.
async fn superseded(rx: &mut watch::Receiver<(TransportState, u64)>, epoch: u64) {
    let _ = rx.wait_for(|t| t.1 != epoch).await;
}

/// For the writer of stream `epoch`: resolves `true` once a newer stream took over (or the
/// session is gone), `false` once this stream is lost (unless it is known to be already).
async fn transport_changed(rx: &mut watch::Receiver<(TransportState, u64)>, epoch: u64, lost: bool) -> bool {
    match rx.wait_for(|t| t.1 != epoch || (!lost && t.0 == TransportState::Suspended)).await {
        Ok(t) => t.1 != epoch,
        Err(_) => true,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut rd: R, epoch: u64) {
    let mut done = inner.done.subscribe();
    let mut transport = inner.transport.subscribe();
    loop {
        // The connection's own buffer, borrowed so the read needs no lock and no copy.
        let mut buf = {
            let mut st = inner.lock();
            if stream_over(&st, epoch) {
                return;
            }
            st.conn.lend_input_buffer()
        };
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            // The session ended elsewhere (writer error, local close): stop reading.
            _ = done.wait_for(Option::is_some) => return,
            // A new stream took over: this one's bytes are no longer the session's (the buffer,
            // holding at most the start of a record, is dropped; the peer resends it).
            _ = superseded(&mut transport, epoch) => return,
        };
        // In a block of its own: the guard must be gone before the next await.
        let paused = {
            let mut guard = inner.lock();
            let st = &mut *guard;
            if st.epoch != epoch {
                return;
            }
            let now = now();
            match read {
                Ok(0) => {
                    st.conn.handle_input_buffer(buf, now);
                    st.conn.handle_eof();
                }
                Ok(_) => st.conn.handle_input_buffer(buf, now),
                Err(e) => {
                    st.conn.handle_input_buffer(buf, now);
                    st.conn.handle_io_error(e);
                }
            }
            inner.dispatch(st);
            if stream_over(st, epoch) {
                return;
            }
            !st.conn.wants_input()
        };
        if paused {
            tracing::debug!("peer is not reading our answers: pausing reads");
            loop {
                tokio::select! {
                    _ = inner.drained.notified() => {}
                    _ = done.wait_for(Option::is_some) => return,
                }
                let (ended, paused) = {
                    let st = inner.lock();
                    (stream_over(&st, epoch), !st.conn.wants_input())
                };
                if ended {
                    return;
                }
                if !paused {
                    break;
                }
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut wr: W, stall: Duration, epoch: u64) {
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH + MAX_RECORD_PLAINTEXT + HEADER_LEN + TAG_LEN);
    // A session that resumes keeps what it sends: taken as shared buffers, no copy.
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut transport = inner.transport.subscribe();
    // Set once this stream is lost: the loop then only runs the timers (the resume window)
    // until a newer stream takes over.
    let mut lost = false;
    // Whether the lost stream's writing side was shut down.
    let mut shut = false;
    loop {
        let (drained, timeout) = {
            let mut guard = inner.lock();
            let st = &mut *guard;
            if st.epoch != epoch {
                return;
            }
            let now = now();
            if st.conn.poll_timeout().is_some_and(|t| t <= now) {
                st.conn.handle_timeout(now);
            }
            if !lost {
                if st.conn.is_resumable() {
                    let mut size = 0;
                    while size < WRITE_BATCH {
                        let Some(b) = st.conn.poll_transmit_bytes(now, WRITE_BATCH - size) else { break };
                        size += b.len();
                        pieces.push(b);
                    }
                } else {
                    st.conn.poll_transmit(now, &mut out, WRITE_BATCH);
                }
            }
            inner.dispatch(st);
            if st.conn.transport_state() == TransportState::Suspended {
                lost = true;
                out.clear();
                pieces.clear();
            }
            (st.conn.is_drained(), st.conn.poll_timeout())
        };
        if !out.is_empty() || !pieces.is_empty() {
            tracing::trace!(bytes = out.len() + pieces.iter().map(Bytes::len).sum::<usize>(), "writing records");
            // A peer that reads nothing for as long as the idle timeout is gone or hostile
            // (pinging us while our answers pile up); either way the session is over. Without
            // this bound the writer would wait forever and the keepalive timer never run.
            let write = async {
                if out.is_empty() {
                    write_chunks(&mut wr, &mut pieces).await.map(drop)
                } else {
                    wr.write_all(&out).await
                }
            };
            let written = match tokio::time::timeout(stall, write).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer read nothing for {}s", stall.as_secs()),
                )),
            };
            out.clear();
            pieces.clear();
            if let Err(e) = written {
                let mut st = inner.lock();
                if st.epoch != epoch {
                    return;
                }
                st.conn.handle_io_error(e);
                inner.dispatch(&mut st);
                if st.conn.error().is_some() {
                    return;
                }
                lost = true;
                continue;
            }
            // `notify_one` keeps a permit, so a reader that is about to wait still sees it.
            inner.drained.notify_one();
            continue;
        }
        if lost && !shut {
            // The stream is done with, whatever comes next: say so at once. Held open, it kept
            // the relay pairing it with a peer that was gone (a killed client) for as long as
            // the resume window, and the relay's slot with it.
            shut = true;
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
        }
        if drained {
            if !lost {
                let _ = wr.shutdown().await;
            }
            return;
        }
        match timeout {
            Some(t) => {
                tokio::select! {
                    _ = inner.transmit.notified() => {}
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {}
                    // A newer stream took over (stop), or the reader lost this one (shut it, above).
                    stop = transport_changed(&mut transport, epoch, lost) => if stop { return },
                }
            }
            None => tokio::select! {
                _ = inner.transmit.notified() => {}
                stop = transport_changed(&mut transport, epoch, lost) => if stop { return },
            },
        }
    }
}
