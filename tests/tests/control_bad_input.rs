//! Bad input on the control plane's port: clear errors or closes, bounded memory, no panic,
//! nothing lost.
#![allow(clippy::unwrap_used)]

use np_control_client::ControlClient;
use np_control_proto::{ErrorCode, ServerFrame};
use np_identity::home::Home;
use np_identity::Name;
use np_tests::raw::{pin_of, RawConn};
use np_tests::{fd_count, raise_nofile, rss_kib, wait_until, Control};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until EOF or error; returns how long it took.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|_| t.elapsed())
}

async fn still_serves(home: &std::path::Path, name: &str) {
    let (c, _i) = ControlClient::connect(&Home::new(home), &name.parse().unwrap()).await.unwrap();
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_stalls_and_oversized_frames_get_a_close_or_a_clear_error() {
    let ctl = Control::start(&["--auth-timeout", "1s"]);
    let home = ctl.identity("@alice");
    let pin = pin_of(&home, "@alice");

    // Not TLS at all.
    let mut s = TcpStream::connect(ctl.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(until_closed(&mut s, Duration::from_secs(3)).await.is_some());
    let mut s = TcpStream::connect(ctl.addr).await.unwrap();
    s.write_all(&[0xff; 65536]).await.unwrap_or(());
    assert!(until_closed(&mut s, Duration::from_secs(3)).await.is_some());

    // A client that connects and says nothing, and one that stalls half-way through TLS.
    let mut silent = TcpStream::connect(ctl.addr).await.unwrap();
    let mut half = TcpStream::connect(ctl.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let took = until_closed(&mut silent, Duration::from_secs(5)).await.expect("silent client closed");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "{took:?}");
    assert!(until_closed(&mut half, Duration::from_secs(5)).await.is_some());

    // After TLS, a client that never authenticates is closed at the deadline too.
    let mut idle = RawConn::connect(ctl.addr, &pin).await.unwrap();
    let t = Instant::now();
    assert!(idle.recv().await.map(|f| f.is_none()).unwrap_or(true));
    assert!(t.elapsed() < Duration::from_secs(3));

    // An oversized length prefix: a clear error, then a close, before any buffer is grown.
    let mut big = RawConn::connect(ctl.addr, &pin).await.unwrap();
    big.send_bytes(&u32::MAX.to_be_bytes()).await.unwrap();
    match big.recv().await.unwrap() {
        Some(ServerFrame::Reply { result: Err(e), .. }) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("exceeds the limit"), "{}", e.message);
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    assert!(big.recv().await.map(|f| f.is_none()).unwrap_or(true));

    // A well-framed message that is not a message.
    let mut junk = RawConn::connect(ctl.addr, &pin).await.unwrap();
    junk.send_bytes(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    match junk.recv().await.unwrap() {
        Some(ServerFrame::Reply { result: Err(e), .. }) => assert!(e.message.contains("malformed"), "{}", e.message),
        other => panic!("expected an error reply, got {other:?}"),
    }

    still_serves(&home, "@alice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unauthenticated_connections_is_bounded_and_loses_nothing() {
    raise_nofile();
    let ctl = Control::start(&["--auth-timeout", "2s", "--max-preauth", "100"]);
    let (ha, hb) = (ctl.identity("@alice"), ctl.identity("@bob"));
    // Something stored before the flood, to check it is still there after.
    {
        let (a, _i) = ControlClient::connect(&Home::new(&ha), &"@alice".parse().unwrap()).await.unwrap();
        a.send(&"@bob".parse::<Name>().unwrap(), b"before the flood", Duration::from_secs(600)).await.unwrap();
    }
    let pid = ctl.pid();
    let rss_before = rss_kib(pid);
    let fds_before = fd_count(pid);

    let mut conns = Vec::new();
    for _ in 0..2000 {
        match TcpStream::connect(ctl.addr).await {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connect failed: {e}"),
        }
    }
    // The server holds at most its pre-auth limit of them (plus those in the accept queue
    // that it has not reached yet, which it closes as it does).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = fd_count(pid);
    assert!(fds <= fds_before + 100 + 20, "server holds {fds} fds (before: {fds_before})");

    // Every one of them ends: those over the limit at once, the rest at the auth deadline.
    let t = Instant::now();
    let mut closed = 0;
    for mut s in conns {
        if until_closed(&mut s, Duration::from_secs(6)).await.is_some() {
            closed += 1;
        }
    }
    assert_eq!(closed, 2000);
    assert!(t.elapsed() < Duration::from_secs(8));
    assert!(wait_until(Duration::from_secs(3), || fd_count(pid) <= fds_before + 2), "fds: {}", fd_count(pid));
    let rss_after = rss_kib(pid);
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");

    // Nothing lost, and the server serves as before.
    let (_b, mut bi) = ControlClient::connect(&Home::new(&hb), &"@bob".parse().unwrap()).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), bi.recv()).await.unwrap().unwrap();
    assert_eq!(m.payload, b"before the flood");
}
