//! The device daemon's logic: publish device info with a heartbeat, check each session request
//! (permitted identity or policy, fresh, not replayed, targets permitted), answer refusals with
//! a signed reason, and serve accepted sessions by dialling permitted targets only.

use crate::msg::{prologue, SessionRequest, TunnelMsg};
use crate::permit::PermitOpen;
use crate::policy::PolicyClient;
use crate::replay::ReplayGuard;
use crate::router::{FromPeer, Router};
use np_control_client::{ControlClient, Incoming};
use np_identity::Name;
use np_relay::Role;
use np_session::{device_session, IncomingFlow, MuxConfig, Responder};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long the daemon's side of a session may take to reach the relay, join and send its
/// handshake answer before the request is refused. Under the client's default 10 s wait, so the
/// requester reads "cannot reach relay" rather than a bare timeout; above a few SYN
/// retransmissions (1 s, then 2 s) on a lossy path.
const RELAY_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a device publishes about itself (record `device/NAME`, readable by its managers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: String,
    pub version: String,
    pub permit_open: String,
    pub managers: Vec<Name>,
    pub policy: Option<Name>,
    pub started_ms: u64,
    /// Seconds between heartbeats, so readers know when it is overdue.
    pub heartbeat_secs: u64,
}

/// Record key of a device's info.
pub fn device_key(device: &str) -> String {
    format!("device/{device}")
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub device: String,
    pub managers: Vec<Name>,
    pub policy: Option<Name>,
    pub permit: PermitOpen,
    pub heartbeat: Duration,
    /// Allowed clock difference for requests.
    pub skew: Duration,
    /// Time to connect to a target.
    pub dial_timeout: Duration,
    pub mux: MuxConfig,
}

impl DaemonConfig {
    /// Defaults for a device name.
    pub fn new(device: &str) -> Self {
        DaemonConfig {
            device: device.to_string(),
            managers: Vec::new(),
            policy: None,
            permit: PermitOpen::default(),
            heartbeat: Duration::from_secs(10),
            skew: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(5),
            mux: MuxConfig::default(),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Daemon {
    ctl: ControlClient,
    cfg: DaemonConfig,
    replay: Mutex<ReplayGuard>,
    policy: Option<PolicyClient>,
    /// Live sessions by requester, so a manager can end them.
    live: Mutex<Vec<(Name, np_session::SessionHandle)>>,
}

/// Runs the daemon until the control-plane client is gone.
pub async fn run(ctl: ControlClient, incoming: Incoming, cfg: DaemonConfig) {
    let (router, mut requests) = Router::start(incoming);
    let policy = cfg.policy.clone().map(|p| PolicyClient::new(ctl.clone(), router.clone(), p));
    let d = Arc::new(Daemon {
        replay: Mutex::new(ReplayGuard::new(cfg.skew.as_millis() as u64, 100_000)),
        ctl,
        cfg,
        policy,
        live: Mutex::new(Vec::new()),
    });
    tokio::spawn(heartbeat(d.clone()));
    tracing::info!(device = %d.cfg.device, identity = %d.ctl.me(), permit_open = %d.cfg.permit, "waiting for session requests");
    while let Some(req) = requests.recv().await {
        let d = d.clone();
        tokio::spawn(async move { d.handle(req).await });
    }
}

async fn heartbeat(d: Arc<Daemon>) {
    let info = DeviceInfo {
        device: d.cfg.device.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        permit_open: d.cfg.permit.to_string(),
        managers: d.cfg.managers.clone(),
        policy: d.cfg.policy.clone(),
        started_ms: now_ms(),
        heartbeat_secs: d.cfg.heartbeat.as_secs().max(1),
    };
    let value = postcard::to_stdvec(&info).unwrap_or_default();
    let mut tick = tokio::time::interval(d.cfg.heartbeat);
    loop {
        tick.tick().await;
        match d.ctl.publish(&device_key(&d.cfg.device), value.clone(), d.cfg.managers.clone()).await {
            Ok(()) => tracing::trace!("heartbeat published"),
            Err(e) => tracing::warn!(error = %e, "could not publish the heartbeat; will retry"),
        }
    }
}

impl Daemon {
    async fn handle(&self, req: FromPeer) {
        match req.msg {
            TunnelMsg::SessionRequest(r) => {
                let from = req.from;
                if r.device != self.cfg.device {
                    self.maybe_unknown_device(&from, &r).await;
                    return;
                }
                let request_id = r.request_id;
                if let Err(reason) = self.serve(&from, r).await {
                    tracing::info!(requester = %from, %reason, "session refused");
                    let msg = TunnelMsg::SessionRefused { request_id, reason };
                    if let Err(e) = self.ctl.send(&from, &msg.encode(), Duration::from_secs(30)).await {
                        tracing::warn!(requester = %from, error = %e, "could not send the refusal");
                    }
                }
            }
            TunnelMsg::EndSessions { request_id, device, identity } if device == self.cfg.device => {
                let result = if self.cfg.managers.contains(&req.from) {
                    let mut n = 0u32;
                    if let Ok(mut live) = self.live.lock() {
                        live.retain(|(who, h)| {
                            if who == &identity && h.error().is_none() {
                                h.close(&format!("sessions of {identity} ended by {}", req.from));
                                n += 1;
                                false
                            } else {
                                h.error().is_none()
                            }
                        });
                    }
                    tracing::warn!(%identity, by = %req.from, ended = n, "ended sessions on request");
                    Ok(n)
                } else {
                    Err(format!("{} is not a manager of {}@{}", req.from, self.cfg.device, self.ctl.me().bare()))
                };
                let msg = TunnelMsg::SessionsEnded { request_id, result };
                if let Err(e) = self.ctl.send(&req.from, &msg.encode(), Duration::from_secs(30)).await {
                    tracing::warn!(to = %req.from, error = %e, "could not answer");
                }
            }
            other => tracing::debug!(from = %req.from, msg = ?std::mem::discriminant(&other), "ignoring message"),
        }
    }

    /// Several daemons may share an identity; each sees every request. The one whose name it is
    /// answers; the others stay quiet unless no device of that name exists at all, in which case
    /// the requester is told so at once rather than left to time out.
    async fn maybe_unknown_device(&self, from: &Name, r: &SessionRequest) {
        if !np_identity::DeviceRef::valid_device_name(&r.device) {
            return;
        }
        match self.ctl.fetch(self.ctl.me(), &device_key(&r.device)).await {
            Ok(_) => {}
            Err(np_control_client::ClientError::Refused { code: np_control_client::ErrorCode::NotFound, .. }) => {
                let reason = format!("no device named {} under {}", r.device, self.ctl.me());
                let msg = TunnelMsg::SessionRefused { request_id: r.request_id, reason };
                let _ = self.ctl.send(from, &msg.encode(), Duration::from_secs(30)).await;
            }
            Err(e) => tracing::debug!(error = %e, "could not check for a sibling device"),
        }
    }

    /// Checks a request and, if it passes, serves the session. `Err(reason)` is sent back.
    async fn serve(&self, from: &Name, r: SessionRequest) -> Result<(), String> {
        // Who: a manager, or whoever the policy identity allows.
        let mut extra: Option<PermitOpen> = None;
        if !self.cfg.managers.contains(from) {
            match &self.policy {
                None => {
                    return Err(format!(
                        "{from} is not permitted to connect to {}@{}",
                        self.cfg.device,
                        self.ctl.me().bare()
                    ))
                }
                Some(p) => {
                    let d = p.ask(from, &format!("{}@{}", self.cfg.device, self.ctl.me().bare()), &r.targets).await?;
                    extra = Some(d);
                }
            }
        }
        // Fresh and single use.
        self.replay
            .lock()
            .map_err(|_| "internal error".to_string())?
            .check(r.request_id, r.timestamp_ms, now_ms())
            .map_err(|e| e.to_string())?;
        // What: every requested target is permitted.
        let permits = Permits { device: self.cfg.permit.clone(), policy: extra };
        for t in &r.targets {
            permits.check(t)?;
        }
        // The handshake: our side of Noise KK, bound to this session and these identities.
        let client_keys = self.ctl.lookup(from).await.map_err(|e| format!("cannot look up {from}: {e}"))?;
        let pro = prologue(&r.session, from, self.ctl.me(), &self.cfg.device, &r.relay);
        let (msg2, keys) =
            Responder::respond(self.ctl.keys().x25519_private(), &client_keys.x25519, &pro, &r.handshake)
                .map_err(|_| "handshake failed".to_string())?;
        let join = async {
            let tcp = TcpStream::connect(&r.relay)
                .await
                .map_err(|e| format!("device cannot reach relay {}: {e}", r.relay))?;
            let _ = tcp.set_nodelay(true);
            let mut stream = np_relay::join(tcp, self.ctl.keys(), self.ctl.me(), Role::Device, r.session, from, None)
                .await
                .map_err(|e| format!("relay {}: {e}", r.relay))?;
            np_wire::io::write_frame(&mut stream, &msg2).await.map_err(|e| format!("relay: {e}"))?;
            Ok::<_, String>(stream)
        };
        // Bounded: with the relay unreachable (a partition drops the SYNs) the kernel would retry
        // for about two minutes, the requester would get no answer but its own timeout, and the
        // task would linger to join a session long abandoned.
        let stream = tokio::time::timeout(RELAY_JOIN_TIMEOUT, join).await.map_err(|_| {
            format!("device cannot reach relay {}: no answer within {}s", r.relay, RELAY_JOIN_TIMEOUT.as_secs())
        })??;
        tracing::info!(requester = %from, session = %hex::encode(&r.session[..4]), "session accepted");
        let mut session = device_session(stream, keys, self.cfg.mux.clone());
        if let Ok(mut live) = self.live.lock() {
            live.retain(|(_, h)| h.error().is_none());
            live.push((from.clone(), session.handle().clone()));
        }
        let permits = Arc::new(permits);
        let dial_timeout = self.cfg.dial_timeout;
        let requester = from.clone();
        tokio::spawn(async move {
            while let Some(flow) = session.next_flow().await {
                tokio::spawn(serve_flow(flow, permits.clone(), dial_timeout));
            }
            let reason = session.handle().error().map(|e| e.to_string()).unwrap_or_else(|| "closed".into());
            tracing::info!(%requester, %reason, "session ended");
        });
        Ok(())
    }
}

/// The device's permit-open, narrowed further by the policy's answer when there is one.
struct Permits {
    device: PermitOpen,
    policy: Option<PermitOpen>,
}

impl Permits {
    fn check(&self, target: &str) -> Result<crate::permit::Target, String> {
        let t = self.device.check(target)?;
        if let Some(p) = &self.policy {
            p.check(target).map_err(|_| format!("{t} is not permitted for you by the policy"))?;
        }
        Ok(t)
    }
}

async fn serve_flow(flow: IncomingFlow, permits: Arc<Permits>, dial_timeout: Duration) {
    let target = match permits.check(flow.target()) {
        Ok(t) => t,
        Err(reason) => {
            tracing::info!(%reason, "flow refused");
            flow.refuse(&reason);
            return;
        }
    };
    let dial = tokio::time::timeout(dial_timeout, TcpStream::connect((target.host.as_str(), target.port))).await;
    match dial {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            match flow.accept_with(tcp) {
                Ok(j) => {
                    let _ = j.await;
                }
                Err(e) => tracing::debug!(error = %e, "flow ended before it was accepted"),
            }
        }
        Ok(Err(e)) => flow.refuse(&format!("connecting to {target}: {e}")),
        Err(_) => flow.refuse(&format!("connecting to {target}: timed out")),
    }
}
