//! Two `np-control` nodes on one PostgreSQL database (a throwaway cluster the test starts):
//! a device connected to node A and a client connected to node B set up a session, carry
//! bytes and run `ssh`. The session request is stored by B and reaches the device at once, because B's commit
//! wakes A through LISTEN/NOTIFY.
#![allow(clippy::unwrap_used)]

use np_testpg::TempPostgres;
use np_tests::servers::echo;
use np_tests::sshd::Sshd;
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
    let (s, b) = two_nodes_on(&pg.url("postgres"));
    Some((pg, s, b))
}

/// Node A with the whole stack, and node B, both on the database at `url`.
fn two_nodes_on(url: &str) -> (Stack, Control) {
    let store = ["--store", url];
    let s = Stack::start_on(Control::start(&store), &[]);
    let b = second_node(&s.ctl, &store);
    (s, b)
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
    try_round_trip(addr, msg).unwrap()
}

fn try_round_trip(addr: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    Ok(got)
}

/// One sample's value from np-control's metrics at `addr` (`name` with its labels).
fn sample(addr: &str, name: &str) -> f64 {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')));
    line.unwrap_or_else(|| panic!("no {name} in\n{text}")).parse().unwrap()
}

#[test]
fn device_on_one_node_client_on_the_other() {
    let Some(_pg) = TempPostgres::start().unwrap() else { return };
    let url = _pg.url("postgres");
    let metrics_a = format!("127.0.0.1:{}", np_tests::free_port());
    let s = Stack::start_on(Control::start(&["--store", &url, "--metrics", &metrics_a]), &[]);
    let b = second_node(&s.ctl, &["--store", &url]);
    // @bob enrols through node B, so his home points there; the code B issues pins A's cert.
    let bob = b.identity("@bob");
    let port = echo();
    let sshd = Sshd::start();
    let permit = format!("localhost:{port},localhost:{}", sshd.port);
    let _npd = s.npd("pi4", &["--manager", "@bob", "--manager", "@alice", "--permit-open", &permit]);
    let msg = b"across two control-plane nodes".repeat(1000);
    let forward = format!("0:localhost:{port}");

    // The same on one node first (@alice enrolled through A, like the device), for comparison.
    let started = Instant::now();
    let fwd = s.forward("pi4@alice_device", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    let one = started.elapsed();

    let started = Instant::now();
    let ssh_forward = format!("0:localhost:{}", sshd.port);
    let fwd = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&forward, &ssh_forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    let two = started.elapsed();
    // And a real ssh session through it: the client's node and the device's node differ.
    let out = sshd.ssh(fwd.addrs[1].port(), "echo ok-across-nodes");
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok-across-nodes");
    println!(
        "np forward start to first bytes back: {} ms with client and device on one node, {} ms across two nodes",
        one.as_millis(),
        two.as_millis()
    );

    let log_b = std::fs::read_to_string(b.log()).unwrap();
    assert!(log_b.contains("notification accepted"), "the request went through node B");
    let log_a = std::fs::read_to_string(s.ctl.log()).unwrap();
    assert!(log_a.contains("listening for wake-ups from other nodes"), "{log_a}");

    // Node A's store metrics: its pool, its operations, and the wake-up from B, with its lag.
    assert_eq!(sample(&metrics_a, "np_control_store_connections{state=\"max\"}"), 16.0);
    assert!(sample(&metrics_a, "np_control_store_operation_seconds_count") > 0.0);
    let wakes = sample(&metrics_a, "np_control_store_wake_lag_seconds_count");
    assert!(wakes >= 1.0, "node A was woken by node B");
    let lag_ms = sample(&metrics_a, "np_control_store_wake_lag_seconds_sum") / wakes * 1000.0;
    println!("wake-ups from node B to node A: {wakes}, {lag_ms:.1} ms on average from NOTIFY to LISTEN");
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

    // Node A back (same address): the device, which knows only A, reconnects there and reads
    // live on B again.
    s.ctl.restart();
    let back = wait_until(Duration::from_secs(15), || {
        last = device_state(&bob, "@bob", "pi4@alice_device");
        last.as_deref() == Some("live")
    });
    assert!(back, "still {last:?} on node B 15 s after node A came back");
}

fn sigkill(pid: u32) {
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success(), "kill -KILL {pid}");
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
    sigkill(doomed);
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
    // It reconnected within the dead node's lease, so the survivor never reads it gone: it is
    // live there, held by the survivor itself once the dead node's lease runs out.
    assert_eq!(device_state(&bob, "@bob", "pi4@pi_dev").as_deref(), Some("live"));
    println!(
        "device back on the surviving node {} ms after SIGKILL of its node (node A killed: {on_a})",
        took.as_millis()
    );
}

/// PostgreSQL's own HA: both nodes are given the primary and its standby in one URL with
/// `target_session_attrs=read-write`. The primary dies (`-m immediate`, as a crash) and the
/// standby is promoted: the nodes drop their broken connections, connect to the new primary
/// (and listen there for wake-ups), and a new session (device on A, client on B) works within
/// 10 s of the kill.
#[test]
fn the_nodes_follow_a_promoted_standby() {
    let Some(mut primary) = TempPostgres::start().unwrap() else { return };
    let mut standby = primary.standby().unwrap();
    let (s, b) = two_nodes_on(&TempPostgres::url_of_any(&[&primary, &standby], "postgres"));
    let bob = b.identity("@bob");
    let port = echo();
    let permit = format!("localhost:{port}");
    let _npd = s.npd("pi4", &["--manager", "@bob", "--permit-open", &permit]);
    let forward = format!("0:localhost:{port}");
    let msg = b"before and after the database fails over".repeat(100);
    let fwd = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&forward], &[]).unwrap();
    assert_eq!(round_trip(fwd.addrs[0], &msg), msg);
    drop(fwd);

    // Replication is asynchronous: the enrolments and the device's record must be on the
    // standby before the primary dies, or they are lost with it (see the README).
    let lsn = primary.current_lsn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || standby.caught_up(&lsn).unwrap()), "the standby never caught up");

    let killed = Instant::now();
    primary.stop().unwrap();
    standby.promote().unwrap();
    let promoted = killed.elapsed();
    let mut tries = 0;
    let mut last = String::new();
    let works = wait_until(Duration::from_secs(10), || {
        tries += 1;
        let fwd = match s.forward_as(&bob, "@bob", "pi4@alice_device", &[&forward], &[]) {
            Ok(f) => f,
            Err(e) => {
                last = e;
                return false;
            }
        };
        match try_round_trip(fwd.addrs[0], &msg) {
            Ok(got) => got == msg,
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    let took = killed.elapsed();
    assert!(works, "no session 10 s after the primary died (last error: {last})");
    assert!(took < Duration::from_secs(10), "a session worked only {took:?} after the primary died");
    println!(
        "new session across two nodes {} ms after the PostgreSQL primary died (standby promoted after {} ms; {tries} tries)",
        took.as_millis(),
        promoted.as_millis()
    );
    let log_a = std::fs::read_to_string(s.ctl.log()).unwrap();
    assert!(
        log_a.matches("listening for wake-ups from other nodes").count() >= 2,
        "node A listens again, on the new primary: {log_a}"
    );
}

/// One enrolment code redeemed at both nodes at the same instant (two `np keys new`, each at
/// its own node, released together): exactly one enrols, the other is told the code is used
/// (or the name taken) and keeps no keys. A few rounds, so the two really overlap.
#[test]
fn one_code_redeemed_at_both_nodes_at_once_enrols_once() {
    let Some((_pg, s, b)) = two_nodes() else { return };
    for round in 0..4 {
        let name = format!("@racer{round}");
        let code = s.ctl.code(&name);
        let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
        let runs: Vec<_> = [s.ctl.addr, b.addr]
            .into_iter()
            .enumerate()
            .map(|(i, node)| {
                let (gate, name, code) = (gate.clone(), name.clone(), code.clone());
                let home = s.dir().join(format!("home-{round}-{i}"));
                std::thread::spawn(move || {
                    gate.wait();
                    let (ok, _, err) = np_keys_new(&home, &name, &node.to_string(), &code);
                    (ok, err, home)
                })
            })
            .collect();
        let results: Vec<(bool, String, std::path::PathBuf)> = runs.into_iter().map(|r| r.join().unwrap()).collect();
        let won: Vec<_> = results.iter().filter(|r| r.0).collect();
        assert_eq!(won.len(), 1, "round {round}: not exactly one enrolment: {results:?}");
        let lost = results.iter().find(|r| !r.0).unwrap();
        assert!(
            lost.1.contains("already used") || lost.1.contains("already enrolled"),
            "round {round}: the loser's error: {}",
            lost.1
        );
        assert!(np_identity::home::Home::new(&lost.2).identities().is_empty(), "round {round}: the loser kept keys");
        let (ok, _, err) = np(&["devices", "--as", &name, "--home", won[0].2.to_str().unwrap()]);
        assert!(ok, "round {round}: the winner cannot use its identity: {err}");
    }
}

/// A stream of notifications from a sender on one node to a recipient on the other, and the
/// recipient's node dies (SIGKILL) in the middle of it: the recipient fails over to the
/// surviving node, and every notification the sender had acknowledged reaches the application
/// exactly once (the ones pushed but not yet acknowledged when the node died come again from
/// the table, and the client drops them by sequence number).
#[tokio::test(flavor = "multi_thread")]
async fn notifications_in_flight_when_a_node_dies_arrive_once() {
    use np_control_client::ControlClient;
    use np_identity::home::Home;
    let Some((_pg, s, b)) = two_nodes() else { return };
    let mut nodes = [s.ctl.addr.to_string(), b.addr.to_string()];
    nodes.sort();
    let home = s.dir().join("home-carol");
    let (ok, out, err) = np_keys_new(&home, "@carol", &nodes.join(","), &s.ctl.code("@carol"));
    assert!(ok, "np keys new: {out} {err}");
    let before = [authenticated(&s.ctl, "@carol"), authenticated(&b, "@carol")];
    let (_carol, mut inbox) = ControlClient::connect(&Home::new(&home), &"@carol".parse().unwrap()).await.unwrap();
    let on_a = wait_until(Duration::from_secs(5), || {
        authenticated(&s.ctl, "@carol") > before[0] || authenticated(&b, "@carol") > before[1]
    }) && authenticated(&s.ctl, "@carol") > before[0];
    let (doomed, survivor) = if on_a { (s.ctl.pid(), &b) } else { (b.pid(), &s.ctl) };
    let dave_home = survivor.identity("@dave");
    let (dave, _dave_inbox) = ControlClient::connect(&Home::new(&dave_home), &"@dave".parse().unwrap()).await.unwrap();

    const SENT: usize = 200;
    let carol: np_identity::Name = "@carol".parse().unwrap();
    let sender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..SENT {
            if dave.send(&carol, format!("n{i}").as_bytes(), Duration::from_secs(600)).await.is_ok() {
                acked.push(format!("n{i}"));
            }
        }
        acked
    });
    let mut got: Vec<String> = Vec::new();
    while got.len() < 40 {
        let m = tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.unwrap().unwrap();
        got.push(String::from_utf8(m.payload).unwrap());
    }
    let killed = Instant::now();
    sigkill(doomed);
    let at_kill = got.len();
    let acked = sender.await.unwrap();
    let sent_all = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !acked.iter().all(|a| got.contains(a)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, inbox.recv()).await {
            Ok(Some(m)) => got.push(String::from_utf8(m.payload).unwrap()),
            _ => break,
        }
    }
    let took = killed.elapsed();
    let missing: Vec<_> = acked.iter().filter(|a| !got.contains(a)).collect();
    assert!(missing.is_empty(), "{} acknowledged notifications never arrived: {missing:?}", missing.len());
    // Anything still on its way now would be a duplicate.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await {
        got.push(String::from_utf8(m.payload).unwrap());
    }
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "delivered twice to the application");
    println!(
        "{} of {SENT} notifications acknowledged, {at_kill} delivered before the recipient's node died \
         (node A: {on_a}); the sender done {} ms and all delivered once {} ms after the kill",
        acked.len(),
        sent_all.as_millis(),
        took.as_millis()
    );
}
