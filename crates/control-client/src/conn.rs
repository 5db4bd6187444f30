//! One TLS connection to the control plane, and the task that keeps one up.

use crate::{ClientError, Inner};
use np_control_proto::{
    auth_transcript, enroll_transcript, ClientFrame, Delivery, EnrolCode, Reply, Request, ServerFrame, ServerHello,
    MAX_FRAME, PRESENCE_VERSION, TLS_SERVER_NAME,
};
use np_identity::home::ControlConfig;
use np_identity::{Keys, Name};
use np_wire::io::{read_msg, write_msg};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;

type Tls = TlsStream<TcpStream>;

/// Time to connect, finish TLS and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff bounds: quick first retries so a restarted server is found within a
/// second or so, capped so a long outage costs little.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Sequence numbers remembered to drop duplicate pushes (a push can repeat across reconnects).
const SEEN: usize = 4096;

pub(crate) struct Cmd {
    pub req: Request,
    pub reply: oneshot::Sender<Result<Reply, ClientError>>,
}

pub(crate) struct Conn {
    rd: ReadHalf<Tls>,
    wr: WriteHalf<Tls>,
    /// The protocol version in the server's hello.
    pub version: u16,
    /// Which of the control plane's nodes it is connected to (see [`control_addresses`]).
    pub node: usize,
}

/// The nodes of a control plane: `address` is one `HOST:PORT` or several, comma-separated (nodes
/// sharing one database; a name with several addresses is tried address by address too).
pub fn control_addresses(address: &str) -> Vec<&str> {
    address.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
}

/// Time one node has to accept the TCP connection before the next is tried: a node that is
/// down but not refusing (its host gone) must not use up the whole [`CONNECT_TIMEOUT`].
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A random number below `n` (0 if randomness fails: the first node, as with one).
fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    match np_identity::random_bytes(&mut b) {
        Ok(()) => (u64::from_le_bytes(b) % n.max(1) as u64) as usize,
        Err(_) => 0,
    }
}

/// `backoff` scaled by a random factor in [0.5, 1): thousands of devices that lost one node
/// together do not all come back to the next at the same instant.
pub(crate) fn jittered(backoff: Duration) -> Duration {
    backoff / 2 + backoff.mul_f64(random_below(1000) as f64 / 2000.0)
}

/// Connects to the first node that answers, trying them in order from `start` (wrapping); returns
/// the TCP stream and the index of the node it reached.
async fn connect_any(address: &str, start: usize) -> Result<(TcpStream, usize), ClientError> {
    let nodes = control_addresses(address);
    if nodes.is_empty() {
        return Err(ClientError::Connect { address: address.into(), reason: "no address given".into() });
    }
    let mut failures = Vec::new();
    for i in 0..nodes.len() {
        let at = (start + i) % nodes.len();
        match tokio::time::timeout(NODE_CONNECT_TIMEOUT, TcpStream::connect(nodes[at])).await {
            Ok(Ok(tcp)) => return Ok((tcp, at)),
            Ok(Err(e)) => failures.push(format!("{}: {e}", nodes[at])),
            Err(_) => failures.push(format!("{}: no answer within {}s", nodes[at], NODE_CONNECT_TIMEOUT.as_secs())),
        }
    }
    Err(ClientError::Connect { address: address.into(), reason: failures.join("; ") })
}

async fn dial(
    cfg: &ControlConfig,
    start: usize,
) -> Result<(ReadHalf<Tls>, WriteHalf<Tls>, ServerHello, usize), ClientError> {
    let (tcp, node) = connect_any(&cfg.address, start).await?;
    let address = control_addresses(&cfg.address).get(node).map_or_else(|| cfg.address.clone(), |a| a.to_string());
    let _ = tcp.set_nodelay(true);
    let connector = crate::tls::pinned_connector(&cfg.cert_sha256)
        .map_err(|e| ClientError::Tls { address: address.clone(), reason: e.to_string() })?;
    let name =
        rustls::pki_types::ServerName::try_from(TLS_SERVER_NAME).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls { address: address.clone(), reason: e.to_string() })?;
    let (mut rd, wr) = tokio::io::split(tls);
    let hello: ServerHello = read_msg(&mut rd, MAX_FRAME)
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .ok_or(ClientError::Disconnected)?;
    Ok((rd, wr, hello, node))
}

async fn first(rd: &mut ReadHalf<Tls>, wr: &mut WriteHalf<Tls>, req: Request) -> Result<Reply, ClientError> {
    write_msg(wr, &ClientFrame { id: 1, req }).await.map_err(|e| ClientError::Protocol(e.to_string()))?;
    match read_msg::<ServerFrame, _>(rd, MAX_FRAME).await {
        Ok(Some(ServerFrame::Reply { result: Ok(r), .. })) => Ok(r),
        Ok(Some(ServerFrame::Reply { result: Err(e), .. })) => {
            Err(ClientError::Refused { code: e.code, message: e.message })
        }
        Ok(Some(other)) => Err(ClientError::Protocol(format!("unexpected {other:?} before authentication"))),
        Ok(None) => Err(ClientError::Disconnected),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}

impl Conn {
    /// Connects and authenticates as `me`, to one of the control plane's nodes: from a random
    /// one (so clients spread over them) unless `start` says which to try first.
    pub async fn open(cfg: &ControlConfig, me: &Name, keys: &Keys, start: Option<usize>) -> Result<Conn, ClientError> {
        let start = start.unwrap_or_else(|| random_below(control_addresses(&cfg.address).len()));
        let fut = async {
            let (mut rd, mut wr, hello, node) = dial(cfg, start).await?;
            let sig = keys.sign(&auth_transcript(&hello.nonce, me)).to_vec();
            match first(&mut rd, &mut wr, Request::Auth { name: me.clone(), sig }).await? {
                Reply::Authenticated { name } if &name == me => Ok(Conn { rd, wr, version: hello.version, node }),
                other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut).await.map_err(|_| ClientError::Timeout("connecting"))?
    }

    /// Enrols `me` with `keys` using `code`.
    pub async fn enroll(cfg: &ControlConfig, me: &Name, keys: &Keys, code: &EnrolCode) -> Result<(), ClientError> {
        let fut = async {
            let (mut rd, mut wr, hello, _) = dial(cfg, 0).await?;
            let public = keys.public();
            let sig = keys.sign(&enroll_transcript(&hello.nonce, me, &public)).to_vec();
            let req = Request::Enroll { secret: code.secret, name: me.clone(), keys: public, sig };
            match first(&mut rd, &mut wr, req).await? {
                Reply::Enrolled { name } if &name == me => Ok(()),
                other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut).await.map_err(|_| ClientError::Timeout("enrolling"))?
    }
}

/// Requests a connection has sent and not yet had answered, at most. More wait in the command
/// channel; this bounds what the writer task may hold.
const MAX_OUTSTANDING: usize = 256;

/// What the connection task hands on: pushes to open, and sequence numbers to acknowledge again
/// (a push seen before, sent again by the server, still holds a place in its window).
pub(crate) struct Outlets {
    pub pushes: mpsc::Sender<Delivery>,
    pub acks: mpsc::Sender<u64>,
    /// Whether a connection is up right now (a cached key is served without asking while not).
    pub connected: Arc<AtomicBool>,
    /// The protocol version of the server of the current connection.
    pub version: Arc<AtomicU16>,
}

/// Keeps a connection up until every client handle is dropped.
pub(crate) async fn run(
    mut conn: Conn,
    cfg: ControlConfig,
    me: Name,
    inner: Weak<Inner>,
    mut cmds: mpsc::Receiver<Cmd>,
    out: Outlets,
) {
    let mut seen: VecDeque<u64> = VecDeque::with_capacity(SEEN);
    loop {
        out.version.store(conn.version, Ordering::Relaxed);
        out.connected.store(true, Ordering::Relaxed);
        // What this identity holds present is held again on every new connection (the server
        // released it when the old one closed).
        let holds = match inner.upgrade() {
            Some(i) if conn.version >= PRESENCE_VERSION => i.holds.lock().map(|h| h.clone()).unwrap_or_default(),
            _ => Vec::new(),
        };
        // After losing a node, the next one is tried first: the lost one is likely down.
        let next = conn.node + 1;
        let reason = serve(conn, &mut cmds, &out, &mut seen, holds).await;
        out.connected.store(false, Ordering::Relaxed);
        let Some(reason) = reason else { return };
        tracing::warn!(%me, address = %cfg.address, %reason, "control-plane connection lost; reconnecting");
        let mut backoff = BACKOFF_MIN;
        conn = loop {
            tokio::time::sleep(jittered(backoff)).await;
            // Everyone is gone: stop instead of reconnecting for nobody.
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let r = Conn::open(&cfg, &me, &strong.keys, Some(next)).await;
            drop(strong);
            match r {
                Ok(c) => {
                    let node = control_addresses(&cfg.address).get(c.node).map(|a| a.to_string()).unwrap_or_default();
                    tracing::info!(%me, %node, "control-plane connection re-established");
                    break c;
                }
                Err(e) => {
                    tracing::debug!(%me, error = %e, "reconnect failed");
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
    }
}

/// Serves one connection; `None` when the client is gone, else why the connection ended.
///
/// Nothing in this loop waits on anyone: frames are read by their own task, written by their
/// own task, and pushes go into a queue that always has room (it holds [`np_control_proto::PUSH_WINDOW`], and the
/// server sends no more unacknowledged). So a reply is always read and handed over however many
/// pushes arrive; before, the loop waited for room in a full push queue while the code that
/// empties it waited here for its key lookups and acks, and each queued push cost two timeouts.
async fn serve(
    conn: Conn,
    cmds: &mut mpsc::Receiver<Cmd>,
    out: &Outlets,
    seen: &mut VecDeque<u64>,
    holds: Vec<String>,
) -> Option<String> {
    let Conn { mut rd, mut wr, .. } = conn;
    let (frames_tx, mut frames) = mpsc::channel::<Result<ServerFrame, String>>(64);
    // read_msg is not cancel-safe, so reading lives in its own task.
    let reader = tokio::spawn(async move {
        loop {
            let r = match read_msg::<ServerFrame, _>(&mut rd, MAX_FRAME).await {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err("closed by the server".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let end = r.is_err();
            if frames_tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    // Writing too: a server that is slow to read must not stop this loop from reading. The
    // channel is unbounded, but holds at most MAX_OUTSTANDING requests (see below).
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ClientFrame>();
    let mut writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if let Err(e) = write_msg(&mut wr, &f).await {
                return e.to_string();
            }
        }
        "the client closed".to_string()
    });
    let mut pending: HashMap<u32, oneshot::Sender<Result<Reply, ClientError>>> = HashMap::new();
    let mut next_id: u32 = 2;
    // Holds first, before any request queued meanwhile (a publish, say): at most MAX_HOLDS.
    for key in holds {
        let id = next_id;
        next_id += 1;
        let (tx, rx) = oneshot::channel();
        if out_tx.send(ClientFrame { id, req: Request::Hold { key: key.clone() } }).is_err() {
            break;
        }
        pending.insert(id, tx);
        tokio::spawn(async move {
            match rx.await {
                Ok(Ok(_)) => tracing::debug!(%key, "record held again after reconnecting"),
                Ok(Err(e)) => tracing::warn!(%key, error = %e, "could not hold the record again after reconnecting"),
                Err(_) => {}
            }
        });
    }
    let reason = loop {
        tokio::select! {
            cmd = cmds.recv(), if pending.len() < MAX_OUTSTANDING => {
                let Some(cmd) = cmd else { reader.abort(); writer.abort(); return None };
                let id = next_id;
                next_id = next_id.wrapping_add(1).max(2);
                if out_tx.send(ClientFrame { id, req: cmd.req }).is_err() {
                    let _ = cmd.reply.send(Err(ClientError::Disconnected));
                    break "writer ended".to_string();
                }
                pending.insert(id, cmd.reply);
            }
            w = &mut writer => break w.unwrap_or_else(|e| e.to_string()),
            frame = frames.recv() => match frame {
                Some(Ok(ServerFrame::Reply { id, result })) => {
                    if let Some(tx) = pending.remove(&id) {
                        let _ = tx.send(result.map_err(|e| ClientError::Refused { code: e.code, message: e.message }));
                    } else if let Err(e) = result {
                        break format!("server error: {}", e.message);
                    }
                }
                Some(Ok(ServerFrame::Push(d))) => {
                    if seen.contains(&d.seq) {
                        // Sent again (a reconnect, or the server rereading its queue): it is
                        // being handled, but the server counts it against its window until acked.
                        let _ = out.acks.try_send(d.seq);
                        continue;
                    }
                    let seq = d.seq;
                    match out.pushes.try_send(d) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            // Only a server that ignores the window gets here. Not marked as
                            // seen: it stays queued on the server and comes again later.
                            tracing::warn!(seq, "the server sent more pushes than its window; dropping one");
                            continue;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            reader.abort();
                            writer.abort();
                            return None;
                        }
                    }
                    if seen.len() == SEEN {
                        seen.pop_front();
                    }
                    seen.push_back(seq);
                }
                Some(Err(e)) => break e,
                None => break "reader ended".to_string(),
            }
        }
    };
    reader.abort();
    writer.abort();
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(ClientError::Disconnected));
    }
    Some(reason)
}
