//! Long-lived sessions survive idle periods: an interactive flow through `np forward`, np-relay
//! and npd stays up while idle for longer than the relay's idle timeout, because the session's
//! keepalives count as traffic; and the same idle period without keepalives in time ends it, so
//! the first test cannot pass by accident.
#![allow(clippy::unwrap_used)]

use np_tests::servers::echo;
use np_tests::stack::Stack;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Relay closes a paired session after this long with no byte either way. Short, with keepalive
/// intervals to match, so the idle periods below last under a second of real time: both tests
/// run the real binaries, whose timers read the real clock.
const RELAY_IDLE: &str = "300ms";
/// How long each test leaves the flow idle: more than twice the relay's idle timeout.
const IDLE: Duration = Duration::from_millis(700);
/// Keepalive interval that keeps the flow alive: a third of the relay's idle timeout.
const KEEPALIVE_IN_TIME: &str = "100ms";
/// Keepalive interval far longer than the idle period: nothing crosses the relay during it.
const KEEPALIVE_TOO_LATE: &str = "20s";

/// Sends `msg` on `c` and reads its echo; the error says what happened.
fn round_trip(c: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    c.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut b = vec![0u8; msg.len()];
    c.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    if b == msg {
        Ok(())
    } else {
        Err(format!("wrong echo {b:?}"))
    }
}

fn idle_flow(keepalive: &str) -> (Result<(), String>, Stack) {
    let s = Stack::start_with_relay(&["--idle-timeout", RELAY_IDLE]);
    let ep = echo();
    // Resumption off: a session the relay idled out would otherwise resume.
    let permit = format!("localhost:{ep}");
    let _npd = s.npd(
        "pi4",
        &["--manager", "@alice", "--permit-open", &permit, "--keepalive", keepalive, "--resume-window", "0"],
    );
    let f = s
        .forward(
            "pi4@alice_device",
            &[&format!("0:localhost:{ep}")],
            &["--keepalive", keepalive, "--resume-window", "0"],
        )
        .unwrap();
    let mut c = TcpStream::connect(f.addrs[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trip(&mut c, b"before the idle period").unwrap();
    let t = Instant::now();
    std::thread::sleep(IDLE);
    let after = round_trip(&mut c, b"after the idle period");
    eprintln!("keepalive {keepalive}, relay idle timeout {RELAY_IDLE}, idle {:?}: {after:?}", t.elapsed());
    (after, s)
}

#[test]
fn an_idle_flow_outlives_the_relays_idle_timeout_thanks_to_keepalives() {
    let (after, s) = idle_flow(KEEPALIVE_IN_TIME);
    assert!(after.is_ok(), "the idle flow broke: {after:?}");
    let relay_log = std::fs::read_to_string(s.relay_log()).unwrap();
    assert!(!relay_log.contains("idle timeout"), "the relay closed a session as idle despite keepalives");
}

#[test]
fn without_keepalives_in_time_the_relay_ends_the_idle_session() {
    // Nothing crosses the relay during the idle period.
    let (after, s) = idle_flow(KEEPALIVE_TOO_LATE);
    assert!(after.is_err(), "the flow survived {IDLE:?} of silence past a {RELAY_IDLE} relay idle timeout");
    let relay_log = std::fs::read_to_string(s.relay_log()).unwrap();
    assert!(relay_log.contains("idle timeout"), "the relay did not log why it closed the session");
}
