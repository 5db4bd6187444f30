//! The connection on its own: no sockets, no tokio, a fake clock. Two connections talk through
//! byte buffers the test moves by hand, in whatever pieces it likes.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

fn keys() -> (SessionKeys, SessionKeys) {
    crate::in_memory_pair(b"test").expect("handshake")
}

/// A client and a device connection, the bytes in flight each way, and the clock.
struct Wire {
    now: Instant,
    client: Connection,
    device: Connection,
    to_device: Vec<u8>,
    to_client: Vec<u8>,
    client_events: Vec<ConnEvent>,
    device_events: Vec<ConnEvent>,
}

impl Wire {
    fn new(config: MuxConfig) -> Wire {
        let (ck, dk) = keys();
        let now = Instant::now();
        Wire {
            now,
            client: Connection::new(&ck, config.clone(), now),
            device: Connection::new(&dk, config, now),
            to_device: Vec::new(),
            to_client: Vec::new(),
            client_events: Vec::new(),
            device_events: Vec::new(),
        }
    }

    /// Collects both sides' output.
    fn transmit(&mut self) -> bool {
        let a = self.client.poll_transmit(self.now, &mut self.to_device, usize::MAX);
        let b = self.device.poll_transmit(self.now, &mut self.to_client, usize::MAX);
        a + b > 0
    }

    fn events(&mut self) {
        while let Some(e) = self.client.poll_event() {
            self.client_events.push(e);
        }
        while let Some(e) = self.device.poll_event() {
            self.device_events.push(e);
        }
    }

    /// Moves everything in flight, `step` bytes per call, until both sides are quiet.
    fn pump(&mut self, step: usize) {
        loop {
            self.transmit();
            if self.to_device.is_empty() && self.to_client.is_empty() {
                break;
            }
            for chunk in std::mem::take(&mut self.to_device).chunks(step) {
                self.device.handle_input(chunk, self.now);
            }
            for chunk in std::mem::take(&mut self.to_client).chunks(step) {
                self.client.handle_input(chunk, self.now);
            }
            self.events();
        }
        self.events();
    }

    /// Accepts every flow the client opened.
    fn accept_all(&mut self) -> Vec<(FlowId, String)> {
        let mut out = Vec::new();
        for e in std::mem::take(&mut self.device_events) {
            match e {
                ConnEvent::FlowOpened { flow, target } => {
                    self.device.accept(flow).expect("accept");
                    out.push((flow, target));
                }
                other => self.device_events.push(other),
            }
        }
        out
    }
}

fn read_all(c: &mut Connection, flow: FlowId) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 7];
    loop {
        match c.recv(flow, &mut buf).expect("recv") {
            Recv::Data(n) => out.extend_from_slice(&buf[..n]),
            Recv::Fin => return (out, true),
            Recv::Empty => return (out, false),
        }
    }
}

#[test]
fn byte_by_byte_open_send_finish_both_ways() {
    let mut w = Wire::new(MuxConfig::default());
    let flow = w.client.open("localhost:22").expect("open");
    assert_eq!(w.client.send(flow, b"SSH-2.0-client\r\n").expect("send"), 16);
    w.pump(1);
    let opened = w.accept_all();
    assert_eq!(opened, vec![(flow, "localhost:22".to_string())]);
    assert!(w.device_events.contains(&ConnEvent::Readable { flow }), "{:?}", w.device_events);
    assert_eq!(read_all(&mut w.device, flow), (b"SSH-2.0-client\r\n".to_vec(), false));

    w.device.send(flow, b"SSH-2.0-device\r\n").expect("send");
    w.device.finish(flow).expect("finish");
    w.pump(1);
    assert!(w.client_events.contains(&ConnEvent::FlowAccepted { flow }));
    assert_eq!(read_all(&mut w.client, flow), (b"SSH-2.0-device\r\n".to_vec(), true));

    w.client.finish(flow).expect("finish");
    w.pump(1);
    assert_eq!(read_all(&mut w.device, flow), (Vec::new(), true));
    assert!(!w.client.has_flow(flow) && !w.device.has_flow(flow), "both sides retire the flow");
    assert!(w.client.error().is_none() && w.device.error().is_none());
}

#[test]
fn credit_is_the_only_flow_control() {
    let config = MuxConfig { initial_window: 64 * 1024, ..MuxConfig::default() };
    let mut w = Wire::new(config);
    let flow = w.client.open("t:1").expect("open");
    w.pump(4096);
    w.accept_all();
    let data = vec![7u8; 200 * 1024];
    let n = w.client.send(flow, &data).expect("send");
    assert_eq!(n, 64 * 1024, "the window bounds what send takes");
    assert_eq!(w.client.send(flow, &data[n..]).expect("send"), 0);
    w.pump(1500);
    assert_eq!(w.device.recv_pending(flow), 64 * 1024, "held until read, no more");
    let (got, _) = read_all(&mut w.device, flow);
    assert_eq!(got.len(), 64 * 1024);
    w.pump(1500);
    assert!(w.client_events.contains(&ConnEvent::Writable { flow }), "credit came back");
    assert!(w.client.send(flow, &data[n..]).expect("send") > 0);
}

#[test]
fn refusal_and_reset_end_the_flow_not_the_session() {
    let mut w = Wire::new(MuxConfig::default());
    let a = w.client.open("no:1").expect("open");
    let b = w.client.open("yes:2").expect("open");
    w.pump(64);
    w.device.refuse(a, "not permitted").expect("refuse");
    w.device.accept(b).expect("accept");
    w.device_events.clear();
    w.pump(64);
    assert!(w.client_events.contains(&ConnEvent::FlowRefused { flow: a, reason: "not permitted".into() }));
    w.client.send(b, b"x").expect("send");
    w.device.abort(b, "target reset");
    w.pump(64);
    assert!(w.client_events.contains(&ConnEvent::FlowReset { flow: b, reason: "target reset".into() }));
    assert!(w.client.recv(b, &mut [0u8; 4]).is_err(), "a reset flow is gone");
    assert!(w.client.error().is_none() && w.device.error().is_none());
}

#[test]
fn end_of_stream_without_close_is_a_truncation_and_after_close_is_orderly() {
    let mut w = Wire::new(MuxConfig::default());
    w.client.open("t:1").expect("open");
    w.pump(100);
    w.device.handle_eof();
    assert!(matches!(w.device.error(), Some(SessionError::Truncated)), "{:?}", w.device.error());

    let mut w = Wire::new(MuxConfig::default());
    w.client.close("bye");
    w.pump(100);
    w.device.handle_eof();
    assert!(matches!(w.device.error(), Some(SessionError::Closed(r)) if r == "bye"), "{:?}", w.device.error());
    assert!(w.client.is_drained() && w.device.is_drained());
}

#[test]
fn a_cut_inside_a_record_is_a_truncation() {
    let mut w = Wire::new(MuxConfig::default());
    w.client.open("t:1").expect("open");
    w.transmit();
    let half = w.to_device.len() / 2;
    w.device.handle_input(&w.to_device[..half], w.now);
    w.device.handle_eof();
    assert!(matches!(w.device.error(), Some(SessionError::Truncated)), "{:?}", w.device.error());
}

#[test]
fn every_flipped_byte_ends_the_session() {
    let mut w = Wire::new(MuxConfig::default());
    let flow = w.client.open("t:1").expect("open");
    w.client.send(flow, b"hello").expect("send");
    w.transmit();
    let wire = w.to_device.clone();
    for i in 0..wire.len() {
        let (ck, dk) = keys();
        let now = Instant::now();
        let mut c = Connection::new(&ck, MuxConfig::default(), now);
        let mut d = Connection::new(&dk, MuxConfig::default(), now);
        let f = c.open("t:1").expect("open");
        c.send(f, b"hello").expect("send");
        let mut out = Vec::new();
        c.poll_transmit(now, &mut out, usize::MAX);
        assert_eq!(out.len(), wire.len());
        out[i] ^= 0x01;
        d.handle_input(&out, now);
        d.handle_eof();
        let err = d.error().expect("ended").clone();
        assert!(!matches!(err, SessionError::Closed(_)), "byte {i}: {err}");
        let mut events = Vec::new();
        while let Some(e) = d.poll_event() {
            events.push(e);
        }
        assert!(!events.iter().any(|e| matches!(e, ConnEvent::Readable { .. })), "byte {i}: tampered data delivered");
    }
}

#[test]
fn keepalive_and_idle_timeout_on_a_fake_clock() {
    let config = MuxConfig {
        keepalive_interval: Duration::from_secs(15),
        idle_timeout: Duration::from_secs(45),
        ..MuxConfig::default()
    };
    let mut w = Wire::new(config);
    // Both sides keep each other alive through pings for ten minutes of fake time.
    for _ in 0..40 {
        w.now += Duration::from_secs(15);
        w.client.handle_timeout(w.now);
        w.device.handle_timeout(w.now);
        w.pump(1000);
    }
    assert!(w.client.error().is_none() && w.device.error().is_none());
    // The device goes silent: the client's idle timer ends the session at 45 s.
    let deadline = w.client.poll_timeout().expect("a timer");
    assert!(deadline <= w.now + Duration::from_secs(45));
    for _ in 0..4 {
        w.now += Duration::from_secs(15);
        w.client.handle_timeout(w.now);
        w.client.poll_transmit(w.now, &mut Vec::new(), usize::MAX);
    }
    assert!(
        matches!(w.client.error(), Some(SessionError::Closed(r)) if r == "keepalive timeout"),
        "{:?}",
        w.client.error()
    );
    assert_eq!(w.client.poll_timeout(), None);
}

#[test]
fn discarded_flows_keep_credit_flowing_to_the_fin() {
    let config = MuxConfig { initial_window: 16 * 1024, ..MuxConfig::default() };
    let mut w = Wire::new(config);
    let flow = w.client.open("t:1").expect("open");
    w.pump(4096);
    w.accept_all();
    w.device.finish(flow).expect("finish");
    w.device.discard(flow);
    let data = vec![1u8; 100 * 1024];
    let mut sent = 0;
    for _ in 0..100 {
        sent += w.client.send(flow, &data[sent..]).expect("send");
        w.pump(4096);
        if sent == data.len() {
            break;
        }
    }
    assert_eq!(sent, data.len(), "credit kept coming although nobody reads");
    w.client.finish(flow).expect("finish");
    w.pump(4096);
    assert!(!w.device.has_flow(flow), "the flow retired after both Fins");
}

#[derive(Debug, Clone)]
enum Op {
    Send { flow: usize, len: usize },
    Finish { flow: usize },
    Deliver { to_device: bool, bytes: usize },
    Read { device: bool, flow: usize, max: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 1..20_000usize).prop_map(|(flow, len)| Op::Send { flow, len }),
        (0..4usize).prop_map(|flow| Op::Finish { flow }),
        (any::<bool>(), 1..50_000usize).prop_map(|(to_device, bytes)| Op::Deliver { to_device, bytes }),
        (any::<bool>(), 0..4usize, 1..30_000usize).prop_map(|(device, flow, max)| Op::Read { device, flow, max }),
    ]
}

/// What was sent and received per flow and direction (0: to the device, 1: to the client).
#[derive(Default)]
struct Model {
    flows: Vec<FlowId>,
    sent: [[Vec<u8>; 2]; 4],
    got: [[Vec<u8>; 2]; 4],
    fin_sent: [[bool; 2]; 4],
    fin_got: [[bool; 2]; 4],
    counter: u8,
}

impl Model {
    fn step(&mut self, w: &mut Wire, op: &Op) {
        match *op {
            Op::Send { flow, len } => {
                for dir in 0..2 {
                    if self.fin_sent[flow][dir] {
                        continue;
                    }
                    let data: Vec<u8> = (0..len)
                        .map(|_| {
                            self.counter = self.counter.wrapping_add(1);
                            self.counter
                        })
                        .collect();
                    let side = if dir == 0 { &mut w.client } else { &mut w.device };
                    let n = side.send(self.flows[flow], &data).expect("send");
                    self.sent[flow][dir].extend_from_slice(&data[..n]);
                }
            }
            Op::Finish { flow } => {
                for dir in 0..2 {
                    if !self.fin_sent[flow][dir] {
                        let side = if dir == 0 { &mut w.client } else { &mut w.device };
                        side.finish(self.flows[flow]).expect("finish");
                        self.fin_sent[flow][dir] = true;
                    }
                }
            }
            Op::Deliver { to_device, bytes } => {
                w.transmit();
                let (buf, side) =
                    if to_device { (&mut w.to_device, &mut w.device) } else { (&mut w.to_client, &mut w.client) };
                let n = bytes.min(buf.len());
                let chunk: Vec<u8> = buf.drain(..n).collect();
                side.handle_input(&chunk, w.now);
            }
            Op::Read { device, flow, max } => {
                // Reading at the device takes what was sent towards it.
                let dir = if device { 0 } else { 1 };
                if self.fin_got[flow][dir] {
                    return;
                }
                let side = if device { &mut w.device } else { &mut w.client };
                let mut buf = vec![0u8; max];
                match side.recv(self.flows[flow], &mut buf).expect("recv") {
                    Recv::Data(n) => self.got[flow][dir].extend_from_slice(&buf[..n]),
                    Recv::Fin => self.fin_got[flow][dir] = true,
                    Recv::Empty => {}
                }
            }
        }
    }
}

/// Random sends, partial deliveries of the wire and partial reads on four flows each way:
/// every byte arrives exactly once, in order, and each Fin after the last byte.
fn run_interleaving(ops: Vec<Op>) {
    let config = MuxConfig { initial_window: 32 * 1024, ..MuxConfig::default() };
    let mut w = Wire::new(config);
    let mut m =
        Model { flows: (0..4).map(|i| w.client.open(&format!("t:{i}")).expect("open")).collect(), ..Model::default() };
    w.pump(100_000);
    w.accept_all();
    for op in &ops {
        m.step(&mut w, op);
        assert!(
            w.client.error().is_none() && w.device.error().is_none(),
            "{:?} {:?}",
            w.client.error(),
            w.device.error()
        );
    }
    for f in 0..4 {
        m.step(&mut w, &Op::Finish { flow: f });
    }
    for _ in 0..10_000 {
        w.pump(100_000);
        for f in 0..4 {
            for device in [true, false] {
                m.step(&mut w, &Op::Read { device, flow: f, max: 1 << 20 });
            }
        }
        if m.fin_got.iter().all(|f| f[0] && f[1]) {
            break;
        }
    }
    for f in 0..4 {
        for d in 0..2 {
            assert!(m.fin_got[f][d], "flow {f} direction {d} reached its Fin");
            assert_eq!(m.got[f][d], m.sent[f][d], "flow {f} direction {d}: every byte once, in order");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_interleavings_deliver_every_byte_exactly_once_in_order(ops in proptest::collection::vec(op(), 1..80)) {
        run_interleaving(ops);
    }
}

#[test]
fn a_bulk_flow_reads_into_reused_buffers() {
    // A socket read's worth, at most.
    const READ: usize = 200 * 1024;
    let mut w = Wire::new(MuxConfig::default());
    let flow = w.client.open("t:1").expect("open");
    w.pump(4096);
    w.accept_all();
    let data = vec![9u8; 64 * 1024];
    let mut received = 0usize;
    for _ in 0..4096 {
        while w.client.send(flow, &data).expect("send") > 0 {}
        w.client.poll_transmit(w.now, &mut w.to_device, usize::MAX);
        // As the driver reads: into the lent buffer, a socket read's worth at a time.
        let wire = std::mem::take(&mut w.to_device);
        let mut at = 0;
        while at < wire.len() {
            let mut buf = w.device.lend_input_buffer();
            let n = (buf.capacity() - buf.len()).min(READ).min(wire.len() - at);
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
            w.device.handle_input_buffer(buf, w.now);
        }
        while let Ok(Chunk::Data(b)) = w.device.recv_bytes(flow) {
            received += b.len();
        }
        w.device.poll_transmit(w.now, &mut w.to_client, usize::MAX);
        let back = std::mem::take(&mut w.to_client);
        w.client.handle_input(&back, w.now);
        w.events();
        if received >= 64 << 20 {
            break;
        }
    }
    assert!(received >= 64 << 20, "{received}");
    assert!(w.device.opener.buffers_made() <= 4, "{} receive buffers made", w.device.opener.buffers_made());
}
