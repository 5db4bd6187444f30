//! Presence: a device whose control connection closes is gone at once, through the real
//! np-control, npd and np; and only the owner's last authenticated connection can make it so.
#![allow(clippy::unwrap_used)]

use np_control_client::{ControlClient, Presence};
use np_control_proto::{ClientFrame, Request};
use np_identity::home::Home;
use np_tests::raw::{pin_of, RawConn};
use np_tests::stack::{np, Stack};
use np_tests::{wait_until, Control};
use std::path::Path;
use std::time::{Duration, Instant};

fn log_count(ctl: &Control, needle: &str) -> usize {
    std::fs::read_to_string(ctl.log()).unwrap_or_default().matches(needle).count()
}

/// The state column of `np devices` for `device`, if it is listed.
fn device_state(s: &Stack, device: &str) -> Option<String> {
    let (ok, out, err) = np(&["devices", "--as", "@alice", "--home", s.client_home.to_str().unwrap()]);
    assert!(ok, "np devices failed: {err}");
    let line = out.lines().find(|l| l.starts_with(device))?;
    line.split_whitespace().nth(1).map(str::to_string)
}

#[test]
fn np_devices_shows_a_killed_npd_gone_within_a_second() {
    let s = Stack::start();
    let mut npd = s.npd("pi4", &["--manager", "@alice"]);
    // npd holds its record once it has published it; before that a kill is only seen by the
    // heartbeat.
    let held =
        wait_until(Duration::from_secs(10), || log_count(&s.ctl, "record held while this connection lasts") >= 1);
    assert!(held, "npd never held its record: {}", std::fs::read_to_string(s.ctl.log()).unwrap_or_default());
    assert_eq!(device_state(&s, "pi4@alice_device").as_deref(), Some("live"));

    let killed = Instant::now();
    let _ = npd.0.kill();
    let _ = npd.0.wait();
    let mut last = None;
    let gone = wait_until(Duration::from_secs(5), || {
        last = device_state(&s, "pi4@alice_device");
        last.as_deref() == Some("gone")
    });
    let took = killed.elapsed();
    assert!(gone, "still {last:?} 5 s after npd was killed");
    assert!(took < Duration::from_secs(1), "np devices showed it gone only after {took:?}");

    // Back: live again as soon as the new npd holds its record.
    let before = log_count(&s.ctl, "record held while this connection lasts");
    let _npd = s.npd("pi4", &["--manager", "@alice"]);
    assert!(
        wait_until(Duration::from_secs(10), || log_count(&s.ctl, "record held while this connection lasts") > before)
    );
    assert_eq!(device_state(&s, "pi4@alice_device").as_deref(), Some("live"));
}

async fn client(home: &Path, name: &str) -> ControlClient {
    ControlClient::connect(&Home::new(home), &name.parse().unwrap()).await.unwrap().0
}

async fn presence(reader: &ControlClient) -> Presence {
    let owner = "@alice_device".parse().unwrap();
    reader.fetch_with_presence(&owner, "device/pi4").await.unwrap().presence
}

/// Polls until the server has logged `n` closed connections of `name`.
async fn closed_connections(ctl: &Control, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let count = || {
        let log = std::fs::read_to_string(ctl.log()).unwrap_or_default();
        log.lines()
            .filter(|l| {
                l.contains(&format!("name={name}")) && (l.contains("disconnected") || l.contains("connection closed"))
            })
            .count()
    };
    while count() < n {
        assert!(Instant::now() < deadline, "the control plane did not see {n} connection(s) of {name} close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_only_when_the_owners_last_connection_closes() {
    let ctl = Control::start(&[]);
    let device_home = ctl.identity("@alice_device");
    let reader_home = ctl.identity("@alice");
    let mallory_home = ctl.identity("@mallory");
    let reader = client(&reader_home, "@alice").await;
    let alice: np_identity::Name = "@alice".parse().unwrap();

    let first = client(&device_home, "@alice_device").await;
    first.publish("device/pi4", b"info".to_vec(), vec![alice.clone()]).await.unwrap();
    assert_eq!(presence(&reader).await, Presence::Unknown, "not held yet: the heartbeat decides");
    first.hold("device/pi4").await.unwrap();
    let since = match presence(&reader).await {
        Presence::Connected { since_ms } => since_ms,
        other => panic!("held, yet {other:?}"),
    };

    // A second connection of the same identity holds it too, then closes: still connected.
    let second = client(&device_home, "@alice_device").await;
    second.hold("device/pi4").await.unwrap();
    drop(second);
    closed_connections(&ctl, "@alice_device", 1).await;
    assert_eq!(presence(&reader).await, Presence::Connected { since_ms: since });

    // Another identity holding the same key (its own record of that name) and leaving.
    let mallory = client(&mallory_home, "@mallory").await;
    mallory.hold("device/pi4").await.unwrap();
    drop(mallory);
    closed_connections(&ctl, "@mallory", 1).await;
    // A connection that claims to be @alice_device without its key, and one that says nothing,
    // closed before authenticating.
    let pin = pin_of(&device_home, "@alice_device");
    let mut fake = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let forged = Request::Auth { name: "@alice_device".parse().unwrap(), sig: vec![0; 64] };
    fake.send(&ClientFrame { id: 1, req: forged }).await.unwrap();
    let refused = fake.recv().await.unwrap();
    assert!(format!("{refused:?}").contains("BadSignature"), "{refused:?}");
    drop(fake);
    drop(RawConn::connect(ctl.addr, &pin).await.unwrap());
    assert_eq!(presence(&reader).await, Presence::Connected { since_ms: since });
    assert!(log_count(&ctl, "no connection holds the record any more") == 1, "only mallory's own record went");

    // The last one closes: disconnected, seen within a second.
    let dropped = Instant::now();
    drop(first);
    loop {
        match presence(&reader).await {
            Presence::Disconnected { .. } => break,
            other => {
                assert!(dropped.elapsed() < Duration::from_secs(1), "still {other:?} after {:?}", dropped.elapsed())
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The record stays readable; a new connection that holds it brings it back.
    let again = client(&device_home, "@alice_device").await;
    again.hold("device/pi4").await.unwrap();
    assert!(matches!(presence(&reader).await, Presence::Connected { since_ms } if since_ms >= since));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnected_client_holds_its_records_again() {
    let mut ctl = Control::start(&[]);
    let device_home = ctl.identity("@alice_device");
    let reader_home = ctl.identity("@alice");
    let dev = client(&device_home, "@alice_device").await;
    dev.publish("device/pi4", b"info".to_vec(), vec!["@alice".parse().unwrap()]).await.unwrap();
    dev.hold("device/pi4").await.unwrap();
    let held_before = log_count(&ctl, "record held while this connection lasts");

    // A control-plane restart forgets every hold; the client reconnects and holds again.
    ctl.restart();
    let ok = wait_until(Duration::from_secs(10), || {
        log_count(&ctl, "record held while this connection lasts") > held_before
    });
    assert!(ok, "the reconnected client did not hold its record again");
    let reader = client(&reader_home, "@alice").await;
    assert!(matches!(presence(&reader).await, Presence::Connected { .. }));
}
