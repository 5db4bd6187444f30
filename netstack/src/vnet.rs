//! The virtio-net header in front of every packet on a TUN interface with checksum offload
//! (see [`Tun::checksum_offload`](crate::tun::Tun::checksum_offload)): what the kernel says of a
//! packet it hands over, and what we say of one we hand it.
//!
//! Layout (`struct virtio_net_hdr`, native byte order for a legacy TUN): flags (1), gso_type
//! (1), hdr_len (2), gso_size (2), csum_start (2), csum_offset (2).

use smoltcp::wire::{checksum, IpProtocol, Ipv4Address, Ipv6Address};

use crate::stack::RxChecksum;
use crate::tun::VNET_HDR_LEN;

/// The checksum from `csum_start` to the end is to be finished by whoever takes the packet.
const NEEDS_CSUM: u8 = 1;
/// `gso_type`: one packet, not a run of segments to cut.
const GSO_NONE: u8 = 0;
/// Where a TCP header keeps its checksum.
const TCP_CHECKSUM_AT: u16 = 16;

/// What the header of a packet read from the TUN says of its TCP checksum; `None` if the packet
/// cannot be taken as it is (a run of segments to cut: never asked for, since only the checksum
/// is offloaded).
pub(crate) fn rx(hdr: &[u8; VNET_HDR_LEN]) -> Option<RxChecksum> {
    if hdr[1] != GSO_NONE {
        return None;
    }
    Some(if hdr[0] & NEEDS_CSUM != 0 { RxChecksum::Partial } else { RxChecksum::Complete })
}

/// The header to write in front of `packet`. A TCP segment goes with its checksum left to the
/// kernel: the field is set to the pseudo-header's sum (what `NEEDS_CSUM` means), whatever it
/// held, so the stack need not sum the payload. Anything else goes as it is, checksums complete.
pub(crate) fn tx(packet: &mut [u8]) -> [u8; VNET_HDR_LEN] {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let Some((start, pseudo)) = tcp_pseudo_header(packet) else { return hdr };
    let at = usize::from(start) + usize::from(TCP_CHECKSUM_AT);
    packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    hdr[0] = NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&start.to_ne_bytes());
    hdr[8..10].copy_from_slice(&TCP_CHECKSUM_AT.to_ne_bytes());
    hdr
}

/// Where a TCP header starts in `packet`, and its pseudo-header's sum; `None` for anything but
/// an unfragmented IPv4 or plain IPv6 packet carrying a whole TCP header.
fn tcp_pseudo_header(packet: &[u8]) -> Option<(u16, u16)> {
    let (start, pseudo) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes(packet.get(2..4)?.try_into().ok()?));
            let fragmented = u16::from_be_bytes(packet.get(6..8)?.try_into().ok()?) & 0x3fff != 0;
            if ihl < 20 || total > packet.len() || total < ihl + 20 || fragmented || packet[9] != 6 {
                return None;
            }
            let src = Ipv4Address::from(<[u8; 4]>::try_from(&packet[12..16]).ok()?);
            let dst = Ipv4Address::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?);
            (ihl, checksum::pseudo_header_v4(&src, &dst, IpProtocol::Tcp, (total - ihl) as u32))
        }
        6 => {
            let len = usize::from(u16::from_be_bytes(packet.get(4..6)?.try_into().ok()?));
            if packet.len() < 40 + len || len < 20 || packet[6] != 6 {
                return None;
            }
            let src = Ipv6Address::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
            let dst = Ipv6Address::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?);
            (40, checksum::pseudo_header_v6(&src, &dst, IpProtocol::Tcp, len as u32))
        }
        _ => return None,
    };
    Some((u16::try_from(start).ok()?, pseudo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{ip_packet, parse_tcp_with};
    use smoltcp::wire::{IpAddress, TcpPacket};

    /// What the kernel does with a `NEEDS_CSUM` packet: sum from `csum_start` to the end (the
    /// field holding the pseudo-header's sum) and store the complement at `csum_offset`.
    fn finish(packet: &mut [u8], hdr: &[u8; VNET_HDR_LEN]) {
        let start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
        let at = start + usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
        let sum = !checksum::data(&packet[start..]);
        packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn segment(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let (s, d): (IpAddress, IpAddress) = (src.parse().expect("src"), dst.parse().expect("dst"));
        let mut tcp = vec![0u8; 20 + payload.len()];
        {
            let mut t = TcpPacket::new_unchecked(&mut tcp[..]);
            t.set_src_port(40000);
            t.set_dst_port(22);
            t.set_seq_number(smoltcp::wire::TcpSeqNumber(7));
            t.set_header_len(20);
            t.set_ack(true);
            t.set_window_len(1000);
            t.payload_mut().copy_from_slice(payload);
            t.fill_checksum(&s, &d);
        }
        ip_packet(src.parse().expect("src"), dst.parse().expect("dst"), IpProtocol::Tcp, tcp.len(), |b| {
            b.copy_from_slice(&tcp)
        })
    }

    #[test]
    fn a_segment_left_to_the_kernel_comes_out_with_the_checksum_it_would_have_had() {
        for (src, dst) in [("198.18.0.1", "198.18.0.2"), ("fd6e:7000::c612:1", "fd6e:7000::c612:2")] {
            for len in [0usize, 1, 2, 1399, 65000] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let complete = segment(src, dst, &payload);
                let mut sent = complete.clone();
                let hdr = tx(&mut sent);
                assert_eq!(hdr[0], NEEDS_CSUM, "{src} {len}");
                assert_ne!(sent, complete, "the field now holds the pseudo-header's sum");
                // Taken back as the kernel hands it over, it parses only when not checked...
                assert!(parse_tcp_with(&sent, RxChecksum::Partial).is_ok());
                assert!(len == 0 || parse_tcp_with(&sent, RxChecksum::Complete).is_err());
                // ...and once the kernel finishes it, it is the segment we started with.
                finish(&mut sent, &hdr);
                assert_eq!(sent, complete, "{src} {len}");
            }
        }
    }

    #[test]
    fn anything_but_a_whole_tcp_segment_goes_as_it_is() {
        let mut udp =
            ip_packet("198.18.0.1".parse().expect("a"), "198.18.0.2".parse().expect("b"), IpProtocol::Udp, 12, |_| {});
        let before = udp.clone();
        assert_eq!(tx(&mut udp), [0u8; VNET_HDR_LEN]);
        assert_eq!(udp, before);
        let mut tcp = segment("198.18.0.1", "198.18.0.2", b"abc");
        for cut in [0, 1, 10, 25, tcp.len() - 1] {
            let mut short = tcp[..cut].to_vec();
            assert_eq!(tx(&mut short), [0u8; VNET_HDR_LEN], "cut at {cut}");
        }
        // A fragment (more-fragments bit) is left alone.
        tcp[6] |= 0x20;
        assert_eq!(tx(&mut tcp), [0u8; VNET_HDR_LEN]);
    }

    #[test]
    fn a_datagram_whose_checksum_the_kernel_left_to_us_parses_only_as_partial() {
        use crate::packet::{parse_udp, parse_udp_with, udp_packet};
        for (app, virt) in
            [("198.18.0.1:5000", "198.18.0.2:53"), ("[fd6e:7000::c612:1]:5000", "[fd6e:7000::c612:2]:53")]
        {
            let (app, virt) = (app.parse().expect("app"), virt.parse().expect("virt"));
            let mut p = udp_packet(app, virt, b"a question");
            let start = if p[0] >> 4 == 4 { 20 } else { 40 };
            let len = (p.len() - start) as u32;
            let pseudo = match (app, virt) {
                (std::net::SocketAddr::V4(a), std::net::SocketAddr::V4(v)) => {
                    checksum::pseudo_header_v4(a.ip(), v.ip(), IpProtocol::Udp, len)
                }
                (std::net::SocketAddr::V6(a), std::net::SocketAddr::V6(v)) => {
                    checksum::pseudo_header_v6(a.ip(), v.ip(), IpProtocol::Udp, len)
                }
                _ => unreachable!(),
            };
            // What the kernel writes into a NEEDS_CSUM datagram's checksum field.
            p[start + 6..start + 8].copy_from_slice(&pseudo.to_be_bytes());
            assert!(parse_udp(&p).is_err(), "a complete checksum is checked");
            let d = parse_udp_with(&p, RxChecksum::Partial).expect("a partial one is not");
            assert_eq!(&p[d.payload], b"a question");
        }
    }

    #[test]
    fn the_kernels_header_says_how_to_take_the_packet() {
        let mut hdr = [0u8; VNET_HDR_LEN];
        assert_eq!(rx(&hdr), Some(RxChecksum::Complete));
        hdr[0] = NEEDS_CSUM;
        assert_eq!(rx(&hdr), Some(RxChecksum::Partial));
        hdr[1] = 1; // GSO TCPv4: a run of segments, never asked for.
        assert_eq!(rx(&hdr), None);
    }
}
