//! The production [`KeyDirectory`]: asks the control plane, as the relay's own enrolled identity,
//! and remembers what it learnt so the relay keeps serving known identities through a
//! control-plane outage.

use crate::directory::{KeyDirectory, Lookup};
use np_control_client::{ClientError, ControlClient, ErrorCode};
use np_identity::home::Home;
use np_identity::{Name, PublicKeys};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest a Join waits for the control plane. Below the relay's default auth deadline (5 s), so
/// a side whose keys cannot be fetched hears "unknown identity" rather than a timeout.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long "no such identity" is believed: short, so a newly enrolled identity works within a
/// second or two, but enough that a flood of Joins for one made-up name costs one lookup.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Entries of the negative cache at most; it is cleared when full (a flood of made-up names
/// must not grow memory).
const NEGATIVE_MAX: usize = 4096;
/// First and last wait between attempts to reach the control plane at start.
const CONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Keys from the control plane, cached.
///
/// Keys are pinned on first use (by the control client, in the relay's home) and cached in
/// memory by the control client, which confirms a cached key again once it is older than
/// [`np_control_client::KEY_TTL`]: an identity revoked on the control plane is refused here
/// within seconds, while an identity seen once keeps working when the control plane cannot be
/// reached. A control plane that later serves a different key for it is refused (pin error).
pub struct ControlDirectory {
    client: watch::Receiver<Option<ControlClient>>,
    /// Identities looked up successfully before (their pin exists; see `fetching`).
    known: Mutex<HashSet<Name>>,
    unknown: Mutex<HashMap<Name, Instant>>,
    /// One first-time lookup at a time: the control client pins keys to a file in the home,
    /// and two pins of one name at once race on that file. Only the first Join of an identity
    /// takes this lock; later ones are answered from `known`.
    fetching: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl ControlDirectory {
    /// Starts connecting to `me`'s control plane (from `home`) in the background, retrying until it
    /// answers, and returns at once. Fails only if `home` has no usable keys or control-plane
    /// configuration for `me`: those are operator errors worth stopping for.
    pub fn connect(home: &Home, me: &Name) -> Result<ControlDirectory, np_identity::IdentityError> {
        home.load_keys(me)?;
        let control = home.load_control(me)?;
        let (slot, client) = watch::channel(None);
        let (home, me) = (home.clone(), me.clone());
        tokio::spawn(async move {
            let mut backoff = CONNECT_BACKOFF.0;
            loop {
                match ControlClient::connect(&home, &me).await {
                    Ok((c, incoming)) => {
                        tracing::info!(address = %control.address, identity = %me, "connected to the control plane");
                        tokio::spawn(ignore_notifications(incoming));
                        let _ = slot.send(Some(c));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(address = %control.address, error = %e, "cannot reach the control plane yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(CONNECT_BACKOFF.1);
                    }
                }
            }
        });
        Ok(ControlDirectory {
            client,
            known: Mutex::new(HashSet::new()),
            unknown: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            timeout: LOOKUP_TIMEOUT,
        })
    }

    /// Whether the first connection to the control plane has succeeded (the client reconnects
    /// by itself afterwards).
    pub fn connected(&self) -> bool {
        self.client.borrow().is_some()
    }

    /// Waits up to `timeout` for the first connection; returns whether it is up.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.client.clone();
        tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await.is_ok_and(|r| r.is_ok())
    }

    /// The control-plane client once connected, waiting up to `timeout` for the first connection
    /// (for publishing the relay's own record).
    pub async fn client_within(&self, timeout: Duration) -> Option<ControlClient> {
        self.client(tokio::time::Instant::now() + timeout).await
    }

    /// The client, waiting until `deadline` for the first connection.
    async fn client(&self, deadline: tokio::time::Instant) -> Option<ControlClient> {
        let mut rx = self.client.clone();
        let ready = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
        ready.ok().and_then(|r| r.ok()).and_then(|c| c.clone())
    }

    fn recently_unknown(&self, name: &Name) -> bool {
        self.unknown.lock().ok().and_then(|m| m.get(name).copied()).is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
    }

    fn remember_unknown(&self, name: &Name) {
        if let Ok(mut m) = self.unknown.lock() {
            if m.len() >= NEGATIVE_MAX {
                m.clear();
            }
            m.insert(name.clone(), Instant::now());
        }
    }

    fn seen_before(&self, name: &Name) -> bool {
        self.known.lock().ok().is_some_and(|m| m.contains(name))
    }

    async fn fetch(&self, name: &Name) -> Option<PublicKeys> {
        if self.recently_unknown(name) {
            return None;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        // First-time lookups one at a time (they write the pin file); later ones, answered from
        // the control client's cache or confirmed with the control plane, run side by side.
        let _one = if self.seen_before(name) {
            None
        } else {
            let Ok(one) = tokio::time::timeout_at(deadline, self.fetching.lock()).await else {
                tracing::warn!(%name, "key lookup failed: earlier lookups are still waiting for the control plane");
                return None;
            };
            // Another Join may have learnt it, or that it does not exist, while this one waited.
            if self.recently_unknown(name) {
                return None;
            }
            Some(one)
        };
        let Some(client) = self.client(deadline).await else {
            tracing::warn!(%name, "control plane not reached yet: cannot look up an identity seen for the first time");
            return None;
        };
        match tokio::time::timeout_at(deadline, client.lookup(name)).await {
            Ok(Ok(keys)) => {
                if let Ok(mut m) = self.known.lock() {
                    m.insert(name.clone());
                }
                if let Ok(mut m) = self.unknown.lock() {
                    m.remove(name);
                }
                Some(keys)
            }
            Ok(Err(ClientError::Refused { code: ErrorCode::UnknownIdentity, .. })) => {
                if let Ok(mut m) = self.known.lock() {
                    if m.remove(name) {
                        tracing::warn!(%name, "identity no longer enrolled (revoked): refusing its joins");
                    }
                }
                tracing::debug!(%name, "not enrolled");
                self.remember_unknown(name);
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(%name, error = %e, "key lookup failed");
                None
            }
            Err(_) => {
                tracing::warn!(%name, timeout = ?self.timeout, "key lookup failed: the control plane did not answer");
                None
            }
        }
    }
}

/// A relay uses no notifications; whatever arrives for it is read and dropped (the control
/// client acknowledges it), so nothing piles up in the control plane's queue for the relay.
async fn ignore_notifications(mut incoming: np_control_client::Incoming) {
    while let Some(m) = incoming.recv().await {
        tracing::debug!(from = %m.from, bytes = m.payload.len(), "ignoring a notification (a relay uses none)");
    }
}

impl KeyDirectory for ControlDirectory {
    fn lookup<'a>(&'a self, name: &'a Name) -> Lookup<'a> {
        Box::pin(self.fetch(name))
    }
}
