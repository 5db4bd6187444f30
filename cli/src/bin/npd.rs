//! `npd`: the np device daemon.

use anyhow::Result;
use clap::Parser;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_tunnel::{DaemonConfig, PermitOpen};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// npd: lets permitted identities reach this device's TCP services through np, with no inbound
/// port open. It connects out to the control plane, publishes this device's info and a
/// heartbeat to its managers, and for each permitted session request joins the client at the
/// relay and dials only the permitted targets.
#[derive(Parser)]
#[command(version, about, long_about = None, args_override_self = true)]
struct Cli {
    /// Config file (TOML; keys are the long flags, e.g. `manager = ["@alice"]`); flags given on
    /// the command line win [default: /etc/np/npd.toml if it exists].
    #[arg(long, env = "NPD_CONFIG")]
    config: Option<PathBuf>,
    /// The device identity this daemon runs as, e.g. @alice_device [default: the only one in the home].
    #[arg(long = "as", env = "NPD_AS")]
    me: Option<Name>,
    /// This device's name, unique within its identity (e.g. pi4, reached as pi4@alice_device).
    #[arg(long, env = "NPD_DEVICE")]
    device: String,
    /// An identity allowed to connect (repeatable).
    #[arg(long = "manager")]
    managers: Vec<Name>,
    /// A policy identity to ask whether others may connect, and to what.
    #[arg(long)]
    policy: Option<Name>,
    /// Targets this daemon will dial: comma-separated host:port, *:port, host:* or *:*, a port
    /// also a range LO-HI; TCP unless prefixed udp/ (e.g. `localhost:22,udp/localhost:60000-61000`).
    #[arg(long, default_value = "localhost:22")]
    permit_open: String,
    /// A LAN prefix behind this device that clients may route to it (repeatable, e.g.
    /// 192.168.1.0/24). Only an offer: a client uses it once its user accepts this device's
    /// routes (`np up --accept-routes`), and --permit-open still decides which hosts and ports
    /// behind it this daemon dials.
    #[arg(long = "advertise-route", value_name = "PREFIX")]
    advertise_routes: Vec<String>,
    /// A relay this device trusts, by identity (repeatable, e.g. --relay @relay). The device
    /// joins sessions only at these relays, dialled at the address each publishes in a record
    /// signed with its own key, and checks at join that the relay proves that identity
    /// [default: the relays the control plane's operator lists (`np-control relay add`)].
    #[arg(long = "relay", value_name = "@NAME")]
    relays: Vec<Name>,
    /// Sessions one requester may hold with this device at once; further requests are refused
    /// until one ends.
    #[arg(long, default_value_t = 16)]
    max_sessions_per_requester: usize,
    /// An identity besides the managers that may see this device in `np devices` (repeatable).
    /// Without managers or this, the device's record is readable by its own identity only.
    #[arg(long = "share-with", value_name = "@NAME")]
    share_with: Vec<Name>,
    /// Home directory with the identity's keys [default: ~/.np].
    #[arg(long, env = "NP_HOME")]
    home: Option<PathBuf>,
    /// Seconds between heartbeats.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Send a session keepalive after this long without traffic; a session silent for three
    /// intervals is ended.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// A UDP association with no datagram either way for this long ends (its socket closes).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    udp_idle: Duration,
    /// How long a session whose relay connection broke waits for its client to resume it; its
    /// flows (and the services' connections) stay open meanwhile. 0 turns resumption off
    /// [at most 24h].
    #[arg(long, env = "NP_RESUME_WINDOW", default_value = "10m", value_parser = np_cli::parse_resume_window)]
    resume_window: Duration,
}

fn main() -> ExitCode {
    let cli = match np_cli::parse_with_config::<Cli>(Some(std::path::Path::new("/etc/np/npd.toml"))) {
        Ok(c) => c,
        Err(code) => return code,
    };
    np_cli::init_logs("info");
    np_cli::run_main(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    if !DeviceRef::valid_device_name(&cli.device) {
        anyhow::bail!("invalid device name {:?}: use 1-55 of a-z, 0-9, _ and -", cli.device);
    }
    if cli.managers.is_empty() && cli.policy.is_none() {
        anyhow::bail!("nobody could connect: give at least one --manager @NAME or a --policy @NAME");
    }
    let permit = PermitOpen::parse_list(&cli.permit_open).map_err(|e| anyhow::anyhow!("--permit-open: {e}"))?;
    for r in &cli.advertise_routes {
        r.parse::<np_netstack::Prefix>().map_err(|e| anyhow::anyhow!("--advertise-route {r}: {e}"))?;
        // Published all the same: it is only an offer, and clients vet it the same way.
        if let Err(e) = np_cli::up::vet_route(r, None) {
            tracing::warn!("--advertise-route {r}: clients will not use it: {e}");
        }
    }
    let home = Home::resolve(cli.home.as_deref());
    let (ctl, incoming) = np_cli::connect_control_retrying(&home, cli.me.as_ref()).await?;
    let mut cfg = DaemonConfig::new(&cli.device);
    cfg.managers = cli.managers;
    cfg.policy = cli.policy;
    cfg.permit = permit;
    cfg.relays = (!cli.relays.is_empty()).then_some(cli.relays);
    cfg.max_sessions_per_requester = cli.max_sessions_per_requester.max(1);
    cfg.share_with = cli.share_with;
    cfg.heartbeat = cli.heartbeat;
    cfg.mux = np_cli::with_resume(np_cli::mux_config(cli.keepalive, cli.udp_idle), cli.resume_window);
    {
        // Published (or withdrawn, when empty) on every start, for the same readers as the
        // device's info.
        let (ctl, device, readers) = (ctl.clone(), cfg.device.clone(), cfg.readers(ctl.me()));
        let routes = cli.advertise_routes.clone();
        tokio::spawn(async move { np_tunnel::routes::publish(&ctl, &device, &routes, readers).await });
    }
    let relays = match &cfg.relays {
        Some(list) => list.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
        None => "the control plane's list".to_string(),
    };
    eprintln!(
        "npd: {}@{} ready; managers {}; permit-open {}; relays {relays}",
        cfg.device,
        ctl.me().bare(),
        cfg.managers.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
        cfg.permit
    );
    tokio::select! {
        _ = np_tunnel::daemon::run(ctl, incoming, cfg) => Ok(()),
        _ = np_cli::shutdown_signal() => Ok(()),
    }
}
