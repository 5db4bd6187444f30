//! Two muxes driven against each other in memory, and a hostile peer's frames, on a fake clock.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::frame::FrameReader;
use crate::record::MAX_RECORD_PLAINTEXT;

struct Pair {
    now: Instant,
    client: Mux,
    device: Mux,
    client_events: Vec<Event>,
    device_events: Vec<Event>,
}

impl Pair {
    fn new(config: MuxConfig) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            client: Mux::new(Role::Initiator, config.clone(), now),
            device: Mux::new(Role::Responder, config, now),
            client_events: Vec::new(),
            device_events: Vec::new(),
        }
    }

    /// Moves records both ways until nothing is pending.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(p) = self.client.poll_transmit(self.now) {
                assert!(p.len() <= MAX_RECORD_PLAINTEXT);
                self.device.handle_frames(p.into(), self.now).expect("device handles");
                moved = true;
            }
            while let Some(p) = self.device.poll_transmit(self.now) {
                assert!(p.len() <= MAX_RECORD_PLAINTEXT);
                self.client.handle_frames(p.into(), self.now).expect("client handles");
                moved = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push(e);
            }
            while let Some(e) = self.device.poll_event() {
                self.device_events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn device_data(&mut self, flow: FlowId, consume: bool) -> Vec<u8> {
        let mut v = Vec::new();
        self.device_events.retain(|e| match e {
            Event::FlowData { flow: f, bytes } if *f == flow => {
                v.extend_from_slice(bytes);
                false
            }
            _ => true,
        });
        if consume {
            self.device.consumed(flow, v.len());
        }
        v
    }

    fn client_data(&mut self, flow: FlowId) -> Vec<u8> {
        let mut v = Vec::new();
        self.client_events.retain(|e| match e {
            Event::FlowData { flow: f, bytes } if *f == flow => {
                v.extend_from_slice(bytes);
                false
            }
            _ => true,
        });
        self.client.consumed(flow, v.len());
        v
    }
}

fn small_window() -> MuxConfig {
    MuxConfig { initial_window: 4096, ..MuxConfig::default() }
}

#[test]
fn open_accept_data_both_ways_half_close() {
    let mut p = Pair::new(MuxConfig::default());
    let flow = p.client.open("127.0.0.1:22").expect("open");
    assert_eq!(flow % 2, 1);
    // Data may follow Open before the device accepts.
    assert_eq!(p.client.send(flow, b"early").expect("send"), 5);
    p.pump();
    assert_eq!(p.device_events.remove(0), Event::FlowOpened { flow, target: "127.0.0.1:22".into() });
    assert_eq!(p.device_data(flow, true), b"early");
    assert!(p.device.send(flow, b"x").is_err(), "no sending before accept");
    p.device.accept(flow).expect("accept");
    p.device.send(flow, b"banner").expect("send");
    p.pump();
    assert_eq!(p.client_events.remove(0), Event::FlowAccepted { flow });
    assert_eq!(p.client_data(flow), b"banner");

    p.client.finish(flow).expect("finish");
    assert!(p.client.send(flow, b"late").is_err());
    p.pump();
    assert!(p.device_events.contains(&Event::FlowFin { flow }));
    // The other direction still works after the half-close.
    p.device.send(flow, b"still here").expect("send");
    p.device.finish(flow).expect("finish");
    p.pump();
    assert_eq!(p.client_data(flow), b"still here");
    assert!(p.client_events.contains(&Event::FlowFin { flow }));
    // Both directions done: the flow is retired on both sides.
    assert!(!p.client.has_flow(flow));
    assert!(!p.device.has_flow(flow));
}

#[test]
fn refuse_and_reset() {
    let mut p = Pair::new(MuxConfig::default());
    let a = p.client.open("10.0.0.1:80").expect("open");
    let b = p.client.open("10.0.0.2:80").expect("open");
    assert_eq!(b, a + 2);
    p.pump();
    p.device.refuse(a, "not permitted").expect("refuse");
    p.device.accept(b).expect("accept");
    p.pump();
    assert!(p.client_events.contains(&Event::FlowRefused { flow: a, reason: "not permitted".into() }));
    assert!(!p.client.has_flow(a));
    assert!(p.client.send(a, b"x").is_err());
    // Reset from the device while the client is still sending: late data is ignored.
    p.client.send(b, b"in flight").expect("send");
    p.device.reset(b, "target closed");
    let to_device = p.client.poll_transmit(p.now).expect("data");
    p.pump();
    p.device.handle_frames(to_device.into(), p.now).expect("late data ignored");
    assert!(p.client_events.contains(&Event::FlowReset { flow: b, reason: "target closed".into() }));
    assert!(!p.client.has_flow(b));
}

#[test]
fn stalled_flow_does_not_block_another() {
    let mut p = Pair::new(small_window());
    let stalled = p.client.open("a:1").expect("open");
    let live = p.client.open("b:1").expect("open");
    p.pump();
    p.device.accept(stalled).expect("accept");
    p.device.accept(live).expect("accept");
    p.pump();
    let chunk = vec![7u8; 1000];
    let mut stalled_sent = 0;
    let mut live_got = 0;
    for _ in 0..200 {
        stalled_sent += p.client.send(stalled, &chunk).expect("send");
        let n = p.client.send(live, &chunk).expect("send");
        p.pump();
        // The device application reads `live` but never `stalled`.
        live_got += p.device_data(live, true).len();
        assert!(n > 0, "live flow must never be blocked");
    }
    assert_eq!(stalled_sent, 4096, "stalled flow stops exactly at its window");
    assert_eq!(live_got, 200 * 1000);
    assert_eq!(p.device_data(stalled, false).len(), 4096);
    // The stalled flow resumes once consumed, with a FlowWritable event.
    p.device.consumed(stalled, 4096);
    p.pump();
    assert!(p.client_events.contains(&Event::FlowWritable { flow: stalled }));
    assert!(p.client.send_credit(stalled) > 0);
}

#[test]
fn a_flow_finished_while_blocked_is_not_woken_by_credit() {
    let mut p = Pair::new(small_window());
    let f = p.client.open("a:1").expect("open");
    p.pump();
    p.device.accept(f).expect("accept");
    p.pump();
    assert_eq!(p.client.send(f, &[3u8; 5000]).expect("send"), 4096, "cut short by credit");
    p.pump();
    assert_eq!(p.device_data(f, true).len(), 4096);
    // The grant is on its way when the application gives up on the rest and finishes.
    let grant = p.device.poll_transmit(p.now).expect("a Credit frame");
    p.client.finish(f).expect("finish");
    p.client.handle_frames(grant.into(), p.now).expect("credit");
    p.pump();
    assert!(p.device_events.contains(&Event::FlowFin { flow: f }), "{:?}", p.device_events);
    // Nothing is left to write, so the credit wakes no writer.
    assert!(!p.client_events.contains(&Event::FlowWritable { flow: f }), "{:?}", p.client_events);
    assert!(p.client.send(f, b"x").is_err());
}

#[test]
fn exceeding_credit_is_a_protocol_error() {
    let now = Instant::now();
    let mut device = Mux::new(Role::Responder, small_window(), now);
    let mut rec = Vec::new();
    Frame::Open { flow: 1, target: "x:1".into() }.encode(&mut rec);
    device.handle_frames(rec.into(), now).expect("open");
    device.accept(1).expect("accept");
    let mut rec = Vec::new();
    Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }.encode(&mut rec);
    device.handle_frames(rec.into(), now).expect("within window");
    let mut rec = Vec::new();
    Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 1]) }.encode(&mut rec);
    assert!(matches!(device.handle_frames(rec.into(), now), Err(SessionError::Protocol("flow credit exceeded"))));
    assert!(device.is_closed());
    // A Close frame telling the peer why is queued.
    let out = device.poll_transmit(now).expect("close frame");
    let mut r = FrameReader::new(out.into());
    assert!(matches!(r.next_frame(), Ok(Some(Frame::Close { .. }))));
}

#[test]
fn many_flows_round_robin_and_window_bound() {
    let mut p = Pair::new(small_window());
    let flows: Vec<FlowId> = (0..20).map(|i| p.client.open(&format!("h:{i}")).expect("open")).collect();
    p.pump();
    for f in &flows {
        p.device.accept(*f).expect("accept");
    }
    p.pump();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = vec![0usize; flows.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); flows.len()];
    while sent.iter().any(|s| *s < data.len()) {
        for (i, f) in flows.iter().enumerate() {
            sent[i] += p.client.send(*f, &data[sent[i]..]).expect("send");
        }
        p.pump();
        for (i, f) in flows.iter().enumerate() {
            got[i].extend(p.device_data(*f, true));
        }
    }
    for g in got {
        assert_eq!(g, data);
    }
}

#[test]
fn keepalive_ping_and_idle_timeout() {
    let mut p = Pair::new(MuxConfig::default());
    let t0 = p.now;
    assert_eq!(p.client.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    // Idle for 15 s: both send a Ping, both answer with a Pong.
    p.now = t0 + Duration::from_secs(15);
    p.client.handle_timeout(p.now);
    p.device.handle_timeout(p.now);
    assert!(p.client.wants_transmit());
    p.pump();
    assert!(!p.client.is_closed() && !p.device.is_closed());
    // Keep pinging every 15 s with pumping: never times out.
    for i in 2..10 {
        p.now = t0 + Duration::from_secs(15 * i);
        p.client.handle_timeout(p.now);
        p.device.handle_timeout(p.now);
        p.pump();
    }
    assert!(!p.client.is_closed());
    // Now the device goes silent: the client pings but hears nothing for 45 s.
    let silent_from = p.now;
    while let Some(t) = p.client.poll_timeout() {
        assert!(t >= p.now);
        p.now = t;
        p.client.handle_timeout(p.now);
        while p.client.poll_transmit(p.now).is_some() {}
    }
    assert_eq!(p.now, silent_from + Duration::from_secs(45));
    assert_eq!(p.client.poll_event(), Some(Event::Closed { reason: "keepalive timeout".into() }));
    assert!(p.client.open("x:1").is_err());
}

#[test]
fn peer_close_ends_session() {
    let mut p = Pair::new(MuxConfig::default());
    let f = p.client.open("x:1").expect("open");
    p.pump();
    p.device.close("shutting down");
    p.pump();
    assert!(p.client_events.contains(&Event::Closed { reason: "shutting down".into() }));
    assert!(p.client.send(f, b"x").is_err());
}

#[test]
fn flow_id_rules() {
    let now = Instant::now();
    let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
    let frame = |f: Frame| {
        let mut v = Vec::new();
        f.encode(&mut v);
        Bytes::from(v)
    };
    // Even ids belong to the device.
    assert!(device.handle_frames(frame(Frame::Open { flow: 2, target: "x".into() }), now).is_err());
    let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
    device.handle_frames(frame(Frame::Open { flow: 5, target: "x".into() }), now).expect("open");
    assert!(device.handle_frames(frame(Frame::Open { flow: 3, target: "x".into() }), now).is_err());
    let mut device = Mux::new(Role::Responder, MuxConfig::default(), now);
    assert!(device.handle_frames(frame(Frame::Data { flow: 9, bytes: Bytes::new() }), now).is_err());
}

/// Well-formed frames a hostile client may send: small flow ids so they hit live flows.
fn hostile_frame() -> impl Strategy<Value = Frame> {
    let flow = (0u32..24).prop_map(|i| 2 * i + 1);
    prop_oneof![
        flow.clone().prop_map(|flow| Frame::Open { flow, target: "x:1".into() }),
        (flow.clone(), 0usize..3000).prop_map(|(flow, n)| Frame::Data { flow, bytes: Bytes::from(vec![1u8; n]) }),
        (flow.clone(), any::<u32>()).prop_map(|(flow, bytes)| Frame::Credit { flow, bytes }),
        flow.clone().prop_map(|flow| Frame::Reset { flow, reason: "r".into() }),
        flow.prop_map(|flow| Frame::Fin { flow }),
        any::<u64>().prop_map(|id| Frame::Ping { id }),
    ]
}

fn record(frames: &[Frame]) -> Bytes {
    let mut v = Vec::new();
    for f in frames {
        f.encode(&mut v);
    }
    Bytes::from(v)
}

fn frames_of(out: Vec<u8>) -> Vec<Frame> {
    let mut r = FrameReader::new(out.into());
    let mut v = Vec::new();
    while let Some(f) = r.next_frame().expect("own frames parse") {
        v.push(f);
    }
    v
}

#[test]
fn too_many_peer_flows_is_abuse() {
    let now = Instant::now();
    let cfg = MuxConfig { max_peer_flows: 2, ..MuxConfig::default() };
    let mut device = Mux::new(Role::Responder, cfg.clone(), now);
    let opens: Vec<Frame> = [1, 3, 5].iter().map(|&flow| Frame::Open { flow, target: "x:1".into() }).collect();
    assert!(matches!(device.handle_frames(record(&opens), now), Err(SessionError::Limit(_))));
    assert!(device.is_closed());
    // A sender keeps to the same limit itself, so a well-behaved peer never gets there.
    let mut client = Mux::new(Role::Initiator, cfg, now);
    client.open("x:1").expect("first");
    client.open("x:1").expect("second");
    assert!(matches!(client.open("x:1"), Err(SessionError::Limit(_))));
    assert!(!client.is_closed(), "a local refusal does not end the session");
}

#[test]
fn flows_come_back_to_the_limit_when_they_end() {
    let cfg = MuxConfig { max_peer_flows: 2, ..MuxConfig::default() };
    let mut p = Pair::new(cfg);
    for round in 0..5 {
        let a = p.client.open("a:1").expect("open a");
        let b = p.client.open("b:1").expect("open b");
        p.pump();
        p.device.refuse(a, "no").expect("refuse");
        p.device.accept(b).expect("accept");
        p.pump();
        p.client.reset(b, "done");
        p.pump();
        assert!(!p.device.is_closed() && !p.client.is_closed(), "round {round}");
    }
}

#[test]
fn a_burst_of_pings_leaves_one_pong() {
    let t0 = Instant::now();
    let mut device = Mux::new(Role::Responder, MuxConfig::default(), t0);
    // A peer that pings (within the allowed rate) and never reads: one answer waits.
    for i in 0..100u64 {
        let pings: Vec<Frame> = (0..4).map(|j| Frame::Ping { id: i * 4 + j }).collect();
        device.handle_frames(record(&pings), t0 + Duration::from_millis(500 * i)).expect("pings");
        assert!(device.control_backlog() <= 1, "backlog {}", device.control_backlog());
        assert!(!device.is_backlogged());
    }
    // The one answer is to the newest Ping.
    let out = device.poll_transmit(t0).expect("pong");
    assert_eq!(frames_of(out), vec![Frame::Pong { id: 399 }]);
    assert!(device.poll_transmit(t0).is_none());
}

#[test]
fn a_ping_flood_ends_the_session_for_abuse() {
    let t0 = Instant::now();
    let mut device = Mux::new(Role::Responder, MuxConfig::default(), t0);
    let burst: Vec<Frame> = (0..PING_BURST as u64).map(|id| Frame::Ping { id }).collect();
    device.handle_frames(record(&burst), t0).expect("a burst is fine");
    // One second later, PINGS_PER_SEC more are fine; one beyond is a flood.
    let later = t0 + Duration::from_secs(1);
    let more: Vec<Frame> = (0..PINGS_PER_SEC as u64).map(|id| Frame::Ping { id }).collect();
    device.handle_frames(record(&more), later).expect("the refill");
    let r = device.handle_frames(record(&[Frame::Ping { id: 9 }]), later);
    assert!(matches!(r, Err(SessionError::Limit(_))), "{r:?}");
    assert!(device.is_closed());
}

#[test]
fn credit_grants_are_coalesced_per_flow() {
    let now = Instant::now();
    let mut device = Mux::new(Role::Responder, small_window(), now);
    device.handle_frames(record(&[Frame::Open { flow: 1, target: "x:1".into() }]), now).expect("open");
    device.accept(1).expect("accept");
    let _ = device.poll_transmit(now);
    device.handle_frames(record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }]), now).expect("data");
    // The application consumes byte by byte, crossing the grant threshold many times.
    for _ in 0..4096 {
        device.consumed(1, 1);
    }
    assert_eq!(device.control_backlog(), 1);
    // Data past the original window is not yet allowed: the grant has not been sent.
    let more = record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 1]) }]);
    let mut probe = Mux::new(Role::Responder, small_window(), now);
    probe.handle_frames(record(&[Frame::Open { flow: 1, target: "x:1".into() }]), now).expect("open");
    probe.accept(1).expect("accept");
    probe.handle_frames(record(&[Frame::Data { flow: 1, bytes: Bytes::from(vec![0u8; 4096]) }]), now).expect("data");
    probe.consumed(1, 4096);
    assert!(matches!(probe.handle_frames(more.clone(), now), Err(SessionError::Protocol("flow credit exceeded"))));
    // One Credit frame carries everything consumed.
    let out = device.poll_transmit(now).expect("credit");
    assert_eq!(frames_of(out), vec![Frame::Credit { flow: 1, bytes: 4096 }]);
    device.handle_frames(more, now).expect("within the granted window");
}

#[test]
fn early_data_is_capped_per_session() {
    let cfg = MuxConfig { early_budget: 10_000, ..small_window() };
    let mut p = Pair::new(cfg.clone());
    let flows: Vec<FlowId> = (0..3).map(|i| p.client.open(&format!("h:{i}")).expect("open")).collect();
    let mut sent = 0;
    for f in &flows {
        sent += p.client.send(*f, &[5u8; 4096]).expect("send");
    }
    // The sender holds itself to the budget, even though each flow's window is 4096.
    assert_eq!(sent, 10_000);
    p.pump();
    assert!(!p.device.is_closed());
    // Accepting a flow gives its bytes back to the budget: the held-back flow may go on.
    p.device.accept(flows[0]).expect("accept");
    p.device.accept(flows[2]).expect("accept");
    p.pump();
    assert!(p.client_events.contains(&Event::FlowWritable { flow: flows[2] }));
    assert_eq!(p.client.send(flows[2], &[5u8; 4096]).expect("send"), 4096 - (10_000 - 2 * 4096));

    // A peer that does not keep to the budget is closed for abuse.
    let now = Instant::now();
    let mut device = Mux::new(Role::Responder, cfg, now);
    let mut frames = Vec::new();
    for flow in [1, 3, 5] {
        frames.push(Frame::Open { flow, target: "x:1".into() });
        frames.push(Frame::Data { flow, bytes: Bytes::from(vec![0u8; 4000]) });
    }
    assert!(matches!(device.handle_frames(record(&frames), now), Err(SessionError::Limit(_))));
}

#[test]
fn refused_and_reset_flows_return_their_early_bytes() {
    let now = Instant::now();
    let cfg = MuxConfig { early_budget: 4096, ..small_window() };
    let mut device = Mux::new(Role::Responder, cfg, now);
    for round in 0..10u32 {
        let flow = 2 * round + 1;
        let data = Bytes::from(vec![0u8; 4096]);
        device
            .handle_frames(
                record(&[Frame::Open { flow, target: "x:1".into() }, Frame::Data { flow, bytes: data }]),
                now,
            )
            .expect("within budget");
        if round % 2 == 0 {
            device.refuse(flow, "no").expect("refuse");
        } else {
            device.handle_frames(record(&[Frame::Reset { flow, reason: "bye".into() }]), now).expect("reset");
        }
        while device.poll_transmit(now).is_some() {}
    }
}

#[test]
fn unanswered_control_frames_ask_the_reader_to_pause() {
    let now = Instant::now();
    let cfg = MuxConfig { max_control_backlog: 8, ..MuxConfig::default() };
    let mut device = Mux::new(Role::Responder, cfg, now);
    let mut flow = 1;
    // Open, refused, open, refused...: each answer waits, as the peer never reads.
    while !device.is_backlogged() {
        device.handle_frames(record(&[Frame::Open { flow, target: "x:1".into() }]), now).expect("open");
        while device.poll_event().is_some() {}
        device.refuse(flow, "no").expect("refuse");
        flow += 2;
        assert!(flow < 100, "never backlogged");
    }
    assert_eq!(device.control_backlog(), 8);
    // Once the peer reads (we transmit), reading may go on.
    while device.poll_transmit(now).is_some() {}
    assert!(!device.is_backlogged());
}

proptest! {
    #[test]
    fn prop_garbage_frames_error_not_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let now = Instant::now();
        for role in [Role::Initiator, Role::Responder] {
            let mut m = Mux::new(role, small_window(), now);
            let _ = m.open("x:1");
            let _ = m.handle_frames(Bytes::from(data.clone()), now);
            while m.poll_transmit(now).is_some() {}
            while m.poll_event().is_some() {}
        }
    }

    /// A peer that never reads sends any well-formed frames; the application answers as npd
    /// does, and transmits only when the mux says it is backlogged (the driver pauses reading
    /// then). What waits to be sent stays bounded, however many records arrive.
    #[test]
    fn prop_a_peer_that_never_reads_leaves_a_bounded_backlog(
        records in proptest::collection::vec(proptest::collection::vec(hostile_frame(), 1..200), 1..40),
    ) {
        let now = Instant::now();
        let cfg = MuxConfig { initial_window: 4096, max_peer_flows: 8, max_control_backlog: 16, early_budget: 8192, ..MuxConfig::default() };
        let mut device = Mux::new(Role::Responder, cfg, now);
        for frames in records {
            if device.handle_frames(record(&frames), now).is_err() {
                break;
            }
            while let Some(ev) = device.poll_event() {
                match ev {
                    Event::FlowOpened { flow, .. } => {
                        let _ = if flow % 4 == 1 { device.refuse(flow, "no") } else { device.accept(flow) };
                    }
                    Event::FlowData { flow, bytes } => device.consumed(flow, bytes.len()),
                    _ => {}
                }
            }
            // Under 16 before the record; it adds at most an answer and a grant per flow
            // (8) and one Pong.
            prop_assert!(device.control_backlog() <= 16 + 8 + 8 + 1, "backlog {}", device.control_backlog());
            if device.is_backlogged() {
                while device.poll_transmit(now).is_some() {}
            }
        }
    }

    #[test]
    fn prop_credit_never_exceeded(sizes in proptest::collection::vec(1usize..10_000, 1..40), consume_every in 1usize..5) {
        let mut p = Pair::new(small_window());
        let f = p.client.open("x:1").expect("open");
        p.pump();
        p.device.accept(f).expect("accept");
        let mut unconsumed = 0usize;
        for (i, s) in sizes.iter().enumerate() {
            let _ = p.client.send(f, &vec![1u8; *s]).expect("send");
            p.pump(); // would panic on a credit violation
            unconsumed += p.device_data(f, false).len();
            prop_assert!(unconsumed <= 4096);
            if i % consume_every == 0 {
                p.device.consumed(f, unconsumed);
                unconsumed = 0;
            }
        }
    }
}

/// Pull mode: the client's bytes sit in `source` (as in smoltcp's buffer) and records pull them.
struct PullSource {
    data: Vec<u8>,
    taken: usize,
}

impl PullSource {
    fn pull(&mut self, out: &mut Vec<u8>, want: usize) -> u64 {
        let n = want.min(self.data.len() - self.taken);
        out.extend_from_slice(&self.data[self.taken..self.taken + n]);
        self.taken += n;
        (self.data.len() - self.taken) as u64
    }
}

/// Moves records both ways, the client pulling from `src` for `flow`; the device consumes
/// what arrives when `consume` says so.
fn pump_pull(p: &mut Pair, flow: FlowId, src: &mut PullSource) -> usize {
    let mut records = 0;
    loop {
        let mut moved = false;
        loop {
            let mut out = Vec::new();
            let wrote = p.client.poll_transmit_with(p.now, &mut out, MAX_RECORD_PLAINTEXT, &mut |f, o, want| {
                assert_eq!(f, flow, "only the offered flow is pulled");
                src.pull(o, want)
            });
            if !wrote {
                break;
            }
            assert!(out.len() <= MAX_RECORD_PLAINTEXT);
            records += 1;
            p.device.handle_frames(out.into(), p.now).expect("device handles");
            moved = true;
        }
        while let Some(r) = p.device.poll_transmit(p.now) {
            p.client.handle_frames(r.into(), p.now).expect("client handles");
            moved = true;
        }
        while let Some(e) = p.client.poll_event() {
            p.client_events.push(e);
        }
        while let Some(e) = p.device.poll_event() {
            p.device_events.push(e);
        }
        if !moved {
            return records;
        }
    }
}

#[test]
fn pulled_bytes_arrive_in_order_within_credit_then_the_fin() {
    let mut p = Pair::new(small_window());
    let window = small_window().initial_window as usize;
    let flow = p.client.open("127.0.0.1:22").expect("open");
    assert!(p.client.offer(flow, 10).is_err(), "no pull before the flow is accepted");
    p.pump();
    p.device.accept(flow).expect("accept");
    p.pump();
    let mut src = PullSource { data: (0..window * 5 + 123).map(|i| (i * 7) as u8).collect(), taken: 0 };
    p.client.offer(flow, src.data.len() as u64).expect("offer");
    pump_pull(&mut p, flow, &mut src);
    let first = p.device_data(flow, false);
    assert_eq!(first.len(), window, "pulled as far as the window, no further");
    assert_eq!(src.taken, window, "nothing taken from the source past the credit");
    // Credit back: the offer the last pull left resumes by itself, without a new offer.
    p.device.consumed(flow, first.len());
    let mut got = first;
    while src.taken < src.data.len() {
        let before = src.taken;
        pump_pull(&mut p, flow, &mut src);
        let more = p.device_data(flow, true);
        got.extend_from_slice(&more);
        assert!(src.taken > before, "credit brought the flow back into the rotation");
    }
    pump_pull(&mut p, flow, &mut src);
    got.extend_from_slice(&p.device_data(flow, true));
    assert!(got == src.data, "every byte once, in order");
    p.client.finish(flow).expect("finish");
    pump_pull(&mut p, flow, &mut src);
    assert!(p.device_events.contains(&Event::FlowFin { flow }));
    assert!(p.client.offer(flow, 1).is_err(), "no offer after finish");
}

#[test]
fn a_pull_that_overfills_is_cut_back_and_an_empty_pull_ends_the_offer() {
    let mut p = Pair::new(MuxConfig::default());
    let flow = p.client.open("127.0.0.1:22").expect("open");
    p.pump();
    p.device.accept(flow).expect("accept");
    p.pump();
    // Claims 100 bytes, appends 300: only what was asked for goes out, framed as such.
    p.client.offer(flow, 100).expect("offer");
    let mut out = Vec::new();
    assert!(p.client.poll_transmit_with(p.now, &mut out, MAX_RECORD_PLAINTEXT, &mut |_, o, want| {
        assert_eq!(want, 100);
        o.extend_from_slice(&[9u8; 300]);
        0
    }));
    p.device.handle_frames(out.into(), p.now).expect("a well-formed record");
    while let Some(e) = p.device.poll_event() {
        p.device_events.push(e);
    }
    assert_eq!(p.device_data(flow, true), vec![9u8; 100]);
    // Offers 50, has nothing after all: no empty data frame, and the offer is over.
    p.client.offer(flow, 50).expect("offer");
    let mut out = Vec::new();
    assert!(!p.client.poll_transmit_with(p.now, &mut out, MAX_RECORD_PLAINTEXT, &mut |_, _, _| 7));
    assert!(out.is_empty());
    assert!(!p.client.wants_transmit(), "an offer that pulled nothing is dropped, not retried forever");
}

#[test]
fn owned_and_copied_sends_keep_stream_order_and_small_chunks_share_records() {
    let mut p = Pair::new(small_window());
    let flow = p.client.open("127.0.0.1:22").expect("open");
    p.pump();
    p.device.accept(flow).expect("accept");
    p.pump();
    // Copied, then owned, then copied again while owned bytes wait: one stream, in order.
    assert_eq!(p.client.send(flow, b"one,").expect("send"), 4);
    let mut owned = Bytes::from_static(b"two,");
    assert_eq!(p.client.send_bytes(flow, &mut owned).expect("send_bytes"), 4);
    assert!(owned.is_empty());
    assert_eq!(p.client.send(flow, b"three,").expect("send"), 6);
    for _ in 0..20 {
        let mut small = Bytes::from_static(b"x");
        p.client.send_bytes(flow, &mut small).expect("send_bytes");
    }
    let mut records = 0;
    while let Some(r) = p.client.poll_transmit(p.now) {
        records += 1;
        p.device.handle_frames(r.into(), p.now).expect("device handles");
    }
    assert_eq!(records, 1, "small owned chunks share one record");
    while let Some(e) = p.device.poll_event() {
        p.device_events.push(e);
    }
    let mut want = b"one,two,three,".to_vec();
    want.extend_from_slice(&[b'x'; 20]);
    assert_eq!(p.device_data(flow, true), want);
    // Owned bytes past the credit stay with the caller.
    let window = small_window().initial_window as usize;
    let mut big = Bytes::from(vec![7u8; window * 2]);
    let took = p.client.send_bytes(flow, &mut big).expect("send_bytes");
    assert_eq!(took, window - want.len(), "up to the credit left");
    assert_eq!(big.len(), window * 2 - took, "the rest stays with the caller");
}

#[path = "tests/udp.rs"]
mod udp;
