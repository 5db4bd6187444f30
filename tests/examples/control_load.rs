//! The control plane under load, on this machine: N simulated devices (real keys, real TLS, real
//! challenge–response authentication through `np-control-client`) against real `np-control`
//! processes, in three set-ups measured in one run: one node on redb, one node on PostgreSQL,
//! and two nodes on one PostgreSQL database (a throwaway cluster the tool starts). For each it
//! prints:
//! - memory (RSS) per connected device on each node;
//! - the connect storm: from SIGKILL of a node (restarted at once on the same port) until every
//!   device is connected again;
//! - notification latency, p50 and p99 (across nodes in the two-node set-up: senders on one
//!   node, recipients on the other);
//! - the session-request rate: request and signed answer round trips per second;
//! - whether every node is still up after the storm, and its connection and handshake counts;
//!
//! then the PostgreSQL set-ups as ratios to the redb one. Used by `scripts/bench.sh` (section
//! `control`); not a test.
//!
//! ```text
//! control_load [-n 500] [--bin DIR] [--only redb1,pg1,pg2]
//! ```
//!
//! Each device is enrolled the way the server enrols one (a one-time code stored, then redeemed
//! with the device's public keys, each a transaction of the node's store) before its nodes
//! start, so 10,000 enrolments take seconds instead of 10,000 round trips; nothing in the server
//! is bypassed once it runs. It needs about N + 500 open files in this process and N/K + 200 in
//! each node (`ulimit -n` is checked before anything starts).

use anyhow::{bail, ensure, Context, Result};
use np_control::store::{Location, Quota, Store};
use np_control_client::{ControlClient, Incoming};
use np_identity::home::{ControlConfig, Home};
use np_identity::Name;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Devices that take part in the latency and rate measurements, as sender and recipient pairs.
const PAIRS: usize = 50;
/// Notifications each sender times, one after the other.
const PINGS: usize = 20;
/// How long the session-request rate is measured.
const RATE_FOR: Duration = Duration::from_secs(5);
/// Longest wait for every device to be connected (first connect, or after the storm).
const CONNECT_DEADLINE: Duration = Duration::from_secs(300);
/// First connections in flight at once (the storm itself is left to the clients' own backoff).
const CONNECTING: usize = 256;
/// Enrolments in flight at once, and PostgreSQL handles enrolling side by side.
const ENROLLING: usize = 512;
const PG_ENROLLERS: usize = 8;
/// The device record each device publishes and holds present, as `npd` does.
const DEVICE_KEY: &str = "device/load";
/// The metrics series of a node's authenticated connections.
const AUTHENTICATED: &str = "np_control_connections{state=\"authenticated\"}";

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned()
}

/// Open files this process may have.
fn nofile_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One `np-control serve` process.
struct Node {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    data: PathBuf,
    store: String,
    bin: PathBuf,
}

impl Node {
    fn spawn(bin: &Path, data: &Path, store: &str, listen: &str, metrics: Option<SocketAddr>) -> Result<Node> {
        std::fs::create_dir_all(data)?;
        let metrics = match metrics {
            Some(m) => m,
            None => SocketAddr::from(([127, 0, 0, 1], np_tests::free_port())),
        };
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", listen, "--store", store, "--metrics", &metrics.to_string(), "--data"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        match np_tests::spawn_listening(cmd, &data.join("control.log")) {
            Some((child, addr)) => {
                Ok(Node { child, addr, metrics, data: data.to_path_buf(), store: store.into(), bin: bin.into() })
            }
            None => {
                let log = std::fs::read_to_string(data.join("control.log")).unwrap_or_default();
                bail!("np-control did not start: {}", log.lines().last().unwrap_or(""))
            }
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then the same node again on the same port (retried while the port lingers).
    fn crash_and_restart(&mut self) -> Result<()> {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Node::spawn(&self.bin, &self.data, &self.store, &self.addr.to_string(), Some(self.metrics)) {
                Ok(n) => {
                    // The old value's drop only reaps a process already gone.
                    *self = n;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// How often the node closed unauthenticated connections beyond its `--max-preauth` (its
    /// log says so each time).
    fn shed(&self) -> usize {
        let log = std::fs::read_to_string(self.data.join("control.log")).unwrap_or_default();
        log.matches("too many unauthenticated connections").count()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// One series from the node's metrics endpoint (`name` or `name{label="value"}`), summed
    /// over the labels not given.
    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let values: Vec<f64> = body
            .lines()
            .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One set-up to measure.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Redb1,
    Pg1,
    Pg2,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Redb1 => "one node, redb",
            Setup::Pg1 => "one node, PostgreSQL",
            Setup::Pg2 => "two nodes, PostgreSQL",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Setup::Redb1 => "redb1",
            Setup::Pg1 => "pg1",
            Setup::Pg2 => "pg2",
        }
    }
}

/// What one set-up measured.
#[derive(Default)]
struct Figures {
    enrol: Duration,
    kib_per_device: Vec<(u64, f64)>,
    storm: Option<Duration>,
    p50_ms: f64,
    p99_ms: f64,
    rate: f64,
}

/// The simulated devices: names and homes (keys made once, reused by every set-up).
struct Fleet {
    names: Vec<Name>,
    homes: Vec<Home>,
    cert_sha256: String,
}

impl Fleet {
    fn create(root: &Path, n: usize, cert_sha256: String) -> Result<Fleet> {
        let (mut names, mut homes) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let name: Name = format!("@load{i}").parse()?;
            let home = Home::new(root.join(format!("d{i}")));
            home.create_keys(&name)?;
            names.push(name);
            homes.push(home);
        }
        Ok(Fleet { names, homes, cert_sha256 })
    }

    /// Points device `i` at `address` (one node, or a comma-separated list).
    fn aim(&self, i: usize, address: &str) -> Result<()> {
        let cfg = ControlConfig { address: address.into(), cert_sha256: self.cert_sha256.clone() };
        Ok(self.homes[i].save_control(&self.names[i], &cfg)?)
    }
}

/// Enrols every device in the store at `at`, as the server does: a code issued, then redeemed
/// with the device's public keys.
async fn enrol_all(fleet: &Fleet, at: &Location) -> Result<Duration> {
    let started = Instant::now();
    let handles = match at {
        Location::Embedded(_) => 1,
        Location::Postgres(_) => PG_ENROLLERS,
    };
    let mut stores = Vec::new();
    for _ in 0..handles {
        stores.push(Arc::new(Store::open(at, Quota::default()).await.context("opening the store")?));
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(ENROLLING));
    let mut tasks = Vec::new();
    for (i, (name, home)) in fleet.names.iter().zip(&fleet.homes).enumerate() {
        let store = stores[i % handles].clone();
        let keys = home.load_keys(name)?.public();
        let (name, gate) = (name.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut secret = [0u8; 16];
            np_identity::random_bytes(&mut secret)?;
            let now = np_control::now_ms();
            store.issue_code(&name, secret, now + 3_600_000).await?;
            store.enroll(secret, &name, keys, now).await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// A connected device: its client, and its notifications (taken by the pairs' tasks).
struct Device {
    client: ControlClient,
    incoming: Option<Incoming>,
}

async fn connect_all(fleet: &Fleet) -> Result<Vec<Device>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut tasks = Vec::new();
    for (name, home) in fleet.names.iter().zip(&fleet.homes) {
        let (name, home, gate) = (name.clone(), home.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let deadline = Instant::now() + CONNECT_DEADLINE;
            // A node that is shedding unauthenticated connections refuses some: try again.
            let (client, incoming) = loop {
                match ControlClient::connect(&home, &name).await {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Err(e).with_context(|| format!("connecting {name}")),
                }
            };
            client.publish(DEVICE_KEY, b"load".to_vec(), Vec::new()).await?;
            client.hold(DEVICE_KEY).await?;
            anyhow::Ok(Device { client, incoming: Some(incoming) })
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

async fn all_connected(devices: &[Device], deadline: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if devices.iter().all(|d| d.client.connected()) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Notification latency (p50, p99 in ms) from each sender to its recipient, then the rate of
/// session-request round trips (request, answer) over [`RATE_FOR`]. Pairs are devices
/// `(i, PAIRS + i)`: recipients first.
async fn pairs(devices: &mut [Device], pairs: usize) -> Result<(f64, f64, f64)> {
    let answers = Arc::new(AtomicU64::new(0));
    let mut rx_tasks = Vec::new();
    let mut tx_tasks = Vec::new();
    for i in 0..pairs {
        // The recipient tells its sender when each ping arrived, and answers each request.
        let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel::<Instant>(1);
        let mut inc = devices[i].incoming.take().context("incoming taken")?;
        let (me, back) = (devices[i].client.clone(), devices[pairs + i].client.me().clone());
        rx_tasks.push(tokio::spawn(async move {
            while let Some(m) = inc.recv().await {
                match m.payload.first() {
                    Some(b'L') => {
                        let _ = arrived_tx.send(Instant::now()).await;
                    }
                    Some(b'R') => {
                        let _ = me.send(&back, &[b'A'; REQUEST_SIZE], TTL).await;
                    }
                    _ => {}
                }
            }
        }));
        let c = devices[pairs + i].client.clone();
        let mut inc = devices[pairs + i].incoming.take().context("incoming taken")?;
        let to = devices[i].client.me().clone();
        let answers = answers.clone();
        tx_tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(PINGS);
            for _ in 0..PINGS {
                let before = Instant::now();
                c.send(&to, &[b'L'; REQUEST_SIZE], TTL).await?;
                match tokio::time::timeout(Duration::from_secs(10), arrived.recv()).await {
                    Ok(Some(at)) => latencies.push(at.duration_since(before).as_secs_f64() * 1000.0),
                    _ => bail!("a notification did not arrive within 10 s"),
                }
            }
            // Session requests: each answered before the next is sent.
            let end = Instant::now() + RATE_FOR;
            while Instant::now() < end {
                c.send(&to, &[b'R'; REQUEST_SIZE], TTL).await?;
                match tokio::time::timeout(Duration::from_secs(10), inc.recv()).await {
                    Ok(Some(_)) => answers.fetch_add(1, Ordering::Relaxed),
                    _ => bail!("no answer to a session request within 10 s"),
                };
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut l = Vec::new();
    for t in tx_tasks {
        l.extend(t.await??);
    }
    for t in rx_tasks {
        t.abort();
    }
    l.sort_by(f64::total_cmp);
    ensure!(!l.is_empty(), "no notification arrived");
    // Every sender ran its requests for RATE_FOR (plus its last round trip).
    Ok((percentile(&l, 0.5), percentile(&l, 0.99), answers.load(Ordering::Relaxed) as f64 / RATE_FOR.as_secs_f64()))
}

/// A session request's size on the wire is about this (sealed, signed).
const REQUEST_SIZE: usize = 300;
const TTL: Duration = Duration::from_secs(60);

async fn run_setup(
    setup: Setup,
    fleet: &Fleet,
    work: &Path,
    bin: &Path,
    pg: Option<&np_testpg::TempPostgres>,
    tls_dir: &Path,
) -> Result<Figures> {
    let dir = work.join(setup.key());
    let nodes_n = if setup == Setup::Pg2 { 2 } else { 1 };
    let store = match (setup, pg) {
        (Setup::Redb1, _) => "redb".to_string(),
        (_, Some(pg)) => {
            pg.create_db(setup.key()).map_err(anyhow::Error::msg)?;
            pg.url(setup.key())
        }
        (_, None) => bail!("no PostgreSQL"),
    };
    let datas: Vec<PathBuf> = (0..nodes_n).map(|k| dir.join(format!("node{k}"))).collect();
    for d in &datas {
        // One certificate for every node (one pin for the cluster), the same in every set-up.
        std::fs::create_dir_all(d)?;
        for f in ["cert.der", "key.der"] {
            std::fs::copy(tls_dir.join(f), d.join(f))?;
        }
    }
    let mut fig = Figures::default();
    let at = Location::parse(Some(&store), datas[0].join("control.redb"))?;
    fig.enrol = enrol_all(fleet, &at).await?;

    let mut nodes = Vec::new();
    for d in &datas {
        nodes.push(Node::spawn(bin, d, &store, "127.0.0.1:0", None)?);
    }
    let everywhere: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let (first, last) = (nodes[0].addr.to_string(), nodes[nodes_n - 1].addr.to_string());
    let pairs_n = PAIRS.min(fleet.names.len() / 4).max(1);
    for i in 0..fleet.names.len() {
        // Recipients of the timed pairs on the first node, their senders on the last; everyone
        // else knows every node and picks one at random.
        let address = match i {
            i if i < pairs_n => first.clone(),
            i if i < 2 * pairs_n => last.clone(),
            _ => everywhere.join(","),
        };
        fleet.aim(i, &address)?;
    }
    let baseline: Vec<u64> = nodes.iter().map(|n| np_tests::rss_kib(n.child.id())).collect();
    let mut devices = connect_all(fleet).await?;
    for (k, n) in nodes.iter().enumerate() {
        let held = n.metric(AUTHENTICATED).unwrap_or(0.0);
        let grew = np_tests::rss_kib(n.child.id()).saturating_sub(baseline[k]);
        fig.kib_per_device.push((held as u64, grew as f64 / held.max(1.0)));
    }

    let (p50, p99, rate) = pairs(&mut devices, pairs_n).await?;
    (fig.p50_ms, fig.p99_ms, fig.rate) = (p50, p99, rate);

    // The storm: the first node dies and comes straight back; every device reconnects by
    // itself (with its own backoff and jitter), to it or to the other node.
    let started = Instant::now();
    nodes[0].crash_and_restart()?;
    fig.storm = all_connected(&devices, CONNECT_DEADLINE).await.map(|_| started.elapsed());
    for (k, n) in nodes.iter_mut().enumerate() {
        let up = n.alive();
        println!(
            "  {}: node {k} after the storm: {}, {} connections, {} failed handshakes, {} times shed \
             unauthenticated connections over its limit, RSS {} MiB",
            setup.label(),
            if up { "up" } else { "DOWN" },
            n.metric(AUTHENTICATED).unwrap_or(f64::NAN),
            n.metric("np_control_handshake_failures_total").unwrap_or(f64::NAN),
            n.shed(),
            np_tests::rss_kib(n.child.id()) / 1024,
        );
    }
    drop(devices);
    Ok(fig)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize =
        arg(&args, "-n").map(|v| v.parse::<usize>()).transpose().context("-n takes a number")?.unwrap_or(500);
    ensure!(n >= 4, "-n must be at least 4");
    let bin = match arg(&args, "--bin") {
        Some(d) => PathBuf::from(d),
        None => np_tests::bin_dir(),
    }
    .join("np-control");
    ensure!(bin.exists(), "{} not found: build it (cargo build -p np-control) or give --bin DIR", bin.display());
    let only = arg(&args, "--only").unwrap_or_else(|| "redb1,pg1,pg2".into());
    let setups: Vec<Setup> =
        [Setup::Redb1, Setup::Pg1, Setup::Pg2].into_iter().filter(|s| only.split(',').any(|o| o == s.key())).collect();
    let need = n as u64 + 500;
    let have = nofile_limit();
    ensure!(have >= need, "{n} devices need about {need} open files here (ulimit -n is {have}): raise it first");

    let work = tempfile::Builder::new().prefix("np-load").tempdir()?;
    let tls = np_control::tls::TlsIdentity::load_or_create(work.path())?;
    let started = Instant::now();
    let fleet = Fleet::create(&work.path().join("homes"), n, tls.fingerprint())?;
    println!("control load: {n} devices, keys made in {:.1} s", started.elapsed().as_secs_f64());
    let pg = if setups.iter().any(|s| *s != Setup::Redb1) {
        Some(np_testpg::TempPostgres::start().map_err(anyhow::Error::msg)?.context("PostgreSQL is not installed")?)
    } else {
        None
    };

    let mut results = Vec::new();
    for s in setups {
        let f = run_setup(s, &fleet, work.path(), &bin, pg.as_ref(), work.path())
            .await
            .with_context(|| format!("set-up {}", s.label()))?;
        let per_node: Vec<String> =
            f.kib_per_device.iter().map(|(held, kib)| format!("{kib:.1} KiB ({held} connected)")).collect();
        println!(
            "control load, {}: {n} devices enrolled in {:.1} s; RSS per connected device {}; connect storm {}; \
             notification latency p50 {:.2} ms, p99 {:.2} ms; {:.0} session requests/s",
            s.label(),
            f.enrol.as_secs_f64(),
            per_node.join(", "),
            f.storm.map_or_else(|| "NOT ALL BACK".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            f.p50_ms,
            f.p99_ms,
            f.rate,
        );
        results.push((s, f));
    }
    if let Some((_, base)) = results.iter().find(|(s, _)| *s == Setup::Redb1) {
        for (s, f) in results.iter().filter(|(s, _)| *s != Setup::Redb1) {
            let kib =
                |f: &Figures| f.kib_per_device.iter().map(|(_, k)| k).sum::<f64>() / f.kib_per_device.len() as f64;
            let storm = |f: &Figures| f.storm.map_or(f64::NAN, |d| d.as_secs_f64());
            println!(
                "control load, {} / one node on redb: RSS per device {}, connect storm {}, latency p50 {}, p99 {}, \
                 session-request rate {}",
                s.label(),
                ratio(kib(f), kib(base)),
                ratio(storm(f), storm(base)),
                ratio(f.p50_ms, base.p50_ms),
                ratio(f.p99_ms, base.p99_ms),
                ratio(f.rate, base.rate),
            );
        }
    }
    Ok(())
}
