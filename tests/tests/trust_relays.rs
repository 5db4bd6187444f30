//! The device dials only relays it trusts, by identity, at the address each relay signed itself;
//! a request that names anything else makes it dial nothing. Whatever answers at a trusted
//! relay's address, the requester reads one refusal. A requester at its session cap leaves the
//! managers their sessions (at `npd` and at the relay), and the smaller leaks stay closed.
#![allow(clippy::unwrap_used)]

use np_control_client::ControlClient;
use np_identity::home::Home;
use np_identity::Name;
use np_tests::servers::echo;
use np_tests::stack::{np, Stack};
use np_tests::{bin, output_within, spawn_listening, wait_until, Proc};
use np_tunnel::msg::{SessionRequest, TunnelMsg};
use np_tunnel::{Refusal, Router};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

/// A listener that counts the connections it accepts (and, if `banner`, greets each with it).
fn counting_listener(banner: Option<&'static [u8]>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut s = s;
                if let Some(b) = banner {
                    let _ = s.write_all(b);
                }
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    (addr, count)
}

/// Starts `np-relay` as `name` (enrolled in `home`) on 127.0.0.1:0, advertising `advertise`;
/// returns it with the address it really listens on, once its record is published.
fn relay_as(s: &Stack, home: &Path, name: &str, advertise: &str, log: &str) -> (Proc, SocketAddr) {
    let log = s.dir().join(log);
    let mut cmd = Command::new(bin("np-relay"));
    cmd.args(["--as", name, "--listen", "127.0.0.1:0", "--advertise", advertise, "--home"])
        .arg(home)
        .env("RUST_LOG", "debug");
    let (child, addr) = spawn_listening(cmd, &log).expect("np-relay did not start");
    let published = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("relay record published"))
    });
    assert!(published, "{name} did not publish its record");
    (Proc(child), addr)
}

/// A client identity's control connection and router, for sending hand-made requests.
async fn client(home: &Path, me: &str) -> (ControlClient, Router) {
    let (ctl, incoming) = ControlClient::connect(&Home::new(home), &n(me)).await.unwrap();
    let (router, _requests) = Router::start(incoming);
    (ctl, router)
}

/// Sends `req` to @alice_device and returns the refusal, if one comes within `wait`.
async fn ask(ctl: &ControlClient, router: &Router, req: SessionRequest, wait: Duration) -> Option<Refusal> {
    let rx = router.expect(req.request_id);
    ctl.send(&n("@alice_device"), &TunnelMsg::SessionRequest(req).encode(), Duration::from_secs(30)).await.unwrap();
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(a)) => match a.msg {
            TunnelMsg::SessionRefused { refusal, .. } => Some(refusal),
            other => panic!("unexpected answer {other:?}"),
        },
        _ => None,
    }
}

fn request(id: u8, relay: &str, targets: Vec<String>) -> SessionRequest {
    SessionRequest {
        request_id: [id; 16],
        timestamp_ms: now_ms(),
        device: "pi4".into(),
        relay: n(relay),
        session: [id; 16],
        // Never looked at: the request is refused before the handshake.
        handshake: vec![0; 48],
        targets,
        features: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_an_address_or_an_untrusted_relay_makes_the_device_dial_nothing() {
    let s = Stack::start();
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    // A relay identity of the attacker's, enrolled and running, whose signed record points at a
    // listener of ours: if the device ever dialled it, the listener would count it.
    let (trap, dialled) = counting_listener(None);
    let evil_home = s.ctl.identity("@evil_relay");
    let (_evil, _) = relay_as(&s, &evil_home, "@evil_relay", &trap.to_string(), "evil-relay.log");
    // The requester is a manager: permitted, fresh, asking for a permitted target.
    let (ctl, router) = client(&s.client_home, "@alice").await;
    let t = Instant::now();
    let target = vec![format!("localhost:{port}")];
    let r = ask(&ctl, &router, request(1, "@evil_relay", target.clone()), Duration::from_secs(5)).await;
    assert_eq!(r, Some(Refusal::RelayNotTrusted { relay: n("@evil_relay") }));
    assert!(t.elapsed() < Duration::from_secs(3), "refusal took {:?}", t.elapsed());

    // The old form of the request, a HOST:PORT in the relay field, no longer even parses as a
    // request: the device drops it.
    #[derive(serde::Serialize)]
    struct OldRequest {
        request_id: [u8; 16],
        timestamp_ms: u64,
        device: String,
        relay: String,
        session: [u8; 16],
        handshake: Vec<u8>,
        targets: Vec<String>,
    }
    #[derive(serde::Serialize)]
    enum OldMsg {
        SessionRequest(OldRequest),
    }
    let old = OldMsg::SessionRequest(OldRequest {
        request_id: [2; 16],
        timestamp_ms: now_ms(),
        device: "pi4".into(),
        relay: trap.to_string(),
        session: [2; 16],
        handshake: vec![0; 48],
        targets: target.clone(),
    });
    ctl.send(&n("@alice_device"), &postcard::to_stdvec(&old).unwrap(), Duration::from_secs(30)).await.unwrap();

    // No targets: refused first, before anything else happens.
    let r = ask(&ctl, &router, request(3, "@relay", Vec::new()), Duration::from_secs(5)).await;
    assert_eq!(r, Some(Refusal::NoTargets));

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dialled.load(Ordering::SeqCst), 0, "the device connected to an address a client named");
    let log = std::fs::read_to_string(s.dir().join("npd-pi4.log")).unwrap();
    assert!(log.contains("does not parse"), "the old-form request was not dropped as unparsable:\n{log}");
    assert!(!log.contains("session accepted"), "{log}");
}

#[test]
fn whatever_answers_at_a_trusted_relays_address_the_requester_reads_one_refusal() {
    let s = Stack::start();
    let port = echo();
    let relay2_home = s.ctl.identity("@relay2");
    s.ctl.list_relay("@relay2");
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (silent, _) = counting_listener(None);
    let (banner, _) = counting_listener(Some(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"));
    // Another relay, real but with another identity: it cannot prove it is @relay2.
    let impostor = s.published_relay_addr;
    let mut refusals = Vec::new();
    for (case, advertised) in [("closed port", closed), ("silent", silent), ("banner", banner), ("impostor", impostor)]
    {
        // @relay2 publishes the case's address; the client reaches the real @relay2 by hand,
        // so only the device's side meets what answers there.
        let (relay2, real) =
            relay_as(&s, &relay2_home, "@relay2", &advertised.to_string(), &format!("relay2-{case}.log"));
        let home = s.client_home.to_str().unwrap().to_string();
        let mut cmd = Command::new(bin("np"));
        cmd.args(["forward", "--as", "@alice", "--to", "pi4@alice_device", "--relay", "@relay2"]).args([
            "--relay-address",
            &real.to_string(),
            "--home",
            &home,
            "-L",
            &format!("0:localhost:{port}"),
        ]);
        let t = Instant::now();
        let out = output_within(&mut cmd, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{case}: np forward succeeded");
        let line = err.lines().find(|l| l.contains("refused")).unwrap_or_else(|| panic!("{case}: no refusal in {err}"));
        assert!(line.contains("the device cannot reach relay @relay2"), "{case}: {line}");
        for leak in ["SSH-2.0", "onnection refused", "timed out", "no answer", "@relay ", "prove"] {
            assert!(!err.contains(leak), "{case}: {leak:?} leaked to the requester: {err}");
        }
        eprintln!("{case}: refused in {:?}", t.elapsed());
        refusals.push(line.split("refused").nth(1).unwrap().to_string());
        drop(relay2);
    }
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "different refusals: {refusals:#?}");
}

/// On `s` (relay started with `relay_args`), npd with managers @alice and @bob and
/// `--max-sessions-per-requester npd_cap`: @bob opens two sessions, his third is refused with
/// one of `refusals`, and @alice still gets a working session. Returns the stack and @bob's
/// sessions.
fn bob_at_his_cap_leaves_alice_hers(
    relay_args: &[&str],
    npd_cap: &str,
    refusals: &[&str],
) -> (Stack, Proc, Vec<np_tests::stack::Forward>, std::path::PathBuf, u16) {
    let s = Stack::start_with_relay(relay_args);
    let port = echo();
    let bob = s.ctl.identity("@bob");
    let target = format!("localhost:{port}");
    let args = ["--manager", "@alice", "--manager", "@bob", "--permit-open", &target];
    let npd = s.npd("pi4", &[&args[..], &["--max-sessions-per-requester", npd_cap]].concat());
    let fwd = |home: &Path, me: &str| s.forward_as(home, me, "pi4@alice_device", &[&format!("0:{target}")], &[]);
    let bobs = vec![fwd(&bob, "@bob").unwrap(), fwd(&bob, "@bob").unwrap()];
    let third = fwd(&bob, "@bob");
    assert!(third.as_ref().is_err_and(|e| refusals.iter().any(|r| e.contains(r))), "{:?}", third.as_ref().err());
    let a = fwd(&s.client_home, "@alice").unwrap();
    let mut c = TcpStream::connect(a.addrs[0]).unwrap();
    c.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    (s, npd, bobs, bob, port)
}

#[test]
fn a_requester_at_its_session_cap_leaves_the_managers_their_sessions() {
    // At the relay: each identity has 2 places; the device would give @bob 3 sessions. @bob's
    // two sessions also take the device's two places for him, and @alice still gets hers: the
    // device's places are counted per requester. Before, they were all @bob's and @alice was
    // refused at the relay.
    // Both of @bob's sides are refused at the relay; whichever refusal reaches him first is his
    // answer (his own join's, or the device's, which says only that it cannot reach the relay).
    let relay_full = ["too many sessions for @bob", "the device cannot reach relay @relay"];
    drop(bob_at_his_cap_leaves_alice_hers(&["--max-sessions-per-identity", "2"], "3", &relay_full));

    // At npd: a relay with room, a device cap of 2 per requester.
    let (s, _npd, mut bobs, bob, port) =
        bob_at_his_cap_leaves_alice_hers(&[], "2", &["you hold 2 sessions with this device"]);
    // When one of @bob's sessions ends, he has room again.
    bobs.pop();
    let fwd = || s.forward_as(&bob, "@bob", "pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).is_ok();
    assert!(wait_until(Duration::from_secs(20), fwd), "@bob never got a place back after closing a session");
}

#[test]
fn strangers_cannot_tell_an_unknown_device_from_a_forbidden_one() {
    let s = Stack::start();
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let mallory = s.ctl.identity("@mallory");
    let refusal = |to: &str| {
        let e = s.forward_as(&mallory, "@mallory", to, &[&format!("0:localhost:{port}")], &[]).err().unwrap();
        // The log is appended to by each run: the last refusal is this one's.
        e.lines().rfind(|l| l.contains("refused")).unwrap().split("refused: ").nth(1).unwrap().to_string()
    };
    let real = refusal("pi4@alice_device");
    let ghost = refusal("pi9@alice_device");
    assert_eq!(real, "@mallory is not permitted to connect to pi4@alice_device");
    assert_eq!(ghost, "@mallory is not permitted to connect to pi9@alice_device");
    // A manager is told the truth.
    let e = s.forward("pi9@alice_device", &[&format!("0:localhost:{port}")], &[]).err().unwrap();
    assert!(e.contains("no device named pi9 under @alice_device"), "{e}");
}

#[test]
fn a_device_without_managers_shares_its_record_only_as_configured() {
    let s = Stack::start();
    let bob = s.ctl.identity("@bob");
    let _pol = s.ctl.identity("@policy");
    let devices = |home: &Path, me: &str| {
        let (ok, out, err) = np(&["devices", "--as", me, "--home", home.to_str().unwrap()]);
        assert!(ok, "{err}");
        out
    };
    let npd = s.npd("pi4", &["--policy", "@policy"]);
    let seen = wait_until(Duration::from_secs(3), || devices(&bob, "@bob").contains("pi4@alice_device"));
    assert!(!seen, "a device with no managers was listed to an identity it never shared with");
    drop(npd);
    let _npd = s.npd("pi5", &["--policy", "@policy", "--share-with", "@bob"]);
    let seen = wait_until(Duration::from_secs(5), || devices(&bob, "@bob").contains("pi5@alice_device"));
    assert!(seen, "--share-with @bob did not share the record with @bob");
    assert!(!devices(&s.client_home, "@alice").contains("pi5@alice_device"), "shared with @alice too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_service_answers_only_the_device_identities_it_serves() {
    let s = Stack::start();
    let pol_home = s.ctl.identity("@policy");
    let mallory = s.ctl.identity("@mallory");
    let file = s.dir().join("policy.toml");
    std::fs::write(
        &file,
        "serves = [\"@alice_device\"]\n[[rule]]\nidentities = [\"@bob\"]\ndevices = [\"*\"]\npermit = [\"localhost:22\"]\n",
    )
    .unwrap();
    let _svc = Proc(
        Command::new(bin("np"))
            .args(["policy", "serve", "--as", "@policy", "--file"])
            .arg(&file)
            .arg("--home")
            .arg(&pol_home)
            .env("RUST_LOG", "debug")
            .stderr(std::fs::File::create(s.dir().join("policy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let policy_log = s.dir().join("policy.log");
    let up = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&policy_log).is_ok_and(|l| l.contains("policy service @policy running"))
    });
    assert!(up, "np policy serve did not start: {}", std::fs::read_to_string(&policy_log).unwrap_or_default());
    let query = |home: std::path::PathBuf, me: &'static str, device: &'static str| {
        let policy_log = policy_log.clone();
        async move {
            let (ctl, router) = client(&home, me).await;
            let query_id = [7u8; 16];
            let rx = router.expect(query_id);
            let q = TunnelMsg::PolicyQuery { query_id, requester: n("@bob"), device: device.into(), targets: vec![] };
            // The service may still be connecting: ask until it answers.
            let deadline = Instant::now() + Duration::from_secs(10);
            ctl.send(&n("@policy"), &q.encode(), Duration::from_secs(30)).await.unwrap();
            let a = tokio::time::timeout(deadline - Instant::now(), rx).await.unwrap_or_else(|_| {
                panic!(
                    "no policy answer to {me}; policy log:\n{}",
                    std::fs::read_to_string(&policy_log).unwrap_or_default()
                )
            });
            let a = a.unwrap();
            match a.msg {
                TunnelMsg::PolicyAnswer { allow, permit, .. } => (allow, permit),
                other => panic!("{other:?}"),
            }
        }
    };
    // @mallory asks about a device of its own: before, the "*" rule answered and told it who may
    // connect to what. Now it is not an identity the policy serves.
    let (allow, permit) = query(mallory, "@mallory", "x@mallory").await;
    assert!(!allow && permit.is_empty(), "the policy answered @mallory: {permit:?}");
    // The device identity it serves gets the real answer.
    let (allow, permit) = query(s.device_home.clone(), "@alice_device", "pi4@alice_device").await;
    assert!(allow, "the served device was refused");
    assert_eq!(permit, vec!["localhost:22".to_string()]);
}
