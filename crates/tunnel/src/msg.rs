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
    /// What the client's session layer knows beyond TCP flows. Last, so a device too old to
    /// know the field reads the request as before (postcard ignores trailing bytes), and absent
    /// in an older client's request, which decodes as no features.
    pub features: Features,
}

/// Feature bits of a session, offered by the client in its request and answered by the device
/// in handshake message 2 (which it sends only to a client that offered some: an older client
/// refuses a payload there). A session uses a feature only when both sides have it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Features(pub u32);

impl Features {
    /// UDP associations in the mux (`UdpOpen`, `Datagram`, `UdpClose` frames).
    pub const UDP: Features = Features(1);
    /// The side that offers it will rejoin and resume the session when its relay connection
    /// breaks. A device keeps a session waiting for that only if its client said so: one that
    /// will not come back (an `np nc` that exited) must not hold a place for the resume window.
    pub const RESUME: Features = Features(2);

    /// Everything this build knows.
    pub fn ours() -> Features {
        Features(Features::UDP.0 | Features::RESUME.0)
    }

    /// These bits, less those of `f`.
    pub fn without(self, f: Features) -> Features {
        Features(self.0 & !f.0)
    }

    /// Whether every bit of `f` is set.
    pub fn has(self, f: Features) -> bool {
        self.0 & f.0 == f.0 && f.0 != 0
    }

    /// The bits both have.
    pub fn common(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// The handshake payload form (empty for none, so a device with nothing to say sends the
    /// same message 2 as before).
    pub fn to_payload(self) -> Vec<u8> {
        if self.0 == 0 {
            Vec::new()
        } else {
            self.0.to_be_bytes().to_vec()
        }
    }

    /// Reads [`Features::to_payload`]; unknown lengths mean none.
    pub fn from_payload(b: &[u8]) -> Features {
        <[u8; 4]>::try_from(b).map(|a| Features(u32::from_be_bytes(a))).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for Features {
    /// The field is the request's last: an older client's request ends before it, and the
    /// error at that end means "no features", not a bad request.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(u32::deserialize(d).map(Features).unwrap_or_default())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(features: Features) -> SessionRequest {
        SessionRequest {
            request_id: [1; 16],
            timestamp_ms: 7,
            device: "pi4".into(),
            relay: "@relay".parse().expect("name"),
            session: [2; 16],
            handshake: vec![3; 48],
            targets: vec!["localhost:22".into()],
            features,
        }
    }

    /// The request as a client without the features field encoded it.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum OldMsg {
        SessionRequest(OldRequest),
    }
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct OldRequest {
        request_id: [u8; 16],
        timestamp_ms: u64,
        device: String,
        relay: Name,
        session: [u8; 16],
        handshake: Vec<u8>,
        targets: Vec<String>,
    }

    #[test]
    fn features_are_compatible_both_ways() {
        let new = TunnelMsg::SessionRequest(req(Features::ours()));
        assert_eq!(TunnelMsg::decode(&new.encode()), Some(new.clone()));
        // An older device reads a newer request.
        let old: OldMsg = postcard::from_bytes(&new.encode()).expect("old device decodes");
        let OldMsg::SessionRequest(o) = &old;
        assert_eq!(o.targets, vec!["localhost:22".to_string()]);
        // A newer device reads an older request as one without features.
        let bytes = postcard::to_stdvec(&old).expect("encode");
        assert_eq!(TunnelMsg::decode(&bytes), Some(TunnelMsg::SessionRequest(req(Features::default()))));
        assert!(Features::ours().has(Features::UDP));
        assert!(Features::ours().has(Features::RESUME));
        let no_resume = Features::ours().without(Features::RESUME);
        assert!(no_resume.has(Features::UDP) && !no_resume.has(Features::RESUME));
        assert!(!no_resume.common(Features::ours()).has(Features::RESUME));
        assert!(!Features::default().has(Features::UDP));
        assert_eq!(Features::from_payload(&Features::UDP.to_payload()), Features::UDP);
        assert_eq!(Features::from_payload(&[]), Features::default());
        assert_eq!(Features::from_payload(&[1, 2, 3]), Features::default());
    }
}
