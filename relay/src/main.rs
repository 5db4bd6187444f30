//! `np-relay`: pairs the client's and the device's outbound connections of one session and
//! forwards the end-to-end encrypted bytes between them, unread.

use anyhow::{Context, Result};
use clap::Parser;
use np_identity::home::Home;
use np_identity::Name;
use np_relay::{ControlDirectory, Relay, RelayConfig, RelayInfo, RELAY_RECORD};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How a paired session's bytes cross the relay (`--forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Forwarding {
    /// `splice(2)` through a kernel pipe: the bytes never enter user space.
    Splice,
    /// Read into a user-space buffer and write out.
    Copy,
}

/// How long start-up waits for the control plane before serving without it.
const STARTUP_WAIT: Duration = Duration::from_secs(5);
/// How often the relay re-publishes its address record (it is also its sign of life).
const REPUBLISH_EVERY: Duration = np_relay::record::REFRESH;

/// The np relay: the client and the device daemon each connect here (outbound), authenticate for
/// a session with their identity keys, and are paired; the relay then forwards their end-to-end
/// encrypted bytes without being able to read them.
///
/// The relay is an enrolled identity like any other (`np keys new @relay ...`): it looks up the
/// keys of whoever connects on the control plane, with its own keys from the home directory.
#[derive(Parser)]
#[command(version, about, long_about, args_override_self = true)]
struct Cli {
    /// Config file (TOML: top-level keys are the long flags, e.g. `listen = "0.0.0.0:7444"`);
    /// flags given on the command line win [default: /etc/np/relay.toml if it exists].
    #[arg(long, value_name = "FILE", env = "NP_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// The relay's identity (enrolled in the home directory); default: the only identity there.
    #[arg(long = "as", value_name = "@NAME", env = "NP_AS")]
    identity: Option<Name>,
    /// Address of the one listening port for all sessions.
    #[arg(long, value_name = "ADDR", env = "NP_RELAY_LISTEN", default_value = "0.0.0.0:7444")]
    listen: SocketAddr,
    /// Where clients and devices reach this relay, HOST:PORT (repeatable, in order of
    /// preference). Published in a record signed with the relay's key: devices dial a relay only
    /// at these addresses. Required when listening on a wildcard address; otherwise defaults to
    /// the listening address.
    #[arg(long, value_name = "HOST:PORT", env = "NP_RELAY_ADVERTISE", value_delimiter = ',')]
    advertise: Vec<String>,
    /// A region label published with the addresses (e.g. `eu`), for choosing among relays
    /// (`np relays` shows it): letters, digits, `-`, `_` and `.`, at most 32.
    #[arg(long, value_name = "LABEL", env = "NP_RELAY_REGION")]
    region: Option<String>,
    /// Home directory holding the relay's keys and control-plane address [default: ~/.np].
    #[arg(long, value_name = "DIR", env = "NP_HOME")]
    home: Option<PathBuf>,
    /// Only these identities may use the relay (comma-separated); default: any enrolled identity.
    #[arg(long, value_name = "@a,@b,...", value_delimiter = ',', env = "NP_RELAY_ALLOW")]
    allow: Vec<Name>,
    /// Connections still authenticating at once, at most; more are refused at once.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::default().max_preauth)]
    max_preauth: usize,
    /// Time a connection has, from accept, to authenticate for a session.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    auth_timeout: Duration,
    /// Time the first side of a session waits for the second before it is refused.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pairing_timeout: Duration,
    /// A paired session with no byte either way for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Sessions (waiting or paired) on the relay at once, at most.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::default().max_sessions)]
    max_sessions: usize,
    /// Sessions (waiting or paired) one identity may take part in at once, at most.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::default().max_sessions_per_identity)]
    max_sessions_per_identity: usize,
    /// Bytes buffered per direction of a paired session (memory per session is twice this).
    #[arg(long, value_name = "BYTES", default_value_t = RelayConfig::default().forward_buffer)]
    forward_buffer: usize,
    /// How paired sessions' bytes cross the relay: `splice` moves them socket -> kernel pipe ->
    /// socket without entering user space (Linux; falls back to `copy` where a pipe cannot be
    /// made); `copy` reads them into a user-space buffer and writes them out.
    #[arg(long, value_name = "HOW", value_enum, default_value_t = Forwarding::Splice, env = "NP_RELAY_FORWARD")]
    forward: Forwarding,
    /// Same as `--forward splice` (the default since it measured faster on the whole path).
    #[arg(long, hide = true)]
    zero_copy: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9444); off if not given.
    #[arg(long, value_name = "ADDR", env = "NP_RELAY_METRICS")]
    metrics: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = match np_cmd::parse_with_config::<Cli>(std::path::Path::new("/etc/np/relay.toml")) {
        Ok(c) => c,
        Err(code) => return code,
    };
    np_cmd::init_logs("info");
    np_cmd::run_main(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let home = Home::resolve(cli.home.as_deref());
    let me = home
        .pick_identity(cli.identity.as_ref())
        .with_context(|| format!("choosing the relay's identity in {}", home.dir().display()))?;
    let control = home.load_control(&me).with_context(|| {
        format!("reading the control plane of {me} in {} (run `np keys new` first)", home.dir().display())
    })?;
    for a in &cli.advertise {
        if !np_relay::record::valid_address(a) {
            anyhow::bail!("--advertise {a:?} is not HOST:PORT");
        }
    }
    if let Some(r) = cli.region.as_deref().filter(|r| !np_relay::record::valid_region(r)) {
        anyhow::bail!("--region {r:?} is not a region label (letters, digits, '-', '_' and '.', at most 32)");
    }
    if cli.advertise.is_empty() && cli.listen.ip().is_unspecified() {
        anyhow::bail!(
            "listening on {} (every address): say where clients and devices reach this relay with --advertise HOST:PORT (e.g. --advertise relay.example:{})",
            cli.listen,
            cli.listen.port()
        );
    }
    let keys =
        home.load_keys(&me).with_context(|| format!("loading the keys of {me} from {}", home.dir().display()))?;
    let directory = ControlDirectory::connect(&home, &me)
        .with_context(|| format!("loading the keys of {me} from {}", home.dir().display()))?;
    let config = RelayConfig {
        name: me.clone(),
        allow: (!cli.allow.is_empty()).then_some(cli.allow),
        max_preauth: cli.max_preauth,
        auth_deadline: cli.auth_timeout,
        pairing_deadline: cli.pairing_timeout,
        idle_timeout: cli.idle_timeout,
        max_sessions_per_identity: cli.max_sessions_per_identity,
        max_sessions: cli.max_sessions,
        forward_buffer: cli.forward_buffer.max(4096),
        zero_copy: cli.zero_copy || cli.forward == Forwarding::Splice,
        keys: Some(Arc::new(keys)),
        ..RelayConfig::default()
    };
    // Give the control plane a moment, so the banner says whether it answered; the relay serves
    // either way and keeps trying in the background.
    let reached = directory.wait_connected(STARTUP_WAIT).await;
    let directory = Arc::new(directory);
    let relay = Relay::bind(cli.listen, config.clone(), directory.clone())
        .await
        .with_context(|| format!("listening on {}", cli.listen))?;
    let addr = relay.local_addr().context("reading the listening address")?;
    let info = RelayInfo {
        addresses: if cli.advertise.is_empty() { vec![addr.to_string()] } else { cli.advertise.clone() },
        region: cli.region.clone(),
    };
    // Published before the banner when the control plane answered, so that a relay that says
    // it is running can be found.
    // Whether the record is held present on the control connection yet.
    let mut held = false;
    let published = reached && publish_once(&directory, &info, STARTUP_WAIT, &mut held).await;
    tokio::spawn(publish_record(directory, info.clone(), published, held));
    let metrics = match cli.metrics {
        Some(m) => Some(
            np_metrics::http::bind_and_serve(m, relay.metrics())
                .await
                .with_context(|| format!("listening for metrics on {m}"))?,
        ),
        None => None,
    };
    print_banner(&config, addr, &control.address, reached, &home, &info);
    if let Some(m) = metrics {
        println!("Metrics at http://{m}/metrics.");
    }
    relay
        .run(async {
            np_cmd::shutdown_signal().await;
            tracing::info!("signal received, shutting down");
        })
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

/// What an operator needs to know and check, on standard output.
fn print_banner(config: &RelayConfig, addr: SocketAddr, control: &str, reached: bool, home: &Home, info: &RelayInfo) {
    let allow = match &config.allow {
        None => "any enrolled identity".to_string(),
        Some(list) => list.iter().map(Name::to_string).collect::<Vec<_>>().join(", "),
    };
    let d = |t: Duration| humantime::format_duration(t).to_string();
    println!("np-relay is running");
    println!("  identity       {}", config.name);
    println!("  listening on   {addr}");
    let state = if reached { "connected" } else { "not reachable yet, retrying in the background" };
    println!("  control plane  {control} ({state})");
    println!("  home           {}", home.dir().display());
    println!("  allow          {allow}");
    println!(
        "  limits         {} sessions, {} per identity, {} authenticating",
        config.max_sessions, config.max_sessions_per_identity, config.max_preauth
    );
    println!(
        "  timeouts       auth {}, pairing {}, idle {}",
        d(config.auth_deadline),
        d(config.pairing_deadline),
        d(config.idle_timeout)
    );
    println!(
        "  forwarding     {} KiB per direction, {}",
        config.forward_buffer / 1024,
        if config.zero_copy { "splice(2)" } else { "user-space copy" }
    );
    println!("  advertised at  {}", info.addresses.join(", "));
    println!(
        "Clients and devices use this relay as {name}. Devices trust it once the control plane's operator lists it (`np-control relay add {name}`) or their npd names it (`npd --relay {name}`).",
        name = config.name
    );
}

/// Publishes the relay's address record, signed with its key and readable by every identity,
/// and refreshes it: devices and clients dial the relay only at these addresses, and its signed
/// timestamp says the relay is up.
async fn publish_record(directory: Arc<ControlDirectory>, info: RelayInfo, mut published: bool, mut held: bool) {
    loop {
        // Quick retries until the first success, then a refresh now and then.
        tokio::time::sleep(if published { REPUBLISH_EVERY } else { Duration::from_secs(2) }).await;
        published = publish_once(&directory, &info, REPUBLISH_EVERY, &mut held).await;
    }
}

async fn publish_once(directory: &ControlDirectory, info: &RelayInfo, wait: Duration, held: &mut bool) -> bool {
    match directory.client_within(wait).await {
        Some(client) => match client.publish(RELAY_RECORD, info.encode(), Vec::new()).await {
            Ok(()) => {
                tracing::info!(addresses = ?info.addresses, region = ?info.region, "relay record published");
                // Held while the relay is connected (and again after every reconnection): when
                // the relay stops, the control plane marks it gone at once, and `np relays`
                // says so without waiting for the record to go stale.
                if !*held {
                    match client.hold(RELAY_RECORD).await {
                        Ok(()) => *held = true,
                        Err(e) => {
                            *held = matches!(e, np_control_client::ClientError::Protocol(_));
                            tracing::warn!(error = %e, "could not hold the relay record present; readers go by its age");
                        }
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the relay record; will retry");
                false
            }
        },
        None => {
            tracing::warn!("control plane not reached yet: the relay record is not published");
            false
        }
    }
}
