//! Measures raw forwarding throughput (no hashing) of both forwarding paths against a direct
//! loopback connection. A measurement, not a test: `cargo test -p np-relay --release --test
//! throughput -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use np_relay::RelayConfig;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOTAL: usize = 4 << 30;

async fn blast(mut tx: TcpStream, mut rx: TcpStream) -> f64 {
    let started = Instant::now();
    let send = async move {
        let chunk = vec![0x42u8; 256 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            tx.write_all(&chunk).await.unwrap();
        }
        tx.shutdown().await.unwrap();
        tx
    };
    let recv = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            let k = rx.read(&mut buf).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k;
        }
    };
    let (_tx, n) = tokio::join!(send, recv);
    assert_eq!(n, TOTAL);
    (TOTAL as f64 / (1 << 20) as f64) / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn forwarding_throughput() {
    for round in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let direct = blast(tx.unwrap(), rx.unwrap().0).await;
        let mut line = format!("round {round}: direct {direct:.0} MiB/s");
        for zero_copy in [false, true] {
            let w = world(RelayConfig { zero_copy, ..RelayConfig::default() }).await;
            let (c, d) = w.pair(session(1)).await;
            let mbps = blast(c, d).await;
            line += &format!(", relay zero_copy={zero_copy} {mbps:.0} MiB/s");
        }
        println!("{line}");
    }
}
