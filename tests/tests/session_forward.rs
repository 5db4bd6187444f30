//! `np forward` end to end on loopback: real np-control, np-relay, npd, np, sshd and ssh.
#![allow(clippy::unwrap_used)]

use np_tests::servers::{echo, hasher, pattern, pattern_sha256, source};
use np_tests::sshd::Sshd;
use np_tests::stack::{np, Stack};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn notifications_accepted(s: &Stack) -> usize {
    std::fs::read_to_string(s.ctl.log()).unwrap_or_default().matches("notification accepted").count()
}

#[test]
fn ssh_big_transfers_many_flows_and_one_session() {
    let s = Stack::start();
    let sshd = Sshd::start();
    let (hash_port, src_port, echo_port) = (hasher(), source(256 << 20), echo());
    let permit = format!("localhost:{},localhost:{hash_port},localhost:{src_port},localhost:{echo_port}", sshd.port);
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &permit]);
    let fwd = s
        .forward(
            "pi4@alice_device",
            &[
                &format!("0:localhost:{}", sshd.port),
                &format!("0:localhost:{hash_port}"),
                &format!("0:localhost:{src_port}"),
                &format!("0:localhost:{echo_port}"),
            ],
            &[],
        )
        .unwrap();
    let [ssh_a, hash_a, src_a, echo_a] = [fwd.addrs[0], fwd.addrs[1], fwd.addrs[2], fwd.addrs[3]];
    let sent_before = notifications_accepted(&s);

    // ssh runs a command through the forward and returns its output.
    let out = sshd.ssh(ssh_a.port(), "echo ok-from-sshd");
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok-from-sshd");

    // 256 MiB each way, SHA-256 checked.
    let len: u64 = 256 << 20;
    let mut c = TcpStream::connect(hash_a).unwrap();
    for i in 0..(len / 65536) {
        c.write_all(&pattern(i)).unwrap();
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {len}", pattern_sha256(len)));

    let mut c = TcpStream::connect(src_a).unwrap();
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
    assert_eq!(got, len);
    assert_eq!(np_tests::servers::hex(ctx.finish().as_ref()), pattern_sha256(len));

    // One stalled flow: writes 8 MiB into an echo and never reads.
    let mut stalled = TcpStream::connect(echo_a).unwrap();
    stalled.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    let junk = vec![7u8; 1 << 20];
    for _ in 0..8 {
        if stalled.write_all(&junk).is_err() {
            break;
        }
    }

    // 50 concurrent connections all complete while it is stalled.
    let t = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(echo_a).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let msg = pattern(i);
                let w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let mut w = w;
                    w.write_all(&msg).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                c.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                back == pattern(i)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "an echo came back wrong");
    }
    assert!(t.elapsed() < Duration::from_secs(20), "50 flows took {:?}", t.elapsed());
    drop(stalled);

    // All of that went through the one session set up at start: no new request was sent.
    assert_eq!(notifications_accepted(&s), sent_before, "a connection made a control-plane round trip");

    // The device is listed, live, for its manager.
    let (ok, out, err) = np(&["devices", "--as", "@alice", "--home", s.client_home.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("pi4@alice_device") && out.contains("live"), "{out}");
    drop(fwd);
}

#[test]
fn verbose_prints_each_setup_step_with_its_time() {
    let s = Stack::start();
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let _f = s.forward("pi4@alice_device", &[&format!("0:localhost:{port}")], &["-v"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(s.dir().join("forward.log")).unwrap_or_default();
    drop(_f);
    std::thread::sleep(Duration::from_millis(200));
    let log = log + &std::fs::read_to_string(s.dir().join("forward.log")).unwrap_or_default();
    for step in [
        "authenticated to the control plane",
        "resolved @alice_device's keys",
        "request delivered",
        "found relay @relay at 127.0.0.1:",
        "paired with the device",
        "handshake complete",
        "session ready",
    ] {
        let line = log.lines().find(|l| l.contains(step)).unwrap_or_else(|| panic!("no step {step:?} in:\n{log}"));
        assert!(line.split_whitespace().nth(1) == Some("ms"), "{line}");
    }
}
