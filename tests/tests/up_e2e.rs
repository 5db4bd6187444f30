//! `np up` end to end in network namespaces (root required): np-control and np-relay in pr; npd,
//! a real sshd and test servers in pd; a LAN host behind pd; `np up` in pc with
//! `--device pi4@alice_device --route LAN=pi4@alice_device`, and the real `ssh` client, test
//! sockets and packet writers in pc going through its TUN interface.
#![allow(clippy::unwrap_used)]

use np_tests::netns::{
    connect_in, dns_a, echo_once, python_in, read_all_hash, send_pattern, sh_in, Deployment, DeploymentOptions, Up,
};
use np_tests::servers::{pattern, pattern_sha256};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const DEVICE: &str = "pi4@alice_device";
const DNS_NAME: &str = "pi4.alice_device.np";

/// A deployment with the LAN host, and `np up` in pc routing the LAN to the device.
fn up_with_lan(source_len: u64) -> (Deployment, Up) {
    let d = Deployment::start(DeploymentOptions { lan: true, source_len: Some(source_len) });
    let route = format!("{}={DEVICE}", d.hosts.lan_prefix());
    let up = d.up(&["--device", DEVICE, "--route", &route]).unwrap_or_else(|e| panic!("{e}"));
    (d, up)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `np up` is still running, its log has no panic, and ssh through it still works.
fn assert_still_serves(d: &Deployment, up: &mut Up, dev: Ipv4Addr) {
    assert!(up.proc.0.try_wait().unwrap().is_none(), "np up exited:\n{}", up.log());
    assert!(!up.log().contains("panicked"), "np up panicked:\n{}", up.log());
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    let sshd_log = np_tests::netns::read(&d.sshd.dir.path().join("sshd.log"));
    let (_, status, _) = d.np_in_pc(&["status"]);
    assert!(
        out.status.success(),
        "ssh after the abuse failed: {}\nnp status:\n{status}\nsshd log:\n{}\nnp up log:\n{}",
        text(&out.stderr),
        tail(&sshd_log),
        tail(&up.log())
    );
    assert_eq!(text(&out.stdout).trim(), "ok");
}

#[test]
fn ssh_dns_lan_refusals_and_status() {
    let t0 = Instant::now();
    let (d, up) = up_with_lan(1 << 20);
    let pc = d.hosts.pc.clone();
    assert_eq!((up.name.as_str(), up.addr, up.prefix_len), ("np0", Ipv4Addr::new(100, 80, 0, 1), 16));
    let dev = up.device(DEVICE);
    assert!(up.lines.iter().any(|l| l.contains(&d.hosts.lan_prefix()) && l.contains(DEVICE)), "{:?}", up.lines);

    // The interface and the LAN route are there.
    let (ok, link) = d.hosts.ip_in(&pc, &["link", "show", "np0"]);
    assert!(ok && link.contains("UP"), "{link}");
    let (_, routes) = d.hosts.ip_in(&pc, &["route", "show"]);
    assert!(routes.lines().any(|l| l.starts_with(&d.hosts.lan_prefix()) && l.contains("np0")), "{routes}");

    // Real ssh through the TUN to the real sshd in pd.
    let t = Instant::now();
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert!(out.status.success(), "ssh failed: {}\n{}", text(&out.stderr), up.log());
    assert_eq!(text(&out.stdout).trim(), "ok");
    eprintln!("ssh root@{dev} (cold session): {:?}", t.elapsed());
    let t = Instant::now();
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert_eq!(text(&out.stdout).trim(), "ok", "{}", text(&out.stderr));
    eprintln!("ssh root@{dev} (warm session): {:?}", t.elapsed());

    // The resolver on the interface address.
    let dns = SocketAddr::from((up.addr, 53));
    assert_eq!(dns_a(&pc, dns, DNS_NAME, Duration::from_secs(5)), Ok(vec![dev]));
    assert_eq!(dns_a(&pc, dns, "PI4.Alice_Device.NP", Duration::from_secs(5)), Ok(vec![dev]));
    assert_eq!(dns_a(&pc, dns, "nope.alice_device.np", Duration::from_secs(5)), Err("rcode 3".into()));
    assert!(dns_a(&pc, dns, "example.com", Duration::from_secs(5)).is_err_and(|e| e.starts_with("rcode")));
    // ssh by name, with pc's resolv.conf pointing at np up's resolver (no systemd-resolved here).
    d.hosts.etc_file(&pc, "resolv.conf", &format!("nameserver {}\n", up.addr));
    let out = d.ssh(DNS_NAME, 22, "echo ok-by-name");
    assert!(out.status.success(), "ssh root@{DNS_NAME} failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok-by-name");

    // The LAN host behind the device, on its permitted port.
    let (lan_open, lan_closed) = d.lan_ports.unwrap();
    let lan = d.hosts.lan_ip();
    assert_eq!(echo_once(&pc, (lan, lan_open).into(), b"hello lan").unwrap(), b"hello lan");

    // Unpermitted: the LAN host's other port (a server listens there: the device refuses), and a
    // port on the device address outside its permit-open list. Connection refused, quickly.
    for (what, addr) in [("LAN port", SocketAddr::from((lan, lan_closed))), ("device port", (dev, 1).into())] {
        let t = Instant::now();
        let r = connect_in(&pc, addr, Duration::from_secs(15));
        let e = r.err().unwrap_or_else(|| panic!("unpermitted {what} {addr} accepted"));
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what} {addr}: {e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{what} refusal took {:?}", t.elapsed());
        eprintln!("unpermitted {what} {addr}: refused in {:?}", t.elapsed());
    }

    // `np status` while a flow is open.
    let mut held = connect_in(&pc, (dev, d.echo_port).into(), Duration::from_secs(10)).unwrap();
    held.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    let (ok, status, err) = d.np_in_pc(&["status"]);
    assert!(ok, "np status failed: {err}");
    eprintln!("np status:\n{status}");
    assert!(status.contains("np0") && status.contains("100.80.0.1/16"), "{status}");
    let line = status.lines().find(|l| l.contains(DEVICE)).unwrap_or_else(|| panic!("no device line:\n{status}"));
    assert!(line.contains(&dev.to_string()) && line.contains("established"), "{line}");
    let flows: usize = line.split_whitespace().last().and_then(|f| f.parse().ok()).unwrap_or(0);
    assert!(flows >= 1, "no open flow shown: {line}");
    assert!(status.contains(&d.hosts.lan_prefix()), "route not shown:\n{status}");
    drop(held);
    let (ok, _, _) = d.np_in_pc(&["status", "--name", "np9"]);
    assert!(!ok, "np status for an interface nobody runs succeeded");
    eprintln!("ssh_dns_lan_refusals_and_status: {:?}", t0.elapsed());
}

#[test]
fn bulk_many_flows_and_a_stalled_flow() {
    let t0 = Instant::now();
    let len: u64 = 256 << 20;
    let (d, up) = up_with_lan(len);
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);

    // 256 MiB each way through the TUN, SHA-256 checked.
    let t = Instant::now();
    assert_eq!(send_pattern(&pc, (dev, d.hash_port).into(), len), format!("{} {len}", pattern_sha256(len)));
    eprintln!("256 MiB pc -> pd through np0: {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(read_all_hash(&pc, (dev, d.source_port).into()), (len, pattern_sha256(len)));
    eprintln!("256 MiB pd -> pc through np0: {:?}", t.elapsed());

    // One stalled flow: writes into an echo and never reads, until everything is full.
    let echo_a = SocketAddr::from((dev, d.echo_port));
    let mut stalled = connect_in(&pc, echo_a, Duration::from_secs(10)).unwrap();
    stalled.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let junk = vec![7u8; 1 << 20];
    let mut stuffed = 0;
    for _ in 0..64 {
        match stalled.write(&junk) {
            Ok(n) => stuffed += n,
            Err(_) => break,
        }
    }
    eprintln!("stalled flow took {} KiB before blocking", stuffed / 1024);
    assert!(stuffed < 64 << 20, "the stalled flow never blocked: flow control is missing");

    // 100 concurrent flows all complete meanwhile (and one over the LAN route).
    let t = Instant::now();
    let handles: Vec<_> = (0..100u64)
        .map(|i| {
            let pc = pc.clone();
            std::thread::spawn(move || {
                let c = connect_in(&pc, echo_a, Duration::from_secs(20)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let msg = pattern(i);
                let mut w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    w.write_all(&msg).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                let mut c = c;
                c.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                back == pattern(i)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "an echo came back wrong");
    }
    eprintln!("100 concurrent 64 KiB echo flows beside a stalled one: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(30), "100 flows took {:?}", t.elapsed());
    let (lan_open, _) = d.lan_ports.unwrap();
    assert_eq!(echo_once(&pc, (d.hosts.lan_ip(), lan_open).into(), b"lan too").unwrap(), b"lan too");

    // The stalled flow still works once read.
    stalled.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut drained = 0;
    while drained < stuffed {
        let n = stalled.read(&mut buf).unwrap();
        assert!(n > 0, "stalled flow closed after {drained} of {stuffed} bytes");
        assert!(buf[..n].iter().all(|&b| b == 7));
        drained += n;
    }
    eprintln!("np up RSS after the bulk test: {} KiB", up.rss_kib());
    eprintln!("bulk_many_flows_and_a_stalled_flow: {:?}", t0.elapsed());
}

/// Packet builders shared by the packet writers below.
const PY_PACKETS: &str = r#"
import socket, struct, random, sys, time
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def ip4(proto, payload, src, dst, ihl=5, tot=None, flags=0, frag=0, opts=b'', ver=4, ck=None):
    tot = 20 + len(opts) + len(payload) if tot is None else tot
    h = struct.pack('!BBHHHBBH4s4s', (ver << 4) | ihl, 0, tot & 0xffff, random.randrange(65536),
                    ((flags << 13) | frag) & 0xffff, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) + opts
    c = csum(h) if ck is None else ck
    return h[:10] + struct.pack('!H', c) + h[12:] + payload
def tcp(src, dst, sport, dport, flags, seq=1, ack=0, data=b'', doff=None, opts=b'', bad=False, proto_len=None):
    doff = (20 + len(opts)) // 4 if doff is None else doff
    seg = struct.pack('!HHIIBBHHH', sport, dport, seq, ack, (doff & 15) << 4, flags & 0xff, 65535, 0, 0) + opts + data
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(seg) if proto_len is None else proto_len)
    c = csum(pseudo + seg) ^ (0x1234 if bad else 0)
    return seg[:16] + struct.pack('!H', c) + seg[18:]
def syn(src, dst, sport, dport, **kw):
    return ip4(6, tcp(src, dst, sport, dport, 0x02, seq=random.randrange(1 << 32), opts=b'\x02\x04\x05\xb4', **kw), src, dst)
"#;

/// Writes malformed, truncated and unexpected packets into the TUN: with an AF_PACKET socket on
/// the interface (the exact bytes reach np up, bad lengths and checksums included) and with a raw
/// IP socket (the kernel routes them into the TUN). Prints `sent N failed M`.
const PY_BAD: &str = r#"
iface, dst, src, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
random.seed(seed)
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86dd
pk = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
sent = failed = 0
def put(p, proto=ETH_P_IP):
    global sent, failed
    try:
        pk.sendto(p, (iface, proto)); sent += 1
    except OSError:
        failed += 1
good = syn(src, dst, 40000, 22)
seg = tcp(src, dst, 40001, 22, 0x02)
v4 = [
    b'', b'\x45', b'\x45' + b'\0' * 18, good[:20], good[:30], good[:-1],
    ip4(6, seg, src, dst, ihl=4), ip4(6, seg, src, dst, ihl=15), ip4(6, seg, src, dst, ihl=0),
    ip4(6, seg, src, dst, tot=1500), ip4(6, seg, src, dst, tot=10), ip4(6, seg, src, dst, tot=0),
    ip4(6, seg, src, dst, tot=len(seg) + 19), ip4(6, seg, src, dst, ck=0xbeef), ip4(6, seg, src, dst, ver=7),
    ip4(6, tcp(src, dst, 40002, 22, 0x02, bad=True), src, dst),
    ip4(6, tcp(src, dst, 40003, 22, 0x02, doff=15), src, dst), ip4(6, tcp(src, dst, 40004, 22, 0x02, doff=2), src, dst),
    ip4(6, tcp(src, dst, 40005, 22, 0x02)[:10], src, dst), ip4(6, b'', src, dst),
    ip4(6, tcp(src, dst, 40006, 22, 0x02, opts=b'\x03\x00\x00\x00'), src, dst),
    ip4(6, tcp(src, dst, 40007, 22, 0x02, opts=b'\x02\xff\x05\xb4'), src, dst),
    ip4(6, tcp(src, dst, 40008, 22, 0x02, opts=b'\x08\x01\x00\x00'), src, dst),
    ip4(6, tcp(src, dst, 40009, 22, 0x02, opts=b'\x04\x02\x01\x00' + b'\x05\x0a' + b'\0' * 6), src, dst),
    ip4(6, tcp(src, dst, 40010, 22, 0x02, opts=b'\x01' * 40, doff=15), src, dst),
    ip4(6, seg, src, dst, flags=1), ip4(6, seg, src, dst, frag=100), ip4(6, seg, src, dst, flags=1, frag=8191),
    ip4(6, seg, src, dst, opts=b'\x44\x08\x05\x00' + b'\0' * 4, ihl=7), ip4(6, seg, src, dst, opts=b'\x07\xff\x00\x00', ihl=6),
    ip4(17, struct.pack('!HHHH', 5353, 53, 8, 0), src, dst), ip4(17, b'\x00', src, dst),
    ip4(1, b'\x08\x00\xf7\xff\x00\x00\x00\x00', src, dst), ip4(1, b'\x03', src, dst),
    ip4(0, b'hop', src, dst), ip4(47, b'\0' * 40, src, dst), ip4(253, bytes(range(256)), src, dst), ip4(255, b'', src, dst),
    ip4(6, tcp(src, dst, 40011, 0, 0x02), src, dst), ip4(6, tcp(src, dst, 0, 22, 0x02), src, dst),
    ip4(6, tcp('0.0.0.0', dst, 40012, 22, 0x02), '0.0.0.0', dst),
    ip4(6, tcp('255.255.255.255', dst, 40013, 22, 0x02), '255.255.255.255', dst),
    ip4(6, tcp(dst, dst, 22, 22, 0x02), dst, dst),
    ip4(6, tcp(src, '100.80.255.255', 40014, 22, 0x02), src, '100.80.255.255'),
    ip4(6, tcp(src, '224.0.0.1', 40015, 22, 0x02), src, '224.0.0.1'),
    ip4(6, tcp(src, '100.80.0.1', 40016, 22, 0x02), src, '100.80.0.1'),
    ip4(6, tcp(src, '100.80.0.99', 40017, 22, 0x02), src, '100.80.0.99'),
    ip4(6, tcp(src, '8.8.8.8', 40018, 22, 0x02), src, '8.8.8.8'),
    ip4(6, tcp(src, dst, 40019, 22, 0x02, data=b'x' * 1000), src, dst),
    ip4(6, tcp(src, dst, 40020, 22, 0xff, data=b'y' * 10), src, dst),
    ip4(6, tcp(src, dst, 40021, 22, 0x00), src, dst),
    ip4(6, tcp(src, dst, 40022, 22, 0x03), src, dst),
    ip4(6, tcp(src, dst, 40023, 22, 0x04), src, dst), ip4(6, tcp(src, dst, 40024, 22, 0x10, ack=12345), src, dst),
    ip4(6, tcp(src, dst, 40025, 22, 0x11), src, dst), ip4(6, tcp(src, dst, 40026, 22, 0x18, data=b'data'), src, dst),
    ip4(6, tcp(src, dst, 40027, 22, 0x02, proto_len=9999), src, dst),
    ip4(6, b'\0' * 65000, src, dst),
]
for p in v4:
    put(p)
# IPv6, written with the IPv6 protocol, and the families crossed.
s6, d6 = socket.inet_pton(socket.AF_INET6, 'fd00::1'), socket.inet_pton(socket.AF_INET6, 'fd00::2')
def ip6(nh, payload, plen=None, ver=6):
    return struct.pack('!IHBB', ver << 28, len(payload) if plen is None else plen, nh, 64) + s6 + d6 + payload
tcp6 = struct.pack('!HHIIBBHHH', 40100, 22, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
v6 = [b'\x60', b'\x60' + b'\0' * 38, ip6(6, tcp6), ip6(6, tcp6, plen=1000), ip6(6, tcp6, plen=0), ip6(6, tcp6[:7]),
      ip6(0, b'\x00\x00' + b'\0' * 4 + tcp6), ip6(0, b'\x00\xff' + b'\0' * 6), ip6(43, b'\x2b\x00' + b'\0' * 6) ,
      ip6(44, b'\x06\x00\x00\x01\0\0\0\1' + tcp6), ip6(58, b'\x80\x00\x00\x00\0\0\0\0'), ip6(59, b''), ip6(6, tcp6, ver=4)]
for p in v6:
    put(p, ETH_P_IPV6)
put(good, ETH_P_IPV6)
put(v6[2], ETH_P_IP)
# Mutations of valid packets, and noise.
base = [good, ip4(6, tcp(src, dst, 40200, 22, 0x18, data=b'z' * 64), src, dst), v6[2]]
for i in range(4000):
    p = bytearray(random.choice(base))
    for _ in range(random.randint(1, 6)):
        p[random.randrange(len(p))] = random.randrange(256)
    if random.random() < 0.3:
        p = p[:random.randrange(len(p) + 1)]
    put(bytes(p), ETH_P_IPV6 if p and p[0] >> 4 == 6 else ETH_P_IP)
for i in range(2000):
    n = random.randrange(0, 1600)
    p = bytes([random.choice([0x45, 0x46, 0x4f, 0x60, 0x00])]) + random.randbytes(n)
    put(p, random.choice([ETH_P_IP, ETH_P_IPV6]))
# Through the kernel's routing: a raw IP socket towards the device address.
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for p in [ip4(1, b'\x08\x00\xf7\xff\x00\x00\x00\x00', src, dst), ip4(17, b'\x13\x88\x00\x35\x00\x08\x00\x00', src, dst),
          ip4(6, tcp(src, dst, 40300, 22, 0x02, bad=True), src, dst), ip4(253, b'x' * 100, src, dst),
          ip4(6, tcp(src, dst, 40301, 22, 0x12, ack=7), src, dst), ip4(6, tcp(src, dst, 40302, 22, 0x04), src, dst)]:
    try:
        raw.sendto(p, (dst, 0)); sent += 1
    except OSError:
        failed += 1
print('sent', sent, 'failed', failed)
"#;

/// Sends N TCP SYNs to DST:PORT from random ports, with valid checksums, through a raw IP socket:
/// every other one from the interface's own address OWN (np up holds it, opens the flow, and
/// pc's kernel resets the SYN-ACK), the rest from random addresses nobody answers for (np up
/// serves its own host only, so it drops them at once). Prints the time it took.
const PY_SYN_FLOOD: &str = r#"
dst, port, n, own = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
t = time.time(); failed = 0
for i in range(n):
    src = own if i % 2 == 0 else '198.18.%d.%d' % (random.randrange(256), random.randrange(1, 255))
    try:
        raw.sendto(syn(src, dst, random.randrange(1024, 65536), port), (dst, 0))
    except OSError:
        failed += 1
print('flood', n, 'failed', failed, 'in %.2f s' % (time.time() - t))
"#;

#[test]
fn bad_packets_are_dropped_without_harm() {
    let t0 = Instant::now();
    let (d, mut up) = up_with_lan(1 << 20);
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    // A session and a flow first, so the abuse meets a live stack.
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert_eq!(text(&out.stdout).trim(), "ok", "{}", text(&out.stderr));
    let mut held = connect_in(&pc, (dev, d.echo_port).into(), Duration::from_secs(10)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rss0 = up.rss_kib();

    let script = format!("{PY_PACKETS}{PY_BAD}");
    for seed in 1..=3 {
        let t = Instant::now();
        let out = python_in(
            &pc,
            &script,
            // From the interface's own address: np up drops any other source unparsed.
            &["np0", &dev.to_string(), &up.addr.to_string(), &seed.to_string()],
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "packet writer failed: {}", text(&out.stderr));
        eprintln!("bad packets (seed {seed}): {} in {:?}", text(&out.stdout).trim(), t.elapsed());
        assert!(up.proc.0.try_wait().unwrap().is_none(), "np up exited:\n{}", up.log());
    }
    // The flow opened before is still intact.
    held.write_all(b"still here").unwrap();
    let mut b = [0u8; 10];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
    assert_still_serves(&d, &mut up, dev);
    eprintln!("np up RSS before the bad packets {rss0} KiB, after {} KiB", up.rss_kib());

    eprintln!("bad_packets_are_dropped_without_harm: {:?}", t0.elapsed());
}

/// Flows of `DEVICE` in `np status`.
fn device_flows(d: &Deployment) -> usize {
    let (_, st, _) = d.np_in_pc(&["status"]);
    let line = st.lines().find(|l| l.contains(DEVICE)).unwrap_or_default();
    line.split_whitespace().last().and_then(|f| f.parse().ok()).unwrap_or(usize::MAX)
}

/// Peak RSS of a process while `f` runs (sampled every 20 ms).
fn peak_rss_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let peak = std::sync::Arc::new(AtomicU64::new(np_tests::rss_kib(pid)));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(np_tests::rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    (r, peak.load(Ordering::SeqCst))
}

#[test]
fn a_syn_flood_leaves_memory_bounded_and_service_intact() {
    let t0 = Instant::now();
    let (d, mut up) = up_with_lan(1 << 20);
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert_eq!(text(&out.stdout).trim(), "ok", "{}", text(&out.stderr));
    let mut held = connect_in(&pc, (dev, d.echo_port).into(), Duration::from_secs(10)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rss0 = up.rss_kib();
    let script = format!("{PY_PACKETS}{PY_SYN_FLOOD}");
    let mut problems = Vec::new();

    // Two rounds of 20,000 SYNs to the ssh port: half from other hosts' addresses, which np up
    // drops unanswered (it serves its own host only), half from the interface's own address, with
    // pc's kernel kept from resetting the SYN-ACKs (no socket of its own sent those SYNs), so they
    // go unanswered and whatever the flood opened has to time out on np up's side.
    let no_resets = "nft add table inet npt_flood && \
                     nft 'add chain inet npt_flood out { type filter hook output priority 0; }' && \
                     nft add rule inet npt_flood out oifname np0 'tcp flags & rst == rst' drop";
    let out = sh_in(&pc, no_resets, Duration::from_secs(10));
    assert!(out.status.success(), "nft in pc: {}", text(&out.stderr));
    for round in 1..=2 {
        let ((), peak) = peak_rss_during(up.pid, || {
            let args = [&dev.to_string(), "22", "20000", &up.addr.to_string()];
            let out = python_in(&pc, &script, &args, Duration::from_secs(120));
            assert!(out.status.success(), "flood failed: {}", text(&out.stderr));
            eprintln!("round {round}: {}", text(&out.stdout).trim());
            // A new flow gets through soon after.
            let t = Instant::now();
            let ok = np_tests::wait_until(Duration::from_secs(30), || {
                echo_once(&pc, (dev, d.echo_port).into(), b"after flood").is_ok_and(|b| b == b"after flood")
            });
            eprintln!("round {round}: a new flow got through: {ok} after {:?}", t.elapsed());
            if !ok {
                problems.push(format!("round {round}: no new flow within 30 s of the flood"));
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        let flows = device_flows(&d);
        eprintln!(
            "round {round}: np up RSS {rss0} KiB before any flood, peak {peak} KiB, now {} KiB; {flows} flows open; fds {}",
            up.rss_kib(),
            np_tests::fd_count(up.pid)
        );
        if peak > rss0 + 64 * 1024 {
            problems.push(format!("round {round}: RSS grew from {rss0} KiB to {peak} KiB (bound: +64 MiB)"));
        }
    }
    // The flood's half-open handshakes expire (a client's kernel gives up on a SYN-ACK-less
    // handshake after about a minute; np up should not keep them longer).
    let t = Instant::now();
    let drained = np_tests::wait_until(Duration::from_secs(75), || device_flows(&d) <= 1);
    eprintln!("half-open flows drained: {drained} after {:?} ({} left)", t.elapsed(), device_flows(&d));
    if !drained {
        problems.push(format!("{} flows still open 75 s after the flood (only 1 is real)", device_flows(&d)));
    }
    let _ = sh_in(&pc, "nft delete table inet npt_flood", Duration::from_secs(10));
    let (_, st, _) = d.np_in_pc(&["status"]);
    if !st.contains("handshake_timeouts: ") || st.contains("handshake_timeouts: 0,") {
        problems.push(format!("no half-open handshake timed out: the flood did not test that\n{st}"));
    }
    // The flow opened before is intact, and np up still serves.
    held.write_all(b"still here").unwrap();
    let mut b = [0u8; 10];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
    assert_still_serves(&d, &mut up, dev);
    let (_, st, _) = d.np_in_pc(&["status"]);
    eprintln!("{st}");
    eprintln!("a_syn_flood_leaves_memory_bounded_and_service_intact: {:?}", t0.elapsed());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Sends one valid SYN from SRC:SPORT to DST:PORT through a raw IP socket, nothing more: when np
/// up answers with a SYN-ACK, pc's kernel has no such connection and answers with a reset (as it
/// does for an application that gave up connecting, or a SYN scan).
const PY_ONE_SYN: &str = r#"
src, dst, sport, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.sendto(syn(src, dst, sport, port), (dst, 0))
"#;

#[test]
fn a_handshake_reset_by_the_client_does_not_take_over_the_port() {
    let t0 = Instant::now();
    let (d, mut up) = up_with_lan(1 << 20);
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    let echo_a = SocketAddr::from((dev, d.echo_port));
    assert_eq!(echo_once(&pc, echo_a, b"before").unwrap(), b"before");
    let script = format!("{PY_PACKETS}{PY_ONE_SYN}");
    for (i, port) in [d.echo_port, 22].into_iter().enumerate() {
        let sport = (40000 + i).to_string();
        let out = python_in(
            &pc,
            &script,
            &[&up.addr.to_string(), &dev.to_string(), &sport, &port.to_string()],
            Duration::from_secs(20),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // The device connects, np up sends its SYN-ACKs, pc's kernel resets them.
    let settled = np_tests::wait_until(Duration::from_secs(10), || {
        let (_, status, _) = d.np_in_pc(&["status"]);
        status.contains("flows_accepted: 3,")
    });
    std::thread::sleep(Duration::from_millis(500));
    let (_, status, _) = d.np_in_pc(&["status"]);
    eprintln!("after two reset handshakes (settled: {settled}):\n{status}");
    for i in 0..3 {
        let r = echo_once(&pc, echo_a, b"after");
        assert!(
            r.as_deref().is_ok_and(|b| b == b"after"),
            "echo {i} after a reset handshake: {r:?}\n{status}\n{}",
            tail(&up.log())
        );
    }
    assert_still_serves(&d, &mut up, dev);
    let line = d.np_in_pc(&["status"]).1.lines().find(|l| l.contains(DEVICE)).unwrap_or_default().to_string();
    assert!(line.trim_end().ends_with(" 0"), "flows left open after the resets: {line}");
    eprintln!("a_handshake_reset_by_the_client_does_not_take_over_the_port: {:?}", t0.elapsed());
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Opens a TUN interface named ARGV[1] and holds it until killed.
const PY_HOLD_TUN: &str = r#"
import fcntl, os, struct, sys, time
fd = os.open('/dev/net/tun', os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', sys.argv[1].encode(), 0x0001 | 0x1000))
os.system('ip link set %s up' % sys.argv[1])
time.sleep(3600)
"#;

/// What in pc could be left behind by an `np up` on interface `name`.
fn leftovers(d: &Deployment, name: &str) -> Vec<String> {
    let pc = &d.hosts.pc;
    let mut left = Vec::new();
    let (exists, link) = d.hosts.ip_in(pc, &["link", "show", name]);
    if exists {
        left.push(format!("interface: {link}"));
    }
    for fam in ["-4", "-6"] {
        let out = sh_in(pc, &format!("ip {fam} route show table all"), Duration::from_secs(5));
        for l in text(&out.stdout).lines() {
            if l.contains(name) || l.contains(&d.hosts.lan_prefix()) || l.contains("100.80.") || l.contains("100.81.") {
                left.push(format!("route: {l}"));
            }
        }
    }
    let out = sh_in(pc, "ss -Hlnu; ss -Hlnt; ss -Hlx", Duration::from_secs(5));
    for l in text(&out.stdout).lines() {
        if l.contains(":53 ") || l.contains("100.80.") || l.contains("np-status") || l.contains("/run/np/") {
            left.push(format!("socket: {l}"));
        }
    }
    left
}

/// The file of `np up`'s status socket for interface `name` in pc: `/run/np/NAME.INODE.status`,
/// INODE that of pc's network namespace.
fn status_socket_file(d: &Deployment, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(std::path::Path::new("/var/run/netns").join(&d.hosts.pc)).unwrap().ino();
    std::path::Path::new("/run/np").join(format!("{name}.{ns}.status"))
}

/// The resolver configuration pc's processes see.
fn resolver_config(d: &Deployment) -> String {
    let out =
        sh_in(&d.hosts.pc, "cat /etc/resolv.conf; resolvectl status 2>/dev/null | grep -i np", Duration::from_secs(5));
    text(&out.stdout)
}

#[test]
fn exit_cleans_up_and_a_crash_leaves_nothing_that_stops_the_next_start() {
    let t0 = Instant::now();
    let (d, mut up) = up_with_lan(1 << 20);
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    let resolv_before = resolver_config(&d);
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert_eq!(text(&out.stdout).trim(), "ok", "{}", text(&out.stderr));
    // A flow open while it stops.
    let _held = connect_in(&pc, (dev, d.echo_port).into(), Duration::from_secs(10)).unwrap();

    // A second `np up` for the same interface is refused while the first runs.
    let t = Instant::now();
    let second = d.up(&["--device", DEVICE]);
    assert!(second.is_err(), "a second np up took over np0");
    eprintln!(
        "second np up on np0 refused in {:?}: {}",
        t.elapsed(),
        tail(&second.err().unwrap_or_default()).lines().last().unwrap_or("")
    );
    assert!(up.proc.0.try_wait().unwrap().is_none(), "the first np up died:\n{}", up.log());

    assert!(status_socket_file(&d, "np0").exists(), "no status socket file while np up runs");

    // SIGTERM: a clean exit, nothing left.
    let t = Instant::now();
    let st = up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap_or_else(|| panic!("np up ignored SIGTERM"));
    eprintln!("np up exited on SIGTERM in {:?}: {st}", t.elapsed());
    assert!(st.success(), "np up exited with {st} on SIGTERM:\n{}", tail(&up.log()));
    assert_eq!(leftovers(&d, "np0"), Vec::<String>::new());
    assert_eq!(resolver_config(&d), resolv_before);
    let socket_file = status_socket_file(&d, "np0");
    assert!(!socket_file.exists(), "{} outlived np up", socket_file.display());
    let (ok, _, err) = d.np_in_pc(&["status"]);
    assert!(!ok && !err.is_empty(), "np status after exit: {err}");
    drop(up);

    // SIGKILL, then the same --name starts cleanly and works.
    let up = d.up(&["--device", &format!("{DEVICE}=100.80.0.9")]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.device(DEVICE), Ipv4Addr::new(100, 80, 0, 9));
    let mut up = up;
    up.signal_and_wait("KILL", Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    let mut up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("np up after a SIGKILL: {e}"));
    eprintln!("np up after SIGKILL ready in {:?}", t.elapsed());
    let dev = up.device(DEVICE);
    let out = d.ssh(&dev.to_string(), 22, "echo ok-after-kill");
    assert_eq!(text(&out.stdout).trim(), "ok-after-kill", "{}", text(&out.stderr));
    up.signal_and_wait("KILL", Duration::from_secs(10)).unwrap();
    // What a crash leaves: the kernel removes a non-persistent TUN with its last descriptor.
    assert!(
        sh_in(&pc, "sleep 0.5", Duration::from_secs(5)).status.success() && leftovers(&d, "np0").is_empty(),
        "after SIGKILL: {:?}",
        leftovers(&d, "np0")
    );
    drop(up);

    // A stale persistent interface of the same name (nobody holds it) is cleaned up at start,
    // even while a process in another namespace holds a TUN interface of that name there.
    let holder = np_tests::netns::spawn_in(
        &d.hosts.pr,
        std::process::Command::new("python3").args(["-c", PY_HOLD_TUN, "np0"]),
        &d.path().join("tun-holder.log"),
    );
    assert!(
        np_tests::wait_until(Duration::from_secs(5), || d.hosts.ip_in(&d.hosts.pr, &["link", "show", "np0"]).0),
        "the TUN holder in pr did not start: {}",
        d.log("tun-holder.log")
    );
    let out = sh_in(&pc, "ip tuntap add dev np0 mode tun && ip link set np0 up", Duration::from_secs(5));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("np up over a stale np0: {e}"));
    let out = d.ssh(&up.device(DEVICE).to_string(), 22, "echo ok-over-stale");
    assert_eq!(text(&out.stdout).trim(), "ok-over-stale", "{}", text(&out.stderr));
    let st = up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();
    assert!(st.success());
    assert_eq!(leftovers(&d, "np0"), Vec::<String>::new());
    drop(holder);

    // Another name and subnet, and its routes go with it too.
    let route = format!("{}={DEVICE}", d.hosts.lan_prefix());
    let mut up = d
        .up(&["--name", "npt7", "--subnet", "100.81.0.0/16", "--device", DEVICE, "--route", &route, "--eager"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((up.name.as_str(), up.addr), ("npt7", Ipv4Addr::new(100, 81, 0, 1)));
    let (lan_open, _) = d.lan_ports.unwrap();
    assert_eq!(echo_once(&pc, (d.hosts.lan_ip(), lan_open).into(), b"via npt7").unwrap(), b"via npt7");
    let (ok, status, err) = d.np_in_pc(&["status", "--name", "npt7"]);
    assert!(ok && status.contains("npt7"), "{status}{err}");
    let st = up.signal_and_wait("INT", Duration::from_secs(10)).unwrap();
    assert!(st.success(), "SIGINT: {st}");
    assert_eq!(leftovers(&d, "npt7"), Vec::<String>::new());

    // No --device: every device that shares its info with @alice, at an address derived from
    // its name, the same on the next start; its name answers, and ssh to it works.
    let mut derived = None;
    for round in ["first", "second"] {
        let mut up = d.up(&[]).unwrap_or_else(|e| panic!("np up with no --device ({round} start): {e}"));
        assert_eq!(up.devices.len(), 1, "{:?}", up.lines);
        let dev = up.device(DEVICE);
        assert_ne!(dev, Ipv4Addr::new(100, 80, 0, 2), "derived from the name, not the first free address");
        assert_eq!(*derived.get_or_insert(dev), dev, "the {round} start gave {DEVICE} another address");
        let dns = SocketAddr::from((up.addr, 53));
        assert_eq!(dns_a(&pc, dns, DNS_NAME, Duration::from_secs(5)), Ok(vec![dev]), "its name answers");
        let out = d.ssh(&dev.to_string(), 22, "echo ok-no-flags");
        assert_eq!(text(&out.stdout).trim(), "ok-no-flags", "{}", text(&out.stderr));
        if round == "second" {
            // A second device's npd starts while np up runs: it gets an address within 5 s,
            // and ssh to it works, with no restart.
            let mut cmd = std::process::Command::new(np_tests::bin("npd"));
            cmd.args(["--as", "@alice_device", "--device", "nas", "--manager", "@alice", "--home"])
                .arg(&d.device_home)
                .args(["--permit-open", &d.permit()]);
            let _nas = np_tests::netns::spawn_in(&d.hosts.pd, &cmd, &d.path().join("npd-nas.log"));
            let t = Instant::now();
            let mut nas = None;
            let seen = np_tests::wait_until(Duration::from_secs(5), || {
                let (_, status, _) = d.np_in_pc(&["status"]);
                nas = status
                    .lines()
                    .find(|l| l.contains("nas@alice_device"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|a| a.parse::<Ipv4Addr>().ok());
                nas.is_some()
            });
            let (_, status, _) = d.np_in_pc(&["status"]);
            assert!(seen, "nas@alice_device did not appear within 5 s:\n{status}\n{}", d.log("npd-nas.log"));
            let nas = nas.unwrap();
            eprintln!("a new device got {nas} {:?} after its npd started", t.elapsed());
            let out = d.ssh(&nas.to_string(), 22, "echo ok-new-device");
            assert_eq!(text(&out.stdout).trim(), "ok-new-device", "{}", text(&out.stderr));
            assert_eq!(dns_a(&pc, dns, "nas.alice_device.np", Duration::from_secs(5)), Ok(vec![nas]));
        }
        assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());
    }
    eprintln!("exit_cleans_up_and_a_crash_leaves_nothing_that_stops_the_next_start: {:?}", t0.elapsed());
}

#[test]
fn advertised_routes_are_used_only_once_accepted() {
    let mut d = Deployment::start(DeploymentOptions { lan: true, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    let lan = d.hosts.lan_prefix();
    let permit = d.permit();
    // The device offers its LAN, and (hostile or careless) a default route and the np subnet.
    d.start_npd(&[
        "--manager",
        "@alice",
        "--permit-open",
        &permit,
        "--advertise-route",
        &lan,
        "--advertise-route",
        "0.0.0.0/1",
        "--advertise-route",
        "100.80.7.0/24",
    ]);
    let (lan_open, _) = d.lan_ports.unwrap();
    let target = SocketAddr::from((d.hosts.lan_ip(), lan_open));

    // Not accepted: listed, not routed; the LAN host is not reached through np.
    let published =
        np_tests::wait_until(Duration::from_secs(10), || d.log("npd.log").contains("advertised routes published"));
    assert!(published, "npd did not publish its routes: {}", d.log("npd.log"));
    let mut up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        up.lines.iter().any(|l| l.contains(&lan) && l.contains("not used: accept with --accept-routes")),
        "{:?}",
        up.lines
    );
    assert!(echo_once(&pc, target, b"unrouted").is_err(), "the LAN was reached without accepting its route");
    assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());

    // Accepted: the LAN prefix is routed to the device and works; the default route and the
    // np subnet it also advertised are refused.
    let mut up = d.up(&["--device", DEVICE, "--accept-routes"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(up.lines.iter().any(|l| l.contains(&lan) && l.contains("(advertised)")), "{:?}", up.lines);
    assert!(!up.lines.iter().any(|l| l.contains("0.0.0.0/1") || l.contains("100.80.7.0/24")), "{:?}", up.lines);
    assert_eq!(echo_once(&pc, target, b"via advertised route").unwrap(), b"via advertised route");
    let log = up.log();
    assert!(log.contains("advertised route skipped"), "{}", tail(&log));
    assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());

    // Accepted once is remembered, until --no-accept-routes.
    let mut up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    assert!(up.lines.iter().any(|l| l.contains(&lan) && l.contains("(advertised)")), "not remembered: {:?}", up.lines);
    assert_eq!(echo_once(&pc, target, b"remembered").unwrap(), b"remembered");
    assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());
    let mut up = d.up(&["--device", DEVICE, "--no-accept-routes"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(up.lines.iter().any(|l| l.contains(&lan) && l.contains("not used")), "{:?}", up.lines);
    assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());
}

#[test]
fn np_up_with_no_flags_picks_the_faster_relay_fails_over_within_two_seconds_and_drops_a_revoked_device() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    // @relay0 behind a delaying proxy (and first by name), @relay9 direct; the device trusts
    // these two only.
    let (_slow, proxy) = d.add_relay("@relay0", 7450, Some(Duration::from_millis(5)));
    let proxy = proxy.unwrap();
    let (mut fast, _) = d.add_relay("@relay9", 7459, None);
    let permit = d.permit();
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit, "--relay", "@relay0", "--relay", "@relay9"]);
    let mut out = String::new();
    let trust_known = np_tests::wait_until(Duration::from_secs(10), || {
        out = d.np_in_pc(&["relays", "--as", "@alice"]).1;
        out.lines().any(|l| l.starts_with("@relay9 ") && l.contains("pi4@alice_device"))
    });
    assert!(trust_known, "{out}");

    let mut up = d.up_via(None, &["-v"]).unwrap_or_else(|e| panic!("{e}"));
    let dev = up.device(DEVICE);
    let out = d.ssh(&dev.to_string(), 22, "echo first");
    assert_eq!(text(&out.stdout).trim(), "first", "{}", text(&out.stderr));
    assert!(up.log().contains("relay for pi4@alice_device: @relay9"), "{}", tail(&up.log()));
    let before = proxy.conns.load(std::sync::atomic::Ordering::SeqCst);

    // The relay in use dies: the next ssh goes through @relay0, within 2 s, with no command.
    fast.0.kill().unwrap();
    let _ = fast.0.wait();
    let t = Instant::now();
    let out = d.ssh(&dev.to_string(), 22, "echo after");
    let took = t.elapsed();
    assert_eq!(text(&out.stdout).trim(), "after", "{}\n{}", text(&out.stderr), tail(&up.log()));
    assert!(took < Duration::from_secs(2), "ssh after the relay died took {took:?}");
    assert!(proxy.conns.load(std::sync::atomic::Ordering::SeqCst) > before, "not through @relay0");
    eprintln!("ssh through the other relay done {took:?} after the relay in use died");

    // A device of another identity appears, then its identity is revoked: np up drops it (its
    // address, name and session) while it runs.
    let lab_home = d.enrol("@lab_device", &d.hosts.pd);
    let mut cmd = std::process::Command::new(np_tests::bin("npd"));
    cmd.args(["--as", "@lab_device", "--device", "lab", "--manager", "@alice", "--relay", "@relay0", "--home"])
        .arg(&lab_home)
        .args(["--permit-open", &permit]);
    let _lab = np_tests::netns::spawn_in(&d.hosts.pd, &cmd, &d.path().join("npd-lab.log"));
    let listed = |d: &Deployment| d.np_in_pc(&["status"]).1.contains("lab@lab_device");
    assert!(np_tests::wait_until(Duration::from_secs(5), || listed(&d)), "lab@lab_device never appeared");
    d.revoke("@lab_device");
    let t = Instant::now();
    assert!(
        np_tests::wait_until(Duration::from_secs(5), || !listed(&d)),
        "a revoked device is still up:\n{}",
        d.np_in_pc(&["status"]).1
    );
    eprintln!("a revoked device was dropped {:?} after the revocation", t.elapsed());
    assert!(d.np_in_pc(&["status"]).1.contains("pi4@alice_device"), "the other device went too");
    assert!(up.signal_and_wait("TERM", Duration::from_secs(10)).unwrap().success());
}
