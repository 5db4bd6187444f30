//! IPv6 end to end in network namespaces (root required): each device's IPv6 address through
//! `np up` (real ssh to it, and to its name over AAAA), `curl -6` to an IPv6 LAN host behind a
//! device route, and a deployment whose hosts have IPv6 addresses only (control plane, relay,
//! device and client all reached over IPv6).
#![allow(clippy::unwrap_used)]

use np_tests::netns::{bind_in, connect_in, echo_once, sh_in, Deployment, DeploymentOptions};
use np_tests::servers::serve_on;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

const DEVICE: &str = "pi4@alice_device";
const DNS_NAME: &str = "pi4.alice_device.np";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The IPv6 address np up gives the device at IPv4 address `v4` with the default --subnet6.
fn default_v6(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(0xfd6e_7000_u128 << 96 | u128::from(u32::from(v4)))
}

#[test]
fn ssh_to_the_devices_ipv6_address_and_to_its_name_over_aaaa() {
    let d = Deployment::start(DeploymentOptions::default());
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    let pc = d.hosts.pc.clone();
    let dev = up.device(DEVICE);
    let dev6 = default_v6(dev);
    let iface6 = default_v6(up.addr);
    assert!(up.lines.iter().any(|l| l.contains(DEVICE) && l.contains(&dev6.to_string())), "{:?}", up.lines);
    let (_, addrs) = d.hosts.ip_in(&pc, &["-6", "addr", "show", "np0"]);
    assert!(addrs.contains(&format!("{iface6}/96")), "{addrs}");

    // Real ssh to the device's IPv6 address: the same sshd as over IPv4 (npd dials localhost:22).
    let out = d.ssh(&dev6.to_string(), 22, "echo ok6");
    assert!(out.status.success(), "ssh root@{dev6} failed: {}\n{}", text(&out.stderr), up.log());
    assert_eq!(text(&out.stdout).trim(), "ok6");
    assert_eq!(echo_once(&pc, (dev6, d.echo_port).into(), b"hello v6").unwrap(), b"hello v6");

    // By name, over AAAA only (-6), with pc's resolver pointing at np up's.
    d.hosts.etc_file(&pc, "resolv.conf", &format!("nameserver {}\n", up.addr));
    let got = sh_in(&pc, &format!("getent ahostsv6 {DNS_NAME}"), Duration::from_secs(10));
    assert!(text(&got.stdout).contains(&dev6.to_string()), "AAAA: {}{}", text(&got.stdout), text(&got.stderr));
    let out = d.sshd.ssh_from_with(&pc, &["-6"], DNS_NAME, 22, "echo ok-by-aaaa");
    assert!(out.status.success(), "ssh -6 root@{DNS_NAME} failed: {}\n{}", text(&out.stderr), up.log());
    assert_eq!(text(&out.stdout).trim(), "ok-by-aaaa");

    // A port outside permit-open is refused over IPv6 as over IPv4; an unassigned address in the
    // prefix is unreachable at once.
    let e = connect_in(&pc, (dev6, 1).into(), Duration::from_secs(15)).expect_err("port 1 permitted");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let t = Instant::now();
    let e = connect_in(&pc, (default_v6(Ipv4Addr::new(100, 80, 0, 99)), 22).into(), Duration::from_secs(15))
        .expect_err("an unassigned IPv6 address answered");
    assert!(t.elapsed() < Duration::from_secs(3), "{e} after {:?}", t.elapsed());

    let (ok, status, err) = d.np_in_pc(&["status"]);
    assert!(ok, "np status: {err}");
    assert!(status.contains(&iface6.to_string()) && status.contains(&dev6.to_string()), "{status}");
    assert!(!up.log().contains("panicked"), "{}", up.log());
}

#[test]
fn an_ipv6_only_deployment_sets_up_sessions() {
    let t0 = Instant::now();
    let d = Deployment::start_ipv6_only(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    assert!(d.control_addr.is_ipv6() && d.relay_addr.is_ipv6(), "{} {}", d.control_addr, d.relay_addr);
    // No IPv4 left on the hosts' links: nothing below can have gone over IPv4.
    for ns in [&d.hosts.pc, &d.hosts.pr, &d.hosts.pd] {
        let (_, v4) = d.hosts.ip_in(ns, &["-4", "addr", "show", "dev", "eth0"]);
        assert!(!v4.contains("inet "), "{ns} still has IPv4: {v4}");
    }
    // The relay published its IPv6 address, bracketed.
    assert!(d.log("relay.log").contains(&format!("[{}]", d.hosts.bridge_ip6(2))), "{}", d.log("relay.log"));

    // np forward: a session through the relay, a flow through it.
    let fwd = d
        .forward(&[&format!("0:localhost:{}", d.echo_port)], &[])
        .unwrap_or_else(|log| panic!("np forward over IPv6 failed:\n{log}"));
    assert_eq!(echo_once(&pc, fwd.addrs[0], b"over ipv6 only").unwrap(), b"over ipv6 only");
    // A relay address given by hand takes the bracketed form too.
    let relay = d.relay_addr.to_string();
    let out = d.np_in_pc(&[
        "forward",
        "--as",
        "@alice",
        "--to",
        DEVICE,
        "--relay",
        "@relay",
        "--relay-address",
        "fd00::1:7444",
        "-L",
        "0:localhost:22",
    ]);
    assert!(!out.0 && out.2.contains("HOST:PORT"), "an unbracketed IPv6 relay address was taken: {out:?}");
    drop(fwd);
    let fwd = d
        .forward(&[&format!("0:localhost:{}", d.echo_port)], &["--relay-address", &relay])
        .unwrap_or_else(|log| panic!("np forward --relay-address {relay} failed:\n{log}"));
    assert_eq!(echo_once(&pc, fwd.addrs[0], b"by hand").unwrap(), b"by hand");

    // np up, and real ssh through it.
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("{e}"));
    let out = d.ssh(&default_v6(up.device(DEVICE)).to_string(), 22, "echo ok");
    assert!(out.status.success(), "ssh over np up failed: {}\n{}", text(&out.stderr), up.log());
    assert_eq!(text(&out.stdout).trim(), "ok");
    eprintln!("an_ipv6_only_deployment_sets_up_sessions: {:?}", t0.elapsed());
}

#[test]
fn curl_6_reaches_an_ipv6_lan_host_behind_a_device_route() {
    let mut d = Deployment::start(DeploymentOptions { lan: true, source_len: Some(1 << 20) });
    let pc = d.hosts.pc.clone();
    let lan = d.hosts.lan().to_string();
    let lan6 = d.hosts.lan_ipv6();
    // A small HTTP server on the LAN host's IPv6 address, and a second port npd does not permit.
    let http = serve_on(bind_in(&lan, (lan6, 0).into()), |mut s| {
        let mut line = String::new();
        let mut r = BufReader::new(s.try_clone().unwrap());
        while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhello over6");
    });
    let other6 = serve_on(bind_in(&lan, (lan6, 0).into()), |_| {});
    let permit = format!("{},[{lan6}]:{http}", d.permit());
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit]);
    let prefix = format!("{}/64", Ipv6Addr::from(u128::from(lan6) & !0xffff_ffff_ffff_ffff));
    let up = d.up(&["--device", DEVICE, "--route", &format!("{prefix}={DEVICE}")]).unwrap_or_else(|e| panic!("{e}"));
    let (_, routes) = d.hosts.ip_in(&pc, &["-6", "route", "show"]);
    assert!(routes.lines().any(|l| l.starts_with(&prefix) && l.contains("np0")), "{routes}");

    let out = sh_in(&pc, &format!("curl -6 -sS -m 10 http://[{lan6}]:{http}/"), Duration::from_secs(15));
    assert_eq!(text(&out.stdout), "hello over6", "curl -6: {}\n{}", text(&out.stderr), up.log());
    // Another port of the same IPv6 host is not in permit-open: refused at once.
    let e = connect_in(&pc, (lan6, other6).into(), Duration::from_secs(15)).expect_err("unpermitted port accepted");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}
