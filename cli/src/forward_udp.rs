//! `np forward -U`: a local UDP port forwarded through the session, one association per local
//! peer address (as a NAT keeps one mapping per source), each ended by the session's idle timer
//! or evicted when the session's cap is reached.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use np_session::{UdpAssoc, UdpSender};
use np_tunnel::SessionSlot;
use tokio::net::UdpSocket;

use crate::forward::LocalForward;

/// Largest datagram read from a local peer: what a session carries.
const RECV_BUFFER: usize = np_session::frame::MAX_DATAGRAM;

/// Associations by local peer. Entries leave when their association ends; at most the
/// session's association cap are live, so this is bounded too.
type Peers = Arc<Mutex<HashMap<SocketAddr, UdpSender>>>;

/// Binds every UDP forward and serves it until the process ends.
pub async fn run(slot: Arc<SessionSlot>, forwards: Vec<LocalForward>) -> Result<()> {
    let mut socks = Vec::new();
    for f in &forwards {
        let s = UdpSocket::bind(f.bind).await.with_context(|| format!("binding UDP {}", f.bind))?;
        socks.push((Arc::new(s), f.target.clone()));
    }
    slot.get(None).await?;
    for (s, target) in &socks {
        println!("forwarding udp {} -> {target} on {}", s.local_addr()?, slot.device());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (sock, target) in socks {
        tasks.spawn(serve(slot.clone(), sock, target));
    }
    while tasks.join_next().await.is_some() {}
    bail!("all UDP forwards ended")
}

async fn serve(slot: Arc<SessionSlot>, sock: Arc<UdpSocket>, target: String) {
    let peers: Peers = Arc::default();
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // An ICMP error for an earlier answer: nothing to do with the next datagram.
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let d = Bytes::copy_from_slice(&buf[..n]);
        let known = peers.lock().ok().and_then(|p| p.get(&peer).cloned());
        if let Some(s) = known {
            if s.send(d.clone()) {
                continue;
            }
            // Ended meanwhile (idle, evicted, refused, or the session broke): a new one.
        }
        match open(&slot, &target).await {
            Ok(a) => {
                a.send(d);
                if let Ok(mut p) = peers.lock() {
                    p.insert(peer, a.sender());
                }
                tokio::spawn(answer(a, sock.clone(), peer, peers.clone()));
            }
            Err(e) => tracing::warn!(%peer, %target, "{e:#}"),
        }
    }
}

async fn open(slot: &SessionSlot, target: &str) -> Result<UdpAssoc> {
    let session = slot.get(None).await?;
    if !session.has_udp() {
        bail!("{}'s npd does not carry UDP (it is older than np forward -U)", slot.device());
    }
    session.udp_open(target).with_context(|| format!("opening a UDP association to {target}"))
}

/// Sends the association's datagrams to the local peer until it ends.
async fn answer(mut a: UdpAssoc, sock: Arc<UdpSocket>, peer: SocketAddr, peers: Peers) {
    let id = a.id();
    while let Some(d) = a.recv().await {
        let _ = sock.send_to(&d, peer).await;
    }
    tracing::debug!(%peer, assoc = id, "UDP association ended");
    if let Ok(mut p) = peers.lock() {
        // Only if it is still ours: a new association may have replaced it.
        if p.get(&peer).is_some_and(|s| s.id() == id) {
            p.remove(&peer);
        }
    }
}
