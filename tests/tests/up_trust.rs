//! `np up` serves its own host only (issue 12, item 2), with the real binaries in network
//! namespaces (root required): the deployment of `up_e2e.rs` (np-control and np-relay in pr, npd
//! and a real sshd in pd, `np up` in pc), plus a neighbour host `nb` linked to pc that routes the
//! `np up` subnet through pc, the way a container or a LAN neighbour of a router host would.
//!
//! - A neighbour going through `np up` (pc forwarding IPv4) reaches nothing, and `np status`
//!   counts its dropped packets; pc's own connections keep working.
//! - The resolver on the interface address answers pc, never the neighbour.
//! - A status socket squatted by a non-root user (the old abstract name, and an attempt on
//!   `/run/np`) neither fakes `np status` nor stops `np up`; a stale socket left by a killed
//!   `np up` is replaced.
#![allow(clippy::unwrap_used)]

use np_tests::netns::{
    bind_in, connect_in, dns_a, echo_once, sh_in, spawn_in, Deployment, DeploymentOptions, Hosts, Up,
};
use np_tests::{wait_until, Proc};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEVICE: &str = "pi4@alice_device";
const DNS_NAME: &str = "pi4.alice_device.np";
/// The link between pc and the neighbour; it only exists inside those two (per-test) namespaces.
const PC_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 1);
const NB_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 254, 2);
/// How long the neighbour waits for a connection or an answer that must never come.
const NEVER: Duration = Duration::from_secs(3);

/// A neighbour host `nb`, linked to pc by a veth pair (`nbr0` in pc), whose route for `subnet`
/// goes through pc. Removed on drop (its veth goes with it).
struct Neighbour {
    ns: String,
}

impl Neighbour {
    fn new(hosts: &Hosts, subnet: &str) -> Neighbour {
        // The harness's naming (`npt{pid:x}-{n}-HOST`), so a killed run's sweep removes it too.
        let ns = format!("npt{:x}-{}-nb", std::process::id(), hosts.n);
        let nb = Neighbour { ns: ns.clone() };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &ns]);
        ip(&["-n", &hosts.pc, "link", "add", "nbr0", "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["-n", &hosts.pc, "addr", "add", &format!("{PC_SIDE}/24"), "dev", "nbr0"]);
        ip(&["-n", &hosts.pc, "link", "set", "nbr0", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{NB_SIDE}/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", subnet, "via", &PC_SIDE.to_string()]);
        nb
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).stderr(Stdio::null()).status();
    }
}

/// Turns IPv4 forwarding on or off in `ns`.
fn forwarding(ns: &str, on: bool) {
    let out = sh_in(ns, &format!("sysctl -q -w net.ipv4.ip_forward={}", u8::from(on)), Duration::from_secs(10));
    assert!(out.status.success(), "sysctl in {ns}: {}", String::from_utf8_lossy(&out.stderr));
}

fn up_with_neighbour() -> (Deployment, Up, Neighbour) {
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    let subnet = format!("{}/{}", Ipv4Addr::from(u32::from(up.addr) & !(u32::MAX >> up.prefix_len)), up.prefix_len);
    let nb = Neighbour::new(&d.hosts, &subnet);
    // The neighbour really is linked to pc, so the refusals below are np up's, not a dead link.
    let listener = bind_in(&d.hosts.pc, (PC_SIDE, 0).into());
    let port = listener.local_addr().unwrap().port();
    assert!(connect_in(&nb.ns, (PC_SIDE, port).into(), NEVER).is_ok(), "the neighbour cannot reach pc at all");
    (d, up, nb)
}

/// `np status` in pc; panics with its error output if it fails.
fn status(d: &Deployment) -> String {
    let (ok, out, err) = d.np_in_pc(&["status"]);
    assert!(ok, "np status failed: {err}");
    out
}

/// The count on `np status`'s "foreign packets dropped: N" line.
fn foreign_drops(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix("foreign packets dropped:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `foreign packets dropped: N` line in np status:\n{status}"))
}

/// The packets the forward guard's rule dropped in `ns` (its `counter packets N`), 0 without one.
fn guard_drops(ns: &str) -> u64 {
    let out = sh_in(ns, "nft list ruleset", Duration::from_secs(10));
    let rules = String::from_utf8_lossy(&out.stdout).into_owned();
    rules
        .lines()
        .filter(|l| l.contains("np up serves its own host only"))
        .filter_map(|l| l.split_once("counter packets ")?.1.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A counter of the stack from `np status`'s `stack: Stats { NAME: N, ... }` line.
fn stat(status: &str, name: &str) -> u64 {
    let pat = format!("{name}: ");
    status
        .lines()
        .filter(|l| l.starts_with("stack:"))
        .find_map(|l| l.split_once(&pat)?.1.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in np status:\n{status}"))
}

#[test]
fn a_neighbour_routing_through_the_client_host_reaches_nothing() {
    let t0 = Instant::now();
    let (d, up, nb) = up_with_neighbour();
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    forwarding(&pc, true);

    // pc itself reaches the device, as ever.
    assert_eq!(echo_once(&pc, (dev, d.echo_port).into(), b"from pc").unwrap(), b"from pc");

    // The neighbour, whose packets pc forwards into np0: no connection to sshd nor to the echo
    // server (before the fix, both were opened on the device as @alice).
    for port in [22, d.echo_port] {
        let t = Instant::now();
        let r = connect_in(&nb.ns, (dev, port).into(), NEVER);
        assert!(r.is_err(), "the neighbour connected to {dev}:{port} through np up as @alice:\n{}", up.log());
        eprintln!("neighbour -> {dev}:{port}: {} after {:?}", r.err().unwrap(), t.elapsed());
    }
    let st = status(&d);
    eprintln!("np status:\n{st}");
    // Dropped by the kernel's forward guard, or (without one) by the stack's source check. (The
    // stack's count alone once looked right only because it also counted the kernel's own IPv6
    // housekeeping on the interface, which it now counts apart as multicast.)
    let drops = foreign_drops(&st) + guard_drops(&pc);
    assert!(drops > 0, "neither np status nor the forward guard counts a dropped packet:\n{st}");
    // No flow was ever opened for the neighbour: the one flow is pc's echo above.
    assert_eq!(stat(&st, "flows_new"), 1, "flows were opened for the neighbour:\n{st}");

    // And pc's own ssh still works, through the session the neighbour could not use.
    let out = d.ssh(&dev.to_string(), 22, "echo ok");
    assert!(out.status.success(), "ssh from pc failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    eprintln!("a_neighbour_routing_through_the_client_host_reaches_nothing: {drops} drops, {:?}", t0.elapsed());
}

#[test]
fn a_neighbour_masqueraded_by_the_client_host_reaches_nothing() {
    let (d, mut up, nb) = up_with_neighbour();
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    forwarding(&pc, true);
    // What Docker does for its containers: masquerade their traffic on every other interface, so
    // it leaves with that interface's address; into np0, with np up's own source address.
    let nat = "nft add table ip nat && \
               nft 'add chain ip nat post { type nat hook postrouting priority 100; }' && \
               nft add rule ip nat post ip saddr 198.19.254.0/24 oifname != nbr0 masquerade";
    let out = sh_in(&pc, nat, Duration::from_secs(10));
    assert!(out.status.success(), "nft in pc: {}", String::from_utf8_lossy(&out.stderr));
    for port in [22, d.echo_port] {
        let r = connect_in(&nb.ns, (dev, port).into(), NEVER);
        assert!(r.is_err(), "the masqueraded neighbour connected to {dev}:{port} as @alice:\n{}", status(&d));
    }
    let st = status(&d);
    assert!(st.contains("forward guard: on"), "np up runs without its forward guard:\n{st}");
    assert_eq!(stat(&st, "flows_new"), 0, "flows were opened for the neighbour:\n{st}");
    assert_eq!(echo_once(&pc, (dev, d.echo_port).into(), b"from pc").unwrap(), b"from pc");

    // The guard goes with np up.
    let tables =
        || String::from_utf8_lossy(&sh_in(&pc, "nft list tables", Duration::from_secs(10)).stdout).into_owned();
    assert!(tables().contains("np_guard_"), "{}", tables());
    let st = up.signal_and_wait("TERM", Duration::from_secs(10)).expect("np up ignored SIGTERM");
    assert!(st.success(), "np up exited with {st}");
    assert!(!tables().contains("np_guard_"), "the guard outlived np up: {}", tables());
}

#[test]
fn dns_answers_this_host_only() {
    let (d, up, nb) = up_with_neighbour();
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    let dns = SocketAddr::from((up.addr, 53));
    // Forwarding plays no part (a packet to one of pc's own addresses is delivered locally
    // whichever interface it came in on), but try both.
    for fwd in [false, true] {
        forwarding(&pc, fwd);
        assert_eq!(
            dns_a(&pc, dns, DNS_NAME, Duration::from_secs(5)),
            Ok(vec![dev]),
            "pc's own query (forwarding {fwd})"
        );
        let r = dns_a(&nb.ns, dns, DNS_NAME, NEVER);
        assert!(r.as_ref().is_err_and(|e| e.starts_with("no DNS answer")), "the neighbour got an answer: {r:?}");
        // Not even a refusal for a name np up does not serve.
        let r = dns_a(&nb.ns, dns, "example.com", NEVER);
        assert!(r.as_ref().is_err_and(|e| e.starts_with("no DNS answer")), "the neighbour got an answer: {r:?}");
    }
    // A query from pc's loopback side, by name through resolv.conf, still works.
    d.hosts.etc_file(&pc, "resolv.conf", &format!("nameserver {}\n", up.addr));
    let out = d.ssh(DNS_NAME, 22, "echo ok-by-name");
    assert!(out.status.success(), "ssh root@{DNS_NAME} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a Python script in `ns` as user nobody; its output goes to `log`.
fn as_nobody(ns: &str, script: &str, log: &Path) -> Proc {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script]);
    spawn_in(ns, &cmd, log)
}

/// What a local non-root user tried: serve a fake status on the old abstract name, and take
/// `/run/np` (or a file in it) first.
const SQUATTER: &str = r#"
import os, socket, sys
for what, f in [("mkdir /run/np", lambda: os.mkdir("/run/np", 0o777)),
                ("create in /run/np", lambda: open("/run/np/np0.status", "w")),
                ("bind in /run/np", lambda: socket.socket(socket.AF_UNIX).bind("/run/np/squat"))]:
    try:
        f()
        print("SQUAT OK", what, flush=True)
    except OSError as e:
        print("squat failed:", what, e, flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0np-status-np0")
s.listen(16)
print("bound", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"interface np0  6.6.6.6/8  FAKE STATUS\n")
    c.close()
"#;

#[test]
fn a_squatted_status_socket_neither_fakes_status_nor_blocks_np_up() {
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    let log = d.path().join("squatter.log");
    let _squatter = as_nobody(&pc, SQUATTER, &log);
    let bound = wait_until(Duration::from_secs(10), || np_tests::netns::read(&log).contains("bound"));
    let squat_log = np_tests::netns::read(&log);
    assert!(bound, "the squatter did not start:\n{squat_log}");
    assert!(!squat_log.contains("SQUAT OK"), "a non-root user took part of /run/np:\n{squat_log}");

    // np up starts in spite of the squatter (before the fix it refused: "another `np up`
    // already serves np0"), and `np status` shows the real interface, not the squatter's.
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("np up did not start beside a squatter: {e}"));
    let dev = up.device(DEVICE);
    let st = status(&d);
    assert!(!st.contains("FAKE"), "np status printed the squatter's text:\n{st}");
    assert!(st.contains("interface np0") && st.contains(&format!("{}/", up.addr)), "{st}");
    assert!(st.lines().any(|l| l.contains(DEVICE) && l.contains(&dev.to_string())), "{st}");

    // The socket lives in a directory only root may enter.
    let meta = std::fs::symlink_metadata("/run/np").unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(meta.is_dir() && meta.uid() == 0, "/run/np: {meta:?}");
    assert_eq!(meta.permissions().mode() & 0o077, 0, "/run/np is open to others: {:o}", meta.permissions().mode());

    // A killed np up leaves its socket file behind; the next one replaces it.
    let mut up = up;
    let _ = Command::new("kill").args(["-KILL", &up.pid.to_string()]).status();
    let gone = wait_until(Duration::from_secs(10), || up.proc.0.try_wait().ok().flatten().is_some());
    assert!(gone, "np up did not die");
    let (ok, _, err) = d.np_in_pc(&["status"]);
    assert!(!ok, "np status succeeded with no np up running");
    eprintln!("np status with a stale socket: {}", err.trim());
    // The TUN goes with the killed process; wait for the kernel to remove it.
    let clean = wait_until(Duration::from_secs(10), || !d.hosts.ip_in(&pc, &["link", "show", "np0"]).0);
    assert!(clean, "np0 outlived its np up");
    let up2 = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("np up did not replace a stale socket: {e}"));
    let st = status(&d);
    assert!(st.contains("interface np0") && !st.contains("FAKE"), "{st}");
    drop(up2);
}
