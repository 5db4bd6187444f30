//! `np forward` across three hosts in network namespaces (root required): np-control and np-relay
//! in pr, npd, sshd and test servers in pd, a LAN host behind pd, and `np forward` plus the real
//! `ssh` client in pc. The client reaches the device only through the relay: pc and pd share a
//! bridge, but nothing in pd listens on it.
#![allow(clippy::unwrap_used)]

use np_tests::netns::{read_all_hash, send_pattern, Deployment, DeploymentOptions};
use np_tests::servers::pattern_sha256;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[test]
fn forward_across_hosts_ssh_lan_and_refusal() {
    let d = Deployment::start(DeploymentOptions { lan: true, source_len: Some(16 << 20) });
    let pc = d.hosts.pc.clone();
    let (lan_open, lan_closed) = d.lan_ports.unwrap();
    let lan = d.hosts.lan_ip();
    let fwd = d
        .forward(
            &[
                "127.0.0.1:2222:localhost:22",
                &format!("0:localhost:{}", d.hash_port),
                &format!("0:localhost:{}", d.source_port),
                &format!("0:{lan}:{lan_open}"),
            ],
            &[],
        )
        .unwrap_or_else(|log| panic!("np forward failed:\n{log}"));
    let [_, hash_a, src_a, lan_a] = [fwd.addrs[0], fwd.addrs[1], fwd.addrs[2], fwd.addrs[3]];

    // Real ssh in pc, real sshd in pd, through np forward and np-relay in pr.
    let t = Instant::now();
    let out = d.ssh("127.0.0.1", 2222, "echo ok; hostname >/dev/null");
    assert!(out.status.success(), "ssh failed: {}\n{}", String::from_utf8_lossy(&out.stderr), d.log("forward.log"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    eprintln!("ssh through np forward: {:?}", t.elapsed());

    // The sshd is only on pd's loopback: pc cannot reach it directly.
    let direct = np_tests::netns::connect_in(&pc, SocketAddr::from((d.hosts.pd_ip(), 22)), Duration::from_secs(2));
    assert!(direct.is_err(), "pd's sshd is reachable from pc without np");

    // 16 MiB each way, hashes checked.
    let len = 16u64 << 20;
    assert_eq!(send_pattern(&pc, hash_a, len), format!("{} {len}", pattern_sha256(len)));
    assert_eq!(read_all_hash(&pc, src_a), (len, pattern_sha256(len)));

    // A permitted port on the LAN host behind the device.
    let mut c = np_tests::netns::connect_in(&pc, lan_a, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello lan").unwrap();
    let mut back = [0u8; 9];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello lan");
    drop(c);
    drop(fwd);

    // An unpermitted LAN port: np forward is refused at once, with a clear error.
    let t = Instant::now();
    let err = match d.forward(&[&format!("0:{lan}:{lan_closed}")], &[]) {
        Ok(f) => {
            // A forward may listen first and refuse per connection: then the connection is
            // closed without data.
            let mut c = np_tests::netns::connect_in(&pc, f.addrs[0], Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 1];
            assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "an unpermitted LAN port answered");
            String::new()
        }
        Err(log) => log,
    };
    assert!(t.elapsed() < Duration::from_secs(10), "refusal took {:?}", t.elapsed());
    eprintln!("refusal: {:?}: {}", t.elapsed(), err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(""));
}

#[test]
fn hosts_route_the_lan_and_are_torn_down_on_drop() {
    use np_tests::netns::{bind_in, connect_in, spawn_in, Hosts};
    let (names, bridge, veths, sleeper) = {
        let h = Hosts::new(true);
        // The LAN host reaches pd's bridge address through pd (its default route), and pc
        // reaches pr over the bridge.
        let l = bind_in(&h.pd, SocketAddr::from((h.pd_ip(), 0)));
        assert!(connect_in(h.lan(), l.local_addr().unwrap(), Duration::from_secs(2)).is_ok());
        let l = bind_in(&h.pr, SocketAddr::from((h.pr_ip(), 0)));
        assert!(connect_in(&h.pc, l.local_addr().unwrap(), Duration::from_secs(2)).is_ok());
        // pc has no route to the LAN (only np up will add one).
        let l = bind_in(h.lan(), SocketAddr::from((h.lan_ip(), 0)));
        assert!(connect_in(&h.pc, l.local_addr().unwrap(), Duration::from_secs(1)).is_err());
        // A process left running in a namespace is killed by the drop.
        let sleeper = spawn_in(
            &h.pd,
            std::process::Command::new("sleep").arg("600"),
            &std::env::temp_dir().join("np-netns-sleep.log"),
        );
        let pid = sleeper.0.id();
        std::mem::forget(sleeper);
        let out = std::process::Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&out.stdout).into_owned();
        let veths: Vec<String> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with(&format!("npv{:x}-{}", std::process::id(), h.n)))
            .collect();
        assert_eq!(veths.len(), 3, "{links}");
        (vec![h.pc.clone(), h.pr.clone(), h.pd.clone(), h.lan().to_string()], h.bridge.clone(), veths, pid)
    };
    let list =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned();
    for n in &names {
        assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(n)), "namespace {n} left behind");
    }
    for l in veths.iter().chain([&bridge]) {
        let out = std::process::Command::new("ip").args(["link", "show", l]).output().unwrap();
        assert!(!out.status.success(), "link {l} left behind");
    }
    // Killed: gone, or a zombie of ours (its Child was forgotten, so nobody reaped it).
    let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "process in a deleted namespace still runs: {stat}");
}
