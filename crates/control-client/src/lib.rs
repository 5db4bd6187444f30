//! The client side of the np control plane, used by `np`, `npd` and `np-relay`.
//!
//! [`ControlClient::connect`] authenticates (failing fast with the server's reason), then keeps
//! the connection up in a background task that reconnects by itself after an outage. Requests
//! issued while it is down wait for the reconnection (up to their timeout). Notifications pushed
//! to this identity arrive, verified and decrypted, on [`Incoming`].

mod conn;
mod error;
pub mod tls;

pub use conn::control_addresses;
pub use error::ClientError;
pub use np_control_proto::{ErrorCode, Presence, Record, RecordState};

use conn::{Cmd, Conn, Outlets};
use np_control_proto::{
    EnrolCode, NodeStatus, Reply, Request, MAX_ACK_BATCH, MAX_HOLDS, PRESENCE_VERSION, PUSH_WINDOW, STATUS_VERSION,
};
use np_identity::home::{ControlConfig, Home};
use np_identity::{Envelope, Keys, Name, PublicKeys};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long one request may wait for its answer, including a reconnection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a looked-up key is used without asking the control plane again. Short, so that a
/// revoked identity stops being accepted (by a relay, say) within seconds; while the control
/// plane cannot be reached, the cached key is used regardless.
pub const KEY_TTL: Duration = Duration::from_secs(2);
/// Longest wait to confirm a cached key before using it anyway.
const RECHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Pushes received and not yet opened, at most. At least the server's window, so the connection
/// task never has to wait for room (see `conn::serve`).
const PUSH_QUEUE: usize = 4 * PUSH_WINDOW;

/// A message from another identity, verified and decrypted.
#[derive(Clone, Debug)]
pub struct Message {
    /// The sender (its signature checked against its pinned keys).
    pub from: Name,
    /// The decrypted payload.
    pub payload: Vec<u8>,
    /// Sender's clock when sealed, ms since the Unix epoch.
    pub created_ms: u64,
}

/// Notifications for this identity, in the order the server pushed them.
pub struct Incoming {
    rx: mpsc::Receiver<Message>,
}

impl Incoming {
    /// The next message; `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

/// What the server said about a sent notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Server sequence number.
    pub seq: u64,
    /// Whether a connection of the recipient received it at once (else it is queued).
    pub delivered: bool,
}

struct Inner {
    me: Name,
    keys: Keys,
    home: Home,
    cmd: mpsc::Sender<Cmd>,
    /// Keys looked up, with when the control plane last confirmed them.
    known: Mutex<HashMap<Name, (PublicKeys, Instant)>>,
    connected: Arc<AtomicBool>,
    /// The protocol version of the server of the current connection.
    version: Arc<AtomicU16>,
    /// Record keys held present on every connection ([`ControlClient::hold`]).
    holds: Mutex<Vec<String>>,
}

/// A connected, authenticated control-plane client. Cheap to clone.
#[derive(Clone)]
pub struct ControlClient {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ControlClient {
    /// Creates keys for `me` in `home`, enrols them with the control plane at `address` using
    /// `code`, and remembers the address and the pinned certificate. On failure the new keys are
    /// removed again, so the command can simply be re-run.
    pub async fn enroll(home: &Home, me: &Name, address: &str, code: &EnrolCode) -> Result<PublicKeys, ClientError> {
        let keys = home.create_keys(me)?;
        let cfg = ControlConfig { address: address.to_string(), cert_sha256: code.cert_hex() };
        let result = Conn::enroll(&cfg, me, &keys, code).await;
        match result {
            Ok(()) => {
                home.save_control(me, &cfg)?;
                Ok(keys.public())
            }
            Err(e) => {
                let _ = home.remove_identity(me);
                Err(e)
            }
        }
    }

    /// Connects and authenticates as `me` with the keys and control plane stored in `home`.
    pub async fn connect(home: &Home, me: &Name) -> Result<(ControlClient, Incoming), ClientError> {
        let keys = home.load_keys(me)?;
        let cfg = home.load_control(me)?;
        let conn = Conn::open(&cfg, me, &keys, None).await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(PUSH_QUEUE);
        let (msg_tx, msg_rx) = mpsc::channel(1024);
        let connected = Arc::new(AtomicBool::new(true));
        let version = Arc::new(AtomicU16::new(conn.version));
        let inner = Arc::new(Inner {
            me: me.clone(),
            keys,
            home: home.clone(),
            cmd: cmd_tx,
            known: Mutex::new(HashMap::new()),
            connected: connected.clone(),
            version: version.clone(),
            holds: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let outlets = Outlets { pushes: push_tx, acks: ack_tx.clone(), connected, version };
        tokio::spawn(conn::run(conn, cfg, me.clone(), weak.clone(), cmd_rx, outlets));
        tokio::spawn(open_pushes(weak.clone(), push_rx, msg_tx, ack_tx));
        tokio::spawn(acknowledge(weak, ack_rx));
        Ok((ControlClient { inner }, Incoming { rx: msg_rx }))
    }

    /// This client's identity.
    pub fn me(&self) -> &Name {
        &self.inner.me
    }

    /// This client's keys (for handshakes and signatures made by its owner).
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub(crate) async fn request(&self, req: Request) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        let what = request_name(&req);
        let fut = async {
            self.inner.cmd.send(Cmd { req, reply: tx }).await.map_err(|_| ClientError::Closed)?;
            rx.await.map_err(|_| ClientError::Disconnected)?
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| ClientError::Timeout(what))?
    }

    /// Measures a round trip.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let t = Instant::now();
        match self.request(Request::Ping).await? {
            Reply::Pong => Ok(t.elapsed()),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the connection to the control plane is up right now (it reconnects by itself).
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// The public keys of `name`, pinned on first use: a later change is an error.
    ///
    /// A key confirmed by the control plane within [`KEY_TTL`] is answered from memory. An older
    /// one is confirmed again: if the identity was revoked meanwhile, it is forgotten and the
    /// lookup fails (`UnknownIdentity`); if the control plane cannot be reached (no connection,
    /// or no answer), the cached key is still used, so its users keep working through an outage.
    pub async fn lookup(&self, name: &Name) -> Result<PublicKeys, ClientError> {
        let cached = self.inner.known.lock().ok().and_then(|m| m.get(name).copied());
        if let Some((k, at)) = cached {
            if at.elapsed() < KEY_TTL || !self.connected() {
                return Ok(k);
            }
        }
        let ask = self.request(Request::Lookup { name: name.clone() });
        // With a key in hand, a slow control plane costs a user at most this much.
        let limit = if cached.is_some() { RECHECK_TIMEOUT } else { REQUEST_TIMEOUT };
        let answer = match tokio::time::timeout(limit, ask).await {
            Ok(Ok(Reply::Identity(info))) if &info.name == name => Ok(info.keys),
            Ok(Ok(other)) => Err(unexpected(other)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout("key lookup")),
        };
        let keys = match (answer, cached) {
            (Ok(keys), _) => keys,
            (Err(e @ ClientError::Refused { code: ErrorCode::UnknownIdentity, .. }), _) => {
                if let Ok(mut m) = self.inner.known.lock() {
                    if m.remove(name).is_some() {
                        tracing::info!(%name, "forgot the key of an identity the control plane no longer knows (revoked)");
                    }
                }
                return Err(e);
            }
            (Err(e), Some((k, _))) => {
                // Confirmed again later; until then the key that worked is still the best one.
                tracing::debug!(%name, error = %e, "could not confirm a cached key; using it");
                if let Ok(mut m) = self.inner.known.lock() {
                    m.insert(name.clone(), (k, Instant::now()));
                }
                return Ok(k);
            }
            (Err(e), None) => return Err(e),
        };
        // The pin file is read (or written, the first time) only when the key is new here.
        if cached.map(|(k, _)| k) != Some(keys) {
            self.inner.home.pin_peer(name, &keys)?;
        }
        if let Ok(mut m) = self.inner.known.lock() {
            m.insert(name.clone(), (keys, Instant::now()));
        }
        Ok(keys)
    }

    /// The relays this control plane's operator lists (`np-control relay add`).
    pub async fn relays(&self) -> Result<Vec<Name>, ClientError> {
        match self.request(Request::Relays).await? {
            Reply::Relays(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// The control-plane node that serves `name`.
    pub async fn resolve(&self, name: &Name) -> Result<String, ClientError> {
        match self.request(Request::Resolve { name: name.clone() }).await? {
            Reply::Node { address } => Ok(address),
            other => Err(unexpected(other)),
        }
    }

    /// Publishes (or replaces) one of this identity's records.
    pub async fn publish(&self, key: &str, value: Vec<u8>, readers: Vec<Name>) -> Result<(), ClientError> {
        let mut record = Record {
            owner: self.inner.me.clone(),
            key: key.to_string(),
            value,
            readers,
            updated_ms: now_ms(),
            sig: Vec::new(),
        };
        record.sig = self.inner.keys.sign(&record.signed_bytes()).to_vec();
        match self.request(Request::Publish { record }).await? {
            Reply::Published => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn verified(&self, r: Record) -> Result<Record, ClientError> {
        let keys = self.lookup(&r.owner).await?;
        np_identity::verify(&keys.signing, &r.signed_bytes(), &r.sig)
            .map_err(|_| ClientError::Protocol(format!("record {} of {} has a bad signature", r.key, r.owner)))?;
        Ok(r)
    }

    /// One record of `owner`, its signature checked.
    pub async fn fetch(&self, owner: &Name, key: &str) -> Result<Record, ClientError> {
        match self.request(Request::Fetch { owner: owner.clone(), key: key.to_string() }).await? {
            Reply::Record(r) if &r.owner == owner && r.key == key => self.verified(r).await,
            other => Err(unexpected(other)),
        }
    }

    /// Records with keys starting `prefix` that name this identity as a reader; records whose
    /// signature does not verify are dropped (and logged).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Record>, ClientError> {
        let records = match self.request(Request::List { key_prefix: prefix.to_string() }).await? {
            Reply::Records(r) => r,
            other => return Err(unexpected(other)),
        };
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            match self.verified(r).await {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(error = %e, "dropping a record"),
            }
        }
        Ok(out)
    }

    /// Whether the control plane of the current connection knows presence (`hold` and the
    /// `*_with_presence` requests).
    fn knows_presence(&self) -> bool {
        self.inner.version.load(Ordering::Relaxed) >= PRESENCE_VERSION
    }

    /// Holds this identity's record `key` present for as long as this client is connected, on
    /// this connection and every later one: when the client's last connection closes (the
    /// process ends, or its host drops off the network and TCP notices), readers see the record
    /// disconnected at once. A control plane too old to know presence is an error (readers then
    /// judge by the record's timestamp alone).
    pub async fn hold(&self, key: &str) -> Result<(), ClientError> {
        if !self.knows_presence() {
            return Err(ClientError::Protocol("the control plane is too old to track presence".into()));
        }
        {
            let mut holds = self.inner.holds.lock().map_err(|_| ClientError::Closed)?;
            if !holds.iter().any(|k| k == key) {
                if holds.len() >= MAX_HOLDS {
                    return Err(ClientError::Protocol(format!("at most {MAX_HOLDS} records can be held")));
                }
                holds.push(key.to_string());
            }
        }
        match self.request(Request::Hold { key: key.to_string() }).await? {
            Reply::Held => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Like [`ControlClient::list`], each record with its presence (`Unknown` from a control
    /// plane too old to know it).
    pub async fn list_with_presence(&self, prefix: &str) -> Result<Vec<RecordState>, ClientError> {
        if !self.knows_presence() {
            let records = self.list(prefix).await?;
            return Ok(records.into_iter().map(|record| RecordState { record, presence: Presence::Unknown }).collect());
        }
        let states = match self.request(Request::ListWithPresence { key_prefix: prefix.to_string() }).await? {
            Reply::RecordStates(r) => r,
            other => return Err(unexpected(other)),
        };
        let mut out = Vec::with_capacity(states.len());
        for s in states {
            match self.verified(s.record).await {
                Ok(record) => out.push(RecordState { record, presence: s.presence }),
                Err(e) => tracing::warn!(error = %e, "dropping a record"),
            }
        }
        Ok(out)
    }

    /// Like [`ControlClient::fetch`], with the record's presence.
    pub async fn fetch_with_presence(&self, owner: &Name, key: &str) -> Result<RecordState, ClientError> {
        if !self.knows_presence() {
            let record = self.fetch(owner, key).await?;
            return Ok(RecordState { record, presence: Presence::Unknown });
        }
        match self.request(Request::FetchWithPresence { owner: owner.clone(), key: key.to_string() }).await? {
            Reply::RecordState(s) if &s.record.owner == owner && s.record.key == key => {
                Ok(RecordState { record: self.verified(s.record).await?, presence: s.presence })
            }
            other => Err(unexpected(other)),
        }
    }

    /// How the node this client is connected to is (its store's kind and whether the store
    /// answers); `None` from a node too old to say.
    pub async fn status(&self) -> Result<Option<NodeStatus>, ClientError> {
        if self.inner.version.load(Ordering::Relaxed) < STATUS_VERSION {
            return Ok(None);
        }
        match self.request(Request::Status).await? {
            Reply::Status(s) => Ok(Some(s)),
            other => Err(unexpected(other)),
        }
    }

    /// Seals `payload` to `to` and sends it; the server keeps it up to `ttl` for an absent
    /// recipient.
    pub async fn send(&self, to: &Name, payload: &[u8], ttl: Duration) -> Result<Sent, ClientError> {
        let to_keys = self.lookup(to).await?;
        let envelope = Envelope::seal(&self.inner.me, &self.inner.keys, to, &to_keys, now_ms(), payload)?;
        let ttl_secs = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        match self.request(Request::Notify { envelope, ttl_secs }).await? {
            Reply::Accepted { seq, delivered } => Ok(Sent { seq, delivered }),
            other => Err(unexpected(other)),
        }
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Enroll { .. } => "enrolment",
        Request::Auth { .. } => "authentication",
        Request::Lookup { .. } => "key lookup",
        Request::Resolve { .. } => "directory lookup",
        Request::Publish { .. } => "publishing a record",
        Request::Fetch { .. } => "fetching a record",
        Request::List { .. } => "listing records",
        Request::Notify { .. } => "sending a notification",
        Request::Ack { .. } => "acknowledging a notification",
        Request::AckMany { .. } => "acknowledging notifications",
        Request::Ping => "ping",
        Request::Relays => "listing relays",
        Request::Hold { .. } => "holding a record present",
        Request::ListWithPresence { .. } => "listing records",
        Request::FetchWithPresence { .. } => "fetching a record",
        Request::Status => "asking how the node is",
    }
}

fn unexpected(r: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

/// Verifies and decrypts pushed notifications, and hands each one's sequence number to
/// [`acknowledge`]. Holds the client weakly, so that dropping every `ControlClient` ends the
/// connection task.
async fn open_pushes(
    inner: Weak<Inner>,
    mut pushes: mpsc::Receiver<np_control_proto::Delivery>,
    out: mpsc::Sender<Message>,
    acks: mpsc::Sender<u64>,
) {
    let mut discarding = false;
    while let Some(d) = pushes.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let client = ControlClient { inner };
        let env = &d.envelope;
        let opened = if env.to != client.inner.me {
            Err(ClientError::Protocol(format!("got a notification addressed to {}", env.to)))
        } else {
            match client.lookup(&env.from).await {
                Ok(keys) => env.open(&client.inner.keys, &keys).map_err(ClientError::from),
                Err(e) => Err(e),
            }
        };
        match opened {
            Ok(payload) => {
                if out.send(Message { from: env.from.clone(), payload, created_ms: env.created_ms }).await.is_err()
                    && !discarding
                {
                    // The owner dropped its `Incoming`: it wants no notifications (a relay, say).
                    // They are acknowledged and dropped, so none piles up on the server for it.
                    tracing::debug!("notifications arrive but nobody reads them; acknowledging and dropping them");
                    discarding = true;
                }
            }
            Err(e) => {
                tracing::warn!(from = %env.from, seq = d.seq, error = %e, "dropping a notification that does not open")
            }
        }
        if acks.send(d.seq).await.is_err() {
            return;
        }
    }
}

/// Acknowledges what [`open_pushes`] is done with, in batches: whatever accumulated while the
/// previous batch was on its way goes in one `AckMany` (one round trip and one database commit),
/// so a backlog of thousands drains at the speed of the connection.
async fn acknowledge(inner: Weak<Inner>, mut acks: mpsc::Receiver<u64>) {
    let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
    while let Some(seq) = acks.recv().await {
        batch.push(seq);
        while batch.len() < MAX_ACK_BATCH {
            match acks.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let client = ControlClient { inner };
        let n = batch.len();
        let req =
            if n == 1 { Request::Ack { seq: batch[0] } } else { Request::AckMany { seqs: std::mem::take(&mut batch) } };
        batch.clear();
        if let Err(e) = client.request(req).await {
            tracing::debug!(count = n, error = %e, "acknowledgement failed; those notifications will be delivered again");
        }
    }
}
