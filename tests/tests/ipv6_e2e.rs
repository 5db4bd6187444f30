//! IPv6 end to end in network namespaces (root required): each device's IPv6 address through
//! `np up` (real ssh to it, and to its name over AAAA).
#![allow(clippy::unwrap_used)]

use np_tests::netns::{connect_in, echo_once, sh_in, Deployment, DeploymentOptions};
use std::io::ErrorKind;
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
