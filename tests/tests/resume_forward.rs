//! Session resumption through `np forward` and `npd` (issue 18): a transfer survives its relay
//! killed with SIGKILL and restarted, and a device daemon that restarted is told apart clearly.
#![allow(clippy::unwrap_used)]

use np_tests::servers::{echo, hasher, pattern, pattern_sha256, source};
use np_tests::stack::Stack;
use np_tests::wait_until;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

const LEN: u64 = 48 << 20;

fn echo_ok(addr: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else { return false };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
}

fn log(s: &Stack, name: &str) -> String {
    std::fs::read_to_string(s.dir().join(name)).unwrap_or_default()
}

#[test]
fn a_forwarded_transfer_both_ways_survives_the_relay_killed_and_restarted() {
    let mut s = Stack::start();
    let (src, sink) = (source(LEN), hasher());
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{src},localhost:{sink}")]);
    let f =
        s.forward("pi4@alice_device", &[&format!("0:localhost:{src}"), &format!("0:localhost:{sink}")], &[]).unwrap();

    // Upload: half before the kill, half after, then the device side's hasher answers.
    let (half_sent, go_on) = (mpsc::channel(), mpsc::channel::<()>());
    let (half_tx, half_rx) = half_sent;
    let (go_tx, go_rx) = go_on;
    let up_addr = f.addrs[1];
    let upload = std::thread::spawn(move || {
        let mut c = TcpStream::connect(up_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let blocks = LEN / 65536;
        for i in 0..blocks {
            if i == blocks / 2 {
                half_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            c.write_all(&pattern(i)).unwrap();
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    });

    // Download: 8 MiB in, then the relay dies.
    let mut c = TcpStream::connect(f.addrs[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    while got < 8 << 20 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        ctx.update(&buf[..n]);
        got += n as u64;
    }
    half_rx.recv().unwrap();
    s.restart_relay();
    go_tx.send(()).unwrap();
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) => panic!("the download broke after {got} bytes: {e}\n{}", log(&s, "forward.log")),
        }
    }
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, LEN, "{}", log(&s, "forward.log"));
    assert_eq!(hex, pattern_sha256(LEN), "the download's SHA-256");
    assert_eq!(upload.join().unwrap(), format!("{} {LEN}", pattern_sha256(LEN)), "the upload's SHA-256 and length");
    assert!(log(&s, "forward.log").contains("session resumed"), "{}", log(&s, "forward.log"));
    assert!(log(&s, "npd-pi4.log").contains("session resumed"), "{}", log(&s, "npd-pi4.log"));
}

#[test]
fn npd_restarted_the_client_says_the_session_cannot_resume_and_new_flows_get_a_new_one() {
    let s = Stack::start();
    let ep = echo();
    let args = ["--manager", "@alice", "--permit-open", &format!("localhost:{ep}")];
    let npd = s.npd("pi4", &args);
    let f = s.forward("pi4@alice_device", &[&format!("0:localhost:{ep}")], &[]).unwrap();
    // A flow open across the restart: it fails (its session is gone), it does not hang.
    let mut held = TcpStream::connect(f.addrs[0]).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    held.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    held.read_exact(&mut b).unwrap();
    drop(npd);
    let _npd = s.npd("pi4", &args);
    let said = wait_until(Duration::from_secs(20), || log(&s, "forward.log").contains("cannot resume"));
    assert!(said, "{}", log(&s, "forward.log"));
    assert!(matches!(held.read(&mut b), Ok(0) | Err(_)), "the old flow ends");
    assert!(wait_until(Duration::from_secs(10), || echo_ok(f.addrs[0])), "{}", log(&s, "forward.log"));
}

/// A client that will not resume (here `np forward --resume-window 0`; `np nc` and `np up` do
/// not resume either) says so in its request, and npd ends its session as soon as the client is
/// gone instead of keeping it, and a place, waiting for the whole resume window.
#[test]
fn a_client_that_will_not_resume_leaves_no_session_waiting_at_the_device() {
    let s = Stack::start();
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let f = s.forward("pi4@alice_device", &[&format!("0:localhost:{port}")], &["--resume-window", "0"]).unwrap();
    assert!(echo_ok(f.addrs[0]));
    drop(f);
    let ended = wait_until(Duration::from_secs(10), || log(&s, "npd-pi4.log").contains("session ended"));
    let npd_log = log(&s, "npd-pi4.log");
    assert!(ended, "npd kept the session: {npd_log}");
    assert!(!npd_log.contains("rejoining the relay"), "{npd_log}");
}
