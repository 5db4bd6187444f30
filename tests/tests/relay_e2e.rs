//! The real `np-relay` binary against the real `np-control`, with identities enrolled through the
//! real `np keys new`; the two sides use the library's `np_relay::join`, as `np` and `npd` do.
#![allow(clippy::unwrap_used)]

use np_identity::home::Home;
use np_identity::{Keys, Name};
use np_relay::{join_with_timeout, JoinError, Role};
use np_tests::{bin, wait_until, Control};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `np-relay` process; its stderr goes to `log`.
struct RelayProc {
    child: Child,
    addr: SocketAddr,
    name: Name,
    /// The relay's public signing key: sides check its proof with it.
    signing: [u8; 32],
    log: PathBuf,
    banner: String,
}

impl RelayProc {
    /// Enrols `name` on `ctl` and starts the relay as it on 127.0.0.1:0 with `extra` flags.
    fn start(ctl: &Control, name: &str, extra: &[&str], rust_log: &str) -> RelayProc {
        let home = ctl.identity(name);
        let log = ctl.dir.path().join(format!("relay-{}.log", name.trim_start_matches('@')));
        let mut child = Command::new(bin("np-relay"))
            .args(["--as", name, "--listen", "127.0.0.1:0", "--home"])
            .arg(&home)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        while let Some(Ok(line)) = lines.next() {
            banner += &line;
            banner.push('\n');
            if let Some(a) = line.trim().strip_prefix("listening on") {
                let addr = a.trim().parse().unwrap();
                for line in lines.by_ref().take(5).map_while(Result::ok) {
                    banner += &line;
                    banner.push('\n');
                }
                std::thread::spawn(move || for _ in lines.by_ref() {});
                let signing = keys_of(&home, name).public().signing;
                return RelayProc { child, addr, name: name.parse().unwrap(), signing, log, banner };
            }
        }
        let _ = child.wait();
        panic!("np-relay did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keys_of(home: &Path, name: &str) -> Keys {
    Home::new(home).load_keys(&name.parse().unwrap()).unwrap()
}

fn session() -> [u8; 16] {
    let mut s = [0u8; 16];
    s.copy_from_slice(&np_identity::random32().unwrap()[..16]);
    s
}

/// Joins `relay` as `identity` (signing with `keys`) for `session` with `peer`.
async fn join(
    relay: &RelayProc,
    keys: &Keys,
    identity: &str,
    role: Role,
    session: [u8; 16],
    peer: &str,
) -> Result<TcpStream, JoinError> {
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    join_with_timeout(
        tcp,
        keys,
        &identity.parse().unwrap(),
        role,
        session,
        &peer.parse().unwrap(),
        Some(np_relay::ExpectedRelay { name: &relay.name, signing: &relay.signing }),
        JOIN_TIMEOUT,
    )
    .await
}

/// Pairs `client` and `device` (homes enrolled as those names) for a fresh session.
async fn pair(
    relay: &RelayProc,
    client: (&Path, &str),
    device: (&Path, &str),
) -> (Result<TcpStream, JoinError>, Result<TcpStream, JoinError>) {
    let s = session();
    let (ck, dk) = (keys_of(client.0, client.1), keys_of(device.0, device.1));
    tokio::join!(
        join(relay, &ck, client.1, Role::Client, s, device.1),
        join(relay, &dk, device.1, Role::Device, s, client.1),
    )
}

/// Sends `a_msg` from a and `b_msg` from b, each half-closing after; each reads the other to EOF.
async fn exchange(mut a: TcpStream, mut b: TcpStream, a_msg: &[u8], b_msg: &[u8]) {
    // a -> b first, half-closed, while b has not sent anything: the half-close must pass alone.
    a.write_all(a_msg).await.unwrap();
    a.shutdown().await.unwrap();
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, a_msg);
    // The other direction still works after the first one closed.
    b.write_all(b_msg).await.unwrap();
    b.shutdown().await.unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b_msg);
}

fn refused(r: Result<TcpStream, JoinError>) -> String {
    match r {
        Err(JoinError::Refused(reason)) => reason,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got paired"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_sides_pair_and_bytes_flow_both_ways_with_half_close() {
    let ctl = Control::start(&[]);
    let relay = RelayProc::start(&ctl, "@relay", &[], "info");
    assert!(relay.banner.contains("identity       @relay"), "{}", relay.banner);
    assert!(relay.banner.contains("any enrolled identity"), "{}", relay.banner);
    let alice = ctl.identity("@alice");
    let dev = ctl.identity("@alice_device");
    let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
    exchange(c.unwrap(), d.unwrap(), b"from the client", b"and back from the device").await;
    // Larger than any buffer on the way, both directions at once.
    let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
    let (mut c, mut d) = (c.unwrap(), d.unwrap());
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (cr, dr) = tokio::join!(
        async {
            let (mut r, mut w) = c.split();
            let (_, got) = tokio::join!(
                async {
                    w.write_all(&big).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                async {
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).await.unwrap();
                    v
                }
            );
            got
        },
        async {
            let (mut r, mut w) = d.split();
            let (_, got) = tokio::join!(
                async {
                    w.write_all(&big).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                async {
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).await.unwrap();
                    v
                }
            );
            got
        }
    );
    assert!(cr == big && dr == big, "8 MiB each way arrived intact");
    assert!(wait_until(Duration::from_secs(5), || relay.log_text().contains("session closed")), "{}", relay.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_not_in_allow_is_refused_with_the_reason() {
    let ctl = Control::start(&[]);
    let relay = RelayProc::start(&ctl, "@relay", &["--allow", "@alice,@alice_device"], "info");
    assert!(relay.banner.contains("allow          @alice, @alice_device"), "{}", relay.banner);
    let alice = ctl.identity("@alice");
    let dev = ctl.identity("@alice_device");
    let mallory = ctl.identity("@mallory");
    let reason = refused(
        join(&relay, &keys_of(&mallory, "@mallory"), "@mallory", Role::Client, session(), "@alice_device").await,
    );
    assert_eq!(reason, "identity @mallory is not allowed on this relay");
    // The allowed ones still pair.
    let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
    exchange(c.unwrap(), d.unwrap(), b"ping", b"pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_never_enrolled_is_refused_as_unknown() {
    let ctl = Control::start(&[]);
    let relay = RelayProc::start(&ctl, "@relay", &[], "info");
    // Keys made locally, never enrolled.
    let t = tempfile::tempdir().unwrap();
    let ghost = Home::new(t.path()).create_keys(&"@ghost".parse().unwrap()).unwrap();
    let reason = refused(join(&relay, &ghost, "@ghost", Role::Client, session(), "@alice_device").await);
    assert_eq!(reason, "unknown identity @ghost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_signed_with_another_identitys_keys_is_refused() {
    let ctl = Control::start(&[]);
    let relay = RelayProc::start(&ctl, "@relay", &[], "info");
    let alice = ctl.identity("@alice");
    let mallory = ctl.identity("@mallory");
    let _ = alice;
    // Mallory claims to be @alice but can only sign with her own keys.
    let reason =
        refused(join(&relay, &keys_of(&mallory, "@mallory"), "@alice", Role::Client, session(), "@alice_device").await);
    assert_eq!(reason, "bad signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_working_through_a_control_plane_crash() {
    let mut ctl = Control::start(&[]);
    let relay = RelayProc::start(&ctl, "@relay", &[], "info");
    let alice = ctl.identity("@alice");
    let dev = ctl.identity("@alice_device");
    let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
    exchange(c.unwrap(), d.unwrap(), b"before", b"the crash").await;

    ctl.kill9();
    // Identities the relay has seen keep working while the control plane is down.
    let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
    exchange(c.unwrap(), d.unwrap(), b"during", b"the outage").await;

    ctl.restart();
    // New identities, enrolled after the restart, work within a few seconds (the relay's
    // control client reconnects by itself).
    let bob = ctl.identity("@bob");
    let bob_dev = ctl.identity("@bob_device");
    let started = std::time::Instant::now();
    let (c, d) = loop {
        match pair(&relay, (&bob, "@bob"), (&bob_dev, "@bob_device")).await {
            (Ok(c), Ok(d)) => break (c, d),
            (c, d) => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "new identities still refused after restart: {:?} {:?}\n{}",
                    c.err(),
                    d.err(),
                    relay.log_text()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    exchange(c, d, b"after", b"the restart").await;
    eprintln!("new identities paired {:?} after the restart", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_log_never_holds_the_bytes_it_forwards() {
    let ctl = Control::start(&[]);
    let alice = ctl.identity("@alice");
    let dev = ctl.identity("@alice_device");
    let up = b"PLAINTEXT-MARKER-c2d-5f1e8a9b".repeat(1000);
    let down = b"PLAINTEXT-MARKER-d2c-7c3b0e14".repeat(1000);
    // Both forwarding paths, with the most verbose log the relay can write.
    for (name, flags) in [("@relay", &["--forward", "copy"][..]), ("@relay_splice", &["--forward", "splice"][..])] {
        let relay = RelayProc::start(&ctl, name, flags, "trace");
        let (c, d) = pair(&relay, (&alice, "@alice"), (&dev, "@alice_device")).await;
        exchange(c.unwrap(), d.unwrap(), &up, &down).await;
        assert!(wait_until(Duration::from_secs(5), || relay.log_text().contains("session closed")));
        let log = std::fs::read(&relay.log).unwrap();
        assert!(log.len() > 1000, "the trace log is written");
        for needle in [&b"PLAINTEXT-MARKER"[..], b"MARKER", b"5f1e8a9b", b"7c3b0e14"] {
            assert!(!log.windows(needle.len()).any(|w| w == needle), "{name}'s log holds forwarded bytes");
        }
    }
}

#[test]
fn the_relay_refuses_to_start_without_keys_and_says_why() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(bin("np-relay"))
        .args(["--as", "@relay", "--listen", "127.0.0.1:0", "--home"])
        .arg(t.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("np keys new"), "{err}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(bin("np-relay")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--as",
        "--listen",
        "--home",
        "--allow",
        "--max-preauth",
        "--auth-timeout",
        "--pairing-timeout",
        "--idle-timeout",
        "--max-sessions ",
        "--max-sessions-per-identity",
        "--forward",
        "NP_HOME",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}:\n{help}");
    }
    // Every flag has an explanation, not just a name.
    assert!(help.contains("enrolled identity"), "{help}");
    assert!(help.contains("Time the first side of a session waits"), "{help}");
}
