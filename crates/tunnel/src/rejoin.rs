//! Keeping a session across the death of its relay connection: both ends rejoin the same relay
//! for the same session and hand the new stream to the session, which resumes on it
//! (`np_session::resume`: an exchange authenticated by the session's keys, then the records the
//! other side lacks, resent as they were).
//!
//! The relay pairs the rejoining ends by the session id and the two identities, as at setup,
//! authenticating each Join by its identity's signature; it cannot splice two sessions, because
//! whoever answers on the new stream must prove it holds this session's keys before a byte is
//! resent. A relay that is down is retried, with backoff, until the session's resume window ends.
//!
//! The client also asks the device, over the control plane, whether it still holds the session:
//! a device daemon that restarted has forgotten it (and its keys), and waiting out the window
//! would only stall the flows; the session is ended at once with a clear error instead, and new
//! flows get a new session. The question also wakes the device's own rejoining: the device
//! tries by itself only for [`DEVICE_EAGER`] after a break (enough for a relay that restarts,
//! which both ends see at once), then waits to be asked, so a client that does not resume (or
//! is gone) does not have it knocking at the relay for the whole window.

use crate::msg::TunnelMsg;
use crate::relays::RelayBook;
use crate::router::Router;
use np_control_client::ControlClient;
use np_identity::Name;
use np_relay_proto::Role;
use np_session::SessionHandle;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long one rejoin may wait at the relay for the other end: longer than the relay's pairing
/// deadline (10 s), so a peer that does not come shows up as the relay's refusal.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Waits between attempts: quick at first (a relay restarting is back within a second or two),
/// then every few seconds, so a relay that is gone for long costs little.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// How long the resume exchange may take on a stream the relay paired: two messages each way.
/// A peer that says nothing in that time (or a relay that paired us with a silent stranger) is
/// left for another attempt rather than waited on until the window ends.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the device's word on whether it still holds the session.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the device rejoins by itself after a break before it waits for the client to ask.
pub const DEVICE_EAGER: Duration = Duration::from_secs(30);

/// The error a session is closed with when its device no longer holds it.
pub const DEVICE_FORGOT: &str =
    "the device no longer holds this session (its npd restarted?): it cannot resume; new flows get a new session";

/// Where and as whom a session rejoins.
#[derive(Clone)]
pub struct Rejoin {
    pub ctl: ControlClient,
    pub relays: RelayBook,
    pub relay: Name,
    pub role: Role,
    pub session: [u8; 16],
    /// The identity at the other end.
    pub peer: Name,
    /// For the client: ask the device (this name, at `peer`) whether it still holds the session.
    pub ask_device: Option<(Router, String)>,
    /// For the device: rejoin by itself for this long after a break, then only when `kick`
    /// is notified (the client asked about the session). `None`: until the session ends.
    pub eager_for: Option<Duration>,
    pub kick: Arc<Notify>,
}

/// Keeps `handle` alive across transport losses until it ends.
pub fn keep(handle: SessionHandle, r: Rejoin) {
    let sid = crate::client::session_id(&r.session);
    let span = tracing::info_span!("resume", session = %sid, relay = %r.relay);
    tokio::spawn(tracing::Instrument::instrument(run(handle, r), span));
}

async fn run(handle: SessionHandle, r: Rejoin) {
    let mut resumes = 0u64;
    while handle.transport_lost().await.is_ok() {
        let t0 = Instant::now();
        tracing::info!("the session's transport broke; rejoining the relay to resume");
        if let Some((router, device)) = &r.ask_device {
            let (h, r, router, device) = (handle.clone(), r.clone(), router.clone(), device.clone());
            tokio::spawn(async move {
                if let Ok(false) = device_holds(&r, &router, &device).await {
                    tracing::warn!(device = %device, "{DEVICE_FORGOT}");
                    h.close(DEVICE_FORGOT);
                }
            });
        }
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        let mut until = r.eager_for.map(|d| Instant::now() + d);
        loop {
            if handle.error().is_some() {
                return;
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                tracing::debug!(attempts, "no peer at the relay yet; waiting for it to ask");
                tokio::select! {
                    _ = r.kick.notified() => {}
                    _ = handle.closed() => return,
                }
                until = r.eager_for.map(|d| Instant::now() + d);
                backoff = FIRST_BACKOFF;
            }
            attempts += 1;
            match r.relays.join(&r.ctl, &r.relay, r.role, r.session, &r.peer, REJOIN_TIMEOUT).await {
                Ok(stream) => {
                    if handle.resume_with(stream).is_err() {
                        return;
                    }
                    let outcome = match tokio::time::timeout(EXCHANGE_TIMEOUT, handle.resumed()).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::warn!(attempts, "the resume exchange stalled; rejoining again");
                            Ok(false)
                        }
                    };
                    match outcome {
                        Ok(true) => {
                            resumes += 1;
                            tracing::info!(
                                elapsed_ms = t0.elapsed().as_millis() as u64,
                                attempts,
                                resumes,
                                "session resumed"
                            );
                            break;
                        }
                        Ok(false) => {
                            let error = handle.resume_error().map(|e| e.to_string()).unwrap_or_default();
                            tracing::warn!(%error, attempts, "resume attempt failed; rejoining again");
                        }
                        Err(_) => return,
                    }
                }
                Err(e) => tracing::debug!(error = %e, attempts, "rejoining the relay failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    if let Some(e) = handle.error() {
        tracing::debug!(error = %e, "session over; no more resumes");
    }
}

/// Asks the device whether it still holds the session. `Err` when it cannot be asked or did
/// not answer: then only the resume window decides.
async fn device_holds(r: &Rejoin, router: &Router, device: &str) -> Result<bool, ()> {
    let mut query_id = [0u8; 16];
    np_identity::random_bytes(&mut query_id).map_err(|_| ())?;
    let answer = router.expect(query_id);
    let msg = TunnelMsg::SessionQuery { query_id, device: device.to_string(), session: r.session };
    if let Err(e) = r.ctl.send(&r.peer, &msg.encode(), QUERY_TIMEOUT).await {
        tracing::debug!(error = %e, "cannot ask the device about the session");
        router.forget(&query_id);
        return Err(());
    }
    let result = match tokio::time::timeout(QUERY_TIMEOUT, answer).await {
        Ok(Ok(a)) if a.from == r.peer => match a.msg {
            TunnelMsg::SessionStatus { held, .. } => Ok(held),
            _ => Err(()),
        },
        _ => Err(()),
    };
    router.forget(&query_id);
    result
}
