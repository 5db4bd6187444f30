//! The record a relay publishes about itself, signed with its own key: where it can be reached.
//! Devices and clients dial a relay only at the addresses in this record (never at an address a
//! peer's message names), and check at join that whoever answers holds the relay's key.

use serde::{Deserialize, Serialize};

/// Key of the record (owner: the relay's identity; readable by every identity).
pub const RELAY_RECORD: &str = "relay";
/// Most addresses one record may carry; readers ignore the rest.
pub const MAX_ADDRESSES: usize = 8;
/// Longest address, `HOST:PORT`, a reader accepts.
pub const MAX_ADDRESS_LEN: usize = 261;
/// Longest region label a reader shows.
pub const MAX_REGION_LEN: usize = 32;
/// How often a running relay publishes its record again. The record's signed timestamp
/// (`updated_ms`) is then the relay's sign of life: one overdue by [`STALE_AFTER`] is from a
/// relay that is gone, even if the control plane still believes its connection open.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// A relay record older than this is from a relay that is gone: three refreshes, so one late or
/// lost publication is not a relay gone.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3 * 60);

/// What a relay says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Where sides connect, `HOST:PORT` each, in the relay's order of preference.
    pub addresses: Vec<String>,
    /// A region label (e.g. `eu`), for people choosing among relays: letters, digits, `-`,
    /// `_` and `.`, at most [`MAX_REGION_LEN`]; readers drop any other.
    pub region: Option<String>,
}

/// Why a relay record is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The value does not decode.
    #[error("the relay record does not decode")]
    Malformed,
    /// No address in it is usable.
    #[error("the relay record holds no usable address")]
    NoAddress,
}

impl RelayInfo {
    /// Serialises for publishing.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses a record's value and keeps only well-formed addresses (`HOST:PORT`, non-zero port,
    /// bounded length), at most [`MAX_ADDRESSES`], and a well-formed region label (it is shown
    /// on terminals: no control characters).
    pub fn decode(value: &[u8]) -> Result<RelayInfo, RecordError> {
        let mut info: RelayInfo = postcard::from_bytes(value).map_err(|_| RecordError::Malformed)?;
        info.region = info.region.filter(|r| valid_region(r));
        info.addresses.retain(|a| valid_address(a));
        info.addresses.truncate(MAX_ADDRESSES);
        if info.addresses.is_empty() {
            return Err(RecordError::NoAddress);
        }
        Ok(info)
    }
}

/// A region label: 1 to [`MAX_REGION_LEN`] letters, digits, `-`, `_` or `.`.
pub fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= MAX_REGION_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `HOST:PORT` or `[V6]:PORT`, with a port from 1 to 65535: a host name or IPv4 address of
/// letters, digits, `-`, `.` and `_`, or an IPv6 address in brackets (and an IPv6 address only
/// in brackets: `fd00::1:7444` could be port 7444 of `fd00::1` or an address without a port).
pub fn valid_address(a: &str) -> bool {
    if a.is_empty() || a.len() > MAX_ADDRESS_LEN {
        return false;
    }
    let Some((host, port)) = a.rsplit_once(':') else { return false };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
    };
    port_ok && host_ok
}

/// [`valid_address`] as a command-line value parser (`--control`, `--relay-address`).
pub fn parse_address(a: &str) -> Result<String, String> {
    if valid_address(a) {
        Ok(a.to_string())
    } else {
        Err(format!("{a:?} is not HOST:PORT (an IPv6 address in brackets: [fd00::1]:7443)"))
    }
}

/// Most nodes one `--control` may list.
pub const MAX_CONTROL_NODES: usize = 16;

/// `--control`: one [`valid_address`] or several, comma-separated (the nodes of one control
/// plane, sharing a database).
pub fn parse_address_list(a: &str) -> Result<String, String> {
    let nodes: Vec<&str> = a.split(',').map(str::trim).collect();
    if nodes.len() > MAX_CONTROL_NODES {
        return Err(format!("at most {MAX_CONTROL_NODES} control-plane nodes"));
    }
    for n in &nodes {
        parse_address(n)?;
    }
    Ok(nodes.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_node_lists() {
        assert_eq!(parse_address_list("a:1, [fd00::1]:2").as_deref(), Ok("a:1,[fd00::1]:2"));
        assert!(parse_address_list("a:1,").is_err(), "an empty node");
        assert!(parse_address_list("a:1,b").is_err());
        assert!(parse_address_list(&vec!["a:1"; MAX_CONTROL_NODES + 1].join(",")).is_err());
    }

    #[test]
    fn addresses_are_checked_and_bounded() {
        assert!(valid_address("relay.example:7444"));
        assert!(valid_address("198.18.0.1:7444"));
        assert!(valid_address("[2001:db8::1]:7444"));
        assert!(valid_address("[fd00:198:18::2]:7444"));
        for bad in [
            "",
            "relay",
            "relay:",
            "relay:0",
            "relay:70000",
            ":7444",
            "re lay:1",
            "a/b:1",
            "fd00::1:7444",
            "[relay]:7444",
            "[fd00::1]7444",
            "[fd00::1%eth0]:7444",
            "[]:7444",
            "[fd00::1:7444",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
        let mut many: Vec<String> = (1..20).map(|i| format!("h{i}:1")).collect();
        many.insert(0, "bad".into());
        let info = RelayInfo { addresses: many, region: None };
        let back = RelayInfo::decode(&info.encode()).expect("decodes");
        assert_eq!(back.addresses.len(), MAX_ADDRESSES);
        assert_eq!(back.addresses[0], "h1:1");
        let none = RelayInfo { addresses: vec!["x".into()], region: None };
        assert_eq!(RelayInfo::decode(&none.encode()), Err(RecordError::NoAddress));
        assert_eq!(RelayInfo::decode(&[0xff; 3]), Err(RecordError::Malformed));
    }

    #[test]
    fn regions_are_checked() {
        let with = |r: &str| RelayInfo { addresses: vec!["h:1".into()], region: Some(r.into()) };
        assert_eq!(
            RelayInfo::decode(&with("eu-west.1").encode()).expect("decodes").region.as_deref(),
            Some("eu-west.1")
        );
        for bad in ["", "e u", "eu\x1b[31m", &"x".repeat(MAX_REGION_LEN + 1)] {
            let back = RelayInfo::decode(&with(bad).encode()).expect("the addresses still count");
            assert_eq!(back.region, None, "{bad:?}");
        }
    }
}
