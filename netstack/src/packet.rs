//! Reading the TCP segment out of a packet from the TUN, and writing the two replies the stack
//! makes itself: a TCP reset ("connection refused") and an ICMP destination unreachable. UDP
//! datagrams, both ways, and their port unreachable are in `udp`.
//!
//! Everything here takes untrusted bytes and never panics on them: smoltcp's `new_checked` and
//! `Repr::parse` check every length and checksum before a field is read.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::{Checksum, ChecksumCapabilities};
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use crate::stack::RxChecksum;

/// Hop limit of the packets we write.
const HOP_LIMIT: u8 = 64;

/// How much of the offending TCP segment an ICMP error quotes: all of a SYN (RFC 4443 asks for
/// as much as fits in 1280 bytes; the kernel itself only needs the first 8 bytes).
const MAX_QUOTE: usize = 512;

mod udp;
#[cfg(test)]
pub(crate) use udp::parse_udp;
pub(crate) use udp::{parse_udp_with, port_unreachable, udp_packet};

/// The fields of a TCP segment the stack decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// The application's end (the packet's source).
    pub src: SocketAddr,
    /// The virtual end (the packet's destination).
    pub dst: SocketAddr,
    pub control: TcpControl,
    pub seq: TcpSeqNumber,
    pub ack: Option<TcpSeqNumber>,
    pub payload_len: usize,
    /// The IP header of the packet, for an ICMP reply that quotes it.
    ip: IpHeader,
    /// The start of the TCP segment, quoted in an ICMP reply.
    quote: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpHeader {
    V4(Ipv4Repr),
    V6(Ipv6Repr),
}

impl Segment {
    /// A SYN opening a connection (not a SYN-ACK).
    pub fn is_syn(&self) -> bool {
        self.control == TcpControl::Syn && self.ack.is_none()
    }

    pub fn is_rst(&self) -> bool {
        self.control == TcpControl::Rst
    }
}

/// Why a packet was not a TCP segment we can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unusable {
    /// Truncated, bad lengths, bad checksum, bad version.
    Malformed,
    /// A fragment (IPv4 with more-fragments or an offset, IPv6 with a fragment header): never
    /// reassembled, since the TUN MTU is large and the kernel does not fragment the TCP it sends.
    Fragment,
    /// IPv6 with extension headers before its payload: the kernel puts none on the TCP it sends
    /// here, and walking a chain a sender controls is work (and parser surface) for nothing.
    Ipv6Extension,
    /// A well-formed packet of another protocol than the one asked for (ICMP; UDP to the
    /// TCP parser and TCP to the UDP one).
    NotTcp,
}

/// Whether an IPv6 next-header value is an extension header (RFC 8200 4, RFC 7045's list)
/// rather than an upper-layer protocol.
fn is_ipv6_extension(p: IpProtocol) -> bool {
    match p {
        IpProtocol::HopByHop
        | IpProtocol::Ipv6Route
        | IpProtocol::Ipv6Opts
        | IpProtocol::IpSecAh
        | IpProtocol::IpSecEsp => true,
        // Mobility, HIP, Shim6 and the two experimental values.
        IpProtocol::Unknown(n) => matches!(n, 135 | 139 | 140 | 253 | 254),
        _ => false,
    }
}

/// Whether `packet` is IPv6 to a multicast address (the kernel's own neighbour and listener
/// messages on the interface): never a flow, so dropped before anything else looks at it.
pub(crate) fn is_ipv6_multicast(packet: &[u8]) -> bool {
    packet.len() >= 40 && packet[0] >> 4 == 6 && packet[24] == 0xff
}

fn checksums() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

/// The source address of an IPv4 or IPv6 packet, read from a header that is at least long
/// enough to hold it (nothing else is checked: this decides only whether to look further).
pub(crate) fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            // A header shorter than 20 bytes is no IPv4 header, whatever bytes 12..16 hold.
            (packet.len() >= 20).then(|| IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            (packet.len() >= 40).then(|| IpAddr::from(b))
        }
        _ => None,
    }
}

/// The IP layer of a packet carrying TCP or UDP: its header, its payload (exactly the
/// payload length the header gives) and which of the two it carries. Lengths and the IPv4
/// header checksum are checked; fragments, IPv6 extension headers and other protocols are told
/// apart so each is counted.
pub(crate) fn parse_ip(packet: &[u8]) -> Result<(IpHeader, &[u8], IpProtocol), Unusable> {
    let caps = checksums();
    let version = packet.first().ok_or(Unusable::Malformed)? >> 4;
    let transport = |p: IpProtocol| matches!(p, IpProtocol::Tcp | IpProtocol::Udp);
    match version {
        4 => {
            let pkt = Ipv4Packet::new_checked(packet).map_err(|_| Unusable::Malformed)?;
            if pkt.more_frags() || pkt.frag_offset() != 0 {
                return Err(Unusable::Fragment);
            }
            // Rejects bad checksums.
            let repr = Ipv4Repr::parse(&pkt, &caps).map_err(|_| Unusable::Malformed)?;
            if !transport(repr.next_header) {
                return Err(Unusable::NotTcp);
            }
            let header_len = usize::from(pkt.header_len());
            let payload = packet.get(header_len..header_len + repr.payload_len).ok_or(Unusable::Malformed)?;
            Ok((IpHeader::V4(repr), payload, repr.next_header))
        }
        6 => {
            let pkt = Ipv6Packet::new_checked(packet).map_err(|_| Unusable::Malformed)?;
            let repr = Ipv6Repr::parse(&pkt).map_err(|_| Unusable::Malformed)?;
            match repr.next_header {
                p if transport(p) => {}
                IpProtocol::Ipv6Frag => return Err(Unusable::Fragment),
                p if is_ipv6_extension(p) => return Err(Unusable::Ipv6Extension),
                _ => return Err(Unusable::NotTcp),
            }
            let payload = packet.get(40..40 + repr.payload_len).ok_or(Unusable::Malformed)?;
            Ok((IpHeader::V6(repr), payload, repr.next_header))
        }
        _ => Err(Unusable::Malformed),
    }
}

impl IpHeader {
    /// Source and destination.
    pub(crate) fn addrs(&self) -> (IpAddr, IpAddr) {
        match self {
            IpHeader::V4(r) => (r.src_addr.into(), r.dst_addr.into()),
            IpHeader::V6(r) => (r.src_addr.into(), r.dst_addr.into()),
        }
    }
}

/// Parse an IPv4 or IPv6 packet carrying TCP, checking lengths and checksums.
#[cfg(test)]
pub(crate) fn parse_tcp(packet: &[u8]) -> Result<Segment, Unusable> {
    parse_tcp_with(packet, RxChecksum::Complete)
}

/// [`parse_tcp`], with the TCP checksum left unchecked if `checksum` says the kernel left it to
/// be finished (the IPv4 header's checksum is checked either way: the kernel always fills it).
pub(crate) fn parse_tcp_with(packet: &[u8], checksum: RxChecksum) -> Result<Segment, Unusable> {
    let mut caps = checksums();
    if checksum == RxChecksum::Partial {
        caps.tcp = Checksum::Tx;
    }
    let (ip, payload, proto) = parse_ip(packet)?;
    if proto != IpProtocol::Tcp {
        return Err(Unusable::NotTcp);
    }
    let (src, dst) = ip.addrs();
    let tcp = TcpPacket::new_checked(payload).map_err(|_| Unusable::Malformed)?;
    let tcp_repr =
        TcpRepr::parse(&tcp, &IpAddress::from(src), &IpAddress::from(dst), &caps).map_err(|_| Unusable::Malformed)?;
    // Only a SYN is ever answered with an ICMP error; a data segment's copy would be an
    // allocation per packet for nothing.
    let quote = match tcp_repr.control {
        TcpControl::Syn => payload[..payload.len().min(MAX_QUOTE)].to_vec(),
        _ => Vec::new(),
    };
    Ok(Segment {
        src: SocketAddr::new(src, tcp_repr.src_port),
        dst: SocketAddr::new(dst, tcp_repr.dst_port),
        control: tcp_repr.control,
        seq: tcp_repr.seq_number,
        ack: tcp_repr.ack_number,
        payload_len: tcp_repr.payload.len(),
        ip,
        quote,
    })
}

/// The reset that answers `seg` (RFC 9293 3.10.7.1): it tells the application "connection
/// refused" when `seg` is a SYN, and "connection reset" otherwise.
pub(crate) fn reset_for(seg: &Segment) -> Vec<u8> {
    let (seq_number, ack_number) = match seg.ack {
        Some(ack) => (ack, None),
        None => {
            let syn_fin = usize::from(matches!(seg.control, TcpControl::Syn | TcpControl::Fin));
            (TcpSeqNumber(0), Some(seg.seq + seg.payload_len + syn_fin))
        }
    };
    let repr = TcpRepr {
        src_port: seg.dst.port(),
        dst_port: seg.src.port(),
        control: TcpControl::Rst,
        seq_number,
        ack_number,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (IpAddress::from(seg.dst.ip()), IpAddress::from(seg.src.ip()));
    ip_packet(seg.dst.ip(), seg.src.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
        repr.emit(&mut TcpPacket::new_unchecked(buf), &src, &dst, &checksums())
    })
}

/// The ICMP "host unreachable" (IPv4) or "address unreachable" (IPv6) that answers `seg`,
/// quoting its IP header and TCP segment; the application's `connect` fails with
/// `EHOSTUNREACH` at once.
pub(crate) fn unreachable_for(seg: &Segment) -> Vec<u8> {
    let caps = checksums();
    match seg.ip {
        IpHeader::V4(header) => {
            let repr =
                Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::HostUnreachable, header, data: &seg.quote };
            ip_packet(seg.dst.ip(), seg.src.ip(), IpProtocol::Icmp, repr.buffer_len(), |buf| {
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps)
            })
        }
        IpHeader::V6(header) => {
            let repr =
                Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::AddrUnreachable, header, data: &seg.quote };
            let (IpAddr::V6(src), IpAddr::V6(dst)) = (seg.dst.ip(), seg.src.ip()) else {
                return Vec::new();
            };
            ip_packet(seg.dst.ip(), seg.src.ip(), IpProtocol::Icmpv6, repr.buffer_len(), |buf| {
                repr.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(buf), &caps)
            })
        }
    }
}

/// An IP packet from `src` to `dst` whose payload of `len` bytes is written by `fill`.
pub(crate) fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let repr = Ipv4Repr { src_addr, dst_addr, next_header: proto, payload_len: len, hop_limit: HOP_LIMIT };
            let mut buf = vec![0u8; repr.buffer_len() + len];
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut buf), &checksums());
            fill(&mut buf[repr.buffer_len()..]);
            buf
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let repr = Ipv6Repr { src_addr, dst_addr, next_header: proto, payload_len: len, hop_limit: HOP_LIMIT };
            let mut buf = vec![0u8; repr.buffer_len() + len];
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf));
            fill(&mut buf[repr.buffer_len()..]);
            buf
        }
        // Mixed families cannot come from one parsed packet.
        _ => Vec::new(),
    }
}

/// `good` (an IPv6 TCP packet) with an extension header of type `ext` (8 bytes: next header,
/// length 0, six bytes of zero options or fragment fields) before its TCP segment.
#[cfg(test)]
pub(crate) fn with_ipv6_extension(good: &[u8], ext: u8) -> Vec<u8> {
    let mut p = good[..40].to_vec();
    let payload_len = u16::from_be_bytes([p[4], p[5]]) + 8;
    p[4..6].copy_from_slice(&payload_len.to_be_bytes());
    p[6] = ext;
    p.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(&good[40..]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn(src: &str, dst: &str) -> Vec<u8> {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: true,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
        ip_packet(src.ip(), dst.ip(), IpProtocol::Tcp, repr.buffer_len(), |buf| {
            repr.emit(&mut TcpPacket::new_unchecked(buf), &s, &d, &checksums())
        })
    }

    #[test]
    fn a_syn_parses_and_its_reset_acks_it() {
        for (src, dst) in [("100.80.0.1:40000", "100.80.0.2:22"), ("[fd00::1]:40000", "[fd00::2]:22")] {
            let seg = parse_tcp(&syn(src, dst)).expect("parse");
            assert!(seg.is_syn());
            assert_eq!(seg.src.to_string(), src);
            let rst = parse_tcp(&reset_for(&seg)).expect("reset parses");
            assert!(rst.is_rst());
            assert_eq!((rst.src, rst.dst), (seg.dst, seg.src));
            assert_eq!(rst.ack, Some(TcpSeqNumber(1001)));
        }
    }

    #[test]
    fn unreachable_quotes_the_syn() {
        let seg = parse_tcp(&syn("100.80.0.1:40000", "100.80.0.2:22")).expect("parse");
        let icmp = unreachable_for(&seg);
        let ip = Ipv4Packet::new_checked(&icmp[..]).expect("ip");
        let repr = Ipv4Repr::parse(&ip, &checksums()).expect("ipv4");
        assert_eq!(repr.next_header, IpProtocol::Icmp);
        let msg = Icmpv4Packet::new_checked(ip.payload()).expect("icmp");
        match Icmpv4Repr::parse(&msg, &checksums()).expect("icmp repr") {
            Icmpv4Repr::DstUnreachable { reason, header, data } => {
                assert_eq!(reason, Icmpv4DstUnreachable::HostUnreachable);
                assert_eq!(header.dst_addr.to_string(), "100.80.0.2");
                assert_eq!(&data[..2], &40000u16.to_be_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }

        let seg = parse_tcp(&syn("[fd00::1]:40000", "[fd00::2]:22")).expect("parse");
        let icmp = unreachable_for(&seg);
        let ip = Ipv6Packet::new_checked(&icmp[..]).expect("ip6");
        assert_eq!(ip.next_header(), IpProtocol::Icmpv6);
        let msg = Icmpv6Packet::new_checked(ip.payload()).expect("icmp6");
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        assert!(matches!(
            Icmpv6Repr::parse(&s, &d, &msg, &checksums()).expect("icmp6 repr"),
            Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::AddrUnreachable, .. }
        ));
    }

    #[test]
    fn the_source_of_a_header() {
        let v4 = syn("100.80.0.1:40000", "100.80.0.2:22");
        assert_eq!(source(&v4), Some("100.80.0.1".parse().expect("ip")));
        assert_eq!(source(&v4[..20]), Some("100.80.0.1".parse().expect("ip")));
        assert_eq!(source(&v4[..19]), None);
        let v6 = syn("[fd00::1]:40000", "[fd00::2]:22");
        assert_eq!(source(&v6), Some("fd00::1".parse().expect("ip")));
        assert_eq!(source(&v6[..39]), None);
        for junk in [&[][..], &[0x45], &[0x00; 40], &[0xff; 64], &[0x50; 40]] {
            assert_eq!(source(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn damaged_packets_are_malformed() {
        let good = syn("100.80.0.1:40000", "100.80.0.2:22");
        for n in 0..good.len() {
            assert_eq!(parse_tcp(&good[..n]), Err(Unusable::Malformed), "truncated to {n}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            // Any single flipped bit breaks a checksum, a length or the version.
            assert!(parse_tcp(&bad).is_err(), "bit flipped in byte {i}");
        }
        let good6 = syn("[fd00::1]:40000", "[fd00::2]:22");
        for n in 0..good6.len() {
            assert_eq!(parse_tcp(&good6[..n]), Err(Unusable::Malformed), "v6 truncated to {n}");
        }
        for i in 0..good6.len() {
            let mut bad = good6.clone();
            bad[i] ^= 0x10;
            // The version, a length, the next header, or the TCP checksum (which covers the
            // addresses) breaks; the flow label and traffic class are not checked by anyone.
            if (1..4).contains(&i) || i == 7 {
                continue;
            }
            assert!(parse_tcp(&bad).is_err(), "v6 bit flipped in byte {i}");
        }
        // A payload length beyond the packet.
        let mut long = good6.clone();
        long[5] = long[5].wrapping_add(1);
        assert_eq!(parse_tcp(&long), Err(Unusable::Malformed));
    }

    #[test]
    fn fragments_and_ipv6_extension_headers_are_told_apart_and_dropped() {
        let good6 = syn("[fd00::1]:40000", "[fd00::2]:22");
        assert_eq!(parse_tcp(&with_ipv6_extension(&good6, 44)).err(), Some(Unusable::Fragment));
        for ext in [0u8, 43, 60, 51, 135, 253] {
            assert_eq!(parse_tcp(&with_ipv6_extension(&good6, ext)).err(), Some(Unusable::Ipv6Extension), "{ext}");
        }
        // An extension header cut short, and a chain of them: still only dropped.
        let cut = with_ipv6_extension(&good6, 0);
        for n in 0..cut.len() {
            assert!(parse_tcp(&cut[..n]).is_err());
        }
        let chain = with_ipv6_extension(&with_ipv6_extension(&good6, 60), 0);
        assert_eq!(parse_tcp(&chain).err(), Some(Unusable::Ipv6Extension));
        // UDP, ICMPv6, "no next header": not TCP.
        for proto in [17u8, 58, 59] {
            let mut p = good6.clone();
            p[6] = proto;
            assert_eq!(parse_tcp(&p).err(), Some(Unusable::NotTcp), "{proto}");
        }
        // IPv4 fragments: the first (more fragments) and a later one (an offset).
        let good4 = syn("100.80.0.1:40000", "100.80.0.2:22");
        for (flags, offset) in [(0x20u8, 0u8), (0x00, 0x10), (0x20, 0x01)] {
            let mut p = good4.clone();
            p[6] = flags;
            p[7] = offset;
            let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
            ip.fill_checksum();
            assert_eq!(parse_tcp(&p).err(), Some(Unusable::Fragment), "{flags:x} {offset:x}");
        }
        assert!(is_ipv6_multicast(&[&[0x60; 24][..], &[0xff; 16]].concat()));
        assert!(!is_ipv6_multicast(&good6) && !is_ipv6_multicast(&good4) && !is_ipv6_multicast(&good6[..39]));
    }
}
