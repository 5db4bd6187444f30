//! Shared pieces of the `np` and `npd` command-line programs.

use std::process::ExitCode;

pub use np_cmd::{init_logs, run_main, shutdown_signal};

pub mod devices;
pub mod dns;
pub mod doctor;
pub mod end_sessions;
pub mod forward;
pub mod relays;
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

/// Session settings for a keepalive interval: a ping after `keepalive` of silence, and the
/// session declared dead after three intervals without hearing anything.
/// The relay to use: the one named, else the first the control plane's operator lists.
pub async fn pick_relay(ctl: &ControlClient, named: Option<Name>) -> anyhow::Result<Name> {
    if let Some(r) = named {
        return Ok(r);
    }
    let list = ctl.relays().await.map_err(|e| anyhow::anyhow!("asking the control plane for its relays: {e}"))?;
    list.into_iter().next().ok_or_else(|| {
        anyhow::anyhow!(
            "no relay: name one with --relay @NAME, or ask the control plane's operator to list one (`np-control relay add @NAME`)"
        )
    })
}

/// Where to find relays: their signed records, or for `relay`, the address the user gave.
pub fn relay_book(relay: &Name, address: Option<String>) -> np_tunnel::relays::RelayBook {
    match address {
        Some(a) => np_tunnel::relays::RelayBook::with_override(relay.clone(), vec![a]),
        None => np_tunnel::relays::RelayBook::default(),
    }
}

pub fn mux_config(keepalive: std::time::Duration) -> np_session::MuxConfig {
    np_session::MuxConfig { keepalive_interval: keepalive, idle_timeout: keepalive * 3, ..Default::default() }
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
