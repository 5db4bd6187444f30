//! `np relays` end to end: two real relays (one then stopped), devices that trust one or both,
//! a relay that accepts and stalls, and a relay record whose signature no longer verifies.
#![allow(clippy::unwrap_used)]

use np_control_client::ControlClient;
use np_identity::home::Home;
use np_relay::{RelayInfo, RELAY_RECORD};
use np_tests::stack::{np, Stack};
use np_tests::{bin, spawn_listening, wait_until, Proc};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts `np-relay` as `name` from `home` with `extra` flags; returns once its record is out.
fn relay(s: &Stack, home: &Path, name: &str, extra: &[&str]) -> Proc {
    let log = s.dir().join(format!("relay-{}.log", name.trim_start_matches('@')));
    let mut cmd = Command::new(bin("np-relay"));
    cmd.args(["--as", name, "--listen", "127.0.0.1:0", "--home"]).arg(home).args(extra).env("RUST_LOG", "debug");
    let (child, _) = spawn_listening(cmd, &log).expect("np-relay did not start");
    let published = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("relay record published"))
    });
    assert!(published, "{name} did not publish: {}", std::fs::read_to_string(&log).unwrap_or_default());
    Proc(child)
}

/// `np relays --as @alice`: (stdout, how long it took).
fn np_relays(s: &Stack) -> (String, Duration) {
    let t = Instant::now();
    let (ok, out, err) = np(&["relays", "--as", "@alice", "--home", s.client_home.to_str().unwrap()]);
    assert!(ok, "np relays failed: {err}");
    (out, t.elapsed())
}

fn row<'a>(out: &'a str, relay: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(&format!("{relay} "))).unwrap_or_else(|| panic!("no row for {relay}: {out}"))
}

fn has(line: &str, parts: &[&str]) -> bool {
    parts.iter().all(|p| line.contains(p))
}

#[test]
fn np_relays_shows_state_region_rtt_and_trust_and_skips_what_cannot_be_trusted() {
    let mut s = Stack::start();
    let relay2_home = s.ctl.identity("@relay2");
    let mut relay2 = relay(&s, &relay2_home, "@relay2", &["--region", "eu"]);
    s.ctl.list_relay("@relay2");
    // pi4 trusts the operator's list (both relays); nas names @relay alone.
    let _pi4 = s.npd("pi4", &["--manager", "@alice"]);
    let _nas = s.npd("nas", &["--manager", "@alice", "--relay", "@relay"]);

    let mut out = String::new();
    let both = wait_until(Duration::from_secs(10), || {
        out = np_relays(&s).0;
        row(&out, "@relay").contains("pi4@alice_device") && row(&out, "@relay").contains("nas@alice_device")
    });
    assert!(both, "devices' trust never showed: {out}");
    assert!(has(row(&out, "@relay"), &[" up ", " ms ", &s.published_relay_addr.to_string()]), "{out}");
    let r2 = row(&out, "@relay2");
    assert!(has(r2, &[" up ", " eu ", " ms ", "pi4@alice_device"]) && !r2.contains("nas@"), "{out}");

    // @relay2 stops: gone (its control connection closed) and unreachable, at once.
    let _ = relay2.0.kill();
    let _ = relay2.0.wait();
    let gone = wait_until(Duration::from_secs(5), || {
        out = np_relays(&s).0;
        has(row(&out, "@relay2"), &[" gone ", " unreachable "])
    });
    assert!(gone, "{out}");
    assert!(out.contains("@relay2: unreachable: cannot connect"), "{out}");
    assert!(has(row(&out, "@relay"), &[" up ", " ms "]), "the other relay is unaffected: {out}");

    // @relay3 publishes an address where something accepts and never speaks: unreachable
    // within the deadline, and the list still comes out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let relay3_home = s.ctl.identity("@relay3");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay3 = rt.block_on(async {
        let (c, _) = ControlClient::connect(&Home::new(&relay3_home), &"@relay3".parse().unwrap()).await.unwrap();
        let info = RelayInfo { addresses: vec![silent_addr.clone()], region: Some("us".into()) };
        c.publish(RELAY_RECORD, info.encode(), Vec::new()).await.unwrap();
        c
    });
    s.ctl.list_relay("@relay3");
    let (out, took) = np_relays(&s);
    assert!(has(row(&out, "@relay3"), &[" up ", " us ", " unreachable "]), "{out}");
    assert!(out.contains(&format!("@relay3: unreachable: no answer from {silent_addr} within")), "{out}");
    assert!(took < Duration::from_secs(3), "np relays took {took:?} with a 1 s probe deadline");
    drop(relay3);
    drop(rt);

    // The record of @relay3 altered where it is stored (another address, the signature kept),
    // as a control plane whose storage someone rewrote would serve it: it no longer verifies, so
    // it is skipped and its address never dialled.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_addr = bait.local_addr().unwrap().to_string();
    s.ctl.kill9();
    s.ctl.tamper_record("@relay3", RELAY_RECORD, |record| {
        record.value = RelayInfo { addresses: vec![bait_addr.clone()], region: Some("us".into()) }.encode();
    });
    s.ctl.restart();
    let mut out = String::new();
    let skipped = wait_until(Duration::from_secs(10), || {
        let (ok, o, _) = np(&["relays", "--as", "@alice", "--home", s.client_home.to_str().unwrap()]);
        out = o;
        ok && out.lines().any(|l| l.starts_with("@relay3 ") && l.contains(" skipped "))
    });
    assert!(skipped, "{out}");
    assert!(has(&out, &["@relay3: skipped, not trusted and not dialled", "bad signature"]), "{out}");
    assert!(bait.accept().is_err(), "the forged record's address was dialled");
    drop(silent);
}
