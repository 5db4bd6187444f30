//! `np`: the np client.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use np_control_client::ControlClient;
use np_control_proto::EnrolCode;
use np_identity::home::Home;
use np_identity::Name;
use std::path::PathBuf;
use std::process::ExitCode;

/// np: reach the TCP services of your devices (ssh above all) from anywhere, with no inbound
/// port open on any device or client.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Home directory with this machine's identities and keys [default: ~/.np].
    #[arg(long, global = true, env = "NP_HOME")]
    home: Option<PathBuf>,
    /// Print each step with its elapsed time.
    #[arg(short, long, global = true)]
    verbose: bool,
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
        /// The control plane, HOST:PORT.
        #[arg(long, env = "NP_CONTROL")]
        control: String,
        /// The one-time enrolment code printed by `np-control enroll`.
        #[arg(long, env = "NP_ENROL_CODE", hide_env_values = true)]
        code: String,
    },
    /// List the identities in the home directory with their key fingerprints.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    np_cli::init_logs(if cli.verbose { "info" } else { "warn" });
    np_cli::run_main(run(cli))
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
    }
}
