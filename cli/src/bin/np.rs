//! `np`: the np client.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use np_cli::forward::LocalForward;
use np_cli::nc::DeviceArg;
use np_cli::up::{DeviceSpec, RouteSpec, UpOptions};
use np_control_client::ControlClient;
use np_control_proto::EnrolCode;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_tunnel::{Connector, Router, SessionSlot};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// np: reach the TCP services of your devices (ssh above all) from anywhere, with no inbound
/// port open on any device or client.
#[derive(Parser)]
#[command(version, about, long_about = None, args_override_self = true)]
struct Cli {
    /// Config file (TOML: top-level keys are global flags, a table per subcommand such as
    /// `[forward]` holds its flags); flags given on the command line win
    /// [default: HOME/config.toml if it exists].
    #[arg(long, global = true, env = "NP_CONFIG")]
    config: Option<PathBuf>,
    /// Home directory with this machine's identities and keys [default: ~/.np].
    #[arg(long, global = true, env = "NP_HOME")]
    home: Option<PathBuf>,
    /// Print each step with its elapsed time.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Send a keepalive after this long without traffic; a session silent for three intervals
    /// is declared dead and set up again on the next flow.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// A UDP association (`np up`, `np forward -U`) with no datagram either way for this long
    /// ends; the next datagram opens a new one.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    udp_idle: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage this machine's identities.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Forward local ports to services on a device, through one encrypted session (no root needed).
    ///
    /// Example: `np forward --to pi4@alice_device -L 2222:localhost:22`,
    /// then `ssh -p 2222 pi@127.0.0.1`.
    Forward {
        /// Your identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// The device, NAME@ID (e.g. pi4@alice_device).
        #[arg(long)]
        to: DeviceRef,
        /// Pins the relay both sides meet at, by identity (e.g. @relay); it is dialled at the
        /// address it publishes itself, and the device must trust it [default: of the relays the
        /// control plane's operator lists and the device trusts, the one with the shortest round
        /// trip from here (an authenticated probe, 1 s deadline, remeasured every minute); one
        /// that cannot be reached is skipped, and a session that fails at one moves to the next;
        /// -v says which was chosen and why].
        #[arg(long, env = "NP_RELAY", value_name = "@NAME")]
        relay: Option<Name>,
        /// Dial the relay at HOST:PORT instead of the address it publishes (e.g. through a port
        /// forward); it must still prove its identity there. Needs --relay.
        #[arg(long, value_name = "HOST:PORT", requires = "relay", value_parser = np_relay_proto::record::parse_address)]
        relay_address: Option<String>,
        /// A forward, [BIND:]PORT:HOST:PORT; HOST:PORT is dialled on the device's side. Repeatable.
        #[arg(short = 'L', required_unless_present = "udp_forwards")]
        forwards: Vec<LocalForward>,
        /// A UDP forward, [BIND:]PORT:HOST:PORT: datagrams to the local port go to HOST:PORT from
        /// the device (which must permit `udp/HOST:PORT`), answers come back to their sender.
        /// Repeatable.
        #[arg(short = 'U')]
        udp_forwards: Vec<LocalForward>,
        /// How long to wait for the device to answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// How long a session whose relay connection broke (relay restart, network change,
        /// sleep) waits to resume; its flows stall meanwhile, and reset after it. 0 turns
        /// resumption off [at most 24h].
        #[arg(long, env = "NP_RESUME_WINDOW", default_value = "10m", value_parser = np_cli::parse_resume_window)]
        resume_window: Duration,
    },
    /// Bring up a virtual interface where each device has an address: `ssh pi@100.80.0.2` just works.
    ///
    /// Every TCP flow to a device's address (any port) is carried, encrypted, through one session
    /// to that device, which dials its own `localhost:PORT`; flows to a `--route` prefix go to that
    /// host on the device's side. The device's permit-open decides what is reachable; anything
    /// else is refused as a real network would. Needs CAP_NET_ADMIN (root). Runs until SIGINT or
    /// SIGTERM and removes everything it created.
    Up {
        /// Your identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// Pins the relay both sides meet at, by identity (e.g. @relay); it is dialled at the
        /// address it publishes itself, and the devices must trust it [default: of the relays the
        /// control plane's operator lists and the device trusts, the one with the shortest round
        /// trip from here (an authenticated probe, 1 s deadline, remeasured every minute); one
        /// that cannot be reached is skipped, and a session that fails at one moves to the next;
        /// -v says which was chosen and why].
        #[arg(long, env = "NP_RELAY", value_name = "@NAME")]
        relay: Option<Name>,
        /// Dial the relay at HOST:PORT instead of the address it publishes (e.g. through a port
        /// forward); it must still prove its identity there. Needs --relay.
        #[arg(long, value_name = "HOST:PORT", requires = "relay", value_parser = np_relay_proto::record::parse_address)]
        relay_address: Option<String>,
        /// A device, NAME@ID, optionally with its address: pi4@alice_device=100.80.0.5. Repeatable.
        /// With none, every device that shares its info with you (as `np devices` lists them,
        /// followed while np up runs: new ones are added within seconds, removed ones dropped),
        /// each at an address derived from its name, the same on every start.
        #[arg(long = "device")]
        devices: Vec<DeviceSpec>,
        /// A prefix on a device's side, PREFIX=NAME@ID (e.g. 192.168.1.0/24=pi4@alice_device). Repeatable.
        #[arg(long = "route")]
        routes: Vec<RouteSpec>,
        /// The subnet device addresses come from; the interface takes its first address.
        #[arg(long, default_value = "100.80.0.0/16")]
        subnet: np_netstack::Prefix,
        /// The IPv6 prefix (/96 or shorter) of the devices' IPv6 addresses: each device's is the
        /// prefix with its IPv4 address in the last 32 bits (fd6e:7000::100.80.0.2), so the two
        /// always name the same device and both stay the same on every start. The default is a
        /// unique local prefix (RFC 4193, never routed beyond a site) fixed for every host, so a
        /// device's IPv6 address is the same everywhere; choose another if your network uses it.
        #[arg(long, default_value = "fd6e:7000::/96")]
        subnet6: np_netstack::Prefix,
        /// Interface name.
        #[arg(long, default_value = "np0")]
        name: String,
        /// Set up each device's session at start instead of on its first flow.
        #[arg(long)]
        eager: bool,
        /// Route the LAN prefixes the devices advertise (`npd --advertise-route`) to them.
        /// Without it they are listed, not used. Each is vetted first: none broader than a /8
        /// (IPv6: /16), none over loopback, multicast or the np subnet, and none over a prefix
        /// already routed (a --route, or another device's); those are skipped with a warning.
        /// The choice is remembered in the home directory: later runs accept them too, until
        /// --no-accept-routes.
        #[arg(long, conflicts_with = "no_accept_routes")]
        accept_routes: bool,
        /// Stop using advertised routes (and forget an earlier --accept-routes).
        #[arg(long)]
        no_accept_routes: bool,
        /// How long to wait for a device to answer a session request.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Show a running `np up`: its interface, devices, sessions and flows, and the packets it
    /// dropped because another host sent them. Runs as root, like `np up`: the status socket is
    /// in /run/np (mode 0700), and only a root-owned server is believed.
    Status {
        /// Interface name.
        #[arg(long, default_value = "np0")]
        name: String,
    },
    /// Tell a device you manage to end every live session of an identity (e.g. after
    /// `np-control revoke` stopped it from starting new ones).
    EndSessions {
        /// Your identity (a manager of the device) [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// The device, NAME@ID.
        #[arg(long)]
        to: DeviceRef,
        /// Whose sessions to end.
        #[arg(long)]
        of: Name,
    },
    /// List the devices that share their info with you, live or gone.
    Devices {
        /// Your identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
    },
    /// List the relays the control plane's operator lists: whether each is up, its region, the
    /// round trip to it from here, and which of your devices trust it.
    ///
    /// STATE is `up` while the relay is connected to the control plane and its signed record is
    /// fresh (it republishes it every minute), `gone` once its connection closed or its record is
    /// three minutes old. RTT is the time to complete the relay's authenticated join challenge
    /// from here (the relay protocol has no ping): TCP connect, its challenge, our signed join
    /// for a throwaway session, and its signed proof that it holds the relay's key, checked here;
    /// so it is about two round trips plus the relay's check of our key. A relay that does not
    /// answer within --timeout shows as `unreachable`, with the reason below the table. A relay
    /// whose record does not verify against its key is `skipped`: never trusted, never dialled.
    /// TRUSTED BY names the devices (of those that share their info with you) that would join a
    /// session there.
    Relays {
        /// Your identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// How long each relay has to answer the probe.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Check this setup piece by piece and say what to fix: keys, control plane (reachable,
    /// certificate pin, authentication), relay, and a device (live, permit-open).
    ///
    /// Prints `ok` or `FAIL` per check; exits non-zero if any failed.
    Doctor {
        /// Your identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// A relay to check, by identity (e.g. @relay): its signed record, and whether it answers
        /// there and proves its identity.
        #[arg(long, env = "NP_RELAY", value_name = "@NAME")]
        relay: Option<Name>,
        /// A device to check, NAME@ID.
        #[arg(long)]
        device: Option<DeviceRef>,
    },
    /// Carry one flow to a device's port over standard input and output: the ProxyCommand for
    /// ssh (`np ssh-config` writes it). No root and no TUN needed.
    ///
    /// With a running `np up` (and as root, like np up), the flow goes over np up's session;
    /// otherwise np nc sets up its own (ssh's ControlMaster then shares one np nc among many ssh
    /// commands). Standard output carries only the flow's bytes; messages go to standard error.
    /// Exit codes: 3 refused (with the device's reason), 4 unknown device, 5 device offline,
    /// 6 relay (or control plane) unreachable, 1 anything else.
    #[command(visible_alias = "connect")]
    Nc {
        /// The device: NAME@ID (pi4@alice_device), NAME.ID.np (pi4.alice_device.np), or an
        /// address np up gave out (100.80.0.2; needs np up running, and root).
        device: DeviceArg,
        /// The port on the device (or on --to-host).
        port: u16,
        /// A host on the device's side to reach instead of the device itself (its permit-open
        /// must allow HOST:PORT).
        #[arg(long, value_name = "HOST")]
        to_host: Option<String>,
        #[command(flatten)]
        who: NcIdentity,
        /// How long to wait for the device to answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run the system's ssh to a device through np: `np ssh pi@pi4@alice_device`, or
    /// `np ssh pi4@alice_device -- uname -a`.
    ///
    /// Adds `-o ProxyCommand=np nc %h %p` and `-o HostKeyAlias=NAME.ID.np` (the device's key is
    /// known under its name, not under an address); every argument after the destination
    /// (`-L`, `-R`, `-A`, `-t`, a command) goes to ssh unchanged.
    Ssh {
        #[command(flatten)]
        who: NcIdentity,
        /// The ssh program.
        #[arg(long, env = "NP_SSH", default_value = "ssh")]
        ssh: std::ffi::OsString,
        /// [USER@]DEVICE, the device as np nc takes it (USER@NAME@ID, USER@NAME.ID.np, ...).
        destination: String,
        /// Arguments for ssh.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print a `Host *.np` block for ~/.ssh/config: `np ssh-config >> ~/.ssh/config`, then
    /// `ssh pi@pi4.alice_device.np`, scp, rsync and git just work.
    SshConfig {
        #[command(flatten)]
        who: NcIdentity,
    },
    /// Run a policy service that devices started with `npd --policy @P` ask.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
}

/// Who `np nc` connects as and through which relay; `np ssh` and `np ssh-config` write them
/// into the ProxyCommand.
#[derive(clap::Args)]
struct NcIdentity {
    /// Your identity [default: the only one in the home directory].
    #[arg(long = "as")]
    me: Option<Name>,
    /// Pins the relay both sides meet at, by identity (e.g. @relay) [default: the best one the
    /// device trusts, as for np forward].
    #[arg(long, env = "NP_RELAY", value_name = "@NAME")]
    relay: Option<Name>,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Answer policy queries from devices using the rules in a TOML file.
    Serve {
        /// The policy identity [default: the only one in the home directory].
        #[arg(long = "as")]
        me: Option<Name>,
        /// The rules: `[[rule]]` tables with `identities`, `devices` and `permit` lists.
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create keys for an identity and enrol them with the control plane.
    ///
    /// The private keys are created here and never leave this machine; only the public halves
    /// are sent. The code (from `np-control enroll @NAME` on the server) also pins the server's
    /// certificate, so no certificate file needs copying.
    New {
        /// The identity, e.g. @alice or @alice_device.
        name: Name,
        /// The control plane, HOST:PORT ([V6]:PORT for an IPv6 address), or its nodes
        /// comma-separated (a:7443,b:7443): one is picked at random, the next on losing it.
        #[arg(long, env = "NP_CONTROL", value_parser = np_relay_proto::record::parse_address_list)]
        control: String,
        /// The one-time enrolment code printed by `np-control enroll`.
        #[arg(long, env = "NP_ENROL_CODE", hide_env_values = true)]
        code: String,
    },
    /// List the identities in the home directory with their key fingerprints.
    List,
}

fn main() -> ExitCode {
    np_cli::large_allocations_from_mmap();
    let cli = match np_cli::parse_with_config::<Cli>(None) {
        Ok(c) => c,
        Err(code) => return code,
    };
    np_cli::init_logs(if cli.verbose { "info" } else { "warn" });
    if let Cmd::Nc { .. } = cli.cmd {
        return nc_main(cli);
    }
    np_cli::run_main(run(cli))
}

/// `np nc`: its own exit code per kind of failure, with a one-line reason on stderr.
fn nc_main(cli: Cli) -> ExitCode {
    let Cmd::Nc { device, port, to_host, who, timeout } = cli.cmd else {
        return ExitCode::FAILURE;
    };
    let opts = np_cli::nc::NcOptions {
        home: Home::resolve(cli.home.as_deref()),
        me: who.me,
        relay: who.relay,
        timeout,
        keepalive: cli.keepalive,
        verbose: cli.verbose,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("np nc: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(np_cli::nc::run(device, port, to_host, opts));
    // A read of a terminal left in the blocking pool must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("np nc: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = Home::resolve(cli.home.as_deref());
    match cli.cmd {
        Cmd::Keys { cmd: KeysCmd::New { name, control, code } } => {
            let code: EnrolCode = code.parse()?;
            eprintln!("creating keys for {name} in {} and enrolling with {control} …", home.dir().display());
            let keys = ControlClient::enroll(&home, &name, &control, &code)
                .await
                .with_context(|| format!("enrolling {name} with {control}"))?;
            println!("enrolled {name} (keys {})", keys.fingerprint());
            println!("control plane {control} pinned (sha256:{}…)", &code.cert_hex()[..16]);
            Ok(())
        }
        Cmd::Keys { cmd: KeysCmd::List } => {
            let ids = home.identities();
            if ids.is_empty() {
                println!(
                    "no identities in {}; create one with `np keys new @NAME --control HOST:PORT --code CODE`",
                    home.dir().display()
                );
            }
            for n in ids {
                let keys = home.load_keys(&n)?;
                let control = home.load_control(&n).map(|c| c.address).unwrap_or_else(|_| "(not enrolled)".into());
                println!("{n}\tkeys {}\tcontrol {control}", keys.public().fingerprint());
            }
            Ok(())
        }
        Cmd::Forward { me, to, relay, relay_address, forwards, udp_forwards, timeout, resume_window } => {
            let t0 = std::time::Instant::now();
            let (ctl, incoming) = np_cli::connect_control(&home, me.as_ref()).await?;
            if cli.verbose {
                eprintln!(
                    "{:>9.1} ms  authenticated to the control plane as {}",
                    t0.elapsed().as_secs_f64() * 1e3,
                    ctl.me()
                );
            }
            let (router, _requests) = Router::start(incoming);
            let relays = np_cli::relay_book(relay.as_ref(), relay_address);
            let choice = np_cli::relay_choice(relay, cli.verbose);
            let mux = np_cli::with_resume(np_cli::mux_config(cli.keepalive, cli.udp_idle), resume_window);
            let connector = Connector { ctl, router, timeout, mux, relays, choice };
            let tcp = forwards.iter().map(|f| f.target.clone());
            let targets = tcp.chain(udp_forwards.iter().map(|f| format!("udp/{}", f.target))).collect();
            let slot = Arc::new(SessionSlot::new(connector, to, targets, cli.verbose));
            let udp = async {
                match udp_forwards.is_empty() {
                    true => std::future::pending().await,
                    false => np_cli::forward_udp::run(slot.clone(), udp_forwards).await,
                }
            };
            let tcp = async {
                match forwards.is_empty() {
                    true => std::future::pending().await,
                    false => np_cli::forward::run(slot.clone(), forwards).await,
                }
            };
            tokio::select! {
                r = tcp => r,
                r = udp => r,
                _ = np_cli::shutdown_signal() => Ok(()),
            }
        }
        Cmd::Up {
            me,
            relay,
            relay_address,
            devices,
            routes,
            subnet,
            subnet6,
            name,
            eager,
            accept_routes,
            no_accept_routes,
            timeout,
        } => {
            let accept_routes = np_cli::up::remember_accept_routes(home.dir(), accept_routes, no_accept_routes)?;
            let (ctl, incoming) = np_cli::connect_control(&home, me.as_ref()).await?;
            let (router, _requests) = Router::start(incoming);
            let relays = np_cli::relay_book(relay.as_ref(), relay_address);
            let choice = np_cli::relay_choice(relay, cli.verbose);
            let connector = Connector {
                ctl,
                router,
                timeout,
                mux: np_cli::mux_config(cli.keepalive, cli.udp_idle),
                relays,
                choice,
            };
            let opts = UpOptions { devices, routes, subnet, subnet6, name, eager, accept_routes, verbose: cli.verbose };
            np_cli::up::run(connector, opts, np_cli::shutdown_signal()).await
        }
        Cmd::EndSessions { me, to, of } => np_cli::end_sessions::run(&home, me.as_ref(), &to, &of).await,
        Cmd::Status { name } => {
            print!("{}", np_cli::up::status(&name).await?);
            Ok(())
        }
        Cmd::Nc { .. } => anyhow::bail!("np nc runs from main"),
        Cmd::Ssh { who, ssh, destination, args } => {
            let flags = np_cli::ssh::NcFlags { home: cli.home, me: who.me, relay: who.relay };
            let args = np_cli::ssh::ssh_args(&np_cli::ssh::this_np()?, &flags, &destination, &args)
                .map_err(anyhow::Error::msg)?;
            np_cli::ssh::exec_ssh(&ssh, args)
        }
        Cmd::SshConfig { who } => {
            let flags = np_cli::ssh::NcFlags { home: cli.home, me: who.me, relay: who.relay };
            print!("{}", np_cli::ssh::config_block(&np_cli::ssh::this_np()?, &flags));
            Ok(())
        }
        Cmd::Devices { me } => np_cli::devices::run(&home, me.as_ref()).await,
        Cmd::Relays { me, timeout } => np_cli::relays::run(&home, me.as_ref(), timeout).await,
        Cmd::Doctor { me, relay, device } => {
            let opts = np_cli::doctor::DoctorOptions { me, relay, device };
            let report = np_cli::doctor::run(&home, &opts).await;
            match report.failures() {
                0 => Ok(()),
                n => anyhow::bail!("{n} check(s) failed; fix the first FAIL above and run np doctor again"),
            }
        }
        Cmd::Policy { cmd: PolicyCmd::Serve { me, file } } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let policy =
                np_tunnel::policy::PolicyFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (ctl, incoming) = np_cli::connect_control_retrying(&home, me.as_ref()).await?;
            eprintln!(
                "policy service {} running with {} rule(s) from {}",
                ctl.me(),
                policy.rules.len(),
                file.display()
            );
            let (_router, requests) = Router::start(incoming);
            tokio::select! {
                _ = np_tunnel::policy::serve(ctl, requests, policy) => Ok(()),
                _ = np_cli::shutdown_signal() => Ok(()),
            }
        }
    }
}
