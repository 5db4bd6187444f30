//! The device's side of a UDP association: checked against the permits, then carried through a
//! connected UDP socket of its own, so only the permitted target's answers come back (the
//! kernel drops datagrams from any other source) and each association has its own port.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use np_session::UdpAssoc;
use tokio::net::UdpSocket;

use crate::admission::Permits;
use crate::permit::Proto;

/// Largest datagram read from the target: the largest a session carries.
const RECV_BUFFER: usize = np_session::frame::MAX_DATAGRAM;

thread_local! {
    /// The buffer every association on this worker thread reads into, copying out only what
    /// arrived: one per thread rather than 64 KiB per association (a session may hold hundreds).
    static RECV: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; RECV_BUFFER]);
}

/// One datagram from the socket if one is waiting (never awaits, so the thread's buffer is
/// not held across a task switch).
fn try_recv(sock: &UdpSocket) -> io::Result<Bytes> {
    RECV.with(|b| {
        let mut b = b.borrow_mut();
        let n = sock.try_recv(&mut b)?;
        Ok(Bytes::copy_from_slice(&b[..n]))
    })
}

/// Checks, connects and carries one association until either end ends it (the client closes
/// it or it goes idle in the session: its `recv` returns `None`).
pub async fn serve_assoc(mut a: UdpAssoc, permits: Arc<Permits>, dial_timeout: Duration) {
    let target = match permits.check_proto(Proto::Udp, a.target()) {
        Ok(t) => t,
        Err(refusal) => {
            tracing::debug!(%refusal, "UDP association refused");
            a.close(&refusal.to_string());
            return;
        }
    };
    // Datagrams arriving meanwhile wait in the association's bounded queue.
    let sock = match tokio::time::timeout(dial_timeout, connect(&target.host, target.port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            a.close(&format!("sending to udp/{target}: {e}"));
            return;
        }
        Err(_) => {
            a.close(&format!("sending to udp/{target}: resolving timed out"));
            return;
        }
    };
    tracing::debug!(%target, local = ?sock.local_addr().ok(), "UDP association open");
    loop {
        tokio::select! {
            d = a.recv() => match d {
                // Awaited, not `try_send`: tokio reports a fresh socket writable only once its
                // reactor has seen it, so the first datagram (a DNS query) would be dropped. A
                // full socket buffer waits here while the association's queue drops the excess.
                Some(d) => {
                    let sent = sock.send(&d).await;
                    tracing::trace!(len = d.len(), ?sent, "datagram to the target");
                }
                None => return,
            },
            r = sock.readable() => match r.and_then(|()| try_recv(&sock)) {
                Ok(d) => { a.send(d); }
                // Readiness was stale: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The target's ICMP port unreachable: the client turns it into its own.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    a.close(&format!("udp/{target}: port unreachable"));
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "UDP receive failed"),
            },
        }
    }
}

/// A UDP socket connected to a permitted target. `localhost` is the IPv4 loopback address (a
/// datagram cannot find out, as a TCP connect does, which loopback is listening).
async fn connect(host: &str, port: u16) -> io::Result<UdpSocket> {
    let addr = if host.eq_ignore_ascii_case("localhost") {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else {
        tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?
    };
    let local: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(addr).await?;
    Ok(sock)
}
