//! The client side of the np control plane, used by `np`, `npd` and `np-relay`.
//!
//! [`ControlClient::connect`] authenticates (failing fast with the server's reason), then keeps
//! the connection up in a background task that reconnects by itself after an outage. Requests
//! issued while it is down wait for the reconnection (up to their timeout). Notifications pushed
//! to this identity arrive, verified and decrypted, on [`Incoming`].

mod conn;
mod error;
pub mod tls;

pub use error::ClientError;
pub use np_control_proto::{ErrorCode, Record};

use conn::{Cmd, Conn};
use np_control_proto::{EnrolCode, Reply, Request};
use np_identity::home::{ControlConfig, Home};
use np_identity::{Envelope, Keys, Name, PublicKeys};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long one request may wait for its answer, including a reconnection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    known: Mutex<HashMap<Name, PublicKeys>>,
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
        let conn = Conn::open(&cfg, me, &keys).await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (push_tx, push_rx) = mpsc::channel(1024);
        let (msg_tx, msg_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            me: me.clone(),
            keys,
            home: home.clone(),
            cmd: cmd_tx,
            known: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(conn::run(conn, cfg, me.clone(), weak.clone(), cmd_rx, push_tx));
        tokio::spawn(open_pushes(weak, push_rx, msg_tx));
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

    /// The public keys of `name`, pinned on first use: a later change is an error.
    pub async fn lookup(&self, name: &Name) -> Result<PublicKeys, ClientError> {
        if let Some(k) = self.inner.known.lock().ok().and_then(|m| m.get(name).copied()) {
            return Ok(k);
        }
        let keys = match self.request(Request::Lookup { name: name.clone() }).await? {
            Reply::Identity(info) if &info.name == name => info.keys,
            other => return Err(unexpected(other)),
        };
        self.inner.home.pin_peer(name, &keys)?;
        if let Ok(mut m) = self.inner.known.lock() {
            m.insert(name.clone(), keys);
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
        Request::Ping => "ping",
        Request::Relays => "listing relays",
    }
}

fn unexpected(r: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

/// Verifies, decrypts and acknowledges pushed notifications. Holds the client weakly, so that
/// dropping every `ControlClient` ends the connection task.
async fn open_pushes(
    inner: Weak<Inner>,
    mut pushes: mpsc::Receiver<np_control_proto::Delivery>,
    out: mpsc::Sender<Message>,
) {
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
                if out.send(Message { from: env.from.clone(), payload, created_ms: env.created_ms }).await.is_err() {
                    // Nobody reads: leave it queued on the server for the next connection.
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(from = %env.from, seq = d.seq, error = %e, "dropping a notification that does not open")
            }
        }
        if let Err(e) = client.request(Request::Ack { seq: d.seq }).await {
            tracing::debug!(seq = d.seq, error = %e, "acknowledgement failed; it will be delivered again");
        }
    }
}
