//! `np forward`: local port forwards through one session to a device.

use anyhow::{bail, Context, Result};
use np_tunnel::SessionSlot;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
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

/// Binds every forward, sets up the session, then serves connections until the process ends.
pub async fn run(slot: Arc<SessionSlot>, forwards: Vec<LocalForward>) -> Result<()> {
    let mut listeners = Vec::new();
    for f in &forwards {
        let l = TcpListener::bind(f.bind).await.with_context(|| format!("listening on {}", f.bind))?;
        listeners.push((l, f.target.clone()));
    }
    slot.get(None).await?;
    for (l, target) in &listeners {
        println!("forwarding {} -> {target} on {}", l.local_addr()?, slot.device());
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
    let flow = slot.open(target).await?;
    if let Err(e) = flow.carry(&mut tcp).await {
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
