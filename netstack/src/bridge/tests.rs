//! The bridge on packets in memory: an application (a second smoltcp interface) on one side, a
//! device (a session [`Connection`] played by the test) on the other, a fake clock.

use super::*;
use crate::map::DEFAULT_SUBNET;
use crate::testapp::App;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

fn session_keys() -> (SessionKeys, SessionKeys) {
    np_session::in_memory_pair(b"bridge").expect("handshake")
}

fn pi() -> DeviceKey {
    DeviceKey("pi".into())
}

/// The device's end of one session.
struct Device {
    link: LinkId,
    conn: Connection,
    events: Vec<ConnEvent>,
}

struct World {
    now: Instant,
    bridge: Bridge,
    app: App,
    devices: Vec<Device>,
    /// Connect requests not answered yet.
    connects: Vec<Action>,
    /// Refuse every new flow (with this reason) instead of accepting it.
    refuse: Option<String>,
    /// Packets the bridge wrote, kept here instead of going to the application (UDP tests).
    captured: Option<Vec<Vec<u8>>>,
}

impl World {
    fn new(mux: MuxConfig) -> World {
        let now = Instant::now();
        let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
        map.add_device(pi(), None).expect("device");
        let stack = StackConfig { rx_buffer: 256 * 1024, tx_buffer: 256 * 1024, seed: 7, ..StackConfig::default() };
        let config = BridgeConfig { open_timeout: Duration::from_secs(20), mux };
        World {
            now,
            bridge: Bridge::new(stack, map, config, now),
            app: App::new(now),
            devices: Vec::new(),
            connects: Vec::new(),
            refuse: None,
            captured: None,
        }
    }

    /// Answers the pending connect requests with new sessions.
    fn establish(&mut self) {
        for action in std::mem::take(&mut self.connects) {
            let Action::Connect { link, .. } = action;
            let (ck, dk) = session_keys();
            self.devices.push(Device {
                link,
                conn: Connection::new(&dk, MuxConfig { udp: true, ..self.bridge.config.mux.clone() }, self.now),
                events: Vec::new(),
            });
            self.bridge.connected(
                link,
                Ok(Established { keys: ck, session: format!("s{}", link.0), udp: true }),
                self.now,
            );
        }
    }

    /// One round: packets both ways, records both ways, the device answering opens.
    fn round(&mut self) -> bool {
        let mut moved = false;
        self.app.poll(self.now);
        while let Some(p) = self.app.queues.tx.pop_front() {
            self.bridge.handle_packet(&p, self.now);
            moved = true;
        }
        self.bridge.process(self.now);
        while let Some(a) = self.bridge.poll_action() {
            self.connects.push(a);
            moved = true;
        }
        while let Some(p) = self.bridge.poll_packet() {
            match &mut self.captured {
                Some(c) => c.push(p),
                None => self.app.queues.rx.push_back(p),
            }
            moved = true;
        }
        for d in &mut self.devices {
            let mut wire = Vec::new();
            if self.bridge.poll_link_transmit(d.link, self.now, &mut wire, usize::MAX).is_some() && !wire.is_empty() {
                d.conn.handle_input(&wire, self.now);
                moved = true;
            }
            while let Some(ev) = d.conn.poll_event() {
                match &ev {
                    ConnEvent::FlowOpened { flow, .. } => match &self.refuse {
                        Some(reason) => d.conn.refuse(*flow, reason).expect("refuse"),
                        None => d.conn.accept(*flow).expect("accept"),
                    },
                    // The device of the UDP tests: port 9 is not permitted, anything else echoes.
                    ConnEvent::UdpOpened { assoc, target } if target.ends_with(":9") => {
                        d.conn.udp_close(*assoc, &format!("udp/{target} is not in the device's permit-open list"));
                    }
                    ConnEvent::Datagram { assoc, bytes } => {
                        d.conn.udp_send(*assoc, bytes.clone(), self.now);
                    }
                    _ => {}
                }
                d.events.push(ev);
                moved = true;
            }
            let mut back = Vec::new();
            d.conn.poll_transmit(self.now, &mut back, usize::MAX);
            if !back.is_empty() {
                if let Some(buf) = self.bridge.link_input_buffer(d.link) {
                    buf.extend_from_slice(&back);
                    self.bridge.link_input(d.link, self.now);
                }
                moved = true;
            }
        }
        moved
    }

    /// Rounds until quiet, the clock moving 1 ms per round.
    fn settle(&mut self) {
        for _ in 0..20_000 {
            if !self.round() {
                return;
            }
            self.now += Duration::from_millis(1);
            self.bridge.handle_timeout(self.now);
        }
        panic!("no quiescence");
    }

    fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.app.socket(h)
    }

    /// The flows the (first) device was asked for, in order.
    fn device_flows(&self) -> Vec<u32> {
        self.devices[0]
            .events
            .iter()
            .filter_map(|e| match e {
                ConnEvent::FlowOpened { flow, .. } => Some(*flow),
                _ => None,
            })
            .collect()
    }

    fn device_flow(&self) -> u32 {
        *self.device_flows().first().expect("the device saw the flow")
    }
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

#[test]
fn a_flow_sets_up_its_session_then_moves_bytes_both_ways_and_fins() {
    let mut w = World::new(MuxConfig::default());
    let h = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    assert_eq!(w.connects.len(), 1, "the first flow asks for a session");
    assert!(
        matches!(&w.connects[0], Action::Connect { device, first_target, .. } if *device == pi() && first_target == "localhost:22")
    );
    assert!(!w.socket(h).is_active() || w.socket(h).state() == tcp::State::SynSent, "no SYN-ACK before the device");
    w.establish();
    w.settle();
    assert_eq!(w.socket(h).state(), tcp::State::Established);
    let flow = w.device_flow();

    // Application → device: 600 KiB through a 256 KiB stack buffer and the mux's credit.
    let up = pattern(600 * 1024, 1);
    let down = pattern(700 * 1024, 2);
    let (mut sent, mut got_up, mut got_down, mut sent_down) = (0, Vec::new(), Vec::new(), 0);
    let mut fin_up = false;
    let mut buf = vec![0u8; 100_000];
    for _ in 0..5000 {
        if sent < up.len() {
            sent += w.socket(h).send_slice(&up[sent..]).unwrap_or(0);
            if sent == up.len() {
                w.socket(h).close();
            }
        }
        let d = &mut w.devices[0];
        if sent_down < down.len() {
            sent_down += d.conn.send(flow, &down[sent_down..]).expect("device send");
            if sent_down == down.len() {
                d.conn.finish(flow).expect("finish");
            }
        }
        while !fin_up {
            match d.conn.recv(flow, &mut buf) {
                Ok(Recv::Data(n)) => got_up.extend_from_slice(&buf[..n]),
                Ok(Recv::Fin) => fin_up = true,
                _ => break,
            }
        }
        if let Ok(n) = w.app.socket(h).recv_slice(&mut buf) {
            got_down.extend_from_slice(&buf[..n]);
        }
        w.round();
        w.now += Duration::from_millis(1);
        w.bridge.handle_timeout(w.now);
        if fin_up && got_down.len() == down.len() {
            break;
        }
    }
    w.settle();
    assert!(got_up == up, "every byte up, in order ({} of {})", got_up.len(), up.len());
    assert!(got_down == down, "every byte down, in order ({} of {})", got_down.len(), down.len());
    assert!(fin_up, "the application's FIN arrived after every byte");
    assert!(!w.app.socket(h).may_recv(), "the device's Fin arrived as a FIN");
    assert_eq!(w.bridge.stats().sessions, 1);
}

#[test]
fn a_refused_flow_is_reset_and_an_unreachable_one_gets_an_icmp() {
    for (reason, state) in [
        ("not permitted: localhost:22", tcp::State::Closed),
        ("connecting to localhost:22: No route to host (os error 113)", tcp::State::SynSent),
    ] {
        let mut w = World::new(MuxConfig::default());
        w.refuse = Some(reason.into());
        let h = w.app.connect("100.80.0.2:22", 40000);
        w.settle();
        w.establish();
        w.settle();
        // A reset closes the socket; an ICMP unreachable is ignored by smoltcp (a kernel
        // reports EHOSTUNREACH), so the socket is left trying.
        assert_eq!(w.socket(h).state(), state, "{reason}");
        assert_eq!(w.bridge.stack().stats().resets_sent, u64::from(state == tcp::State::Closed), "{reason}");
        assert_eq!(w.bridge.stack().stats().unreachables_sent, u64::from(state != tcp::State::Closed), "{reason}");
        assert_eq!(w.bridge.stats().failed_opens, 1);
    }
}

#[test]
fn resets_cross_both_ways() {
    let mut w = World::new(MuxConfig::default());
    let a = w.app.connect("100.80.0.2:22", 40000);
    let b = w.app.connect("100.80.0.2:22", 40001);
    w.settle();
    w.establish();
    w.settle();
    let flows = w.device_flows();
    assert_eq!(flows.len(), 2);
    // The device aborts one flow: the application's socket is reset.
    w.devices[0].conn.abort(flows[0], "target reset");
    w.settle();
    assert_eq!(w.socket(a).state(), tcp::State::Closed);
    // The application aborts the other: the device sees the flow reset.
    w.socket(b).abort();
    w.settle();
    assert!(
        w.devices[0].events.iter().any(|e| matches!(e, ConnEvent::FlowReset { flow, .. } if *flow == flows[1])),
        "{:?}",
        w.devices[0].events
    );
    assert_eq!(w.bridge.stack().flow_count(), 0);
}

#[test]
fn a_stalled_reader_holds_only_its_window_and_the_next_flow_still_moves() {
    let mux = MuxConfig { initial_window: 128 * 1024, ..MuxConfig::default() };
    let mut w = World::new(mux);
    let stalled = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    w.establish();
    w.settle();
    let flow = w.device_flow();
    // The application sends 2 MiB; the device reads nothing.
    let data = pattern(2 << 20, 3);
    let mut sent = 0;
    for _ in 0..200 {
        sent += w.socket(stalled).send_slice(&data[sent..]).unwrap_or(0);
        w.settle();
    }
    let held = w.devices[0].conn.recv_pending(flow);
    assert_eq!(held, 128 * 1024, "the device holds exactly the window");
    assert!(sent < data.len(), "the application was pushed back ({sent} bytes taken)");

    // Meanwhile another flow works.
    let other = w.app.connect("100.80.0.2:22", 40001);
    w.settle();
    assert_eq!(w.socket(other).state(), tcp::State::Established);
    w.socket(other).send_slice(b"ping").expect("send");
    w.settle();
    let second = *w.device_flows().get(1).expect("second flow");
    let mut buf = [0u8; 16];
    assert_eq!(w.devices[0].conn.recv(second, &mut buf).expect("recv"), Recv::Data(4));

    // The stalled reader reads: everything arrives, in order.
    let mut got = Vec::new();
    let mut big = vec![0u8; 1 << 20];
    for _ in 0..2000 {
        if sent < data.len() {
            sent += w.socket(stalled).send_slice(&data[sent..]).unwrap_or(0);
        }
        while let Ok(Recv::Data(n)) = w.devices[0].conn.recv(flow, &mut big) {
            got.extend_from_slice(&big[..n]);
        }
        w.round();
        w.now += Duration::from_millis(1);
        w.bridge.handle_timeout(w.now);
        if got.len() == data.len() {
            break;
        }
    }
    assert!(got == data, "{} of {} bytes, in order", got.len(), data.len());
}

#[test]
fn flows_waiting_on_a_session_that_ends_are_retried_once_on_a_new_one() {
    let mut w = World::new(MuxConfig::default());
    let h = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    w.establish();
    // The session dies (the relay restarted) before the device saw the open.
    let link = w.devices[0].link;
    w.devices.clear();
    w.bridge.link_eof(link);
    w.settle();
    assert_eq!(w.connects.len(), 1, "a new session is asked for");
    assert_eq!(w.bridge.stats().retried, 1);
    w.establish();
    w.settle();
    assert_eq!(w.socket(h).state(), tcp::State::Established, "the flow opened on the new session");
    assert!(w.bridge.describe(&pi()).starts_with("established"));
}

#[test]
fn a_device_that_never_answers_is_unreachable_after_the_open_timeout() {
    let mut w = World::new(MuxConfig::default());
    let h = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    assert_eq!(w.connects.len(), 1);
    // Nobody answers the connect: 20 s of fake time later the application is told.
    let deadline = w.bridge.poll_timeout(w.now).expect("a deadline");
    assert!(deadline <= w.now + Duration::from_secs(20));
    w.now += Duration::from_secs(21);
    w.bridge.handle_timeout(w.now);
    w.settle();
    assert_eq!(w.bridge.stack().stats().unreachables_sent, 1);
    assert_eq!(w.bridge.stats().failed_opens, 1, "the flow is gone");
    // (smoltcp ignores the ICMP and sends its SYN again: a new flow, waiting like the first.)
    let _ = h;
    // A session setup that fails later finds nobody waiting and nothing breaks.
    let Some(Action::Connect { link, .. }) = w.connects.pop() else { panic!("connect") };
    w.bridge.connected(link, Err(SetupFailed { kind: RefuseKind::Unreachable, reason: "late".into() }), w.now);
    assert!(w.bridge.describe(&pi()).contains("late"));
}

#[test]
fn a_device_cannot_open_flows_toward_the_client() {
    let mut w = World::new(MuxConfig::default());
    let h = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    w.establish();
    w.settle();
    // A hostile device opens flows of its own and sends on them before any answer.
    let opened: Vec<u32> =
        (0..5).map(|i| w.devices[0].conn.open(&format!("127.0.0.1:{}", 1000 + i)).expect("open")).collect();
    for f in &opened {
        let _ = w.devices[0].conn.send(*f, b"GET / HTTP/1.0\r\n\r\n");
    }
    w.settle();
    for f in &opened {
        assert!(
            w.devices[0].events.iter().any(|e| matches!(e, ConnEvent::FlowRefused { flow, .. } if flow == f)),
            "flow {f} refused: {:?}",
            w.devices[0].events
        );
    }
    assert_eq!(w.bridge.stack().flow_count(), 1, "nothing but the application's own flow");
    assert!(w.devices[0].conn.error().is_none(), "refusing is not an error; the session goes on");
    assert_eq!(w.socket(h).state(), tcp::State::Established);
}

/// One flow, established, and the device's Fin already delivered to the application.
fn device_finished_first() -> (World, SocketHandle, u32) {
    let mut w = World::new(MuxConfig::default());
    let h = w.app.connect("100.80.0.2:22", 40000);
    w.settle();
    w.establish();
    w.settle();
    let flow = w.device_flow();
    w.devices[0].conn.finish(flow).expect("device finishes");
    w.settle();
    assert!(!w.app.socket(h).may_recv(), "the device's Fin arrived as a FIN");
    (w, h, flow)
}

#[test]
fn the_device_finishes_first_then_the_applications_last_bytes_and_fin_arrive_whole() {
    // An ssh server often closes first: the device's Fin, then the client's last bytes and FIN.
    // Those bytes wait in smoltcp's buffer until a record pulls them; the FIN must follow them
    // as the flow's Fin, not turn into a reset.
    let (mut w, h, flow) = device_finished_first();
    let tail = pattern(300 * 1024, 9);
    let mut sent = 0;
    let (mut got, mut fin) = (Vec::new(), false);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..2000 {
        if sent < tail.len() {
            sent += w.socket(h).send_slice(&tail[sent..]).unwrap_or(0);
            if sent == tail.len() {
                w.socket(h).close();
            }
        }
        loop {
            match w.devices[0].conn.recv(flow, &mut buf) {
                Ok(Recv::Data(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Recv::Fin) => fin = true,
                _ => break,
            }
        }
        if fin {
            break;
        }
        w.round();
        w.now += Duration::from_millis(1);
        w.bridge.handle_timeout(w.now);
    }
    w.settle();
    assert!(got == tail, "every byte after the device's Fin ({} of {})", got.len(), tail.len());
    assert!(fin, "then the application's FIN as the flow's Fin");
    let reset = w.devices[0].events.iter().any(|e| matches!(e, ConnEvent::FlowReset { .. }));
    assert!(!reset, "no reset: {:?}", w.devices[0].events);
}

#[test]
fn the_device_finishes_first_and_the_applications_fin_comes_after_its_last_byte_was_read() {
    // The same, with the application's FIN arriving only once every byte before it has been
    // read: smoltcp goes straight to TIME-WAIT with nothing left to read, and the flow ends in
    // that very step. Its FIN must still reach the device as the flow's Fin, not as a reset.
    let (mut w, h, flow) = device_finished_first();
    let tail = pattern(1000, 3);
    assert_eq!(w.socket(h).send_slice(&tail).expect("send"), tail.len());
    let (mut got, mut fin) = (Vec::new(), false);
    let mut buf = vec![0u8; 1 << 16];
    let mut read = |w: &mut World, got: &mut Vec<u8>, fin: &mut bool| loop {
        match w.devices[0].conn.recv(flow, &mut buf) {
            Ok(Recv::Data(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Recv::Fin) => *fin = true,
            _ => break,
        }
    };
    for _ in 0..100 {
        read(&mut w, &mut got, &mut fin);
        if got.len() == tail.len() {
            break;
        }
        w.round();
    }
    assert_eq!(got, tail, "the last bytes, before any FIN");
    w.socket(h).close();
    for _ in 0..100 {
        w.round();
        read(&mut w, &mut got, &mut fin);
        if fin {
            break;
        }
    }
    let reset = w.devices[0].events.iter().any(|e| matches!(e, ConnEvent::FlowReset { .. }));
    assert!(!reset, "no reset: {:?}", w.devices[0].events);
    assert!(fin, "the application's FIN as the flow's Fin");
}

#[test]
fn a_device_added_while_up_is_served_and_a_removed_one_is_cut_off() {
    let mut w = World::new(MuxConfig::default());
    let nas = DeviceKey("nas@bob".into());
    let addr = w.bridge.add_device(nas.clone()).expect("room for it");
    assert_eq!(w.bridge.add_device(nas.clone()).expect("again"), addr, "the same address when added again");
    let h = w.app.connect(&format!("{addr}:22"), 40000);
    w.settle();
    assert!(
        matches!(w.connects.as_slice(), [Action::Connect { device, .. }] if *device == nas),
        "the new device's session is asked for: {:?}",
        w.connects
    );
    w.establish();
    w.settle();
    assert_eq!(w.socket(h).state(), tcp::State::Established);

    // Removed (revoked): its open flow is reset, its session ends, its address answers no more.
    w.bridge.remove_device(&nas);
    w.settle();
    assert_eq!(w.socket(h).state(), tcp::State::Closed, "the open flow was reset");
    assert!(w.bridge.describe(&nas).starts_with("ended"), "{}", w.bridge.describe(&nas));
    let again = w.app.connect(&format!("{addr}:22"), 40001);
    w.settle();
    assert_eq!(w.connects.len(), 0, "no session is set up for a removed device");
    assert_ne!(w.socket(again).state(), tcp::State::Established);
}

#[path = "tests_udp.rs"]
mod udp;
