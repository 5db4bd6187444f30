//! Notifications and records through the real `np-control`, with the library client.
#![allow(clippy::unwrap_used)]

use np_control_client::{ControlClient, Incoming};
use np_identity::home::Home;
use np_identity::Name;
use np_tests::Control;
use std::path::Path;
use std::time::{Duration, Instant};

async fn client(home: &Path, name: &str) -> (ControlClient, Incoming) {
    ControlClient::connect(&Home::new(home), &name.parse().unwrap()).await.unwrap()
}

async fn recv(inc: &mut Incoming, within: Duration) -> Option<np_control_client::Message> {
    tokio::time::timeout(within, inc.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn online_recipients_get_it_at_once_offline_ones_on_connect() {
    let ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let bob: Name = "@bob".parse().unwrap();
    let (a, _ai) = client(&ha, "@alice").await;
    let (_b, mut bi) = client(&hb, "@bob").await;

    let t = Instant::now();
    let sent = a.send(&bob, b"hello bob", Duration::from_secs(60)).await.unwrap();
    assert!(sent.delivered);
    let m = recv(&mut bi, Duration::from_secs(2)).await.expect("pushed");
    assert_eq!(m.payload, b"hello bob");
    assert_eq!(m.from.as_str(), "@alice");
    assert!(t.elapsed() < Duration::from_millis(500), "took {:?}", t.elapsed());
    drop(_b);
    drop(bi);

    // Offline: queued, delivered when bob connects, in order.
    let (c, _ci) = client(&ctl.identity("@carol"), "@carol").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let s = c.send(&bob, format!("queued {i}").as_bytes(), Duration::from_secs(60)).await.unwrap();
        assert!(!s.delivered);
    }
    let (_b2, mut bi2) = client(&hb, "@bob").await;
    for i in 0..3 {
        let m = recv(&mut bi2, Duration::from_secs(2)).await.expect("queued delivered");
        assert_eq!(m.payload, format!("queued {i}").as_bytes());
    }
    // Delivered once: a new connection gets nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(_b2);
    drop(bi2);
    let (_b3, mut bi3) = client(&hb, "@bob").await;
    assert!(recv(&mut bi3, Duration::from_millis(700)).await.is_none());

    // Unknown recipients are refused clearly.
    let err = a.send(&"@nobody".parse().unwrap(), b"x", Duration::from_secs(5)).await.unwrap_err();
    assert!(err.to_string().contains("not enrolled"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_notifications_survive_sigkill_and_expire_at_their_ttl() {
    let mut ctl = Control::start(&["--sweep-interval", "200ms"]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let bob: Name = "@bob".parse().unwrap();
    {
        let (a, _ai) = client(&ha, "@alice").await;
        a.send(&bob, b"keep me", Duration::from_secs(600)).await.unwrap();
        a.send(&bob, b"short lived", Duration::from_secs(1)).await.unwrap();
    }
    // The server acknowledged both; kill it without a chance to flush, and restart.
    ctl.restart();
    std::thread::sleep(Duration::from_millis(1500));
    let (_b, mut bi) = client(&hb, "@bob").await;
    let m = recv(&mut bi, Duration::from_secs(3)).await.expect("survived the kill");
    assert_eq!(m.payload, b"keep me");
    // The one past its TTL is not delivered.
    assert!(recv(&mut bi, Duration::from_millis(800)).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_never_holds_a_payloads_plaintext() {
    let mut ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let marker = b"PLAINTEXT-MARKER-7f3a9c";
    {
        let (a, _ai) = client(&ha, "@alice").await;
        // One queued (bob offline: stored in the database) ...
        a.send(&"@bob".parse().unwrap(), marker, Duration::from_secs(600)).await.unwrap();
        // ... and one delivered live.
        let (_b, mut bi) = client(&hb, "@bob").await;
        let first = recv(&mut bi, Duration::from_secs(2)).await.unwrap();
        assert_eq!(first.payload, marker);
        a.send(&"@bob".parse().unwrap(), marker, Duration::from_secs(600)).await.unwrap();
        assert_eq!(recv(&mut bi, Duration::from_secs(2)).await.unwrap().payload, marker);
        // Keep a copy queued for the search below.
        drop(bi);
        drop(_b);
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.send(&"@bob".parse().unwrap(), marker, Duration::from_secs(600)).await.unwrap();
    }
    ctl.kill9();
    // The queued envelope is in the database, so the search below looks at real data.
    assert!(ctl.find_stored(b"@bob").is_some(), "database holds no notification at all");
    assert!(ctl.find_stored(marker).is_none(), "marker in the database");
    let log = std::fs::read(ctl.log()).unwrap();
    assert!(!log.is_empty());
    assert!(!log.windows(marker.len()).any(|w| w == marker), "marker in the server log");
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_signed_scoped_to_readers_and_keys_are_pinned() {
    let ctl = Control::start(&[]);
    let (ha, hb, hc) = (ctl.identity("@alice"), ctl.identity("@dev"), ctl.identity("@carol"));
    let (alice, dev): (Name, Name) = ("@alice".parse().unwrap(), "@dev".parse().unwrap());
    let (d, _di) = client(&hb, "@dev").await;
    d.publish("device/pi4", b"info".to_vec(), vec![alice.clone()]).await.unwrap();
    let (a, _ai) = client(&ha, "@alice").await;
    let list = a.list("device/").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].value, b"info");
    assert_eq!(a.fetch(&dev, "device/pi4").await.unwrap().value, b"info");
    // Not a reader: sees nothing.
    let (c, _ci) = client(&hc, "@carol").await;
    assert!(c.list("device/").await.unwrap().is_empty());
    assert!(c.fetch(&dev, "device/pi4").await.is_err());
    // Directory and keys.
    assert_eq!(a.resolve(&dev).await.unwrap(), ctl.addr.to_string());
    let k = a.lookup(&dev).await.unwrap();
    assert_eq!(k, Home::new(&hb).load_keys(&dev).unwrap().public());
    assert!(ha.join("known/dev.toml").exists(), "keys pinned on first use");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_reconnects_after_a_restart() {
    let mut ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let (a, _ai) = client(&ha, "@alice").await;
    let (_b, mut bi) = client(&hb, "@bob").await;
    ctl.restart();
    // Same client objects, no new connect call: they find the server again by themselves.
    let s = a.send(&"@bob".parse().unwrap(), b"after restart", Duration::from_secs(60)).await.unwrap();
    let _ = s;
    let m = recv(&mut bi, Duration::from_secs(8)).await.expect("delivered after reconnect");
    assert_eq!(m.payload, b"after restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_notification_stream_keeps_every_acknowledged_one_and_nothing_half_written() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    let mut ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let bob: Name = "@bob".parse().unwrap();
    let (a, _ai) = client(&ha, "@alice").await;
    let a = Arc::new(a);
    let acked: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let attempted: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    // Four senders on one connection keep several notifications in flight (and in the server's
    // write lane) when SIGKILL lands. 3 KiB payloads so a torn write would show.
    let mut senders = Vec::new();
    for t in 0..4u32 {
        let (a, acked, attempted, bob) = (a.clone(), acked.clone(), attempted.clone(), bob.clone());
        senders.push(tokio::spawn(async move {
            for i in 0u32.. {
                let mut payload = format!("sender {t} message {i} ").into_bytes();
                payload.resize(3 * 1024, b'a' + (i % 26) as u8);
                attempted.lock().unwrap().insert(payload.clone());
                match a.send(&bob, &payload, Duration::from_secs(600)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(payload);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let enough = tokio::time::timeout(Duration::from_secs(30), async {
        while acked.lock().unwrap().len() < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(enough.is_ok(), "only {} notifications acknowledged in 30 s", acked.lock().unwrap().len());
    ctl.kill9();
    for s in senders {
        tokio::time::timeout(Duration::from_secs(30), s).await.expect("senders see the kill").unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    ctl.restart();
    let log_path = ctl.log();

    let (_b, mut bi) = client(&hb, "@bob").await;
    let mut got: HashSet<Vec<u8>> = HashSet::new();
    while let Some(m) = recv(&mut bi, Duration::from_secs(3)).await {
        assert_eq!(m.from.as_str(), "@alice");
        assert!(attempted.contains(&m.payload), "a payload nobody sent (torn or mixed): {:?}", &m.payload[..40]);
        assert!(got.insert(m.payload), "delivered twice");
    }
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged notifications lost; log: {}",
        lost.len(),
        acked.len(),
        std::fs::read_to_string(&log_path).unwrap_or_default().lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "acknowledged {}, attempted {}, delivered after restart {} (unacknowledged but kept: {})",
        acked.len(),
        attempted.len(),
        got.len(),
        got.len() - acked.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_larger_than_the_push_queue_is_delivered_in_order() {
    // Regression: with more notifications queued than a connection's push channel holds (256),
    // the server fed the backlog into the channel before starting its writer and hung, so the
    // recipient received none of them, ever.
    let ctl = Control::start(&[]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    let bob: Name = "@bob".parse().unwrap();
    let (a, _ai) = client(&ha, "@alice").await;
    let n = 700;
    for i in 0..n {
        let s = a.send(&bob, format!("backlog {i}").as_bytes(), Duration::from_secs(600)).await.unwrap();
        assert!(!s.delivered);
    }
    let (_b, mut bi) = client(&hb, "@bob").await;
    for i in 0..n {
        let m = recv(&mut bi, Duration::from_secs(5)).await.unwrap_or_else(|| panic!("only {i} of {n} delivered"));
        assert_eq!(m.payload, format!("backlog {i}").as_bytes());
    }
    // Live pushes still arrive after the backlog.
    a.send(&bob, b"live", Duration::from_secs(60)).await.unwrap();
    assert_eq!(recv(&mut bi, Duration::from_secs(5)).await.expect("live push").payload, b"live");
}
