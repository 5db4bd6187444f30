//! One session to a device, reused by every flow and set up again when it has ended: the
//! client's session reuse, and its retry when a flow finds the session stale.

use crate::client::{Connector, SetupError};
use np_identity::DeviceRef;
use np_session::{FlowStream, OpenError, SessionError, SessionHandle};
use std::time::Instant;

/// What a session set up before any flow names (an eager `np up`, `np forward` at start with
/// no targets): ssh is what most users are after.
pub const DEFAULT_TARGET: &str = "localhost:22";

/// The `step` for session setup (`--verbose`): each step on stderr with the milliseconds since
/// this was made; silent otherwise.
pub fn progress(verbose: bool) -> impl Fn(&str) + Send + Sync {
    let t0 = Instant::now();
    move |s: &str| {
        if verbose {
            eprintln!("{:>9.1} ms  {s}", t0.elapsed().as_secs_f64() * 1e3);
        }
    }
}

/// Why a flow could not be opened through a [`SessionSlot`].
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// No session could be set up.
    #[error("setting up a session to {device} via {relay}")]
    Setup {
        device: String,
        /// The relay named with --relay, or "the best relay it trusts".
        relay: String,
        #[source]
        source: SetupError,
    },
    /// The device refused the flow.
    #[error("{device} refused {target}: {reason}")]
    Refused { device: String, target: String, reason: String },
    /// The session failed (twice, or in a way a new one would not fix).
    #[error("session to {device}")]
    Session {
        device: String,
        #[source]
        source: SessionError,
    },
}

/// Reuses one session for every flow; sets up a new one when it has ended.
pub struct SessionSlot {
    connector: Connector,
    device: DeviceRef,
    targets: Vec<String>,
    current: tokio::sync::Mutex<Option<SessionHandle>>,
    verbose: bool,
}

impl SessionSlot {
    /// A slot for sessions to `device` through the connector's relay choice, whose requests name `targets` (or, if
    /// empty, each new session's first flow's target).
    pub fn new(connector: Connector, device: DeviceRef, targets: Vec<String>, verbose: bool) -> Self {
        SessionSlot { connector, device, targets, current: tokio::sync::Mutex::new(None), verbose }
    }

    /// The device.
    pub fn device(&self) -> &DeviceRef {
        &self.device
    }

    /// The live session, set up if there is none. A new session's request names the slot's
    /// targets, or if it has none, `first`: the target of the flow that needs it (a device
    /// refuses a request that names none).
    pub async fn get(&self, first: Option<&str>) -> Result<SessionHandle, SlotError> {
        let mut cur = self.current.lock().await;
        if let Some(h) = cur.as_ref() {
            match (h.error(), h.transport_state()) {
                (None, np_session::TransportState::Live) => return Ok(h.clone()),
                // Its flows wait for it to resume (it keeps at it on its own); a new flow
                // should not wait with them, for a relay that may not come back or a device
                // that may have forgotten the session.
                (None, _) => tracing::info!(device = %self.device, "session resuming; a new one for new flows"),
                (Some(_), _) => tracing::info!(device = %self.device, "session ended; setting up a new one"),
            }
        }
        let step = progress(self.verbose);
        let targets = match (self.targets.is_empty(), first) {
            (true, Some(t)) => vec![t.to_string()],
            (true, None) => vec![DEFAULT_TARGET.to_string()],
            (false, _) => self.targets.clone(),
        };
        let (h, relay) = self.connector.open_session_best(&self.device, &targets, &step).await.map_err(|source| {
            let relay = match self.connector.choice.pinned_relay() {
                Some(r) => format!("relay {r}"),
                None => "the best relay it trusts".to_string(),
            };
            SlotError::Setup { device: self.device.to_string(), relay, source }
        })?;
        // "... session ready" last: scripts and tests read the setup time from that line.
        step(&format!("via relay {relay}: session ready"));
        *cur = Some(h.clone());
        Ok(h)
    }

    /// Opens a flow to `target` on the live session. A session found stale (the relay
    /// restarted, the network changed: it ended without anyone noticing yet) is replaced once.
    pub async fn open(&self, target: &str) -> Result<FlowStream, SlotError> {
        for attempt in 0..2 {
            let session = self.get(Some(target)).await?;
            match session.open(target).await {
                Ok(f) => return Ok(f),
                Err(OpenError::Refused(reason)) => {
                    return Err(SlotError::Refused { device: self.device.to_string(), target: target.into(), reason })
                }
                Err(OpenError::Session(e)) if attempt == 0 && e.is_stale() => {
                    tracing::info!(device = %self.device, error = %e, "session broke; setting up a new one");
                    self.reset().await;
                }
                Err(OpenError::Session(source)) => {
                    return Err(SlotError::Session { device: self.device.to_string(), source })
                }
            }
        }
        Err(SlotError::Session { device: self.device.to_string(), source: SessionError::Closed("no session".into()) })
    }

    /// Forgets a session that failed.
    pub async fn reset(&self) {
        *self.current.lock().await = None;
    }

    /// The session's state, in words.
    pub async fn describe(&self) -> String {
        match self.current.try_lock() {
            Err(_) => "connecting".into(),
            Ok(cur) => match cur.as_ref() {
                None => "none yet".into(),
                Some(h) => match h.error() {
                    None if h.transport_state() != np_session::TransportState::Live => {
                        "resuming (the relay connection broke)".into()
                    }
                    None => "established".into(),
                    Some(e) => format!("ended: {e}"),
                },
            },
        }
    }
}
