//! The resolver `np up` runs on its interface address: `NAME.ID.np` → the device's virtual
//! addresses. Only what that needs: one question, A and AAAA answers, NXDOMAIN for unknown names
//! under `.np`, REFUSED for anything else (it is no general resolver).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
const RCODE_FORMERR: u8 = 1;
/// Seconds resolvers may cache an answer: addresses are stable while `np up` runs.
const TTL: u32 = 60;

/// A device's addresses, as the resolver answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    pub v4: Ipv4Addr,
    /// None where the interface has no IPv6 (a host with IPv6 turned off).
    pub v6: Option<Ipv6Addr>,
}

/// The answer to one DNS query datagram, or `None` if it is not worth answering (too short to
/// even echo an id, or itself a response).
pub fn answer(query: &[u8], lookup: impl Fn(&str) -> Option<Addrs>) -> Option<Vec<u8>> {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    let opcode = (query[2] >> 3) & 0x0f;
    let Some((name, end)) = (if qdcount == 1 && opcode == 0 { parse_name(query, HEADER) } else { None }) else {
        return Some(reply(query, HEADER, RCODE_FORMERR, &[]));
    };
    if query.len() < end + 4 {
        return Some(reply(query, HEADER, RCODE_FORMERR, &[]));
    }
    let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
    let qclass = u16::from_be_bytes([query[end + 2], query[end + 3]]);
    let qend = end + 4;
    let lower = name.to_ascii_lowercase();
    if !(lower == "np" || lower.ends_with(".np")) || qclass != CLASS_IN {
        return Some(reply(query, qend, RCODE_REFUSED, &[]));
    }
    let Some(addrs) = lookup(&lower) else {
        return Some(reply(query, qend, RCODE_NXDOMAIN, &[]));
    };
    let v4 = IpAddr::V4(addrs.v4);
    let v6 = addrs.v6.map(IpAddr::V6);
    // A name with no record of the type asked (MX, or AAAA without IPv6): NOERROR, no answer.
    let answers: Vec<IpAddr> = match qtype {
        TYPE_A => vec![v4],
        TYPE_AAAA => v6.into_iter().collect(),
        TYPE_ANY => std::iter::once(v4).chain(v6).collect(),
        _ => Vec::new(),
    };
    Some(reply(query, qend, 0, &answers))
}

fn parse_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // No compression in questions we answer; and labels are at most 63 bytes.
        if len > 63 || labels.len() > 16 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += len;
    }
    Some((labels.join("."), at))
}

fn reply(query: &[u8], question_end: usize, rcode: u8, answers: &[IpAddr]) -> Vec<u8> {
    let mut r = Vec::with_capacity(question_end + 28 * answers.len());
    r.extend_from_slice(&query[..2]);
    // QR=1, opcode copied, AA=1, RD copied; RA=0.
    r.push(0x80 | (query[2] & 0x79) | 0x04);
    r.push(rcode & 0x0f);
    let has_q = question_end > HEADER;
    r.extend_from_slice(&(has_q as u16).to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&query[HEADER..question_end]);
    for addr in answers {
        let (kind, data) = match addr {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        r.extend_from_slice(&[0xc0, HEADER as u8]); // pointer to the question's name
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    r
}

/// Whether a query from `from` is this host's own: its source is the interface's address
/// (`iface`, what the kernel picks for a local query to it) or loopback. Other hosts get no
/// answer, not even a refusal: the resolver is no service of this host to its network.
pub fn is_local_query(from: SocketAddr, iface: Ipv4Addr) -> bool {
    match from.ip() {
        IpAddr::V4(a) => a == iface || a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|a| a == iface || a.is_loopback()),
    }
}

/// Serves DNS on `sock` (bound to the interface address `iface`) until the socket fails,
/// answering this host's own queries only ([`is_local_query`]).
pub async fn serve(
    sock: tokio::net::UdpSocket,
    iface: Ipv4Addr,
    lookup: impl Fn(&str) -> Option<Addrs> + Send + 'static,
) {
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
        if !is_local_query(from, iface) {
            tracing::debug!(%from, "DNS query from another host dropped");
            continue;
        }
        if let Some(r) = answer(&buf[..n], &lookup) {
            let _ = sock.send_to(&r, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    const V6: Ipv6Addr = Ipv6Addr::new(0xfd6e, 0x7000, 0, 0, 0, 0, 0x6450, 2);

    fn lookup(n: &str) -> Option<Addrs> {
        (n == "pi4.alice_device.np").then_some(Addrs { v4: Ipv4Addr::new(100, 80, 0, 2), v6: Some(V6) })
    }

    #[test]
    fn answers_device_names() {
        let r = answer(&query("Pi4.Alice_Device.np", TYPE_A), lookup).expect("reply");
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(&r[r.len() - 4..], &[100, 80, 0, 2]);
        let r = answer(&query("pi4.alice_device.np", TYPE_AAAA), lookup).expect("reply");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 1));
        assert_eq!(&r[r.len() - 16..], &V6.octets());
        assert_eq!(u16::from_be_bytes([r[r.len() - 26], r[r.len() - 25]]), TYPE_AAAA);
        let r = answer(&query("pi4.alice_device.np", TYPE_ANY), lookup).expect("reply");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 2);
        // MX, and AAAA where the interface has no IPv6: the name is there, the record is not.
        let r = answer(&query("pi4.alice_device.np", 15), lookup).expect("reply");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
        let v4_only = |n: &str| lookup(n).map(|a| Addrs { v6: None, ..a });
        let r = answer(&query("pi4.alice_device.np", TYPE_AAAA), v4_only).expect("reply");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
        let r = answer(&query("pi5.alice_device.np", TYPE_A), lookup).expect("reply");
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        let r = answer(&query("example.com", TYPE_A), lookup).expect("reply");
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED);
    }

    #[test]
    fn only_this_hosts_queries_are_answered() {
        let iface = Ipv4Addr::new(100, 80, 0, 1);
        for local in ["100.80.0.1:5353", "127.0.0.1:40000", "127.8.9.10:1", "[::1]:53", "[::ffff:100.80.0.1]:9"] {
            assert!(is_local_query(local.parse().expect("addr"), iface), "{local}");
        }
        for other in
            ["198.19.254.2:5353", "100.80.0.2:53", "10.77.0.1:53", "0.0.0.0:53", "[fd00::1]:53", "[::ffff:10.0.0.1]:53"]
        {
            assert!(!is_local_query(other.parse().expect("addr"), iface), "{other}");
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = answer(&b, lookup);
        }
    }
}
