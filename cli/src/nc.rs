//! `np nc DEVICE PORT`: one flow to a device, carried over standard input and output: what
//! `ssh -o ProxyCommand='np nc %h %p'` needs. With a running `np up`, the flow goes over its
//! session (through its root-only local socket, [`crate::local_flows`]); without one, `np nc`
//! sets up a session of its own.

use crate::local_flows::{self, Answer};
use np_identity::{DeviceRef, Name};
use np_tunnel::{Connector, Refusal, Router, SessionSlot, SetupError, SlotError};
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A device as `np nc` takes it: `pi4@alice_device`, `pi4.alice_device.np` (the name `np up`
/// serves), or a virtual address `np up` gave out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Ref(DeviceRef),
    Address(Ipv4Addr),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<Ipv4Addr>() {
            return Ok(DeviceArg::Address(a));
        }
        let lower = s.to_ascii_lowercase();
        let text = match lower.strip_suffix(".np").or_else(|| lower.strip_suffix(".np.")) {
            // NAME.ID.np: the device name has no dot, so the first dot splits it from the ID.
            Some(dotted) => dotted.split_once('.').map(|(d, id)| format!("{d}@{id}")).unwrap_or_default(),
            None => lower,
        };
        text.parse().map(DeviceArg::Ref).map_err(|_| {
            format!("{s:?} is not a device: write NAME@ID (pi4@alice_device), NAME.ID.np, or an address np up gave out")
        })
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Ref(d) => d.fmt(f),
            DeviceArg::Address(a) => a.fmt(f),
        }
    }
}

/// Why `np nc` failed: each kind has its own exit code, so scripts (and the user reading
/// ssh's "kex_exchange_identification: Connection closed") can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum NcError {
    /// The device (or its policy) refused the flow.
    #[error("refused: {0}")]
    Refused(String),
    /// No such device.
    #[error("unknown device: {0}")]
    UnknownDevice(String),
    /// The device did not answer: npd is not running or not connected.
    #[error("device offline: {0}")]
    Offline(String),
    /// No relay (or control plane) could be reached.
    #[error("relay unreachable: {0}")]
    RelayUnreachable(String),
    /// Anything else (keys, the local terminal, a broken session).
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl NcError {
    /// The exit code: 1 for anything else, 2 is clap's for usage.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            NcError::Other(_) => 1,
            NcError::Refused(_) => 3,
            NcError::UnknownDevice(_) => 4,
            NcError::Offline(_) => 5,
            NcError::RelayUnreachable(_) => 6,
        })
    }
}

/// Sorts a failed session setup into the kinds the user can act on.
fn classify_setup(device: &str, e: SetupError) -> NcError {
    match e {
        SetupError::Refused { refusal: Refusal::UnknownDevice { .. }, .. } => {
            NcError::UnknownDevice(format!("{device}: {e}"))
        }
        SetupError::Refused { refusal: Refusal::CannotReachRelay { .. }, .. } => {
            NcError::RelayUnreachable(e.to_string())
        }
        SetupError::Refused { .. } => NcError::Refused(e.to_string()),
        SetupError::Timeout { .. } => NcError::Offline(e.to_string()),
        SetupError::Relay(_) | SetupError::Choose(_) => NcError::RelayUnreachable(format!("{device}: {e}")),
        SetupError::Control(np_control_client::ClientError::Refused {
            code: np_control_proto::ErrorCode::UnknownIdentity,
            ..
        }) => NcError::UnknownDevice(format!("{device}: {e}")),
        SetupError::Control(ref c) if matches!(c, np_control_client::ClientError::Connect { .. }) => {
            NcError::RelayUnreachable(e.to_string())
        }
        e => NcError::Other(anyhow::Error::new(e).context(format!("setting up a session to {device}"))),
    }
}

fn classify_slot(e: SlotError) -> NcError {
    match e {
        SlotError::Refused { .. } => NcError::Refused(e.to_string()),
        SlotError::Setup { device, source, .. } => classify_setup(&device, source),
        e @ SlotError::Session { .. } => NcError::Other(e.into()),
    }
}

/// What `np nc` needs to set up a session of its own.
pub struct NcOptions {
    pub home: np_identity::home::Home,
    pub me: Option<Name>,
    pub relay: Option<Name>,
    pub timeout: Duration,
    pub keepalive: Duration,
    pub verbose: bool,
}

/// The flow's target on the device's side: `HOST:PORT` (an IPv6 host bracketed).
pub fn target(to_host: Option<&str>, port: u16) -> String {
    match to_host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{port}"),
        Some(h) => format!("{h}:{port}"),
        None => format!("localhost:{port}"),
    }
}

/// Carries one flow to `device`'s `port` (or `to_host:port` on its side) over stdin/stdout until
/// both directions have ended.
pub async fn run(device: DeviceArg, port: u16, to_host: Option<String>, opts: NcOptions) -> Result<(), NcError> {
    let target = target(to_host.as_deref(), port);
    // np up can only reach the device's own ports (its TUN flows dial the device's localhost);
    // a --to-host flow needs a session that names that target.
    if to_host.is_none() {
        // Our identity, if the home directory says which: np up lends only its own sessions.
        let me = opts.home.pick_identity(opts.me.as_ref()).ok();
        match local_flows::open(&device, port, me.as_ref(), opts.timeout).await {
            Some(Answer::Open(stream)) => {
                tracing::info!(%device, port, "through np up's session");
                return carry_local(stream).await;
            }
            Some(Answer::Refused(why)) => {
                // np up only sees a refused connection; our own request brings back the
                // device's reason.
                tracing::info!(%device, port, why, "refused through np up; asking the device why");
            }
            Some(Answer::Failed(why)) => return Err(NcError::Offline(format!("{device} (through np up): {why}"))),
            Some(Answer::Unknown) | None => {}
        }
    }
    let device = match device {
        DeviceArg::Ref(d) => d,
        DeviceArg::Address(a) => {
            return Err(NcError::UnknownDevice(format!(
                "{a} is not an address a running np up gave out (only root can ask np up; name the device as NAME@ID to reach it without np up)"
            )))
        }
    };
    let (ctl, incoming) =
        crate::connect_control(&opts.home, opts.me.as_ref()).await.map_err(|e| match e
            .downcast_ref::<np_control_client::ClientError>()
        {
            Some(np_control_client::ClientError::Connect { .. } | np_control_client::ClientError::Timeout(_)) => {
                NcError::RelayUnreachable(format!("{e:#}"))
            }
            _ => NcError::Other(e),
        })?;
    let (router, _requests) = Router::start(incoming);
    let relays = crate::relay_book(opts.relay.as_ref(), None);
    let choice = crate::relay_choice(opts.relay, opts.verbose);
    let connector = Connector {
        ctl: ctl.clone(),
        router,
        timeout: opts.timeout,
        mux: crate::mux_config(opts.keepalive, np_session::MuxConfig::default().udp_idle_timeout),
        relays,
        choice,
    };
    let slot = SessionSlot::new(connector, device.clone(), vec![target.clone()], opts.verbose);
    // Whether the device is gone is known at once from its heartbeat: no need to wait out the
    // timeout for it (a device that does not share its info with us is simply waited for).
    let gone = async {
        match crate::devices::fetch(&ctl).await {
            Ok(all) => match all.iter().find(|d| d.identity == device.identity && d.info.device == device.device) {
                Some(d) if !d.live => NcError::Offline(format!(
                    "{device} is offline: its last heartbeat was {}s ago (npd there is not running or not connected)",
                    d.age_ms / 1000
                )),
                _ => std::future::pending().await,
            },
            Err(_) => std::future::pending().await,
        }
    };
    let flow = tokio::select! {
        r = slot.open(&target) => r.map_err(classify_slot)?,
        e = gone => return Err(e),
    };
    let (stdio, ended) = stdio().map_err(NcError::Other)?;
    tokio::select! {
        r = flow.carry(stdio) => r.map(|_| ()).map_err(|e| NcError::Other(anyhow::Error::new(e).context("carrying the flow"))),
        () = ended.notified() => Ok(()),
    }
}

/// Carries the flow np up opened for us.
async fn carry_local(mut stream: tokio::net::UnixStream) -> Result<(), NcError> {
    let (mut stdio, ended) = stdio().map_err(NcError::Other)?;
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut stdio, &mut stream) => r
            .map(|_| ())
            .map_err(|e| NcError::Other(anyhow::Error::new(e).context("carrying the flow through np up"))),
        () = ended.notified() => Ok(()),
    }
}

/// Standard input and output as one stream. Pipes (what ssh gives a ProxyCommand) are read and
/// written as non-blocking fds on the runtime's reactor; anything else (a file, a terminal)
/// through the blocking pool.
///
/// Shutting the stream down (the device ended the flow, and all of it is written) closes
/// standard output and fires the returned `Notify`: np nc then exits, as nc does when the
/// network side closes, whether or not its standard input has ended. The end of standard input
/// is passed on as a half-close, and np nc waits for the device's end.
pub type Stdio = tokio::io::Join<Box<dyn AsyncRead + Unpin + Send>, StdoutWriter>;

pub fn stdio() -> anyhow::Result<(Stdio, std::sync::Arc<tokio::sync::Notify>)> {
    use anyhow::Context;
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: fds 0 and 1 belong to the process, and are taken exactly once, here: nothing else
    // in np nc reads standard input or writes standard output (logs go to standard error).
    #[allow(unsafe_code)]
    let (fd0, fd1) = unsafe { (OwnedFd::from_raw_fd(0), OwnedFd::from_raw_fd(1)) };
    let input: Box<dyn AsyncRead + Unpin + Send> = match is_fifo(0) {
        true => Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(fd0).context("standard input")?),
        false => Box::new(tokio::fs::File::from_std(std::fs::File::from(fd0))),
    };
    // Non-blocking mode belongs to the open pipe, not to our fd: when standard error is the
    // same pipe (`2>&1 | ...`), it would turn non-blocking too, and a message could be lost.
    let output: Box<dyn AsyncWrite + Unpin + Send> = match is_fifo(1) && fd_ino(1) != fd_ino(2) {
        true => Box::new(tokio::net::unix::pipe::Sender::from_owned_fd(fd1).context("standard output")?),
        false => Box::new(tokio::fs::File::from_std(std::fs::File::from(fd1))),
    };
    let ended = std::sync::Arc::new(tokio::sync::Notify::new());
    Ok((tokio::io::join(input, StdoutWriter { out: Some(output), ended: ended.clone() }), ended))
}

/// Whether fd `n` of this process is a pipe (through /proc, which follows it to the pipe).
fn is_fifo(n: u8) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(format!("/proc/self/fd/{n}")).is_ok_and(|m| m.file_type().is_fifo())
}

/// The inode behind fd `n` (its pipe, for a pipe).
fn fd_ino(n: u8) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{n}")).ok().map(|m| m.ino())
}

/// Standard output, closed (dropped) on shutdown, which `ended` is told of.
pub struct StdoutWriter {
    out: Option<Box<dyn AsyncWrite + Unpin + Send>>,
    ended: std::sync::Arc<tokio::sync::Notify>,
}

impl AsyncWrite for StdoutWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.out.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.out.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(w) = self.out.as_mut() {
            std::task::ready!(std::pin::Pin::new(w).poll_shutdown(cx))?;
        }
        self.out = None;
        // A stored permit: whoever waits later still sees it.
        self.ended.notify_one();
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_forms() {
        let pi4: DeviceRef = "pi4@alice_device".parse().expect("ref");
        assert_eq!("pi4@alice_device".parse::<DeviceArg>(), Ok(DeviceArg::Ref(pi4.clone())));
        assert_eq!("pi4.alice_device.np".parse::<DeviceArg>(), Ok(DeviceArg::Ref(pi4.clone())));
        assert_eq!("PI4.Alice_Device.NP".parse::<DeviceArg>(), Ok(DeviceArg::Ref(pi4.clone())));
        assert_eq!("pi4.alice_device.np.".parse::<DeviceArg>(), Ok(DeviceArg::Ref(pi4)));
        assert_eq!("100.80.0.2".parse::<DeviceArg>(), Ok(DeviceArg::Address(Ipv4Addr::new(100, 80, 0, 2))));
        for bad in ["", "pi4", "pi4.np", "a.b.c.np", "x@", "@alice", "pi4@alice_device.np", "host.example.com"] {
            assert!(bad.parse::<DeviceArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn targets() {
        assert_eq!(target(None, 22), "localhost:22");
        assert_eq!(target(Some("db.lan"), 5432), "db.lan:5432");
        assert_eq!(target(Some("fd00::1"), 443), "[fd00::1]:443");
        assert_eq!(target(Some("[fd00::1]"), 443), "[fd00::1]:443");
    }
}
