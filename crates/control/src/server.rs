//! The accept loop: TLS, pre-authentication limits, and the background sweeper.

use crate::hub::Hub;
use crate::state::{ServerConfig, Shared, DB_FILE};
use crate::store::{Location, Store};
use crate::tls::TlsIdentity;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A running control plane.
pub struct ControlServer {
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

impl ControlServer {
    /// Opens the data directory (creating the database and certificate on first start), binds
    /// the listener and the admin socket.
    pub async fn start(cfg: ServerConfig) -> Result<Self> {
        let d = &cfg.data_dir;
        // A shared store is reached before anything is created here, so a database that is down
        // leaves no half-made data directory behind.
        let at = Location::parse(cfg.store.as_deref(), d.join(DB_FILE))?;
        let shared_store = match &at {
            Location::Postgres(_) => Some(Store::open(&at, cfg.quota).await?),
            Location::Embedded(_) => None,
        };
        if !d.exists() {
            std::fs::create_dir_all(d).with_context(|| format!("creating data directory {}", d.display()))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("securing {}", d.display()))?;
        }
        let tls = TlsIdentity::load_or_create(d)?;
        let store = match shared_store {
            Some(s) => s,
            None => Store::open(&at, cfg.quota).await?,
        };
        let store = Arc::new(store);
        tracing::info!(store = %store.describe(), "store open");
        let listener = bind_listener(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
        let local = listener.local_addr()?;
        let sock = d.join(crate::admin::SOCKET);
        let _ = std::fs::remove_file(&sock);
        let admin = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("binding admin socket {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        let admin_cert = Arc::new(tls.cert_der.clone());
        let public_address = cfg.public_address.clone().unwrap_or_else(|| local.to_string());
        let next_seq = AtomicU64::new(store.start_seq().await?);
        let metrics = crate::metrics::ControlMetrics::new(store.clone());
        let shared = Arc::new(Shared {
            cfg,
            metrics,
            store,
            hub: Hub::default(),
            presence: Default::default(),
            public_address,
            next_conn: AtomicU64::new(1),
            next_seq,
        });
        tokio::spawn(crate::admin::serve(admin, shared.clone(), admin_cert));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
        Ok(ControlServer { shared, listener, acceptor, fingerprint: tls.fingerprint() })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.cfg.listen)
    }

    /// The metrics, for serving with [`np_metrics::http::serve`].
    pub fn metrics(&self) -> Arc<np_metrics::Registry> {
        self.shared.metrics.registry.clone()
    }

    /// Which store holds the data ("redb PATH", "PostgreSQL HOST:PORT/DB").
    pub fn store(&self) -> String {
        self.shared.store.describe()
    }

    /// SHA-256 of the certificate, as clients pin it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Accepts connections forever.
    pub async fn run(self) -> Result<()> {
        // At the limit the oldest silent connection gives way (see np-limits).
        let preauth = np_limits::PreAuth::new(self.shared.cfg.max_preauth);
        tokio::spawn(sweeper(self.shared.clone()));
        if self.shared.store.is_shared() {
            tokio::spawn(renew_presence(self.shared.clone()));
        }
        if let Some(mut wakes) = self.shared.store.wakes() {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                while let Some(w) = wakes.recv().await {
                    match w {
                        crate::store::Wake::One(name) => shared.hub.resync(&name),
                        crate::store::Wake::All => shared.hub.resync_all(),
                    }
                }
            });
        }
        let mut refused: u64 = 0;
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let conn = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
            // A ClientHello already waiting (as it is by the time a busy server accepts) makes
            // this connection worth more than a silent one.
            let (permit, evicted) = preauth.admit(conn, np_limits::bytes_waiting(&tcp));
            if evicted {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, evicted = refused, limit = self.shared.cfg.max_preauth, "too many unauthenticated connections; closing the oldest");
                }
            }
            let _ = tcp.set_nodelay(true);
            let shared = self.shared.clone();
            let acceptor = self.acceptor.clone();
            tokio::spawn(crate::conn::serve(shared, acceptor, tcp, peer, conn, permit));
        }
    }
}

/// Keeps this node's presence leases alive, renewing three times per lease so that one late or
/// failed renewal does not make live devices read as gone on the other nodes.
async fn renew_presence(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::store::PRESENCE_LEASE / 3);
    loop {
        tick.tick().await;
        if let Err(e) = shared.store.presence_renew(crate::now_ms()).await {
            tracing::warn!(error = %e, "renewing presence leases failed");
        }
    }
}

async fn sweeper(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.cfg.sweep_interval);
    loop {
        tick.tick().await;
        match shared.store.sweep(crate::now_ms()).await {
            Ok(0) => {}
            Ok(n) => {
                shared.metrics.notifications_expired.add(n as u64);
                tracing::info!(expired = n, "deleted expired notifications")
            }
            Err(e) => tracing::error!(error = %e, "sweeping expired notifications failed"),
        }
    }
}

/// A listener with a backlog of 4096: with tokio's default of 1024, a burst of connections waits
/// in the kernel's queue, unseen and so unclosed, far past the authentication deadline.
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}
