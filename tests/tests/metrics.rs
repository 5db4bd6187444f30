//! The metrics endpoints of np-control and np-relay, scraped after real activity (enrolments,
//! a session through the relay, notifications delivered and queued, refusals), and fed garbage.
#![allow(clippy::unwrap_used)]

use np_tests::servers::echo;
use np_tests::stack::Stack;
use np_tests::{bin, free_port, np_keys_new, spawn_listening, wait_until, Proc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// `GET /metrics`: (status line, body).
fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        path != "/metrics" || head.contains("Content-Type: text/plain; version=0.0.4"),
        "Prometheus text format: {head}"
    );
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of one sample (`name` with its labels, exactly as rendered).
fn value(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"))
        .parse()
        .unwrap()
}

fn metrics(addr: SocketAddr) -> String {
    let (status, body) = scrape(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// Garbage, oversized and half-sent requests: each gets an error or a close, and the server
/// keeps serving.
fn garbage(addr: SocketAddr) {
    for junk in [&b"\x00\x01\x02\xff\xfe"[..], b"GET", b"BREW /pot HTCPCP/1.0\r\n\r\n", &[b'x'; 20_000]] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let head = String::from_utf8_lossy(&out);
        assert!(head.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    }
    // Connections that never finish their request, and one that says nothing at all.
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET /metr");
            s
        })
        .collect();
    assert_eq!(scrape(addr, "/other").0, "HTTP/1.1 404 Not Found");
    drop(idle);
}

#[test]
fn counters_after_real_activity_and_garbage() {
    let mut s = Stack::start();
    let control_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let relay_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    s.ctl.extra.extend(["--metrics".into(), control_metrics.to_string()]);
    s.ctl.restart();

    // The relay again, on the same port, with metrics.
    s.relay = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = Command::new(bin("np-relay"));
        cmd.args(["--as", "@relay", "--listen", &s.relay_addr.to_string(), "--metrics", &relay_metrics.to_string()])
            .arg("--home")
            .arg(&s.relay_home)
            .env("RUST_LOG", "debug");
        if let Some((child, _)) = spawn_listening(cmd, &s.relay_log()) {
            s.relay = Some(Proc(child));
            break;
        }
        assert!(Instant::now() < deadline, "np-relay did not restart");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Enrolments: one new identity, and a code used twice.
    let _bob = s.ctl.identity("@bob");
    let code = s.ctl.code("@dave");
    let ctl_addr = s.ctl.addr.to_string();
    assert!(np_keys_new(&s.dir().join("dave-1"), "@dave", &ctl_addr, &code).0);
    assert!(!np_keys_new(&s.dir().join("dave-2"), "@dave", &ctl_addr, &code).0);

    // A session through the relay, with bytes both ways.
    let port = echo();
    let _npd = s.npd("pi4", &["--manager", "@alice", "--permit-open", &format!("localhost:{port}")]);
    let fwd = s.forward("pi4@alice_device", &[&format!("0:localhost:{port}")], &[]).unwrap();
    let mut c = TcpStream::connect(fwd.addrs[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload = vec![7u8; 100_000];
    c.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);

    // A notification to an identity that is not connected: queued.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let home = np_identity::home::Home::new(&s.client_home);
        let (ctl, _incoming) =
            np_control_client::ControlClient::connect(&home, &"@alice".parse().unwrap()).await.unwrap();
        let sent = ctl.send(&"@bob".parse().unwrap(), b"for later", Duration::from_secs(3600)).await.unwrap();
        assert!(!sent.delivered);
    });

    // A Join the relay cannot parse: refused as malformed.
    let mut r = TcpStream::connect(s.relay_addr).unwrap();
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut challenge = [0u8; 4];
    r.read_exact(&mut challenge).unwrap();
    let len = u32::from_be_bytes(challenge) as usize;
    let mut rest = vec![0u8; len];
    r.read_exact(&mut rest).unwrap();
    r.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).unwrap();
    let mut refused = Vec::new();
    let _ = r.read_to_end(&mut refused);
    assert!(String::from_utf8_lossy(&refused).contains("malformed"), "{refused:?}");

    let m = metrics(control_metrics);
    for help in ["# HELP np_control_connections ", "# TYPE np_control_handshake_seconds histogram"] {
        assert!(m.contains(help), "{help} in\n{m}");
    }
    assert_eq!(value(&m, "np_control_enrolments_total{result=\"ok\"}"), 2.0, "{m}");
    assert_eq!(value(&m, "np_control_enrolments_total{result=\"code_used\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "np_control_refusals_total{code=\"code_used\"}"), 1.0, "{m}");
    assert!(value(&m, "np_control_authentications_total{result=\"ok\"}") >= 4.0, "relay, npd, np forward, alice: {m}");
    assert!(value(&m, "np_control_connections{state=\"authenticated\"}") >= 2.0, "npd and np forward: {m}");
    assert!(value(&m, "np_control_handshake_seconds_count") >= 4.0, "{m}");
    // The session request went at once (the device answers through the relay); the note to
    // @bob waits.
    assert!(value(&m, "np_control_notifications_accepted_total") >= 2.0, "{m}");
    assert!(value(&m, "np_control_notifications_delivered_at_once_total") >= 1.0, "{m}");
    assert_eq!(value(&m, "np_control_notifications_queued_total"), 1.0, "{m}");
    assert!(value(&m, "np_control_queue_depth") >= 1.0, "{m}");

    let m = metrics(relay_metrics);
    assert!(m.contains("# TYPE np_relay_handshake_seconds histogram"), "{m}");
    assert_eq!(value(&m, "np_relay_pairings_total"), 1.0, "{m}");
    assert_eq!(value(&m, "np_relay_handshake_seconds_count"), 1.0, "{m}");
    assert_eq!(value(&m, "np_relay_sessions{state=\"forwarding\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "np_relay_refusals_total{reason=\"malformed\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "np_relay_refusals_total{reason=\"bad_signature\"}"), 0.0, "{m}");
    // Ciphertext: at least the payload each way, plus the session's framing.
    assert!(value(&m, "np_relay_forwarded_bytes_total{direction=\"client_to_device\"}") >= 100_000.0, "{m}");
    assert!(value(&m, "np_relay_forwarded_bytes_total{direction=\"device_to_client\"}") >= 100_000.0, "{m}");

    // Garbage on both metrics ports: no panic, still serving, both servers still up.
    garbage(control_metrics);
    garbage(relay_metrics);
    assert!(metrics(control_metrics).contains("np_control_queue_depth"));
    assert!(metrics(relay_metrics).contains("np_relay_pairings_total 1"));
    assert!(s.relay.as_mut().unwrap().0.try_wait().unwrap().is_none(), "np-relay still running");
    assert!(s.ctl.child.try_wait().unwrap().is_none(), "np-control still running");
    for log in [s.ctl.log(), s.relay_log()] {
        assert!(!std::fs::read_to_string(&log).unwrap_or_default().contains("panicked"), "{}", log.display());
    }
    drop(fwd);
    assert!(wait_until(Duration::from_secs(10), || {
        value(&metrics(relay_metrics), "np_relay_sessions{state=\"forwarding\"}") == 0.0
    }));
}

#[test]
fn bad_metrics_address_is_a_clear_error() {
    let out = Command::new(bin("np-control"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics", "not-an-address", "--data"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics"), "{}", String::from_utf8_lossy(&out.stderr));
}
