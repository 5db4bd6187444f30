//! Two `np-control` nodes on one PostgreSQL database (a throwaway cluster the test starts):
//! a device connected to node A and a client connected to node B set up a session and carry
//! bytes. The session request is stored by B and reaches the device at once, because B's commit
//! wakes A through LISTEN/NOTIFY.
#![allow(clippy::unwrap_used)]

use np_testpg::TempPostgres;
use np_tests::servers::echo;
use np_tests::stack::{np, Stack};
use np_tests::{np_keys_new, wait_until, Control};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A throwaway PostgreSQL, node A on it with the whole stack, and node B on the same database;
/// `None` (after a loud message) when PostgreSQL is not installed.
fn two_nodes() -> Option<(TempPostgres, Stack, Control)> {
    let pg = TempPostgres::start().unwrap()?;
    let url = pg.url("postgres");
    let store = ["--store", url.as_str()];
    let s = Stack::start_on(Control::start(&store), &[]);
    let b = second_node(&s.ctl, &store);
    Some((pg, s, b))
}

/// Node B, on the database of node A and with A's certificate (one pin for the cluster).
fn second_node(a: &Control, store: &[&str]) -> Control {
    let mut b = Control::start(store);
    b.kill9();
    for f in ["cert.der", "key.der"] {
        std::fs::copy(a.data().join(f), b.data().join(f)).unwrap();
    }
    b.restart();
    b
}

fn round_trip(addr: std::net::SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).unwrap();
    got
}

#[test]
fn device_on_one_node_client_on_the_other() {
    let Some((_pg, s, b)) = two_nodes() else { return };
    // @bob enrols through node B, so his home points there; the code B issues pins A's cert.
    let bob = b.identity("@bob");
    let port = echo();
    let permit = format!("localhost:{port}");
    let _npd = s.npd("pi4", &["--manager", "@bob", "--manager", "@alice", "--permit-open", &permit]);
    let msg = b"across two control-plane nodes".repeat(1000);
    let forward = format!("0:localhost:{port}");

    // The same on one node first (@alice enrolled through A, like the device), for comparison.
    let started = Instant::now();
    let fwd = s.forward("pi4@alice_device", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    let one = started.elapsed();

    let started = Instant::now();
    let fwd = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    let two = started.elapsed();
    println!(
        "np forward start to first bytes back: {} ms with client and device on one node, {} ms across two nodes",
        one.as_millis(),
        two.as_millis()
    );

    let log_b = std::fs::read_to_string(b.log()).unwrap();
    assert!(log_b.contains("notification accepted"), "the request went through node B");
    let log_a = std::fs::read_to_string(s.ctl.log()).unwrap();
    assert!(log_a.contains("listening for wake-ups from other nodes"), "{log_a}");
}

/// The state column of `np devices` for `device`, as `me` (whose home points at one node).
fn device_state(home: &Path, me: &str, device: &str) -> Option<String> {
    let (ok, out, err) = np(&["devices", "--as", me, "--home", home.to_str().unwrap()]);
    assert!(ok, "np devices failed: {err}");
    let line = out.lines().find(|l| l.starts_with(device))?;
    line.split_whitespace().nth(1).map(str::to_string)
}

/// Presence crosses nodes through the presence table: a device held on node A reads live on
/// node B, and gone within a lease of node A dying (SIGKILL: nothing released).
#[test]
fn a_device_on_a_killed_node_reads_gone_on_the_other_within_seconds() {
    let Some((_pg, mut s, b)) = two_nodes() else { return };
    let bob = b.identity("@bob");
    let _npd = s.npd("pi4", &["--manager", "@bob"]);
    let held = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(s.ctl.log()).unwrap_or_default().contains("record held while this connection lasts")
    });
    assert!(held, "npd never held its record on node A");
    assert_eq!(device_state(&bob, "@bob", "pi4@alice_device").as_deref(), Some("live"), "seen from node B");

    let killed = Instant::now();
    s.ctl.kill9();
    let mut last = None;
    let gone = wait_until(Duration::from_secs(15), || {
        last = device_state(&bob, "@bob", "pi4@alice_device");
        last.as_deref() == Some("gone")
    });
    let took = killed.elapsed();
    assert!(gone, "still {last:?} 15 s after node A was killed");
    // The lease (6 s) from the last renewal (every 2 s) at most, and a poll.
    assert!(took < Duration::from_secs(9), "gone only after {took:?}");
    println!("device on a killed node read as gone on the other after {} ms", took.as_millis());
}

fn authenticated(ctl: &Control, name: &str) -> usize {
    let needle = format!("authenticated name={name} ");
    std::fs::read_to_string(ctl.log()).unwrap_or_default().matches(needle.as_str()).count()
}

/// A device that knows both nodes (`--control A,B` at enrolment) loses the node it is on to
/// SIGKILL: it reconnects to the other within 5 s, and a new session to it works there.
#[test]
fn a_device_fails_over_to_the_other_node() {
    let Some((_pg, s, b)) = two_nodes() else { return };
    let mut nodes = [s.ctl.addr.to_string(), b.addr.to_string()];
    nodes.sort();
    let both = nodes.join(",");
    let home = s.dir().join("home-pi_dev");
    let (ok, out, err) = np_keys_new(&home, "@pi_dev", &both, &s.ctl.code("@pi_dev"));
    assert!(ok, "np keys new --control {both}: {out} {err}");
    let port = echo();
    let permit = format!("localhost:{port}");
    let _npd = s.npd_as(&home, "@pi_dev", "pi4", &["--manager", "@bob", "--permit-open", &permit]);
    // It picked one node at random (its long-lived connection is the one holding its record;
    // `np keys new` authenticated at the first node too): that one dies, and the client lives
    // on the other.
    let holds = |ctl: &Control| {
        let log = std::fs::read_to_string(ctl.log()).unwrap_or_default();
        log.contains("record held while this connection lasts name=@pi_dev")
    };
    assert!(wait_until(Duration::from_secs(10), || holds(&s.ctl) || holds(&b)), "npd never held its record");
    let on_a = holds(&s.ctl);
    let (doomed, survivor) = if on_a { (s.ctl.pid(), &b) } else { (b.pid(), &s.ctl) };
    let bob = survivor.identity("@bob");
    let forward = format!("0:localhost:{port}");
    let msg = b"before and after a node dies".repeat(100);
    let fwd = s.forward_as(&bob, "@bob", "pi4@pi_dev", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    drop(fwd);

    let before = authenticated(survivor, "@pi_dev");
    let killed = Instant::now();
    let killed_ok = std::process::Command::new("kill").args(["-KILL", &doomed.to_string()]).status().unwrap();
    assert!(killed_ok.success());
    let back = wait_until(Duration::from_secs(10), || authenticated(survivor, "@pi_dev") > before);
    let took = killed.elapsed();
    assert!(
        back,
        "the device did not reconnect to the surviving node (node A killed: {on_a}): {}",
        std::fs::read_to_string(s.dir().join("npd-pi4.log")).unwrap_or_default()
    );
    assert!(took < Duration::from_secs(5), "the device reconnected only after {took:?}");
    let fwd = s.forward_as(&bob, "@bob", "pi4@pi_dev", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    println!(
        "device back on the surviving node {} ms after SIGKILL of its node (node A killed: {on_a})",
        took.as_millis()
    );
}
