//! What every np binary does at start and stop: read its config file under its flags, set up
//! logs, run on a tokio runtime turning errors into an exit code, and wait for SIGINT/SIGTERM.

use std::process::ExitCode;

/// Parses the command line of `C` with its config file merged in (see `np_config`): `--config`
/// if given, else `default` if it exists. On a bad config file, prints why and returns the exit
/// code to use.
pub fn parse_with_config<C: clap::Parser>(default: &std::path::Path) -> Result<C, ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match np_config::merged_args(&C::command(), args, Some(default)) {
        Ok(a) => Ok(C::parse_from(a)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// Installs the log subscriber: `RUST_LOG` if set, else `default` (e.g. "warn" for the client,
/// "info" for daemons), on standard error so standard output stays for results.
pub fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `fut` on a multi-threaded runtime and turns its result into an exit code, printing the
/// whole error chain.
pub fn run_main(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is first polled: `np up`
/// says "ready" before its loop polls it, and a SIGTERM in between used to find the default
/// action (the process killed, its interface left to the kernel, a failed exit status; seen in
/// CI under load). Must be called within a tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}
