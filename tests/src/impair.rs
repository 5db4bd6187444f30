//! Network impairments for the namespace tests ([`crate::netns`]): nftables tables that drop a
//! share of the packets (loss) or all of them (a partition) inside one namespace, a nat table
//! that steers one host's connections into a proxy, and a TCP proxy that delays every chunk by a
//! fixed time each way while keeping the order.
//!
//! nftables rules act on packets, so TCP sees real loss (retransmissions, timeouts), and a
//! partition stalls every connection without a reset, as an unplugged cable would. A table is
//! removed when its [`NftTable`] is dropped, which heals the impairment.
#![allow(clippy::unwrap_used)]

use crate::netns::{bind_in, connect_in, ns_command};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An nftables table loaded in a namespace; deleted on drop.
pub struct NftTable {
    ns: String,
    /// `inet NAME` or `ip NAME`.
    spec: String,
}

impl NftTable {
    /// Loads `table FAMILY NAME { BODY }` in `ns`; panics with nft's error if it is refused.
    pub fn load(ns: &str, family: &str, name: &str, body: &str) -> NftTable {
        let spec = format!("{family} {name}");
        let script = format!("table {spec} {{\n{body}\n}}\n");
        let mut child = ns_command(ns, Command::new("nft").args(["-f", "-"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft (package nftables) cannot run: {e}"));
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft in {ns} refused\n{script}\n{}", String::from_utf8_lossy(&out.stderr));
        NftTable { ns: ns.to_string(), spec }
    }

    /// The table as `nft list table` prints it.
    pub fn listing(&self) -> String {
        let out = ns_command(&self.ns, Command::new("nft").args(["list", "table"]).args(self.spec.split(' ')))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Packets counted by the table's `counter`s, added up (every impairing rule counts).
    pub fn packets(&self) -> u64 {
        let l = self.listing();
        let mut words = l.split_whitespace();
        let mut total = 0;
        while let Some(w) = words.next() {
            if w == "packets" {
                total += words.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        total
    }

    /// Deletes the table now (the same as dropping it).
    pub fn remove(self) {}
}

impl Drop for NftTable {
    fn drop(&mut self) {
        // The namespace may be gone already (then so is the table).
        let _ = ns_command(&self.ns, Command::new("nft").args(["delete", "table"]).args(self.spec.split(' ')))
            .stderr(Stdio::null())
            .status();
    }
}

/// Rules matching TCP between this namespace and `peer` (both ways: to its port on output, from
/// its port on input), each ending in `verdict`.
fn both_ways(peer: SocketAddr, verdict: &str) -> String {
    let (ip, port) = (peer.ip(), peer.port());
    chains(&format!("ip daddr {ip} tcp dport {port}"), &format!("ip saddr {ip} tcp sport {port}"), verdict)
}

/// An output chain with `out_match VERDICT` and an input chain with `in_match VERDICT`.
fn chains(out_match: &str, in_match: &str, verdict: &str) -> String {
    format!(
        "  chain out {{ type filter hook output priority 0; policy accept;\n    {out_match} {verdict}\n  }}\n  \
         chain inp {{ type filter hook input priority 0; policy accept;\n    {in_match} {verdict}\n  }}"
    )
}

/// In `ns`, drops `percent` % of the TCP packets to `peer` and, independently, of those from it.
pub fn loss(ns: &str, peer: SocketAddr, percent: u32) -> NftTable {
    assert!(percent < 100);
    NftTable::load(ns, "inet", "np_loss", &both_ways(peer, &format!("numgen random mod 100 < {percent} counter drop")))
}

/// In `ns`, drops every TCP packet to and from `peer`: connections stall, nothing is reset.
pub fn partition(ns: &str, peer: SocketAddr) -> NftTable {
    NftTable::load(ns, "inet", "np_partition", &both_ways(peer, "counter drop"))
}

/// In `ns`, drops every packet to and from the host `peer`, whatever the port or protocol.
pub fn partition_host(ns: &str, peer: Ipv4Addr) -> NftTable {
    NftTable::load(
        ns,
        "inet",
        "np_partition",
        &chains(&format!("ip daddr {peer}"), &format!("ip saddr {peer}"), "counter drop"),
    )
}

/// In `ns`, redirects new TCP connections that `from` makes to port `port` of this host to
/// `to_port` of this host (the address they arrived on), one `(from, port, to_port)` each.
/// Connections made before keep their path.
pub fn redirect(ns: &str, rules: &[(Ipv4Addr, u16, u16)]) -> NftTable {
    let mut body = String::from("  chain pre { type nat hook prerouting priority -100; policy accept;\n");
    for (from, port, to) in rules {
        body.push_str(&format!("    ip saddr {from} tcp dport {port} counter redirect to :{to}\n"));
    }
    body.push_str("  }");
    NftTable::load(ns, "ip", "np_redirect", &body)
}

/// A TCP proxy in a namespace that holds every chunk it reads for `delay` before writing it on,
/// in each direction, in order. Memory is bounded: each direction queues at most
/// [`DelayProxy::QUEUE`] chunks, then stops reading (TCP's flow control does the rest).
pub struct DelayProxy {
    pub addr: SocketAddr,
    pub delay: Duration,
    /// Connections accepted so far.
    pub conns: Arc<AtomicU64>,
    /// Bytes forwarded so far, both directions.
    pub bytes: Arc<AtomicU64>,
}

type Chunk = Option<(Instant, Vec<u8>)>;

impl DelayProxy {
    /// Chunks queued per direction at most.
    pub const QUEUE: usize = 1024;

    /// Listens on `listen` in `ns` (port 0: any) and forwards each connection to `upstream`,
    /// connected from `ns`.
    pub fn start(ns: &str, listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> DelayProxy {
        let l = bind_in(ns, listen);
        let addr = l.local_addr().unwrap();
        let (conns, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (c, b, ns) = (conns.clone(), bytes.clone(), ns.to_string());
        std::thread::spawn(move || {
            for down in l.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = connect_in(&ns, upstream, Duration::from_secs(10)) else { continue };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                for (from, to) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up, down)] {
                    let (tx, rx) = sync_channel::<Chunk>(Self::QUEUE);
                    let b = b.clone();
                    let reader_end = to.try_clone().unwrap();
                    std::thread::spawn(move || read_side(from, tx, reader_end));
                    std::thread::spawn(move || write_side(rx, to, delay, b));
                }
            }
        });
        DelayProxy { addr, delay, conns, bytes }
    }
}

/// Reads chunks and queues them with the time they arrived; `None` at the end.
fn read_side(mut from: TcpStream, tx: SyncSender<Chunk>, to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(Some((Instant::now(), buf[..n].to_vec()))).is_err() {
                    // The writer is gone (its side failed): end this direction too.
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
    let _ = tx.send(None);
}

/// Writes each queued chunk once it is `delay` old; half-closes after the last one.
fn write_side(rx: Receiver<Chunk>, mut to: TcpStream, delay: Duration, bytes: Arc<AtomicU64>) {
    while let Ok(Some((t, chunk))) = rx.recv() {
        let due = t + delay;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = to.shutdown(std::net::Shutdown::Both);
            return;
        }
        bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Makes `dev` in `ns` hand every TCP segment to the network as a packet of its own (no
/// segmentation offload: `gso_max_segs 1`), so nftables sees and drops wire-sized packets rather
/// than 64 KiB super-packets; the old setting is put back on drop.
pub struct WireSizedPackets {
    ns: String,
    dev: String,
    old: String,
}

impl WireSizedPackets {
    pub fn on(ns: &str, dev: &str) -> WireSizedPackets {
        let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", dev]).output().unwrap();
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = shown.split_whitespace();
        let old = words.find(|w| *w == "gso_max_segs").and_then(|_| words.next()).unwrap_or("65535").to_string();
        set_gso_max_segs(ns, dev, "1");
        WireSizedPackets { ns: ns.to_string(), dev: dev.to_string(), old }
    }
}

impl Drop for WireSizedPackets {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.ns, "link", "set", &self.dev, "gso_max_segs", &self.old])
            .stderr(Stdio::null())
            .status();
    }
}

fn set_gso_max_segs(ns: &str, dev: &str, segs: &str) {
    let out = Command::new("ip").args(["-n", ns, "link", "set", dev, "gso_max_segs", segs]).output().unwrap();
    assert!(out.status.success(), "gso_max_segs in {ns}: {}", String::from_utf8_lossy(&out.stderr));
}
