//! IP packets from the TUN into the smoltcp stack of `np up`, with a small address map.
//!
//! Input: one byte of options, then packets as `len:u16` + bytes. Where a packet looks like
//! IPv4 or IPv6, its source is set to the interface's own address (the stack drops every other
//! source first of all), and where it carries TCP its checksums are fixed up (unless the options
//! say not to do either), so the fuzzer explores the stack's flow handling and not only its
//! source and checksum checks; UDP datagrams get the same (so they reach the datagram path: the
//! driver answers each, or refuses it with an ICMP port unreachable). An IPv6 packet whose destination's first byte is odd goes to the
//! device's own IPv6 address (the same device as its IPv4 one); others reach the routed
//! `fd00::/64` or nothing. Extension headers, fragments and multicast are the fuzzer's to find
//! (the stack drops and counts them). The driver's
//! answers are played too: new flows accepted or refused, data read and written, timers run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_netstack::{AddressMap, Event, Prefix, RefuseKind, Stack, StackConfig, DEFAULT_SUBNET};
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
use std::time::{Duration, Instant};

fn map() -> AddressMap {
    let mut map = AddressMap::new(DEFAULT_SUBNET).expect("map");
    map.add_device("pi".into(), None).expect("device");
    map.add_route("192.168.1.0/24".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
    map.add_route("fd00::/64".parse::<Prefix>().expect("prefix"), "pi".into()).expect("route");
    map
}

/// Writes the interface's own address (IPv4 or IPv6) as the packet's source, where the header
/// is long enough to hold one; and an odd IPv6 destination becomes the device's IPv6 address.
fn own_source(p: &mut [u8], map: &AddressMap) {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => p[12..16].copy_from_slice(&map.interface_addr().octets()),
        Some(6) if p.len() >= 40 => {
            p[8..24].copy_from_slice(&map.interface_addr_v6().octets());
            if p[24] & 1 == 1 {
                if let Some(dev) = map.device_addr_v6(&"pi".into()) {
                    p[24..40].copy_from_slice(&dev.octets());
                }
            }
        }
        _ => {}
    }
}

/// Recomputes the TCP or UDP checksum of `seg` between `src` and `dst`, where it parses.
fn fill_transport(proto: IpProtocol, seg: &mut [u8], src: &IpAddress, dst: &IpAddress) {
    match proto {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(seg) {
                tcp.fill_checksum(src, dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(seg) {
                udp.fill_checksum(src, dst);
            }
        }
        _ => {}
    }
}

/// Recomputes the IPv4 header checksum and the TCP or UDP checksum where the packet's own
/// lengths allow it; leaves anything else as it is.
fn fix_checksums(p: &mut [u8]) {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(mut ip) = Ipv4Packet::new_checked(&mut *p) else { return };
            ip.fill_checksum();
            let proto = ip.next_header();
            let (src, dst) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
            let hl = usize::from(ip.header_len());
            let total = usize::from(ip.total_len()).min(p.len());
            if let Some(seg) = p.get_mut(hl..total) {
                fill_transport(proto, seg, &src, &dst);
            }
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(&mut *p) else { return };
            let proto = ip.next_header();
            let (src, dst) = (IpAddress::Ipv6(ip.src_addr()), IpAddress::Ipv6(ip.dst_addr()));
            let end = (40 + usize::from(ip.payload_len())).min(p.len());
            if let Some(seg) = p.get_mut(40..end) {
                fill_transport(proto, seg, &src, &dst);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&opts, mut rest)) = data.split_first() else { return };
    let config = StackConfig {
        mtu: 65535,
        rx_buffer: 8192,
        tx_buffer: 8192,
        max_pending: 4,
        max_flows: 8,
        max_queued_packets: 64,
        seed: 1,
        ..StackConfig::default()
    };
    let mut now = Instant::now();
    let map = map();
    let mut stack = Stack::new(config, map.clone(), now);
    let mut buf = [0u8; 4096];
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let take = len.min(rest.len() - 2);
        let mut packet = rest[2..2 + take].to_vec();
        rest = &rest[2 + take..];
        if opts & 8 == 0 {
            own_source(&mut packet, &map);
        }
        if opts & 1 == 0 {
            fix_checksums(&mut packet);
        }
        stack.handle_packet(&packet, now);
        for _ in 0..1000 {
            let mut progress = false;
            while let Some(ev) = stack.poll_event() {
                progress = true;
                match ev {
                    Event::NewFlow { id, .. } => {
                        let _ = match id.0 % 4 {
                            0 => stack.refuse_flow(id, RefuseKind::Refused),
                            1 => stack.refuse_flow(id, RefuseKind::Unreachable),
                            _ => stack.accept_flow(id, now),
                        };
                    }
                    Event::Readable(id) => {
                        while let Ok(n) = stack.recv(id, &mut buf) {
                            if n == 0 {
                                break;
                            }
                            if opts & 2 != 0 {
                                let _ = stack.send(id, &buf[..n]);
                            }
                        }
                        if opts & 4 != 0 {
                            let _ = stack.close(id);
                        }
                    }
                    Event::Writable(id) => {
                        let _ = stack.send(id, b"device says hello");
                    }
                    Event::Finished(_) | Event::Closed(_) => {}
                    // Echoed back (as a device's answer would come), or refused.
                    Event::Datagram { src, dst, payload, .. } => {
                        if payload.first().is_some_and(|b| b % 2 == 0) {
                            stack.send_datagram(dst, src, &payload);
                        } else {
                            stack.udp_unreachable(src, dst, &payload);
                        }
                    }
                }
            }
            while stack.poll_transmit().is_some() {
                progress = true;
            }
            if !progress {
                break;
            }
        }
        now += Duration::from_millis(u64::from(opts >> 4) * 50);
        stack.handle_timeout(now);
        let _ = stack.poll_at(now);
    }
});
