//! Impaired networks (root required): packet loss on either relay leg (nftables `numgen` drops
//! in the client's or the device's namespace), a delaying proxy on both relay legs and the
//! client's control-plane leg, and a partition of the device's leg longer than the keepalive
//! (the one in `faults.rs` stalls the relay leg of both sides at once, through one proxy).
//!
//! Hosts as in [`np_tests::netns`]: `np forward`/`np up` in pc, np-control and np-relay in pr,
//! npd and the test servers in pd. Times are printed, never asserted, except as lower bounds that
//! show an impairment was really in the path.
#![allow(clippy::unwrap_used)]

use np_tests::impair::{loss, partition, partition_host, redirect, DelayProxy, WireSizedPackets};
use np_tests::netns::{connect_in, read_all_hash, send_pattern, Deployment, DeploymentOptions};
use np_tests::servers::{pattern, pattern_sha256};
use np_tests::wait_until;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time: loss makes the transfers CPU-heavy, and the partition tests time what
/// each side notices; on two cores they would disturb one another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Share of packets dropped, each way, on an impaired leg.
const LOSS_PERCENT: u32 = 5;
/// Bytes moved each way per transfer.
const LEN: u64 = 8 << 20;
const DEVICE: &str = "pi4@alice_device";
/// Delay added each way on each delayed leg.
const DELAY_MS: u64 = 50;

/// Sends `msg` to an echo at `addr` from `ns` on a new connection; the time the answer took.
fn echo_from(ns: &str, addr: SocketAddr, msg: &[u8], timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut c = connect_in(ns, addr, timeout).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(timeout)).unwrap();
    c.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err("the echo came back different".into());
    }
    Ok(t.elapsed())
}

/// What one round through a fresh `np forward` (a new session) measured.
struct Round {
    /// Session setup as np forward's `-v` timed it (resolve, request, relay, handshake).
    session: Duration,
    /// From starting np forward until it listened (process start, control plane, session).
    ready: Duration,
    first: Duration,
    flows: Duration,
    up: Duration,
    down: Duration,
}

/// Starts `np forward -v` with `forwards` (so a new session); returns it, the time until it
/// listened, and the session setup time it printed.
fn timed_forward(d: &Deployment, forwards: &[&str], what: &str) -> (np_tests::stack::Forward, Duration, Duration) {
    let from = d.log("forward.log").len();
    let t = Instant::now();
    let fwd = d.forward(forwards, &["-v"]).unwrap_or_else(|log| panic!("{what}: np forward failed:\n{log}"));
    let ready = t.elapsed();
    let log = d.log("forward.log");
    // "   12.3 ms  session ready"
    let ms = log
        .get(from..)
        .and_then(|l| l.lines().find(|l| l.ends_with("session ready")))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|m| m.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{what}: np forward -v printed no session time:\n{}", &log[from.min(log.len())..]));
    (fwd, ready, Duration::from_secs_f64(ms / 1e3))
}

/// Starts a new `np forward` (so a new session), then through it: a first echo flow, 20 more
/// echo flows on the session, `LEN` bytes pc → pd and `LEN` bytes pd → pc, all SHA-256 checked.
/// Panics on any failure, with the forward's log.
fn forward_round(d: &Deployment, what: &str) -> Round {
    let pc = d.hosts.pc.clone();
    let forwards = [
        format!("0:localhost:{}", d.echo_port),
        format!("0:localhost:{}", d.hash_port),
        format!("0:localhost:{}", d.source_port),
    ];
    let (fwd, ready, session) = timed_forward(d, &forwards.iter().map(String::as_str).collect::<Vec<_>>(), what);
    let (echo_a, hash_a, src_a) = (fwd.addrs[0], fwd.addrs[1], fwd.addrs[2]);
    let wait = Duration::from_secs(20);
    let first = echo_from(&pc, echo_a, b"first flow", wait)
        .unwrap_or_else(|e| panic!("{what}: first flow: {e}\n{}", d.log("forward.log")));
    let t = Instant::now();
    for i in 0..20u64 {
        let msg = &pattern(i)[..4096];
        echo_from(&pc, echo_a, msg, wait).unwrap_or_else(|e| panic!("{what}: echo flow {i}: {e}"));
    }
    let flows = t.elapsed();
    let t = Instant::now();
    assert_eq!(send_pattern(&pc, hash_a, LEN), format!("{} {LEN}", pattern_sha256(LEN)), "{what}: pc -> pd");
    let up = t.elapsed();
    let t = Instant::now();
    assert_eq!(read_all_hash(&pc, src_a), (LEN, pattern_sha256(LEN)), "{what}: pd -> pc");
    let down = t.elapsed();
    eprintln!(
        "{what}: session setup {session:?} (np forward ready in {ready:?}), first flow {first:?}, 20 more flows \
         {flows:?}, {} MiB pc->pd {up:?}, pd->pc {down:?}",
        LEN >> 20
    );
    Round { session, ready, first, flows, up, down }
}

/// Sets up `n` more sessions (a new `np forward` each) and sends one echo through each; returns
/// their session setup times.
fn more_sessions(d: &Deployment, n: usize, what: &str) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let (fwd, _, session) = timed_forward(d, &[&format!("0:localhost:{}", d.echo_port)], what);
            echo_from(&d.hosts.pc, fwd.addrs[0], b"one more", Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{what}: session {i}: {e}\n{}", d.log("forward.log")));
            session
        })
        .collect()
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-6)
}

#[test]
fn loss_on_either_relay_leg_keeps_transfers_byte_exact_and_sessions_setting_up() {
    let _one = serial();
    let t0 = Instant::now();
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(LEN) });
    let relay = d.relay_addr;
    // Wire-sized packets on every host, the unimpaired round included, so 5 % of the packets is
    // 5 % of the segments.
    let _wire: Vec<WireSizedPackets> =
        [&d.hosts.pc, &d.hosts.pr, &d.hosts.pd].iter().map(|ns| WireSizedPackets::on(ns, "eth0")).collect();
    let base = forward_round(&d, "no loss");
    for (leg, ns) in [("client", d.hosts.pc.clone()), ("device", d.hosts.pd.clone())] {
        let what = format!("{LOSS_PERCENT}% loss each way on the {leg}'s relay leg");
        let rules = loss(&ns, relay, LOSS_PERCENT);
        let r = forward_round(&d, &what);
        let more = more_sessions(&d, 5, &what);
        let dropped = rules.packets();
        eprintln!(
            "{what}: {dropped} packets dropped; 5 more sessions set up in {more:?}; vs no loss: session x{:.1}, \
             ready x{:.1}, first flow x{:.1}, 20 flows x{:.1}, up x{:.1}, down x{:.1}",
            ratio(r.session, base.session),
            ratio(r.ready, base.ready),
            ratio(r.first, base.first),
            ratio(r.flows, base.flows),
            ratio(r.up, base.up),
            ratio(r.down, base.down),
        );
        // 16 MiB crossed this leg: at 5 % many packets must have been dropped, or the rules
        // missed the traffic and this round proved nothing.
        assert!(dropped > 100, "{what}: only {dropped} packets were dropped:\n{}", rules.listing());
    }

    // np up, with loss on both legs at once: a new session (set up on the first flow) through
    // the TUN, both directions.
    let (lc, ld) = (loss(&d.hosts.pc, relay, LOSS_PERCENT), loss(&d.hosts.pd, relay, LOSS_PERCENT));
    let up = d.up(&["--device", DEVICE]).unwrap_or_else(|e| panic!("np up under loss: {e}"));
    let dev = up.device(DEVICE);
    let pc = d.hosts.pc.clone();
    let first = echo_from(&pc, (dev, d.echo_port).into(), b"through np0", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("np up under loss, first flow: {e}\n{}", up.log()));
    let t_up = Instant::now();
    assert_eq!(send_pattern(&pc, (dev, d.hash_port).into(), LEN), format!("{} {LEN}", pattern_sha256(LEN)));
    let t_down = Instant::now();
    assert_eq!(read_all_hash(&pc, (dev, d.source_port).into()), (LEN, pattern_sha256(LEN)));
    let (dc, dd) = (lc.packets(), ld.packets());
    eprintln!(
        "np up, {LOSS_PERCENT}% loss each way on both legs: session + first flow {first:?}, {} MiB pc->pd {:?}, \
         pd->pc {:?} ({dc} + {dd} packets dropped)",
        LEN >> 20,
        t_down - t_up,
        t_down.elapsed(),
    );
    assert!(dc > 100 && dd > 100, "np up: too few packets dropped ({dc} on the client's leg, {dd} on the device's)");
    eprintln!("loss test: {:?}", t0.elapsed());
}

#[test]
fn delay_on_both_relay_legs_and_the_control_leg_keeps_setup_working_and_bytes_exact() {
    let _one = serial();
    let t0 = Instant::now();
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(LEN) });
    let pr = d.hosts.pr.clone();
    let base = forward_round(&d, "no delay");
    // A new np forward and a real ssh through it: from starting np forward to the command's output.
    let ssh_cold = |what: &str| {
        let t = Instant::now();
        let (fwd, _, _) = timed_forward(&d, &["0:localhost:22"], what);
        let out = d.ssh("127.0.0.1", fwd.addrs[0].port(), "echo ok");
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "{what}: ssh failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log("forward.log")
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        took
    };
    let base_ssh = ssh_cold("no delay");
    let base_warm = warm_echo(&d);

    // Each of the three legs goes through its own proxy in pr; nat steers the new connections
    // in by source address (the proxies reach the real ports from pr itself, not redirected).
    let delay = Duration::from_millis(DELAY_MS);
    let any = SocketAddr::from((d.hosts.pr_ip(), 0));
    let client_relay = DelayProxy::start(&pr, any, d.relay_addr, delay);
    let device_relay = DelayProxy::start(&pr, any, d.relay_addr, delay);
    let client_control = DelayProxy::start(&pr, any, d.control_addr, delay);
    let (rp, cp) = (d.relay_addr.port(), d.control_addr.port());
    let _nat = redirect(
        &pr,
        &[
            (d.hosts.pc_ip(), rp, client_relay.addr.port()),
            (d.hosts.pd_ip(), rp, device_relay.addr.port()),
            (d.hosts.pc_ip(), cp, client_control.addr.port()),
        ],
    );
    let what = format!("{delay:?} each way on both relay legs and the client's control leg");
    let r = forward_round(&d, &what);
    let warm = warm_echo(&d);
    let ssh = ssh_cold(&what);
    eprintln!(
        "{what}: session setup {:?} (no delay {:?}), np forward ready in {:?} (no delay {:?}), warm echo flow \
         {warm:?} (no delay {base_warm:?}), np forward + cold ssh {ssh:?} (no delay {base_ssh:?}), {} MiB up {:?} \
         (no delay {:?}), down {:?} (no delay {:?})",
        r.session,
        base.session,
        r.ready,
        base.ready,
        LEN >> 20,
        r.up,
        base.up,
        r.down,
        base.down
    );
    for (leg, p) in
        [("client relay", &client_relay), ("device relay", &device_relay), ("client control", &client_control)]
    {
        let (conns, bytes) = (p.conns.load(Ordering::SeqCst), p.bytes.load(Ordering::SeqCst));
        eprintln!("{leg} proxy: {conns} connections, {bytes} bytes");
        assert!(conns > 0 && bytes > 0, "nothing went through the {leg} proxy");
    }
    for p in [&client_relay, &device_relay] {
        assert!(p.bytes.load(Ordering::SeqCst) > 2 * LEN, "the transfers did not cross a delayed relay leg");
    }
    // The impairment was in the path: the session's handshake answer comes from the device
    // through both relay legs, and a warm echo crosses both legs twice.
    assert!(r.session >= 2 * delay, "session setup took {:?} with {delay:?} on each leg", r.session);
    assert!(warm >= 4 * delay, "a warm echo took {warm:?} with {delay:?} on each leg each way");
    eprintln!("delay test: {:?}", t0.elapsed());
}

/// One round trip of a new echo flow on a warm session (the second flow of a new np forward).
fn warm_echo(d: &Deployment) -> Duration {
    let fwd = d.forward(&[&format!("0:localhost:{}", d.echo_port)], &[]).unwrap_or_else(|log| panic!("{log}"));
    let wait = Duration::from_secs(20);
    echo_from(&d.hosts.pc, fwd.addrs[0], b"warm up", wait).unwrap();
    echo_from(&d.hosts.pc, fwd.addrs[0], b"warm", wait).unwrap()
}

/// Keepalive given to both sides in the partition tests: a session silent for three intervals
/// (3 s) is dead.
const KEEPALIVE: &str = "1s";
/// np forward's session setup timeout in the partition tests.
const SETUP_TIMEOUT: &str = "2s";
/// How long each side may take to notice: the 3 s idle timeout, twice.
const NOTICE: Duration = Duration::from_secs(6);

/// A deployment whose npd and `np forward` use [`KEEPALIVE`], with a live echo flow that has just
/// answered; returns them and the flow.
fn live_flow(d: &mut Deployment) -> (np_tests::stack::Forward, std::net::TcpStream) {
    let permit = d.permit();
    // Resumption off: these tests are about noticing a dead session and setting up a new one.
    d.start_npd(&["--manager", "@alice", "--permit-open", &permit, "--keepalive", KEEPALIVE, "--resume-window", "0"]);
    let fwd = d
        .forward(
            &[&format!("0:localhost:{}", d.echo_port)],
            &["--keepalive", KEEPALIVE, "--timeout", SETUP_TIMEOUT, "--resume-window", "0"],
        )
        .unwrap_or_else(|log| panic!("np forward: {log}"));
    let mut live = connect_in(&d.hosts.pc, fwd.addrs[0], Duration::from_secs(10)).unwrap();
    live.set_read_timeout(Some(NOTICE + Duration::from_secs(4))).unwrap();
    live.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap_or_else(|e| panic!("live flow: {e}\n{}", d.log("forward.log")));
    assert_eq!(&b, b"ping");
    (fwd, live)
}

/// During a partition that started at `cut`: the client's live flow must end, and npd must log a
/// keepalive timeout (in what it logged after `npd_from`), both within [`NOTICE`].
fn both_sides_notice(d: &Deployment, live: &mut std::net::TcpStream, cut: Instant, npd_from: usize, what: &str) {
    let mut b = [0u8; 4];
    let r = live.read(&mut b);
    let client = cut.elapsed();
    assert!(
        matches!(r, Ok(0)) || r.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "{what}: {r:?}"
    );
    assert!(client < NOTICE, "{what}: the client's flow ended only after {client:?}");
    let noticed = wait_until(NOTICE.saturating_sub(cut.elapsed()), || {
        d.log("npd.log").get(npd_from..).is_some_and(|l| l.contains("keepalive timeout"))
    });
    let device = cut.elapsed();
    assert!(
        noticed,
        "{what}: npd did not notice within {NOTICE:?}:\n{}",
        d.log("npd.log").get(npd_from..).unwrap_or("")
    );
    eprintln!("{what}: client's flow ended after {client:?} ({r:?}), npd noticed by {device:?}");
}

/// During the partition: a new flow (which needs a new session) fails within [`NOTICE`] (the
/// 2 s setup timeout and margin) instead of hanging; returns how long it took.
fn new_flow_fails(d: &Deployment, fwd: &np_tests::stack::Forward, what: &str) -> Duration {
    let from = d.log("forward.log").len();
    let t = Instant::now();
    let r = echo_from(&d.hosts.pc, fwd.addrs[0], b"during", NOTICE + Duration::from_secs(4));
    let took = t.elapsed();
    assert!(r.is_err(), "{what}: a new flow worked during the partition");
    assert!(took < NOTICE, "{what}: a new flow during the partition failed only after {took:?}: {r:?}");
    // What np forward said about it (printed, not asserted: the wording is np forward's).
    let mut said = String::new();
    wait_until(Duration::from_secs(1), || {
        let log = d.log("forward.log");
        said =
            log.get(from..).and_then(|l| l.lines().find(|l| l.contains("setting up a session"))).unwrap_or("").into();
        !said.is_empty()
    });
    eprintln!("{what}: a new flow failed after {took:?} ({r:?}); np forward: {said}");
    took
}

/// With the device's relay leg cut but its control leg up, a client that waits longer than npd's
/// 5 s bound on joining the relay is told why by npd ("cannot reach relay"), instead of seeing its
/// own timeout; returns how long the refusal took.
fn client_hears_npd_cannot_reach_the_relay(d: &Deployment, what: &str) -> Duration {
    // np forward sets up its first session before it listens, and exits with the reason if it
    // cannot.
    let from = d.log("forward.log").len();
    let t = Instant::now();
    let r = d.forward(&[&format!("0:localhost:{}", d.echo_port)], &["--keepalive", KEEPALIVE, "--timeout", "9s"]);
    let took = t.elapsed();
    assert!(r.is_err(), "{what}: np forward set up a session during the partition");
    let said = d.log("forward.log").get(from..).unwrap_or("").to_string();
    assert!(said.contains("cannot reach relay"), "{what}: np forward was not told npd cannot reach the relay:\n{said}");
    assert!(took < Duration::from_secs(8), "{what}: the refusal took {took:?} (npd bounds its relay join at 5 s)");
    took
}

/// After the partition healed: a new flow works (a new session) within `limit`; returns the time.
fn recovers(d: &Deployment, fwd: &np_tests::stack::Forward, limit: Duration, what: &str) -> Duration {
    let healed = Instant::now();
    let ok = wait_until(limit, || echo_from(&d.hosts.pc, fwd.addrs[0], b"after", Duration::from_secs(3)).is_ok());
    assert!(
        ok,
        "{what}: no new flow within {limit:?} of healing\nforward:\n{}\nnpd:\n{}",
        d.log("forward.log"),
        d.log("npd.log")
    );
    healed.elapsed()
}

#[test]
fn a_partition_of_the_device_relay_leg_is_noticed_by_both_sides_and_npd_recovers() {
    let _one = serial();
    let t0 = Instant::now();
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let (fwd, mut live) = live_flow(&mut d);
    let what = "partition of pd <-> relay";
    let npd_from = d.log("npd.log").len();
    let cut = Instant::now();
    let rules = partition(&d.hosts.pd, d.relay_addr);
    both_sides_notice(&d, &mut live, cut, npd_from, what);
    new_flow_fails(&d, &fwd, what);
    let refused_after = client_hears_npd_cannot_reach_the_relay(&d, what);
    let partitioned = cut.elapsed();
    // The keepalives (or the flow's own data) hit the rules: they were in the path.
    assert!(rules.packets() > 0, "{what}: nothing was dropped:\n{}", rules.listing());
    rules.remove();
    let back = recovers(&d, &fwd, Duration::from_secs(10), what);
    eprintln!(
        "{what}: partitioned {partitioned:?}; refusal after {refused_after:?}; new flow {back:?} after healing; test {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_partition_of_the_whole_device_host_is_noticed_by_both_sides_and_npd_recovers() {
    let _one = serial();
    let t0 = Instant::now();
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let (fwd, mut live) = live_flow(&mut d);
    let what = "partition of pd from pr (relay and control plane)";
    let npd_from = d.log("npd.log").len();
    let cut = Instant::now();
    let rules = partition_host(&d.hosts.pd, d.hosts.pr_ip());
    both_sides_notice(&d, &mut live, cut, npd_from, what);
    new_flow_fails(&d, &fwd, what);
    // Longer than the keepalive, and long enough that npd's control-plane connection backs off.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(cut.elapsed()));
    let partitioned = cut.elapsed();
    assert!(rules.packets() > 0, "{what}: nothing was dropped:\n{}", rules.listing());
    rules.remove();
    let back = recovers(&d, &fwd, Duration::from_secs(20), what);
    eprintln!("{what}: partitioned {partitioned:?}; new flow {back:?} after healing; test {:?}", t0.elapsed());
}
