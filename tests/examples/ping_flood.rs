//! A permitted client that floods its session with Pings and never reads, for the benchmark
//! (`scripts/bench.sh`, section `abuse`): it measures what the flood costs everyone else.
//!
//!   ping_flood HOME @ME DEVICE@IDENTITY @RELAY TARGET
//!
//! Sets up a session the normal way, then seals records full of Ping frames until killed or
//! until the device stops taking them. Prints the bytes it sent and why it stopped.

use np_tests::hostile::{ping_record, HostilePeer};
use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [home, me, device, relay, target] = args.as_slice() else {
        anyhow::bail!("usage: ping_flood HOME @ME DEVICE@IDENTITY @RELAY TARGET");
    };
    let mut peer = HostilePeer::open(home.as_ref(), me, device, relay, std::slice::from_ref(target)).await?;
    eprintln!("ping_flood: session up, flooding");
    let pt = ping_record();
    let t0 = Instant::now();
    let mut sent = 0u64;
    loop {
        match peer.send(&pt, Duration::from_secs(5)).await {
            Ok(true) => sent += pt.len() as u64,
            Ok(false) => {
                eprintln!("ping_flood: {} MiB in {:?}; the device stopped reading", sent >> 20, t0.elapsed());
                return Ok(());
            }
            Err(e) => {
                eprintln!("ping_flood: {} MiB in {:?}; the session ended: {e}", sent >> 20, t0.elapsed());
                return Ok(());
            }
        }
    }
}
