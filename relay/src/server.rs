//! The tokio shell around [`Pairing`]: accept, authenticate, hand paired streams to
//! [`forward`](crate::forward), enforce deadlines.
//!
//! Each connection is one task. A first side waits in its own task for a [`Outcome`]; the
//! second side's task hands its stream over and ends, so the first side's task forwards both.
//! A reaper task wakes at [`Pairing::poll_timeout`] and refuses sides whose peer never came.

use crate::config::RelayConfig;
use crate::directory::KeyDirectory;
use crate::forward::{forward, Ended};
use crate::metrics::RelayMetrics;
use crate::pairing::{Decision, PairKey, Pairing, PairingLimits};
use crate::refusal::Refusal;
use np_relay_proto::{join_transcript, proof_transcript, short_hex, Join, RelayMsg, Role, MAX_PREAUTH_FRAME};
use np_wire::io::read_frame;
use np_wire::{decode_msg, encode_msg, WireError};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;

/// Listen backlog: a burst of connections is accepted (and then limited by `max_preauth`)
/// instead of being dropped by the kernel. Linux caps it at net.core.somaxconn (4096 here).
const BACKLOG: u32 = 4096;
/// Time allowed to deliver a Refused frame and read what the side still sends before closing,
/// so the close is a FIN after the reason rather than a reset that could destroy it.
const REFUSE_LINGER: Duration = Duration::from_millis(250);
/// Bytes read and dropped while lingering after a refusal.
const REFUSE_DRAIN: usize = 64 * 1024;

/// Counters an operator (or a test) can read at any time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Connections that have not finished authenticating.
    pub preauth: usize,
    /// Sessions held (waiting for a side or paired).
    pub sessions: usize,
    /// Sessions waiting for their second side.
    pub waiting: usize,
    /// Sessions forwarding bytes.
    pub forwarding: usize,
    /// TCP connections the relay holds open, in any state.
    pub connections: usize,
    /// Sessions remembered as expired (to refuse late sides).
    pub expired: usize,
}

/// What the reaper or a second side tells a waiting first side.
enum Outcome {
    /// The second side arrived; this is its stream.
    Paired(TcpStream),
    /// The session cannot go on.
    Refused(Refusal),
}

struct Table {
    pairing: Pairing<u64>,
    waiters: HashMap<u64, oneshot::Sender<Outcome>>,
}

struct Inner {
    config: RelayConfig,
    directory: Arc<dyn KeyDirectory>,
    table: Mutex<Table>,
    /// Wakes the reaper when a new deadline is set.
    wake: Notify,
    preauth: AtomicUsize,
    /// Places for unauthenticated connections; at the limit the oldest gives way.
    places: Arc<np_limits::PreAuth>,
    connections: AtomicUsize,
    forwarding: AtomicUsize,
    next_conn: AtomicU64,
    metrics: RelayMetrics,
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a table that is still consistent enough to
        // serve: every mutation is a handful of map operations.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> RelayStats {
        let t = self.table();
        RelayStats {
            preauth: self.preauth.load(Ordering::SeqCst),
            sessions: t.pairing.sessions(),
            waiting: t.pairing.waiting(),
            forwarding: self.forwarding.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            expired: t.pairing.expired(),
        }
    }
}

/// A cheap handle on a running relay, for statistics.
#[derive(Clone)]
pub struct RelayHandle {
    inner: Arc<Inner>,
}

impl RelayHandle {
    /// Current counters.
    pub fn stats(&self) -> RelayStats {
        self.inner.stats()
    }
}

/// A bound relay; [`Relay::run`] serves it.
pub struct Relay {
    listener: TcpListener,
    inner: Arc<Inner>,
    registry: Arc<np_metrics::Registry>,
}

impl Relay {
    /// Binds the relay's single listening port.
    pub async fn bind(addr: SocketAddr, config: RelayConfig, directory: Arc<dyn KeyDirectory>) -> io::Result<Relay> {
        let max_preauth = config.max_preauth;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(BACKLOG)?;
        let limits = PairingLimits {
            deadline: config.pairing_deadline,
            expired_memory: config.expired_memory,
            max_per_identity: config.max_sessions_per_identity,
            max_sessions: config.max_sessions,
        };
        let inner = Arc::new(Inner {
            config,
            directory,
            table: Mutex::new(Table { pairing: Pairing::new(limits), waiters: HashMap::new() }),
            wake: Notify::new(),
            preauth: AtomicUsize::new(0),
            places: np_limits::PreAuth::new(max_preauth),
            connections: AtomicUsize::new(0),
            forwarding: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            metrics: RelayMetrics::new(),
        });
        let registry = Arc::new(registry(&inner));
        Ok(Relay { listener, inner, registry })
    }

    /// The relay's metrics, for serving with [`np_metrics::http::serve`].
    pub fn metrics(&self) -> Arc<np_metrics::Registry> {
        self.registry.clone()
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for reading statistics while [`Relay::run`] owns the relay.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle { inner: self.inner.clone() }
    }

    /// Current counters.
    pub fn stats(&self) -> RelayStats {
        self.inner.stats()
    }

    /// Serves until `shutdown` completes, then drops every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Relay { listener, inner, .. } = self;
        tracing::info!(
            relay = %inner.config.name,
            addr = ?listener.local_addr().ok(),
            "relay listening"
        );
        let mut tasks = JoinSet::new();
        tasks.spawn(reap(inner.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let conn = inner.next_conn.fetch_add(1, Ordering::Relaxed);
                        let counted = Counted::new(&inner);
                        tasks.spawn(serve(inner.clone(), stream, addr, conn, counted));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next() => {}
            }
        }
        tracing::info!("relay shutting down");
        tasks.shutdown().await;
        Ok(())
    }

    /// Runs the relay on the current tokio runtime until the returned handle's task is aborted.
    pub fn spawn(self) -> (RelayHandle, tokio::task::JoinHandle<io::Result<()>>) {
        let handle = self.handle();
        (handle, tokio::spawn(self.run(std::future::pending())))
    }
}

/// The relay's metrics: its counters and, read from the table at scrape time, its gauges.
fn registry(inner: &Arc<Inner>) -> np_metrics::Registry {
    use np_metrics::GaugeFn;
    let mut r = np_metrics::Registry::new();
    let stats = {
        let weak = Arc::downgrade(inner);
        move || weak.upgrade().map(|i| i.stats()).unwrap_or_default()
    };
    let s = stats.clone();
    r.add(
        "np_relay_sessions",
        "Sessions held now, by state (waiting for the second side, or forwarding).",
        GaugeFn::new("state", move || {
            let st = s();
            vec![("waiting", st.waiting as f64), ("forwarding", st.forwarding as f64)]
        }),
    );
    let s = stats.clone();
    r.add(
        "np_relay_connections",
        "TCP connections held now, in any state.",
        GaugeFn::new("", move || vec![("", s().connections as f64)]),
    );
    r.add(
        "np_relay_preauth_connections",
        "Connections that have not finished authenticating.",
        GaugeFn::new("", move || vec![("", stats().preauth as f64)]),
    );
    inner.metrics.register(&mut r);
    r
}

/// Counts a connection (and, until [`Counted::authenticated`], a pre-auth one) while alive.
struct Counted {
    inner: Arc<Inner>,
    preauth: bool,
}

impl Counted {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.connections.fetch_add(1, Ordering::SeqCst);
        inner.preauth.fetch_add(1, Ordering::SeqCst);
        Counted { inner: inner.clone(), preauth: true }
    }

    fn authenticated(&mut self) {
        if std::mem::take(&mut self.preauth) {
            self.inner.preauth.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.authenticated();
        self.inner.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ends a paired session in the table when its forwarding stops, however it stops.
struct SessionGuard {
    inner: Arc<Inner>,
    key: PairKey,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.inner.table().pairing.end(&self.key);
    }
}

async fn serve(inner: Arc<Inner>, mut stream: TcpStream, addr: SocketAddr, conn: u64, mut counted: Counted) {
    // At the limit the oldest silent connection gives way to this one (see np-limits); a flood
    // then cycles through its own places while real sides, which answer the challenge within
    // milliseconds, still get in.
    let (place, _) = inner.places.admit(conn, false);
    let _ = stream.set_nodelay(true);
    let auth = tokio::time::timeout(inner.config.auth_deadline, authenticate(&inner, &mut stream, &place)).await;
    drop(place);
    let (join, key, nonce) = match auth {
        Err(_) => return refuse(&inner, stream, Refusal::AuthTimeout, conn, None).await,
        Ok(Err(AuthFailure::Refused(refusal))) => return refuse(&inner, stream, refusal, conn, None).await,
        Ok(Err(AuthFailure::Evicted)) => {
            inner.metrics.refusals.inc(Refusal::TooManyUnauthenticated.kind());
            // No lingering: one non-blocking write of a tiny frame, then close.
            let _ = stream
                .try_write(&encode_msg(&RelayMsg::Refused { reason: Refusal::TooManyUnauthenticated.to_string() }));
            tracing::debug!(%addr, reason = %Refusal::TooManyUnauthenticated, "evicted");
            return;
        }
        Ok(Err(AuthFailure::Gone)) => {
            tracing::debug!(conn, "closed before authenticating");
            return;
        }
        Ok(Ok(joined)) => joined,
    };
    let session = short_hex(&join.session);
    let role = join.role;
    let waiting = waiting_frame(&inner, &nonce, &join);
    let joined = Instant::now();
    let (decision, rx) = {
        let mut t = inner.table();
        let decision = t.pairing.join(&key, role, conn, Instant::now());
        match decision {
            Decision::Wait => {
                let (tx, rx) = oneshot::channel();
                t.waiters.insert(conn, tx);
                (Decision::Wait, Some(Handoff::Wait(rx)))
            }
            Decision::Pair { first } => match t.waiters.remove(&first) {
                Some(tx) => (Decision::Pair { first }, Some(Handoff::Give(tx))),
                None => {
                    // Cannot happen: waiters and pairing change under one lock. Stay safe.
                    t.pairing.end(&key);
                    (Decision::Refuse(Refusal::DeadlinePassed), None)
                }
            },
            refuse => (refuse, None),
        }
    };
    counted.authenticated();
    match (decision, rx) {
        (Decision::Refuse(refusal), _) => refuse(&inner, stream, refusal, conn, Some(&session)).await,
        (Decision::Wait, Some(Handoff::Wait(rx))) => {
            inner.wake.notify_one();
            tracing::debug!(%session, %role, conn, "waiting for peer");
            wait_then_forward(inner, stream, key, session, conn, rx, (role, joined, waiting)).await;
        }
        (Decision::Pair { .. }, Some(Handoff::Give(tx))) => {
            tracing::debug!(%session, %role, conn, "peer found");
            // This side's own proof first; the first side's task then sends `Paired` to both.
            let mut stream = stream;
            if !matches!(tokio::time::timeout(inner.config.auth_deadline, stream.write_all(&waiting)).await, Ok(Ok(())))
            {
                tracing::debug!(%session, conn, "second side left while being paired");
                let _ = tx.send(Outcome::Refused(Refusal::DeadlinePassed));
                inner.table().pairing.end(&key);
                return;
            }
            if let Err(Outcome::Paired(stream)) = tx.send(Outcome::Paired(stream)) {
                // The first side's task is gone (only at shutdown); give up the session.
                inner.table().pairing.end(&key);
                refuse(&inner, stream, Refusal::ShuttingDown, conn, Some(&session)).await;
            }
        }
        _ => {}
    }
}

/// The channel end a connection keeps after its Join: a receiver to wait on, or the first
/// side's sender to hand itself over.
enum Handoff {
    Wait(oneshot::Receiver<Outcome>),
    Give(oneshot::Sender<Outcome>),
}

/// Why a side did not authenticate.
enum AuthFailure {
    /// It went away (or sent nothing but an end of stream).
    Gone,
    /// It gets a refusal with this reason.
    Refused(Refusal),
    /// A newer connection took its place at the pre-auth limit.
    Evicted,
}

/// Sends the Challenge and checks the Join, giving up the place if told to (see np-limits).
async fn authenticate(
    inner: &Inner,
    stream: &mut TcpStream,
    place: &np_limits::PreAuthPermit,
) -> Result<(Join, PairKey, [u8; 32]), AuthFailure> {
    let nonce = np_identity::random32().map_err(|_| AuthFailure::Gone)?;
    let challenge = RelayMsg::Challenge { relay: inner.config.name.clone(), nonce };
    stream.write_all(&encode_msg(&challenge)).await.map_err(|_| AuthFailure::Gone)?;
    // Silent until a byte has really arrived, and evicted meanwhile only as a silent one that
    // really was (np-limits).
    match place.first_byte(stream).await {
        Err(np_limits::Evicted) => return Err(AuthFailure::Evicted),
        Ok(Ok(0) | Err(_)) => return Err(AuthFailure::Gone),
        Ok(Ok(_)) => {}
    }
    let join = async {
        let frame = match read_frame(stream, MAX_PREAUTH_FRAME).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(WireError::Truncated | WireError::Io(_)) => return Err(AuthFailure::Gone),
            Err(e) => return Err(AuthFailure::Refused(Refusal::Malformed(e.to_string()))),
        };
        let join: Join = decode_msg(&frame).map_err(|e| AuthFailure::Refused(Refusal::Malformed(e.to_string())))?;
        check_join(inner, &nonce, &join).await.map_err(AuthFailure::Refused)?;
        Ok(join)
    };
    let join = place.unless_evicted(join).await.map_err(|np_limits::Evicted| AuthFailure::Evicted)??;
    let key = PairKey::new(&join.identity, join.role, join.session, &join.peer);
    Ok((join, key, nonce))
}

/// The `Waiting` frame for a verified Join: signed with the relay's key over the Join and the
/// side's nonce, so the side knows it reached the relay it trusts, on this connection.
fn waiting_frame(inner: &Inner, nonce: &[u8; 32], join: &Join) -> Vec<u8> {
    let proof = match &inner.config.keys {
        Some(keys) => {
            let t = join_transcript(&inner.config.name, nonce, &join.identity, join.role, &join.session, &join.peer);
            keys.sign(&proof_transcript(&t, &join.side_nonce)).to_vec()
        }
        None => Vec::new(),
    };
    encode_msg(&RelayMsg::Waiting { proof })
}

/// Allow list, key lookup, signature: in that order, before any state is kept.
async fn check_join(inner: &Inner, nonce: &[u8; 32], join: &Join) -> Result<(), Refusal> {
    if !inner.config.allows(&join.identity) {
        return Err(Refusal::NotAllowed(join.identity.clone()));
    }
    let keys =
        inner.directory.lookup(&join.identity).await.ok_or_else(|| Refusal::UnknownIdentity(join.identity.clone()))?;
    let transcript = join_transcript(&inner.config.name, nonce, &join.identity, join.role, &join.session, &join.peer);
    np_identity::verify(&keys.signing, &transcript, &join.sig).map_err(|_| Refusal::BadSignature)
}

async fn wait_then_forward(
    inner: Arc<Inner>,
    mut stream: TcpStream,
    key: PairKey,
    session: String,
    conn: u64,
    mut rx: oneshot::Receiver<Outcome>,
    (role, joined, waiting): (Role, Instant, Vec<u8>),
) {
    if stream.write_all(&waiting).await.is_err() && withdraw_or_wait(&inner, &key, conn) {
        return;
    }
    // Watch for the waiting side hanging up, so its place is freed before the deadline. If it
    // sends bytes early (allowed: they are for the peer) stop watching and leave them queued.
    let mut watch = true;
    let mut probe = [0u8; 1];
    let outcome = loop {
        tokio::select! {
            outcome = &mut rx => break outcome.ok(),
            peeked = stream.peek(&mut probe), if watch => match peeked {
                Ok(0) | Err(_) => {
                    if withdraw_or_wait(&inner, &key, conn) {
                        tracing::debug!(%session, conn, "waiting side left");
                        return;
                    }
                    watch = false;
                }
                Ok(_) => watch = false,
            },
        }
    };
    let mut other = match outcome {
        Some(Outcome::Paired(other)) => other,
        Some(Outcome::Refused(refusal)) => {
            return refuse(&inner, stream, refusal, conn, Some(&session)).await;
        }
        None => {
            withdraw_or_wait(&inner, &key, conn);
            return;
        }
    };
    let _guard = SessionGuard { inner: inner.clone(), key: key.clone() };
    inner.forwarding.fetch_add(1, Ordering::SeqCst);
    let _counted = DecOnDrop(&inner.forwarding);
    let paired = encode_msg(&RelayMsg::Paired);
    let hello = async {
        stream.write_all(&paired).await?;
        other.write_all(&paired).await
    };
    match tokio::time::timeout(inner.config.auth_deadline, hello).await {
        Ok(Ok(())) => {}
        _ => {
            tracing::debug!(%session, "a side left while being paired");
            return;
        }
    }
    tracing::info!(%session, "session paired");
    let m = &inner.metrics;
    m.pairings.inc();
    m.handshake.observe(joined.elapsed());
    // `stream` is the first side, `other` the second, of opposite roles.
    let totals = match role {
        Role::Client => (&*m.client_to_device, &*m.device_to_client),
        Role::Device => (&*m.device_to_client, &*m.client_to_device),
    };
    let started = Instant::now();
    let (ended, moved) = forward(
        &mut stream,
        &mut other,
        inner.config.forward_buffer,
        inner.config.idle_timeout,
        inner.config.zero_copy,
        totals,
    )
    .await;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match ended {
        Ok(Ended::Closed) => tracing::info!(
            %session, first_to_second = moved.a_to_b, second_to_first = moved.b_to_a,
            elapsed_ms, "session closed"
        ),
        Ok(Ended::Idle) => tracing::info!(
            %session, first_to_second = moved.a_to_b, second_to_first = moved.b_to_a,
            elapsed_ms, reason = "idle timeout", "session closed"
        ),
        Err(e) => tracing::info!(
            %session, first_to_second = moved.a_to_b, second_to_first = moved.b_to_a,
            elapsed_ms, error = %e, "session ended by a side"
        ),
    }
}

struct DecOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees a waiting side's place. Returns false if it was paired meanwhile (its outcome is then
/// on the way and the caller must wait for it).
fn withdraw_or_wait(inner: &Inner, key: &PairKey, conn: u64) -> bool {
    let mut t = inner.table();
    if t.pairing.withdraw(key, conn) {
        t.waiters.remove(&conn);
        true
    } else {
        false
    }
}

/// Tells the side why, then closes without a reset (see [`REFUSE_LINGER`]).
async fn refuse(inner: &Inner, mut stream: TcpStream, refusal: Refusal, conn: u64, session: Option<&str>) {
    inner.metrics.refusals.inc(refusal.kind());
    tracing::debug!(conn, session = session.unwrap_or("-"), reason = %refusal, "refused");
    let frame = encode_msg(&RelayMsg::Refused { reason: refusal.to_string() });
    let linger = async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSE_DRAIN {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            drained += n;
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSE_LINGER, linger).await;
}

/// Refuses waiting sides whose deadline passed.
async fn reap(inner: Arc<Inner>) {
    loop {
        let next = inner.table().pairing.poll_timeout();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = inner.wake.notified() => continue,
        }
        let expired: Vec<_> = {
            let mut t = inner.table();
            let conns = t.pairing.expire(Instant::now());
            conns.into_iter().filter_map(|c| t.waiters.remove(&c)).collect()
        };
        for tx in expired {
            let _ = tx.send(Outcome::Refused(Refusal::DeadlinePassed));
        }
    }
}
