//! Resumption on the bare connection: a fake clock, transports that are byte buffers the test
//! breaks where it likes.

use super::*;
use crate::resume::{HELLO_LEN, PROOF_LEN};
use proptest::prelude::*;

const WINDOW: Duration = Duration::from_secs(60);

fn config(retain_limit: usize) -> MuxConfig {
    MuxConfig { resume: Some(ResumeConfig { retain_limit, window: WINDOW }), ..MuxConfig::default() }
}

/// Two connections, what is in flight each way on the current transport, and the clock.
struct Pair {
    now: Instant,
    c: Connection,
    d: Connection,
    to_d: Vec<u8>,
    to_c: Vec<u8>,
    /// Bytes the client has written to the current transport (for tampering at an offset).
    c_written: usize,
    c_events: Vec<ConnEvent>,
    d_events: Vec<ConnEvent>,
}

impl Pair {
    fn new(c: MuxConfig, d: MuxConfig) -> Pair {
        let (ck, dk) = crate::in_memory_pair(b"resume").expect("handshake");
        let now = Instant::now();
        Pair {
            now,
            c: Connection::new(&ck, c, now),
            d: Connection::new(&dk, d, now),
            to_d: Vec::new(),
            to_c: Vec::new(),
            c_written: 0,
            c_events: Vec::new(),
            d_events: Vec::new(),
        }
    }

    fn transmit(&mut self) -> bool {
        let mut any = false;
        while let Some(b) = self.c.poll_transmit_bytes(self.now, 256 * 1024) {
            self.c_written += b.len();
            self.to_d.extend_from_slice(&b);
            any = true;
        }
        while let Some(b) = self.d.poll_transmit_bytes(self.now, 256 * 1024) {
            self.to_c.extend_from_slice(&b);
            any = true;
        }
        any
    }

    fn events(&mut self) {
        while let Some(e) = self.c.poll_event() {
            self.c_events.push(e);
        }
        while let Some(e) = self.d.poll_event() {
            if let ConnEvent::FlowOpened { flow, .. } = e {
                self.d.accept(flow).expect("accept");
            }
            self.d_events.push(e);
        }
    }

    /// Moves everything in flight, `step` bytes at a time, until both sides are quiet.
    fn pump(&mut self, step: usize) {
        self.pump_with(step, |_, _| {});
    }

    /// [`Pair::pump`], letting `tamper` change the client's bytes (given the offset of the
    /// first in this transport) before the device sees them.
    fn pump_with(&mut self, step: usize, mut tamper: impl FnMut(usize, &mut Vec<u8>)) {
        for _ in 0..10_000 {
            let before = self.c_written - self.to_d.len();
            self.transmit();
            if self.to_d.is_empty() && self.to_c.is_empty() {
                break;
            }
            let mut to_d = std::mem::take(&mut self.to_d);
            tamper(before, &mut to_d);
            for chunk in to_d.chunks(step.max(1)) {
                self.d.handle_input(chunk, self.now);
            }
            for chunk in std::mem::take(&mut self.to_c).chunks(step.max(1)) {
                self.c.handle_input(chunk, self.now);
            }
            self.events();
        }
        self.events();
    }

    /// The transport breaks after carrying `to_d` and `to_c` bytes of what is in flight.
    fn break_after(&mut self, to_d: usize, to_c: usize) {
        self.transmit();
        let d_part: Vec<u8> = self.to_d.drain(..).take(to_d).collect();
        let c_part: Vec<u8> = self.to_c.drain(..).take(to_c).collect();
        self.d.handle_input(&d_part, self.now);
        self.c.handle_input(&c_part, self.now);
        self.events();
        self.c.handle_eof();
        self.d.handle_io_error(std::io::ErrorKind::ConnectionReset.into());
        self.events();
    }

    /// Both sides start resuming on a new transport.
    fn resume(&mut self) {
        self.to_d.clear();
        self.to_c.clear();
        self.c_written = 0;
        self.c.resume(self.now).expect("client resumes");
        self.d.resume(self.now).expect("device resumes");
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.c.handle_timeout(self.now);
        self.d.handle_timeout(self.now);
        self.events();
    }
}

fn read_all(c: &mut Connection, flow: FlowId) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.recv(flow, &mut buf).expect("recv") {
            Recv::Data(n) => out.extend_from_slice(&buf[..n]),
            Recv::Fin => return (out, true),
            Recv::Empty => return (out, false),
        }
    }
}

fn send_all(c: &mut Connection, flow: FlowId, data: &[u8]) {
    assert_eq!(c.send(flow, data).expect("send"), data.len(), "within credit");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn byte_by_byte_across_a_resume() {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("localhost:22").expect("open");
    let up = pattern(100_000, 1);
    send_all(&mut p.c, flow, &up[..50_000]);
    p.pump(1);
    let down = pattern(70_000, 2);
    send_all(&mut p.d, flow, &down[..30_000]);
    send_all(&mut p.c, flow, &up[50_000..]);
    // Cut in the middle of records both ways.
    p.break_after(12_345, 7_777);
    assert_eq!(p.c.transport_state(), TransportState::Suspended);
    assert_eq!(p.d.transport_state(), TransportState::Suspended);
    assert!(p.c.has_flow(flow) && p.d.has_flow(flow), "flows keep their state while suspended");
    // Flows may still queue while suspended (within credit): a stall, not an error.
    send_all(&mut p.d, flow, &down[30_000..]);
    p.d.finish(flow).expect("finish");
    p.resume();
    assert_eq!(p.c.transport_state(), TransportState::Resuming);
    p.pump(1);
    assert_eq!(p.c.transport_state(), TransportState::Live);
    assert_eq!(p.d.transport_state(), TransportState::Live);
    let mut got_up = Vec::new();
    let mut got_down = Vec::new();
    for _ in 0..100 {
        got_up.extend(read_all(&mut p.d, flow).0);
        let (b, fin) = read_all(&mut p.c, flow);
        got_down.extend(b);
        p.pump(997);
        if fin {
            break;
        }
    }
    assert_eq!(got_up, up, "every byte up, once, in order");
    assert_eq!(got_down, down, "every byte down, once, in order");
    assert_eq!((p.c.stats().resumes, p.d.stats().resumes), (1, 1));
    assert!(p.c.stats().records_resent > 0, "the cut records were resent");
    assert!(p.c.error().is_none() && p.d.error().is_none());
}

#[test]
fn acknowledgements_empty_what_is_kept_even_toward_a_side_that_does_not_resume() {
    // The device keeps records; the client (like `np up` today) does not, but acknowledges.
    let mut p = Pair::new(MuxConfig::default(), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    send_all(&mut p.d, flow, &pattern(300_000, 3));
    p.pump(65536);
    assert!(p.d.retained_bytes() > 0);
    assert_eq!(read_all(&mut p.c, flow).0.len(), 300_000);
    p.pump(65536);
    // The client's Credit records carried the Ack; whatever is left goes after the delay.
    p.tick(ACK_DELAY);
    p.pump(65536);
    // All acknowledged but, at most, a last record of nothing but an Ack, which waits for the
    // next record to be acknowledged (acknowledging it at once would never end).
    assert!(p.d.retained_bytes() <= HEADER_LEN + 9 + TAG_LEN, "all acknowledged: {}", p.d.retained_bytes());
    assert_eq!(p.c.retained_bytes(), 0, "a side that does not resume keeps nothing");
    assert!(p.c.resume(p.now).is_err(), "and cannot resume");
    // Without resumption a broken transport ends the session as before.
    p.c.handle_eof();
    assert!(matches!(p.c.error(), Some(SessionError::Truncated)));
}

#[test]
fn the_retained_bytes_stay_bounded_under_a_stalled_peer_and_flow_again_on_acks() {
    let limit = 256 * 1024;
    let mut p = Pair::new(config(limit), config(limit));
    let flows: Vec<FlowId> = (0..4).map(|_| p.c.open("x:1").expect("open")).collect();
    p.pump(65536);
    // The device reads nothing from its transport: no acknowledgement, no credit comes back.
    let chunk = pattern(64 * 1024, 4);
    let mut queued = 0usize;
    for _ in 0..200 {
        for &f in &flows {
            queued += p.c.send(f, &chunk).expect("send");
        }
        p.tick(Duration::from_millis(50));
        while let Some(b) = p.c.poll_transmit_bytes(p.now, 256 * 1024) {
            p.c_written += b.len();
            p.to_d.extend_from_slice(&b);
        }
        assert!(
            p.c.retained_bytes() <= limit + 256 * 1024 + MAX_RECORD_PLAINTEXT + 64,
            "retained {} past the limit and a batch",
            p.c.retained_bytes()
        );
    }
    assert!(p.c.retained_bytes() >= limit, "it did fill up");
    assert!(queued < 200 * 4 * chunk.len(), "the flows were pushed back");
    assert!(flows.iter().all(|&f| p.c.send_credit(f) == 0), "as credit running out");
    // The device reads again: acknowledgements free room and every byte arrives.
    let mut got = 0;
    for _ in 0..1000 {
        p.pump(256 * 1024);
        for &f in &flows {
            got += read_all(&mut p.d, f).0.len();
        }
        p.tick(ACK_DELAY);
        if got == queued {
            break;
        }
    }
    assert_eq!(got, queued, "backpressure, not loss");
}

#[test]
fn a_session_not_resumed_within_the_window_ends_and_its_flows_reset() {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    p.break_after(0, 0);
    assert_eq!(p.c.poll_timeout(), Some(p.now + WINDOW));
    p.tick(WINDOW - Duration::from_millis(1));
    assert!(p.c.error().is_none(), "still waiting");
    // A resume attempt under way does not extend the window.
    p.c.resume(p.now).expect("resume");
    p.tick(Duration::from_millis(1));
    assert!(matches!(p.c.error(), Some(SessionError::ResumeExpired(60))), "{:?}", p.c.error());
    assert!(p.c_events.iter().any(|e| matches!(e, ConnEvent::Ended { .. })));
    assert!(!p.c.has_flow(flow) && p.c.send(flow, b"x").is_err());
    assert!(p.c.is_drained(), "nothing left to send on a transport that is gone");
    assert_eq!(p.c.poll_timeout(), None);
    assert!(p.c.error().is_some_and(SessionError::is_stale), "worth a new session");
}

#[test]
fn silence_for_the_idle_timeout_suspends_a_resumable_session() {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    // The transport goes dark without an error: nothing moves any more.
    for _ in 0..10 {
        p.now += Duration::from_secs(10);
        p.c.handle_timeout(p.now);
    }
    assert_eq!(p.c.transport_state(), TransportState::Suspended);
    assert!(p.c.error().is_none() && p.c.has_flow(flow));
}

fn resume_and_capture_device_proof(p: &mut Pair) -> Vec<u8> {
    p.resume();
    // The device's Hello then Proof are the first bytes it writes on the new transport.
    let mut out = Vec::new();
    for _ in 0..4 {
        p.transmit();
        out.extend_from_slice(&p.to_c);
        let (to_d, to_c) = (std::mem::take(&mut p.to_d), std::mem::take(&mut p.to_c));
        p.d.handle_input(&to_d, p.now);
        p.c.handle_input(&to_c, p.now);
    }
    p.pump(65536);
    out[HELLO_LEN..HELLO_LEN + PROOF_LEN].to_vec()
}

#[test]
fn a_replayed_or_foreign_resume_is_refused_and_a_genuine_one_still_works() {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    p.break_after(0, 0);
    let old_proof = resume_and_capture_device_proof(&mut p);
    assert_eq!(p.c.transport_state(), TransportState::Live);

    // The transport breaks again; a relay replays the device's proof from the first resume
    // after a fresh Hello of its own.
    p.break_after(0, 0);
    p.c.resume(p.now).expect("resume");
    let mut fake = vec![0u8; 0];
    fake.extend_from_slice(b"npRH");
    fake.extend_from_slice(&[9u8; 16]);
    fake.extend_from_slice(&old_proof);
    p.c.handle_input(&fake, p.now);
    assert_eq!(p.c.transport_state(), TransportState::Suspended);
    assert!(matches!(p.c.resume_error(), Some(SessionError::ResumeRefused(_))), "{:?}", p.c.resume_error());
    assert!(p.c.error().is_none(), "a refused attempt does not end the session");

    // Another session's device (npd restarted: same identity, new keys) cannot resume it.
    let (_, other) = crate::in_memory_pair(b"resume").expect("handshake");
    let mut stranger = Connection::new(&other, config(8 << 20), p.now);
    stranger.resume(p.now).expect("a fresh session may try");
    p.c.resume(p.now).expect("resume");
    for _ in 0..3 {
        let mut a = Vec::new();
        let mut b = Vec::new();
        p.c.poll_transmit(p.now, &mut a, usize::MAX);
        stranger.poll_transmit(p.now, &mut b, usize::MAX);
        stranger.handle_input(&a, p.now);
        p.c.handle_input(&b, p.now);
    }
    assert_eq!(p.c.transport_state(), TransportState::Suspended);
    assert!(matches!(p.c.resume_error(), Some(SessionError::ResumeRefused(_))));

    // The genuine device resumes, and the flow carries on.
    p.to_d.clear();
    p.to_c.clear();
    p.d.handle_eof();
    p.resume();
    p.pump(7);
    assert_eq!((p.c.transport_state(), p.d.transport_state()), (TransportState::Live, TransportState::Live));
    send_all(&mut p.c, flow, b"still here");
    p.pump(7);
    assert_eq!(read_all(&mut p.d, flow).0, b"still here");
}

/// Sets up a session with records in flight, breaks it before any arrive, resumes, and runs
/// the client's new transport through `tamper` (offsets count from its first byte); then the
/// client sends more, so a stream cut short is noticed too. Returns the device's error.
fn tampered_resume(tamper: impl FnMut(usize, &mut Vec<u8>)) -> (Option<SessionError>, Vec<u8>) {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    for i in 0..6 {
        send_all(&mut p.c, flow, &pattern(20_000, i));
        p.transmit();
    }
    p.break_after(0, 0);
    p.resume();
    p.pump_with(65536, tamper);
    let _ = p.c.send(flow, &pattern(5000, 99));
    p.pump(65536);
    p.tick(Duration::from_secs(1));
    p.pump(65536);
    let got = if p.d.error().is_none() { read_all(&mut p.d, flow).0 } else { Vec::new() };
    (p.d.error().cloned(), got)
}

/// The offset of the first resent record on the client's new transport, and its length.
const RESENT: usize = HELLO_LEN + PROOF_LEN;

/// Where the resent records start in `bytes` (which start at offset `base` of the transport),
/// if they start in it with at least two records behind.
fn resent_at(base: usize, bytes: &[u8]) -> Option<usize> {
    let at = RESENT.checked_sub(base)?;
    (bytes.len() > at + 2 * HEADER_LEN + 2 * MAX_RECORD_PLAINTEXT / 2).then_some(at)
}

fn first_record_len(bytes: &[u8]) -> usize {
    HEADER_LEN + u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
}

#[test]
fn resent_records_are_the_same_stream_untampered() {
    let (err, got) = tampered_resume(|_, _| {});
    assert!(err.is_none(), "{err:?}");
    let mut want = Vec::new();
    for i in 0..6 {
        want.extend(pattern(20_000, i));
    }
    want.extend(pattern(5000, 99));
    assert_eq!(got, want);
}

#[test]
fn a_flipped_byte_in_resent_records_ends_the_session() {
    for at in [RESENT, RESENT + 3, RESENT + 4, RESENT + 100, RESENT + 20_000, RESENT + 70_000] {
        let (err, got) = tampered_resume(|base, bytes| {
            if let Some(b) = at.checked_sub(base).and_then(|i| bytes.get_mut(i)) {
                *b ^= 0x20;
            }
        });
        assert!(got.is_empty());
        assert!(err.as_ref().is_some_and(|e| !e.is_stale()), "flip at {at}: {err:?}");
    }
}

#[test]
fn a_dropped_duplicated_or_reordered_resent_record_or_byte_ends_the_session() {
    type Tamper = fn(usize, &mut Vec<u8>);
    let cases: [(&str, Tamper); 4] = [
        ("drop a byte", |base, b| {
            if let Some(at) = resent_at(base, b) {
                b.remove(at + 50);
            }
        }),
        ("drop a record", |base, b| {
            if let Some(at) = resent_at(base, b) {
                let n = first_record_len(&b[at..]);
                b.drain(at..at + n);
            }
        }),
        ("duplicate a record", |base, b| {
            if let Some(at) = resent_at(base, b) {
                let n = first_record_len(&b[at..]);
                let rec = b[at..at + n].to_vec();
                b.splice(at..at, rec);
            }
        }),
        ("swap two records", |base, b| {
            if let Some(at) = resent_at(base, b) {
                let n1 = first_record_len(&b[at..]);
                let n2 = first_record_len(&b[at + n1..]);
                let first = b[at..at + n1].to_vec();
                b.drain(at..at + n1);
                b.splice(at + n2..at + n2, first);
            }
        }),
    ];
    for (name, tamper) in cases {
        let (err, got) = tampered_resume(tamper);
        assert!(got.is_empty(), "{name}: delivered {} bytes", got.len());
        assert!(err.as_ref().is_some_and(|e| !e.is_stale()), "{name}: {err:?}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Send { up: bool, flow: usize, len: usize },
    Pump { step: usize },
    Read { up: bool, flow: usize },
    Break { to_d: usize, to_c: usize },
    Resume,
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), 0..3usize, 1..40_000usize).prop_map(|(up, flow, len)| Op::Send { up, flow, len }),
        3 => prop_oneof![Just(1usize), 1..5000usize, Just(1 << 20)].prop_map(|step| Op::Pump { step }),
        2 => (any::<bool>(), 0..3usize).prop_map(|(up, flow)| Op::Read { up, flow }),
        1 => (0..200_000usize, 0..200_000usize).prop_map(|(to_d, to_c)| Op::Break { to_d, to_c }),
        1 => Just(Op::Resume),
        1 => Just(Op::Tick),
    ]
}

fn run_with_breaks(ops: Vec<Op>) {
    let mut p = Pair::new(config(512 * 1024), config(512 * 1024));
    let flows: Vec<FlowId> = (0..3).map(|_| p.c.open("x:1").expect("open")).collect();
    p.pump(65536);
    let mut sent = [[Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]];
    let mut got = [[Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]];
    let mut seed = 0u8;
    for op in ops {
        match op {
            Op::Send { up, flow, len } => {
                seed = seed.wrapping_add(1);
                let data = pattern(len, seed);
                let conn = if up { &mut p.c } else { &mut p.d };
                let n = conn.send(flows[flow], &data).expect("send");
                sent[usize::from(up)][flow].extend_from_slice(&data[..n]);
            }
            Op::Pump { step } => p.pump(step),
            Op::Read { up, flow } => {
                let conn = if up { &mut p.d } else { &mut p.c };
                got[usize::from(up)][flow].extend(read_all(conn, flows[flow]).0);
            }
            Op::Break { to_d, to_c } => {
                if p.c.transport_state() == TransportState::Live {
                    p.break_after(to_d, to_c);
                }
            }
            Op::Resume => {
                if p.c.transport_state() != TransportState::Live {
                    p.resume();
                }
            }
            Op::Tick => p.tick(Duration::from_millis(250)),
        }
        assert!(p.c.error().is_none() && p.d.error().is_none(), "{:?} {:?}", p.c.error(), p.d.error());
    }
    if p.c.transport_state() != TransportState::Live || p.d.transport_state() != TransportState::Live {
        p.resume();
    }
    for _ in 0..500 {
        p.pump(1 << 20);
        for (up, conn) in [(1, &mut p.d), (0, &mut p.c)] {
            for (i, &f) in flows.iter().enumerate() {
                got[up][i].extend(read_all(conn, f).0);
            }
        }
        p.tick(ACK_DELAY);
        if got == sent {
            break;
        }
    }
    assert_eq!(got, sent, "every byte exactly once, in order, across the breaks");
    assert!(p.c.error().is_none() && p.d.error().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_breaks_deliver_every_byte_exactly_once_in_order(ops in proptest::collection::vec(op(), 1..60)) {
        run_with_breaks(ops);
    }
}

#[test]
fn idle_peers_do_not_trade_acknowledgements() {
    let mut p = Pair::new(config(8 << 20), config(8 << 20));
    let flow = p.c.open("x:1").expect("open");
    p.pump(65536);
    send_all(&mut p.c, flow, &pattern(200_000, 5));
    p.pump(65536);
    read_all(&mut p.d, flow);
    p.pump(65536);
    let before = p.c.stats().records_sent + p.d.stats().records_sent;
    // Two minutes of silence: keepalives (a Ping and a Pong each way per 15 s interval) and the
    // odd lone Ack, nothing more.
    for _ in 0..1200 {
        p.tick(Duration::from_millis(100));
        p.pump(65536);
    }
    let idle = p.c.stats().records_sent + p.d.stats().records_sent - before;
    assert!(idle <= 8 * 4 + 8 * 2, "{idle} records in two idle minutes");
    assert!(
        p.c.retained_bytes() <= HEADER_LEN + 9 + TAG_LEN + 64 && p.d.retained_bytes() <= HEADER_LEN + 9 + TAG_LEN + 64
    );
}
