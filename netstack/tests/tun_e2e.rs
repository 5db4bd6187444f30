//! End to end through a real TUN interface, in a fresh network namespace (root required).
//!
//! The netstack and the test's clients run on a tokio runtime whose threads live in the
//! namespace; the opener dials real TCP servers on 127.0.0.1 in the host namespace through a
//! dialer thread that stays there.
#![allow(unsafe_code)] // setns(2) and an AF_PACKET socket, test only

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use np_netstack::{
    AddressMap, BoxFuture, DeviceKey, Dialed, Dialer, Netstack, NetstackConfig, Prefix, RefuseKind, SetupFailed,
    DEFAULT_SUBNET,
};
use np_session::{device_session, ConnEvent, Connection, IncomingFlow, MuxConfig, SessionKeys};
use ring::digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IFACE: &str = "np0";

struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        Netns::named("e2e")
    }

    /// A namespace of its own for each test (tests of one binary run at once).
    fn named(tag: &str) -> Option<Netns> {
        let name = format!("np-{tag}-{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().map(|s| s.success()).unwrap_or(false);
        // The sessions run over loopback connections inside the namespace.
        let _ = Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).status();
        ok.then(|| Netns(name))
    }

    /// Move the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("open netns");
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "ip", "link", "show", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

type DialReply = tokio::sync::oneshot::Sender<std::io::Result<TcpStream>>;

/// Sets up each "session" in process: a loopback TCP connection in the namespace, keys from a
/// real handshake, and a device side (np-session's driver) that dials in the host namespace:
/// "localhost:PORT" is 127.0.0.1:PORT; port 9 is "unreachable".
struct HostDialer {
    dialer: std_mpsc::Sender<(SocketAddr, DialReply)>,
}

fn session_keys() -> (SessionKeys, SessionKeys) {
    np_session::in_memory_pair(b"tun").expect("handshake")
}

/// Both ends of a loopback TCP connection: the "relay connection" of a session made in process.
async fn loopback_pair() -> Result<(tokio::net::TcpStream, tokio::net::TcpStream), SetupFailed> {
    let failed = |e: std::io::Error| SetupFailed { kind: RefuseKind::Unreachable, reason: e.to_string() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    Ok((client.map_err(failed)?, accepted.map_err(failed)?.0))
}

impl Dialer for HostDialer {
    fn dial(&self, _device: DeviceKey, _first: String) -> BoxFuture<'static, Result<Dialed, SetupFailed>> {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let (client, server) = loopback_pair().await?;
            let (ck, dk) = session_keys();
            let mut device = device_session(server, dk, MuxConfig::default());
            tokio::spawn(async move {
                while let Some(flow) = device.next_flow().await {
                    tokio::spawn(serve_flow(flow, dialer.clone()));
                }
            });
            Ok(Dialed { stream: client, keys: ck, session: "0000test".into(), udp: false })
        })
    }
}

async fn serve_flow(flow: IncomingFlow, dialer: std_mpsc::Sender<(SocketAddr, DialReply)>) {
    let Some(port) = flow.target().rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()) else {
        flow.refuse("bad target");
        return;
    };
    if port == 9 {
        flow.refuse("connecting to localhost:9: No route to host (os error 113)");
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if dialer.send((SocketAddr::from(([127, 0, 0, 1], port)), tx)).is_err() {
        flow.refuse("dialer gone");
        return;
    }
    match rx.await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nonblocking(true);
            let _ = stream.set_nodelay(true);
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => {
                    if let Ok(j) = flow.accept_with(s) {
                        let _ = j.await;
                    }
                }
                Err(e) => flow.refuse(&e.to_string()),
            }
        }
        Ok(Err(e)) => {
            let reason = format!("connecting to {}: {e}", flow.target());
            flow.refuse(&reason);
        }
        Err(_) => flow.refuse("dialer gone"),
    }
}

fn spawn_dialer() -> std_mpsc::Sender<(SocketAddr, DialReply)> {
    let (tx, rx) = std_mpsc::channel::<(SocketAddr, DialReply)>();
    std::thread::spawn(move || {
        for (addr, reply) in rx {
            // Threads spawned here are in the host namespace too.
            std::thread::spawn(move || {
                let _ = reply.send(TcpStream::connect_timeout(&addr, Duration::from_secs(5)));
            });
        }
    });
    tx
}

/// Echoes every connection until EOF.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut read = conn.try_clone().expect("clone");
                let mut write = conn;
                let _ = std::io::copy(&mut read, &mut write);
                let _ = write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// Reads every connection to EOF and answers with the SHA-256 of what it read.
fn hash_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut ctx = digest::Context::new(&digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => ctx.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = conn.write_all(ctx.finish().as_ref());
            });
        }
    });
    port
}

fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn echo(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let out = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&out).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::with_capacity(payload.len());
    r.read_to_end(&mut back).await.expect("read");
    writer.await.expect("writer");
    back
}

/// Write `garbage` packets straight into the interface's transmit path (AF_PACKET), so the
/// netstack reads them exactly as given.
fn inject(ifname: &str, packets: &[Vec<u8>]) {
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let ifindex = match ifindex {
        Some(i) => i,
        None => unsafe { libc::if_nametoindex(c"np0".as_ptr()) as i32 },
    };
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, (libc::ETH_P_ALL as u16).to_be() as i32) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    for p in packets {
        let proto = if p.first().is_some_and(|b| b >> 4 == 6) { libc::ETH_P_IPV6 } else { libc::ETH_P_IP };
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (proto as u16).to_be();
        sll.sll_ifindex = ifindex;
        let rc = unsafe {
            libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            eprintln!("inject {} bytes: {}", p.len(), std::io::Error::last_os_error());
        }
    }
    unsafe { libc::close(fd) };
}

fn garbage() -> Vec<Vec<u8>> {
    let mut out = vec![vec![0x45], vec![0x60; 10], vec![0xff; 64], vec![0x45; 20], vec![0x60; 48]];
    // A SYN to 100.80.0.2:22 with damage: bad IP checksum, bad TCP checksum, bad lengths.
    let mut syn = vec![
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 80, 0, 1, 100, 80, 0, 2, // IPv4
        0x9c, 0x40, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, // TCP SYN
    ];
    out.push(syn.clone()); // checksums zero: bad
    syn[2..4].copy_from_slice(&4000u16.to_be_bytes());
    out.push(syn.clone()); // total length beyond the packet
    syn[2..4].copy_from_slice(&10u16.to_be_bytes());
    out.push(syn.clone()); // total length below the header
    syn[0] = 0x4f;
    out.push(syn); // header length beyond the packet
                   // UDP and ICMP to the device address; IPv6 with an absurd payload length.
    out.push(vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 100, 80, 0, 1, 100, 80, 0, 2, 0, 53, 0, 53, 0, 8, 0, 0]);
    out.push(vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 100, 80, 0, 1, 100, 80, 0, 2, 8, 0, 0, 0, 0, 0, 0, 0]);
    let mut v6 = vec![0x60, 0, 0, 0, 0xff, 0xff, 6, 64];
    v6.extend_from_slice(&[0xfd; 32]);
    v6.extend_from_slice(&[0; 20]);
    out.push(v6);
    for seed in 0..200 {
        let mut p = data(20 + (seed as usize * 7) % 200, seed);
        p[0] = if seed % 2 == 0 { 0x45 } else { 0x60 };
        out.push(p);
    }
    out
}

#[test]
fn tun_end_to_end() {
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: tun_end_to_end needs root (network namespaces and a TUN device)");
        return;
    }
    let Some(ns) = Netns::new() else {
        println!("skipped: `ip netns add` failed");
        return;
    };
    let dialer = spawn_dialer();
    let echo_port = echo_server();
    let hash_port = hash_server();
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };

    let ns_name = ns.0.clone();
    let worker = std::thread::spawn(move || {
        let ns = Netns(ns_name);
        ns.enter();
        std::mem::forget(ns); // the outer guard deletes it
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run_in_namespace(dialer, echo_port, hash_port, closed_port))
    });
    let result = worker.join();
    assert!(!ns.has_link(IFACE), "the interface is gone after shutdown");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn run_in_namespace(
    dialer: std_mpsc::Sender<(SocketAddr, DialReply)>,
    echo_port: u16,
    hash_port: u16,
    closed_port: u16,
) {
    let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
    let device = map.add_device("pi@test".into(), None).expect("device");
    map.add_route("198.19.77.0/24".parse::<Prefix>().expect("prefix"), "pi@test".into()).expect("route");
    map.add_route("fd00:77::/64".parse::<Prefix>().expect("prefix"), "pi@test".into()).expect("route");
    let config = NetstackConfig { name: IFACE.into(), map, ..NetstackConfig::default() };
    let netstack = Netstack::new(config).expect("netstack");
    let status = netstack.status();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(netstack.serve(HostDialer { dialer }, async {
        let _ = stop_rx.await;
    }));

    let at = move |port| SocketAddr::from((device, port));

    // One flow, both ways at once, 64 MiB.
    let payload = data(64 << 20, 1);
    let started = Instant::now();
    let back = echo(at(echo_port), &payload).await;
    let secs = started.elapsed().as_secs_f64();
    assert!(back.len() == payload.len(), "echoed {} of {} bytes", back.len(), payload.len());
    assert_eq!(digest::digest(&digest::SHA256, &back).as_ref(), digest::digest(&digest::SHA256, &payload).as_ref());
    println!("echo 64 MiB each way through the TUN: {:.0} MiB/s each way", 64.0 / secs);

    // One flow, one way, 256 MiB, checked by the server's SHA-256.
    let payload = data(256 << 20, 2);
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(at(hash_port)).await.expect("connect");
    s.write_all(&payload).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut digest_back = Vec::new();
    s.read_to_end(&mut digest_back).await.expect("read digest");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(digest_back, digest::digest(&digest::SHA256, &payload).as_ref());
    println!("upload 256 MiB through the TUN: {:.0} MiB/s ({:.2} Gbit/s)", 256.0 / secs, 256.0 * 8.0 / 1024.0 / secs);
    drop(payload);

    // Through the routed prefixes too: the kernel gives these flows the interface's own address
    // (IPv4, and the IPv6 one the interface gets for an IPv6 route) as their source, the only
    // sources the stack serves.
    for addr in
        [SocketAddr::from(([198, 19, 77, 10], echo_port)), format!("[fd00:77::10]:{echo_port}").parse().expect("addr")]
    {
        let back = echo(addr, b"routed").await;
        assert_eq!(back, b"routed", "{addr}");
    }

    // A refused target: ECONNREFUSED, quickly.
    let started = Instant::now();
    let err = tokio::net::TcpStream::connect(at(closed_port)).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused in {:?}", started.elapsed());

    // An unreachable target, and an unassigned address: EHOSTUNREACH, quickly.
    for addr in [at(9), SocketAddr::from(([100, 80, 0, 99], 22))] {
        let started = Instant::now();
        let err = tokio::net::TcpStream::connect(addr).await.expect_err("unreachable");
        assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{addr}: {err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{addr}: unreachable in {:?}", started.elapsed());
    }

    // 100 concurrent flows.
    let started = Instant::now();
    let flows: Vec<_> = (0..100u32)
        .map(|i| {
            tokio::spawn(async move {
                let payload = data(256 * 1024 + i as usize, 100 + i);
                let back = echo(at(echo_port), &payload).await;
                back == payload
            })
        })
        .collect();
    for (i, f) in flows.into_iter().enumerate() {
        assert!(f.await.expect("flow task"), "flow {i} intact");
    }
    println!("100 concurrent flows of 256 KiB echoed in {:?}", started.elapsed());

    // Garbage written into the interface is dropped; the stack still works.
    let packets = garbage();
    tokio::task::spawn_blocking(move || inject(IFACE, &packets)).await.expect("inject");
    let back = echo(at(echo_port), b"still alive").await;
    assert_eq!(back, b"still alive");
    let snapshot = status.snapshot().await.expect("status");
    println!("stats: {:?}", snapshot.stats);
    let st = &snapshot.stats;
    assert!(st.malformed + st.not_tcp + st.foreign_source >= 10, "garbage counted: {st:?}");
    // Every flow above came from the interface's own addresses; the garbage carried others.
    assert!(st.foreign_source > 0, "{st:?}");
    assert_eq!(snapshot.interface, IFACE);
    assert_eq!(snapshot.devices.len(), 1);

    let _ = stop_tx.send(());
    serving.await.expect("serve task").expect("serve");
}

/// A device that accepts the first flow, then never reads again while it keeps pinging: the
/// relay connection's send buffer fills and stays full. Both ends' socket buffers are made as
/// small as the kernel allows, so that happens after a few KiB.
struct StallingDialer;

fn shrink(fd: std::os::fd::RawFd, opt: libc::c_int) {
    let size: libc::c_int = 4096;
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

impl Dialer for StallingDialer {
    fn dial(&self, _device: DeviceKey, _first: String) -> BoxFuture<'static, Result<Dialed, SetupFailed>> {
        Box::pin(async move {
            let (client, server) = loopback_pair().await?;
            shrink(client.as_raw_fd(), libc::SO_SNDBUF);
            shrink(server.as_raw_fd(), libc::SO_RCVBUF);
            let (ck, dk) = session_keys();
            tokio::spawn(stalling_device(server, dk));
            Ok(Dialed { stream: client, keys: ck, session: "0000stal".into(), udp: false })
        })
    }
}

async fn stalling_device(mut sock: tokio::net::TcpStream, keys: SessionKeys) {
    // It pings often and never gives up on np up itself (it reads nothing, so it hears nothing).
    let config = MuxConfig {
        keepalive_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(600),
        ..MuxConfig::default()
    };
    let mut conn = Connection::new(&keys, config, Instant::now());
    let mut buf = vec![0u8; 64 * 1024];
    // Read until the first flow opens, and accept it.
    'opening: loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        conn.handle_input(&buf[..n], Instant::now());
        while let Some(ev) = conn.poll_event() {
            if let ConnEvent::FlowOpened { flow, .. } = ev {
                conn.accept(flow).expect("accept");
                break 'opening;
            }
        }
    }
    // Then only write: the OpenOk, and a Ping whenever the keepalive says so.
    loop {
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|t| t <= now) {
            conn.handle_timeout(now);
        }
        let mut out = Vec::new();
        conn.poll_transmit(now, &mut out, 64 * 1024);
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_relay_connection_that_takes_nothing_ends_its_session() {
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root (network namespaces and a TUN device)");
        return;
    }
    let Some(ns) = Netns::named("stall") else {
        println!("skipped: `ip netns add` failed");
        return;
    };
    let ns_name = ns.0.clone();
    let worker = std::thread::spawn(move || {
        let ns = Netns(ns_name);
        ns.enter();
        std::mem::forget(ns);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(stall_in_namespace())
    });
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn stall_in_namespace() {
    let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
    let device = map.add_device("pi@test".into(), None).expect("device");
    // The stall bound is the session's idle timeout: 2 s here. Keepalives keep np up's own
    // idle timer fed (the device pings), so only the stall can end this session.
    let mux = MuxConfig {
        keepalive_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(2),
        ..MuxConfig::default()
    };
    let config = NetstackConfig { name: IFACE.into(), map, mux, ..NetstackConfig::default() };
    let netstack = Netstack::new(config).expect("netstack");
    let status = netstack.status();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(netstack.serve(StallingDialer, async {
        let _ = stop_rx.await;
    }));

    let started = Instant::now();
    let mut app = tokio::net::TcpStream::connect(SocketAddr::from((device, 22))).await.expect("connect");
    // Write until the flow is reset: np up's window fills the connection, nothing drains it.
    let chunk = vec![7u8; 64 * 1024];
    let written = tokio::time::timeout(Duration::from_secs(20), async {
        let mut total = 0usize;
        loop {
            match app.write(&chunk).await {
                Ok(n) => total += n,
                Err(e) => return (total, e),
            }
        }
    })
    .await
    .expect("the flow ends within 20 s, not never");
    let (total, err) = written;
    let took = started.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(took >= Duration::from_secs(2), "not before the bound: {took:?}");
    assert!(total < 64 << 20, "the application was pushed back ({total} bytes taken)");
    let snapshot = status.snapshot().await.expect("status");
    let (_, session) = snapshot.sessions.first().expect("one device");
    assert!(session.contains("took nothing for 2s"), "{session}");
    println!("stalled relay connection ended the session after {took:?} ({total} bytes taken): {session}");

    let _ = stop_tx.send(());
    serving.await.expect("serve task").expect("serve");
}
