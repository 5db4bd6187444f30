//! Revoking an identity refuses its new sessions; a manager can have the device end live ones.
#![allow(clippy::unwrap_used)]

use np_tests::servers::echo;
use np_tests::stack::{np, Stack};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

#[test]
fn revoked_identities_start_nothing_and_their_live_sessions_can_be_ended() {
    let s = Stack::start();
    let port = echo();
    let bob = s.ctl.identity("@bob");
    let carol = s.ctl.identity("@carol");
    let _npd =
        s.npd("pi4", &["--manager", "@alice", "--manager", "@bob", "--permit-open", &format!("localhost:{port}")]);
    let f = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).unwrap();
    let mut live = TcpStream::connect(f.addrs[0]).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    live.write_all(b"one").unwrap();
    let mut b = [0u8; 3];
    live.read_exact(&mut b).unwrap();

    let out = Command::new(np_tests::bin("np-control"))
        .args(["revoke", "@bob", "--data"])
        .arg(s.ctl.data())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // No new session for @bob: it cannot even authenticate.
    let err = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).err().unwrap();
    assert!(err.contains("@bob is not enrolled"), "{err}");

    // Only a manager may end sessions.
    let (ok, _, err) = np(&[
        "end-sessions",
        "--as",
        "@carol",
        "--to",
        "pi4@alice_device",
        "--of",
        "@bob",
        "--home",
        carol.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("not a manager"), "{err}");
    // The live one still works until a manager ends it.
    live.write_all(b"two").unwrap();
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");
    let (ok, out, err) = np(&[
        "end-sessions",
        "--as",
        "@alice",
        "--to",
        "pi4@alice_device",
        "--of",
        "@bob",
        "--home",
        s.client_home.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("ended 1 session"), "{out}");
    let _ = live.write_all(b"three");
    let mut rest = Vec::new();
    let r = live.read_to_end(&mut rest);
    assert!(r.is_err() || rest.is_empty(), "data still flowed after the session was ended: {rest:?}");
}
