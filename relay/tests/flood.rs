//! Thousands of idle unauthenticated connections: all closed at the auth deadline, the relay's
//! pre-auth count back to zero, and memory bounded. Its own test binary (own process), so the
//! RSS measured is the relay's and this test's alone.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use np_relay::{RelayConfig, RelayMsg};
use np_wire::io::read_msg;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const CONNS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_preauth_flood_is_closed_at_the_deadline() {
    let w =
        world(RelayConfig { auth_deadline: Duration::from_secs(1), max_preauth: 4096, ..RelayConfig::default() }).await;
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        conns.push(TcpStream::connect(w.addr).await.unwrap());
    }
    let connected = started.elapsed();
    let peak = w.stats_until("all accepted", |s| s.preauth == CONNS).await;
    let rss_peak = rss_bytes();
    // Every connection: a Challenge, then "authentication timed out", then EOF.
    let mut tasks = Vec::with_capacity(CONNS);
    for mut s in conns {
        tasks.push(tokio::spawn(async move {
            let first = read_msg::<RelayMsg, _>(&mut s, 4096).await.unwrap();
            assert!(matches!(first, Some(RelayMsg::Challenge { .. })));
            let second = read_msg::<RelayMsg, _>(&mut s, 4096).await.unwrap();
            let third = read_msg::<RelayMsg, _>(&mut s, 4096).await.unwrap();
            (second, third, Instant::now())
        }));
    }
    for t in tasks {
        let (second, third, at) = tokio::time::timeout(Duration::from_secs(10), t).await.unwrap().unwrap();
        assert_eq!(second, Some(RelayMsg::Refused { reason: "authentication timed out".into() }));
        assert_eq!(third, None);
        assert!(at - started <= connected + Duration::from_secs(3));
    }
    let after = w.idle().await;
    let rss_after = rss_bytes();
    println!(
        "flood: {CONNS} connections in {connected:?}; peak {peak:?}; rss before {} KiB, \
         peak {} KiB, after {} KiB; after {after:?}",
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024
    );
    assert!(rss_peak.saturating_sub(rss_before) < 64 << 20);
    assert!(rss_after.saturating_sub(rss_before) < 64 << 20);
}
