//! The side's half of the protocol, for the client (`np`) and the device daemon (`npd`).

use crate::msg::{join_transcript, proof_transcript, Join, RelayMsg, Role, MAX_PREAUTH_FRAME};
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
    /// Whatever answered did not prove that it holds the relay identity's key for this
    /// connection.
    #[error("the relay did not prove that it is {0}")]
    NoProof(Name),
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

/// The relay a side means to join: its identity and the signing key it must prove it holds.
#[derive(Clone, Copy, Debug)]
pub struct ExpectedRelay<'a> {
    /// The relay's identity, as in its Challenge.
    pub name: &'a Name,
    /// Its Ed25519 public key (from the control plane, pinned).
    pub signing: &'a [u8; 32],
}

/// Authenticates `stream` (already connected to the relay) as `identity` in `role` for
/// `session` with `peer`, waits until the peer is there too, and returns the stream ready for
/// raw bytes. If `expected_relay` is given, a relay with another name, or one that does not
/// prove it holds that name's key for this connection, is refused before any session byte.
pub async fn join(
    stream: TcpStream,
    keys: &Keys,
    identity: &Name,
    role: Role,
    session: [u8; 16],
    peer: &Name,
    expected_relay: Option<ExpectedRelay<'_>>,
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
    expected_relay: Option<ExpectedRelay<'_>>,
    timeout: Duration,
) -> Result<TcpStream, JoinError> {
    let deadline = Instant::now() + timeout;
    authenticate(&mut stream, keys, identity, role, session, peer, expected_relay, deadline, timeout).await?;
    match next(&mut stream, deadline, timeout, "pair the session").await? {
        RelayMsg::Paired => Ok(stream),
        other => Err(unexpected(&other, "paired")),
    }
}

/// The exchange up to `Waiting`: the relay's challenge, our Join, and its proof (checked
/// against `expected_relay` if given). Afterwards the relay holds our place in the session.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn authenticate(
    stream: &mut TcpStream,
    keys: &Keys,
    identity: &Name,
    role: Role,
    session: [u8; 16],
    peer: &Name,
    expected_relay: Option<ExpectedRelay<'_>>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), JoinError> {
    let _ = stream.set_nodelay(true);
    let (relay, nonce) = match next(stream, deadline, timeout, "send its challenge").await? {
        RelayMsg::Challenge { relay, nonce } => (relay, nonce),
        other => return Err(unexpected(&other, "challenge")),
    };
    if let Some(expected) = expected_relay {
        if *expected.name != relay {
            return Err(JoinError::WrongRelay { expected: expected.name.clone(), actual: relay });
        }
    }
    let side_nonce = np_identity::random32().map_err(|e| JoinError::Protocol(e.to_string()))?;
    let transcript = join_transcript(&relay, &nonce, identity, role, &session, peer);
    let join = Join {
        identity: identity.clone(),
        role,
        session,
        peer: peer.clone(),
        side_nonce,
        sig: keys.sign(&transcript).to_vec(),
    };
    tokio::time::timeout_at(deadline, write_msg(stream, &join))
        .await
        .map_err(|_| JoinError::Timeout(timeout, "accept the join"))?
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    match next(stream, deadline, timeout, "accept the join").await? {
        RelayMsg::Waiting { proof } => {
            if let Some(expected) = expected_relay {
                np_identity::verify(expected.signing, &proof_transcript(&transcript, &side_nonce), &proof)
                    .map_err(|_| JoinError::NoProof(relay.clone()))?;
            }
            Ok(())
        }
        other => Err(unexpected(&other, "waiting")),
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
