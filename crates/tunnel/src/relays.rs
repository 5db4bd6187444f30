//! Relays by identity: where a relay is reached comes only from the record it signed itself
//! ([`np_relay_proto::RelayInfo`], fetched from the control plane and verified against the relay's
//! pinned key), and whoever answers there must prove it holds that key for this connection.
//! No address from a peer's message is ever dialled.

use np_control_client::ControlClient;
use np_identity::Name;
use np_relay_proto::{join_with_timeout, ExpectedRelay, RelayInfo, Role, RELAY_RECORD};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long a fetched relay record is used before it is fetched again. Short, so a relay that
/// moved is found again within seconds; a failed join forgets it at once.
const RECORD_TTL: Duration = Duration::from_secs(30);
/// Relay records remembered at most (one per relay used; a device trusts a handful).
const MAX_CACHED: usize = 256;

/// Why a relay could not be joined. The device shows none of this to a requester (it answers
/// [`crate::admission::Refusal::CannotReachRelay`] whatever happened); it is for logs and for the
/// client's own messages.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay's keys or record could not be had from the control plane.
    #[error("no usable record for relay {relay}: {reason}")]
    NoRecord { relay: Name, reason: String },
    /// None of the relay's addresses could be reached and joined.
    #[error("cannot reach relay {relay}: {reason}")]
    Unreachable { relay: Name, reason: String },
}

/// The relay records in use, cached briefly. Cheap to clone.
#[derive(Clone, Default)]
pub struct RelayBook {
    cache: Arc<Mutex<HashMap<Name, (Instant, RelayInfo)>>>,
    /// Addresses the local user gave for a relay, used instead of its record (`np forward
    /// --relay-address`): the relay must still prove its identity there.
    overrides: Arc<HashMap<Name, Vec<String>>>,
}

impl RelayBook {
    /// A book that dials `relay` at `addresses` instead of the ones it publishes. Only for the
    /// local user's own side (a client behind a port forward, say, or a test's proxy); a device
    /// never takes an address from anyone but the relay.
    pub fn with_override(relay: Name, addresses: Vec<String>) -> RelayBook {
        RelayBook { cache: Arc::default(), overrides: Arc::new(HashMap::from([(relay, addresses)])) }
    }

    /// The relay's signed record (from the cache if recent).
    pub async fn info(&self, ctl: &ControlClient, relay: &Name) -> Result<RelayInfo, RelayError> {
        if let Some(addresses) = self.overrides.get(relay) {
            return Ok(RelayInfo { addresses: addresses.clone(), region: None });
        }
        if let Some((at, info)) = self.cache.lock().ok().and_then(|c| c.get(relay).cloned()) {
            if at.elapsed() < RECORD_TTL {
                return Ok(info);
            }
        }
        let no_record = |reason: String| RelayError::NoRecord { relay: relay.clone(), reason };
        // `fetch` checks the record's signature against the relay's pinned key.
        let record = ctl.fetch(relay, RELAY_RECORD).await.map_err(|e| no_record(e.to_string()))?;
        let info = RelayInfo::decode(&record.value).map_err(|e| no_record(e.to_string()))?;
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= MAX_CACHED {
                c.clear();
            }
            c.insert(relay.clone(), (Instant::now(), info.clone()));
        }
        Ok(info)
    }

    /// Forgets a relay's record (after a failed join, so the next try fetches it anew).
    pub fn forget(&self, relay: &Name) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(relay);
        }
    }

    /// Connects to `relay` at its published addresses, in order, and joins `session` as
    /// `role` with `peer`, checking that the relay proves its identity. `timeout` bounds the
    /// whole attempt, pairing included.
    pub async fn join(
        &self,
        ctl: &ControlClient,
        relay: &Name,
        role: Role,
        session: [u8; 16],
        peer: &Name,
        timeout: Duration,
    ) -> Result<TcpStream, RelayError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let result = tokio::time::timeout_at(deadline, self.try_join(ctl, relay, role, session, peer, deadline)).await;
        let result = result.unwrap_or_else(|_| {
            Err(RelayError::Unreachable { relay: relay.clone(), reason: format!("no answer within {timeout:?}") })
        });
        if result.is_err() {
            self.forget(relay);
        }
        result
    }

    async fn try_join(
        &self,
        ctl: &ControlClient,
        relay: &Name,
        role: Role,
        session: [u8; 16],
        peer: &Name,
        deadline: tokio::time::Instant,
    ) -> Result<TcpStream, RelayError> {
        let keys = ctl
            .lookup(relay)
            .await
            .map_err(|e| RelayError::NoRecord { relay: relay.clone(), reason: e.to_string() })?;
        let info = self.info(ctl, relay).await?;
        let expected = ExpectedRelay { name: relay, signing: &keys.signing };
        let mut reasons = Vec::new();
        for address in &info.addresses {
            let tcp = match TcpStream::connect(address.as_str()).await {
                Ok(t) => t,
                Err(e) => {
                    reasons.push(format!("{address}: {e}"));
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match join_with_timeout(tcp, ctl.keys(), ctl.me(), role, session, peer, Some(expected), left).await {
                Ok(stream) => return Ok(stream),
                Err(e) => reasons.push(format!("{address}: {e}")),
            }
        }
        Err(RelayError::Unreachable { relay: relay.clone(), reason: reasons.join("; ") })
    }
}
