//! `np-control`: the np control plane.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use np_control::{AdminRequest, ControlServer, ServerConfig};
use np_identity::Name;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The np control plane: enrols identities, publishes their signed public records, and carries
/// end-to-end encrypted notifications between them. It never holds a private key and never
/// sees a message's plaintext.
#[derive(Parser)]
#[command(version, about, long_about = None, args_override_self = true)]
struct Cli {
    /// Config file (TOML: a `[serve]` table whose keys are the long flags); flags given on the
    /// command line win [default: /etc/np/control.toml if it exists].
    #[arg(long, global = true, env = "NP_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane (creates its database and TLS certificate on first start).
    Serve {
        /// Address to listen on.
        #[arg(long, env = "NP_CONTROL_LISTEN", default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Data directory: database, certificate, admin socket [default: ~/.np-control].
        #[arg(long, env = "NP_CONTROL_DATA")]
        data: Option<PathBuf>,
        /// Address to give out in directory lookups, if not the listen address (e.g. a public name).
        #[arg(long)]
        public_address: Option<String>,
        /// Time a new connection has to finish TLS and authenticate.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        auth_timeout: Duration,
        /// Unauthenticated connections allowed at once; more are closed at once.
        #[arg(long, default_value_t = 512)]
        max_preauth: usize,
        /// Longest a notification waits for an absent recipient.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        max_ttl: Duration,
        /// How often expired notifications are deleted.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        sweep_interval: Duration,
        /// Most notifications one sender may have waiting for one recipient; more are refused
        /// (to that sender only), so nobody can fill another identity's queue for everyone.
        #[arg(long, default_value_t = np_control::store::MAX_QUEUED_PER_SENDER)]
        max_queued_per_sender: u32,
        /// Most notifications waiting for one recipient in all (a sender with only a few waiting
        /// is still accepted beyond it).
        #[arg(long, default_value_t = np_control::store::MAX_QUEUED_PER_RECIPIENT)]
        max_queued_per_recipient: u32,
        /// Where identities, records and queued notifications live: `redb` (a file in the data
        /// directory) or a PostgreSQL URL, `postgres://USER@HOST:PORT/DB`, that several nodes may
        /// share. A password belongs in control.toml (`store = "…"`) or the environment, not
        /// on the command line.
        #[arg(long, env = "NP_CONTROL_STORE", default_value = "redb", value_name = "redb|URL")]
        store: String,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9443); off if not given.
        #[arg(long, value_name = "ADDR", env = "NP_CONTROL_METRICS")]
        metrics: Option<SocketAddr>,
    },
    /// Print a one-time enrolment code for a new identity (only the code, on standard output).
    ///
    /// Works while the server runs (through its admin socket) or when it is stopped.
    Enroll {
        /// The identity to enrol, e.g. @alice or @alice_device.
        name: Name,
        /// The server's data directory [default: ~/.np-control].
        #[arg(long, env = "NP_CONTROL_DATA")]
        data: Option<PathBuf>,
        /// How long the code stays valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The store, when the server is stopped and it is not the redb file in the data
        /// directory: the server's `--store` URL.
        #[arg(long, env = "NP_CONTROL_STORE", value_name = "redb|URL")]
        store: Option<String>,
    },
    /// Revoke an identity: its key, records and queued messages are deleted, its connections
    /// closed, and it can no longer authenticate (so it starts no new session). Its live sessions
    /// end when a manager tells the device (`np end-sessions`).
    Revoke {
        /// The identity to revoke.
        name: Name,
        /// The server's data directory [default: ~/.np-control].
        #[arg(long, env = "NP_CONTROL_DATA")]
        data: Option<PathBuf>,
        /// The store, when the server is stopped and it is not the redb file in the data
        /// directory: the server's `--store` URL.
        #[arg(long, env = "NP_CONTROL_STORE", value_name = "redb|URL")]
        store: Option<String>,
    },
    /// The relays devices trust by default: a device whose `npd` names no `--relay` accepts
    /// sessions only through relays on this list, dialled at the address each relay publishes
    /// in a record signed with its own key.
    Relay {
        #[command(subcommand)]
        op: RelayOp,
        /// The server's data directory [default: ~/.np-control].
        #[arg(long, env = "NP_CONTROL_DATA", global = true)]
        data: Option<PathBuf>,
        /// The store, when the server is stopped and it is not the redb file in the data
        /// directory: the server's `--store` URL.
        #[arg(long, env = "NP_CONTROL_STORE", value_name = "redb|URL", global = true)]
        store: Option<String>,
    },
}

#[derive(Subcommand)]
enum RelayOp {
    /// Add a relay (an enrolled identity, e.g. @relay) to the list.
    Add { name: Name },
    /// Remove a relay from the list; devices stop accepting new sessions through it.
    Remove { name: Name },
    /// Print the list, one relay per line.
    List,
}

fn default_data(d: Option<PathBuf>) -> PathBuf {
    d.unwrap_or_else(|| {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".np-control")
    })
}

fn main() -> ExitCode {
    let cli = match np_cmd::parse_with_config::<Cli>(std::path::Path::new("/etc/np/control.toml")) {
        Ok(c) => c,
        Err(code) => return code,
    };
    np_cmd::init_logs("info");
    np_cmd::run_main(run(cli.cmd))
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve {
            listen,
            data,
            public_address,
            auth_timeout,
            max_preauth,
            max_ttl,
            sweep_interval,
            max_queued_per_sender,
            max_queued_per_recipient,
            store,
            metrics,
        } => {
            let data = default_data(data);
            let mut cfg = ServerConfig::new(listen, data.clone());
            cfg.public_address = public_address;
            cfg.auth_timeout = auth_timeout;
            cfg.max_preauth = max_preauth;
            cfg.max_ttl = max_ttl;
            cfg.sweep_interval = sweep_interval;
            cfg.store = Some(store);
            cfg.quota =
                np_control::store::Quota { per_sender: max_queued_per_sender, per_recipient: max_queued_per_recipient };
            let server = ControlServer::start(cfg).await.context("starting the control plane")?;
            let metrics = match metrics {
                Some(m) => Some(
                    np_metrics::http::bind_and_serve(m, server.metrics())
                        .await
                        .with_context(|| format!("listening for metrics on {m}"))?,
                ),
                None => None,
            };
            let addr = server.local_addr();
            let port = addr.port();
            println!("np-control is running");
            println!("  listening on   {addr}");
            println!("  data           {}", data.display());
            println!("  store          {}", server.store());
            println!("  certificate    sha256:{}", server.fingerprint());
            if let Some(m) = metrics {
                println!("  metrics        http://{m}/metrics");
            }
            println!("To add an identity, run on this machine:");
            println!("  np-control enroll @NAME --data {}", data.display());
            println!("and give the printed code to its owner, who runs on their machine:");
            println!("  np keys new @NAME --control THIS_HOST:{port} --code CODE");
            tokio::select! {
                r = server.run() => r,
                _ = np_cmd::shutdown_signal() => {
                    tracing::info!("shutting down");
                    Ok(())
                }
            }
        }
        Cmd::Revoke { name, data, store } => {
            let data = default_data(data);
            np_control::revoke(&data, store.as_deref(), &name).await.with_context(|| format!("revoking {name}"))?;
            eprintln!("revoked {name}");
            Ok(())
        }
        Cmd::Relay { op, data, store } => {
            let data = default_data(data);
            let (req, what) = match op {
                RelayOp::Add { name } => {
                    (AdminRequest::RelayAdd { name: name.clone() }, format!("adding relay {name}"))
                }
                RelayOp::Remove { name } => {
                    (AdminRequest::RelayRemove { name: name.clone() }, format!("removing relay {name}"))
                }
                RelayOp::List => (AdminRequest::RelayList, "listing relays".to_string()),
            };
            let list = np_control::relays(&data, store.as_deref(), req).await.context(what)?;
            for r in &list {
                println!("{r}");
            }
            if list.is_empty() {
                eprintln!("no relays listed: devices without `npd --relay` accept no session (add one with `np-control relay add @NAME`)");
            }
            Ok(())
        }
        Cmd::Enroll { name, data, ttl, store } => {
            let data = default_data(data);
            let code = np_control::issue_code(&data, store.as_deref(), &name, ttl)
                .await
                .with_context(|| format!("issuing a code for {name}"))?;
            println!("{code}");
            eprintln!("one-time code for {name}, valid {}; on its machine run:", humantime::format_duration(ttl));
            eprintln!("  np keys new {name} --control HOST:PORT --code {code}");
            Ok(())
        }
    }
}
