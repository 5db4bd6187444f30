//! `np up`: a TUN interface where each device has a virtual address; every TCP flow to it (or to
//! a routed prefix) is carried through that device's session.

use anyhow::{Context, Result};
use np_identity::DeviceRef;
use np_netstack::{
    AddressMap, BoxFuture, DeviceKey, Dialed, Dialer, Netstack, NetstackConfig, Prefix, RefuseKind, SetupFailed,
};
use np_tunnel::{Connector, SetupError};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// `--device NAME@ID[=ADDR]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub device: DeviceRef,
    pub addr: Option<Ipv4Addr>,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (d, a) = match s.split_once('=') {
            Some((d, a)) => (d, Some(a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?)),
            None => (s, None),
        };
        Ok(DeviceSpec { device: d.parse().map_err(|e: np_identity::IdentityError| e.to_string())?, addr: a })
    }
}

/// `--route PREFIX=NAME@ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub prefix: Prefix,
    pub device: DeviceRef,
}

impl FromStr for RouteSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, d) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not PREFIX=NAME@ID (e.g. 192.168.1.0/24=pi4@alice_device)"))?;
        Ok(RouteSpec {
            prefix: p.parse().map_err(|e| format!("{p:?}: {e}"))?,
            device: d.parse().map_err(|e: np_identity::IdentityError| e.to_string())?,
        })
    }
}

/// The DNS name of a device: `NAME.ID.np`.
pub fn dns_name(d: &DeviceRef) -> String {
    format!("{}.{}.np", d.device, d.identity.bare())
}

/// Sets up each device's session for the netstack: the request, the relay join, the handshake.
struct UpDialer {
    connector: Connector,
    /// Shared with the watcher that adds and removes devices while `np up` runs.
    devices: Devices,
    verbose: bool,
}

type Devices = Arc<RwLock<HashMap<String, DeviceRef>>>;

impl Dialer for UpDialer {
    fn dial(&self, device: DeviceKey, first_target: String) -> BoxFuture<'static, Result<Dialed, SetupFailed>> {
        let connector = self.connector.clone();
        let device_ref = self.devices.read().unwrap_or_else(|p| p.into_inner()).get(&device.0).cloned();
        let verbose = self.verbose;
        Box::pin(async move {
            let unreachable = |reason: String| SetupFailed { kind: RefuseKind::Unreachable, reason };
            let device_ref = device_ref.ok_or_else(|| unreachable(format!("no device {device}")))?;
            let t0 = Instant::now();
            let step = np_tunnel::slot::progress(verbose);
            match connector.dial_best(&device_ref, &[first_target], &step).await {
                Ok((t, relay)) => {
                    tracing::info!(device = %device_ref, session = %t.session, %relay, elapsed_ms = t0.elapsed().as_millis() as u64, "session established");
                    Ok(Dialed {
                        stream: t.stream,
                        keys: t.keys,
                        session: t.session,
                        udp: t.features.has(np_tunnel::msg::Features::UDP),
                    })
                }
                Err(e) => {
                    tracing::warn!(device = %device_ref, error = %e, "setting up a session failed");
                    // A device that says no (the target is not permitted) is a refusal the
                    // application should see as such; anything else is "unreachable".
                    let kind = match e {
                        SetupError::Refused { .. } => RefuseKind::Refused,
                        _ => RefuseKind::Unreachable,
                    };
                    Err(SetupFailed { kind, reason: e.to_string() })
                }
            }
        })
    }
}

/// What `np up` was asked for.
pub struct UpOptions {
    pub devices: Vec<DeviceSpec>,
    pub routes: Vec<RouteSpec>,
    pub subnet: Prefix,
    /// Where the devices' IPv6 addresses are (`--subnet6`).
    pub subnet6: Prefix,
    pub name: String,
    pub eager: bool,
    /// Route what the devices advertise (vetted, see [`vet_route`]).
    pub accept_routes: bool,
    pub verbose: bool,
}

/// Brings the interface up and serves until `shutdown`; everything it created is gone when it
/// returns.
pub async fn run(
    connector: Connector,
    opts: UpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let started = Instant::now();
    let map = AddressMap::new(opts.subnet).map_err(|e| anyhow::anyhow!("--subnet {}: {e}", opts.subnet))?;
    let mut map = map.with_subnet6(opts.subnet6).map_err(|e| anyhow::anyhow!("--subnet6 {}: {e}", opts.subnet6))?;
    // Given addresses first, so automatic ones never take them.
    let mut devices = opts.devices.clone();
    devices.sort_by_key(|d| d.addr.is_none());
    // With no --device: every device that shares its info with us, each at an address derived
    // from its name (the same on every start, whichever others come and go).
    let discovered = if opts.devices.is_empty() { discover(&connector).await? } else { Vec::new() };
    let mut refs: HashMap<String, DeviceRef> = HashMap::new();
    let mut names: Vec<(String, Ipv4Addr, DeviceRef)> = Vec::new();
    let routed: Vec<DeviceSpec> =
        opts.routes.iter().map(|r| DeviceSpec { device: r.device.clone(), addr: None }).collect();
    for (spec, derived) in devices
        .iter()
        .map(|d| (d, false))
        .chain(discovered.iter().map(|d| (d, true)))
        .chain(routed.iter().map(|d| (d, !discovered.is_empty())))
    {
        let key = spec.device.to_string();
        if refs.contains_key(&key) {
            continue;
        }
        let added = if derived {
            map.add_device_derived(DeviceKey(key.clone()))
        } else {
            map.add_device(DeviceKey(key.clone()), spec.addr)
        };
        let addr = added.map_err(|e| anyhow::anyhow!("{}: {e}", spec.device))?;
        names.push((dns_name(&spec.device), addr, spec.device.clone()));
        refs.insert(key, spec.device.clone());
    }
    for r in &opts.routes {
        map.add_route(r.prefix, DeviceKey(r.device.to_string()))
            .map_err(|e| anyhow::anyhow!("--route {}: {e}", r.prefix))?;
    }
    // What the devices advertise, after the user's own --route (which wins any overlap).
    let mut advertised: Vec<(Prefix, DeviceRef, bool)> = Vec::new();
    for (device, text) in advertised_routes(&connector, &refs).await {
        match vet_route(&text, Some(opts.subnet)) {
            Ok(prefix) if !opts.accept_routes => advertised.push((prefix, device, false)),
            // Not over anything already routed, however specific: a device must not take part
            // of a prefix the user (or another device) routed elsewhere.
            Ok(prefix) if map.routes().any(|(p, _)| p.overlaps(&prefix)) => {
                tracing::warn!(%device, route = %prefix, "advertised route skipped: it overlaps a route already there")
            }
            Ok(prefix) => match map.add_route(prefix, DeviceKey(device.to_string())) {
                Ok(()) => advertised.push((prefix, device, true)),
                Err(e) => tracing::warn!(%device, route = %prefix, error = %e, "advertised route skipped"),
            },
            Err(e) => tracing::warn!(%device, route = %text, error = %e, "advertised route skipped"),
        }
    }
    let iface_addr = map.interface_addr();
    // An eager session is set up before any flow: ssh is what most users are after.
    let eager = if opts.eager {
        refs.keys().map(|k| (DeviceKey(k.clone()), np_tunnel::slot::DEFAULT_TARGET.to_string())).collect()
    } else {
        Vec::new()
    };
    let config = NetstackConfig {
        name: opts.name.clone(),
        map: map.clone(),
        mux: connector.mux.clone(),
        eager,
        ..NetstackConfig::default()
    };
    let netstack = Netstack::new(config).with_context(|| format!("bringing up interface {}", opts.name))?;
    let guard = match netstack.forward_guard_missing() {
        None => "on (nftables: packets forwarded into the interface are dropped)".to_string(),
        Some(why) => format!("off ({why})"),
    };
    // With its IPv6 address (and each device's) where the interface has IPv6.
    let has_v6 = netstack.addr_v6().is_some();
    let v6_of = {
        let map = map.clone();
        move |a: Ipv4Addr| has_v6.then(|| map.v6_of(a))
    };
    match netstack.addr_v6() {
        Some(v6) => {
            println!("up {} {}/{} {v6}/{}", opts.name, iface_addr, opts.subnet.prefix_len(), opts.subnet6.prefix_len())
        }
        None => println!("up {} {}/{}", opts.name, iface_addr, opts.subnet.prefix_len()),
    }
    for (dns, addr, d) in &names {
        match v6_of(*addr) {
            Some(v6) => println!("  {addr:<15} {d}  ({dns}, {v6})"),
            None => println!("  {addr:<15} {d}  ({dns})"),
        }
    }
    for r in &opts.routes {
        println!("  {:<15} via {}", r.prefix.to_string(), r.device);
    }
    for (prefix, device, used) in &advertised {
        if *used {
            println!("  {:<15} via {device} (advertised)", prefix.to_string());
        } else {
            println!("  {:<15} advertised by {device}, not used: accept with --accept-routes", prefix.to_string());
        }
    }

    // The resolver for NAME.ID.np on the interface's own address.
    let table: HashMap<String, Ipv4Addr> = names.iter().map(|(n, a, _)| (n.to_ascii_lowercase(), *a)).collect();
    let table = Arc::new(RwLock::new(table));
    match bind_dns(&opts.name, iface_addr).await {
        Ok(sock) => {
            let table = table.clone();
            let v6_of = v6_of.clone();
            tokio::spawn(crate::dns::serve(sock, iface_addr, move |n| {
                let v4 = table.read().unwrap_or_else(|p| p.into_inner()).get(n).copied()?;
                Some(crate::dns::Addrs { v4, v6: v6_of(v4) })
            }));
            wire_resolved(&opts.name, iface_addr).await;
        }
        Err(e) => tracing::warn!(error = %e, "no DNS for .np names (cannot bind {iface_addr}:53 on {})", opts.name),
    }

    let status = netstack.status();
    let (listener, _socket_file) = status_listener(&opts.name)?;
    let name = opts.name.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let text = match status.snapshot().await {
                Some(st) => render_status(&name, &st, started, &guard),
                None => "stopping\n".into(),
            };
            let _ = s.write_all(text.as_bytes()).await;
        }
    });
    // np nc's way onto these sessions (see local_flows).
    let (flows, _flows_file) = crate::local_flows::listener(&opts.name)?;
    tokio::spawn(crate::local_flows::serve(flows, netstack.status(), connector.ctl.me().clone(), connector.timeout));
    println!("ready");
    let refs: Devices = Arc::new(RwLock::new(refs));
    if !discovered.is_empty() {
        let watch = Watch { connector: connector.clone(), handle: netstack.status(), devices: refs.clone(), table };
        tokio::spawn(watch.run());
    }
    let dialer = UpDialer { connector, devices: refs, verbose: opts.verbose };
    // On a runtime worker, not the thread blocked on `main`'s future: a worker drives the I/O
    // events itself, where the main thread would be woken by one for every readiness.
    let serving = tokio::spawn(netstack.serve(dialer, shutdown));
    serving.await.context("the interface's task")?.context("serving the interface")?;
    Ok(())
}

/// Whether to use advertised routes: `--accept-routes` once is remembered (a file in the home
/// directory), as Tailscale remembers it, until `--no-accept-routes`.
pub fn remember_accept_routes(home: &Path, accept: bool, refuse: bool) -> Result<bool> {
    let marker = home.join("accept-routes");
    if accept {
        std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
        std::fs::write(&marker, "np up uses the routes its devices advertise (np up --no-accept-routes to stop)\n")
            .with_context(|| format!("remembering --accept-routes in {}", marker.display()))?;
        return Ok(true);
    }
    if refuse {
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("forgetting --accept-routes ({})", marker.display())),
        }
        return Ok(false);
    }
    Ok(marker.exists())
}

/// The LAN prefixes each of our devices advertises (`routes/NAME` records), as published.
async fn advertised_routes(connector: &Connector, ours: &HashMap<String, DeviceRef>) -> Vec<(DeviceRef, String)> {
    let records = match connector.ctl.list("routes/").await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the routes devices advertise");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for r in records {
        let Ok(routes) = postcard::from_bytes::<np_tunnel::routes::DeviceRoutes>(&r.value) else { continue };
        let key = format!("{}@{}", routes.device, r.owner.bare());
        // Only a device we bring up, and only under its own identity's record.
        let Some(device) = ours.get(&key) else { continue };
        out.extend(routes.routes.into_iter().map(|p| (device.clone(), p)));
    }
    out
}

/// Checks a LAN prefix a device advertises (or npd is told to advertise) before it is routed:
/// a hostile or careless device must not take the client's default route, loopback,
/// multicast, or the np subnet (`subnet`) with it.
pub fn vet_route(text: &str, subnet: Option<Prefix>) -> Result<Prefix, String> {
    let prefix: Prefix = text.parse().map_err(|e| format!("{text:?} is not a prefix: {e}"))?;
    let (min, reserved): (u8, &[&str]) = if prefix.addr().is_ipv4() {
        (8, &["0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32"])
    } else {
        (16, &["::1/128", "ff00::/8", "::/128"])
    };
    if prefix.prefix_len() < min {
        return Err(format!("{prefix} is broader than a /{min}: it would take traffic meant for elsewhere"));
    }
    for r in reserved {
        let r: Prefix = r.parse().map_err(|e| format!("{r}: {e}"))?;
        if prefix.overlaps(&r) {
            return Err(format!("{prefix} overlaps {r}"));
        }
    }
    if let Some(s) = subnet.filter(|s| prefix.overlaps(s)) {
        return Err(format!("{prefix} overlaps the np subnet {s}"));
    }
    Ok(prefix)
}

/// How often `np up` with no `--device` looks for devices that appeared or were removed.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows the devices that share their info with us while `np up` runs (no `--device`): a new
/// one gets its derived address, its DNS name and sessions; a removed or revoked one loses all
/// three. A device that is only offline keeps its address: it is still listed.
struct Watch {
    connector: Connector,
    handle: np_netstack::StatusHandle,
    devices: Devices,
    table: Arc<RwLock<HashMap<String, Ipv4Addr>>>,
}

impl Watch {
    async fn run(self) {
        let mut ticker = tokio::time::interval(WATCH_EVERY);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let found = match discover(&self.connector).await {
                Ok(f) => f,
                // None listed is a real answer (every device removed); an error is not.
                Err(e) if e.downcast_ref::<NoDevices>().is_some() => Vec::new(),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "listing devices failed; trying again");
                    continue;
                }
            };
            let now: HashMap<String, DeviceRef> = found.into_iter().map(|d| (d.device.to_string(), d.device)).collect();
            let known: Vec<String> = self.devices.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
            for key in known.iter().filter(|k| !now.contains_key(*k)) {
                let Some(d) = self.devices.write().unwrap_or_else(|p| p.into_inner()).remove(key) else { continue };
                self.table.write().unwrap_or_else(|p| p.into_inner()).remove(&dns_name(&d).to_ascii_lowercase());
                self.handle.remove_device(DeviceKey(key.clone())).await;
                println!("  removed         {d}");
            }
            for (key, d) in now.into_iter().filter(|(k, _)| !known.contains(k)) {
                match self.handle.add_device(DeviceKey(key.clone())).await {
                    Some(Ok(addr)) => {
                        self.devices.write().unwrap_or_else(|p| p.into_inner()).insert(key, d.clone());
                        self.table
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(dns_name(&d).to_ascii_lowercase(), addr);
                        println!("  {addr:<15} {d}  ({}) added", dns_name(&d));
                    }
                    Some(Err(e)) => tracing::warn!(device = %d, error = %e, "no address for a new device"),
                    None => return,
                }
            }
        }
    }
}

/// No device shares its info with us.
#[derive(Debug)]
struct NoDevices {
    me: String,
}

impl std::fmt::Display for NoDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no devices share their info with {me}: start one with `npd --as @ID --device NAME --manager {me}`, or name one with --device NAME@ID",
            me = self.me
        )
    }
}

impl std::error::Error for NoDevices {}

/// The devices that share their info with us (what `np devices` lists), by name.
async fn discover(connector: &Connector) -> Result<Vec<DeviceSpec>> {
    let records = connector.ctl.list("device/").await.context("listing the devices that share their info with you")?;
    let mut found: Vec<DeviceSpec> = records
        .iter()
        .filter_map(|r| {
            let info = postcard::from_bytes::<np_tunnel::DeviceInfo>(&r.value).ok()?;
            let device = format!("{}@{}", info.device, r.owner.bare()).parse().ok()?;
            Some(DeviceSpec { device, addr: None })
        })
        .collect();
    found.sort_by_key(|d| d.device.to_string());
    found.dedup();
    if found.is_empty() {
        return Err(NoDevices { me: connector.ctl.me().to_string() }.into());
    }
    Ok(found)
}

/// With systemd-resolved, send `.np` names to our resolver (undone with the interface).
async fn wire_resolved(iface: &str, addr: Ipv4Addr) {
    let active = tokio::process::Command::new("resolvectl")
        .arg("status")
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !active {
        tracing::info!("systemd-resolved not running: resolve .np names by pointing a resolver at {addr} (see README)");
        return;
    }
    for args in [vec!["dns", iface, &addr.to_string()], vec!["domain", iface, "~np"]] {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Err(e) = tokio::process::Command::new("resolvectl").args(&a).status().await {
            tracing::warn!(error = %e, "resolvectl failed");
        }
    }
}

/// The resolver's socket: on the interface address, and bound to the interface, so that only
/// this host's own queries reach it (the kernel delivers a packet for one of its addresses
/// whichever interface it came in on; a local query to the interface address is seen as
/// arriving on the interface). `dns::serve` checks the source as well.
async fn bind_dns(iface: &str, addr: Ipv4Addr) -> std::io::Result<tokio::net::UdpSocket> {
    let sock = tokio::net::UdpSocket::bind((addr, 53)).await?;
    // (A query from elsewhere queued before this line fails the source check in `dns::serve`.)
    if let Err(e) = sock.bind_device(Some(iface.as_bytes())) {
        // Linux before 5.7 wants CAP_NET_RAW for this, which the hardened unit does not give.
        // The source check still holds: the kernel drops packets from outside that claim a
        // local or loopback source (martians), and the resolver answers no other source.
        tracing::warn!(interface = iface, error = %e, "DNS not bound to the interface; answering by source address alone");
    }
    Ok(sock)
}

/// Where the status sockets live: a directory only root may enter, so no other user can take a
/// socket's name first (to fake `np status`, or to stop `np up` from starting).
pub const RUN_DIR: &str = "/run/np";

/// The status socket of interface `iface` in this network namespace.
fn status_socket_path(iface: &str) -> Result<PathBuf> {
    socket_path(iface, "status")
}

/// The socket of `kind` (`status`, `flows`) of interface `iface` in this network namespace. The
/// directory is shared by every namespace of the host while each may have its own `np0`, so the
/// name carries the namespace's inode number.
pub(crate) fn socket_path(iface: &str, kind: &str) -> Result<PathBuf> {
    anyhow::ensure!(np_netstack::tun::valid_name(iface), "{iface:?} is not an interface name");
    let ns = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.ino();
    Ok(Path::new(RUN_DIR).join(format!("{iface}.{ns}.{kind}")))
}

/// Why a directory is not private enough to hold the status sockets, if it is not: it must be
/// a real directory (not a symlink), owned by `me`, and writable by nobody else.
pub fn not_private(meta: &std::fs::Metadata, me: u32) -> Option<String> {
    let mode = meta.permissions().mode();
    if meta.file_type().is_symlink() || !meta.is_dir() {
        Some("it is not a directory".into())
    } else if meta.uid() != me {
        Some(format!("it is owned by uid {}, not by us (uid {me})", meta.uid()))
    } else if mode & 0o022 != 0 {
        Some(format!("it is writable by others (mode {:o})", mode & 0o7777))
    } else {
        None
    }
}

/// Creates `dir` (mode 0700) if it is missing; checks it with [`not_private`].
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {} (np up runs as root)", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
    if let Some(why) = not_private(&meta, effective_uid()?) {
        anyhow::bail!("refusing to put the status socket in {}: {why}", dir.display());
    }
    Ok(())
}

/// This process's effective user id (from /proc: libc's getter is an unsafe call).
pub(crate) fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_euid(&status).context("no effective uid in /proc/self/status")
}

/// The effective uid from the `Uid:` line of /proc/PID/status (real, effective, saved, fs).
fn parse_euid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The status socket file; removed when `np up` ends, if it is still ours.
pub struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn status_listener(iface: &str) -> Result<(tokio::net::UnixListener, SocketFile)> {
    private_listener(&status_socket_path(iface)?)
}

/// Binds the socket at `path` in the run directory (made private first), mode 0600.
pub(crate) fn private_listener(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile)> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    private_dir(Path::new(RUN_DIR))?;
    let path = path.to_path_buf();
    let l = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A live `np up` answers; a file left by one that died (killed, crashed) does not,
            // and is replaced. Only root can have put anything in this directory.
            if UnixStream::connect(&path).is_ok() {
                anyhow::bail!("another `np up` already serves {} in this network namespace", path.display());
            }
            let meta = std::fs::symlink_metadata(&path)?;
            anyhow::ensure!(meta.file_type().is_socket(), "{} exists and is not a socket", path.display());
            tracing::info!(path = %path.display(), "replacing the status socket of an `np up` that is gone");
            std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("binding {}", path.display())),
    };
    // Owner only, beside the private directory: what the sockets give (a device's flows) is root's.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    let ino = std::fs::symlink_metadata(&path)?.ino();
    l.set_nonblocking(true)?;
    Ok((tokio::net::UnixListener::from_std(l)?, SocketFile { path, ino }))
}

/// Whether a status socket served by `uid` may be believed: root's (np up runs as root), or
/// our own.
pub fn trusted_server(uid: u32, me: u32) -> bool {
    uid == 0 || uid == me
}

/// `np status`: asks the running `np up` for interface `iface`.
pub async fn status(iface: &str) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let path = status_socket_path(iface)?;
    let mut s = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!("cannot reach {}: run `np status` as root, like `np up`", path.display())
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("no `np up` is running for {iface} (start one with `np up --device NAME@ID ...`)")
            })
        }
    };
    // Defence in depth: whoever serves the socket must be root (or us), whatever the directory.
    let peer = s.peer_cred().context("reading the status socket's peer credentials")?.uid();
    if !trusted_server(peer, effective_uid()?) {
        anyhow::bail!("{} is served by uid {peer}, not by root: not showing its status", path.display());
    }
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn render_status(iface: &str, st: &np_netstack::Status, started: Instant, guard: &str) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interface {iface}  {}/{}  up {}s",
        st.interface_addr,
        st.subnet.prefix_len(),
        started.elapsed().as_secs()
    );
    if let Some(v6) = st.interface_addr_v6 {
        let _ = writeln!(o, "ipv6 {v6}");
    }
    let _ = writeln!(o, "{:<15} {:<24} {:<32} {:<24} FLOWS", "ADDRESS", "ADDRESS6", "DEVICE", "SESSION");
    for (key, addr) in &st.devices {
        let session = st.sessions.iter().find(|(d, _)| d == key).map_or_else(|| "-".into(), |(_, s)| s.clone());
        let flows = st.flows.get(key).copied().unwrap_or(0);
        let v6 = match (st.interface_addr_v6, st.devices_v6.get(key)) {
            (Some(_), Some(a)) => a.to_string(),
            _ => "-".into(),
        };
        let _ = writeln!(o, "{:<15} {v6:<24} {:<32} {:<24} {flows}", addr.to_string(), key.0, session);
    }
    for (p, d) in &st.routes {
        let _ = writeln!(o, "route {p} via {d}");
    }
    // Beside the TCP flows above (a list, not a column: scripts read FLOWS as the last one).
    let _ = writeln!(o, "udp associations: {}", st.udp.len());
    for u in &st.udp {
        let _ = writeln!(
            o,
            "udp {} -> {} via {} to {}  up {} datagrams {} bytes  down {} datagrams {} bytes",
            u.src, u.dst, u.device.0, u.target, u.datagrams_up, u.bytes_up, u.datagrams_down, u.bytes_down
        );
    }
    let _ = writeln!(
        o,
        "foreign packets dropped: {} (their source was not {}: another host routing through this one)",
        st.stats.foreign_source, st.interface_addr
    );
    let _ = writeln!(o, "forward guard: {guard}");
    let _ = writeln!(o, "stack: {:?}", st.stats);
    let _ = writeln!(o, "sessions: {:?}", st.bridge);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_directory_must_be_private_and_ours() {
        let me = effective_uid().expect("euid");
        let tmp = std::env::temp_dir().join(format!("np-up-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("tmp");
        let dir = tmp.join("run");
        private_dir(&dir).expect("a fresh directory");
        let meta = std::fs::symlink_metadata(&dir).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(not_private(&meta, me), None);
        // Again: an existing private directory is fine.
        private_dir(&dir).expect("existing");
        assert!(not_private(&meta, me.wrapping_add(1)).is_some_and(|w| w.contains("owned by")));
        for mode in [0o777, 0o720, 0o702, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = private_dir(&dir).expect_err("writable by others");
            assert!(format!("{err:#}").contains("writable by others"), "{mode:o}: {err:#}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("readable by others is fine: the sockets are root's");
        let link = tmp.join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        assert!(format!("{:#}", private_dir(&link).expect_err("symlink")).contains("not a directory"));
        let file = tmp.join("file");
        std::fs::write(&file, b"").expect("file");
        assert!(private_dir(&file).is_err());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn who_may_serve_the_status_socket() {
        assert!(trusted_server(0, 1000));
        assert!(trusted_server(1000, 1000));
        assert!(!trusted_server(65534, 1000));
        assert!(!trusted_server(65534, 0));
        assert_eq!(parse_euid("Name:\tnp\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n"), Some(0));
        assert_eq!(parse_euid("Uid:\t1000\n"), None);
        assert_eq!(parse_euid(""), None);
    }

    #[test]
    fn status_socket_names_stay_in_the_run_directory() {
        let p = status_socket_path("np0").expect("np0");
        assert_eq!(p.parent(), Some(Path::new(RUN_DIR)));
        assert!(p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("np0.")));
        for bad in ["../etc", "a/b", "", ".."] {
            assert!(status_socket_path(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod route_tests {
    use super::vet_route;

    #[test]
    fn advertised_routes_are_vetted() {
        let subnet = Some("100.80.0.0/16".parse().expect("subnet"));
        assert!(vet_route("192.168.1.0/24", subnet).is_ok());
        assert!(vet_route("fd00:1::/64", subnet).is_ok());
        for bad in [
            "0.0.0.0/0",
            "10.0.0.0/7",
            "::/0",
            "127.0.0.0/16",
            "224.0.0.0/8",
            "100.80.5.0/24",
            "100.0.0.0/8",
            "ff02::/16",
            "not a prefix",
        ] {
            assert!(vet_route(bad, subnet).is_err(), "{bad} accepted");
        }
    }
}
