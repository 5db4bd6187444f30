//! Hosts in network namespaces for the privileged end-to-end tests (root required): a client
//! `pc`, a relay host `pr` and a device host `pd` on a bridge, and optionally a LAN host `lan`
//! behind `pd` on its own link and subnet, like `scripts/bench.sh` builds them.
//!
//! Every name carries this process's id and a counter, so tests running at once (threads of one
//! test binary, or several binaries) never share a namespace, bridge or veth; the addresses only
//! exist inside the namespaces. [`Hosts`] tears everything down on drop, also while a panic
//! unwinds, and the first [`Hosts::new`] of a process sweeps what a killed earlier run left.
//!
//! A thread is not moved into a namespace by `ip netns exec`; programs are (see [`ns_command`]),
//! and sockets the test itself needs there are created by a short-lived thread that enters the
//! namespace first ([`in_netns`]): a socket stays in the namespace it was created in, whichever
//! thread uses it later.
#![allow(clippy::unwrap_used)]

use crate::servers::{echo_conn, hasher_conn, hex, pattern, serve_on, source_conn};
use crate::{bin, output_within, spawn_listening, wait_until, Proc};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: std::sync::Once = std::sync::Once::new();

/// Prefix of every namespace name we create: `npt{pid:x}-{n}-{host}`.
const NS_PREFIX: &str = "npt";
/// Prefix of our bridges (`npb{pid:x}-{n}`) and host-side veths (`npv{pid:x}-{n}{c|r|d}`).
const LINK_PREFIXES: [&str; 2] = ["npb", "npv"];

/// Client, relay and device hosts on one bridge, and optionally a LAN host behind the device.
///
/// Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544), as in `scripts/bench.sh`
/// and `scripts/demo.sh`, never from a range a real network may use: the bridge subnet is
/// `198.18.N.0/24` (pc `.1`, pr `.2`, pd `.3`); the LAN is `198.19.N.0/24` (pd `.1` on `lan0`,
/// the LAN host `.2` on `eth0`, its default route via pd); `N` is the counter (mod 128), so two
/// hosts sets in one process differ (which only helps reading logs).
pub struct Hosts {
    pub pc: String,
    pub pr: String,
    pub pd: String,
    pub lan: Option<String>,
    pub bridge: String,
    /// The counter that named these hosts.
    pub n: u32,
    veths: Vec<String>,
    namespaces: Vec<String>,
}

impl Hosts {
    /// Creates pc, pr, pd on a bridge; with `with_lan`, also the LAN host behind pd.
    pub fn new(with_lan: bool) -> Hosts {
        assert!(is_root(), "the network-namespace tests need root");
        SWEEP.call_once(sweep_stale);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:x}-{n}", std::process::id());
        let name = |h: &str| format!("{NS_PREFIX}{tag}-{h}");
        let mut hosts = Hosts {
            pc: name("pc"),
            pr: name("pr"),
            pd: name("pd"),
            lan: with_lan.then(|| name("lan")),
            bridge: format!("npb{tag}"),
            n,
            veths: Vec::new(),
            namespaces: Vec::new(),
        };
        // Register each thing before creating it, so Drop removes whatever a failure left.
        ip(&["link", "add", &hosts.bridge, "type", "bridge"]);
        ip(&["link", "set", &hosts.bridge, "up"]);
        for (i, h) in [hosts.pc.clone(), hosts.pr.clone(), hosts.pd.clone()].iter().enumerate() {
            hosts.namespaces.push(h.clone());
            ip(&["netns", "add", h]);
            let veth = format!("npv{tag}{}", ["c", "r", "d"][i]);
            hosts.veths.push(veth.clone());
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", h]);
            ip(&["link", "set", &veth, "master", &hosts.bridge, "up"]);
            let addr = format!("{}/24", hosts.bridge_ip(i as u8 + 1));
            ip(&["-n", h, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", h, "link", "set", "eth0", "up"]);
            ip(&["-n", h, "link", "set", "lo", "up"]);
        }
        if let Some(lan) = hosts.lan.clone() {
            hosts.namespaces.push(lan.clone());
            ip(&["netns", "add", &lan]);
            ip(&["-n", &hosts.pd, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &lan]);
            ip(&["-n", &hosts.pd, "addr", "add", &format!("{}/24", hosts.lan_gateway()), "dev", "lan0"]);
            ip(&["-n", &hosts.pd, "link", "set", "lan0", "up"]);
            ip(&["-n", &lan, "addr", "add", &format!("{}/24", hosts.lan_ip()), "dev", "eth0"]);
            ip(&["-n", &lan, "link", "set", "eth0", "up"]);
            ip(&["-n", &lan, "link", "set", "lo", "up"]);
            ip(&["-n", &lan, "route", "add", "default", "via", &hosts.lan_gateway().to_string()]);
            let out = output_within(
                &mut ns_command(&hosts.pd, Command::new("sysctl").args(["-q", "-w", "net.ipv4.ip_forward=1"])),
                Duration::from_secs(10),
            );
            assert!(out.status.success(), "sysctl in {}: {}", hosts.pd, String::from_utf8_lossy(&out.stderr));
        }
        hosts
    }

    /// Below 128, so the LAN never lands on 198.19.254.0/24, which unit tests use as a foreign
    /// source address.
    fn octet(&self) -> u8 {
        (self.n % 128) as u8
    }

    /// Address `.host` on the bridge subnet.
    pub fn bridge_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet(), host)
    }

    pub fn pc_ip(&self) -> Ipv4Addr {
        self.bridge_ip(1)
    }

    pub fn pr_ip(&self) -> Ipv4Addr {
        self.bridge_ip(2)
    }

    pub fn pd_ip(&self) -> Ipv4Addr {
        self.bridge_ip(3)
    }

    /// Address `::host` of host's IPv6 subnet on the bridge, `fd00:198:18:N::/64` (a unique
    /// local prefix spelled after the IPv4 benchmarking range, so never a real network's).
    pub fn bridge_ip6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(self.octet()), 0, 0, 0, u16::from(host))
    }

    /// Makes pc, pr and pd IPv6-only: each gets [`Hosts::bridge_ip6`] (`::1`, `::2`, `::3`) on
    /// its bridge link, and loses its IPv4 address there (loopback keeps 127.0.0.1, as on a real
    /// IPv6-only host). `nodad`: the addresses are usable at once, and no other host has them.
    pub fn ipv6_only(&self) {
        for (i, h) in [&self.pc, &self.pr, &self.pd].into_iter().enumerate() {
            let addr = format!("{}/64", self.bridge_ip6(i as u8 + 1));
            ip(&["-n", h, "addr", "add", &addr, "dev", "eth0", "nodad"]);
            ip(&["-n", h, "-4", "addr", "flush", "dev", "eth0"]);
        }
    }

    /// Gives the LAN IPv6 too: pd `fd00:198:19:N::1/64` on `lan0`, the LAN host `::2` on its
    /// `eth0` (`nodad`: usable at once). Returns the LAN host's address; panics without a LAN.
    pub fn lan_ipv6(&self) -> Ipv6Addr {
        let host = |h: u16| Ipv6Addr::new(0xfd00, 0x198, 0x19, u16::from(self.octet()), 0, 0, 0, h);
        ip(&["-n", &self.pd, "addr", "add", &format!("{}/64", host(1)), "dev", "lan0", "nodad"]);
        ip(&["-n", self.lan(), "addr", "add", &format!("{}/64", host(2)), "dev", "eth0", "nodad"]);
        host(2)
    }

    /// pd's address on the LAN.
    pub fn lan_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.octet(), 1)
    }

    /// The LAN host's address.
    pub fn lan_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.octet(), 2)
    }

    /// The LAN's prefix, `198.19.N.0/24`.
    pub fn lan_prefix(&self) -> String {
        format!("198.19.{}.0/24", self.octet())
    }

    /// The LAN host's namespace; panics if these hosts have none.
    pub fn lan(&self) -> &str {
        self.lan.as_deref().expect("hosts built without a LAN host")
    }

    /// `/etc/netns/NS/FILE`: `ip netns exec` bind-mounts it over `/etc/FILE` for what it runs
    /// (e.g. a `resolv.conf` naming np up's resolver). Removed on drop.
    pub fn etc_file(&self, ns: &str, file: &str, content: &str) {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), content).unwrap();
    }

    /// Runs `ip ARGS` in namespace `ns` (e.g. `link show np0`): (success, stdout).
    pub fn ip_in(&self, ns: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip").arg("-n").arg(ns).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            kill_all_in(ns);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
        for v in &self.veths {
            let _ = Command::new("ip").args(["link", "del", v]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).stderr(Stdio::null()).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

/// Runs `ip ARGS`, panicking with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Processes in namespace `ns` (`ip netns pids`), this test process excluded.
pub fn pids_in(ns: &str) -> Vec<u32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).stderr(Stdio::null()).output();
    let me = std::process::id();
    out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_else(|_| Vec::new())
        .into_iter()
        .filter(|&p| p != me)
        .collect()
}

/// SIGKILLs every process in `ns` and waits (2 s at most) until they are gone.
fn kill_all_in(ns: &str) {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() > end {
            return;
        }
        for p in pids {
            let _ = Command::new("kill").args(["-9", &p.to_string()]).stderr(Stdio::null()).status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process id encoded in one of our names (`npt1a2b-0-pc`, `npb1a2b-0`), if any.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = [NS_PREFIX].iter().chain(LINK_PREFIXES.iter()).find_map(|p| name.strip_prefix(p))?;
    u32::from_str_radix(rest.split('-').next()?, 16).ok()
}

/// Removes namespaces and links of ours whose test process is gone (a run that was SIGKILLed).
fn sweep_stale() {
    let dead = |name: &str| owner_pid(name).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for ns in String::from_utf8_lossy(&list).lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with(NS_PREFIX) && dead(ns) {
            kill_all_in(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
    let links = Command::new("ip").args(["-o", "link", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    for l in String::from_utf8_lossy(&links).lines() {
        // "12: npv1a2b-0c@if3: <...>"
        let Some(name) = l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if LINK_PREFIXES.iter().any(|p| name.starts_with(p)) && dead(name) {
            let _ = Command::new("ip").args(["link", "del", name]).stderr(Stdio::null()).status();
        }
    }
}

/// The same program, arguments, environment and working directory, run inside `ns` by
/// `ip netns exec` (which execs it: the child's pid is the program's). Standard streams are not
/// copied: set them on the result.
pub fn ns_command(ns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// A command for `program` inside `ns`.
pub fn cmd_in(ns: &str, program: impl Into<OsString>) -> Command {
    ns_command(ns, &Command::new(program.into()))
}

/// Starts `cmd` in `ns`, standard output and error appended to `log`; killed when dropped.
pub fn spawn_in(ns: &str, cmd: &Command, log: &Path) -> Proc {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = ns_command(ns, cmd).stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
    Proc(child)
}

/// Runs `cmd` in `ns` to completion, SIGKILLed after `timeout`.
pub fn output_in(ns: &str, cmd: &Command, timeout: Duration) -> Output {
    output_within(ns_command(ns, cmd).stdin(Stdio::null()), timeout)
}

/// Runs a `sh -c SCRIPT` in `ns` to completion, SIGKILLed after `timeout`.
pub fn sh_in(ns: &str, script: &str, timeout: Duration) -> Output {
    output_in(ns, Command::new("sh").args(["-c", script]), timeout)
}

/// Runs `python3 -c SCRIPT ARGS...` in `ns`, SIGKILLed after `timeout`.
pub fn python_in(ns: &str, script: &str, args: &[&str], timeout: Duration) -> Output {
    output_in(ns, Command::new("python3").args(["-c", script]).args(args), timeout)
}

/// Moves the calling thread into network namespace `ns`.
///
/// `setns(2)` on a file descriptor of `/var/run/netns/NS`: only the calling thread changes
/// namespace, which is why [`in_netns`] calls this on a thread of its own and lets it end.
#[allow(unsafe_code)]
fn enter_netns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(Path::new("/var/run/netns").join(ns))?;
    // SAFETY: setns takes a valid open file descriptor (`f` outlives the call) and a flag; it
    // touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `f` on a fresh thread inside `ns` ("": this one) and returns its result. Sockets `f` creates belong to
/// `ns` for good, whichever thread uses them afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        // "": the namespace the test runs in (loopback stacks use the impairment tools too).
        if !ns.is_empty() {
            enter_netns(&ns).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
        }
        f()
    })
    .join()
    .unwrap()
}

/// A TCP listener bound in `ns`.
pub fn bind_in(ns: &str, addr: SocketAddr) -> TcpListener {
    in_netns(ns, move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// A TCP connection made from `ns`.
pub fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_netns(ns, move || TcpStream::connect_timeout(&addr, timeout))
}

/// One echo round trip from `ns` to `addr`: `msg` sent, as many bytes read back.
pub fn echo_once(ns: &str, addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = connect_in(ns, addr, Duration::from_secs(10))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    Ok(back)
}

/// A UDP socket bound in `ns`.
pub fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    in_netns(ns, move || UdpSocket::bind(addr)).unwrap()
}

/// An echo server on `ip:0` in `ns` (the test's threads serve it); returns its port.
pub fn echo_in(ns: &str, ip: Ipv4Addr) -> u16 {
    serve_on(bind_in(ns, (ip, 0).into()), echo_conn)
}

/// A server on `ip:0` in `ns` that reads to EOF and answers `SHA256HEX LEN` (as
/// [`crate::servers::hasher`]).
pub fn hasher_in(ns: &str, ip: Ipv4Addr) -> u16 {
    serve_on(bind_in(ns, (ip, 0).into()), hasher_conn)
}

/// A server on `ip:0` in `ns` that writes the first `len` bytes of [`pattern`] and closes.
pub fn source_in(ns: &str, ip: Ipv4Addr, len: u64) -> u16 {
    serve_on(bind_in(ns, (ip, 0).into()), move |s| source_conn(s, len))
}

/// Sends the first `len` bytes of [`pattern`] to a hasher at `addr` from `ns`; returns its answer.
pub fn send_pattern(ns: &str, addr: SocketAddr, len: u64) -> String {
    let mut c = connect_in(ns, addr, Duration::from_secs(20)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut sent, mut i) = (0u64, 0u64);
    while sent < len {
        let p = pattern(i);
        let n = p.len().min((len - sent) as usize);
        c.write_all(&p[..n]).unwrap();
        sent += n as u64;
        i += 1;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

/// Reads a source at `addr` from `ns` to EOF: (bytes, SHA-256 hex).
pub fn read_all_hash(ns: &str, addr: SocketAddr) -> (u64, String) {
    let mut c = connect_in(ns, addr, Duration::from_secs(20)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        got += n as u64;
    }
    (got, hex(ctx.finish().as_ref()))
}

/// A real OpenSSH server in a namespace, with its own host key and one authorised client key.
pub struct NsSshd {
    pub ns: String,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    _proc: Proc,
}

impl NsSshd {
    /// Starts `sshd` in `ns` listening on `addr`.
    pub fn start(ns: &str, addr: SocketAddr) -> NsSshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for k in ["host", "client"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "np-test", "-f"])
                .arg(d.join(k))
                .status()
                .unwrap();
            assert!(st.success());
        }
        std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f", "/dev/null", "-p", &addr.port().to_string()])
            .arg("-o")
            .arg(format!("ListenAddress={}", addr.ip()))
            .args(["-o", "PidFile=none", "-o", "StrictModes=no"])
            .args(["-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no"])
            // scp (SFTP by default since OpenSSH 9.0) and sftp need the subsystem.
            .args(["-o", "Subsystem=sftp internal-sftp"])
            // sshd's default (10:30:100) drops a random share of more than ten connections
            // still in key exchange: tests that start many ssh at once mean to test np, not that.
            .args(["-o", "MaxStartups=100"])
            .arg("-o")
            .arg(format!("HostKey={}", d.join("host").display()))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", d.join("authorized_keys").display()));
        let proc = spawn_in(ns, &cmd, &d.join("sshd.log"));
        let up = wait_until(Duration::from_secs(5), || connect_in(ns, addr, Duration::from_secs(1)).is_ok());
        assert!(up, "sshd did not start: {}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
        NsSshd { ns: ns.to_string(), addr, dir, _proc: proc }
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    /// Runs `ssh root@HOST -p PORT COMMAND` from namespace `from` with the client key.
    pub fn ssh_from(&self, from: &str, host: &str, port: u16, command: &str) -> Output {
        self.ssh_from_with(from, &[], host, port, command)
    }

    /// [`NsSshd::ssh_from`] with more ssh options first (e.g. `-6`).
    pub fn ssh_from_with(&self, from: &str, options: &[&str], host: &str, port: u16, command: &str) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(options)
            .arg("-i")
            .arg(self.client_key())
            .args(["-p", &port.to_string(), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"])
            .arg(format!("root@{host}"))
            .arg(command);
        output_in(from, &cmd, Duration::from_secs(30))
    }
}

/// What [`Deployment::start`] sets up besides the hosts.
#[derive(Debug, Clone, Default)]
pub struct DeploymentOptions {
    /// Also a LAN host behind pd, with two echo servers (one permitted, one not).
    pub lan: bool,
    /// Bytes served by the source server in pd (default 256 MiB).
    pub source_len: Option<u64>,
}

/// A whole deployment on [`Hosts`], from the real binaries: np-control and np-relay in pr,
/// sshd and echo/hasher/source servers in pd (127.0.0.1), npd in pd as `pi4@alice_device`
/// managed by `@alice`, and the client's identity `@alice` enrolled from pc.
pub struct Deployment {
    pub control_addr: SocketAddr,
    pub relay_addr: SocketAddr,
    pub client_home: PathBuf,
    pub device_home: PathBuf,
    pub relay_home: PathBuf,
    pub sshd: NsSshd,
    /// Servers on 127.0.0.1 in pd.
    pub echo_port: u16,
    pub hash_port: u16,
    pub source_port: u16,
    pub source_len: u64,
    /// Echo servers on the LAN host: npd permits the first and not the second.
    pub lan_ports: Option<(u16, u16)>,
    pub npd: Option<Proc>,
    /// np-control and np-relay (in that order).
    pub procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
    // Last, so every process above is killed before the namespaces go.
    pub hosts: Hosts,
}

/// The control plane's and the relay's ports in pr.
const CONTROL_PORT: u16 = 7443;
const RELAY_PORT: u16 = 7444;

/// Enrols `name` with the control plane at `control_addr` (its data in `dir`/control), from
/// `ns`, with the real `np keys new`; returns its home (`dir`/home-NAME).
fn enrol_in(dir: &Path, control_addr: SocketAddr, name: &str, ns: &str) -> PathBuf {
    let out = Command::new(bin("np-control")).args(["enroll", name, "--data"]).arg(dir.join("control")).output();
    let out = out.unwrap();
    assert!(out.status.success(), "enroll {name}: {}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let home = dir.join(format!("home-{}", name.trim_start_matches('@')));
    let mut keys = Command::new(bin("np"));
    keys.args(["keys", "new", name, "--control", &control_addr.to_string(), "--code", &code, "--home"]).arg(&home);
    let out = output_in(ns, &keys, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "np keys new {name} in {ns}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    home
}

impl Deployment {
    pub fn start(opts: DeploymentOptions) -> Deployment {
        Self::start_on(opts, false)
    }

    /// [`Deployment::start`] on hosts with IPv6 addresses only ([`Hosts::ipv6_only`]): the
    /// control plane and the relay listen on pr's IPv6 address, and everyone reaches them there.
    pub fn start_ipv6_only(opts: DeploymentOptions) -> Deployment {
        Self::start_on(opts, true)
    }

    fn start_on(opts: DeploymentOptions, ipv6_only: bool) -> Deployment {
        let t0 = Instant::now();
        let hosts = Hosts::new(opts.lan);
        if ipv6_only {
            hosts.ipv6_only();
        }
        let pr_ip = if ipv6_only { IpAddr::V6(hosts.bridge_ip6(2)) } else { IpAddr::V4(hosts.pr_ip()) };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let mut procs = Vec::new();

        // Control plane in pr.
        let control_addr = SocketAddr::new(pr_ip, CONTROL_PORT);
        let mut cmd = Command::new(bin("np-control"));
        cmd.args(["serve", "--listen", &control_addr.to_string(), "--data"])
            .arg(d.join("control"))
            .env("RUST_LOG", std::env::var("NP_TEST_CONTROL_LOG").unwrap_or_else(|_| "debug".into()));
        let (child, _) = spawn_listening(ns_command(&hosts.pr, &cmd), &d.join("control.log"))
            .unwrap_or_else(|| panic!("np-control did not start: {}", read(&d.join("control.log"))));
        procs.push(Proc(child));

        // Identities, each enrolled from the host it lives on.
        let enrol = |name: &str, ns: &str| enrol_in(&d, control_addr, name, ns);
        let relay_home = enrol("@relay", &hosts.pr);
        let client_home = enrol("@alice", &hosts.pc);
        let device_home = enrol("@alice_device", &hosts.pd);

        // Relay in pr.
        let relay_addr = SocketAddr::new(pr_ip, RELAY_PORT);
        let mut cmd = Command::new(bin("np-relay"));
        cmd.args(["--as", "@relay", "--listen", &relay_addr.to_string(), "--home"])
            .arg(&relay_home)
            .env("RUST_LOG", "debug");
        let (child, _) = spawn_listening(ns_command(&hosts.pr, &cmd), &d.join("relay.log"))
            .unwrap_or_else(|| panic!("np-relay did not start: {}", read(&d.join("relay.log"))));
        procs.push(Proc(child));
        let published = crate::wait_until(Duration::from_secs(10), || {
            read(&d.join("relay.log")).contains("relay record published")
        });
        assert!(published, "np-relay did not publish its record: {}", read(&d.join("relay.log")));
        // The operator lists it: devices (npd without --relay) trust it.
        let out =
            Command::new(bin("np-control")).args(["relay", "add", "@relay", "--data"]).arg(d.join("control")).output();
        let out = out.unwrap();
        assert!(out.status.success(), "np-control relay add: {}", String::from_utf8_lossy(&out.stderr));

        // Services in pd, and on the LAN host.
        let sshd = NsSshd::start(&hosts.pd, "127.0.0.1:22".parse().unwrap());
        let lo = Ipv4Addr::LOCALHOST;
        let source_len = opts.source_len.unwrap_or(256 << 20);
        let (echo_port, hash_port, source_port) =
            (echo_in(&hosts.pd, lo), hasher_in(&hosts.pd, lo), source_in(&hosts.pd, lo, source_len));
        let lan_ports = hosts.lan.clone().map(|lan| {
            let any = Ipv4Addr::UNSPECIFIED;
            (echo_in(&lan, any), echo_in(&lan, any))
        });

        let mut dep = Deployment {
            dir,
            control_addr,
            relay_addr,
            client_home,
            device_home,
            relay_home,
            sshd,
            echo_port,
            hash_port,
            source_port,
            source_len,
            lan_ports,
            npd: None,
            procs,
            hosts,
        };
        let permit = dep.permit();
        dep.start_npd(&["--manager", "@alice", "--permit-open", &permit]);
        eprintln!("deployment {} up in {:?}", dep.hosts.pc, t0.elapsed());
        dep
    }

    /// Every service in pd on `localhost`, and the LAN host's first echo port.
    pub fn permit(&self) -> String {
        let mut p = format!(
            "localhost:{},localhost:{},localhost:{},localhost:{}",
            self.sshd.addr.port(),
            self.echo_port,
            self.hash_port,
            self.source_port
        );
        if let Some((open, _)) = self.lan_ports {
            p.push_str(&format!(",{}:{open}", self.hosts.lan_ip()));
        }
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self, name: &str) -> String {
        read(&self.dir.path().join(name))
    }

    /// Enrols `name` from `ns` (the real `np keys new`); returns its home.
    pub fn enrol(&self, name: &str, ns: &str) -> PathBuf {
        enrol_in(self.dir.path(), self.control_addr, name, ns)
    }

    /// `np-control revoke NAME` on the running control plane.
    pub fn revoke(&self, name: &str) {
        let out = Command::new(bin("np-control"))
            .args(["revoke", name, "--data"])
            .arg(self.dir.path().join("control"))
            .output()
            .unwrap();
        assert!(out.status.success(), "np-control revoke {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Another relay in pr, enrolled as `name`, on the operator's list, listening on `port`; with
    /// `delay`, published at a delaying proxy in pr in front of it (every chunk held `delay`
    /// each way), so it is the slower one to reach. Returns once its record is out.
    pub fn add_relay(
        &self,
        name: &str,
        port: u16,
        delay: Option<Duration>,
    ) -> (Proc, Option<crate::impair::DelayProxy>) {
        let home = self.enrol(name, &self.hosts.pr);
        let listen = SocketAddr::from((self.hosts.pr_ip(), port));
        let proxy =
            delay.map(|d| crate::impair::DelayProxy::start(&self.hosts.pr, (self.hosts.pr_ip(), 0).into(), listen, d));
        let advertise = proxy.as_ref().map_or(listen, |p| p.addr);
        let log = self.dir.path().join(format!("relay-{}.log", name.trim_start_matches('@')));
        let mut cmd = Command::new(bin("np-relay"));
        cmd.args(["--as", name, "--listen", &listen.to_string(), "--advertise", &advertise.to_string(), "--home"])
            .arg(&home)
            .env("RUST_LOG", "debug");
        let proc = spawn_in(&self.hosts.pr, &cmd, &log);
        let published = wait_until(Duration::from_secs(10), || read(&log).contains("relay record published"));
        assert!(published, "{name} did not publish its record: {}", read(&log));
        let out = Command::new(bin("np-control"))
            .args(["relay", "add", name, "--data"])
            .arg(self.dir.path().join("control"))
            .output()
            .unwrap();
        assert!(out.status.success(), "np-control relay add {name}: {}", String::from_utf8_lossy(&out.stderr));
        (proc, proxy)
    }

    /// (Re)starts npd in pd as `pi4@alice_device` with `args`; waits until it is ready.
    pub fn start_npd(&mut self, args: &[&str]) {
        self.npd = None;
        let log = self.dir.path().join("npd.log");
        let mut cmd = Command::new(bin("npd"));
        cmd.args(["--as", "@alice_device", "--device", "pi4", "--home"])
            .arg(&self.device_home)
            .args(args)
            .env("RUST_LOG", "debug");
        let start = read(&log).len();
        self.npd = Some(spawn_in(&self.hosts.pd, &cmd, &log));
        let ok = wait_until(Duration::from_secs(15), || {
            read(&log).get(start..).is_some_and(|l| l.contains("waiting for session requests"))
        });
        assert!(ok, "npd did not start: {}", read(&log));
    }

    /// Starts `np forward --to pi4@alice_device` as @alice in pc; returns once every `-L` (and
    /// every `-U` in `extra`) listens, their addresses in that order.
    pub fn forward(&self, forwards: &[&str], extra: &[&str]) -> Result<crate::stack::Forward, String> {
        let mut cmd = Command::new(bin("np"));
        cmd.args(["forward", "--as", "@alice", "--to", "pi4@alice_device", "--relay", "@relay"])
            .arg("--home")
            .arg(&self.client_home);
        for f in forwards {
            cmd.args(["-L", f]);
        }
        cmd.args(extra).env("RUST_LOG", "debug");
        let log = self.dir.path().join("forward.log");
        let mut child = ns_command(&self.hosts.pc, &cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = Vec::new();
        // `-U` forwards in `extra` print their line too (`forwarding udp ADDR -> ...`).
        let expected = forwards.len() + extra.iter().filter(|a| **a == "-U").count();
        while addrs.len() < expected {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("forwarding ") {
                        let rest = rest.strip_prefix("udp ").unwrap_or(rest);
                        addrs.push(rest.split_whitespace().next().unwrap().parse().unwrap());
                    }
                }
                _ => {
                    let _ = child.wait();
                    return Err(read(&log));
                }
            }
        }
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(crate::stack::Forward { proc: Proc(child), addrs })
    }

    /// Starts `np up --as @alice --relay R --home H ARGS` in pc; returns once it printed `ready`,
    /// or its output and log if it exited first or took longer than 30 s.
    pub fn up(&self, args: &[&str]) -> Result<Up, String> {
        self.up_via(Some("@relay"), args)
    }

    /// [`Deployment::up`] through `relay`, or with none named: np up chooses.
    pub fn up_via(&self, relay: Option<&str>, args: &[&str]) -> Result<Up, String> {
        let mut cmd = Command::new(bin("np"));
        cmd.args(["up", "--as", "@alice"]);
        if let Some(r) = relay {
            cmd.args(["--relay", r]);
        }
        cmd.arg("--home").arg(&self.client_home).args(args).env("RUST_LOG", "debug");
        let log = self.dir.path().join("up.log");
        let mut child = ns_command(&self.hosts.pc, &cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut seen = Vec::new();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                let ready = line.trim() == "ready";
                seen.push(line);
                if ready {
                    let _ = tx.send(Ok(seen));
                    for _ in lines.by_ref() {}
                    return;
                }
            }
            let _ = tx.send(Err(seen));
        });
        let t0 = Instant::now();
        let lines = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(lines)) => lines,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let seen = match other {
                    Ok(Err(seen)) => seen.join("\n"),
                    _ => "(timed out waiting for `ready`)".into(),
                };
                return Err(format!("np up failed; stdout:\n{seen}\nlog:\n{}", read(&log)));
            }
        };
        let up = Up::parse(Proc(child), pid, lines, log)?;
        eprintln!("np up ready in {:?}", t0.elapsed());
        Ok(up)
    }

    /// Runs `np ARGS --home CLIENT_HOME` in pc: (success, stdout, stderr).
    pub fn np_in_pc(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(bin("np"));
        cmd.args(args).arg("--home").arg(&self.client_home);
        let out = output_in(&self.hosts.pc, &cmd, Duration::from_secs(20));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ssh root@HOST -p PORT COMMAND` from pc to the sshd in pd (through whatever `HOST` is).
    pub fn ssh(&self, host: &str, port: u16, command: &str) -> Output {
        self.sshd.ssh_from(&self.hosts.pc, host, port, command)
    }
}

/// A running `np up` and what it printed.
pub struct Up {
    pub proc: Proc,
    pub pid: u32,
    /// The interface's name and address, from `up NAME ADDR/LEN`.
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// `(address, NAME@ID)` per device line.
    pub devices: Vec<(Ipv4Addr, String)>,
    /// Everything printed up to `ready`.
    pub lines: Vec<String>,
    pub log: PathBuf,
}

impl Up {
    fn parse(proc: Proc, pid: u32, lines: Vec<String>, log: PathBuf) -> Result<Up, String> {
        let bad = || format!("unexpected np up output:\n{}", lines.join("\n"));
        let head = lines.iter().find_map(|l| l.strip_prefix("up ")).ok_or_else(bad)?;
        let mut it = head.split_whitespace();
        let name = it.next().ok_or_else(bad)?.to_string();
        let (a, len) = it.next().and_then(|c| c.split_once('/')).ok_or_else(bad)?;
        let addr = a.parse().map_err(|_| bad())?;
        let prefix_len = len.parse().map_err(|_| bad())?;
        let devices = lines
            .iter()
            .filter(|l| l.starts_with("  "))
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let a = w.next()?.parse().ok()?;
                let d = w.next()?;
                d.contains('@').then(|| (a, d.to_string()))
            })
            .collect();
        Ok(Up { proc, pid, name, addr, prefix_len, devices, lines, log })
    }

    /// The address of device `name@id`; panics if it was not printed.
    pub fn device(&self, dev: &str) -> Ipv4Addr {
        self.devices
            .iter()
            .find(|(_, d)| d == dev)
            .map(|(a, _)| *a)
            .unwrap_or_else(|| panic!("no device {dev} in:\n{}", self.lines.join("\n")))
    }

    /// Sends `sig` (e.g. "TERM") and waits up to `timeout` for the exit; returns the status.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid.to_string()]).status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.proc.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    pub fn rss_kib(&self) -> u64 {
        crate::rss_kib(self.pid)
    }
}

/// A file's content, or "" if it cannot be read.
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Asks the DNS server at `server` (from `ns`) for the A records of `name`: the addresses, or the
/// response code if it is not NOERROR (3 is NXDOMAIN), or an error if no answer came in `timeout`.
pub fn dns_a(ns: &str, server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let sock = udp_in(ns, "0.0.0.0:0".parse().unwrap());
    sock.set_read_timeout(Some(timeout)).unwrap();
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    sock.send_to(&q, server).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).map_err(|e| format!("no DNS answer: {e}"))?;
    parse_a_answer(&buf[..n], id)
}

fn parse_a_answer(b: &[u8], id: u16) -> Result<Vec<Ipv4Addr>, String> {
    let bad = || format!("malformed DNS answer {b:02x?}");
    if b.len() < 12 || u16::from_be_bytes([b[0], b[1]]) != id {
        return Err(bad());
    }
    let rcode = b[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let (qd, an) = (u16::from_be_bytes([b[4], b[5]]), u16::from_be_bytes([b[6], b[7]]));
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *b.get(i)? as usize;
            if l == 0 {
                return Some(i + 1);
            }
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + l;
        }
    };
    for _ in 0..qd {
        i = skip_name(i).ok_or_else(bad)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(i).ok_or_else(bad)?;
        let h = b.get(i..i + 10).ok_or_else(bad)?;
        let (ty, len) = (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[8], h[9]]) as usize);
        let data = b.get(i + 10..i + 10 + len).ok_or_else(bad)?;
        if ty == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_of_our_names() {
        assert_eq!(owner_pid("npt1a2b-0-pc"), Some(0x1a2b));
        assert_eq!(owner_pid("npb1a2b-3"), Some(0x1a2b));
        assert_eq!(owner_pid("npv1a2b-3c"), Some(0x1a2b));
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("nptzz-0-pc"), None);
    }

    #[test]
    fn dns_answer_parsing() {
        let mut b = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        b.extend_from_slice(&[3, b'p', b'i', b'4', 2, b'n', b'p', 0, 0, 1, 0, 1]);
        b.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 100, 80, 0, 2]);
        assert_eq!(parse_a_answer(&b, 0x1234), Ok(vec![Ipv4Addr::new(100, 80, 0, 2)]));
        b[3] = 0x83;
        assert_eq!(parse_a_answer(&b, 0x1234), Err("rcode 3".into()));
        assert!(parse_a_answer(&b[..5], 0x1234).is_err());
    }
}
