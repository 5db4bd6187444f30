//! The stack driven on packets in memory with a fake clock: held SYNs, refusals, limits and
//! hostile input here; whole flows against a second smoltcp in `app`.

use std::time::Duration;

use super::*;
use crate::map::{Prefix, DEFAULT_SUBNET};
use crate::packet::{self, Unusable};
use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpControl, TcpOption, TcpPacket, TcpRepr, TcpSeqNumber};

mod app;

const DEVICE: &str = "100.80.0.2";
const APP: &str = "100.80.0.1";

fn map() -> AddressMap {
    let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
    map.add_device("pi".into(), None).expect("device");
    map.add_route("192.168.1.0/24".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
    map.add_route("fd00::/64".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
    map
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A TCP segment from `src` to `dst`, built with smoltcp::wire.
fn segment(src: SocketAddr, dst: SocketAddr, control: TcpControl, seq: i32, ack: Option<i32>, data: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 65535,
        window_scale: (control == TcpControl::Syn).then_some(7),
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: data,
    };
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    packet::ip_packet(src.ip(), dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
        repr.emit(&mut TcpPacket::new_unchecked(buf), &s, &d, &ChecksumCapabilities::default())
    })
}

fn syn(src: &str, dst: &str) -> Vec<u8> {
    segment(sa(src), sa(dst), TcpControl::Syn, 1000, None, &[])
}

struct Harness {
    stack: Stack,
    now: Instant,
    events: Vec<Event>,
}

impl Harness {
    fn new() -> Self {
        Self::with(StackConfig { rx_buffer: 256 * 1024, tx_buffer: 256 * 1024, ..StackConfig::default() })
    }

    fn with(config: StackConfig) -> Self {
        let now = Instant::now();
        Harness { stack: Stack::new(config, map(), now), now, events: Vec::new() }
    }

    fn input(&mut self, packet: &[u8]) {
        self.stack.handle_packet(packet, self.now);
    }

    /// Everything the stack has to say, events kept in `self.events`.
    fn output(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut progress = false;
            while let Some(ev) = self.stack.poll_event() {
                self.events.push(ev);
                progress = true;
            }
            while let Some(p) = self.stack.poll_transmit() {
                out.push(p);
                progress = true;
            }
            if !progress {
                return out;
            }
        }
    }

    fn new_flows(&mut self) -> Vec<FlowId> {
        let ids = self.events.iter().filter_map(|e| match e {
            Event::NewFlow { id, .. } => Some(*id),
            _ => None,
        });
        let ids = ids.collect();
        self.events.retain(|e| !matches!(e, Event::NewFlow { .. }));
        ids
    }
}

fn tcp_of(packet: &[u8]) -> (SocketAddr, SocketAddr, TcpControl, Option<TcpSeqNumber>, Vec<TcpOption<'static>>) {
    let seg = packet::parse_tcp(packet).expect("a tcp segment");
    let ip = Ipv4Packet::new_checked(packet).ok();
    let mut opts = Vec::new();
    if let Some(ip) = ip {
        let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
        let mut rest = tcp.options();
        while !rest.is_empty() {
            let Ok((next, opt)) = TcpOption::parse(rest) else { break };
            if let TcpOption::WindowScale(w) = opt {
                opts.push(TcpOption::WindowScale(w));
            }
            rest = next;
        }
    }
    (seg.src, seg.dst, seg.control, seg.ack, opts)
}

#[test]
fn the_syn_ack_waits_for_accept() {
    let mut h = Harness::new();
    let syn = syn("100.80.0.1:40000", "100.80.0.2:22");
    h.input(&syn);
    assert!(h.output().is_empty(), "no answer before the device has connected");
    let ids = h.new_flows();
    assert_eq!(ids.len(), 1);
    assert_eq!(h.stack.pending_count(), 1);

    // A retransmitted SYN is the same flow.
    h.now += Duration::from_secs(1);
    h.input(&syn);
    assert!(h.output().is_empty());
    assert!(h.new_flows().is_empty());
    assert_eq!(h.stack.stats().syn_retransmits, 1);

    h.stack.accept_flow(ids[0], h.now).expect("accept");
    let out = h.output();
    assert_eq!(out.len(), 1);
    let (src, dst, control, ack, opts) = tcp_of(&out[0]);
    assert_eq!((src, dst), (sa("100.80.0.2:22"), sa("100.80.0.1:40000")));
    assert_eq!(control, TcpControl::Syn);
    assert_eq!(ack, Some(TcpSeqNumber(1001)));
    assert!(opts.iter().any(|o| matches!(o, TcpOption::WindowScale(s) if *s > 0)), "window scaling offered: {opts:?}");
    assert_eq!(h.stack.pending_count(), 0);
    assert_eq!(h.stack.accept_flow(ids[0], h.now), Err(FlowError::NotPending));
    assert_eq!(h.stack.flows_per_device().get(&"pi".into()), Some(&1));
}

#[test]
fn a_handshake_reset_by_the_application_ends_the_flow_and_leaves_no_listener() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.output();
    let ids = h.new_flows();
    h.stack.accept_flow(ids[0], h.now).expect("accept");
    assert_eq!(h.output().len(), 1, "a SYN-ACK");
    // The application gave up meanwhile: its kernel answers the SYN-ACK with a reset.
    h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, &[]));
    h.output();
    assert!(h.events.contains(&Event::Closed(ids[0])), "{:?}", h.events);
    assert_eq!(h.stack.flows_per_device().get(&"pi".into()).copied().unwrap_or(0), 0);
    // The next connection to that port is a flow of its own and gets its own SYN-ACK (a
    // socket left listening would have taken its SYN).
    h.input(&syn("100.80.0.1:40001", "100.80.0.2:22"));
    h.output();
    let ids = h.new_flows();
    assert_eq!(ids.len(), 1);
    h.stack.accept_flow(ids[0], h.now).expect("accept the next flow");
    let out = h.output();
    assert_eq!(out.len(), 1);
    let (src, dst, control, ..) = tcp_of(&out[0]);
    assert_eq!((src, dst, control), (sa("100.80.0.2:22"), sa("100.80.0.1:40001"), TcpControl::Syn));
}

#[test]
fn new_flow_reports_the_target() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.input(&syn("100.80.0.1:40001", "192.168.1.10:80"));
    h.input(&syn("[fd6e:7000::6450:1]:40002", "[fd00::10]:443"));
    // The device's IPv6 address: the same device, the same target as its IPv4 one.
    h.input(&syn("[fd6e:7000::6450:1]:40003", "[fd6e:7000::100.80.0.2]:22"));
    h.output();
    let targets: Vec<_> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::NewFlow { target, .. } => Some((target.device.0.as_str(), target.target.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("pi", "localhost:22".into()),
            ("pi", "192.168.1.10:80".into()),
            ("pi", "[fd00::10]:443".into()),
            ("pi", "localhost:22".into())
        ]
    );
}

#[test]
fn an_unassigned_ipv6_address_is_unreachable() {
    let mut h = Harness::new();
    // Unassigned in the prefix; the interface's own; another spelling of the device's address
    // (bits between the prefix and the IPv4 address set), which is no device's.
    for dst in ["[fd6e:7000::6450:99]:22", "[fd6e:7000::6450:1]:22", "[fd6e:7000::1:6450:2]:22"] {
        h.input(&syn("[fd6e:7000::6450:1]:40000", dst));
        let out = h.output();
        assert_eq!(out.len(), 1, "{dst}");
        assert_eq!(
            smoltcp::wire::Ipv6Packet::new_checked(&out[0][..]).expect("ipv6").next_header(),
            IpProtocol::Icmpv6
        );
    }
    assert!(h.new_flows().is_empty());
    assert_eq!(h.stack.stats().unreachables_sent, 3);
}

#[test]
fn the_syn_ack_is_retransmitted_on_the_fake_clock() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.output();
    let id = h.new_flows()[0];
    h.stack.accept_flow(id, h.now).expect("accept");
    assert_eq!(h.output().len(), 1);
    let at = h.stack.poll_at(h.now).expect("a retransmission timer");
    assert!(at > h.now, "nothing to do before the timer");
    h.now = at;
    h.stack.handle_timeout(h.now);
    let out = h.output();
    assert_eq!(out.len(), 1, "SYN-ACK again");
    assert_eq!(tcp_of(&out[0]).2, TcpControl::Syn);
}

#[test]
fn refused_and_unreachable_flows() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.input(&syn("100.80.0.1:40001", "100.80.0.2:23"));
    h.output();
    let ids = h.new_flows();
    h.stack.refuse_flow(ids[0], RefuseKind::Refused).expect("refuse");
    h.stack.refuse_flow(ids[1], RefuseKind::Unreachable).expect("refuse");
    let out = h.output();
    assert_eq!(out.len(), 2);
    let (src, dst, control, ack, _) = tcp_of(&out[0]);
    assert_eq!(
        (src, dst, control, ack),
        (sa("100.80.0.2:22"), sa("100.80.0.1:40000"), TcpControl::Rst, Some(TcpSeqNumber(1001)))
    );
    assert_eq!(packet::parse_tcp(&out[1]).err(), Some(Unusable::NotTcp), "an ICMP message");
    assert_eq!(h.stack.flow_count(), 0);
    assert_eq!(h.stack.accept_flow(ids[0], h.now), Err(FlowError::Unknown));
}

#[test]
fn an_unassigned_address_is_unreachable_and_stray_segments_are_reset() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.99:22"));
    let out = h.output();
    assert_eq!(out.len(), 1);
    assert_eq!(packet::parse_tcp(&out[0]).err(), Some(Unusable::NotTcp));
    assert_eq!(h.stack.stats().unmapped, 1);

    h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::None, 5, Some(77), b"hi"));
    let out = h.output();
    assert_eq!(out.len(), 1);
    let seg = packet::parse_tcp(&out[0]).expect("reset");
    assert!(seg.is_rst());
    assert_eq!(seg.seq, TcpSeqNumber(77));
    // Nothing answers a reset.
    h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 5, None, b""));
    assert!(h.output().is_empty());
    assert!(h.events.is_empty());
}

#[test]
fn a_reset_while_pending_cancels_the_flow() {
    let mut h = Harness::new();
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.output();
    let id = h.new_flows()[0];
    h.input(&segment(sa("100.80.0.1:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, b""));
    h.output();
    assert_eq!(h.events, [Event::Closed(id)]);
    assert_eq!(h.stack.accept_flow(id, h.now), Err(FlowError::Unknown));
    assert_eq!(h.stack.pending_count(), 0);
}

#[test]
fn an_accepted_handshake_never_completed_times_out_and_frees_its_place() {
    let mut h =
        Harness::with(StackConfig { max_pending: 2, rx_buffer: 4096, tx_buffer: 4096, ..StackConfig::default() });
    for port in [40000, 40001] {
        h.input(&syn(&format!("100.80.0.1:{port}"), "100.80.0.2:22"));
    }
    h.output();
    let ids = h.new_flows();
    let accepted_at = h.now;
    for id in &ids {
        h.stack.accept_flow(*id, h.now).expect("accept");
    }
    h.output();
    // Both are half-open (SYN-ACK sent, never ACKed): a third SYN finds no place.
    h.input(&syn("100.80.0.1:40002", "100.80.0.2:22"));
    h.output();
    assert!(h.new_flows().is_empty());
    assert_eq!(h.stack.stats().pending_full, 1);
    // At the deadline both end, and the place is free again.
    let mut guard = 0;
    while h.stack.flow_count() > 0 && guard < 100 {
        let at = h.stack.poll_at(h.now).expect("a timer while flows are half-open");
        h.now = at.max(h.now);
        h.stack.handle_timeout(h.now);
        h.output();
        guard += 1;
    }
    assert_eq!(h.stack.flow_count(), 0);
    assert_eq!(h.stack.stats().handshake_timeouts, 2);
    assert!(h.now >= accepted_at + Duration::from_secs(10), "ended before the deadline");
    assert_eq!(h.events.iter().filter(|e| matches!(e, Event::Closed(_))).count(), 2);
    h.input(&syn("100.80.0.1:40003", "100.80.0.2:22"));
    h.output();
    assert_eq!(h.new_flows().len(), 1);
}

#[test]
fn a_syn_flood_keeps_memory_bounded() {
    let mut h = Harness::new();
    for i in 0..10_000u32 {
        let src = SocketAddr::new(Ipv4Addr::from(0x6450_0000u32 + 1 + (i >> 14)).into(), 1024 + (i & 0x3fff) as u16);
        let port = 1 + (i % 1000) as u16;
        h.input(&segment(
            src,
            SocketAddr::new(DEVICE.parse().expect("ip"), port),
            TcpControl::Syn,
            i as i32,
            None,
            &[],
        ));
        if i % 100 == 0 {
            h.output();
        }
    }
    assert!(h.output().is_empty(), "a held SYN is never answered");
    assert_eq!(h.stack.pending_count(), 256);
    assert_eq!(h.stack.flow_count(), 256);
    assert_eq!(h.stack.stats().pending_full, 10_000 - 256);
    assert_eq!(h.new_flows().len(), 256);
    assert_eq!(h.stack.sockets.iter().count(), 0, "no socket before accept");
}

#[test]
fn the_flow_cap_refuses_with_a_reset() {
    let mut h = Harness::with(StackConfig { max_flows: 2, ..StackConfig::default() });
    for port in [40000, 40001, 40002] {
        h.input(&syn(&format!("{APP}:{port}"), &format!("{DEVICE}:22")));
    }
    let out = h.output();
    assert_eq!(h.new_flows().len(), 2);
    assert_eq!(out.len(), 1);
    assert!(packet::parse_tcp(&out[0]).expect("rst").is_rst());
}

#[test]
fn packets_from_other_hosts_are_dropped_before_anything_sees_them() {
    let mut h = Harness::new();
    let foreign = [
        // A neighbour routing the subnet through this host, to a device and to a routed host.
        syn("198.19.254.2:40000", "100.80.0.2:22"),
        syn("198.19.254.2:40001", "192.168.1.10:80"),
        // Another address of this host is still not the interface's (the kernel never picks
        // one of them for a route into the interface).
        syn("10.77.0.1:40000", "100.80.0.2:22"),
        // Device addresses, the subnet's network and broadcast, loopback, unspecified.
        syn("100.80.0.2:40000", "100.80.0.2:22"),
        syn("100.80.0.0:40000", "100.80.0.2:22"),
        syn("100.80.255.255:40000", "100.80.0.2:22"),
        syn("127.0.0.1:40000", "100.80.0.2:22"),
        syn("0.0.0.0:40000", "100.80.0.2:22"),
        // IPv6 from anything but the interface's IPv6 address, the IPv4 one mapped included.
        syn("[fd00::1]:40000", "[fd00::10]:22"),
        syn("[::ffff:100.80.0.1]:40000", "[fd00::10]:22"),
        syn("[fd6e:7000::6450:2]:40000", "[fd00::10]:22"),
        // Not a SYN, which would otherwise get a reset; to an unmapped address, which would
        // otherwise get an ICMP unreachable.
        segment(sa("198.19.254.2:40000"), sa("100.80.0.2:22"), TcpControl::None, 5, Some(77), b"hi"),
        syn("198.19.254.2:40000", "100.80.0.99:22"),
    ];
    let udp =
        packet::ip_packet("198.19.254.2".parse().expect("ip"), DEVICE.parse().expect("ip"), IpProtocol::Udp, 8, |b| {
            b.copy_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0])
        });
    for p in foreign.iter().chain([&udp]) {
        h.input(p);
    }
    assert!(h.output().is_empty(), "no answer of any kind to another host");
    assert!(h.events.is_empty(), "{:?}", h.events);
    assert_eq!(h.stack.flow_count(), 0);
    let st = h.stack.stats();
    assert_eq!(st.foreign_source, foreign.len() as u64 + 1);
    assert_eq!((st.malformed, st.not_tcp, st.unmapped, st.resets_sent, st.unreachables_sent), (0, 0, 0, 0, 0));

    // The same SYNs from the interface's own addresses open flows.
    h.input(&syn("100.80.0.1:40000", "100.80.0.2:22"));
    h.input(&syn("[fd6e:7000::6450:1]:40000", "[fd00::10]:22"));
    h.output();
    assert_eq!(h.new_flows().len(), 2);
    // A foreign packet that would belong to one of them, but for its source, is dropped.
    h.input(&segment(sa("198.19.254.2:40000"), sa("100.80.0.2:22"), TcpControl::Rst, 1001, None, &[]));
    h.output();
    assert!(h.events.is_empty(), "{:?}", h.events);
    assert_eq!(h.stack.pending_count(), 2);
}

#[test]
fn garbage_is_counted_and_dropped() {
    let mut h = Harness::new();
    let good = syn("100.80.0.1:40000", "100.80.0.2:22");
    let good6 = syn("[fd6e:7000::6450:1]:40000", "[fd00::10]:22");
    let mut bad_ip_checksum = good.clone();
    bad_ip_checksum[10] ^= 0xff;
    let mut bad_tcp_checksum = good.clone();
    let last = bad_tcp_checksum.len() - 1;
    bad_tcp_checksum[last] ^= 0xff;
    let mut bad_total_len = good.clone();
    bad_total_len[2..4].copy_from_slice(&2000u16.to_be_bytes());
    let mut short_total_len = good.clone();
    short_total_len[2..4].copy_from_slice(&30u16.to_be_bytes());
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x4f;
    let mut fragment = good.clone();
    fragment[6] = 0x20; // more fragments
    let mut ip = Ipv4Packet::new_unchecked(&mut fragment[..]);
    ip.fill_checksum();
    // IPv6 with a fragment header, and with a hop-by-hop options header, before the segment.
    let ext = |kind: u8| packet::with_ipv6_extension(&good6, kind);
    // The kernel's own listener report: to a multicast group, from a link-local source.
    let mut mld = packet::ip_packet(
        "fe80::1".parse().expect("ip"),
        "ff02::16".parse().expect("ip"),
        IpProtocol::Icmpv6,
        8,
        |b| b.fill(0),
    );
    mld[6] = 58;
    let mut bad_v6_len = good6.clone();
    bad_v6_len[4..6].copy_from_slice(&9000u16.to_be_bytes());
    let mut v6_tcp_checksum = good6.clone();
    let last6 = v6_tcp_checksum.len() - 1;
    v6_tcp_checksum[last6] ^= 0x01;
    let udp = packet::ip_packet(APP.parse().expect("ip"), DEVICE.parse().expect("ip"), IpProtocol::Udp, 8, |b| {
        b.copy_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0])
    });
    let icmp = packet::ip_packet(APP.parse().expect("ip"), DEVICE.parse().expect("ip"), IpProtocol::Icmp, 8, |b| {
        b.copy_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
    });
    let malformed = [
        vec![],
        vec![0x45],
        vec![0x60; 39],
        vec![0xff; 100],
        good[..20].to_vec(),
        good[..good.len() - 1].to_vec(),
        good6[..50].to_vec(),
        bad_ip_checksum,
        bad_tcp_checksum,
        bad_total_len,
        short_total_len,
        bad_ihl,
        bad_v6_len,
        v6_tcp_checksum,
    ];
    for p in &malformed {
        h.input(p);
    }
    h.input(&udp);
    h.input(&icmp);
    h.input(&fragment);
    h.input(&ext(44));
    h.input(&ext(0));
    h.input(&ext(60));
    h.input(&mld);
    assert!(h.output().is_empty());
    // The UDP datagram (an empty one, no checksum over IPv4) is the only thing carried on.
    assert!(matches!(&h.events[..], [Event::Datagram { payload, .. }] if payload.is_empty()), "{:?}", h.events);
    let st = h.stack.stats();
    assert_eq!(st.malformed, malformed.len() as u64);
    assert_eq!((st.not_tcp, st.udp_datagrams_in), (1, 1));
    assert_eq!((st.fragments, st.ipv6_extension_headers, st.multicast), (2, 2, 1));
    assert_eq!(st.foreign_source, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_packet_from_another_host_gets_an_answer_or_a_flow(
        src in any::<u32>(),
        dst in prop_oneof![Just(0x6450_0002u32), Just(0xc0a8_010au32), any::<u32>()],
        ports in any::<(u16, u16)>(),
        control in prop_oneof![Just(TcpControl::Syn), Just(TcpControl::None), Just(TcpControl::Fin), Just(TcpControl::Psh)],
        ack in any::<Option<i32>>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(src != 0x6450_0001);
        let mut h = Harness::new();
        let (s, d) = (SocketAddr::from((Ipv4Addr::from(src), ports.0)), SocketAddr::from((Ipv4Addr::from(dst), ports.1)));
        h.input(&segment(s, d, control, 1000, ack, &data));
        prop_assert!(h.output().is_empty());
        prop_assert!(h.events.is_empty());
        prop_assert_eq!(h.stack.stats().foreign_source, 1);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut h = Harness::new();
        h.input(&bytes);
        h.output();
    }

    #[test]
    fn mutated_segments_never_panic(
        edits in proptest::collection::vec((0usize..80, any::<u8>()), 1..6),
        cut in 0usize..80,
        v6 in any::<bool>(),
    ) {
        let mut h = Harness::new();
        // An open flow, so mutated segments also reach smoltcp.
        let (app, dev) = if v6 { ("[fd6e:7000::6450:1]:40000", "[fd00::10]:22") } else { ("100.80.0.1:40000", "100.80.0.2:22") };
        h.input(&syn(app, dev));
        h.output();
        let id = h.new_flows()[0];
        h.stack.accept_flow(id, h.now).expect("accept");
        h.output();
        let mut p = segment(sa(app), sa(dev), TcpControl::Psh, 1001, Some(1), b"0123456789abcdef");
        for (at, byte) in edits {
            if let Some(b) = p.get_mut(at) { *b = byte; }
        }
        p.truncate(p.len().saturating_sub(cut % 4 * cut));
        h.input(&p);
        h.output();
        let mut buf = [0u8; 64];
        let _ = h.stack.recv(id, &mut buf);
    }
}
