//! The address map: which device owns a destination address, and what it should dial there.
//!
//! Each device gets a virtual IPv4 address in the interface's subnet (default `100.80.0.0/16`;
//! `.1` is the interface's own address). A connection to a device address goes to the device's
//! own `localhost:PORT`. Routed prefixes (`192.168.1.0/24 → device`) send a connection to that
//! host on the device's side (`192.168.1.10:PORT`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The default subnet of the interface: a /16 out of the shared address space 100.64.0.0/10.
pub const DEFAULT_SUBNET: Prefix = Prefix { addr: IpAddr::V4(Ipv4Addr::new(100, 80, 0, 0)), len: 16 };

/// The default IPv6 prefix of the interface (`--subnet6`): each device's IPv6 address is this
/// prefix with the device's IPv4 address in its last 32 bits (`fd6e:7000::100.80.0.2`), and the
/// interface's is the interface's IPv4 address there (`fd6e:7000::100.80.0.1`). A unique local
/// prefix (RFC 4193: never routed beyond a site; "6e70" is "np"), fixed rather than random so
/// that a device has the same IPv6 address on every host and every start (`known_hosts` stays
/// valid), and a /96 so that the IPv4 address fits whole: one address per device, one
/// derivation, and the two addresses of a device can never point at different devices.
pub const DEFAULT_SUBNET6: Prefix =
    Prefix { addr: IpAddr::V6(Ipv6Addr::new(0xfd6e, 0x7000, 0, 0, 0, 0, 0, 0)), len: 96 };

/// An opaque name for a device (for example `pi4@alice_device`); the opener knows what it means.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey(pub String);

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for DeviceKey {
    fn from(s: &str) -> Self {
        DeviceKey(s.to_owned())
    }
}

/// Where a flow goes: the device that owns the destination, and what it should dial there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTarget {
    /// The device that carries the flow.
    pub device: DeviceKey,
    /// What the device dials: `localhost:22` for a device address, `192.168.1.10:80` (or
    /// `[fd00::10]:80`) for a routed prefix.
    pub target: String,
}

/// An IP prefix such as `100.80.0.0/16` or `fd00::/64`; host bits are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// A prefix of `len` bits of `addr`; host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, MapError> {
        let max = max_len(addr);
        if len > max {
            return Err(MapError::BadPrefix(format!("{addr}/{len}")));
        }
        Ok(Prefix { addr: mask(addr, len), len })
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The `n`th address of the prefix (0 is the network address), if the prefix is IPv4 and
    /// holds it.
    fn nth_v4(&self, n: u32) -> Option<Ipv4Addr> {
        let IpAddr::V4(base) = self.addr else { return None };
        let size = 1u64 << (32 - u32::from(self.len));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(base) + n))
    }

    /// The number of addresses in an IPv4 prefix.
    fn size_v4(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = MapError;

    /// `ADDR/LEN`, or a bare address meaning a single host.
    fn from_str(s: &str) -> Result<Self, MapError> {
        let bad = || MapError::BadPrefix(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => {
                let addr: IpAddr = a.trim().parse().map_err(|_| bad())?;
                (addr, l.trim().parse::<u8>().map_err(|_| bad())?)
            }
            None => {
                let addr: IpAddr = s.trim().parse().map_err(|_| bad())?;
                (addr, max_len(addr))
            }
        };
        Prefix::new(addr, len).map_err(|_| bad())
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Why the map refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The text is not an IP prefix, or the length is too long for the address family.
    #[error("not an IP prefix: {0}")]
    BadPrefix(String),
    /// The interface subnet must be IPv4 and hold at least the interface and one device.
    #[error("the interface subnet must be an IPv4 prefix of /30 or shorter, not {0}")]
    BadSubnet(Prefix),
    /// A requested device address is outside the subnet, or is its network, interface or
    /// broadcast address.
    #[error("{addr} is not a usable device address in {subnet}")]
    AddressOutsideSubnet {
        /// The address asked for.
        addr: Ipv4Addr,
        /// The interface subnet.
        subnet: Prefix,
    },
    /// A requested device address already belongs to another device.
    #[error("{addr} already belongs to device {owner}")]
    AddressTaken {
        /// The address asked for.
        addr: Ipv4Addr,
        /// The device that has it.
        owner: DeviceKey,
    },
    /// The device already has a different address.
    #[error("device {device} already has address {addr}")]
    DeviceHasAddress {
        /// The device.
        device: DeviceKey,
        /// Its existing address.
        addr: Ipv4Addr,
    },
    /// Every address of the subnet is in use.
    #[error("no free address left in {0}")]
    SubnetFull(Prefix),
    /// The IPv6 prefix must be IPv6 and leave the last 32 bits for the device's IPv4 address.
    #[error("the interface's IPv6 prefix must be an IPv6 prefix of /96 or shorter, not {0}")]
    BadSubnet6(Prefix),
    /// A routed prefix overlaps the interface subnet (or its IPv6 prefix).
    #[error("routed prefix {0} overlaps the interface subnet")]
    RouteInSubnet(Prefix),
    /// The same prefix is already routed to another device.
    #[error("prefix {prefix} is already routed to {owner}")]
    RouteTaken {
        /// The prefix.
        prefix: Prefix,
        /// The device it is routed to.
        owner: DeviceKey,
    },
}

/// Device addresses and routed prefixes, and the lookup from a destination to a [`FlowTarget`].
#[derive(Debug, Clone)]
pub struct AddressMap {
    subnet: Prefix,
    /// Where the devices' IPv6 addresses are (see [`DEFAULT_SUBNET6`]).
    subnet6: Prefix,
    devices: BTreeMap<Ipv4Addr, DeviceKey>,
    routes: BTreeMap<Prefix, DeviceKey>,
}

impl Default for AddressMap {
    fn default() -> Self {
        AddressMap {
            subnet: DEFAULT_SUBNET,
            subnet6: DEFAULT_SUBNET6,
            devices: BTreeMap::new(),
            routes: BTreeMap::new(),
        }
    }
}

impl AddressMap {
    /// An empty map over `subnet`, which must be IPv4 and at most a /30.
    pub fn new(subnet: Prefix) -> Result<Self, MapError> {
        if !subnet.addr.is_ipv4() || subnet.len > 30 {
            return Err(MapError::BadSubnet(subnet));
        }
        Ok(AddressMap { subnet, ..AddressMap::default() })
    }

    /// This map with its devices' IPv6 addresses in `subnet6` (IPv6, /96 or shorter) instead of
    /// [`DEFAULT_SUBNET6`].
    pub fn with_subnet6(mut self, subnet6: Prefix) -> Result<Self, MapError> {
        if subnet6.addr.is_ipv4() || subnet6.len > 96 {
            return Err(MapError::BadSubnet6(subnet6));
        }
        if let Some((p, _)) = self.routes.iter().find(|(p, _)| p.overlaps(&subnet6)) {
            return Err(MapError::RouteInSubnet(*p));
        }
        self.subnet6 = subnet6;
        Ok(self)
    }

    /// A map holding `devices` (with their requested addresses, if any) and `routes`.
    ///
    /// Requested addresses are placed first, so a device without one never takes an address
    /// another device asked for, whatever the order of the list.
    pub fn build(
        subnet: Prefix,
        devices: &[(DeviceKey, Option<Ipv4Addr>)],
        routes: &[(Prefix, DeviceKey)],
    ) -> Result<Self, MapError> {
        let mut map = AddressMap::new(subnet)?;
        for (key, addr) in devices.iter().filter(|(_, a)| a.is_some()) {
            map.add_device(key.clone(), *addr)?;
        }
        for (key, _) in devices.iter().filter(|(_, a)| a.is_none()) {
            map.add_device(key.clone(), None)?;
        }
        for (prefix, key) in routes {
            map.add_route(*prefix, key.clone())?;
        }
        Ok(map)
    }

    /// The interface subnet.
    pub fn subnet(&self) -> Prefix {
        self.subnet
    }

    /// The interface's own address: the first host address of the subnet (`.1`).
    pub fn interface_addr(&self) -> Ipv4Addr {
        self.subnet.nth_v4(1).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// The interface's IPv6 prefix (`--subnet6`).
    pub fn subnet6(&self) -> Prefix {
        self.subnet6
    }

    /// The interface's own IPv6 address: [`AddressMap::interface_addr`] in the last 32 bits of
    /// the IPv6 prefix. It is the source of every flow to a device's IPv6 address or to a routed
    /// IPv6 prefix.
    pub fn interface_addr_v6(&self) -> Ipv6Addr {
        self.v6_of(self.interface_addr())
    }

    /// The IPv6 address that goes with IPv4 address `v4` of the subnet: `v4` in the last 32
    /// bits of the IPv6 prefix.
    pub fn v6_of(&self, v4: Ipv4Addr) -> Ipv6Addr {
        let IpAddr::V6(prefix) = self.subnet6.addr else { return Ipv6Addr::UNSPECIFIED };
        Ipv6Addr::from(u128::from(prefix) | u128::from(u32::from(v4)))
    }

    /// The IPv4 address of the subnet that `v6` goes with, if `v6` is one of the IPv6 prefix's
    /// (exactly as [`AddressMap::v6_of`] makes them: the bits between prefix and IPv4 address
    /// are zero, so every IPv4 address has one IPv6 spelling, never two).
    fn v4_of(&self, v6: Ipv6Addr) -> Option<Ipv4Addr> {
        let v4 = Ipv4Addr::from((u128::from(v6) & 0xffff_ffff) as u32);
        (self.subnet.contains(IpAddr::V4(v4)) && self.v6_of(v4) == v6).then_some(v4)
    }

    /// The IPv6 address of `device`, if it has an address.
    pub fn device_addr_v6(&self, device: &DeviceKey) -> Option<Ipv6Addr> {
        self.device_addr(device).map(|a| self.v6_of(a))
    }

    /// Whether any routed prefix is IPv6.
    pub fn has_ipv6_routes(&self) -> bool {
        self.routes.keys().any(|p| p.addr.is_ipv6())
    }

    /// Whether `ip` is one of the interface's own addresses, the only sources `np up` serves:
    /// a packet from any other source was routed in by another host (a host with IP forwarding
    /// on would otherwise lend its identity to its neighbours).
    pub fn is_interface_addr(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.interface_addr(),
            IpAddr::V6(a) => a == self.interface_addr_v6(),
        }
    }

    /// Give `device` an address: `addr` if given (it must be free or already the device's),
    /// else the device's existing address, else the first free one after the interface's.
    pub fn add_device(&mut self, device: DeviceKey, addr: Option<Ipv4Addr>) -> Result<Ipv4Addr, MapError> {
        let existing = self.device_addr(&device);
        match (addr, existing) {
            (Some(want), Some(have)) if want == have => return Ok(have),
            (Some(_), Some(have)) => return Err(MapError::DeviceHasAddress { device, addr: have }),
            (None, Some(have)) => return Ok(have),
            _ => {}
        }
        let addr = match addr {
            Some(want) => {
                if !self.usable(want) {
                    return Err(MapError::AddressOutsideSubnet { addr: want, subnet: self.subnet });
                }
                if let Some(owner) = self.devices.get(&want) {
                    return Err(MapError::AddressTaken { addr: want, owner: owner.clone() });
                }
                want
            }
            None => self.first_free().ok_or(MapError::SubnetFull(self.subnet))?,
        };
        self.devices.insert(addr, device);
        Ok(addr)
    }

    /// Give `device` an address derived from its name (FNV-1a over the key, into the subnet's
    /// usable hosts; on a collision the next free one after it), so that the same device gets
    /// the same address on every start whatever other devices come and go, and `known_hosts`
    /// entries for it stay valid. A device that already has an address keeps it.
    pub fn add_device_derived(&mut self, device: DeviceKey) -> Result<Ipv4Addr, MapError> {
        if let Some(have) = self.device_addr(&device) {
            return Ok(have);
        }
        // Hosts 2 ..= size-2: not the network address, the interface's (.1) or the broadcast.
        let hosts = self.subnet.size_v4().saturating_sub(3);
        if hosts == 0 {
            return Err(MapError::SubnetFull(self.subnet));
        }
        let hash =
            device.0.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let start = hash % hosts;
        let addr = (0..hosts)
            .filter_map(|i| self.subnet.nth_v4((2 + (start + i) % hosts) as u32))
            .find(|a| self.usable(*a) && !self.devices.contains_key(a))
            .ok_or(MapError::SubnetFull(self.subnet))?;
        self.devices.insert(addr, device);
        Ok(addr)
    }

    /// Forget a device, its address and its routes.
    pub fn remove_device(&mut self, device: &DeviceKey) {
        self.devices.retain(|_, d| d != device);
        self.routes.retain(|_, d| d != device);
    }

    /// Route `prefix` to `device`. The prefix must not overlap the interface subnet.
    pub fn add_route(&mut self, prefix: Prefix, device: DeviceKey) -> Result<(), MapError> {
        if prefix.overlaps(&self.subnet) || prefix.overlaps(&self.subnet6) {
            return Err(MapError::RouteInSubnet(prefix));
        }
        match self.routes.get(&prefix) {
            Some(owner) if *owner != device => Err(MapError::RouteTaken { prefix, owner: owner.clone() }),
            _ => {
                self.routes.insert(prefix, device);
                Ok(())
            }
        }
    }

    /// The address of `device`, if it has one.
    pub fn device_addr(&self, device: &DeviceKey) -> Option<Ipv4Addr> {
        self.devices.iter().find(|(_, d)| *d == device).map(|(a, _)| *a)
    }

    /// Devices and their addresses, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (Ipv4Addr, &DeviceKey)> {
        self.devices.iter().map(|(a, d)| (*a, d))
    }

    /// Routed prefixes and their devices.
    pub fn routes(&self) -> impl Iterator<Item = (Prefix, &DeviceKey)> {
        self.routes.iter().map(|(p, d)| (*p, d))
    }

    /// The device that owns `dst`, and what it should dial for `dst:port`. Device addresses
    /// (IPv4 or IPv6: both go to the same device, to the same `localhost:PORT`) win over routed
    /// prefixes; among prefixes the longest match wins.
    pub fn lookup(&self, dst: IpAddr, port: u16) -> Option<FlowTarget> {
        let own = match dst {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => self.v4_of(v6),
        };
        if let Some(v4) = own {
            if let Some(device) = self.devices.get(&v4) {
                return Some(FlowTarget { device: device.clone(), target: format!("localhost:{port}") });
            }
        }
        let (_, device) = self.routes.iter().filter(|(p, _)| p.contains(dst)).max_by_key(|(p, _)| p.len)?;
        let target = match dst {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        Some(FlowTarget { device: device.clone(), target })
    }

    /// Whether `addr` may be given to a device: inside the subnet, not its network, interface or
    /// broadcast address.
    fn usable(&self, addr: Ipv4Addr) -> bool {
        let ip = IpAddr::V4(addr);
        let broadcast = self.subnet.nth_v4((self.subnet.size_v4() - 1) as u32);
        self.subnet.contains(ip)
            && Some(addr) != self.subnet.nth_v4(0)
            && addr != self.interface_addr()
            && Some(addr) != broadcast
    }

    fn first_free(&self) -> Option<Ipv4Addr> {
        (2..self.subnet.size_v4().saturating_sub(1))
            .filter_map(|n| self.subnet.nth_v4(n as u32))
            .find(|a| !self.devices.contains_key(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().expect("prefix")
    }

    #[test]
    fn derived_addresses_are_stable_whatever_else_is_there() {
        let key = |s: &str| DeviceKey(s.into());
        let mut alone = AddressMap::new(p("100.80.0.0/16")).expect("map");
        let pi = alone.add_device_derived(key("pi4@alice_device")).expect("pi");
        let mut crowded = AddressMap::new(p("100.80.0.0/16")).expect("map");
        for i in 0..50 {
            crowded.add_device_derived(key(&format!("dev{i}@bob"))).expect("dev");
        }
        assert_eq!(crowded.add_device_derived(key("pi4@alice_device")).expect("pi"), pi, "the same on every start");
        assert_eq!(crowded.add_device_derived(key("pi4@alice_device")).expect("pi"), pi, "and kept once given");
        assert!(crowded.usable(pi));
        // A small subnet fills up without reusing an address, then says so.
        let mut tiny = AddressMap::new(p("10.9.0.0/29")).expect("map");
        let mut seen = std::collections::HashSet::new();
        for i in 0..5 {
            let a = tiny.add_device_derived(key(&format!("d{i}@x"))).expect("room");
            assert!(tiny.usable(a) && seen.insert(a), "{a} usable and not given twice");
        }
        assert!(matches!(tiny.add_device_derived(key("d5@x")), Err(MapError::SubnetFull(_))));
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().expect("ipv4")
    }

    #[test]
    fn prefixes_parse_and_normalise() {
        assert_eq!(p("192.168.1.77/24").to_string(), "192.168.1.0/24");
        assert_eq!(p("10.0.0.1").to_string(), "10.0.0.1/32");
        assert_eq!(p("fd00::1:2/64").to_string(), "fd00::/64");
        assert_eq!(p("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for bad in ["", "10.0.0.0/33", "fd00::/129", "x/8", "10.0.0.0/", "10.0.0/8"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert!(p("10.0.0.0/8").contains("10.255.1.1".parse().expect("ip")));
        assert!(!p("10.0.0.0/8").contains("11.0.0.1".parse().expect("ip")));
        assert!(!p("0.0.0.0/0").contains("::1".parse().expect("ip")));
        assert!(p("10.0.0.0/8").overlaps(&p("10.1.0.0/16")));
        assert!(!p("10.0.0.0/16").overlaps(&p("10.1.0.0/16")));
    }

    #[test]
    fn devices_get_the_first_free_address_after_the_interface() {
        let mut map = AddressMap::default();
        assert_eq!(map.interface_addr(), v4("100.80.0.1"));
        assert_eq!(map.add_device("a".into(), None), Ok(v4("100.80.0.2")));
        assert_eq!(map.add_device("b".into(), None), Ok(v4("100.80.0.3")));
        // Asking again is stable.
        assert_eq!(map.add_device("a".into(), None), Ok(v4("100.80.0.2")));
        map.remove_device(&"a".into());
        assert_eq!(map.add_device("c".into(), None), Ok(v4("100.80.0.2")));
    }

    #[test]
    fn the_interface_addresses_are_the_only_own_ones() {
        let mut map = AddressMap::default();
        assert_eq!(map.interface_addr_v6(), "fd6e:7000::6450:1".parse::<Ipv6Addr>().expect("ip"));
        assert!(!map.has_ipv6_routes());
        map.add_route(p("10.1.0.0/16"), "a".into()).expect("route");
        assert!(!map.has_ipv6_routes());
        map.add_route(p("fd00::/64"), "a".into()).expect("route");
        assert!(map.has_ipv6_routes());
        for own in ["100.80.0.1", "fd6e:7000::6450:1", "fd6e:7000::100.80.0.1"] {
            assert!(map.is_interface_addr(own.parse().expect("ip")), "{own}");
        }
        for other in
            ["100.80.0.2", "100.80.0.0", "127.0.0.1", "10.1.0.1", "0.0.0.0", "fd00::1", "::1", "::ffff:100.80.0.1"]
        {
            assert!(!map.is_interface_addr(other.parse().expect("ip")), "{other}");
        }
        let other = AddressMap::new(p("100.81.0.0/24")).expect("map");
        assert_eq!(other.interface_addr_v6(), "fd6e:7000::100.81.0.1".parse::<Ipv6Addr>().expect("ip"));
    }

    #[test]
    fn each_device_has_an_ipv6_address_that_reaches_it_too() {
        let mut map = AddressMap::default();
        let a = map.add_device("pi".into(), None).expect("add");
        let a6 = map.device_addr_v6(&"pi".into()).expect("v6");
        assert_eq!(a6, "fd6e:7000::100.80.0.2".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(map.lookup(a6.into(), 22), map.lookup(a.into(), 22));
        assert_eq!(map.lookup(a6.into(), 22).map(|t| t.target), Some("localhost:22".into()));
        for none in ["fd6e:7000::6450:1", "fd6e:7000::6450:3", "fd6e:7000::1:6450:2", "fd6e:7001::6450:2", "::6450:2"] {
            assert_eq!(map.lookup(none.parse().expect("ip"), 22), None, "{none}");
        }
        // Another prefix: the same IPv4 address, the new prefix; routes may not overlap it.
        let mut map = AddressMap::new(p("10.9.0.0/24")).expect("map").with_subnet6(p("fd00:198:18::/64")).expect("v6");
        map.add_device("pi".into(), None).expect("add");
        assert_eq!(map.device_addr_v6(&"pi".into()), Some("fd00:198:18::a09:2".parse().expect("ip")));
        assert_eq!(map.interface_addr_v6(), "fd00:198:18::10.9.0.1".parse::<Ipv6Addr>().expect("ip"));
        assert!(map.is_interface_addr("fd00:198:18::10.9.0.1".parse().expect("ip")));
        assert!(matches!(map.add_route(p("fd00:198:18::/48"), "pi".into()), Err(MapError::RouteInSubnet(_))));
        assert!(matches!(map.add_route(p("fd00:198:18:0:1::/80"), "pi".into()), Err(MapError::RouteInSubnet(_))));
        map.add_route(p("fd00:198:19::/64"), "pi".into()).expect("beside it");
        for bad in ["fd00::/97", "fd00::/128", "10.0.0.0/8"] {
            assert!(matches!(AddressMap::default().with_subnet6(p(bad)), Err(MapError::BadSubnet6(_))), "{bad}");
        }
        assert!(map.clone().with_subnet6(p("fd00:198:19::/96")).is_err(), "over a route already there");
    }

    #[test]
    fn given_addresses_are_honoured_whatever_the_order() {
        let map = AddressMap::build(
            DEFAULT_SUBNET,
            &[("auto".into(), None), ("fixed".into(), Some(v4("100.80.0.2"))), ("far".into(), Some(v4("100.80.9.9")))],
            &[],
        )
        .expect("map");
        assert_eq!(map.device_addr(&"fixed".into()), Some(v4("100.80.0.2")));
        assert_eq!(map.device_addr(&"far".into()), Some(v4("100.80.9.9")));
        assert_eq!(map.device_addr(&"auto".into()), Some(v4("100.80.0.3")));
    }

    #[test]
    fn bad_device_addresses_are_refused() {
        let mut map = AddressMap::default();
        for bad in ["100.80.0.0", "100.80.0.1", "100.80.255.255", "100.81.0.2", "10.0.0.2"] {
            assert!(
                matches!(map.add_device("x".into(), Some(v4(bad))), Err(MapError::AddressOutsideSubnet { .. })),
                "{bad}"
            );
        }
        map.add_device("a".into(), Some(v4("100.80.0.7"))).expect("add");
        assert!(matches!(map.add_device("b".into(), Some(v4("100.80.0.7"))), Err(MapError::AddressTaken { .. })));
        assert!(matches!(map.add_device("a".into(), Some(v4("100.80.0.8"))), Err(MapError::DeviceHasAddress { .. })));
        assert!(AddressMap::new(p("fd00::/64")).is_err());
        assert!(AddressMap::new(p("10.0.0.0/31")).is_err());
    }

    #[test]
    fn a_small_subnet_fills_up() {
        let mut map = AddressMap::new(p("10.9.9.0/30")).expect("map");
        assert_eq!(map.add_device("a".into(), None), Ok(v4("10.9.9.2")));
        assert!(matches!(map.add_device("b".into(), None), Err(MapError::SubnetFull(_))));
    }

    #[test]
    fn lookup_maps_device_addresses_to_localhost_and_prefixes_to_the_host() {
        let mut map = AddressMap::default();
        let addr = map.add_device("pi".into(), None).expect("add");
        map.add_route(p("192.168.1.0/24"), "pi".into()).expect("route");
        map.add_route(p("192.168.1.128/25"), "nas".into()).expect("route");
        map.add_route(p("fd00::/64"), "pi".into()).expect("route");

        let t = map.lookup(addr.into(), 22).expect("device");
        assert_eq!(t, FlowTarget { device: "pi".into(), target: "localhost:22".into() });
        let t = map.lookup("192.168.1.10".parse().expect("ip"), 80).expect("route");
        assert_eq!(t, FlowTarget { device: "pi".into(), target: "192.168.1.10:80".into() });
        let t = map.lookup("192.168.1.200".parse().expect("ip"), 80).expect("longest");
        assert_eq!(t.device, "nas".into());
        let t = map.lookup("fd00::10".parse().expect("ip"), 443).expect("v6");
        assert_eq!(t.target, "[fd00::10]:443");

        assert_eq!(map.lookup("100.80.0.1".parse().expect("ip"), 22), None, "the interface itself");
        assert_eq!(map.lookup("100.80.0.99".parse().expect("ip"), 22), None, "unassigned");
        assert_eq!(map.lookup("8.8.8.8".parse().expect("ip"), 53), None);
    }

    #[test]
    fn routes_may_not_overlap_the_subnet_or_change_owner() {
        let mut map = AddressMap::default();
        assert!(matches!(map.add_route(p("100.80.5.0/24"), "a".into()), Err(MapError::RouteInSubnet(_))));
        assert!(matches!(map.add_route(p("100.0.0.0/8"), "a".into()), Err(MapError::RouteInSubnet(_))));
        map.add_route(p("10.0.0.0/8"), "a".into()).expect("route");
        map.add_route(p("10.0.0.0/8"), "a".into()).expect("same owner again");
        assert!(matches!(map.add_route(p("10.0.0.0/8"), "b".into()), Err(MapError::RouteTaken { .. })));
    }
}
