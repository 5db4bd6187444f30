//! A receiver that never reads stalls its own session only: another session moves 64 MiB
//! promptly meanwhile, and the relay's memory stays bounded (backpressure, not buffering).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use np_relay::RelayConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_slow_other_sessions() {
    let w = world(RelayConfig::default()).await;
    let rss_before = rss_bytes();

    // Session A: the client pushes as fast as it can; the device never reads.
    let (mut a_client, a_device) = w.pair(session(1)).await;
    let pushed = Arc::new(AtomicU64::new(0));
    let pusher = tokio::spawn({
        let pushed = pushed.clone();
        async move {
            let chunk = vec![0x5au8; 64 * 1024];
            loop {
                if a_client.write_all(&chunk).await.is_err() {
                    return;
                }
                pushed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    });
    // Let A fill every buffer between its client and its device.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pushed.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let stalled_at = pushed.load(Ordering::Relaxed);

    // Session B moves 64 MiB meanwhile.
    const N: usize = 64 << 20;
    let (mut b_client, mut b_device) = w.pair(session(2)).await;
    let started = Instant::now();
    let send = async move {
        let chunk = vec![0xa5u8; 256 * 1024];
        for _ in 0..N / chunk.len() {
            b_client.write_all(&chunk).await.unwrap();
        }
        b_client.shutdown().await.unwrap();
        b_client
    };
    let recv = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            let k = b_device.read(&mut buf).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k;
        }
    };
    let (_b_client, got) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
        .await
        .expect("session B stalled behind session A");
    let took = started.elapsed();
    assert_eq!(got, N);

    let rss_after = rss_bytes();
    let a_pushed = pushed.load(Ordering::Relaxed);
    println!(
        "slow reader: A stalled after {} KiB (still {} KiB); B moved 64 MiB in {took:?}; \
         rss before {} KiB, after {} KiB",
        stalled_at / 1024,
        a_pushed / 1024,
        rss_before / 1024,
        rss_after / 1024
    );
    // A is stuck at what the socket buffers and the relay's one buffer per direction hold.
    assert!(a_pushed < 32 << 20, "A pushed {a_pushed} bytes into a reader that never reads");
    assert!(rss_after.saturating_sub(rss_before) < 64 << 20);
    w.stats_until("only A forwarding", |s| s.forwarding == 1).await;
    pusher.abort();
    drop(a_device);
    w.idle().await;
}
