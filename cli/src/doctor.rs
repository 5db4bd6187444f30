//! `np doctor`: checks a setup piece by piece (keys, control plane, relay, device) and says
//! what to fix for each piece that is broken.
//!
//! Each check prints one line, `ok` or `FAIL`, and a failing one a second line with what to do.
//! A check that needs an earlier one (authentication needs keys) is printed as `skip` when that
//! one failed, so the first failure is the one to fix.

use crate::devices::{is_live, now_ms};
use np_control_client::{ClientError, ControlClient};
use np_control_proto::ErrorCode;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_relay_proto::ProbeError;
use np_tunnel::DeviceInfo;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio::net::TcpStream;

/// Time each network check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What to check besides the home directory and the control plane.
#[derive(Clone, Debug, Default)]
pub struct DoctorOptions {
    /// The identity to check (default: the only one in the home directory).
    pub me: Option<Name>,
    /// A relay identity to check: its record, reachability and proof of identity.
    pub relay: Option<Name>,
    /// A device to check for liveness and permit-open.
    pub device: Option<DeviceRef>,
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Working; the text says what was found.
    Ok(String),
    /// Broken: what is wrong and what to do.
    Fail { what: String, fix: String },
    /// Not checked, because an earlier check it needs failed.
    Skip(String),
}

/// The checks made so far, printed as they come.
#[derive(Default)]
pub struct Report {
    /// Every verdict, in order.
    pub verdicts: Vec<Verdict>,
}

impl Report {
    fn push(&mut self, v: Verdict) -> bool {
        match &v {
            Verdict::Ok(what) => println!("ok    {what}"),
            Verdict::Fail { what, fix } => {
                println!("FAIL  {what}");
                println!("      -> {fix}");
            }
            Verdict::Skip(what) => println!("skip  {what}"),
        }
        let ok = matches!(v, Verdict::Ok(_));
        self.verdicts.push(v);
        ok
    }

    fn ok(&mut self, what: impl Into<String>) -> bool {
        self.push(Verdict::Ok(what.into()))
    }

    fn fail(&mut self, what: impl Into<String>, fix: impl Into<String>) -> bool {
        self.push(Verdict::Fail { what: what.into(), fix: fix.into() })
    }

    fn skip(&mut self, what: impl Into<String>) {
        self.push(Verdict::Skip(what.into()));
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.verdicts.iter().filter(|v| matches!(v, Verdict::Fail { .. })).count()
    }
}

/// Runs every check that applies and prints each; returns the report.
pub async fn run(home: &Home, opts: &DoctorOptions) -> Report {
    let mut r = Report::default();
    let me = check_keys(&mut r, home, opts.me.as_ref());
    let ctl = match &me {
        Some(me) => match check_control(&mut r, home, me).await {
            Some(ctl) => {
                check_store(&mut r, &ctl).await;
                Some(ctl)
            }
            None => None,
        },
        None => {
            r.skip("control plane (needs the identity's keys)");
            None
        }
    };
    match (&opts.relay, &ctl) {
        (Some(relay), Some(ctl)) => {
            check_relay(&mut r, ctl, relay).await;
        }
        (Some(relay), None) => r.skip(format!("relay {relay} (needs the control plane)")),
        (None, _) => r.skip("relay (give --relay @NAME to check one)"),
    }
    match (&opts.device, &ctl) {
        (Some(device), Some(ctl)) => check_device(&mut r, ctl, device).await,
        (Some(device), None) => r.skip(format!("device {device} (needs the control plane)")),
        (None, _) => r.skip("device (give --device NAME@ID to check one)"),
    }
    r
}

/// The home directory, the identity, its key files (present, mode 0600) and control-plane file.
fn check_keys(r: &mut Report, home: &Home, me: Option<&Name>) -> Option<Name> {
    let dir = home.dir();
    if !dir.is_dir() {
        r.fail(
            format!("home directory {} does not exist", dir.display()),
            "create keys with `np keys new @NAME --control HOST:PORT --code CODE` (or point --home / NP_HOME at your home)",
        );
        return None;
    }
    let me = match home.pick_identity(me) {
        Ok(me) => me,
        Err(e) => {
            r.fail(
                format!("identity in {}: {e}", dir.display()),
                "choose one with --as @NAME, or create one with `np keys new @NAME --control HOST:PORT --code CODE`",
            );
            return None;
        }
    };
    let id_dir = dir.join(me.bare());
    let mut files_ok = true;
    for file in ["signing.key", "x25519.key"] {
        let p = id_dir.join(file);
        match std::fs::metadata(&p) {
            Err(_) => {
                files_ok = r.fail(
                    format!("{me}: private key {} is missing", p.display()),
                    format!("restore it from a backup, or create and enrol new keys for {me} (the operator issues a new code after `np-control revoke {me}`)"),
                ) && files_ok;
            }
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                files_ok = r.fail(
                    format!(
                        "{me}: private key {} has mode {:04o}, not 0600",
                        p.display(),
                        m.permissions().mode() & 0o777
                    ),
                    format!("run `chmod 600 {}` (and check nobody else copied it)", p.display()),
                ) && files_ok;
            }
            Ok(_) => {}
        }
    }
    if !files_ok {
        return None;
    }
    let keys = match home.load_keys(&me) {
        Ok(k) => k,
        Err(e) => {
            r.fail(
                format!("{me}: keys in {} do not load: {e}", id_dir.display()),
                "restore the key files from a backup, or enrol new keys",
            );
            return None;
        }
    };
    r.ok(format!("{me}: keys in {} (mode 0600, fingerprint {})", id_dir.display(), keys.public().fingerprint()));
    Some(me)
}

/// Reachable, pinned certificate, authentication: told apart so the fix is the right one.
async fn check_control(r: &mut Report, home: &Home, me: &Name) -> Option<ControlClient> {
    let cfg = match home.load_control(me) {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                format!("control plane of {me}: {e}"),
                format!("enrol {me} with `np keys new {me} --control HOST:PORT --code CODE`"),
            );
            return None;
        }
    };
    let addr = &cfg.address;
    // Several nodes (`a:7443,b:7443`): reachable if one is (the last failure is shown if none).
    let mut reached = None;
    for node in np_control_client::control_addresses(addr) {
        let r = tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(node)).await;
        let ok = matches!(r, Ok(Ok(_)));
        reached = Some(r);
        if ok {
            break;
        }
    }
    match reached.unwrap_or_else(|| Ok(Err(std::io::Error::other("no address in control.toml")))) {
        Ok(Ok(_)) => {
            r.ok(format!("control plane {addr} reachable"));
        }
        Ok(Err(e)) => {
            r.fail(
                format!("control plane {addr} unreachable: {e}"),
                "check that np-control is running there (`systemctl status np-control`), that the address in control.toml is right, and that no firewall blocks the port",
            );
            r.skip("control-plane certificate pin (needs the control plane)");
            r.skip(format!("authentication as {me} (needs the control plane)"));
            return None;
        }
        Err(_) => {
            r.fail(
                format!("control plane {addr} did not accept a connection within {}s", CHECK_TIMEOUT.as_secs()),
                "check the address in control.toml and any firewall between here and the server",
            );
            r.skip("control-plane certificate pin (needs the control plane)");
            r.skip(format!("authentication as {me} (needs the control plane)"));
            return None;
        }
    }
    let pin = &cfg.cert_sha256[..16.min(cfg.cert_sha256.len())];
    match ControlClient::connect(home, me).await {
        Ok((ctl, _incoming)) => {
            r.ok(format!("control-plane certificate matches the pin (sha256:{pin}…)"));
            r.ok(format!("authenticated as {me}"));
            Some(ctl)
        }
        Err(ClientError::Tls { reason, .. }) => {
            r.fail(
                format!("control-plane certificate does not match the pin sha256:{pin}…: {reason}"),
                format!("if the server's certificate was replaced on purpose, enrol again with a new code (it carries the new pin); otherwise {addr} is not your control plane"),
            );
            r.skip(format!("authentication as {me} (needs a trusted control plane)"));
            None
        }
        Err(ClientError::Refused { code, message }) => {
            r.ok(format!("control-plane certificate matches the pin (sha256:{pin}…)"));
            let fix = match code {
                ErrorCode::UnknownIdentity => format!(
                    "{me} is not enrolled there (revoked, or enrolled elsewhere): ask the operator for a code and run `np keys new {me} --control {addr} --code CODE` in a fresh home"
                ),
                ErrorCode::BadSignature => format!(
                    "the keys here are not the ones enrolled for {me}: restore the right key files, or have {me} revoked and enrolled again"
                ),
                ErrorCode::Internal => "the control plane could not read its store (a database down, or its disk): tell its operator; np-control's log names the cause".to_string(),
                _ => "read the message above; it says what the control plane refused".to_string(),
            };
            r.fail(format!("authentication as {me} refused: {message}"), fix);
            None
        }
        Err(e @ (ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Disconnected)) => {
            r.fail(
                format!("control plane {addr} accepted a connection but did not complete the handshake: {e}"),
                "check that np-control (not another service) listens there, and its log",
            );
            None
        }
        Err(e) => {
            r.fail(
                format!("connecting to the control plane as {me}: {e}"),
                "see the message; fix it and run np doctor again",
            );
            None
        }
    }
}

/// The control plane's store, as the node says (nothing from a node too old to say). Its
/// database down is a failure: the node then refuses everything that reads or writes.
async fn check_store(r: &mut Report, ctl: &ControlClient) {
    match tokio::time::timeout(CHECK_TIMEOUT, ctl.status()).await {
        Ok(Ok(Some(s))) if s.store_answers => {
            r.ok(format!("control-plane store ({}) answers", s.store));
        }
        Ok(Ok(Some(s))) => {
            r.fail(
                format!("control-plane store ({}) does not answer: the node refuses most requests", s.store),
                "tell the control plane's operator: its database is down or unreachable (np-control's log names it)",
            );
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            r.fail(
                format!("asking the control plane how it is: {e}"),
                "see the message; fix it and run np doctor again",
            );
        }
        Err(_) => {
            r.fail(
                format!("the control plane did not say how its store is within {}s", CHECK_TIMEOUT.as_secs()),
                "tell the control plane's operator: it may be overloaded, or its database slow",
            );
        }
    }
}

/// The relay's signed record gives an address; the relay answers there, introduces itself by
/// its name, and proves it holds that identity's key for this connection.
async fn check_relay(r: &mut Report, ctl: &ControlClient, relay: &Name) -> bool {
    let info = match tokio::time::timeout(CHECK_TIMEOUT, np_tunnel::relays::RelayBook::default().info(ctl, relay)).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            return r.fail(
                format!("relay {relay}: {e}"),
                "check that the relay runs as that identity and has reached the control plane (it publishes its record at start; `--advertise HOST:PORT`)",
            )
        }
        Err(_) => return r.fail(format!("relay {relay}: no record within {}s", CHECK_TIMEOUT.as_secs()), "check the control plane"),
    };
    let address = info.addresses[0].clone();
    let keys = match ctl.lookup(relay).await {
        Ok(k) => k,
        Err(e) => return r.fail(format!("relay {relay}: cannot look up its keys: {e}"), "check the relay's enrolment"),
    };
    // The same authenticated probe the client ranks relays with: a join of a throwaway session
    // with ourselves, enough for the relay to sign its proof.
    let expected = np_relay_proto::ExpectedRelay { name: relay, signing: &keys.signing };
    match np_relay_proto::probe(&address, ctl.keys(), ctl.me(), expected, CHECK_TIMEOUT).await {
        Ok(_) => r.ok(format!("relay {relay} reachable at {address} and proves its identity")),
        Err(ProbeError::Connect { reason, .. }) => r.fail(
            format!("relay {relay} unreachable at {address}: {reason}"),
            "check that np-relay is running there (`systemctl status np-relay`), its --advertise address, and any firewall",
        ),
        Err(ProbeError::Join { source, .. }) => r.fail(
            format!("relay {relay} at {address} answered, but {source}"),
            "check that the address the relay advertises is its own, and look at its log",
        ),
        Err(ProbeError::Timeout { .. }) => r.fail(
            format!("relay {relay} at {address} did not answer within {}s", CHECK_TIMEOUT.as_secs()),
            "check the address, any firewall, and whether the relay is overloaded (its --max-preauth)",
        ),
    }
}

/// The device's record: readable (so it exists and we are among its readers), its heartbeat
/// recent, and what it permits.
async fn check_device(r: &mut Report, ctl: &ControlClient, device: &DeviceRef) {
    let me = ctl.me().clone();
    let id = &device.identity;
    match tokio::time::timeout(CHECK_TIMEOUT, ctl.lookup(id)).await {
        Ok(Ok(_)) => {}
        Ok(Err(ClientError::Refused { code: ErrorCode::UnknownIdentity, .. })) => {
            r.fail(
                format!("device identity {id} is not enrolled on the control plane"),
                format!("check the spelling of {device}; the device's owner enrols {id} with `np keys new {id} ...`"),
            );
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
        Ok(Err(ClientError::Pin(e))) => {
            r.fail(
                format!("keys of {id}: {e}"),
                "see the message: a changed key is only fine if the device was re-enrolled on purpose",
            );
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
        Ok(Err(e)) => {
            r.fail(format!("looking up {id}: {e}"), "see the message; fix it and run np doctor again");
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
        Err(_) => {
            r.fail(
                format!("looking up {id}: no answer within {}s", CHECK_TIMEOUT.as_secs()),
                "check the control plane's log",
            );
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
    }
    let key = np_tunnel::daemon::device_key(&device.device);
    let record = match tokio::time::timeout(CHECK_TIMEOUT, ctl.fetch(id, &key)).await {
        Ok(Ok(rec)) => rec,
        Ok(Err(ClientError::Refused { code: ErrorCode::NotFound, .. })) => {
            r.fail(
                format!("device {device} unknown: {id} publishes no device `{}` that {me} may read", device.device),
                format!(
                    "start it on the device with `npd --as {id} --device {} --manager {me}` (or check the name with `np devices`); only its managers can see it",
                    device.device
                ),
            );
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
        Ok(Err(e)) => {
            r.fail(format!("reading the record of {device}: {e}"), "see the message; fix it and run np doctor again");
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
        Err(_) => {
            r.fail(
                format!("reading the record of {device}: no answer within {}s", CHECK_TIMEOUT.as_secs()),
                "check the control plane's log",
            );
            r.skip(format!("permit-open of {device} (needs the device)"));
            return;
        }
    };
    let info: DeviceInfo = match postcard::from_bytes(&record.value) {
        Ok(i) => i,
        Err(_) => {
            r.fail(
                format!("the record of {device} does not decode"),
                "the device runs an npd of another version: update np and npd to the same release",
            );
            return;
        }
    };
    let age_ms = now_ms().saturating_sub(record.updated_ms);
    let seen = humantime::format_duration(Duration::from_secs(age_ms / 1000));
    if is_live(age_ms, info.heartbeat_secs) {
        r.ok(format!("device {device} live (heartbeat {seen} ago, npd {})", info.version));
    } else {
        r.fail(
            format!("device {device} gone: last heartbeat {seen} ago (it beats every {}s)", info.heartbeat_secs),
            "start npd on the device (`systemctl status npd` / `journalctl -u npd` there): it may be stopped, crashed, or cut off from the control plane",
        );
    }
    let who = if info.managers.contains(&me) {
        format!("{me} is a manager")
    } else if let Some(p) = &info.policy {
        format!("access decided by policy {p}")
    } else {
        format!("{me} may read it")
    };
    r.ok(format!("permit-open of {device}: {} ({who})", info.permit_open));
}
