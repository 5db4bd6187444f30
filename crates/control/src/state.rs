//! What the accept loop, every connection and the admin socket share: the server's config, the
//! database, the hub of live connections, the metrics. Its own module so the
//! parts that use it depend on it, and not on one another.

use crate::hub::Hub;
use crate::store::Store;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// The database's file in the data directory.
pub(crate) const DB_FILE: &str = "control.redb";

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The data directory: database, certificate, admin socket.
    pub data_dir: PathBuf,
    /// The address this node gives out in directory lookups (default: the listen address).
    pub public_address: Option<String>,
    /// Time a new connection has to finish TLS and authenticate.
    pub auth_timeout: Duration,
    /// Connections that may be between accept and authentication at once.
    pub max_preauth: usize,
    /// Longest time a notification waits for an absent recipient.
    pub max_ttl: Duration,
    /// How often expired notifications are deleted.
    pub sweep_interval: Duration,
    /// How many notifications may wait for one recipient, from one sender and in all.
    pub quota: crate::store::Quota,
    /// The store: `None` for the embedded one in the data directory, or a `postgres://` URL.
    pub store: Option<String>,
}

impl ServerConfig {
    /// Defaults for a data directory and listen address.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            data_dir,
            public_address: None,
            auth_timeout: Duration::from_secs(10),
            max_preauth: 512,
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(5),
            quota: crate::store::Quota::default(),
            store: None,
        }
    }
}

/// The state every task of a running server holds a reference to.
pub(crate) struct Shared {
    pub cfg: ServerConfig,
    pub store: Arc<Store>,
    pub hub: Hub,
    /// Which records are held by a live connection of their owner.
    pub presence: crate::presence::PresenceTable,
    pub public_address: String,
    pub next_conn: AtomicU64,
    /// Next notification sequence number.
    pub next_seq: AtomicU64,
    pub metrics: crate::metrics::ControlMetrics,
}
