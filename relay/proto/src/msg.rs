//! The relay's pre-pairing protocol: the frames a side and the relay exchange before raw bytes.
//!
//! ```text
//! relay -> side   Challenge { relay, nonce }          fresh nonce per connection
//! side  -> relay  Join { identity, role, session, peer, side_nonce, sig }
//! relay -> side   Waiting { proof }                   authenticated, waiting for the peer;
//!                                                     proof: the relay's signature over the
//!                                                     Join and the side's nonce
//! relay -> side   Paired                              from here on: raw bytes both ways
//! relay -> side   Refused { reason }                  then close (at any point before Paired)
//! ```
//! Every frame is an np-wire frame (u32 BE length + postcard body) of at most
//! [`MAX_PREAUTH_FRAME`] bytes.

use np_identity::Name;
use np_wire::{decode_msg, FrameDecoder, WireError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest frame either side accepts before pairing. A Join is about 200 bytes.
pub const MAX_PREAUTH_FRAME: usize = 4096;

/// Domain separation tag of the Join signature.
pub const JOIN_DOMAIN: &[u8] = b"np-relay-join-v1";

/// Domain separation tag of the relay's proof of its identity.
pub const PROOF_DOMAIN: &[u8] = b"np-relay-proof-v1";

/// Which end of a session a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The side that asked for the session (`np`).
    Client,
    /// The device daemon (`npd`).
    Device,
}

impl Role {
    /// The other role.
    pub fn other(self) -> Role {
        match self {
            Role::Client => Role::Device,
            Role::Device => Role::Client,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Device => "device",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame the relay sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    /// First frame on every connection: who the relay is and the nonce to sign.
    Challenge {
        /// The relay's name, signed into the Join so a Join for one relay is useless at another.
        relay: Name,
        /// Fresh per connection, so a captured Join cannot be replayed.
        nonce: [u8; 32],
    },
    /// The Join was accepted; the peer has not arrived yet.
    Waiting {
        /// Ed25519 signature by the relay's identity over [`proof_transcript`]: the relay holds
        /// the key of the name in its Challenge, and answers this very connection (the side's
        /// fresh nonce is in it). Empty from a relay run without keys (tests only).
        proof: Vec<u8>,
    },
    /// Both sides are here; every following byte is the peer's.
    Paired,
    /// The relay will not carry this connection; it closes after this frame.
    Refused {
        /// Human-readable reason.
        reason: String,
    },
}

/// The frame a side sends to claim its place in a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// Who this side is; `sig` must verify with this identity's signing key.
    pub identity: Name,
    /// Which end of the session this side is.
    pub role: Role,
    /// Session id chosen by the client and sent to the device end-to-end encrypted.
    pub session: [u8; 16],
    /// The identity expected at the other end.
    pub peer: Name,
    /// Fresh per connection, chosen by the side: the relay's proof covers it, so a proof
    /// captured from another connection is useless.
    pub side_nonce: [u8; 32],
    /// Ed25519 signature by `identity` over [`join_transcript`].
    pub sig: Vec<u8>,
}

/// The bytes the relay's proof covers: a domain tag, the Join's transcript (relay name, relay
/// nonce, who joins as what for which session) and the side's nonce, each length-prefixed.
pub fn proof_transcript(join_transcript: &[u8], side_nonce: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(join_transcript.len() + 64);
    for field in [PROOF_DOMAIN, join_transcript, side_nonce.as_slice()] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// The bytes a Join signature covers: a domain tag, then each field length-prefixed (u32 BE),
/// so no two different field tuples can produce the same transcript.
pub fn join_transcript(
    relay: &Name,
    nonce: &[u8; 32],
    identity: &Name,
    role: Role,
    session: &[u8; 16],
    peer: &Name,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for field in [
        JOIN_DOMAIN,
        relay.as_str().as_bytes(),
        nonce.as_slice(),
        identity.as_str().as_bytes(),
        role.as_str().as_bytes(),
        session.as_slice(),
        peer.as_str().as_bytes(),
    ] {
        // Fields are at most a few dozen bytes; the conversion cannot fail.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// The session id as short hex, for logs.
pub fn short_hex(session: &[u8; 16]) -> String {
    session[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes the Join from the bytes a side sent before its first frame ended: the same path the
/// relay takes on the socket (size limit on the prefix, then postcard), as a pure function.
/// `Ok(None)` means more bytes are needed.
pub fn decode_join(bytes: &[u8]) -> Result<Option<Join>, WireError> {
    let mut dec = FrameDecoder::new(MAX_PREAUTH_FRAME);
    dec.push(bytes);
    match dec.next_frame()? {
        None => Ok(None),
        Some(frame) => decode_msg(&frame).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use np_wire::encode_msg;
    use proptest::prelude::*;

    fn name(s: &str) -> Name {
        s.parse().expect("valid name")
    }

    #[test]
    fn transcript_fields_cannot_shift() {
        let r = name("@relay");
        let a = join_transcript(&r, &[1; 32], &name("@ab"), Role::Client, &[2; 16], &name("@c"));
        let b = join_transcript(&r, &[1; 32], &name("@a"), Role::Client, &[2; 16], &name("@bc"));
        assert_ne!(a, b);
        let c = join_transcript(&r, &[1; 32], &name("@ab"), Role::Device, &[2; 16], &name("@c"));
        assert_ne!(a, c);
    }

    #[test]
    fn join_roundtrips_and_oversize_is_refused() {
        let j = Join {
            identity: name("@alice"),
            role: Role::Device,
            session: [9; 16],
            peer: name("@bob"),
            side_nonce: [3; 32],
            sig: vec![7; 64],
        };
        let bytes = encode_msg(&j);
        assert_eq!(decode_join(&bytes), Ok(Some(j)));
        assert_eq!(decode_join(&bytes[..bytes.len() - 1]), Ok(None));
        assert!(matches!(decode_join(&[0xff, 0xff, 0xff, 0xff]), Err(WireError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let _ = decode_join(&bytes);
        }

        #[test]
        fn garbage_after_valid_prefix_never_panics(body in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let r = decode_join(&bytes);
            if body.len() > MAX_PREAUTH_FRAME {
                prop_assert!(matches!(r, Err(WireError::TooLarge { .. })), "expected TooLarge");
            }
        }
    }
}
