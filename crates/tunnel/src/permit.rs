//! Permit-open: which `host:port` targets a daemon will dial.
//!
//! Patterns are `host:port`, `*:port`, `host:*` and `*:*`, the port also a range `LO-HI`, each
//! for TCP unless prefixed `udp/` (`udp/localhost:60000-61000`, which mosh needs; `tcp/` may be
//! written too). A pattern without a protocol is TCP, as before protocols existed, so an old
//! permit never starts permitting UDP. Matching is on the *spelling* of the
//! host after normalisation (lower case, no brackets, no trailing dot), never on what it resolves
//! to: permitting `localhost:22` permits exactly `localhost:22`, not `0.0.0.0:22`, `[::]:22`,
//! `127.0.0.2:22`, `127.1:22` or any other way to reach the same machine. The daemon then dials
//! the normalised target it matched, so what is checked is what is dialled.
//!
//! IPv6 literals are written in brackets (`[fd00::1]:443`) and only there, and are compared as
//! addresses in their one canonical spelling (RFC 5952: `[FD00:0::1]` is `[fd00::1]`), so the
//! pattern and the request cannot disagree on which address is meant. The loopback `[::1]`, the
//! unspecified `[::]` and IPv4-mapped forms such as `[::ffff:127.0.0.1]` are addresses like any
//! other: permitted only where a pattern names them, never by `localhost`. Zone indexes
//! (`[fe80::1%eth0]`) are refused: they pick an interface, which the peer has no business doing.

use std::fmt;
use std::str::FromStr;

/// A target a flow asks for, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Lower-case host name or address, without brackets.
    pub host: String,
    pub port: u16,
}

/// Why a target or pattern was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not HOST:PORT")]
pub struct BadTarget(pub String);

/// The host and the port of `HOST:PORT` or `[V6]:PORT`, the host canonical (see [`normal_host`]);
/// `allow_any` lets the host be `*`.
fn split_host_port(s: &str, allow_any: bool) -> Option<(Option<String>, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        // Brackets hold an IPv6 address and nothing else (not `[localhost]`, not `[*]`).
        let v6: std::net::Ipv6Addr = h.parse().ok()?;
        return Some((Some(v6.to_string()), p));
    }
    let (h, p) = s.rsplit_once(':')?;
    // An unbracketed IPv6 address is ambiguous.
    if h.contains(':') {
        return None;
    }
    if allow_any && h == "*" {
        return Some((None, p));
    }
    Some((Some(normal_host(h)?), p))
}

/// A host name or IPv4 address, lower case, without a trailing dot.
fn normal_host(h: &str) -> Option<String> {
    let h = h.trim_end_matches('.').to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    ok.then_some(h)
}

impl FromStr for Target {
    type Err = BadTarget;
    fn from_str(s: &str) -> Result<Self, BadTarget> {
        let bad = || BadTarget(s.to_string());
        let (host, p) = split_host_port(s.trim(), false).ok_or_else(bad)?;
        let host = host.ok_or_else(bad)?;
        let port: u16 = p.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Target { host, port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The transport a pattern permits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Proto {
    /// TCP flows (the default when a pattern names none).
    #[default]
    Tcp,
    /// UDP associations.
    Udp,
}

/// One pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    proto: Proto,
    host: Option<String>,
    /// Inclusive port range; `None` is any port.
    ports: Option<(u16, u16)>,
}

impl FromStr for Pattern {
    type Err = BadTarget;
    fn from_str(s: &str) -> Result<Self, BadTarget> {
        let bad = || BadTarget(s.to_string());
        let s = s.trim();
        let (proto, rest) = match s.split_once('/') {
            Some(("udp", rest)) => (Proto::Udp, rest),
            Some(("tcp", rest)) => (Proto::Tcp, rest),
            Some(_) => return Err(bad()),
            None => (Proto::Tcp, s),
        };
        let (host, p) = split_host_port(rest, true).ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        let ports = match p.split_once('-') {
            _ if p == "*" => None,
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(bad());
                }
                Some((lo, hi))
            }
            None => {
                let p = port(p)?;
                Some((p, p))
            }
        };
        Ok(Pattern { proto, host, ports })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.proto == Proto::Udp {
            f.write_str("udp/")?;
        }
        let h = match &self.host {
            None => "*".to_string(),
            Some(h) if h.contains(':') => format!("[{h}]"),
            Some(h) => h.clone(),
        };
        match self.ports {
            None => write!(f, "{h}:*"),
            Some((lo, hi)) if lo == hi => write!(f, "{h}:{lo}"),
            Some((lo, hi)) => write!(f, "{h}:{lo}-{hi}"),
        }
    }
}

impl Pattern {
    /// Whether `t` is permitted by this pattern for TCP.
    pub fn matches(&self, t: &Target) -> bool {
        self.matches_proto(Proto::Tcp, t)
    }

    /// Whether `t` is permitted by this pattern for `proto`.
    pub fn matches_proto(&self, proto: Proto, t: &Target) -> bool {
        self.proto == proto
            && self.host.as_ref().is_none_or(|h| h == &t.host)
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&t.port))
    }
}

/// A list of patterns; a target is permitted if any matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermitOpen(pub Vec<Pattern>);

impl Default for PermitOpen {
    /// `localhost:22`.
    fn default() -> Self {
        PermitOpen(vec![Pattern { proto: Proto::Tcp, host: Some("localhost".into()), ports: Some((22, 22)) }])
    }
}

impl PermitOpen {
    /// Parses a comma-separated list.
    pub fn parse_list(s: &str) -> Result<Self, BadTarget> {
        s.split(',').filter(|p| !p.trim().is_empty()).map(str::parse).collect::<Result<_, _>>().map(PermitOpen)
    }

    /// Parses the target string and checks it for a TCP flow; `Ok(normalised)` if permitted.
    pub fn check(&self, target: &str) -> Result<Target, String> {
        self.check_proto(Proto::Tcp, target)
    }

    /// [`PermitOpen::check`] for `proto`.
    pub fn check_proto(&self, proto: Proto, target: &str) -> Result<Target, String> {
        let t: Target = target.parse().map_err(|e: BadTarget| e.to_string())?;
        if self.permits(proto, &t) {
            Ok(t)
        } else {
            let shown = if proto == Proto::Udp { format!("udp/{t}") } else { t.to_string() };
            Err(format!("{shown} is not in the device's permit-open list ({self})"))
        }
    }

    /// Whether a pattern permits the (normalised) target for `proto`.
    pub fn permits(&self, proto: Proto, t: &Target) -> bool {
        self.0.iter().any(|p| p.matches_proto(proto, t))
    }
}

impl fmt::Display for PermitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = self.0.iter().map(|p| p.to_string()).collect();
        f.write_str(&v.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_22_permits_only_that_spelling() {
        let p = PermitOpen::default();
        assert_eq!(p.check("localhost:22").map(|t| t.to_string()), Ok("localhost:22".into()));
        assert!(p.check("LOCALHOST.:22").is_ok());
        for other in [
            "0.0.0.0:22",
            "[::]:22",
            "[::1]:22",
            "127.0.0.1:22",
            "127.0.0.2:22",
            "127.1:22",
            "0x7f000001:22",
            "2130706433:22",
            "localhost:2222",
            "localhost:022x",
            "localhost",
            "localhost:0",
            "[::ffff:127.0.0.1]:22",
            "localhost.localdomain:22",
            "local host:22",
            "",
        ] {
            assert!(p.check(other).is_err(), "{other} permitted");
        }
    }

    #[test]
    fn wildcards() {
        let p = PermitOpen::parse_list("*:80, db.lan:*, [fd00::1]:443").expect("list");
        assert!(p.check("anything:80").is_ok());
        assert!(p.check("db.lan:5432").is_ok());
        assert!(p.check("[FD00::1]:443").is_ok());
        assert!(p.check("db.lan2:5432").is_err());
        assert!(p.check("x:81").is_err());
        assert!(PermitOpen::parse_list("*:*").expect("any").check("10.1.2.3:9").is_ok());
        assert!(PermitOpen::parse_list("nope").is_err());
        assert_eq!(p.to_string(), "*:80,db.lan:*,[fd00::1]:443");
    }

    #[test]
    fn ipv6_literals_are_bracketed_canonical_and_never_loopback_by_name() {
        let p = PermitOpen::parse_list("localhost:22,[FD00:0:0::1]:443,[fe80::1]:*").expect("list");
        assert_eq!(p.to_string(), "localhost:22,[fd00::1]:443,[fe80::1]:*");
        for same in ["[fd00::1]:443", "[fd00:0000::0001]:443", "[FD00::1]:443"] {
            assert_eq!(p.check(same).map(|t| t.to_string()), Ok("[fd00::1]:443".into()), "{same}");
        }
        assert!(p.check("[fe80::1]:9").is_ok());
        for refused in [
            "[::1]:22",
            "[::]:22",
            "[0:0:0:0:0:0:0:1]:22",
            "[::ffff:127.0.0.1]:22",
            "[::127.0.0.1]:22",
            "[fd00::2]:443",
            "[fd00::1]:444",
            "[fe80::1%eth0]:9",
            "[localhost]:22",
            "fd00::1:443",
            "[fd00::1]443",
            "[fd00::1]:",
            "[]:22",
            "[fd00::1:22",
        ] {
            assert!(p.check(refused).is_err(), "{refused} permitted");
        }
        // Permitted when named, in any spelling.
        let lo = PermitOpen::parse_list("[::1]:22").expect("list");
        assert!(lo.check("[0::1]:22").is_ok());
        assert!(lo.check("localhost:22").is_err() && lo.check("127.0.0.1:22").is_err());
        for bad in ["[*]:22", "[localhost]:22", "[fe80::1%lo]:22", "::1:22", "[::1]"] {
            assert!(PermitOpen::parse_list(bad).is_err(), "{bad}");
        }
        // What is dialled is an address, without brackets.
        assert_eq!(p.check("[FD00::1]:443").map(|t| t.host), Ok("fd00::1".into()));
    }

    #[test]
    fn udp_patterns_and_port_ranges() {
        let p = PermitOpen::parse_list("localhost:22, udp/localhost:60000-61000, udp/[fd00::53]:53, tcp/db:5432-5433")
            .expect("list");
        assert_eq!(p.to_string(), "localhost:22,udp/localhost:60000-61000,udp/[fd00::53]:53,db:5432-5433");
        // TCP stays TCP: a plain pattern never permits UDP, and a `udp/` one never TCP.
        assert!(p.check("localhost:22").is_ok());
        assert!(p.check_proto(Proto::Udp, "localhost:22").is_err());
        assert!(p.check("localhost:60000").is_err());
        for ok in ["localhost:60000", "localhost:60500", "localhost:61000", "[FD00::53]:53"] {
            assert!(p.check_proto(Proto::Udp, ok).is_ok(), "{ok}");
        }
        for refused in ["localhost:59999", "localhost:61001", "127.0.0.1:60000", "[fd00::53]:54"] {
            assert!(p.check_proto(Proto::Udp, refused).is_err(), "{refused}");
        }
        assert!(p.check("db:5433").is_ok() && p.check("db:5434").is_err());
        let err = p.check_proto(Proto::Udp, "localhost:9").expect_err("refused");
        assert!(err.starts_with("udp/localhost:9 is not"), "{err}");
        assert!(PermitOpen::parse_list("udp/*:*").expect("any").check_proto(Proto::Udp, "10.1.2.3:9").is_ok());
        for bad in [
            "udp/localhost:5-4",
            "udp/localhost:0-4",
            "sctp/localhost:1",
            "udp/localhost:1-",
            "udp/:1",
            "udp/localhost:1-2-3",
        ] {
            assert!(PermitOpen::parse_list(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,80}") {
            let _ = s.parse::<Target>();
            let _ = PermitOpen::parse_list(&s);
        }
    }
}
