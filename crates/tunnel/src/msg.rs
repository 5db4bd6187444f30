//! Messages between identities, carried sealed and signed by the control plane.

use crate::admission::Refusal;
use np_identity::Name;
use serde::{Deserialize, Serialize};

/// Everything one identity sends another about sessions and policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelMsg {
    /// Client → device: please join me at the relay.
    SessionRequest(SessionRequest),
    /// Device → client: no, and why.
    SessionRefused { request_id: [u8; 16], refusal: Refusal },
    /// Device → policy identity: may `requester` connect to `device`, and to what?
    PolicyQuery { query_id: [u8; 16], requester: Name, device: String, targets: Vec<String> },
    /// Policy identity → device.
    PolicyAnswer { query_id: [u8; 16], allow: bool, permit: Vec<String>, reason: String },
    /// Manager → device: end every live session of `identity` (e.g. after revoking it).
    EndSessions { request_id: [u8; 16], device: String, identity: Name },
    /// Device → manager: done, `count` sessions ended (or refused, with why).
    SessionsEnded { request_id: [u8; 16], result: Result<u32, String> },
    /// Client → device: the transport of session `session` broke; do you still hold it (to
    /// resume), or has it gone (npd restarted)? Answered only about the sender's own sessions.
    SessionQuery { query_id: [u8; 16], device: String, session: [u8; 16] },
    /// Device → client: whether it holds the session named in the query.
    SessionStatus { query_id: [u8; 16], held: bool },
}

/// A client's request for a session with one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRequest {
    /// Fresh random id: single use, echoed in a refusal.
    pub request_id: [u8; 16],
    /// Client clock, ms since the Unix epoch: the daemon refuses stale requests.
    pub timestamp_ms: u64,
    /// The device name (several daemons may share an identity).
    pub device: String,
    /// The relay both sides join, by identity: the device dials it only if it trusts it, at the
    /// address the relay's own signed record gives (never at an address named here).
    pub relay: Name,
    /// The session id both sides present to the relay.
    pub session: [u8; 16],
    /// First message of the Noise KK handshake.
    pub handshake: Vec<u8>,
    /// Targets the client means to reach (checked now for a quick refusal; every flow is
    /// checked again when it opens).
    pub targets: Vec<String>,
}

impl TunnelMsg {
    /// Serialises for sealing.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses a decrypted payload.
    pub fn decode(b: &[u8]) -> Option<TunnelMsg> {
        postcard::from_bytes(b).ok()
    }
}

/// The Noise prologue: binds the handshake to this session, these identities and this device,
/// so a handshake message cannot be replayed into another context.
pub fn prologue(session: &[u8; 16], client: &Name, device_id: &Name, device: &str, relay: &Name) -> Vec<u8> {
    let mut p = b"np-session-v2".to_vec();
    for part in [
        &session[..],
        client.as_str().as_bytes(),
        device_id.as_str().as_bytes(),
        device.as_bytes(),
        relay.as_str().as_bytes(),
    ] {
        p.extend_from_slice(&(part.len() as u32).to_be_bytes());
        p.extend_from_slice(part);
    }
    p
}
