//! Refusals are clear and quick, not timeouts.
#![allow(clippy::unwrap_used)]

use np_tests::servers::echo;
use np_tests::stack::Stack;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn refused_quickly(r: Result<np_tests::stack::Forward, String>, t: Instant, expect: &str) {
    let err = match r {
        Ok(_) => panic!("expected a refusal containing {expect:?}"),
        Err(e) => e,
    };
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(t.elapsed() < Duration::from_secs(4), "refusal took {:?}", t.elapsed());
}

#[test]
fn unpermitted_identity_target_and_unknown_device_are_refused_at_once() {
    let s = Stack::start();
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);

    // An identity that is not a manager.
    let mallory = s.ctl.identity("@mallory");
    let t = Instant::now();
    let r = s.forward_as(&mallory, "@mallory", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]);
    refused_quickly(r, t, "@mallory is not permitted to connect to pi4@alice_device");

    // Targets outside permit-open, including other spellings of the same machine.
    for target in [
        format!("localhost:{}", port + 1),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::1]:{port}"),
        format!("127.1:{port}"),
    ] {
        let t = Instant::now();
        let r = s.forward("pi4@alice_device", &[&format!("0:{target}")], &[]);
        refused_quickly(r, t, "is not in the device's permit-open list");
    }

    // A device name nobody runs.
    let t = Instant::now();
    let r = s.forward("nosuch@alice_device", &[&format!("0:localhost:{port}")], &[]);
    refused_quickly(r, t, "no device named nosuch under @alice_device");

    // An identity nobody enrolled.
    let t = Instant::now();
    let r = s.forward("pi4@nobody_here", &[&format!("0:localhost:{port}")], &[]);
    refused_quickly(r, t, "@nobody_here is not enrolled");

    // The permitted target works.
    let f = s.forward("pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).unwrap();
    let mut c = TcpStream::connect(f.addrs[0]).unwrap();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

#[test]
fn an_offline_device_gives_a_clear_timeout() {
    let s = Stack::start();
    // @alice_device is enrolled but no npd runs.
    let t = Instant::now();
    let r = s.forward("pi4@alice_device", &["0:localhost:22"], &["--timeout", "2s"]);
    let err = r.err().unwrap();
    assert!(err.contains("did not answer within 2s") && err.contains("npd running"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn policy_decides_for_non_managers() {
    let s = Stack::start();
    let port = echo();
    let pol_home = s.ctl.identity("@policy");
    let bob = s.ctl.identity("@bob");
    let carol = s.ctl.identity("@carol");
    let file = s.dir().join("policy.toml");
    std::fs::write(
        &file,
        format!("[[rule]]\nidentities = [\"@bob\"]\ndevices = [\"*@alice_device\"]\npermit = [\"localhost:{port}\"]\n"),
    )
    .unwrap();
    let _pol = np_tests::Proc(
        std::process::Command::new(np_tests::bin("np"))
            .args(["policy", "serve", "--as", "@policy", "--file"])
            .arg(&file)
            .arg("--home")
            .arg(&pol_home)
            .stderr(std::fs::File::create(s.dir().join("policy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let _npd = s.npd(
        "pi4",
        &["--manager", "@alice", "--policy", "@policy", "--permit-open", &format!("localhost:{port},localhost:22")],
    );

    // Bob is allowed by the policy, to the port it names.
    let f = s.forward_as(&bob, "@bob", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).unwrap();
    let mut c = TcpStream::connect(f.addrs[0]).unwrap();
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    // ... but not to what the policy does not name, even though the device permits it.
    let t = Instant::now();
    let r = s.forward_as(&bob, "@bob", "pi4@alice_device", &["0:localhost:22"], &[]);
    refused_quickly(r, t, "not permitted for you by the policy");
    // Carol: the policy says no.
    let t = Instant::now();
    let r = s.forward_as(&carol, "@carol", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]);
    refused_quickly(r, t, "does not permit @carol");
}

#[test]
fn a_bad_policy_file_names_the_line() {
    let s = Stack::start();
    let pol_home = s.ctl.identity("@policy");
    let file = s.dir().join("bad.toml");
    std::fs::write(&file, "[[rule]]\nidentities = [\"@bob\"]\ndevices = [\"*\"]\npermit = [\"nonsense\"]\n").unwrap();
    let (ok, _, err) = np_tests::stack::np(&[
        "policy",
        "serve",
        "--as",
        "@policy",
        "--file",
        file.to_str().unwrap(),
        "--home",
        pol_home.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("nonsense"), "{err}");
    std::fs::write(&file, "[[rule]]\nidentities = [\"@bob\"]\ndevice = []\n").unwrap();
    let (ok, _, err) = np_tests::stack::np(&[
        "policy",
        "serve",
        "--as",
        "@policy",
        "--file",
        file.to_str().unwrap(),
        "--home",
        pol_home.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("line 3"), "{err}");
}
