//! UDP datagrams from the TUN, the answers written back to it, and the ICMP port unreachable
//! that tells an application at once that its datagram will not be delivered.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Repr, Ipv6Repr, UdpPacket, UdpRepr,
};

use crate::stack::RxChecksum;
use smoltcp::phy::Checksum;

use super::{checksums, ip_packet, parse_ip, IpHeader, Unusable, HOP_LIMIT, MAX_QUOTE};

/// One UDP datagram read from the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Datagram {
    /// The application's end (the packet's source).
    pub src: SocketAddr,
    /// The virtual end (the packet's destination).
    pub dst: SocketAddr,
    /// Where the payload lies in the packet.
    pub payload: Range<usize>,
}

/// Parses an IPv4 or IPv6 packet carrying UDP, checking lengths and the checksum (which IPv6
/// requires, and an IPv4 sender may leave out as zero).
#[cfg(test)]
pub(crate) fn parse_udp(packet: &[u8]) -> Result<Datagram, Unusable> {
    parse_udp_with(packet, RxChecksum::Complete)
}

/// [`parse_udp`], with the UDP checksum left unchecked if `checksum` says the kernel left it to
/// be finished (checksum offload on the TUN: `NEEDS_CSUM` covers UDP as well as TCP).
pub(crate) fn parse_udp_with(packet: &[u8], checksum: RxChecksum) -> Result<Datagram, Unusable> {
    let mut caps = checksums();
    if checksum == RxChecksum::Partial {
        caps.udp = Checksum::Tx;
    }
    let (ip, payload, proto) = parse_ip(packet)?;
    if proto != IpProtocol::Udp {
        return Err(Unusable::NotTcp);
    }
    let (src, dst) = ip.addrs();
    let udp = UdpPacket::new_checked(payload).map_err(|_| Unusable::Malformed)?;
    // The UDP length must be the IP payload's: smoltcp only checks that it fits.
    if usize::from(udp.len()) != payload.len() {
        return Err(Unusable::Malformed);
    }
    let repr =
        UdpRepr::parse(&udp, &IpAddress::from(src), &IpAddress::from(dst), &caps).map_err(|_| Unusable::Malformed)?;
    if matches!(ip, IpHeader::V6(_)) && udp.checksum() == 0 {
        // RFC 8200 8.1: a zero UDP checksum over IPv6 is discarded.
        return Err(Unusable::Malformed);
    }
    let start = payload.as_ptr() as usize - packet.as_ptr() as usize + 8;
    Ok(Datagram {
        src: SocketAddr::new(src, repr.src_port),
        dst: SocketAddr::new(dst, repr.dst_port),
        payload: start..start + udp.payload().len(),
    })
}

/// An IP packet carrying `payload` from `src` to `dst`, with its UDP checksum; empty if the
/// families differ or the payload cannot fit one packet.
pub(crate) fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    if payload.len() > usize::from(u16::MAX) - 8 - 40 {
        return Vec::new();
    }
    let repr = UdpRepr { src_port: src.port(), dst_port: dst.port() };
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    ip_packet(src.ip(), dst.ip(), IpProtocol::Udp, repr.header_len() + payload.len(), |buf| {
        repr.emit(
            &mut UdpPacket::new_unchecked(buf),
            &s,
            &d,
            payload.len(),
            |b| b.copy_from_slice(payload),
            &checksums(),
        )
    })
}

/// The ICMP port unreachable that answers a datagram from `app` to `virt` (the application's
/// `recv` fails with `ECONNREFUSED` at once). It quotes the IP and UDP headers of such a
/// datagram, rebuilt from the two addresses, and the first bytes of `payload`: the headers are
/// what the application's kernel matches the error to its socket by.
pub(crate) fn port_unreachable(app: SocketAddr, virt: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let quoted = &payload[..payload.len().min(MAX_QUOTE - 8)];
    let original = udp_packet(app, virt, quoted);
    let caps = checksums();
    match (app.ip(), virt.ip()) {
        (IpAddr::V4(a), IpAddr::V4(v)) => {
            let header = Ipv4Repr {
                src_addr: a,
                dst_addr: v,
                next_header: IpProtocol::Udp,
                payload_len: 8 + quoted.len(),
                hop_limit: HOP_LIMIT,
            };
            let Some(data) = original.get(header.buffer_len()..) else { return Vec::new() };
            let repr = Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::PortUnreachable, header, data };
            ip_packet(virt.ip(), app.ip(), IpProtocol::Icmp, repr.buffer_len(), |buf| {
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps)
            })
        }
        (IpAddr::V6(a), IpAddr::V6(v)) => {
            let header = Ipv6Repr {
                src_addr: a,
                dst_addr: v,
                next_header: IpProtocol::Udp,
                payload_len: 8 + quoted.len(),
                hop_limit: HOP_LIMIT,
            };
            let Some(data) = original.get(header.buffer_len()..) else { return Vec::new() };
            let repr = Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::PortUnreachable, header, data };
            ip_packet(virt.ip(), app.ip(), IpProtocol::Icmpv6, repr.buffer_len(), |buf| {
                repr.emit(&v, &a, &mut Icmpv6Packet::new_unchecked(buf), &caps)
            })
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn datagrams_round_trip_with_checksums_in_both_families() {
        for (app, virt) in [("100.80.0.1:40000", "100.80.0.2:53"), ("[fd00::1]:40000", "[fd00::2]:53")] {
            let p = udp_packet(sa(app), sa(virt), b"query");
            let d = parse_udp(&p).expect("parses");
            assert_eq!((d.src, d.dst), (sa(app), sa(virt)));
            assert_eq!(&p[d.payload.clone()], b"query");
            // The answer, the other way.
            let a = parse_udp(&udp_packet(sa(virt), sa(app), &[])).expect("empty parses");
            assert!(a.payload.is_empty());
        }
    }

    #[test]
    fn damaged_datagrams_are_malformed_never_a_panic() {
        for (app, virt) in [("100.80.0.1:40000", "100.80.0.2:53"), ("[fd00::1]:40000", "[fd00::2]:53")] {
            let good = udp_packet(sa(app), sa(virt), b"hello world");
            for n in 0..good.len() {
                assert!(parse_udp(&good[..n]).is_err(), "truncated to {n}");
            }
            let v6 = good[0] >> 4 == 6;
            let udp_at = if v6 { 40 } else { 20 };
            // The UDP length field and the checksum.
            for i in [udp_at + 4, udp_at + 5, udp_at + 6, udp_at + 7, good.len() - 1] {
                let mut bad = good.clone();
                bad[i] ^= 0x10;
                assert_eq!(parse_udp(&bad).err(), Some(Unusable::Malformed), "byte {i}");
            }
            // A zero checksum: "none" over IPv4, refused over IPv6.
            let mut zero = good.clone();
            zero[udp_at + 6] = 0;
            zero[udp_at + 7] = 0;
            assert_eq!(parse_udp(&zero).is_ok(), !v6);
        }
        assert_eq!(parse_udp(&[]).err(), Some(Unusable::Malformed));
    }

    #[test]
    fn port_unreachable_quotes_the_datagram_headers() {
        let icmp = port_unreachable(sa("100.80.0.1:40000"), sa("100.80.0.2:53"), b"q");
        let ip = Ipv4Packet::new_checked(&icmp[..]).expect("ip");
        let msg = Icmpv4Packet::new_checked(ip.payload()).expect("icmp");
        match Icmpv4Repr::parse(&msg, &checksums()).expect("icmp repr") {
            Icmpv4Repr::DstUnreachable { reason, header, data } => {
                assert_eq!(reason, Icmpv4DstUnreachable::PortUnreachable);
                assert_eq!(header.dst_addr.to_string(), "100.80.0.2");
                assert_eq!(&data[..4], &[0x9c, 0x40, 0, 53]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let icmp = port_unreachable(sa("[fd00::1]:40000"), sa("[fd00::2]:53"), &[0u8; 4000]);
        assert!(icmp.len() <= 40 + 8 + 40 + MAX_QUOTE);
        let ip = Ipv6Packet::new_checked(&icmp[..]).expect("ip6");
        let msg = Icmpv6Packet::new_checked(ip.payload()).expect("icmp6");
        assert!(matches!(
            Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &msg, &checksums()).expect("icmp6 repr"),
            Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::PortUnreachable, .. }
        ));
    }
}
