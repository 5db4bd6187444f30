//! No identity can silence another through the control plane (issue 12, item 3): a backlog of
//! thousands of notifications does not cut a device off, one sender's flood is bounded by its own
//! share, a backlog is streamed rather than loaded whole, and nothing piles up for a relay.
#![allow(clippy::unwrap_used)]

use np_control_client::{ClientError, ControlClient, ErrorCode, Incoming};
use np_identity::home::Home;
use np_identity::Name;
use np_tests::servers::echo;
use np_tests::stack::Stack;
use np_tests::{free_port, rss_kib, wait_until, Control};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn client(home: &Path, name: &str) -> (ControlClient, Incoming) {
    ControlClient::connect(&Home::new(home), &name.parse().unwrap()).await.unwrap()
}

/// Sends `n` notifications from `c` to `to`, `parallel` at a time; every one must be queued
/// (the recipient is offline).
async fn queue_many(
    c: &ControlClient,
    to: &Name,
    n: usize,
    parallel: usize,
    payload: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) {
    let payload = Arc::new(payload);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (c, to, next, payload) = (c.clone(), to.clone(), next.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let sent = c.send(&to, &payload(i), Duration::from_secs(3600)).await.unwrap();
                assert!(!sent.delivered, "the recipient is offline");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn echo_once(addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

/// Queues `n` notifications from a third identity, @mallory, for @alice_device while its npd is
/// not running, then starts npd and sets up a manager's (@alice) session: returns npd start to a
/// working session, and npd (still running).
fn manager_session_behind_a_backlog(
    s: &Stack,
    n: usize,
    payload: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) -> (Duration, np_tests::Proc) {
    let port = echo();
    let mallory = s.ctl.identity("@mallory");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Instant::now();
    rt.block_on(async {
        let (m, _mi) = client(&mallory, "@mallory").await;
        let device: Name = "@alice_device".parse().unwrap();
        queue_many(&m, &device, n, 16, payload).await;
    });
    eprintln!("queued {n} notifications for @alice_device in {:?}", t.elapsed());

    let t0 = Instant::now();
    let npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let f = s.forward("pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).expect("np forward");
    echo_once(f.addrs[0]);
    let setup = t0.elapsed();
    eprintln!("npd start to a working session through a backlog of {n}: {setup:?}");
    (setup, npd)
}

/// The attack: any enrolled identity queues thousands of notifications for a device while it is
/// offline. Before the fix, the device's control-plane client stalled on its full push queue
/// while the code draining it waited on that same loop for key lookups and acks (~20 s of
/// timeouts per push), so the device answered nobody for as long as the notifications lived.
#[test]
fn five_thousand_notifications_queued_by_a_third_identity_leave_a_managers_session_under_2s() {
    let s = Stack::start();
    let n = 5000;
    let (setup, _npd) =
        manager_session_behind_a_backlog(&s, n, |i| format!("junk {i} {}", "x".repeat(200)).into_bytes());
    assert!(setup < Duration::from_secs(2), "the manager's session took {setup:?} behind {n} queued notifications");
    // And the backlog itself drained: npd opened (and so acknowledged) every one.
    let log = std::fs::read_to_string(s.dir().join("npd-pi4.log")).unwrap_or_default();
    let opened = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(s.dir().join("npd-pi4.log"))
            .map(|l| l.matches("dropping a message that does not parse").count() >= n)
            .unwrap_or(false)
    });
    assert!(
        opened,
        "npd did not get through the backlog: {}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
}

/// The same with 5,000 well-formed session requests from an identity the device does not permit:
/// each one, if handled, costs the device a signed refusal. The router serves senders in turn
/// (a flood fills only its sender's queue), so the manager's request is not behind them.
#[test]
fn five_thousand_session_requests_from_an_unpermitted_identity_leave_a_managers_session_under_2s() {
    let s = Stack::start();
    let n = 5000;
    let (setup, _npd) = manager_session_behind_a_backlog(&s, n, |_| {
        let mut id = [0u8; 16];
        np_identity::random_bytes(&mut id).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        np_tunnel::msg::TunnelMsg::SessionRequest(np_tunnel::msg::SessionRequest {
            request_id: id,
            timestamp_ms: now,
            device: "pi4".into(),
            relay: "@relay".parse().unwrap(),
            session: id,
            handshake: vec![0; 48],
            targets: vec!["localhost:22".into()],
            features: Default::default(),
        })
        .encode()
    });
    assert!(setup < Duration::from_secs(2), "the manager's session took {setup:?} behind {n} queued requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_sender_at_its_quota_leaves_the_recipient_reachable_by_everyone_else() {
    let per_sender = 20;
    let total = 2 * per_sender + 1;
    let ctl = Control::start(&[
        "--max-queued-per-sender",
        &per_sender.to_string(),
        "--max-queued-per-recipient",
        &total.to_string(),
    ]);
    let hb = ctl.identity("@bob");
    let bob: Name = "@bob".parse().unwrap();
    let mut senders = Vec::new();
    for name in ["@mallory", "@eve", "@carol", "@alice"] {
        let h = ctl.identity(name);
        senders.push(client(&h, name).await.0);
    }
    let [mallory, eve, carol, alice] = &senders[..] else { unreachable!() };

    // Mallory fills her share; the next one is refused, to her, with a clear reason.
    queue_many(mallory, &bob, per_sender, 4, |i| format!("m{i}").into_bytes()).await;
    let err = mallory.send(&bob, b"one too many", Duration::from_secs(60)).await.unwrap_err();
    match &err {
        ClientError::Refused { code: ErrorCode::Quota, message } => {
            assert!(message.contains("from you"), "{message}")
        }
        other => panic!("expected a quota refusal, got {other:?}"),
    }
    // Alice still gets through.
    alice.send(&bob, b"from alice", Duration::from_secs(60)).await.unwrap();

    // Eve fills hers too: the total (40) is reached. Carol, with nothing waiting, still gets a
    // few in (each sender's reserve), then is refused for the total, not for her share.
    queue_many(eve, &bob, per_sender, 4, |i| format!("e{i}").into_bytes()).await;
    let mut carol_sent = 0;
    let carol_err = loop {
        match carol.send(&bob, format!("c{carol_sent}").as_bytes(), Duration::from_secs(60)).await {
            Ok(_) => carol_sent += 1,
            Err(e) => break e,
        }
        assert!(carol_sent < 100, "carol was never refused");
    };
    assert!(carol_sent >= 1, "a sender with nothing waiting was refused at the total");
    match &carol_err {
        ClientError::Refused { code: ErrorCode::Quota, message } => {
            assert!(message.contains("the most it may hold"), "{message}")
        }
        other => panic!("expected a quota refusal, got {other:?}"),
    }

    // Bob connects and gets every accepted one; then Mallory may send again.
    let (_b, mut bi) = client(&hb, "@bob").await;
    let expected = per_sender * 2 + 1 + carol_sent;
    let mut got = 0;
    while got < expected {
        let m = tokio::time::timeout(Duration::from_secs(5), bi.recv()).await.ok().flatten();
        assert!(m.is_some(), "only {got} of {expected} delivered");
        got += 1;
    }
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match mallory.send(&bob, b"after bob caught up", Duration::from_secs(60)).await {
                Ok(_) => return,
                Err(ClientError::Refused { code: ErrorCode::Quota, .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(again.is_ok(), "mallory's share was not freed by bob's acknowledgements");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_backlog_is_streamed_not_loaded_into_memory() {
    let mut ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let bob: Name = "@bob".parse().unwrap();
    let (n, size) = (2000usize, 55 * 1024usize);
    {
        let (a, _ai) = client(&ha, "@alice").await;
        queue_many(&a, &bob, n, 8, move |i| {
            let mut p = vec![(i % 251) as u8; size];
            p[..8].copy_from_slice(&(i as u64).to_be_bytes());
            p
        })
        .await;
    }
    let backlog_kib = (n * size / 1024) as u64;
    // A fresh process: nothing of the backlog is in its memory yet.
    ctl.restart();
    let pid = ctl.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let t = Instant::now();
    let (_b, mut bi) = client(&hb, "@bob").await;
    for i in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(10), bi.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("only {i} of {n} delivered"));
        assert_eq!(m.payload.len(), size);
    }
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "delivered a {} MiB backlog in {took:?}; np-control grew by {} MiB ({:.2} of the backlog)",
        backlog_kib / 1024,
        grew / 1024,
        grew as f64 / backlog_kib as f64
    );
    assert!(
        grew * 4 < backlog_kib,
        "np-control grew by {grew} KiB while delivering a {backlog_kib} KiB backlog: loaded, not streamed"
    );
}

/// `GET /metrics` on `addr`: the body.
fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn queue_depth(addr: SocketAddr) -> f64 {
    metrics(addr)
        .lines()
        .find_map(|l| l.strip_prefix("np_control_queue_depth "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Before the fix the relay dropped its `Incoming` and never acknowledged anything, so every
/// notification sent to it stayed queued (up to its time-to-live), and enough of them filled
/// its queue for good.
#[test]
fn notifications_to_a_relay_are_acknowledged_and_do_not_pile_up() {
    let mut s = Stack::start();
    let m: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.ctl.extra.extend(["--metrics".into(), m.to_string()]);
    s.ctl.restart();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = 300;
    rt.block_on(async {
        let (a, _ai) = client(&s.client_home, "@alice").await;
        let relay: Name = "@relay".parse().unwrap();
        for i in 0..n {
            a.send(&relay, format!("for the relay {i}").as_bytes(), Duration::from_secs(3600)).await.unwrap();
        }
    });
    let mut depth = f64::NAN;
    let empty = wait_until(Duration::from_secs(20), || {
        depth = queue_depth(m);
        depth == 0.0
    });
    if !empty {
        let ignored =
            std::fs::read_to_string(s.relay_log()).unwrap_or_default().matches("ignoring a notification").count();
        panic!("{depth} notifications still queued for the relay (it ignored {ignored})");
    }
    assert!(s.relay.is_some());
}
