//! 1 GiB through the relay, hashed on both ends. Prints the throughput (a measurement, not an
//! assertion): run with `--nocapture` to see it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use np_relay::RelayConfig;
use ring::digest::{Context, SHA256};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 1 << 30;
const BLOCK: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_arrives_intact() {
    // Both forwarding paths, one after the other so they do not share the two cores.
    one_gib(false).await;
    one_gib(true).await;
}

async fn one_gib(zero_copy: bool) {
    let w = world(RelayConfig { zero_copy, ..RelayConfig::default() }).await;
    let (mut c, mut d) = w.pair(session(1)).await;

    // A pseudo-random block, varied per block by its index so reordering would show.
    let mut pattern = vec![0u8; BLOCK];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in pattern.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }

    let started = Instant::now();
    let send = async move {
        let mut h = Context::new(&SHA256);
        let mut block = pattern;
        for i in 0..TOTAL / BLOCK {
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            h.update(&block);
            c.write_all(&block).await.unwrap();
        }
        c.shutdown().await.unwrap();
        // The device sends nothing back; wait for its EOF so the relay has finished.
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        h.finish()
    };
    let recv = async move {
        let mut h = Context::new(&SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            let k = d.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
        }
        d.shutdown().await.unwrap();
        (n, h.finish())
    };
    let (sent, (got, received)) = tokio::join!(send, recv);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, TOTAL);
    assert_eq!(sent.as_ref(), received.as_ref());
    println!(
        "relay (zero_copy {zero_copy}): 1 GiB in {secs:.2} s = {:.0} MiB/s \
         (sender and receiver hash SHA-256 too)",
        (TOTAL as f64 / (1 << 20) as f64) / secs
    );
    w.idle().await;
}
