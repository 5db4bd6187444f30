//! UDP end to end in network namespaces (root required): `dig` through `np up` (a device route
//! to dnsmasq on the device's LAN, and the device's own IPv6 address to a dnsmasq on its
//! loopback), a datagram to an unpermitted port failing at once on an ICMP port unreachable,
//! `iperf3 -u` through `np up` (at a set rate, then overloaded, TCP still working after), a flood
//! of 10,000 associations staying bounded and expiring, and `np forward -U` carrying a query.
#![allow(clippy::unwrap_used)]

use np_tests::netns::{echo_once, python_in, sh_in, spawn_in, udp_in, Deployment, DeploymentOptions};
use np_tests::{wait_until, Proc};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

const DEVICE: &str = "pi4@alice_device";
/// The name every dnsmasq here answers, and its address (from the benchmarking range).
const NAME: &str = "probe.test";
const ANSWER: &str = "198.18.200.7";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The IPv6 address np up gives the device at IPv4 address `v4` with the default --subnet6.
fn default_v6(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(0xfd6e_7000_u128 << 96 | u128::from(u32::from(v4)))
}

/// A free UDP port on `ip` in `ns` (bound, then let go).
fn free_udp_port(ns: &str, ip: IpAddr) -> u16 {
    udp_in(ns, (ip, 0).into()).local_addr().unwrap().port()
}

/// dnsmasq in `ns` on `ip:port`, answering [`NAME`] with [`ANSWER`]; returns once it answers.
fn dnsmasq(d: &Deployment, ns: &str, ip: IpAddr, port: u16) -> Proc {
    let log = d.path().join(format!("dnsmasq-{port}.log"));
    let mut cmd = Command::new("dnsmasq");
    cmd.args(["--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces"])
        .arg(format!("--listen-address={ip}"))
        .arg(format!("--port={port}"))
        .arg(format!("--host-record={NAME},{ANSWER}"))
        .arg(format!("--pid-file={}", d.path().join(format!("dnsmasq-{port}.pid")).display()))
        .args(["--log-facility=-", "--user=root"]);
    let p = spawn_in(ns, &cmd, &log);
    let up = wait_until(Duration::from_secs(10), || {
        let o = sh_in(ns, &format!("dig +short +time=1 +tries=1 @{ip} -p {port} {NAME}"), Duration::from_secs(5));
        text(&o.stdout).trim() == ANSWER
    });
    assert!(up, "dnsmasq did not answer: {}", np_tests::netns::read(&log));
    p
}

/// `dig` from `ns` at `server` (an IPv6 address is fine): (answer, everything printed, elapsed).
fn dig(ns: &str, server: IpAddr, port: u16, time: u32) -> (String, String, Duration) {
    let t = Instant::now();
    let o = sh_in(
        ns,
        &format!("dig +short +time={time} +tries=1 @{server} -p {port} {NAME}"),
        Duration::from_secs(u64::from(time) + 10),
    );
    (text(&o.stdout).trim().to_string(), format!("{}{}", text(&o.stdout), text(&o.stderr)), t.elapsed())
}

#[test]
fn dig_through_a_device_route_and_to_the_devices_ipv6_address_and_unpermitted_ports_fail_at_once() {
    let mut d = Deployment::start(DeploymentOptions { lan: true, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    let lan = d.hosts.lan().to_string();
    let lan_ip = d.hosts.lan_ip();
    let _lan_dns = dnsmasq(&d, &lan, lan_ip.into(), 53);
    let local_port = free_udp_port(&d.hosts.pd, Ipv4Addr::LOCALHOST.into());
    let _local_dns = dnsmasq(&d, &d.hosts.pd.clone(), Ipv4Addr::LOCALHOST.into(), local_port);
    let permit = format!("{},udp/{lan_ip}:53,udp/localhost:{local_port}", d.permit());
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit]);
    let route = format!("{}={DEVICE}", d.hosts.lan_prefix());
    let up = d.up(&["--device", DEVICE, "--route", &route]).unwrap_or_else(|e| panic!("{e}"));
    let dev6 = default_v6(up.device(DEVICE));

    // Through the device route to the LAN's resolver: the first query also sets up the session.
    let (answer, out, _) = dig(&pc, lan_ip.into(), 53, 5);
    assert_eq!(answer, ANSWER, "dig through the route: {out}\n{}", up.log());
    // To the device's own IPv6 address: its loopback's resolver (npd sends to localhost).
    let (answer, out, _) = dig(&pc, dev6.into(), local_port, 5);
    assert_eq!(answer, ANSWER, "dig to [{dev6}]:{local_port}: {out}\n{}", up.log());

    // Not permitted: an ICMP port unreachable, so dig gives up at once instead of after 10 s.
    for (server, port) in [(IpAddr::from(lan_ip), 5353), (IpAddr::from(dev6), 9)] {
        let (answer, out, took) = dig(&pc, server, port, 10);
        assert!(answer.is_empty() || !answer.contains(ANSWER), "{out}");
        assert!(took < Duration::from_secs(4), "dig to {server}:{port} took {took:?}: {out}");
        assert!(out.contains("refused"), "dig to {server}:{port}: {out}");
    }

    let (ok, status, err) = d.np_in_pc(&["status"]);
    assert!(ok, "np status: {err}");
    let line = status.lines().find(|l| l.contains(&format!("to {lan_ip}:53"))).unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("up 1 datagrams") && line.contains("down 1 datagrams"), "{line}");
    assert!(!up.log().contains("panicked"), "{}", up.log());
}

#[test]
fn np_forward_u_carries_a_dns_query() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let pd = d.hosts.pd.clone();
    let port = free_udp_port(&pd, Ipv4Addr::LOCALHOST.into());
    let _dns = dnsmasq(&d, &pd, Ipv4Addr::LOCALHOST.into(), port);
    d.start_npd(&["--manager", "@alice", "--permit-open", &format!("localhost:22,udp/localhost:{port}")]);
    let target = format!("0:localhost:{port}");
    let fwd = d.forward(&[], &["-U", &target]).unwrap_or_else(|log| panic!("np forward -U failed:\n{log}"));
    let local = fwd.addrs[0];
    assert!(local.ip().is_loopback(), "{local}");
    let (answer, out, _) = dig(&d.hosts.pc, local.ip(), local.port(), 5);
    let npd: String = d.log("npd.log").lines().filter(|l| !l.contains("rustls")).collect::<Vec<_>>().join("\n");
    assert_eq!(answer, ANSWER, "{out}\n{}\nnpd:\n{npd}", d.log("forward.log"));
    // A second query from another source port: an association of its own.
    let (answer, out, _) = dig(&d.hosts.pc, local.ip(), local.port(), 5);
    assert_eq!(answer, ANSWER, "{out}");
}

/// `iperf3 -u` from pc to pd's loopback through np up at `rate`; returns (sent, lost) datagrams
/// as the server counted them.
fn iperf_udp(pc: &str, dev: Ipv4Addr, port: u16, rate: &str) -> (u64, u64) {
    let o = sh_in(pc, &format!("iperf3 -c {dev} -p {port} -u -b {rate} -l 1200 -t 2 -J"), Duration::from_secs(30));
    let j = text(&o.stdout);
    let num = |key: &str| -> u64 {
        // The server's totals, in the `sum` of `end` (the last occurrence of each key).
        j.rmatch_indices(&format!("\"{key}\":"))
            .next()
            .and_then(|(i, k)| j[i + k.len()..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in iperf3's report: {j}{}", text(&o.stderr)))
    };
    (num("packets"), num("lost_packets"))
}

#[test]
fn iperf3_udp_at_a_set_rate_then_overloaded_and_the_session_stays_healthy() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let (pc, pd) = (d.hosts.pc.clone(), d.hosts.pd.clone());
    let port = free_udp_port(&pd, Ipv4Addr::LOCALHOST.into());
    let log = d.path().join("iperf3.log");
    let _server = spawn_in(&pd, Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]), &log);
    let listening =
        || np_tests::netns::connect_in(&pd, (Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1)).is_ok();
    assert!(wait_until(Duration::from_secs(10), listening), "iperf3 -s: {}", np_tests::netns::read(&log));
    // iperf3's control connection is TCP, its data UDP, on the same port.
    let permit = format!("{},localhost:{port},udp/localhost:{port}", d.permit());
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit]);
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    let dev = up.device(DEVICE);

    let (sent, lost) = iperf_udp(&pc, dev, port, "20M");
    assert!(sent > 1000, "{sent} datagrams at 20 Mbit/s for 2 s");
    let delivered = sent - lost.min(sent);
    eprintln!("iperf3 -u 20M: {delivered} of {sent} delivered");
    assert!(delivered * 10 >= sent * 9, "{delivered} of {sent} delivered at 20 Mbit/s");

    // Overload: far more than the path carries. Datagrams are dropped (and counted), the session
    // lives on, and TCP through it still works.
    let (sent, lost) = iperf_udp(&pc, dev, port, "5G");
    eprintln!("iperf3 -u 5G: {} of {sent} delivered", sent - lost.min(sent));
    assert!(sent > lost, "nothing delivered under overload");
    assert_eq!(echo_once(&pc, (dev, d.echo_port).into(), b"tcp after").unwrap(), b"tcp after");
    let (ok, status, _) = d.np_in_pc(&["status"]);
    assert!(ok && status.contains("established"), "{status}");
    assert!(!up.log().contains("panicked") && !up.log().contains("session ended"), "{}", up.log());
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_flood_of_10000_associations_stays_bounded_and_expires() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let (pc, pd) = (d.hosts.pc.clone(), d.hosts.pd.clone());
    let port = free_udp_port(&pd, Ipv4Addr::LOCALHOST.into());
    let _dns = dnsmasq(&d, &pd, Ipv4Addr::LOCALHOST.into(), port);
    let permit = format!("{},udp/localhost:{port}", d.permit());
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit, "--udp-idle", "2s"]);
    let npd = d.npd.as_ref().unwrap().0.id();
    let fds_before = fds(npd);
    let up = d.up(&["--device", DEVICE, "--udp-idle", "2s"]).unwrap_or_else(|e| panic!("{e}"));
    let dev = up.device(DEVICE);
    let rss_before = up.rss_kib();

    // 10,000 source ports, one datagram each: 10,000 associations asked for.
    let flood = "import socket,sys\nip,port=sys.argv[1],int(sys.argv[2])\n\
                 for i in range(10000):\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n \
                 s.sendto(b'x'*100,(ip,port))\n s.close()\n";
    let o = python_in(&pc, flood, &[&dev.to_string(), &port.to_string()], Duration::from_secs(60));
    assert!(o.status.success(), "flood: {}", text(&o.stderr));

    let count = |status: &str| -> usize {
        status.lines().find_map(|l| l.strip_prefix("udp associations: ")).and_then(|n| n.trim().parse().ok()).unwrap()
    };
    let (ok, status, err) = d.np_in_pc(&["status"]);
    assert!(ok, "np status: {err}");
    let live = count(&status);
    assert!(live <= 256, "{live} associations live after the flood");
    assert!(fds(npd) <= fds_before + 256 + 16, "npd holds {} descriptors (had {fds_before})", fds(npd));
    let grew = up.rss_kib().saturating_sub(rss_before);
    assert!(grew < 64 * 1024, "np up grew by {grew} KiB in the flood");

    // They expire (both sides, by the 2 s idle timer), and the device closes their sockets.
    let expired = wait_until(Duration::from_secs(10), || count(&d.np_in_pc(&["status"]).1) == 0);
    assert!(expired, "{}", d.np_in_pc(&["status"]).1);
    assert!(wait_until(Duration::from_secs(10), || fds(npd) <= fds_before + 8), "npd still holds {} fds", fds(npd));
    // And the session serves on: a new query and TCP.
    let (answer, out, _) = dig(&pc, dev.into(), port, 5);
    assert_eq!(answer, ANSWER, "{out}");
    assert_eq!(echo_once(&pc, SocketAddr::from((dev, d.echo_port)), b"tcp").unwrap(), b"tcp");
    assert!(!up.log().contains("panicked"), "{}", up.log());
}

#[test]
fn mosh_to_the_device_through_np_up() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    // mosh-server binds a port of 60000-61000 on the address ssh came in on: npd's localhost.
    let permit = format!("{},udp/localhost:60000-61000", d.permit());
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit]);
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    let dev = up.device(DEVICE);
    let marker = d.path().join("typed-through-mosh");
    let ssh = format!(
        "ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        d.sshd.client_key().display(),
        d.sshd.addr.port()
    );
    // A tmux server of this test's own (-L) holds mosh's terminal.
    let tmux = format!("tmux -L npudp{}", std::process::id());
    let start = format!("{tmux} new-session -d -x 80 -y 24 \"LANG=C.UTF-8 mosh --ssh='{ssh}' root@{dev}\"");
    let o = sh_in(&pc, &start, Duration::from_secs(10));
    assert!(o.status.success(), "tmux: {}", text(&o.stderr));
    // Typing reaches the remote shell: retried (line cleared first) until mosh is connected.
    let typed = wait_until(Duration::from_secs(30), || {
        let keys = format!("{tmux} send-keys C-u 'touch {}' Enter", marker.display());
        sh_in(&pc, &keys, Duration::from_secs(5));
        wait_until(Duration::from_secs(1), || marker.exists())
    });
    let screen = text(&sh_in(&pc, &format!("{tmux} capture-pane -p"), Duration::from_secs(5)).stdout);
    let _ = sh_in(&pc, &format!("{tmux} kill-server"), Duration::from_secs(5));
    assert!(typed, "typing through mosh did not reach the shell; screen:\n{screen}\n{}", up.log());
    let (_, status, _) = d.np_in_pc(&["status"]);
    assert!(status.lines().any(|l| l.starts_with("udp ") && l.contains(":600")), "{status}");
}
