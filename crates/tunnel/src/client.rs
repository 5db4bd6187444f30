//! The client's side of session setup: one signed, sealed request to the device over the control
//! plane; the relay join; the device's handshake answer over the relay; then the encrypted,
//! multiplexed session.

use crate::admission::Refusal;
use crate::msg::{prologue, Features, SessionRequest, TunnelMsg};
use crate::relays::{RelayBook, RelayError};
use crate::router::Router;
use np_control_client::ControlClient;
use np_identity::{DeviceRef, Name};
use np_relay_proto::Role;
use np_session::{client_session, Initiator, MuxConfig, SessionHandle, SessionKeys};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Longest a handshake answer frame may be.
pub(crate) const MAX_ANSWER: usize = 1024;
/// Longest a session request waits on the control plane for an absent device: the device's
/// freshness window (±30 s), past which the request is refused as stale anyway, so a longer
/// life would only let requests pile up in the device's queue.
pub const MAX_REQUEST_TTL: Duration = Duration::from_secs(30);

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The device said no.
    #[error("{device} refused: {refusal}")]
    Refused { device: String, refusal: Refusal },
    /// An identity other than the device answered the request.
    #[error("{device}: answer from an unexpected identity {from}")]
    Unexpected { device: String, from: Name },
    /// No answer in time.
    #[error("{device} did not answer within {secs}s: is npd running there, connected to the control plane, and able to reach the relay? (`np devices` shows its last heartbeat; npd's log says which step failed)")]
    Timeout { device: String, secs: u64 },
    /// The control plane failed.
    #[error("control plane: {0}")]
    Control(#[from] np_control_client::ClientError),
    /// The relay could not be reached or refused.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// No relay could be chosen.
    #[error(transparent)]
    Choose(#[from] crate::choose::ChooseError),
    /// The handshake failed (wrong keys, or tampering).
    #[error("handshake with {device} failed: {reason}")]
    Handshake { device: String, reason: String },
}

/// A session's transport, set up: the relay stream paired with the device, past the handshake.
pub struct Transport {
    pub stream: TcpStream,
    pub keys: SessionKeys,
    /// The session's random id, as both sides present it to the relay.
    pub id: [u8; 16],
    /// The session's id in the logs of both ends: the first bytes of its random id, in hex.
    pub session: String,
    /// The features both ends have (see [`Features`]).
    pub features: Features,
}

impl Transport {
    /// `base` for this session: with the features both ends negotiated.
    pub fn mux_config(&self, base: &MuxConfig) -> MuxConfig {
        let resume = if self.features.has(Features::RESUME) { base.resume } else { None };
        MuxConfig { udp: self.features.has(Features::UDP), resume, ..base.clone() }
    }
}

/// How both ends name a session in their logs.
pub fn session_id(session: &[u8; 16]) -> String {
    hex::encode(&session[..4])
}

/// Sets up sessions for one identity.
#[derive(Clone)]
pub struct Connector {
    pub ctl: ControlClient,
    pub router: Router,
    /// How long to wait for the device.
    pub timeout: Duration,
    pub mux: MuxConfig,
    /// Relay records in use.
    pub relays: RelayBook,
    /// Which relay each session goes through.
    pub choice: std::sync::Arc<crate::choose::RelayChooser>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn random16() -> [u8; 16] {
    let mut b = [0u8; 16];
    let _ = np_identity::random_bytes(&mut b);
    b
}

impl Connector {
    /// What this client's session requests offer: everything this build knows, less resuming
    /// when it will not resume (so the device does not keep the session waiting for it).
    fn offered_features(&self) -> Features {
        match self.mux.resume {
            Some(_) => Features::ours(),
            None => Features::ours().without(Features::RESUME),
        }
    }

    /// Opens a session to `device` through `relay`. `targets` are checked by the device up
    /// front so an unpermitted one is refused at once. `step` is told each step as it completes.
    pub async fn open_session(
        &self,
        device: &DeviceRef,
        relay: &Name,
        targets: &[String],
        step: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<SessionHandle, SetupError> {
        let t0 = Instant::now();
        let t = self.dial(device, relay, targets, step).await?;
        tracing::info!(device = %device, elapsed_ms = t0.elapsed().as_millis() as u64, "session established");
        Ok(self.start_session(t, device, relay))
    }

    /// Runs the session over its transport; one that resumes rejoins its relay whenever the
    /// transport breaks ([`crate::rejoin`]).
    fn start_session(&self, t: Transport, device: &DeviceRef, relay: &Name) -> SessionHandle {
        let config = t.mux_config(&self.mux);
        let resumes = config.resume.is_some();
        let handle = client_session(t.stream, t.keys, config);
        if resumes {
            crate::rejoin::keep(
                handle.clone(),
                crate::rejoin::Rejoin {
                    ctl: self.ctl.clone(),
                    relays: self.relays.clone(),
                    relay: relay.clone(),
                    role: Role::Client,
                    session: t.id,
                    peer: device.identity.clone(),
                    ask_device: Some((self.router.clone(), device.device.clone())),
                    eager_for: None,
                    kick: Default::default(),
                },
            );
        }
        handle
    }

    /// [`Connector::dial`] through the best relay the device trusts ([`Connector::choice`]):
    /// a relay that cannot be reached or refuses is left for the next, at once. Returns the
    /// transport and the relay it went through.
    pub async fn dial_best(
        &self,
        device: &DeviceRef,
        targets: &[String],
        step: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(Transport, Name), SetupError> {
        let mut tried: Vec<Name> = Vec::new();
        let mut last = None;
        // A relay that fails makes the ranking stale: the next candidates come from a new one
        // (a relay left out of the old one for being slow may be the one left).
        while let Some(relay) =
            self.choice.candidates(&self.ctl, device).await?.into_iter().find(|r| !tried.contains(r))
        {
            match self.dial(device, &relay, targets, step).await {
                Ok(t) => return Ok((t, relay)),
                Err(SetupError::Relay(e)) => {
                    tracing::warn!(%relay, error = %e, "relay failed; trying the next");
                    step(&format!("relay {relay} failed ({e}); trying the next"));
                    self.choice.forget().await;
                    tried.push(relay);
                    last = Some(SetupError::Relay(e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(SetupError::Choose(crate::choose::ChooseError::NoneListed)))
    }

    /// [`Connector::open_session`] through the best relay ([`Connector::dial_best`]).
    pub async fn open_session_best(
        &self,
        device: &DeviceRef,
        targets: &[String],
        step: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(SessionHandle, Name), SetupError> {
        let t0 = Instant::now();
        let (t, relay) = self.dial_best(device, targets, step).await?;
        tracing::info!(device = %device, %relay, elapsed_ms = t0.elapsed().as_millis() as u64, "session established");
        let handle = self.start_session(t, device, &relay);
        Ok((handle, relay))
    }

    /// Everything of [`Connector::open_session`] up to the session itself: the request, the
    /// relay join and the handshake. Returns the paired relay stream and the session keys, so
    /// tests can drive a session by hand (e.g. as a misbehaving peer).
    pub async fn open_transport(
        &self,
        device: &DeviceRef,
        relay: &Name,
        targets: &[String],
        step: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(TcpStream, SessionKeys), SetupError> {
        let t = self.dial(device, relay, targets, step).await?;
        Ok((t.stream, t.keys))
    }

    /// [`Connector::open_transport`], with the session's id (for the logs: npd logs the same).
    pub async fn dial(
        &self,
        device: &DeviceRef,
        relay: &Name,
        targets: &[String],
        step: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Transport, SetupError> {
        let dev_name = device.to_string();
        let me = self.ctl.me().clone();
        let keys = self.ctl.lookup(&device.identity).await?;
        step(&format!("resolved {}'s keys ({})", device.identity, keys.fingerprint()));

        let session = random16();
        let request_id = random16();
        let pro = prologue(&session, &me, &device.identity, &device.device, relay);
        let (init, msg1) = Initiator::start(self.ctl.keys().x25519_private(), &keys.x25519, &pro)
            .map_err(|e| SetupError::Handshake { device: dev_name.clone(), reason: e.to_string() })?;
        let req = TunnelMsg::SessionRequest(SessionRequest {
            request_id,
            timestamp_ms: now_ms(),
            device: device.device.clone(),
            relay: relay.clone(),
            session,
            handshake: msg1,
            targets: targets.to_vec(),
            features: self.offered_features(),
        });
        let refusal = self.router.expect(request_id);
        let ttl = self.timeout.max(Duration::from_secs(1));
        let request_ttl = ttl.min(MAX_REQUEST_TTL);
        // The request and the relay connection go out together: the relay join waits for the
        // device anyway, and the control plane's answer to the send (which waits for its disk)
        // is not on the path to the device.
        let send = async {
            let sent = self.ctl.send(&device.identity, &req.encode(), request_ttl).await?;
            step(if sent.delivered {
                "request delivered to the device"
            } else {
                "request queued (device not connected right now)"
            });
            Ok::<_, SetupError>(())
        };
        let join = async {
            let info = self.relays.info(&self.ctl, relay).await?;
            step(&format!("found relay {relay} at {}", info.addresses.join(", ")));
            // Longer than the overall wait, so a silent device is reported as such.
            let mut stream = self
                .relays
                .join(&self.ctl, relay, Role::Client, session, &device.identity, ttl + Duration::from_secs(5))
                .await?;
            step("paired with the device at the relay");
            let msg2 = np_wire::io::read_frame(&mut stream, MAX_ANSWER)
                .await
                .map_err(|e| SetupError::Handshake { device: dev_name.clone(), reason: e.to_string() })?
                .ok_or_else(|| SetupError::Handshake {
                    device: dev_name.clone(),
                    reason: "closed before answering".into(),
                })?;
            Ok::<_, SetupError>((stream, msg2))
        };
        let fut = async {
            let ((), (stream, msg2)) = tokio::try_join!(send, join)?;
            let (keys, features) = init
                .finish_with_features(&msg2)
                .map_err(|e| SetupError::Handshake { device: dev_name.clone(), reason: e.to_string() })?;
            let features = Features::from_payload(&features).common(self.offered_features());
            step("handshake complete");
            Ok::<_, SetupError>(Transport { stream, keys, id: session, session: session_id(&session), features })
        };
        let result = tokio::select! {
            r = tokio::time::timeout(ttl, fut) => match r {
                Ok(r) => r,
                Err(_) => Err(SetupError::Timeout { device: dev_name.clone(), secs: ttl.as_secs() }),
            },
            Ok(answer) = refusal => match answer.msg {
                TunnelMsg::SessionRefused { refusal, .. } if answer.from == device.identity => {
                    Err(SetupError::Refused { device: dev_name.clone(), refusal })
                }
                _ => Err(SetupError::Unexpected { device: dev_name.clone(), from: answer.from }),
            },
        };
        self.router.forget(&request_id);
        result
    }
}
