//! The side's half of the protocol, for the client (`np`) and the device daemon (`npd`).

use crate::proto::{join_transcript, Join, RelayMsg, Role, MAX_PREAUTH_FRAME};
use np_identity::{Keys, Name};
use np_wire::io::{read_msg, write_msg};
use np_wire::WireError;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long [`join`] waits, from the first byte to `Paired`. Longer than the relay's default
/// pairing deadline (10 s), so a peer that never comes shows up as the relay's clear refusal.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why joining a session at the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The relay refused, with its reason.
    #[error("relay refused: {0}")]
    Refused(String),
    /// The relay is not the one the caller meant to use.
    #[error("relay introduced itself as {actual}, expected {expected}")]
    WrongRelay {
        /// The relay the caller asked for.
        expected: Name,
        /// The name in the relay's Challenge.
        actual: Name,
    },
    /// Nothing decisive arrived in time.
    #[error("timed out after {0:?} waiting for the relay to {1}")]
    Timeout(Duration, &'static str),
    /// The relay closed the connection without a reason.
    #[error("relay closed the connection while waiting to {0}")]
    Closed(&'static str),
    /// The relay sent something this side does not understand.
    #[error("relay protocol error: {0}")]
    Protocol(String),
}

/// Authenticates `stream` (already connected to the relay) as `identity` in `role` for
/// `session` with `peer`, waits until the peer is there too, and returns the stream ready for
/// raw bytes. If `expected_relay` is given, a relay with another name is refused.
pub async fn join(
    stream: TcpStream,
    keys: &Keys,
    identity: &Name,
    role: Role,
    session: [u8; 16],
    peer: &Name,
    expected_relay: Option<&Name>,
) -> Result<TcpStream, JoinError> {
    join_with_timeout(stream, keys, identity, role, session, peer, expected_relay, DEFAULT_JOIN_TIMEOUT).await
}

/// [`join`] with an explicit overall timeout.
#[allow(clippy::too_many_arguments)]
pub async fn join_with_timeout(
    mut stream: TcpStream,
    keys: &Keys,
    identity: &Name,
    role: Role,
    session: [u8; 16],
    peer: &Name,
    expected_relay: Option<&Name>,
    timeout: Duration,
) -> Result<TcpStream, JoinError> {
    let deadline = Instant::now() + timeout;
    let _ = stream.set_nodelay(true);
    let (relay, nonce) = match next(&mut stream, deadline, timeout, "send its challenge").await? {
        RelayMsg::Challenge { relay, nonce } => (relay, nonce),
        other => return Err(unexpected(&other, "challenge")),
    };
    if let Some(expected) = expected_relay {
        if *expected != relay {
            return Err(JoinError::WrongRelay { expected: expected.clone(), actual: relay });
        }
    }
    let transcript = join_transcript(&relay, &nonce, identity, role, &session, peer);
    let join =
        Join { identity: identity.clone(), role, session, peer: peer.clone(), sig: keys.sign(&transcript).to_vec() };
    tokio::time::timeout_at(deadline, write_msg(&mut stream, &join))
        .await
        .map_err(|_| JoinError::Timeout(timeout, "accept the join"))?
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    match next(&mut stream, deadline, timeout, "accept the join").await? {
        RelayMsg::Waiting => {}
        other => return Err(unexpected(&other, "waiting")),
    }
    match next(&mut stream, deadline, timeout, "pair the session").await? {
        RelayMsg::Paired => Ok(stream),
        other => Err(unexpected(&other, "paired")),
    }
}

async fn next(
    stream: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
) -> Result<RelayMsg, JoinError> {
    // read_msg reads exactly one frame, so bytes after `Paired` stay in the socket.
    match tokio::time::timeout_at(deadline, read_msg(stream, MAX_PREAUTH_FRAME)).await {
        Err(_) => Err(JoinError::Timeout(timeout, what)),
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None) | Err(WireError::Truncated | WireError::Io(_))) => Err(JoinError::Closed(what)),
        Ok(Err(e)) => Err(JoinError::Protocol(e.to_string())),
    }
}

fn unexpected(msg: &RelayMsg, wanted: &str) -> JoinError {
    match msg {
        RelayMsg::Refused { reason } => JoinError::Refused(reason.clone()),
        other => JoinError::Protocol(format!("expected {wanted}, got {other:?}")),
    }
}
