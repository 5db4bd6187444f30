//! An authenticated round trip to a relay, for choosing among relays (`np relays`).
//!
//! The relay protocol has no ping, so the probe is the relay's authenticated join challenge:
//! connect, read the Challenge, send a Join for a throwaway session with ourselves, and check
//! the relay's signed proof in its `Waiting` answer; then hang up, which frees the place at once
//! (the relay watches waiting sides for a close). The time covers the TCP handshake and the two
//! round trips of the exchange, and on the relay its check of our key (a control-plane look-up
//! when it has not seen us lately). Only a relay that holds the expected identity's key can
//! produce the proof, so whatever answers at an address cannot pass for a near relay.

use crate::join::{authenticate, ExpectedRelay, JoinError};
use crate::msg::Role;
use np_identity::{Keys, Name};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted a connection there.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// Where.
        address: String,
        /// The system's reason.
        reason: String,
    },
    /// No complete answer before the deadline.
    #[error("no answer from {address} within {timeout:?}")]
    Timeout {
        /// Where.
        address: String,
        /// The deadline the probe had.
        timeout: Duration,
    },
    /// Something answered, but the exchange failed (a refusal, another relay, no proof, garbage).
    #[error("{address}: {source}")]
    Join {
        /// Where.
        address: String,
        /// What went wrong.
        source: JoinError,
    },
}

/// Probes `relay` at `address` as `me`, within `timeout`; the time to a verified proof.
pub async fn probe(
    address: &str,
    keys: &Keys,
    me: &Name,
    relay: ExpectedRelay<'_>,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let timed_out = || ProbeError::Timeout { address: address.to_string(), timeout };
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(ProbeError::Connect { address: address.to_string(), reason: e.to_string() }),
        Ok(Ok(s)) => s,
    };
    let mut session = [0u8; 16];
    np_identity::random_bytes(&mut session)
        .map_err(|e| ProbeError::Join { address: address.to_string(), source: JoinError::Protocol(e.to_string()) })?;
    match authenticate(&mut stream, keys, me, Role::Client, session, me, Some(relay), deadline, timeout).await {
        Ok(()) => Ok(started.elapsed()),
        Err(JoinError::Timeout(..)) => Err(timed_out()),
        Err(source) => Err(ProbeError::Join { address: address.to_string(), source }),
    }
}
