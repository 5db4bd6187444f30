//! Enrolment and authentication against the real `np-control` and `np` binaries.
#![allow(clippy::unwrap_used)]

use np_control_proto::{auth_transcript, ClientFrame, EnrolCode, ErrorCode, Reply, Request, ServerFrame};
use np_identity::home::Home;
use np_identity::Name;
use np_tests::raw::{pin_of, RawConn};
use np_tests::{np_keys_new, Control};

#[test]
fn a_code_works_once_and_bad_codes_are_refused_clearly() {
    let ctl = Control::start(&[]);
    let addr = ctl.addr.to_string();
    let t = tempfile::tempdir().unwrap();
    let code = ctl.code("@alice");
    // The code alone is on stdout, so scripts can capture it.
    assert!(code.parse::<EnrolCode>().is_ok(), "stdout was {code:?}");

    let (ok, out, err) = np_keys_new(&t.path().join("a"), "@alice", &addr, &code);
    assert!(ok, "{out}{err}");
    assert!(out.contains("enrolled @alice"), "{out}");

    // Reused.
    let (ok, _, err) = np_keys_new(&t.path().join("b"), "@alice", &addr, &code);
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");
    // A failed enrolment leaves no half-made identity behind, so it can be retried.
    assert!(Home::new(t.path().join("b")).identities().is_empty());

    // Wrong (well-formed, unknown) code.
    let mut wrong: EnrolCode = code.parse().unwrap();
    wrong.secret[0] ^= 1;
    let (ok, _, err) = np_keys_new(&t.path().join("c"), "@carol", &addr, &wrong.to_string());
    assert!(!ok);
    assert!(err.contains("unknown enrolment code"), "{err}");

    // Not a code at all.
    let (ok, _, err) = np_keys_new(&t.path().join("c"), "@carol", &addr, "hello");
    assert!(!ok);
    assert!(err.contains("not an enrolment code"), "{err}");

    // A code for another name.
    let code_d = ctl.code("@dave");
    let (ok, _, err) = np_keys_new(&t.path().join("c"), "@carol", &addr, &code_d);
    assert!(!ok);
    assert!(err.contains("issued for @dave"), "{err}");

    // Expired.
    let (ok, short, err) = ctl.enroll_code("@erin", &["--ttl", "1s"]);
    assert!(ok, "{err}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (ok, _, err) = np_keys_new(&t.path().join("e"), "@erin", &addr, &short);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");

    // A taken name cannot get a code, nor be enrolled again.
    let (ok, _, err) = ctl.enroll_code("@alice", &[]);
    assert!(!ok);
    assert!(err.contains("already enrolled"), "{err}");

    // A code whose certificate pin does not match the server: refused before anything is sent.
    let mut badpin: EnrolCode = code_d.parse().unwrap();
    badpin.cert_sha256[0] ^= 1;
    let (ok, _, err) = np_keys_new(&t.path().join("d"), "@dave", &addr, &badpin.to_string());
    assert!(!ok);
    assert!(err.contains("certificate does not match"), "{err}");
    // ... and the real code still works afterwards.
    let (ok, out, err) = np_keys_new(&t.path().join("d"), "@dave", &addr, &code_d);
    assert!(ok, "{out}{err}");
}

#[test]
fn enrol_works_while_the_server_is_stopped_too() {
    let mut ctl = Control::start(&[]);
    ctl.kill9();
    let (ok, code, err) = ctl.enroll_code("@zed", &[]);
    assert!(ok, "{err}");
    ctl.restart();
    let home = ctl.dir.path().join("zed");
    let (ok, out, err) = np_keys_new(&home, "@zed", &ctl.addr.to_string(), &code);
    assert!(ok, "{out}{err}");
}

#[test]
fn private_keys_are_private_and_only_public_halves_reach_the_server() {
    let ctl = Control::start(&[]);
    let home = ctl.identity("@alice");
    use std::os::unix::fs::PermissionsExt;
    for f in ["signing.key", "x25519.key"] {
        let m = std::fs::metadata(home.join("alice").join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600, "{f}");
        let secret = std::fs::read_to_string(home.join("alice").join(f)).unwrap();
        let raw = hex_decode(secret.trim());
        assert!(ctl.find_stored(&raw).is_none(), "{f} found in the server's data");
        assert!(ctl.find_stored(secret.trim().as_bytes()).is_none());
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

async fn auth_reply(conn: &mut RawConn, req: Request) -> Result<Reply, (ErrorCode, String)> {
    conn.send(&ClientFrame { id: 7, req }).await.unwrap();
    match conn.recv().await.unwrap() {
        Some(ServerFrame::Reply { id: 7, result }) => result.map_err(|e| (e.code, e.message)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_key_replayed_signature_and_unknown_identity_are_refused() {
    let ctl = Control::start(&[]);
    let home = ctl.identity("@alice");
    let pin = pin_of(&home, "@alice");
    let alice: Name = "@alice".parse().unwrap();
    let keys = Home::new(&home).load_keys(&alice).unwrap();

    // The right key on a fresh nonce works.
    let mut c1 = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let sig1 = keys.sign(&auth_transcript(&c1.nonce, &alice)).to_vec();
    let r = auth_reply(&mut c1, Request::Auth { name: alice.clone(), sig: sig1.clone() }).await;
    assert_eq!(r, Ok(Reply::Authenticated { name: alice.clone() }));

    // The same signature replayed on another connection: its nonce differs, so it fails.
    let mut c2 = RawConn::connect(ctl.addr, &pin).await.unwrap();
    assert_ne!(c1.nonce, c2.nonce);
    let r = auth_reply(&mut c2, Request::Auth { name: alice.clone(), sig: sig1 }).await;
    assert_eq!(r.map_err(|e| e.0), Err(ErrorCode::BadSignature));
    // ... and the connection is closed afterwards.
    assert!(c2.recv().await.map(|f| f.is_none()).unwrap_or(true));

    // A different key claiming to be @alice.
    let mallory = np_identity::Keys::generate().unwrap();
    let mut c3 = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let sig = mallory.sign(&auth_transcript(&c3.nonce, &alice)).to_vec();
    let r = auth_reply(&mut c3, Request::Auth { name: alice.clone(), sig }).await;
    assert_eq!(r.map_err(|e| e.0), Err(ErrorCode::BadSignature));

    // An identity nobody enrolled.
    let ghost: Name = "@ghost".parse().unwrap();
    let mut c4 = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let sig = mallory.sign(&auth_transcript(&c4.nonce, &ghost)).to_vec();
    let r = auth_reply(&mut c4, Request::Auth { name: ghost, sig }).await;
    let (code, msg) = r.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownIdentity);
    assert!(msg.contains("not enrolled"), "{msg}");

    // Anything but Auth/Enroll first is refused.
    let mut c5 = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let r = auth_reply(&mut c5, Request::Lookup { name: alice.clone() }).await;
    assert_eq!(r.map_err(|e| e.0), Err(ErrorCode::NotAuthenticated));

    // The library client reports a wrong key clearly: swap @alice's keys for new ones.
    let other = tempfile::tempdir().unwrap();
    let oh = Home::new(other.path());
    oh.create_keys(&alice).unwrap();
    oh.save_control(&alice, &Home::new(&home).load_control(&alice).unwrap()).unwrap();
    let err = np_control_client::ControlClient::connect(&oh, &alice).await.err().unwrap();
    assert!(err.to_string().contains("signature does not verify"), "{err}");
}
