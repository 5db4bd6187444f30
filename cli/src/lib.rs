//! Shared pieces of the `np` and `npd` command-line programs.

use std::process::ExitCode;

pub use np_cmd::{init_logs, run_main, shutdown_signal};

pub mod devices;
pub mod dns;
pub mod doctor;
pub mod end_sessions;
pub mod forward;
pub mod forward_udp;
pub mod local_flows;
pub mod nc;
pub mod relays;
pub mod ssh;
pub mod up;

/// Parses the command line of `C` with its config file merged in (see `np_config`). The
/// default file is `default`, or for `np` the home directory's `config.toml`. On a bad config
/// file, prints why and returns the exit code to use.
pub fn parse_with_config<C: clap::Parser>(default: Option<&std::path::Path>) -> Result<C, ExitCode> {
    let home_default = np_identity::home::Home::resolve(None).dir().join("config.toml");
    np_cmd::parse_with_config(default.unwrap_or(&home_default))
}

use anyhow::Context;
use np_control_client::{ControlClient, Incoming};
use np_identity::home::Home;
use np_identity::Name;

/// Connects to the control plane as `who` (or the only identity in `home`).
pub async fn connect_control(home: &Home, who: Option<&Name>) -> anyhow::Result<(ControlClient, Incoming)> {
    let me = home.pick_identity(who)?;
    ControlClient::connect(home, &me).await.with_context(|| format!("connecting to the control plane as {me}"))
}

/// Connects, retrying with backoff while the control plane is unreachable (for daemons, which
/// should come up whatever the order of start).
pub async fn connect_control_retrying(home: &Home, who: Option<&Name>) -> anyhow::Result<(ControlClient, Incoming)> {
    let me = home.pick_identity(who)?;
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match ControlClient::connect(home, &me).await {
            Ok(x) => return Ok(x),
            Err(e @ (np_control_client::ClientError::Identity(_) | np_control_client::ClientError::Refused { .. })) => {
                return Err(e).with_context(|| format!("connecting to the control plane as {me}"));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "control plane unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// Which relay sessions go through: `named` (`--relay @NAME`) always, or else the best one
/// each device trusts among the operator's, by round trip ([`np_tunnel::choose`]).
pub fn relay_choice(named: Option<Name>, verbose: bool) -> std::sync::Arc<np_tunnel::choose::RelayChooser> {
    std::sync::Arc::new(match named {
        Some(r) => np_tunnel::choose::RelayChooser::pinned(r),
        None => np_tunnel::choose::RelayChooser::automatic(verbose),
    })
}

/// Where to find relays: their signed records, or for `relay`, the address the user gave.
pub fn relay_book(relay: Option<&Name>, address: Option<String>) -> np_tunnel::relays::RelayBook {
    match (relay, address) {
        (Some(relay), Some(a)) => np_tunnel::relays::RelayBook::with_override(relay.clone(), vec![a]),
        _ => np_tunnel::relays::RelayBook::default(),
    }
}

pub fn mux_config(keepalive: std::time::Duration, udp_idle: std::time::Duration) -> np_session::MuxConfig {
    np_session::MuxConfig {
        keepalive_interval: keepalive,
        idle_timeout: keepalive * 3,
        udp_idle_timeout: udp_idle,
        ..Default::default()
    }
}

/// The longest `--resume-window`: a day. A suspended session holds its flows' state and up to
/// its retain limit of records, so a window is bounded like every other wait.
pub const MAX_RESUME_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Parses `--resume-window` (a duration, at most [`MAX_RESUME_WINDOW`]; 0 for none).
pub fn parse_resume_window(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > MAX_RESUME_WINDOW {
        return Err(format!("at most {}", humantime::format_duration(MAX_RESUME_WINDOW)));
    }
    Ok(d)
}

/// `mux` with sessions resuming for `window` after their transport breaks (none for 0).
pub fn with_resume(mux: np_session::MuxConfig, window: std::time::Duration) -> np_session::MuxConfig {
    let resume = (!window.is_zero()).then(|| np_session::ResumeConfig { window, ..Default::default() });
    np_session::MuxConfig { resume, ..mux }
}

/// Makes large allocations (TCP socket buffers of `np up`, 1 MiB each) always come straight
/// from mmap. glibc otherwise raises its mmap threshold after the first such buffer is freed and
/// then serves later ones from the heap, zero-filled by hand: every half-open flow of a SYN flood
/// then cost its full buffers in resident memory (measured: 558 MiB after 40,000 spoofed SYNs),
/// and the heap never shrank. Fresh mmap pages are mapped only when data arrives.
#[allow(unsafe_code)]
pub fn large_allocations_from_mmap() {
    // SAFETY: mallopt only changes allocator tuning; called at start, before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
