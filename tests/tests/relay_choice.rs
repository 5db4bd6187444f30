//! Choosing a relay and failing over, with `np forward` and no `--relay`: two relays besides
//! the stack's, one of them behind a delaying proxy; a device that trusts both, and one that
//! trusts only the faster. (Real binaries on loopback; the delay is a real proxy.)
#![allow(clippy::unwrap_used)]

use np_tests::impair::DelayProxy;
use np_tests::netns::echo_in;
use np_tests::stack::{np, Stack};
use np_tests::{bin, wait_until, Proc};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `np-relay` as `name` on a free port; with `delay`, published at a delaying proxy in front
/// of it. Returns once its record is out. A port found free can be taken by a test running
/// beside this one before the relay binds it: then it tries another.
fn relay(s: &Stack, home: &Path, name: &str, delay: Option<Duration>) -> (Proc, Option<DelayProxy>) {
    let log = s.dir().join(format!("relay-{}.log", name.trim_start_matches('@')));
    for _ in 0..5 {
        let port = free_port();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let proxy = delay.map(|d| DelayProxy::start("", "127.0.0.1:0".parse().unwrap(), listen, d));
        let advertise = proxy.as_ref().map_or(listen, |p| p.addr);
        let mut child = Command::new(bin("np-relay"))
            .args(["--as", name, "--listen", &listen.to_string(), "--advertise", &advertise.to_string()])
            .arg("--home")
            .arg(home)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let text = || std::fs::read_to_string(&log).unwrap_or_default();
        let published = wait_until(Duration::from_secs(10), || {
            text().contains("relay record published") || text().contains("Address already in use")
        });
        if published && text().contains("relay record published") {
            return (Proc(child), proxy);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(text().contains("Address already in use"), "{name} did not publish: {}", text());
    }
    panic!("{name}: no free port in five tries");
}

fn echo(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    Ok(back)
}

#[test]
fn the_faster_trusted_relay_is_chosen_and_a_dead_one_is_left_within_two_seconds() {
    let s = Stack::start();
    // @relay_a is slow (50 ms each way through a delaying proxy), @relay_b direct. By name
    // alone @relay_a would come first.
    let a_home = s.ctl.identity("@relay_a");
    let (_a, proxy) = relay(&s, &a_home, "@relay_a", Some(Duration::from_millis(50)));
    let proxy = proxy.unwrap();
    s.ctl.list_relay("@relay_a");
    let b_home = s.ctl.identity("@relay_b");
    let (mut b, _) = relay(&s, &b_home, "@relay_b", None);
    s.ctl.list_relay("@relay_b");

    let port = echo_in("", Ipv4Addr::LOCALHOST);
    let permit = format!("localhost:{port}");
    // pi4 trusts both new relays (not the stack's @relay); nas trusts @relay_b alone.
    let _pi4 =
        s.npd("pi4", &["--manager", "@alice", "--relay", "@relay_a", "--relay", "@relay_b", "--permit-open", &permit]);
    let _nas = s.npd("nas", &["--manager", "@alice", "--relay", "@relay_b", "--permit-open", &permit]);
    // Their trust records are out once `np relays` shows them.
    let mut out = String::new();
    let trust_known = wait_until(Duration::from_secs(10), || {
        let (_, o, _) = np(&["relays", "--as", "@alice", "--home", s.client_home.to_str().unwrap()]);
        out = o;
        out.lines()
            .any(|l| l.starts_with("@relay_b ") && l.contains("pi4@alice_device") && l.contains("nas@alice_device"))
    });
    assert!(trust_known, "{out}");

    // The faster one is chosen, and -v says so.
    let target = format!("0:localhost:{port}");
    let probed = proxy.conns.load(std::sync::atomic::Ordering::SeqCst);
    let fwd = s.forward_via(&s.client_home, "@alice", "pi4@alice_device", None, &[&target], &["-v"]).unwrap();
    assert_eq!(echo(fwd.addrs[0], b"first").unwrap(), b"first");
    let log = std::fs::read_to_string(s.dir().join("forward.log")).unwrap();
    assert!(log.contains("relay for pi4@alice_device: @relay_b"), "{log}");
    assert_eq!(proxy.conns.load(std::sync::atomic::Ordering::SeqCst), probed + 1, "@relay_a was probed once, not used");

    // @relay_b dies: the next connection goes through @relay_a, within 2 s, with no command.
    let _ = b.0.kill();
    let _ = b.0.wait();
    let killed = Instant::now();
    let mut last = None;
    while killed.elapsed() < Duration::from_secs(5) {
        match echo(fwd.addrs[0], b"after") {
            Ok(back) if back == b"after" => break,
            other => last = Some(format!("{other:?}")),
        }
    }
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(2), "failover took {took:?} (last: {last:?})");
    eprintln!("first byte through the other relay {took:?} after the relay in use died");
    assert!(
        proxy.conns.load(std::sync::atomic::Ordering::SeqCst) >= probed + 2,
        "the session now runs through @relay_a"
    );

    // nas trusts only @relay_b: it is never sent through @relay_a; its flows fail instead.
    // forward.log is shared: only what this np forward adds counts.
    let seen = std::fs::read_to_string(s.dir().join("forward.log")).unwrap_or_default().len();
    if let Ok(nas) = s.forward_via(&s.client_home, "@alice", "nas@alice_device", None, &[&target], &["-v"]) {
        assert!(echo(nas.addrs[0], b"nas").is_err(), "a flow to nas got through");
    }
    let log = std::fs::read_to_string(s.dir().join("forward.log")).unwrap_or_default();
    let log = log.get(seen..).unwrap_or_default();
    // Probed like every listed relay, but never asked for: no session through it.
    assert!(log.contains("relay for nas@alice_device: @relay_b"), "{log}");
    assert!(!log.contains("found relay @relay_a"), "{log}");
}

/// Publishes `info` as `name`'s relay record, signed with its own keys, and lists it.
fn publish_relay(s: &Stack, name: &str, info: np_relay::RelayInfo) {
    let home = s.ctl.identity(name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (c, _) =
            np_control_client::ControlClient::connect(&np_identity::home::Home::new(&home), &name.parse().unwrap())
                .await
                .unwrap();
        c.publish(np_relay::RELAY_RECORD, info.encode(), Vec::new()).await.unwrap();
    });
    s.ctl.list_relay(name);
}

#[test]
fn relays_that_stall_answer_garbage_or_fail_their_signature_are_skipped_for_the_next() {
    let mut s = Stack::start();
    // Accepts and never speaks; accepts and answers garbage.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage = TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage_addr = garbage.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut c in garbage.incoming().flatten() {
            let _ = c.write_all(&[0xff; 512]);
        }
    });
    let info = |addr: String| np_relay::RelayInfo { addresses: vec![addr], region: None };
    publish_relay(&s, "@relay_stall", info(silent.local_addr().unwrap().to_string()));
    publish_relay(&s, "@relay_garbage", info(garbage_addr));
    // A record altered where it is stored (the signature kept): it no longer verifies.
    let bait = TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    publish_relay(&s, "@relay_forged", info("127.0.0.1:9".into()));
    s.ctl.kill9();
    s.ctl.tamper_record("@relay_forged", np_relay::RELAY_RECORD, |record| {
        record.value = info(bait.local_addr().unwrap().to_string()).encode();
    });
    s.ctl.restart();

    let port = echo_in("", Ipv4Addr::LOCALHOST);
    let _pi4 = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let started = Instant::now();
    let fwd =
        s.forward_via(&s.client_home, "@alice", "pi4@alice_device", None, &[&format!("0:localhost:{port}")], &["-v"]);
    let fwd = fwd.unwrap_or_else(|log| panic!("np forward failed: {log}"));
    assert_eq!(echo(fwd.addrs[0], b"through the good one").unwrap(), b"through the good one");
    let took = started.elapsed();
    let log = std::fs::read_to_string(s.dir().join("forward.log")).unwrap();
    assert!(log.contains("relay for pi4@alice_device: @relay "), "{log}");
    for bad in ["@relay_stall", "@relay_garbage", "@relay_forged"] {
        assert!(
            log.lines().any(|l| l.contains("skipped") && l.contains(&format!("relay={bad}"))),
            "no line says {bad} was skipped:\n{log}"
        );
    }
    assert!(bait.accept().is_err(), "the forged record's address was dialled");
    // The stalled relay's 1 s probe deadline is not waited for once the good one has answered.
    assert!(took < Duration::from_millis(900), "the first byte took {took:?} with three bad relays listed");
    eprintln!("first byte through the one good relay of four in {took:?}");
}
