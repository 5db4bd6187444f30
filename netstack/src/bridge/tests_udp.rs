//! UDP through the bridge: datagrams from the application open associations on the device's
//! session, answers come back as UDP packets, refusals as ICMP port unreachable.

use std::net::SocketAddr;

use super::*;
use crate::packet::{parse_udp, udp_packet};

fn udp_world() -> World {
    let mut w = World::new(MuxConfig { udp_idle_timeout: Duration::from_secs(2), ..MuxConfig::default() });
    w.captured = Some(Vec::new());
    w
}

impl World {
    fn send_udp(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let p = udp_packet(src, dst, payload);
        self.bridge.handle_packet(&p, self.now);
    }

    fn take_captured(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(self.captured.as_mut().expect("capturing"))
    }
}

#[test]
fn datagrams_open_an_association_and_answers_come_back_in_both_families() {
    let mut w = udp_world();
    let map = w.bridge.stack().map().clone();
    let v4 = (
        SocketAddr::new(map.interface_addr().into(), 5353),
        SocketAddr::new(map.device_addr(&pi()).expect("v4").into(), 53),
    );
    let v6 = (
        SocketAddr::new(map.interface_addr_v6().into(), 5353),
        SocketAddr::new(map.device_addr_v6(&pi()).expect("v6").into(), 53),
    );
    w.send_udp(v4.0, v4.1, b"query one");
    w.settle();
    assert!(
        matches!(&w.connects[0], Action::Connect { first_target, .. } if first_target == "udp/localhost:53"),
        "the request names the association, so a UDP-only permit admits it"
    );
    w.establish();
    w.settle();
    w.send_udp(v6.0, v6.1, b"query two");
    w.settle();
    let got = w.take_captured();
    assert_eq!(got.len(), 2, "{got:?}");
    for (p, (app, virt), payload) in [(&got[0], v4, &b"query one"[..]), (&got[1], v6, &b"query two"[..])] {
        let d = parse_udp(p).expect("a UDP answer with good checksums");
        assert_eq!((d.src, d.dst), (virt, app));
        assert_eq!(&p[d.payload.clone()], payload);
    }
    let st = w.bridge.udp_status();
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|s| s.target == "localhost:53" && s.datagrams_up == 1 && s.datagrams_down == 1));
    assert_eq!(st[0].bytes_up, 9);

    // Idle: both associations end, and the next datagram opens a new one.
    w.now += Duration::from_secs(3);
    w.bridge.handle_timeout(w.now);
    w.settle();
    assert_eq!(w.bridge.udp_counts(), (0, 0));
    assert!(w.take_captured().is_empty(), "an idle end sends the application nothing");
    w.send_udp(v4.0, v4.1, b"again");
    w.settle();
    assert_eq!(w.take_captured().len(), 1);
    assert_eq!(w.bridge.udp_counts().0, 1);
}

#[test]
fn an_unpermitted_port_gets_a_port_unreachable_at_once() {
    let mut w = udp_world();
    w.establish();
    let map = w.bridge.stack().map().clone();
    let app = SocketAddr::new(map.interface_addr().into(), 40000);
    let virt = SocketAddr::new(map.device_addr(&pi()).expect("v4").into(), 9);
    w.send_udp(app, virt, b"x");
    w.settle();
    w.establish();
    w.settle();
    let got = w.take_captured();
    assert_eq!(got.len(), 1, "{got:?}");
    let ip = smoltcp::wire::Ipv4Packet::new_checked(&got[0][..]).expect("ip");
    assert_eq!(ip.next_header(), smoltcp::wire::IpProtocol::Icmp);
    assert_eq!(&ip.payload()[..2], &[3, 3], "destination unreachable, port unreachable");
    assert_eq!(w.bridge.udp_counts(), (0, 0));
}

#[test]
fn bad_datagrams_are_dropped_and_counted() {
    let mut w = udp_world();
    let map = w.bridge.stack().map().clone();
    let app = SocketAddr::new(map.interface_addr().into(), 40000);
    let virt = SocketAddr::new(map.device_addr(&pi()).expect("v4").into(), 53);
    let good = udp_packet(app, virt, b"hello");
    for n in 20..good.len() {
        w.bridge.handle_packet(&good[..n], w.now);
    }
    let mut bad_sum = good.clone();
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 1;
    w.bridge.handle_packet(&bad_sum, w.now);
    w.settle();
    assert_eq!(w.bridge.stack().stats().malformed, (good.len() - 20) as u64 + 1);
    assert!(w.connects.is_empty(), "nothing bad opens a session");
    // An unmapped address in the subnet: unreachable at once.
    let nobody = SocketAddr::new(std::net::Ipv4Addr::new(100, 80, 0, 200).into(), 53);
    w.send_udp(app, nobody, b"q");
    w.settle();
    assert_eq!(w.take_captured().len(), 1);
    assert_eq!(w.bridge.stack().stats().unmapped, 1);
}

#[test]
fn datagrams_waiting_for_a_session_are_bounded() {
    let mut w = udp_world();
    let map = w.bridge.stack().map().clone();
    let virt = SocketAddr::new(map.device_addr(&pi()).expect("v4").into(), 53);
    for port in 0..1000u16 {
        w.send_udp(SocketAddr::new(map.interface_addr().into(), 10_000 + port), virt, b"q");
    }
    w.settle();
    assert_eq!(w.bridge.udp_counts().1, MAX_WAITING);
    assert_eq!(w.connects.len(), 1, "one session for all of them");
    w.establish();
    w.settle();
    assert_eq!(w.take_captured().len(), MAX_WAITING);
    assert_eq!(w.bridge.udp_counts(), (MAX_WAITING, 0));
}

#[test]
fn a_session_without_udp_answers_datagrams_with_port_unreachable_and_keeps_its_flows() {
    let mut w = udp_world();
    let map = w.bridge.stack().map().clone();
    let app = SocketAddr::new(map.interface_addr().into(), 40000);
    let virt = SocketAddr::new(map.device_addr(&pi()).expect("v4").into(), 53);
    w.send_udp(app, virt, b"q");
    w.settle();
    // An npd too old for UDP: its session says so at the handshake.
    let Some(Action::Connect { link, .. }) = w.connects.pop() else { panic!("no connect") };
    let (ck, dk) = session_keys();
    w.devices.push(Device { link, conn: Connection::new(&dk, w.bridge.config.mux.clone(), w.now), events: Vec::new() });
    w.bridge.connected(link, Ok(Established { keys: ck, session: "old".into(), udp: false }), w.now);
    w.settle();
    let got = w.take_captured();
    assert_eq!(got.len(), 1, "{got:?}");
    let ip = smoltcp::wire::Ipv4Packet::new_checked(&got[0][..]).expect("ip");
    assert_eq!((ip.next_header(), ip.payload()[0], ip.payload()[1]), (smoltcp::wire::IpProtocol::Icmp, 3, 3));
    // No UDP frame ever reached the old device: its session is intact.
    assert!(w.devices[0].events.iter().all(|e| !matches!(e, ConnEvent::Ended { .. })), "{:?}", w.devices[0].events);
    assert!(w.bridge.describe(&pi()).starts_with("established"), "{}", w.bridge.describe(&pi()));
}
