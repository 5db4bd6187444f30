//! The TUN interface: created with tun-rs, given the subnet's `.1` and a large MTU, with routes for
//! the routed prefixes. The kernel deletes a (non-persistent) TUN interface, and every route
//! through it, when the last file descriptor closes, so exiting or crashing leaves nothing
//! behind; a stale interface of the same name (a persistent one, left by something else) is
//! deleted at start if no process holds it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::map::{AddressMap, Prefix};

/// Why the interface could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The interface name is in use by a live process (another `np up`?).
    #[error("interface {name} is in use by process {pid}")]
    InUse {
        /// The interface.
        name: String,
        /// A process holding it.
        pid: u32,
    },
    /// An interface of that name exists and is not a TUN device.
    #[error("interface {0} exists and is not a TUN device")]
    NotTun(String),
    /// Creating or configuring the device failed (not root? no /dev/net/tun?).
    #[error("creating TUN interface {name}: {source}")]
    Create {
        /// The interface.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {detail}")]
    Ip {
        /// The arguments.
        args: String,
        /// Its stderr, or the spawn error.
        detail: String,
    },
}

/// An interface name as Linux accepts it: 1 to 15 bytes, no `/`, whitespace or `:`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The TUN interface; dropping it removes the interface and its routes.
pub struct Tun {
    device: AsyncDevice,
    /// Packets carry a virtio-net header and TCP checksums are left to the other side: see
    /// [`Tun::checksum_offload`].
    checksum_offload: bool,
    name: String,
    /// The interface's own addresses: the sources of the routes, so the kernel picks them.
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    /// The nftables table that drops packets forwarded into the interface, or why there is none.
    guard: Result<String, String>,
}

impl Tun {
    /// Create interface `name` with address `map.interface_addr()` in `map.subnet()`, MTU `mtu`,
    /// up, and routes for the map's routed prefixes; and, where `nft` is there, an nftables
    /// table that drops whatever the kernel would forward into it (removed with the interface).
    pub fn create(name: &str, map: &AddressMap, mtu: u16) -> Result<Tun, TunError> {
        if !valid_name(name) {
            return Err(TunError::Create {
                name: name.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"),
            });
        }
        remove_stale(name)?;
        let create = |source| TunError::Create { name: name.to_owned(), source };
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .ipv4(map.interface_addr(), map.subnet().prefix_len(), None)
                .mtu(mtu)
                .packet_information(false)
                .offload(offload)
                .enable(true)
                .build_async()
        };
        let (device, checksum_offload) = if offload_wanted() {
            match build(true).and_then(|d| checksum_offload_only(&d).map(|()| d)) {
                Ok(d) => (d, true),
                Err(e) => {
                    tracing::info!(interface = name, error = %e, "no checksum offload on the TUN interface; checksums are computed in full");
                    remove_stale(name)?;
                    (build(false).map_err(create)?, false)
                }
            }
        } else {
            (build(false).map_err(create)?, false)
        };
        let mut tun = Tun {
            device,
            checksum_offload,
            name: name.to_owned(),
            v4: map.interface_addr(),
            v6: None,
            guard: Err("not installed yet".into()),
        };
        // The interface's IPv6 address, with the prefix the devices' IPv6 addresses are in (so the
        // kernel routes them here, and picks this address as the source of flows to them and to
        // routed IPv6 prefixes: the stack drops every packet from any other address, see
        // `Stack::handle_packet`). `nodad`: nothing else is on this link to collide with.
        let v6 = map.interface_addr_v6();
        let with_len = format!("{v6}/{}", map.subnet6().prefix_len());
        match ip(&["-6", "addr", "add", &with_len, "dev", name, "nodad"]) {
            Ok(()) => tun.v6 = Some(v6),
            // A host with IPv6 turned off still gets its IPv4 addresses; a routed IPv6 prefix
            // cannot work without it, so that is an error.
            Err(e) if !map.has_ipv6_routes() => {
                tracing::warn!(interface = name, error = %e, "no IPv6 on the interface: devices are reachable over IPv4 only")
            }
            Err(e) => return Err(e),
        }
        for (prefix, _) in map.routes() {
            tun.add_route(prefix)?;
        }
        tun.guard = forward_guard(name);
        if let Err(why) = &tun.guard {
            tracing::warn!(interface = name, "no kernel guard against forwarded packets ({why}); np up still drops every packet whose source is not its own address, but not those another host's traffic was masqueraded to");
        }
        tracing::info!(interface = name, subnet = %map.subnet(), mtu, "TUN interface up");
        Ok(tun)
    }

    /// The interface's IPv6 address, if it has one (not on a host with IPv6 turned off).
    pub fn addr_v6(&self) -> Option<Ipv6Addr> {
        self.v6
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why the kernel does not drop packets forwarded into the interface (see [`Tun::create`]),
    /// or `None` if it does.
    pub fn forward_guard_missing(&self) -> Option<&str> {
        self.guard.as_ref().err().map(String::as_str)
    }

    /// Whether every packet read or written carries a [`VNET_HDR_LEN`]-byte virtio-net header
    /// first, and TCP checksums are offloaded both ways: the kernel hands over its own segments
    /// with only the pseudo-header summed (`NEEDS_CSUM`) instead of summing every byte of them,
    /// and takes ours the same way, so neither side sums the payload. Both ends of this link are
    /// on this host, in memory: the checksum guards against nothing here.
    pub fn checksum_offload(&self) -> bool {
        self.checksum_offload
    }

    /// The device, for reading and writing packets.
    pub fn device(&self) -> &AsyncDevice {
        &self.device
    }

    /// Route `prefix` into the interface, with the interface's own address as the source the
    /// kernel gives new connections (the stack serves no other source).
    pub fn add_route(&self, prefix: Prefix) -> Result<(), TunError> {
        let (family, src) = match prefix.addr() {
            IpAddr::V4(_) => ("-4", Some(self.v4.to_string())),
            IpAddr::V6(_) => ("-6", self.v6.map(|a| a.to_string())),
        };
        let prefix_text = prefix.to_string();
        let mut args = vec![family, "route", "replace", &prefix_text, "dev", &self.name];
        if let Some(src) = &src {
            args.extend(["src", src.as_str()]);
        }
        ip(&args)
    }
}

/// Bytes of the virtio-net header in front of each packet when [`Tun::checksum_offload`] is on.
pub const VNET_HDR_LEN: usize = 10;

/// Whether to ask for checksum offload (`NP_TUN_OFFLOAD=0` turns it off, to compare).
fn offload_wanted() -> bool {
    !matches!(std::env::var("NP_TUN_OFFLOAD").as_deref(), Ok("0" | "off" | "no"))
}

/// tun-rs's offload mode also turns on TSO, which would hand over segments larger than the MTU
/// for us to cut up; the MTU is already 64 KiB, so only the checksum is offloaded.
fn checksum_offload_only(device: &AsyncDevice) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if !device.tcp_gso() {
        return Err(io::Error::other("the kernel has no virtio-net header for TUN"));
    }
    // SAFETY: a live TUN descriptor the device owns, and TUNSETOFFLOAD takes an integer by value.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETOFFLOAD, libc::TUN_F_CSUM as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Tun {
    fn drop(&mut self) {
        if let Ok(table) = &self.guard {
            if let Err(e) = nft(&format!("delete table inet {table}\n")) {
                tracing::warn!(interface = %self.name, error = %e, "removing the forward guard");
            }
        }
        tracing::info!(interface = %self.name, "TUN interface down");
    }
}

/// The nftables table of the forward guard of interface `name`, if the name can be spelled in
/// an nftables script as it is.
fn guard_table(name: &str) -> Option<String> {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    // The table's name in hex: nftables identifiers take fewer characters than interface names.
    plain.then(|| format!("np_guard_{}", name.bytes().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// Installs (or replaces) an nftables table that drops every packet the kernel would forward
/// into interface `name`: `np up` serves its own host only. The stack already drops packets
/// whose source is not the interface's address, but a host that masquerades other hosts'
/// traffic (Docker does for its containers, by default, on every interface but its own) gives
/// them that very source; forwarding is decided before that rewrite, so dropping there keeps
/// them out too. Returns the table's name, or why there is no guard.
fn forward_guard(name: &str) -> Result<String, String> {
    let table = guard_table(name).ok_or_else(|| format!("interface name {name:?} cannot be written in nftables"))?;
    // `add` then `delete` then the definition, in one transaction: replaces a table a crashed
    // `np up` left, and never leaves a moment without one.
    let script = format!(
        "add table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
           chain forward {{\n\
             type filter hook forward priority -10; policy accept;\n\
             oifname \"{name}\" counter drop comment \"np up serves its own host only\"\n\
           }}\n\
         }}\n"
    );
    nft(&script)?;
    tracing::info!(interface = name, table = %table, "forwarding into the interface is dropped");
    Ok(table)
}

/// Runs `nft -f -` with `script` on its standard input.
fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Delete a leftover TUN interface called `name`, unless a live process holds it.
fn remove_stale(name: &str) -> Result<(), TunError> {
    let sys = Path::new("/sys/class/net").join(name);
    if !sys.exists() {
        return Ok(());
    }
    if !sys.join("tun_flags").exists() {
        return Err(TunError::NotTun(name.to_owned()));
    }
    if let Some(pid) = tun_holder(name) {
        return Err(TunError::InUse { name: name.to_owned(), pid });
    }
    tracing::warn!(interface = name, "deleting a stale TUN interface");
    ip(&["link", "delete", name])
}

/// A process in our network namespace with a TUN file descriptor attached to `name`: the kernel
/// shows `iff:\tNAME` in the fdinfo of such descriptors. A holder in another namespace holds
/// another interface of the same name (each container or namespace may have its own `np0`).
fn tun_holder(name: &str) -> Option<u32> {
    let wanted = format!("iff:\t{name}");
    let ours = std::fs::read_link("/proc/self/ns/net").ok();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if ours.is_some() && std::fs::read_link(proc_entry.path().join("ns/net")).ok() != ours {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            if let Ok(info) = std::fs::read_to_string(fd.path()) {
                if info.lines().any(|l| l == wanted) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

fn ip(args: &[&str]) -> Result<(), TunError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunError::Ip { args: joined.clone(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunError::Ip { args: joined, detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["np0", "np-test.1", "a", "abcdefghijklmno"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "abcdefghijklmnop", "a b", "a/b", "a:1", ".", "..", "np\n"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn guard_tables_are_spelled_plainly() {
        assert_eq!(guard_table("np0").as_deref(), Some("np_guard_6e7030"));
        assert_eq!(guard_table("n-_.1").as_deref(), Some("np_guard_6e2d5f2e31"));
        for odd in ["a\"b", "a b", "a;b", "a{", "a\\b", "a}b", "a#"] {
            assert_eq!(guard_table(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn no_stale_interface_is_a_no_op() {
        assert!(remove_stale("np-absent-xyz").is_ok());
        assert_eq!(tun_holder("np-absent-xyz"), None);
    }
}
