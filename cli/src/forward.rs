//! `np forward`: local port forwards through one session to a device.

use anyhow::{bail, Context, Result};
use np_identity::{DeviceRef, Name};
use np_session::{OpenError, SessionHandle};
use np_tunnel::Connector;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

/// One `-L [BIND:]PORT:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalForward {
    pub bind: SocketAddr,
    pub target: String,
}

impl FromStr for LocalForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not [BIND:]PORT:HOST:PORT (e.g. 2222:localhost:22)");
        // The target is the last two fields; an IPv6 host must be bracketed.
        let (rest, tport) = s.rsplit_once(':').ok_or_else(bad)?;
        let (rest, thost) = if let Some(r) = rest.strip_suffix(']') {
            let i = r.rfind('[').ok_or_else(bad)?;
            (r[..i].strip_suffix(':').unwrap_or(""), &rest[i..])
        } else {
            match rest.rsplit_once(':') {
                Some((a, b)) => (a, b),
                None => return Err(bad()),
            }
        };
        let target = format!("{thost}:{tport}");
        np_tunnel::permit::Target::from_str(&target).map_err(|_| bad())?;
        let bind = if let Ok(port) = rest.parse::<u16>() {
            SocketAddr::from(([127, 0, 0, 1], port))
        } else {
            let (addr, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            let ip: std::net::IpAddr =
                if addr == "localhost" { [127, 0, 0, 1].into() } else { addr.parse().map_err(|_| bad())? };
            SocketAddr::new(ip, port.parse().map_err(|_| bad())?)
        };
        Ok(LocalForward { bind, target })
    }
}

/// What an `np up` session set up before its first flow names.
const DEFAULT_TARGET: &str = "localhost:22";

/// Reuses one session for every connection; sets up a new one when it has ended.
pub struct SessionSlot {
    connector: Connector,
    device: DeviceRef,
    relay: Name,
    targets: Vec<String>,
    current: tokio::sync::Mutex<Option<SessionHandle>>,
    verbose: bool,
}

impl SessionSlot {
    pub fn new(connector: Connector, device: DeviceRef, relay: Name, targets: Vec<String>, verbose: bool) -> Self {
        SessionSlot { connector, device, relay, targets, current: tokio::sync::Mutex::new(None), verbose }
    }

    /// The live session, set up if there is none. A new session's request names the slot's
    /// targets, or if it has none (`np up`, which learns them flow by flow), `first`: the
    /// target of the flow that needs it (a device refuses a request that names none).
    pub async fn get(&self, first: Option<&str>) -> Result<SessionHandle> {
        let mut cur = self.current.lock().await;
        if let Some(h) = cur.as_ref() {
            if h.error().is_none() {
                return Ok(h.clone());
            }
            tracing::info!(device = %self.device, "session ended; setting up a new one");
        }
        let t0 = Instant::now();
        let verbose = self.verbose;
        let step = move |s: &str| {
            if verbose {
                eprintln!("{:>9.1} ms  {s}", t0.elapsed().as_secs_f64() * 1e3);
            }
        };
        let targets = match (self.targets.is_empty(), first) {
            (true, Some(t)) => vec![t.to_string()],
            // An eager `np up` session before any flow: ssh is what most users are after.
            (true, None) => vec![DEFAULT_TARGET.to_string()],
            (false, _) => self.targets.clone(),
        };
        let h = self
            .connector
            .open_session(&self.device, &self.relay, &targets, &step)
            .await
            .with_context(|| format!("setting up a session to {} via relay {}", self.device, self.relay))?;
        step("session ready");
        *cur = Some(h.clone());
        Ok(h)
    }

    /// Forgets a session that failed.
    pub async fn reset(&self) {
        *self.current.lock().await = None;
    }

    /// The session's state for `np status`.
    pub async fn describe(&self) -> String {
        match self.current.try_lock() {
            Err(_) => "connecting".into(),
            Ok(cur) => match cur.as_ref() {
                None => "none yet".into(),
                Some(h) => match h.error() {
                    None => "established".into(),
                    Some(e) => format!("ended: {e}"),
                },
            },
        }
    }
}

/// Binds every forward, sets up the session, then serves connections until the process ends.
pub async fn run(slot: Arc<SessionSlot>, forwards: Vec<LocalForward>) -> Result<()> {
    let mut listeners = Vec::new();
    for f in &forwards {
        let l = TcpListener::bind(f.bind).await.with_context(|| format!("listening on {}", f.bind))?;
        listeners.push((l, f.target.clone()));
    }
    slot.get(None).await?;
    for (l, target) in &listeners {
        println!("forwarding {} -> {target} on {}", l.local_addr()?, slot.device);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (l, target) in listeners {
        let slot = slot.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (slot, target) = (slot.clone(), target.clone());
                tokio::spawn(async move {
                    if let Err(e) = carry(&slot, tcp, &target).await {
                        tracing::warn!(%peer, %target, "{e:#}");
                    }
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    bail!("all listeners ended")
}

async fn carry(slot: &SessionSlot, mut tcp: TcpStream, target: &str) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut flow = None;
    for attempt in 0..2 {
        let session = slot.get(None).await?;
        match session.open(target).await {
            Ok(f) => {
                flow = Some(f);
                break;
            }
            Err(OpenError::Refused(reason)) => bail!("{} refused {target}: {reason}", slot.device),
            Err(OpenError::Session(e)) if attempt == 0 && e.is_stale() => {
                tracing::info!(error = %e, "session broke; setting up a new one");
                slot.reset().await;
            }
            Err(OpenError::Session(e)) => bail!("session to {}: {e}", slot.device),
        }
    }
    let Some(mut flow) = flow else { bail!("no session") };
    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut flow, 256 * 1024, 256 * 1024).await {
        // A broken session (tampering, a lost device) is no clean end: the application gets a
        // reset rather than an end of file it could take for a complete transfer.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        return Err(e).context("carrying the flow");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forwards() {
        let f: LocalForward = "2222:localhost:22".parse().expect("ok");
        assert_eq!(f, LocalForward { bind: "127.0.0.1:2222".parse().expect("a"), target: "localhost:22".into() });
        let f: LocalForward = "0.0.0.0:8080:db.lan:5432".parse().expect("ok");
        assert_eq!(f.bind, "0.0.0.0:8080".parse().expect("a"));
        assert_eq!(f.target, "db.lan:5432");
        let f: LocalForward = "[::1]:8080:[fd00::1]:443".parse().expect("ok");
        assert_eq!(f.bind, "[::1]:8080".parse().expect("a"));
        assert_eq!(f.target, "[fd00::1]:443");
        for bad in ["", "22", "x:localhost:22", "2222:localhost", "2222:localhost:99999"] {
            assert!(bad.parse::<LocalForward>().is_err(), "{bad}");
        }
    }
}
