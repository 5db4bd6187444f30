//! `np doctor` against a healthy loopback deployment, then against each broken piece: it must
//! name the piece with FAIL, say what to do, and exit non-zero.
#![allow(clippy::unwrap_used)]

use np_tests::stack::Stack;
use np_tests::{bin, wait_until};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

struct Outcome {
    ok: bool,
    out: String,
    err: String,
}

impl Outcome {
    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.out.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// The FAIL line containing `needle`, with the fix on the line after it.
    fn fail(&self, needle: &str) -> (String, String) {
        let lines: Vec<&str> = self.out.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with("FAIL") && l.contains(needle))
            .unwrap_or_else(|| panic!("no FAIL line with {needle:?}:\n{}\n{}", self.out, self.err));
        let fix = lines.get(i + 1).copied().unwrap_or_default();
        assert!(fix.trim_start().starts_with("->"), "a FAIL is followed by what to do:\n{}", self.out);
        (lines[i].to_string(), fix.to_string())
    }

    fn assert_failed(&self) {
        assert!(!self.ok, "doctor must exit non-zero when a check fails:\n{}", self.out);
        assert!(self.err.contains("check(s) failed"), "{}", self.err);
    }
}

fn doctor(s: &Stack, home: &Path, device: &str) -> Outcome {
    let _ = s;
    let out = Command::new(bin("np"))
        .args(["doctor", "--as", "@alice", "--relay", "@relay", "--device", device, "--home"])
        .arg(home)
        .output()
        .unwrap();
    Outcome {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn healthy(s: &Stack) {
    let o = doctor(s, &s.client_home, "pi4@alice_device");
    assert!(o.ok, "healthy setup: {}\n{}", o.out, o.err);
    assert!(o.lines("FAIL").is_empty() && o.lines("skip").is_empty(), "{}", o.out);
    for needle in [
        "@alice: keys in",
        "control plane 127.0.0.1",
        "certificate matches the pin",
        "authenticated as @alice",
        "control-plane store (",
        "relay @relay reachable at 127.0.0.1:",
        "and proves its identity",
        "device pi4@alice_device live",
        "permit-open of pi4@alice_device: localhost:22",
    ] {
        assert!(o.lines("ok").iter().any(|l| l.contains(needle)), "no ok line with {needle:?}:\n{}", o.out);
    }
}

#[test]
fn healthy_then_unknown_and_gone_devices() {
    let s = Stack::start();
    let mut npd = s.npd("pi4", &["--manager", "@alice", "--heartbeat", "1s"]);
    healthy(&s);

    let o = doctor(&s, &s.client_home, "nope@alice_device");
    o.assert_failed();
    let (line, fix) = o.fail("nope@alice_device unknown");
    assert!(fix.contains("npd --as @alice_device --device nope --manager @alice"), "{line}\n{fix}");
    assert!(o.lines("ok").iter().any(|l| l.contains("authenticated as @alice")), "the rest still checked:\n{}", o.out);

    let o = doctor(&s, &s.client_home, "pi4@nobody");
    o.assert_failed();
    o.fail("@nobody is not enrolled");

    // Device not running: killed, its heartbeat goes stale (three beats).
    let _ = npd.0.kill();
    let _ = npd.0.wait();
    let gone = wait_until(Duration::from_secs(15), || !doctor(&s, &s.client_home, "pi4@alice_device").ok);
    assert!(gone, "the killed device must be reported gone");
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("pi4@alice_device gone");
    assert!(fix.contains("start npd"), "{fix}");
}

#[test]
fn broken_keys_pin_and_control_plane() {
    let mut s = Stack::start();
    let _npd = s.npd("pi4", &["--manager", "@alice"]);
    healthy(&s);
    let id = s.client_home.join("alice");

    // A private key readable by others.
    let key = id.join("signing.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("mode 0644, not 0600");
    assert!(fix.contains(&format!("chmod 600 {}", key.display())), "{fix}");
    assert!(o.lines("skip").iter().any(|l| l.contains("control plane")), "{}", o.out);
    // The relay is found through the control plane, which needs the keys.
    assert!(o.lines("skip").iter().any(|l| l.contains("relay @relay (needs the control plane)")), "{}", o.out);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A private key missing.
    let x = id.join("x25519.key");
    let saved = std::fs::read(&x).unwrap();
    std::fs::remove_file(&x).unwrap();
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    o.fail("x25519.key is missing");
    std::fs::write(&x, saved).unwrap();
    std::fs::set_permissions(&x, std::fs::Permissions::from_mode(0o600)).unwrap();

    // No home at all.
    let o = doctor(&s, &s.dir().join("no-such-home"), "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("does not exist");
    assert!(fix.contains("np keys new"), "{fix}");

    healthy(&s);

    // A pin that does not match the server's certificate.
    let control = id.join("control.toml");
    let original = std::fs::read_to_string(&control).unwrap();
    let pin = original.lines().find_map(|l| l.strip_prefix("cert_sha256 = ")).unwrap().trim_matches('"').to_string();
    let wrong: String = pin.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    std::fs::write(&control, original.replace(&pin, &wrong)).unwrap();
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("certificate does not match the pin");
    assert!(fix.contains("enrol again"), "{fix}");
    assert!(o.lines("ok").iter().any(|l| l.contains("reachable")), "reachable, but not pinned:\n{}", o.out);
    std::fs::write(&control, &original).unwrap();
    healthy(&s);

    // The control plane down.
    s.ctl.kill9();
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("unreachable");
    assert!(fix.contains("np-control is running"), "{fix}");
    assert!(o.lines("skip").iter().any(|l| l.contains("device pi4@alice_device")), "{}", o.out);
}

#[test]
fn relay_down_and_not_a_relay() {
    let mut s = Stack::start();
    let _npd = s.npd("pi4", &["--manager", "@alice"]);
    healthy(&s);
    s.relay = None;
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (_, fix) = o.fail("relay @relay unreachable at 127.0.0.1");
    assert!(fix.contains("np-relay is running"), "{fix}");
    assert_eq!(o.lines("FAIL").len(), 1, "only the relay is broken:\n{}", o.out);

    // Something else at the address: it answers, but not as a relay.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in other.incoming().flatten() {
            let mut c = c;
            let _ = std::io::Write::write_all(&mut c, b"SSH-2.0-OpenSSH_9.2\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // A relay identity whose record points there.
    let home2 = s.ctl.identity("@relay2");
    let mut cmd = Command::new(bin("np-relay"));
    cmd.args(["--as", "@relay2", "--listen", "127.0.0.1:0", "--advertise", &addr.to_string(), "--home"]).arg(&home2);
    let log = s.dir().join("relay2.log");
    let (child, _) = np_tests::spawn_listening(cmd, &log).expect("np-relay @relay2 did not start");
    let _relay2 = np_tests::Proc(child);
    assert!(np_tests::wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
        .is_ok_and(|l| l.contains("relay record published"))));
    let out = Command::new(bin("np"))
        .args(["doctor", "--as", "@alice", "--relay", "@relay2", "--home"])
        .arg(&s.client_home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("FAIL") && l.contains("answered, but")), "{text}");
}

/// On PostgreSQL, doctor names the store and says it answers; with the database down, the
/// control plane cannot authenticate anyone, and doctor says that its store is the cause.
#[test]
fn the_control_planes_store_on_postgresql() {
    let Some(mut pg) = np_testpg::TempPostgres::start().unwrap() else { return };
    let url = pg.url("postgres");
    let s = Stack::start_on(np_tests::Control::start(&["--store", &url]), &[]);
    let _npd = s.npd("pi4", &["--manager", "@alice"]);
    let seen = wait_until(Duration::from_secs(10), || doctor(&s, &s.client_home, "pi4@alice_device").ok);
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    assert!(seen, "{}\n{}", o.out, o.err);
    assert!(o.lines("ok").iter().any(|l| l.contains("control-plane store (PostgreSQL) answers")), "{}", o.out);

    pg.stop().unwrap();
    let o = doctor(&s, &s.client_home, "pi4@alice_device");
    o.assert_failed();
    let (line, fix) = o.fail("authentication as @alice refused");
    assert!(line.contains("storage failure") && fix.contains("store"), "{line}\n{fix}");

    pg.start_again().unwrap();
    let back = wait_until(Duration::from_secs(10), || doctor(&s, &s.client_home, "pi4@alice_device").ok);
    assert!(back, "doctor still fails once the database is back");
}
