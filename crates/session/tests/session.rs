//! End-to-end sessions over real loopback TCP: a client session, a device session dialling a
//! real echo server, and a tampering proxy.

use std::time::Duration;

use np_session::frame::Frame;
use np_session::record::{Sealer, DEFAULT_RECORDS_PER_KEY};
use np_session::{
    client_session, device_session, DeviceSession, FlowStream, MuxConfig, OpenError, SessionError, SessionHandle,
    SessionKeys,
};
use ring::digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(120);

fn keys() -> (SessionKeys, SessionKeys) {
    np_session::in_memory_pair(b"np test session").expect("handshake")
}

async fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Serves flows like the daemon will: "refuse:*" is refused, "hold:*" is accepted and never
/// read, anything else is dialled.
fn serve_device(mut dev: DeviceSession) -> tokio::task::JoinHandle<DeviceSession> {
    tokio::spawn(async move {
        let mut held: Vec<FlowStream> = Vec::new();
        while let Some(inc) = dev.next_flow().await {
            let target = inc.target().to_owned();
            if target.starts_with("refuse:") {
                inc.refuse("target not permitted");
            } else if target.starts_with("hold:") {
                held.push(inc.accept().expect("accept"));
            } else {
                match TcpStream::connect(&target).await {
                    Ok(tcp) => {
                        let _ = inc.accept_with(tcp);
                    }
                    Err(e) => inc.refuse(&format!("connect failed: {e}")),
                }
            }
        }
        dev
    })
}

/// A connected client/device pair over loopback.
async fn pair(config: MuxConfig) -> (SessionHandle, tokio::task::JoinHandle<DeviceSession>) {
    pair_with(config.clone(), config).await
}

/// A pair whose two ends are configured differently.
async fn pair_with(
    client_config: MuxConfig,
    device_config: MuxConfig,
) -> (SessionHandle, tokio::task::JoinHandle<DeviceSession>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (ck, dk) = keys();
    let (client_tcp, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (device_tcp, _) = accepted.expect("accept");
    let client = client_session(client_tcp.expect("connect"), ck, client_config);
    let device = device_session(device_tcp, dk, device_config);
    (client, serve_device(device))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `total` bytes of a pattern through `flow`, reads the echo, returns both SHA-256s.
async fn echo_through(flow: FlowStream, total: usize, seed: u64) -> (Vec<u8>, Vec<u8>, usize) {
    let (mut r, mut w) = tokio::io::split(flow);
    let writer = tokio::spawn(async move {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let chunk = pattern(seed, 256 * 1024);
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            // Vary the data per chunk so reordering would show.
            let mut c = chunk[..n].to_vec();
            c[0] = (sent / chunk.len()) as u8;
            ctx.update(&c);
            w.write_all(&c).await.expect("write");
            sent += n;
        }
        w.shutdown().await.expect("shutdown");
        ctx.finish().as_ref().to_vec()
    });
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        got += n;
    }
    let sent = writer.await.expect("writer");
    (sent, ctx.finish().as_ref().to_vec(), got)
}

/// Writes `data` into `flow` (then half-closes it) while collecting what comes back, until end of
/// stream (`Ok`) or an error; for sessions expected to break part-way.
async fn send_and_collect(flow: FlowStream, data: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(flow);
    tokio::spawn(async move {
        let _ = w.write_all(&data).await;
        let _ = w.shutdown().await;
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(LIMIT, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("in time");
    (end, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_through_one_flow() {
    let echo = echo_server().await;
    let (client, _dev) = pair(MuxConfig::default()).await;
    let flow = client.open(&echo).await.expect("open");
    let total = 64 << 20;
    let start = std::time::Instant::now();
    let (sent, got, n) = tokio::time::timeout(LIMIT, echo_through(flow, total, 1)).await.expect("in time");
    let secs = start.elapsed().as_secs_f64();
    eprintln!("64 MiB echoed in {secs:.2}s ({:.0} Mbit/s each way)", total as f64 * 8.0 / secs / 1e6);
    assert_eq!(n, total);
    assert_eq!(sent, got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_rekeying_every_eight_records_carries_flows_byte_exact() {
    // 16 MiB each way in records of up to 64 KiB: hundreds of key changes in both directions,
    // with several flows interleaving records, over real TCP.
    let echo = echo_server().await;
    let config = MuxConfig { records_per_key: 8, ..MuxConfig::default() };
    let (client, _dev) = pair(config).await;
    let mut flows = Vec::new();
    for seed in 0..4u64 {
        let flow = client.open(&echo).await.expect("open");
        flows.push(tokio::spawn(echo_through(flow, 4 << 20, 10 + seed)));
    }
    for f in flows {
        let (sent, got, n) = tokio::time::timeout(LIMIT, f).await.expect("in time").expect("flow task");
        assert_eq!(n, 4 << 20);
        assert_eq!(sent, got);
    }
    assert!(client.error().is_none(), "session failed: {:?}", client.error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_that_rekey_at_different_records_fail_closed() {
    // Proves the driver really changes keys at the interval: if it ignored `records_per_key`,
    // these mismatched ends would still talk. They must instead fail authentication at the
    // first record past the shorter interval, and no byte after it reaches the application.
    let echo = echo_server().await;
    let (client, _dev) = pair_with(
        MuxConfig { records_per_key: 4, ..MuxConfig::default() },
        MuxConfig { records_per_key: 1 << 20, ..MuxConfig::default() },
    )
    .await;
    let flow = client.open(&echo).await.expect("open (records 0..3 share the first key)");
    let data = pattern(5, 1 << 20);
    let (end, got) = send_and_collect(flow, data.clone()).await;
    assert!(end.is_err(), "mismatched rekeying must end the flow in an error");
    assert!(got.len() < data.len());
    assert_eq!(&got[..], &data[..got.len()], "no wrong byte reaches the application");
    let err = tokio::time::timeout(LIMIT, client.closed()).await.expect("in time");
    assert!(matches!(err, SessionError::Crypto | SessionError::Closed(_) | SessionError::Io(_)), "client saw {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_flow_gets_reason() {
    let (client, _dev) = pair(MuxConfig::default()).await;
    match client.open("refuse:22").await {
        Err(OpenError::Refused(reason)) => assert_eq!(reason, "target not permitted"),
        other => panic!("expected refusal, got {other:?}"),
    }
    // The session is still usable.
    let echo = echo_server().await;
    let flow = client.open(&echo).await.expect("open");
    let (a, b, _) = echo_through(flow, 1000, 3).await;
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_flows_and_a_stalled_one() {
    let echo = echo_server().await;
    let config = MuxConfig { initial_window: 256 * 1024, ..MuxConfig::default() };
    let (client, _dev) = pair(config).await;

    // A flow the device accepts but never reads: its writer must block at the window...
    let mut stalled = client.open("hold:1").await.expect("open");
    let stalled_writer = tokio::spawn(async move {
        let chunk = vec![9u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            stalled.write_all(&chunk).await.expect("write");
            sent += chunk.len();
            if sent > (64 << 20) {
                return sent;
            }
        }
    });

    // ...while 50 other flows complete.
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let client = client.clone();
        let echo = echo.clone();
        tasks.push(tokio::spawn(async move {
            let flow = client.open(&echo).await.expect("open");
            echo_through(flow, 1 << 20, i + 10).await
        }));
    }
    for t in tasks {
        let (a, b, n) = tokio::time::timeout(LIMIT, t).await.expect("in time").expect("task");
        assert_eq!(n, 1 << 20);
        assert_eq!(a, b);
    }
    assert!(!stalled_writer.is_finished(), "stalled flow must be blocked by its window");
    stalled_writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_byte_ends_session_without_wrong_bytes() {
    let echo = echo_server().await;
    // client <-> proxy <-> device; the proxy flips one byte of the client->device stream.
    let dl = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let daddr = dl.local_addr().expect("addr");
    let pl = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let paddr = pl.local_addr().expect("addr");
    const FLIP_AT: usize = 300_000;
    tokio::spawn(async move {
        let (from_client, _) = pl.accept().await.expect("accept");
        let to_device = TcpStream::connect(daddr).await.expect("connect");
        let (mut cr, mut cw) = from_client.into_split();
        let (mut dr, mut dw) = to_device.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut dr, &mut cw).await;
            let _ = cw.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0usize;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (offset..offset + n).contains(&FLIP_AT) {
                buf[FLIP_AT - offset] ^= 0x01;
            }
            offset += n;
            if dw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = dw.shutdown().await;
    });
    let (ck, dk) = keys();
    let (client_tcp, accepted) = tokio::join!(TcpStream::connect(paddr), dl.accept());
    let (device_tcp, _) = accepted.expect("accept");
    let client = client_session(client_tcp.expect("connect"), ck, MuxConfig::default());
    let device = device_session(device_tcp, dk, MuxConfig::default());
    let dev_handle = device.handle().clone();
    let _dev = serve_device(device);

    let flow = client.open(&echo).await.expect("open");
    let total = 4 << 20;
    let data = pattern(7, total);
    let (end, got) = send_and_collect(flow, data.clone()).await;
    assert!(end.is_err(), "a tampered session must end in an error, not EOF");
    assert!(got.len() < total);
    assert_eq!(&got[..], &data[..got.len()], "no wrong byte reaches the application");
    let dev_err = tokio::time::timeout(LIMIT, dev_handle.closed()).await.expect("in time");
    assert!(matches!(dev_err, SessionError::Crypto), "device saw {dev_err:?}");
    assert!(client.error().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orderly_close_reaches_peer() {
    let (client, dev) = pair(MuxConfig::default()).await;
    let echo = echo_server().await;
    let flow = client.open(&echo).await.expect("open");
    client.close("bye");
    drop(flow);
    let dev = tokio::time::timeout(LIMIT, dev).await.expect("in time").expect("task");
    match dev.handle().closed().await {
        SessionError::Closed(reason) => assert_eq!(reason, "bye"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A peer that pings and never reads: the device's answers fill a small pipe and its writer
/// blocks. The session ends once nothing has been taken for the idle timeout (on a paused
/// clock), instead of holding the session (and its requester's share) forever; and the device's
/// reader, answering every Ping with at most one pending Pong, never stopped taking the Pings.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_is_ended_after_the_idle_timeout() {
    let (ck, dk) = keys();
    let (mine, theirs) = tokio::io::duplex(4096);
    let config = MuxConfig::default();
    let idle = config.idle_timeout;
    let dev = device_session(theirs, dk, config);
    let (_never_read, mut wr) = tokio::io::split(mine);
    let mut sealer = Sealer::with_counter(ck.send_key(), 0, DEFAULT_RECORDS_PER_KEY);
    let t0 = tokio::time::Instant::now();
    // Far more Pongs than the pipe holds: each Ping in its own record, so each gets answered,
    // at 5 a second (under the rate that counts as a flood).
    let mut pt = Vec::new();
    for id in 0..1_000u64 {
        if dev.handle().error().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        pt.clear();
        Frame::Ping { id }.encode(&mut pt);
        let mut rec = Vec::new();
        sealer.seal(&pt, &mut rec).expect("seal");
        tokio::time::timeout(Duration::from_secs(1), wr.write_all(&rec))
            .await
            .expect("the device keeps reading Pings")
            .expect("write");
        tokio::task::yield_now().await;
    }
    let err = tokio::time::timeout(idle * 2, dev.handle().closed()).await.expect("the session ends");
    assert!(matches!(&err, SessionError::Io(e) if e.to_string().contains("read nothing")), "{err}");
    assert!(t0.elapsed() >= idle, "ended after {:?}, before the idle timeout", t0.elapsed());
}

/// A "relay" between two accepted connections: copies both ways until aborted, which closes
/// both (the relay process killed).
async fn relay_pair() -> (TcpStream, TcpStream, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b, accepted) = tokio::join!(TcpStream::connect(addr), TcpStream::connect(addr), async {
        let (x, _) = l.accept().await.expect("accept");
        let (y, _) = l.accept().await.expect("accept");
        (x, y)
    });
    let (mut x, mut y) = accepted;
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut x, &mut y).await;
    });
    (a.expect("connect"), b.expect("connect"), relay)
}

fn resuming() -> MuxConfig {
    MuxConfig { resume: Some(np_session::ResumeConfig::default()), ..MuxConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_survives_its_relay_dying_and_both_sides_resuming_over_a_new_one() {
    tokio::time::timeout(LIMIT, async {
        let echo = echo_server().await;
        let (ck, dk) = keys();
        let (c1, d1, relay1) = relay_pair().await;
        let client = client_session(c1, ck, resuming());
        let dev = device_session(d1, dk, resuming());
        let dev_handle = dev.handle().clone();
        let _served = serve_device(dev);
        let flow = client.open(&echo).await.expect("open");
        let total = 48 << 20;
        let transfer = tokio::spawn(echo_through(flow, total, 7));
        // Let some of it through, then kill the relay mid-transfer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay1.abort();
        client.transport_lost().await.expect("client suspended");
        dev_handle.transport_lost().await.expect("device suspended");
        assert!(!transfer.is_finished(), "the transfer waits: a stall, not an error");
        let (c2, d2, _relay2) = relay_pair().await;
        client.resume_with(c2).expect("client resumes");
        dev_handle.resume_with(d2).expect("device resumes");
        assert!(client.resumed().await.expect("resumed"), "{:?}", client.resume_error());
        assert!(dev_handle.resumed().await.expect("resumed"));
        let (sent, got, n) = transfer.await.expect("transfer");
        assert_eq!(n, total);
        assert_eq!(sent, got, "the echo's SHA-256 is right");
        assert!(client.error().is_none());
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_new_transport_is_refused_and_the_session_waits_for_its_peer() {
    tokio::time::timeout(LIMIT, async {
        let echo = echo_server().await;
        let (ck, dk) = keys();
        let (c1, d1, relay1) = relay_pair().await;
        let client = client_session(c1, ck, resuming());
        let dev = device_session(d1, dk, resuming());
        let dev_handle = dev.handle().clone();
        let _served = serve_device(dev);
        let mut flow = client.open(&echo).await.expect("open");
        flow.write_all(b"before").await.expect("write");
        let mut buf = [0u8; 6];
        flow.read_exact(&mut buf).await.expect("echo");
        relay1.abort();
        client.transport_lost().await.expect("suspended");
        dev_handle.transport_lost().await.expect("suspended");
        // The device restarted: another session's keys answer at the relay.
        let (_, stranger_keys) = keys();
        let (c2, d2, _relay2) = relay_pair().await;
        client.resume_with(c2).expect("resume");
        let (idle, _idle_peer) = tokio::io::duplex(64);
        let stranger = device_session(idle, stranger_keys, resuming());
        stranger.handle().resume_with(d2).expect("the stranger tries");
        assert!(!client.resumed().await.expect("still waiting"), "refused");
        assert!(
            matches!(client.resume_error(), Some(SessionError::ResumeRefused(r)) if r.contains("authenticate")),
            "{:?}",
            client.resume_error()
        );
        // The real device comes back.
        let (c3, d3, _relay3) = relay_pair().await;
        client.resume_with(c3).expect("resume");
        dev_handle.resume_with(d3).expect("resume");
        assert!(client.resumed().await.expect("resumed"));
        flow.write_all(b"after").await.expect("write");
        let mut buf = [0u8; 5];
        flow.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"after");
    })
    .await
    .expect("within the limit");
}

#[tokio::test(start_paused = true)]
async fn a_session_not_resumed_in_its_window_ends_and_its_flows_fail() {
    let (ck, dk) = keys();
    let (c1, d1, relay1) = relay_pair().await;
    let window = Duration::from_secs(30);
    let cfg = MuxConfig {
        resume: Some(np_session::ResumeConfig { window, ..np_session::ResumeConfig::default() }),
        ..MuxConfig::default()
    };
    let client = client_session(c1, ck, cfg.clone());
    let dev = device_session(d1, dk, cfg);
    let _served = serve_device(dev);
    let flow = client.open("hold:1").await.expect("open");
    relay1.abort();
    client.transport_lost().await.expect("suspended");
    let err = client.closed().await;
    assert!(matches!(err, SessionError::ResumeExpired(30)), "{err}");
    let (mut r, _w) = tokio::io::split(flow);
    assert!(r.read(&mut [0u8; 8]).await.is_err(), "the flow fails, as when a session ends");
}
