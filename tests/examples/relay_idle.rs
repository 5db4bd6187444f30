//! The relay holding many idle sessions, for the benchmark (`scripts/bench.sh`, section `idle`):
//! joins N sessions from each side (two identities, 2·N authenticated connections), waits until
//! every one is paired, prints how long that took and the relay's resident memory, and exits.
//!
//!   relay_idle --relay 198.18.0.2:7449 --sessions 10000 --relay-pid PID \
//!              --client-home H1 --client @a --device-home H2 --device @b
//!
//! Joins are paced by `--in-flight` (connections between connect and `Paired` at once): the
//! relay refuses beyond its pre-authentication limit (default 1024), and the sessions each
//! identity may hold must be raised on the relay for this (`--max-sessions-per-identity`,
//! `--max-sessions`). This process holds 2·N sockets: its open-files limit must allow them.

use anyhow::{bail, Context, Result};
use np_identity::home::Home;
use np_identity::{Keys, Name};
use np_relay::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// One side's identity and keys.
struct Side {
    me: Name,
    keys: Keys,
    peer: Name,
    role: Role,
}

struct Args {
    relay: SocketAddr,
    sessions: u64,
    in_flight: usize,
    relay_pid: Option<u32>,
    client: (PathBuf, Name),
    device: (PathBuf, Name),
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut relay, mut sessions, mut in_flight, mut relay_pid) = (None, 10_000, 256, None);
    let (mut ch, mut c, mut dh, mut d) = (None, None, None, None);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--relay" => relay = Some(v.parse().context("--relay")?),
            "--sessions" => sessions = v.parse().context("--sessions")?,
            "--in-flight" => in_flight = v.parse().context("--in-flight")?,
            "--relay-pid" => relay_pid = Some(v.parse().context("--relay-pid")?),
            "--client-home" => ch = Some(PathBuf::from(v)),
            "--client" => c = Some(v.parse::<Name>().map_err(|e| anyhow::anyhow!("--client: {e}"))?),
            "--device-home" => dh = Some(PathBuf::from(v)),
            "--device" => d = Some(v.parse::<Name>().map_err(|e| anyhow::anyhow!("--device: {e}"))?),
            other => bail!("unknown flag {other}"),
        }
    }
    let (Some(relay), Some(ch), Some(c), Some(dh), Some(d)) = (relay, ch, c, dh, d) else {
        bail!(
            "usage: relay_idle --relay ADDR [--sessions N] [--in-flight N] [--relay-pid PID] \
             --client-home DIR --client @A --device-home DIR --device @B"
        );
    };
    Ok(Args { relay, sessions, in_flight, relay_pid, client: (ch, c), device: (dh, d) })
}

fn session_id(n: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(b"np-idle\0");
    s[8..].copy_from_slice(&n.to_be_bytes());
    s
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn join(relay: SocketAddr, side: &Side, n: u64) -> Result<TcpStream> {
    let tcp = TcpStream::connect(relay).await.with_context(|| format!("connecting to {relay}"))?;
    np_relay::join_with_timeout(
        tcp,
        &side.keys,
        &side.me,
        side.role,
        session_id(n),
        &side.peer,
        None,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| format!("joining session {n} as {}", side.me))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let load = |(home, me): &(PathBuf, Name), peer: &Name, role| -> Result<Arc<Side>> {
        let keys = Home::resolve(Some(home.as_path())).load_keys(me)?;
        Ok(Arc::new(Side { me: me.clone(), keys, peer: peer.clone(), role }))
    };
    let client = load(&args.client, &args.device.1, Role::Client)?;
    let device = load(&args.device, &args.client.1, Role::Device)?;
    let before = args.relay_pid.and_then(rss_kib);

    let gate = Arc::new(Semaphore::new(args.in_flight));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for n in 0..args.sessions {
        for side in [client.clone(), device.clone()] {
            // The permit is taken before the task starts, so no more than `in_flight` sockets
            // are ever between connect and Paired (connect included).
            let permit = gate.clone().acquire_owned().await?;
            let relay = args.relay;
            tasks.spawn(async move {
                let r = join(relay, &side, n).await;
                drop(permit);
                r
            });
        }
    }
    let mut held = Vec::with_capacity(2 * args.sessions as usize);
    let mut failed = 0u64;
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("relay_idle: {e:#}");
                }
            }
        }
    }
    let took = start.elapsed();
    // Let the relay finish its own bookkeeping for the last pairs before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = args.relay_pid.and_then(rss_kib);
    let paired = held.len() as u64 / 2;
    println!(
        "relay holding {paired} idle sessions ({} authenticated connections): paired in {:.2} s \
         ({:.0} sessions/s), {failed} joins failed",
        held.len(),
        took.as_secs_f64(),
        paired as f64 / took.as_secs_f64().max(1e-9),
    );
    if let (Some((rss0, _)), Some((rss, hwm))) = (before, after) {
        let per = (rss.saturating_sub(rss0) as f64 * 1024.0) / paired.max(1) as f64;
        println!(
            "relay RSS holding them: {:.1} MiB (peak {:.1} MiB, {:.1} MiB before; {:.1} KiB per \
             session; at that rate 10,000 sessions: {:.0} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            rss0 as f64 / 1024.0,
            per / 1024.0,
            (rss0 as f64 * 1024.0 + per * 10_000.0) / 1048576.0,
        );
    }
    drop(held);
    if failed > 0 {
        bail!("{failed} joins failed");
    }
    Ok(())
}
