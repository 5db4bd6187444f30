//! `np up`: a TUN interface where each device has a virtual address; every TCP flow to it (or to
//! a routed prefix) is carried through that device's session.

use crate::forward::SessionSlot;
use anyhow::{Context, Result};
use np_identity::DeviceRef;
use np_netstack::{
    AddressMap, BoxFuture, DeviceKey, FlowTarget, Netstack, NetstackConfig, OpenRefused, Opener, Prefix, RefuseKind,
};
use np_session::{FlowStream, OpenError};
use np_tunnel::Connector;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
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

/// Opens each flow through its device's session, setting the session up on first use and again
/// after it breaks.
struct SessionOpener {
    slots: HashMap<String, Arc<SessionSlot>>,
}

impl Opener for SessionOpener {
    type Stream = FlowStream;

    fn open(&self, to: FlowTarget) -> BoxFuture<'static, Result<FlowStream, OpenRefused>> {
        let slot = self.slots.get(&to.device.0).cloned();
        Box::pin(async move {
            let unreachable = |reason: String| OpenRefused { kind: RefuseKind::Unreachable, reason };
            let slot = slot.ok_or_else(|| unreachable(format!("no device {}", to.device)))?;
            for attempt in 0..2 {
                let session = slot.get(Some(&to.target)).await.map_err(|e| unreachable(format!("{e:#}")))?;
                match session.open(&to.target).await {
                    Ok(f) => return Ok(f),
                    Err(OpenError::Refused(reason)) => {
                        tracing::info!(device = %to.device, target = %to.target, %reason, "flow refused");
                        return Err(OpenRefused { kind: RefuseKind::Refused, reason });
                    }
                    Err(OpenError::Session(e)) if attempt == 0 && e.is_stale() => {
                        tracing::info!(device = %to.device, error = %e, "session broke; setting up a new one");
                        slot.reset().await;
                    }
                    Err(OpenError::Session(e)) => return Err(unreachable(e.to_string())),
                }
            }
            Err(unreachable("no session".into()))
        })
    }
}

/// What `np up` was asked for.
pub struct UpOptions {
    pub relay: np_identity::Name,
    pub devices: Vec<DeviceSpec>,
    pub routes: Vec<RouteSpec>,
    pub subnet: Prefix,
    pub name: String,
    pub eager: bool,
    pub verbose: bool,
}

/// Brings the interface up and serves until `shutdown`; everything it created is gone when it
/// returns.
pub async fn run(connector: Connector, opts: UpOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let started = Instant::now();
    let mut map = AddressMap::new(opts.subnet).map_err(|e| anyhow::anyhow!("--subnet {}: {e}", opts.subnet))?;
    // Given addresses first, so automatic ones never take them.
    let mut devices = opts.devices.clone();
    devices.sort_by_key(|d| d.addr.is_none());
    let mut slots = HashMap::new();
    let mut names: Vec<(String, Ipv4Addr, DeviceRef)> = Vec::new();
    for spec in devices.iter().chain(
        opts.routes.iter().map(|r| DeviceSpec { device: r.device.clone(), addr: None }).collect::<Vec<_>>().iter(),
    ) {
        let key = spec.device.to_string();
        if slots.contains_key(&key) {
            continue;
        }
        let addr =
            map.add_device(DeviceKey(key.clone()), spec.addr).map_err(|e| anyhow::anyhow!("{}: {e}", spec.device))?;
        names.push((dns_name(&spec.device), addr, spec.device.clone()));
        let slot =
            SessionSlot::new(connector.clone(), spec.device.clone(), opts.relay.clone(), Vec::new(), opts.verbose);
        slots.insert(key, Arc::new(slot));
    }
    for r in &opts.routes {
        map.add_route(r.prefix, DeviceKey(r.device.to_string()))
            .map_err(|e| anyhow::anyhow!("--route {}: {e}", r.prefix))?;
    }
    let iface_addr = map.interface_addr();
    let config = NetstackConfig { name: opts.name.clone(), map: map.clone(), ..NetstackConfig::default() };
    let netstack = Netstack::new(config).with_context(|| format!("bringing up interface {}", opts.name))?;
    println!("up {} {}/{}", opts.name, iface_addr, opts.subnet.prefix_len());
    for (dns, addr, d) in &names {
        println!("  {addr:<15} {d}  ({dns})");
    }
    for r in &opts.routes {
        println!("  {:<15} via {}", r.prefix.to_string(), r.device);
    }

    // The resolver for NAME.ID.np on the interface's own address.
    let table: HashMap<String, Ipv4Addr> = names.iter().map(|(n, a, _)| (n.to_ascii_lowercase(), *a)).collect();
    match tokio::net::UdpSocket::bind((iface_addr, 53)).await {
        Ok(sock) => {
            tokio::spawn(crate::dns::serve(sock, move |n| table.get(n).copied()));
            wire_resolved(&opts.name, iface_addr).await;
        }
        Err(e) => tracing::warn!(error = %e, "no DNS for .np names (cannot bind {iface_addr}:53)"),
    }

    let slots = Arc::new(slots);
    if opts.eager {
        for s in slots.values() {
            let s = s.clone();
            tokio::spawn(async move {
                if let Err(e) = s.get(None).await {
                    tracing::warn!("{e:#}");
                }
            });
        }
    }
    let status = netstack.status();
    let listener = status_listener(&opts.name)?;
    let st_slots = slots.clone();
    let name = opts.name.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let text = match status.snapshot().await {
                Some(st) => render_status(&name, &st, &st_slots, started).await,
                None => "stopping\n".into(),
            };
            let _ = s.write_all(text.as_bytes()).await;
        }
    });
    println!("ready");
    let opener = SessionOpener { slots: slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect() };
    netstack.serve(opener, shutdown).await.context("serving the interface")?;
    Ok(())
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

/// The status socket: abstract (per network namespace, gone with the process, nothing to clean
/// up after a crash).
fn status_socket_name(iface: &str) -> String {
    format!("np-status-{iface}")
}

fn status_listener(iface: &str) -> Result<tokio::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(status_socket_name(iface))?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)
        .with_context(|| format!("another `np up` already serves {iface} in this network namespace"))?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// `np status`: asks the running `np up` for interface `iface`.
pub async fn status(iface: &str) -> Result<String> {
    use std::os::linux::net::SocketAddrExt;
    use tokio::io::AsyncReadExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(status_socket_name(iface))?;
    let s = std::os::unix::net::UnixStream::connect_addr(&addr)
        .with_context(|| format!("no `np up` is running for {iface} (start one with `np up --device NAME@ID ...`)"))?;
    s.set_nonblocking(true)?;
    let mut s = tokio::net::UnixStream::from_std(s)?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn render_status(
    iface: &str,
    st: &np_netstack::Status,
    slots: &HashMap<String, Arc<SessionSlot>>,
    started: Instant,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interface {iface}  {}/{}  up {}s",
        st.interface_addr,
        st.subnet.prefix_len(),
        started.elapsed().as_secs()
    );
    let _ = writeln!(o, "{:<15} {:<32} {:<24} FLOWS", "ADDRESS", "DEVICE", "SESSION");
    for (key, addr) in &st.devices {
        let session = match slots.get(&key.0) {
            Some(s) => s.describe().await,
            None => "-".into(),
        };
        let flows = st.flows.get(key).copied().unwrap_or(0);
        let _ = writeln!(o, "{:<15} {:<32} {:<24} {flows}", addr.to_string(), key.0, session);
    }
    for (p, d) in &st.routes {
        let _ = writeln!(o, "route {p} via {d}");
    }
    let _ = writeln!(o, "stack: {:?}", st.stats);
    o
}
