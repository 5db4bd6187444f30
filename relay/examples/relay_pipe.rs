//! A benchmark adapter: joins the relay as one side of a session with keys from a home, and
//! bridges it to a local TCP socket or measures raw throughput. Not a product (`np forward` is).
//!
//! Client side, bridging local connections (one session per connection, ids BASE, BASE+1, ...):
//!   relay_pipe --home H --as @alice --relay 198.18.0.2:7444 --relay-name @relay --peer @dev \
//!              --role client --session BASE --listen 127.0.0.1:15201
//! Device side, keeping WINDOW sessions joined ahead and dialing the target once paired:
//!   relay_pipe ... --role device --session BASE --connect 127.0.0.1:5201
//! Raw throughput of one session (no local sockets): `--blast 5s` on one side, `--sink` on the other.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use np_identity::home::Home;
use np_identity::{Keys, Name};
use np_relay::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    Client,
    Device,
}

/// Joins an np relay as one side of a session and bridges it to a local socket.
#[derive(Parser)]
struct Cli {
    /// Home directory with this side's keys.
    #[arg(long, env = "NP_HOME")]
    home: Option<PathBuf>,
    /// This side's identity.
    #[arg(long = "as")]
    identity: Option<Name>,
    /// The relay's address.
    #[arg(long)]
    relay: SocketAddr,
    /// The relay's identity and its Ed25519 public key (hex), checked against its Challenge and
    /// proof; without them the relay is not authenticated (fine for a benchmark on one machine).
    #[arg(long, requires = "relay_key")]
    relay_name: Option<Name>,
    #[arg(long, value_parser = parse_key)]
    relay_key: Option<[u8; 32]>,
    /// The other side's identity.
    #[arg(long)]
    peer: Name,
    /// This side's role.
    #[arg(long, value_enum)]
    role: Side,
    /// First session number (sessions are numbered BASE, BASE+1, ... one per bridged connection).
    #[arg(long, default_value_t = 1)]
    session: u64,
    /// Client: accept local connections here, one session each.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Device: dial this target for each paired session.
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// Device: sessions kept joined ahead of use.
    #[arg(long, default_value_t = 4)]
    window: u64,
    /// Send zeros through one session for this long, then close (throughput, sender side).
    #[arg(long, value_parser = humantime::parse_duration)]
    blast: Option<Duration>,
    /// Read one session to EOF and print Gbit/s (throughput, receiving side).
    #[arg(long)]
    sink: bool,
    /// Bytes per read and write when copying.
    #[arg(long, default_value_t = 256 * 1024)]
    buffer: usize,
}

struct Joiner {
    keys: Keys,
    me: Name,
    role: Role,
    cli: Cli,
}

fn session_id(base: u64, n: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(b"np-bench");
    s[8..].copy_from_slice(&(base + n).to_be_bytes());
    s
}

impl Joiner {
    async fn join(&self, n: u64) -> Result<TcpStream> {
        let tcp =
            TcpStream::connect(self.cli.relay).await.with_context(|| format!("connecting to {}", self.cli.relay))?;
        let s = np_relay::join_with_timeout(
            tcp,
            &self.keys,
            &self.me,
            self.role,
            session_id(self.cli.session, n),
            &self.cli.peer,
            self.cli
                .relay_name
                .as_ref()
                .zip(self.cli.relay_key.as_ref())
                .map(|(name, signing)| np_relay::ExpectedRelay { name, signing }),
            Duration::from_secs(3600),
        )
        .await
        .with_context(|| format!("joining session {n}"))?;
        Ok(s)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let home = Home::resolve(cli.home.as_deref());
    let me = home.pick_identity(cli.identity.as_ref())?;
    let keys = home.load_keys(&me)?;
    let role = match cli.role {
        Side::Client => Role::Client,
        Side::Device => Role::Device,
    };
    let side = Arc::new(Joiner { keys, me, role, cli });
    if let Some(t) = side.cli.blast {
        let mut s = side.join(0).await?;
        let buf = vec![0u8; side.cli.buffer];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < t {
            s.write_all(&buf).await?;
            sent += buf.len() as u64;
        }
        s.shutdown().await?;
        // Wait for the peer's EOF so the sink has counted everything.
        let mut b = [0u8; 64];
        while s.read(&mut b).await? > 0 {}
        eprintln!("sent {sent} bytes");
        return Ok(());
    }
    if side.cli.sink {
        let mut s = side.join(0).await?;
        let mut buf = vec![0u8; side.cli.buffer];
        let mut got = 0u64;
        let mut first = None;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0).max(1e-9);
        s.shutdown().await?;
        println!("{:.2}", got as f64 * 8.0 / secs / 1e9);
        return Ok(());
    }
    match (side.role, side.cli.listen, side.cli.connect) {
        (Role::Client, Some(listen), _) => {
            let l = TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            for n in 0.. {
                let (local, _) = l.accept().await?;
                let side = side.clone();
                tokio::spawn(async move {
                    match side.join(n).await {
                        Ok(remote) => bridge(local, remote, side.cli.buffer).await,
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                });
            }
            Ok(())
        }
        (Role::Device, _, Some(target)) => {
            // Keep `window` sessions joined ahead; each, once paired, dials the target and
            // starts the next one.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
            let mut next = 0;
            for _ in 0..side.cli.window {
                spawn_device(side.clone(), next, target, tx.clone());
                next += 1;
            }
            while rx.recv().await.is_some() {
                spawn_device(side.clone(), next, target, tx.clone());
                next += 1;
            }
            Ok(())
        }
        _ => bail!("need --listen (client), --connect (device), --blast or --sink"),
    }
}

fn spawn_device(side: Arc<Joiner>, n: u64, target: SocketAddr, more: tokio::sync::mpsc::UnboundedSender<()>) {
    tokio::spawn(async move {
        // Retry the same session until it pairs: skipping one would shift every later session
        // against the client's numbering.
        let remote = loop {
            match side.join(n).await {
                Ok(r) => break r,
                Err(e) => {
                    eprintln!("error: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let _ = more.send(());
        match TcpStream::connect(target).await {
            Ok(local) => bridge(local, remote, side.cli.buffer).await,
            Err(e) => eprintln!("error: dialing {target}: {e}"),
        }
    });
}

async fn bridge(mut a: TcpStream, mut b: TcpStream, buffer: usize) {
    let _ = a.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, buffer, buffer).await;
}

fn parse_key(s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|e| e.to_string())?;
    v.try_into().map_err(|_| "a key is 32 bytes (64 hex digits)".to_string())
}
