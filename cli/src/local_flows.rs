//! `np up`'s local flow socket: `np nc` (run as root, like `np up`) asks a running `np up` for a
//! flow to a device's port and gets it over `np up`'s own session: no new handshake.
//!
//! np up serves the request by connecting, from its own host, to the device's virtual address:
//! the flow enters the interface like any local application's, so the device's permit-open
//! decides it as usual. A client can name only a device np up serves (by name or address) and a
//! port: never an address of its own choosing.
//!
//! Who may ask: the socket lives in the root-only run directory (mode 0700), is itself mode
//! 0600, and np up checks each peer's uid (SO_PEERCRED): root or np up's own user. The client
//! believes only a server owned by root (or itself). A flood of connections is bounded twice:
//! those that have not finished their request share [`MAX_WAITING`] places (the oldest silent
//! one gives way, `np-limits`) and must finish within [`REQUEST_TIMEOUT`]; carried flows are
//! capped at [`MAX_FLOWS`].
//!
//! The protocol is one line each way, then the flow's bytes: `DEVICE PORT [@IDENTITY]\n`,
//! answered by `ok`, `refused REASON`, `failed REASON`, `unknown` or `busy`. A request that names
//! an identity other than np up's is `unknown`: np nc then sets up its own session as that
//! identity rather than borrow another's.

use crate::nc::DeviceArg;
use crate::up::{private_listener, socket_path, trusted_server, SocketFile};
use np_identity::Name;
use np_netstack::StatusHandle;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Connections that have not finished their request line. Real clients send it at once.
pub const MAX_WAITING: usize = 32;
/// Flows carried through the socket at once; more are answered `busy`.
pub const MAX_FLOWS: usize = 512;
/// How long a connection may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request or answer line.
const MAX_LINE: usize = 512;
/// The socket's kind in its file name, `IFACE.NETNS.flows`.
const KIND: &str = "flows";

/// np up's answer to a request.
#[derive(Debug)]
pub enum Answer {
    /// The flow is open: its bytes follow on the stream.
    Open(UnixStream),
    /// The device refused the connection.
    Refused(String),
    /// np up could not reach the device (no session, no answer).
    Failed(String),
    /// np up serves no such device.
    Unknown,
}

/// Binds the flow socket for interface `iface` (in the root-only run directory).
pub fn listener(iface: &str) -> anyhow::Result<(tokio::net::UnixListener, SocketFile)> {
    private_listener(&socket_path(iface, KIND)?)
}

/// Serves flow requests until the netstack stops. `connect_timeout` bounds the wait for the
/// device to accept (np up's --timeout: the session may have to be set up first).
pub async fn serve(listener: tokio::net::UnixListener, status: StatusHandle, me: Name, connect_timeout: Duration) {
    let my_uid = crate::up::effective_uid().unwrap_or(0);
    let waiting = np_limits::PreAuth::new(MAX_WAITING);
    let flows = Arc::new(tokio::sync::Semaphore::new(MAX_FLOWS));
    let mut conn = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, most likely: the next accept may succeed once a flow ends.
                tracing::warn!(error = %e, "accepting on the flow socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if trusted_server(c.uid(), my_uid) => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid(), "flow socket: refused a client that is neither root nor np up's user");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "flow socket: no peer credentials");
                continue;
            }
        }
        conn += 1;
        let (permit, _) = waiting.admit(conn, false);
        let (status, flows, me) = (status.clone(), flows.clone(), me.clone());
        tokio::spawn(async move {
            let req = permit.unless_evicted(tokio::time::timeout(REQUEST_TIMEOUT, read_request(stream))).await;
            drop(permit);
            let Ok(Ok(Ok(Some(Request { stream, device, port, identity })))) = req else { return };
            if identity.is_some_and(|i| i != me) {
                let _ = answer(stream, "unknown").await;
                return;
            }
            let Ok(slot) = flows.try_acquire_owned() else {
                let _ = answer(stream, "busy").await;
                return;
            };
            serve_one(stream, &status, &device, port, connect_timeout).await;
            drop(slot);
        });
    }
}

/// A flow request.
struct Request {
    stream: UnixStream,
    device: String,
    port: u16,
    /// Whose session the client wants, if it said.
    identity: Option<Name>,
}

/// Reads `DEVICE PORT [@IDENTITY]\n`; `None` for anything else.
async fn read_request(stream: UnixStream) -> std::io::Result<Option<Request>> {
    let mut r = BufReader::with_capacity(MAX_LINE, stream);
    let mut line = Vec::new();
    let n = (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line).await?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&line);
    let mut words = text.split_whitespace();
    let (Some(device), Some(port)) = (words.next(), words.next()) else { return Ok(None) };
    let Ok(port) = port.parse::<u16>() else { return Ok(None) };
    let identity = match (words.next().map(str::parse::<Name>), words.next()) {
        (None, None) => None,
        (Some(Ok(n)), None) => Some(n),
        _ => return Ok(None),
    };
    // The client writes nothing more before our answer, so nothing is left in the buffer.
    Ok(Some(Request { stream: r.into_inner(), device: device.to_string(), port, identity }))
}

async fn answer(mut stream: UnixStream, line: &str) -> std::io::Result<UnixStream> {
    let mut line: String = line.chars().filter(|c| *c != '\n').take(MAX_LINE - 1).collect();
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    Ok(stream)
}

/// The address np up serves `device` at: a name or an address it gave out, nothing else.
fn lookup(devices: &[(np_netstack::DeviceKey, Ipv4Addr)], device: &str) -> Option<Ipv4Addr> {
    let wanted: DeviceArg = device.parse().ok()?;
    devices.iter().find_map(|(key, addr)| {
        let matches = match &wanted {
            DeviceArg::Address(a) => a == addr,
            DeviceArg::Ref(d) => key.0 == d.to_string(),
        };
        matches.then_some(*addr)
    })
}

async fn serve_one(stream: UnixStream, status: &StatusHandle, device: &str, port: u16, timeout: Duration) {
    let Some(st) = status.snapshot().await else { return };
    let Some(addr) = lookup(&st.devices, device) else {
        let _ = answer(stream, "unknown").await;
        return;
    };
    // Through the interface, like any application on this host: the device's permit decides.
    let dialled = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(SocketAddr::from((addr, port)))).await;
    let mut tcp = match dialled {
        Ok(Ok(t)) => t,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = answer(stream, &format!("refused {addr}:{port}: connection refused")).await;
            return;
        }
        Ok(Err(e)) => {
            let _ = answer(stream, &format!("failed {addr}:{port}: {e}")).await;
            return;
        }
        Err(_) => {
            let _ = answer(stream, &format!("failed {addr}:{port}: no answer within {}s", timeout.as_secs())).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let Ok(mut stream) = answer(stream, "ok").await else { return };
    tracing::debug!(device, port, "flow socket: carrying a flow");
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        tracing::debug!(device, port, error = %e, "flow socket: flow ended with an error");
    }
}

/// Asks a running np up (of this network namespace) for a flow to `device`'s `port`. `None` when
/// none runs, none can be asked (not root), or none answers sensibly: then np nc sets up a
/// session of its own.
pub async fn open(device: &DeviceArg, port: u16, me: Option<&Name>, timeout: Duration) -> Option<Answer> {
    let my_uid = crate::up::effective_uid().ok()?;
    let mut unknown = false;
    for path in sockets().await {
        let Ok(mut s) = UnixStream::connect(&path).await else { continue };
        // Whoever serves it must be root (or us), whatever the directory says.
        match s.peer_cred() {
            Ok(c) if trusted_server(c.uid(), my_uid) => {}
            _ => continue,
        }
        let req = match me {
            Some(n) => format!("{} {port} {n}\n", request_name(device)),
            None => format!("{} {port}\n", request_name(device)),
        };
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        // np up waits up to its own --timeout for the device; a little more here.
        let line = tokio::time::timeout(timeout + Duration::from_secs(5), read_answer(&mut s)).await;
        let Ok(Ok(line)) = line else { continue };
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match word {
            "ok" => return Some(Answer::Open(s)),
            "refused" => return Some(Answer::Refused(rest.to_string())),
            "failed" => return Some(Answer::Failed(rest.to_string())),
            "unknown" => unknown = true,
            _ => {}
        }
    }
    unknown.then_some(Answer::Unknown)
}

/// How a device is named in a request: `NAME@ID` or the address.
fn request_name(device: &DeviceArg) -> String {
    match device {
        DeviceArg::Ref(d) => d.to_string(),
        DeviceArg::Address(a) => a.to_string(),
    }
}

/// Reads the answer line byte by byte: nothing of the flow that follows it may be consumed.
async fn read_answer(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_LINE {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        line.push(b);
    }
}

/// The flow sockets of this network namespace's np ups (any interface name).
async fn sockets() -> Vec<std::path::PathBuf> {
    let Ok(probe) = socket_path("np0", KIND) else { return Vec::new() };
    let Some(suffix) = probe.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("np0")).map(String::from)
    else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(crate::up::RUN_DIR) else { return Vec::new() };
    let mut found: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&suffix)))
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::dns_name;
    use np_netstack::DeviceKey;

    async fn request(line: &[u8]) -> Option<(String, u16, Option<Name>)> {
        let (mut a, b) = UnixStream::pair().expect("pair");
        a.write_all(line).await.expect("write");
        drop(a);
        read_request(b).await.expect("read").map(|r| (r.device, r.port, r.identity))
    }

    #[tokio::test]
    async fn requests_are_one_short_line() {
        assert_eq!(request(b"pi4@alice_device 22\n").await, Some(("pi4@alice_device".into(), 22, None)));
        let alice: Name = "@alice".parse().expect("name");
        assert_eq!(request(b"100.80.0.2 8080 @alice\n").await, Some(("100.80.0.2".into(), 8080, Some(alice))));
        let long = [b"x".repeat(MAX_LINE * 2), b" 22\n".to_vec()].concat();
        for bad in [
            &b""[..],
            b"pi4@alice_device 22",
            b"pi4 99999\n",
            b"pi4\n",
            b"pi4 22 @alice extra\n",
            b"pi4 22 @Not!\n",
            &long,
        ] {
            assert_eq!(request(bad).await, None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_devices_np_up_serves_are_looked_up() {
        let devices = vec![
            (DeviceKey("pi4@alice_device".into()), Ipv4Addr::new(100, 80, 0, 2)),
            (DeviceKey("nas@alice_device".into()), Ipv4Addr::new(100, 80, 0, 3)),
        ];
        assert_eq!(lookup(&devices, "pi4@alice_device"), Some(Ipv4Addr::new(100, 80, 0, 2)));
        assert_eq!(lookup(&devices, "nas.alice_device.np"), Some(Ipv4Addr::new(100, 80, 0, 3)));
        assert_eq!(lookup(&devices, "100.80.0.3"), Some(Ipv4Addr::new(100, 80, 0, 3)));
        // Anything else, however it is spelt, is not np up's to dial.
        for other in ["100.80.0.1", "127.0.0.1", "198.18.0.3", "pi5@alice_device", "pi4@bob", "", "x y"] {
            assert_eq!(lookup(&devices, other), None, "{other}");
        }
        assert_eq!(dns_name(&"pi4@alice_device".parse().expect("ref")), "pi4.alice_device.np");
    }
}
