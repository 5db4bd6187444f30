//! The device daemon: publishes device info with a heartbeat and serves session requests. The
//! decision on each request is [`crate::admission::admit`], a pure function; this file is the IO
//! around it: asking the policy, answering refusals (rate-limited per requester), joining the
//! trusted relay at its signed address, and dialling permitted targets only.

use crate::admission::{self, Admission, AdmissionConfig, Permits, Refusal};
use crate::msg::{prologue, Features, SessionRequest, TunnelMsg};
use crate::permit::PermitOpen;
use crate::policy::PolicyClient;
use crate::relays::RelayBook;
use crate::replay::ReplayGuard;
use crate::router::{FromPeer, Router};
use np_control_client::{ControlClient, Incoming};
use np_identity::Name;
use np_relay_proto::Role;
use np_session::{device_session, IncomingFlow, MuxConfig, Responder};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::Instrument;

/// How long the daemon's side of a session may take to reach the relay, join and send its
/// handshake answer before the request is refused. Under the client's default 10 s wait, so the
/// requester reads "cannot reach relay" rather than a bare timeout; above a few SYN
/// retransmissions (1 s, then 2 s) on a lossy path.
const RELAY_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the operator's relay list is used before it is asked for again.
const RELAY_LIST_TTL: Duration = Duration::from_secs(30);
/// Refusals sent to one requester: a burst, then a steady rate. Beyond it requests are dropped
/// unanswered, so a flood of bad requests (thousands queued for an absent device, say) costs
/// the device a few answers rather than a control-plane round trip each.
const REFUSAL_BURST: f64 = 20.0;
const REFUSALS_PER_SEC: f64 = 5.0;
/// How long an answer to a session query may wait for its asker on the control plane: it is
/// useful only while the asker's session waits to resume, and the asker waits 10 s.
const QUERY_ANSWER_TTL: Duration = Duration::from_secs(10);
/// Requesters whose refusal budget is remembered; the table is cleared when full.
const REFUSAL_TABLE_MAX: usize = 10_000;

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

/// Which relays a device joins sessions at (record `trust/NAME`, readable by whoever may
/// read its info), so that `np relays` can say which of a user's devices trust which relay. A
/// record apart from [`DeviceInfo`], so that readers of older device records still decode them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRelays {
    pub device: String,
    /// Its own `--relay` list; `None`: the control plane operator's list.
    pub relays: Option<Vec<Name>>,
}

/// Record key of a device's [`DeviceRelays`].
pub fn trust_key(device: &str) -> String {
    format!("trust/{device}")
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub device: String,
    pub managers: Vec<Name>,
    pub policy: Option<Name>,
    pub permit: PermitOpen,
    /// The relays this device joins sessions at; `None`: the control plane operator's list.
    pub relays: Option<Vec<Name>>,
    /// Sessions one requester may hold at once.
    pub max_sessions_per_requester: usize,
    /// Identities besides the managers that may read the device's record (`np devices`).
    pub share_with: Vec<Name>,
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
            relays: None,
            max_sessions_per_requester: 16,
            share_with: Vec::new(),
            heartbeat: Duration::from_secs(10),
            skew: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(5),
            mux: MuxConfig::default(),
        }
    }

    /// Who may read the device record: its managers and whoever it is shared with; if nobody,
    /// the device identity alone (an empty reader list would make it public).
    pub fn readers(&self, me: &Name) -> Vec<Name> {
        let mut r: Vec<Name> = self.managers.iter().chain(&self.share_with).cloned().collect();
        r.dedup();
        if r.is_empty() {
            r.push(me.clone());
        }
        r
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One session the daemon holds (or is setting up) for a requester.
struct Held {
    id: u64,
    who: Name,
    /// The session's id at the relay.
    session: [u8; 16],
    /// Wakes the session's rejoining when its client asks about it ([`crate::rejoin`]).
    kick: Arc<tokio::sync::Notify>,
    /// `None` while being set up: counted against the requester's cap from admission on.
    handle: Option<np_session::SessionHandle>,
}

struct Daemon {
    ctl: ControlClient,
    cfg: DaemonConfig,
    replay: Mutex<ReplayGuard>,
    policy: Option<PolicyClient>,
    relays: RelayBook,
    /// The operator's relay list as last fetched, when `cfg.relays` is `None`.
    relay_list: Mutex<Option<(Instant, Vec<Name>)>>,
    /// Sessions by requester, so a manager can end them and each requester is capped.
    held: Mutex<Vec<Held>>,
    next_held: std::sync::atomic::AtomicU64,
    /// Refusal budget per requester: (tokens, last refill).
    refusals: Mutex<HashMap<Name, (f64, Instant)>>,
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
        relays: RelayBook::default(),
        relay_list: Mutex::new(None),
        held: Mutex::new(Vec::new()),
        next_held: std::sync::atomic::AtomicU64::new(1),
        refusals: Mutex::new(HashMap::new()),
    });
    tokio::spawn(heartbeat(d.clone()));
    let trusted = d.trusted_relays().await;
    if trusted.is_empty() {
        tracing::warn!(
            "no trusted relay: every session request will be refused; name one with `npd --relay @NAME`, or have the control plane's operator list one (`np-control relay add @NAME`)"
        );
    }
    let relays = trusted.iter().map(Name::to_string).collect::<Vec<_>>().join(",");
    tracing::info!(device = %d.cfg.device, identity = %d.ctl.me(), permit_open = %d.cfg.permit, %relays, "waiting for session requests");
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
    let readers = d.cfg.readers(d.ctl.me());
    let key = device_key(&d.cfg.device);
    let trust = DeviceRelays { device: d.cfg.device.clone(), relays: d.cfg.relays.clone() };
    let trust = postcard::to_stdvec(&trust).unwrap_or_default();
    let mut tick = tokio::time::interval(d.cfg.heartbeat);
    let (mut held, mut trust_published) = (false, false);
    loop {
        tick.tick().await;
        match d.ctl.publish(&key, value.clone(), readers.clone()).await {
            Ok(()) => tracing::trace!("heartbeat published"),
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the heartbeat; will retry");
                continue;
            }
        }
        // Once the record exists: held present on this connection and every later one, so the
        // control plane marks the device gone the moment its connection closes (the heartbeat
        // still covers a connection that died without closing).
        if !held {
            match d.ctl.hold(&key).await {
                Ok(()) => {
                    held = true;
                    tracing::debug!(%key, "device record held present while connected");
                }
                Err(e) => {
                    // A control plane that cannot track presence will not learn to by retrying.
                    held = matches!(e, np_control_client::ClientError::Protocol(_));
                    tracing::warn!(error = %e, "could not hold the device record present; readers go by the heartbeat")
                }
            }
        }
        // It changes only with npd's flags: published once per start.
        if !trust_published {
            match d.ctl.publish(&trust_key(&d.cfg.device), trust.clone(), readers.clone()).await {
                Ok(()) => trust_published = true,
                Err(e) => tracing::warn!(error = %e, "could not publish which relays this device trusts; will retry"),
            }
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
                if let Err(refusal) = self.serve(&from, r).await {
                    tracing::info!(requester = %from, %refusal, "session refused");
                    self.refuse(&from, request_id, refusal).await;
                }
            }
            TunnelMsg::EndSessions { request_id, device, identity } if device == self.cfg.device => {
                let result = if self.cfg.managers.contains(&req.from) {
                    let mut n = 0u32;
                    if let Ok(mut held) = self.held.lock() {
                        held.retain(|h| match &h.handle {
                            Some(s) if h.who == identity && s.error().is_none() => {
                                s.close(&format!("sessions of {identity} ended by {}", req.from));
                                n += 1;
                                false
                            }
                            Some(s) => s.error().is_none(),
                            None => true,
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
            TunnelMsg::SessionQuery { query_id, device, session } if device == self.cfg.device => {
                // Each answer costs a control-plane send: held to the same budget as refusals.
                if !self.may_refuse(&req.from) {
                    return;
                }
                // Only about the sender's own sessions: anyone else learns nothing (ids are
                // random, so there is nothing to learn but "no").
                let held = self.held.lock().is_ok_and(|held| {
                    let found = held.iter().find(|h| {
                        h.who == req.from
                            && h.session == session
                            && h.handle.as_ref().is_none_or(|s| s.error().is_none())
                    });
                    if let Some(h) = found {
                        // The client is rejoining: so do we, if we had stopped trying.
                        h.kick.notify_one();
                    }
                    found.is_some()
                });
                tracing::debug!(requester = %req.from, held, "asked whether a session is still held");
                let msg = TunnelMsg::SessionStatus { query_id, held };
                if let Err(e) = self.ctl.send(&req.from, &msg.encode(), QUERY_ANSWER_TTL).await {
                    tracing::debug!(to = %req.from, error = %e, "could not answer a session query");
                }
            }
            other => tracing::debug!(from = %req.from, msg = ?std::mem::discriminant(&other), "ignoring message"),
        }
    }

    /// Whether `who` may be sent one more refusal now (token bucket per requester).
    fn may_refuse(&self, who: &Name) -> bool {
        let Ok(mut t) = self.refusals.lock() else { return false };
        if t.len() >= REFUSAL_TABLE_MAX && !t.contains_key(who) {
            t.clear();
        }
        let now = Instant::now();
        let (tokens, last) = t.entry(who.clone()).or_insert((REFUSAL_BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * REFUSALS_PER_SEC).min(REFUSAL_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sends a refusal, unless the requester has had its share of them lately.
    async fn refuse(&self, to: &Name, request_id: [u8; 16], refusal: Refusal) {
        if !self.may_refuse(to) {
            tracing::debug!(requester = %to, "not answering: too many refusals to this requester lately");
            return;
        }
        let msg = TunnelMsg::SessionRefused { request_id, refusal };
        if let Err(e) = self.ctl.send(to, &msg.encode(), crate::client::MAX_REQUEST_TTL).await {
            tracing::warn!(requester = %to, error = %e, "could not send the refusal");
        }
    }

    /// The relays this device joins sessions at.
    async fn trusted_relays(&self) -> Vec<Name> {
        if let Some(list) = &self.cfg.relays {
            return list.clone();
        }
        if let Some((at, list)) = self.relay_list.lock().ok().and_then(|l| l.clone()) {
            if at.elapsed() < RELAY_LIST_TTL {
                return list;
            }
        }
        match self.ctl.relays().await {
            Ok(list) => {
                if let Ok(mut l) = self.relay_list.lock() {
                    *l = Some((Instant::now(), list.clone()));
                }
                list
            }
            Err(e) => {
                // Keep the last list through a control-plane hiccup; with none, trust nobody.
                tracing::warn!(error = %e, "cannot fetch the operator's relay list");
                self.relay_list.lock().ok().and_then(|l| l.clone()).map(|(_, l)| l).unwrap_or_default()
            }
        }
    }

    fn admission_config(&self, trusted_relays: Vec<Name>) -> AdmissionConfig {
        AdmissionConfig {
            device: self.cfg.device.clone(),
            identity: self.ctl.me().clone(),
            managers: self.cfg.managers.clone(),
            policy: self.cfg.policy.clone(),
            permit: self.cfg.permit.clone(),
            trusted_relays,
            max_sessions_per_requester: self.cfg.max_sessions_per_requester,
        }
    }

    /// Several daemons may share an identity; each sees every request. The one whose name it is
    /// answers; the others stay quiet unless no device of that name exists at all, in which case
    /// the requester is told, in words that say no more than a refusal would (see
    /// [`admission::unknown_device`]).
    async fn maybe_unknown_device(&self, from: &Name, r: &SessionRequest) {
        if !np_identity::DeviceRef::valid_device_name(&r.device) || !self.may_refuse(from) {
            return;
        }
        match self.ctl.fetch(self.ctl.me(), &device_key(&r.device)).await {
            Ok(_) => {}
            Err(np_control_client::ClientError::Refused { code: np_control_client::ErrorCode::NotFound, .. }) => {
                let refusal = admission::unknown_device(&self.admission_config(Vec::new()), from, &r.device);
                let msg = TunnelMsg::SessionRefused { request_id: r.request_id, refusal };
                let _ = self.ctl.send(from, &msg.encode(), crate::client::MAX_REQUEST_TTL).await;
            }
            Err(e) => tracing::debug!(error = %e, "could not check for a sibling device"),
        }
    }

    /// Decides on a request and, if admitted, serves the session.
    async fn serve(&self, from: &Name, r: SessionRequest) -> Result<(), Refusal> {
        let cfg = self.admission_config(self.trusted_relays().await);
        let verdict = match (&self.policy, admission::needs_policy(&cfg, from) && !r.targets.is_empty()) {
            (Some(p), true) => Some(p.ask(from, &format!("{}@{}", cfg.device, cfg.identity.bare()), &r.targets).await),
            _ => None,
        };
        // Admission and the reservation of a place under one lock, so concurrent requests of
        // one requester cannot all pass the cap.
        let (admission, place) = {
            let mut held = self.held.lock().map_err(|_| Refusal::Internal)?;
            held.retain(|h| h.handle.as_ref().is_none_or(|s| s.error().is_none()));
            let mut live = held.iter().filter(|h| &h.who == from).count();
            // Sessions waiting to resume hold a requester's places until their window ends; a
            // requester at its cap gets its places back from them, oldest first, rather than be
            // refused (a client that does not resume, or came back as a new process, leaves
            // such sessions behind at every break).
            while live >= self.cfg.max_sessions_per_requester {
                let Some(i) = held.iter().position(|h| {
                    &h.who == from
                        && h.handle.as_ref().is_some_and(|s| s.transport_state() != np_session::TransportState::Live)
                }) else {
                    break;
                };
                let h = held.remove(i);
                if let Some(s) = h.handle {
                    s.close("a new session of this requester needed the place of this suspended one");
                }
                live -= 1;
            }
            let admission = {
                let mut replay = self.replay.lock().map_err(|_| Refusal::Internal)?;
                admission::admit(&cfg, from, &r, now_ms(), verdict.as_ref(), &mut replay, live)?
            };
            let id = self.next_held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.push(Held { id, who: from.clone(), session: r.session, kick: Default::default(), handle: None });
            (admission, Place { daemon: self, id, kept: false })
        };
        self.join_and_serve(from, &r, admission, place).await
    }

    async fn join_and_serve(
        &self,
        from: &Name,
        r: &SessionRequest,
        admission: Admission,
        mut place: Place<'_>,
    ) -> Result<(), Refusal> {
        // The handshake: our side of Noise KK, bound to this session, these identities and this relay.
        let client_keys = self.ctl.lookup(from).await.map_err(|e| {
            tracing::warn!(requester = %from, error = %e, "cannot look up the requester's keys");
            Refusal::Internal
        })?;
        let pro = prologue(&r.session, from, self.ctl.me(), &self.cfg.device, &admission.relay);
        // Features are answered only to a client that offered some (an older one refuses any
        // payload in message 2), and used only when both have them.
        // Resuming is not offered back by a daemon that does not resume (`--resume-window 0`):
        // its client then ends the session with the transport instead of rejoining in vain.
        let ours = match self.cfg.mux.resume {
            Some(_) => Features::ours(),
            None => Features::ours().without(Features::RESUME),
        };
        let features = r.features.common(ours);
        let (msg2, keys) = Responder::respond_with_features(
            self.ctl.keys().x25519_private(),
            &client_keys.x25519,
            &pro,
            &r.handshake,
            &features.to_payload(),
        )
        .map_err(|_| Refusal::Handshake)?;
        let relay = admission.relay.clone();
        let cannot_reach = |detail: String| {
            // The detail stays here: whatever answered at the relay's address, the requester
            // reads the same words.
            tracing::warn!(%relay, %detail, "cannot reach the relay");
            Refusal::CannotReachRelay { relay: relay.clone() }
        };
        let join = async {
            let mut stream = self
                .relays
                .join(&self.ctl, &relay, Role::Device, r.session, from, RELAY_JOIN_TIMEOUT)
                .await
                .map_err(|e| cannot_reach(e.to_string()))?;
            np_wire::io::write_frame(&mut stream, &msg2).await.map_err(|e| cannot_reach(e.to_string()))?;
            Ok::<_, Refusal>(stream)
        };
        // Bounded: with the relay unreachable (a partition drops the SYNs) the kernel would retry
        // for about two minutes, the requester would get no answer but its own timeout, and the
        // task would linger to join a session long abandoned.
        let stream = tokio::time::timeout(RELAY_JOIN_TIMEOUT, join)
            .await
            .map_err(|_| cannot_reach(format!("no answer within {}s", RELAY_JOIN_TIMEOUT.as_secs())))??;
        let session_id = crate::client::session_id(&r.session);
        tracing::info!(requester = %from, session = %session_id, %relay, "session accepted");
        // Resumed only if the client said it will come back (see `Features::RESUME`).
        let resume = if features.has(Features::RESUME) { self.cfg.mux.resume } else { None };
        let resumes = resume.is_some();
        let config = MuxConfig { udp: features.has(Features::UDP), resume, ..self.cfg.mux.clone() };
        let mut session = device_session(stream, keys, config);
        let kick = place.keep(session.handle().clone());
        if resumes {
            crate::rejoin::keep(
                session.handle().clone(),
                crate::rejoin::Rejoin {
                    ctl: self.ctl.clone(),
                    relays: self.relays.clone(),
                    relay: relay.clone(),
                    role: Role::Device,
                    session: r.session,
                    peer: from.clone(),
                    ask_device: None,
                    eager_for: Some(crate::rejoin::DEVICE_EAGER),
                    kick,
                },
            );
        }
        let permits = Arc::new(admission.permits);
        let dial_timeout = self.cfg.dial_timeout;
        let requester = from.clone();
        // Every flow's logs carry the session id and the mux's flow id; the client's carry the
        // same pair (and its TUN flow id), so one flow can be followed end to end.
        let span = tracing::info_span!("session", session = %session_id);
        if let Some(mut assocs) = session.take_udp() {
            let (permits, span) = (permits.clone(), span.clone());
            tokio::spawn(async move {
                while let Some(a) = assocs.recv().await {
                    let assoc_span = tracing::debug_span!(parent: &span, "udp", assoc = a.id());
                    tokio::spawn(crate::udp::serve_assoc(a, permits.clone(), dial_timeout).instrument(assoc_span));
                }
            });
        }
        tokio::spawn(async move {
            while let Some(flow) = session.next_flow().await {
                let flow_span = tracing::debug_span!(parent: &span, "flow", mux_flow = flow.id());
                tokio::spawn(serve_flow(flow, permits.clone(), dial_timeout).instrument(flow_span));
            }
            let reason = session.handle().error().map(|e| e.to_string()).unwrap_or_else(|| "closed".into());
            tracing::info!(%requester, %reason, "session ended");
        });
        Ok(())
    }
}

/// A requester's place, reserved at admission: filled with the session once it is up, given
/// back if setting it up fails.
struct Place<'a> {
    daemon: &'a Daemon,
    id: u64,
    kept: bool,
}

impl Place<'_> {
    /// Fills the place; returns what wakes the session's rejoining.
    fn keep(&mut self, handle: np_session::SessionHandle) -> Arc<tokio::sync::Notify> {
        if let Ok(mut held) = self.daemon.held.lock() {
            if let Some(h) = held.iter_mut().find(|h| h.id == self.id) {
                h.handle = Some(handle);
                self.kept = true;
                return h.kick.clone();
            }
        }
        Arc::default()
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.kept {
            if let Ok(mut held) = self.daemon.held.lock() {
                held.retain(|h| h.id != self.id);
            }
        }
    }
}

async fn serve_flow(flow: IncomingFlow, permits: Arc<Permits>, dial_timeout: Duration) {
    let target = match permits.check(flow.target()) {
        Ok(t) => t,
        Err(refusal) => {
            // Not at info: per-flow logs there carry no addresses (the refusal names the target).
            tracing::debug!(%refusal, "flow refused");
            flow.refuse(&refusal.to_string());
            return;
        }
    };
    let dial = tokio::time::timeout(dial_timeout, dial_target(&target.host, target.port)).await;
    match dial {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            // Carried in this task, not a spawned one: one wake-up fewer before the first byte.
            match flow.accept() {
                Ok(stream) => {
                    let _ = stream.carry(tcp).await;
                }
                Err(e) => tracing::debug!(error = %e, "flow ended before it was accepted"),
            }
        }
        Ok(Err(e)) => flow.refuse(&format!("connecting to {target}: {e}")),
        Err(_) => flow.refuse(&format!("connecting to {target}: timed out")),
    }
}

/// Connects to a permitted target. `localhost` is the loopback address (RFC 6761) and is dialled
/// as such: through the resolver, each new flow waited for a blocking-pool thread to run
/// getaddrinfo, the larger part of what a warm flow's first byte cost beyond the reverse SSH
/// tunnel's. Any other name goes through the system's resolver as before.
async fn dial_target(host: &str, port: u16) -> std::io::Result<TcpStream> {
    if host.eq_ignore_ascii_case("localhost") {
        let v4 = TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await;
        return match v4 {
            Ok(s) => Ok(s),
            // Served on IPv6 loopback only: what the resolver's second answer would reach.
            Err(e) => TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, port)).await.map_err(|_| e),
        };
    }
    TcpStream::connect((host, port)).await
}

#[cfg(test)]
mod tests {
    use super::dial_target;

    #[tokio::test]
    async fn ipv6_targets_are_dialled_as_addresses() {
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.expect("bind [::1]");
        let port = v6.local_addr().expect("addr").port();
        // The permitted target's host, as `PermitOpen::check` hands it over: without brackets.
        let s = dial_target("::1", port).await.expect("dial ::1");
        assert!(s.peer_addr().expect("peer").is_ipv6());
        // `localhost` falls back to IPv6 loopback for a service that listens there only.
        assert!(dial_target("localhost", port).await.is_ok());
    }
}
