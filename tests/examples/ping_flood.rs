//! A permitted client that floods the device with Pings and never reads, for the benchmark
//! (`scripts/bench.sh`, section `abuse`): it measures what the flood costs everyone else.
//!
//!   ping_flood HOME @ME DEVICE@IDENTITY @RELAY TARGET
//!
//! Sets up a session the normal way and seals records full of Ping frames into it. The device
//! ends such a session for abuse within a record or two, so the flooder sets up the next one at
//! once, and so on until killed: a persistent attacker, who costs the device a session setup and
//! a few records per round. Prints when the first session is up, and each round's end.

use np_tests::hostile::{ping_record, HostilePeer};
use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [home, me, device, relay, target] = args.as_slice() else {
        anyhow::bail!("usage: ping_flood HOME @ME DEVICE@IDENTITY @RELAY TARGET");
    };
    let pt = ping_record();
    let t0 = Instant::now();
    let (mut sessions, mut failed, mut sent) = (0u64, 0u64, 0u64);
    loop {
        let mut peer = match HostilePeer::open(home.as_ref(), me, device, relay, std::slice::from_ref(target)).await {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                if sessions == 0 && failed >= 3 {
                    anyhow::bail!("no session: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        sessions += 1;
        if sessions == 1 {
            eprintln!("ping_flood: session up, flooding");
        }
        let why = loop {
            match peer.send(&pt, Duration::from_secs(5)).await {
                Ok(true) => sent += pt.len() as u64,
                Ok(false) => break "the device stopped reading".to_string(),
                Err(e) => break format!("the session ended: {e}"),
            }
        };
        if sessions.is_power_of_two() {
            eprintln!(
                "ping_flood: {sessions} sessions, {} KiB of Pings taken in {:?}; last: {why}",
                sent >> 10,
                t0.elapsed()
            );
        }
    }
}
