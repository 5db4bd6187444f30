//! Faults: the relay killed mid-transfer, the device daemon killed, the control plane killed
//! mid-enrolment, and a network partition longer than the keepalive.
#![allow(clippy::unwrap_used)]

use np_tests::servers::{echo, pattern, source};
use np_tests::stack::Stack;
use np_tests::{bin, np_keys_new, wait_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn echo_ok(addr: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else { return false };
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 4];
    c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
}

#[test]
fn relay_killed_mid_transfer_no_corruption_and_new_flows_within_2s() {
    let mut s = Stack::start();
    let (src, ep) = (source(1 << 30), echo());
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{src},localhost:{ep}")]);
    // Resumption off: this is how a session that does not resume ends (`resume_forward.rs`
    // has the relay killed under one that does).
    let f = s
        .forward(
            "pi4@alice_device",
            &[&format!("0:localhost:{src}"), &format!("0:localhost:{ep}")],
            &["--resume-window", "0"],
        )
        .unwrap();
    let mut c = TcpStream::connect(f.addrs[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < 8 << 20 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    s.restart_relay();
    let back = Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(got.len() < 1 << 30, "the transfer survived a relay kill?");
    let expect: Vec<u8> = (0..(got.len() as u64 / 65536 + 1)).flat_map(pattern).collect();
    assert!(got[..] == expect[..got.len()], "corrupt data after the relay was killed");
    assert!(wait_until(Duration::from_secs(5), || echo_ok(f.addrs[1])));
    assert!(back.elapsed() < Duration::from_secs(2), "new flows took {:?} after the relay returned", back.elapsed());
}

#[test]
fn killing_the_device_daemon_gives_the_client_a_clear_error() {
    let s = Stack::start();
    let ep = echo();
    let mut npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{ep}")]);
    let f = s
        .forward("pi4@alice_device", &[&format!("0:localhost:{ep}")], &["--timeout", "2s", "--keepalive", "1s"])
        .unwrap();
    assert!(echo_ok(f.addrs[0]));
    let _ = npd.0.kill();
    let _ = npd.0.wait();
    // The session dies with the daemon; the next flow finds no device and says so.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!echo_ok(f.addrs[0]));
    let log = s.dir().join("forward.log");
    assert!(
        wait_until(Duration::from_secs(8), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("did not answer within 2s")),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn control_plane_killed_mid_enrolment_keeps_the_code_and_half_writes_nothing() {
    let mut s = Stack::start();
    let code = s.ctl.code("@late");
    // Freeze the server so the enrolment is in flight, then kill it.
    let pid = s.ctl.pid().to_string();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let home = s.dir().join("late");
    let (h2, addr, code2) = (home.clone(), s.ctl.addr.to_string(), code.clone());
    let t = std::thread::spawn(move || np_keys_new(&h2, "@late", &addr, &code2));
    std::thread::sleep(Duration::from_millis(500));
    s.ctl.kill9();
    let (ok, _, err) = t.join().unwrap();
    assert!(!ok);
    assert!(err.contains("enrolling @late"), "{err}");
    assert!(!home.join("late").exists(), "keys of a failed enrolment were left behind");
    s.ctl.restart();
    // The code was not consumed: it works now.
    let (ok, out, err) = np_keys_new(&home, "@late", &s.ctl.addr.to_string(), &code);
    assert!(ok, "{out}{err}");
    let _ = bin("np");
}

/// A proxy in front of the relay that can stop moving bytes (a partition: TCP stalls, nothing is
/// lost or injected) and start again.
fn partition_proxy(relay: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for down in l.incoming().flatten() {
            let up = TcpStream::connect(relay).unwrap();
            for (mut a, mut b) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up, down)] {
                let cut = cut.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        while cut.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        let n = match a.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        while cut.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        if b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// Keepalive interval of the partition test.
const KEEPALIVE: &str = "300ms";

#[test]
fn a_partition_longer_than_the_keepalive_is_noticed_by_both_sides_and_recovered() {
    let mut s = Stack::start();
    let ep = echo();
    // A short keepalive (a session silent for three intervals is dead), so both sides notice the
    // partition in about a second of real time; the binaries' timers read the real clock.
    // Resumption off: a partition would be waited out otherwise.
    let _npd = s.npd(
        "pi4",
        &[
            "--manager",
            "@alice",
            "--permit-open",
            &format!("localhost:{ep}"),
            "--keepalive",
            KEEPALIVE,
            "--resume-window",
            "0",
        ],
    );
    let cut = Arc::new(AtomicBool::new(false));
    let real = s.relay_addr;
    s.relay_addr = partition_proxy(real, cut.clone());
    let f = s
        .forward(
            "pi4@alice_device",
            &[&format!("0:localhost:{ep}")],
            &["--keepalive", KEEPALIVE, "--resume-window", "0"],
        )
        .unwrap();
    let mut live = TcpStream::connect(f.addrs[0]).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    live.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();

    cut.store(true, Ordering::SeqCst);
    let t = Instant::now();
    // The client notices: its flow fails within a few keepalive intervals, during the partition.
    let r = live.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(6), "client noticed after {:?}", t.elapsed());
    // So does the device.
    let npd_log = s.dir().join("npd-pi4.log");
    assert!(
        wait_until(Duration::from_secs(6), || std::fs::read_to_string(&npd_log)
            .unwrap_or_default()
            .contains("keepalive timeout")),
        "device did not notice"
    );
    cut.store(false, Ordering::SeqCst);
    // Healed: new flows get a new session.
    assert!(wait_until(Duration::from_secs(10), || echo_ok(f.addrs[0])), "no recovery after the partition");
    s.relay_addr = real;
}
