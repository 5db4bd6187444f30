//! Resuming a session on a new transport: the authenticated exchange both ends run before the
//! records go on.
//!
//! # Why it is safe to resume
//!
//! Records carry an implicit counter nonce, so a session's record stream can move to a new byte
//! stream if and only if each side resends *exactly* the sealed records the other has not opened,
//! byte for byte, and then goes on sealing at its own counter. Nothing is ever sealed twice: the
//! sealer's counter only grows, and what is resent is a copy of the ciphertext already sealed
//! (kept by [`crate::retain`] until the peer acknowledges it). So a resumed stream is the same
//! stream, and every flipped, dropped, duplicated or reordered byte still fails to open.
//!
//! # The exchange
//!
//! On the new transport each side first sends a [`Hello`]: a fresh 16-byte random challenge.
//! On the peer's `Hello` it answers with a `Proof`: the number of the peer's records it has opened
//! (the record it wants next) and an HMAC-SHA256 over
//! `"np session resume proof v1" || sender's role || sender's challenge || receiver's challenge || opened`
//! under a key derived from the session:
//! `HKDF-SHA256(salt = Noise handshake hash, ikm = both directions' initial record keys, info =
//! "np session resume key v1")`. When the peer's `Proof` checks out, each side resends its retained
//! records from the count the peer gave and the record stream goes on.
//!
//! - A `Proof` recorded from an earlier resume of the same session (replayed by a relay, say)
//!   answers a challenge that is no longer ours: refused.
//! - A `Proof` from another session is under another key: refused.
//! - Our own `Proof` reflected back names our role, not the peer's: refused.
//! - Only the two edges hold the record keys, so nobody else can compute the key.
//!
//! A refused exchange fails only that attempt (the shell drops the transport and may try again
//! within the resume window); a valid `Proof` whose count is impossible (below what the peer
//! already acknowledged, or beyond what we sealed) ends the session: the peer is broken or lying.
//!
//! Wire format (both fixed length, before any record on the new transport):
//! - `Hello`: `"npRH"`, 16 bytes of challenge.
//! - `Proof`: `"npRP"`, `opened: u64` big-endian, 32 bytes of HMAC.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use ring::{hkdf, hmac, rand::SecureRandom};

use crate::handshake::Role;
use crate::{SessionError, SessionKeys};

/// Whether and how a session may outlive its transport. Both ends of a session must resume for
/// either to (each resends what the other lacks); acknowledgements flow either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeConfig {
    /// Bytes of sealed records kept until the peer acknowledges them. Past this no flow data
    /// is sealed until acknowledgements arrive: the flows see their credit run out
    /// (backpressure, never loss). It must cover the bandwidth-delay product of the path, or it
    /// caps throughput.
    pub retain_limit: usize,
    /// How long a session whose transport broke waits for a resume before its flows reset.
    pub window: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig { retain_limit: 8 << 20, window: Duration::from_secs(600) }
    }
}

const HELLO_MAGIC: &[u8; 4] = b"npRH";
const PROOF_MAGIC: &[u8; 4] = b"npRP";
/// Bytes of a resume challenge: 128 bits, so a recorded `Proof` is never the answer to a new one.
const CHALLENGE_LEN: usize = 16;
/// Bytes of a `Hello`.
pub const HELLO_LEN: usize = 4 + CHALLENGE_LEN;
/// Bytes of a `Proof`.
pub const PROOF_LEN: usize = 4 + 8 + 32;
const KEY_INFO: &[u8] = b"np session resume key v1";
const PROOF_LABEL: &[u8] = b"np session resume proof v1";

/// The session's resume key, derived once from the handshake's keys (see the module docs).
pub(crate) struct ResumeKey(hmac::Key);

impl std::fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeKey")
    }
}

/// `hkdf::KeyType` for a 32-byte HMAC-SHA256 key.
struct HmacKeyLen;

impl hkdf::KeyType for HmacKeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl ResumeKey {
    pub(crate) fn derive(keys: &SessionKeys) -> Result<ResumeKey, SessionError> {
        let (i2r, r2i) = match keys.role() {
            Role::Initiator => (keys.send_key(), keys.recv_key()),
            Role::Responder => (keys.recv_key(), keys.send_key()),
        };
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(i2r);
        ikm[32..].copy_from_slice(r2i);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, keys.handshake_hash()).extract(&ikm);
        ikm.fill(0);
        let info = [KEY_INFO];
        let okm = prk.expand(&info, HmacKeyLen).map_err(|_| SessionError::Crypto)?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).map_err(|_| SessionError::Crypto)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        bytes.fill(0);
        Ok(ResumeKey(key))
    }

    fn proof_input(sender: Role, sender_challenge: &[u8], receiver_challenge: &[u8], opened: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(PROOF_LABEL.len() + 1 + 2 * CHALLENGE_LEN + 8);
        m.extend_from_slice(PROOF_LABEL);
        m.push(match sender {
            Role::Initiator => 1,
            Role::Responder => 2,
        });
        m.extend_from_slice(sender_challenge);
        m.extend_from_slice(receiver_challenge);
        m.extend_from_slice(&opened.to_be_bytes());
        m
    }
}

/// What [`Exchange::handle_input`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// More bytes are needed.
    Wait,
    /// The peer's `Hello` arrived: send this `Proof`.
    SendProof(Vec<u8>),
    /// The peer proved itself: it has opened this many of our records.
    Done { peer_opened: u64 },
}

/// One resume attempt on one new transport: ours and the peer's challenge, and how far it got.
#[derive(Debug)]
pub(crate) struct Exchange {
    role: Role,
    challenge: [u8; CHALLENGE_LEN],
    peer_challenge: Option<[u8; CHALLENGE_LEN]>,
    /// The count of the peer's records we have opened, sent in our `Proof`.
    opened: u64,
}

impl Exchange {
    /// A new attempt for the side that played `role`, having opened `opened` of the peer's
    /// records; returns it and the `Hello` to send.
    pub(crate) fn start(role: Role, opened: u64) -> Result<(Exchange, Vec<u8>), SessionError> {
        let mut challenge = [0u8; CHALLENGE_LEN];
        ring::rand::SystemRandom::new().fill(&mut challenge).map_err(|_| SessionError::Crypto)?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(HELLO_MAGIC);
        hello.extend_from_slice(&challenge);
        Ok((Exchange { role, challenge, peer_challenge: None, opened }, hello))
    }

    /// The count of the peer's records our `Proof` says we opened.
    pub(crate) fn opened(&self) -> u64 {
        self.opened
    }

    fn peer_role(&self) -> Role {
        match self.role {
            Role::Initiator => Role::Responder,
            Role::Responder => Role::Initiator,
        }
    }

    /// Takes the exchange's messages off the front of `input` (what follows them is records).
    /// An error fails this attempt.
    pub(crate) fn handle_input(&mut self, key: &ResumeKey, input: &mut BytesMut) -> Result<Step, SessionError> {
        match self.peer_challenge {
            None => {
                if input.len() < HELLO_LEN {
                    return Ok(Step::Wait);
                }
                if &input[..4] != HELLO_MAGIC {
                    return Err(SessionError::ResumeRefused("the peer's first message is not a resume hello"));
                }
                let mut peer = [0u8; CHALLENGE_LEN];
                peer.copy_from_slice(&input[4..HELLO_LEN]);
                input.advance(HELLO_LEN);
                if peer == self.challenge {
                    // Our own Hello reflected back: answering it would hand out a Proof for it.
                    return Err(SessionError::ResumeRefused("the peer's challenge is our own"));
                }
                self.peer_challenge = Some(peer);
                let tag = hmac::sign(&key.0, &ResumeKey::proof_input(self.role, &self.challenge, &peer, self.opened));
                let mut proof = Vec::with_capacity(PROOF_LEN);
                proof.extend_from_slice(PROOF_MAGIC);
                proof.extend_from_slice(&self.opened.to_be_bytes());
                proof.extend_from_slice(tag.as_ref());
                Ok(Step::SendProof(proof))
            }
            Some(peer) => {
                if input.len() < PROOF_LEN {
                    return Ok(Step::Wait);
                }
                let msg = input.split_to(PROOF_LEN);
                if &msg[..4] != PROOF_MAGIC {
                    return Err(SessionError::ResumeRefused("the peer's second message is not a resume proof"));
                }
                let mut count = [0u8; 8];
                count.copy_from_slice(&msg[4..12]);
                let peer_opened = u64::from_be_bytes(count);
                let signed = ResumeKey::proof_input(self.peer_role(), &peer, &self.challenge, peer_opened);
                hmac::verify(&key.0, &signed, &msg[12..])
                    .map_err(|_| SessionError::ResumeRefused("the peer's resume proof does not authenticate"))?;
                Ok(Step::Done { peer_opened })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Side {
        key: ResumeKey,
        ex: Exchange,
        hello: Vec<u8>,
    }

    fn sides(opened: (u64, u64)) -> (Side, Side) {
        let (ck, dk) = crate::in_memory_pair(b"resume").expect("handshake");
        let side = |k: &SessionKeys, opened| {
            let (ex, hello) = Exchange::start(k.role(), opened).expect("start");
            Side { key: ResumeKey::derive(k).expect("key"), ex, hello }
        };
        (side(&ck, opened.0), side(&dk, opened.1))
    }

    fn feed(s: &mut Side, bytes: &[u8]) -> Result<Step, SessionError> {
        let mut b = BytesMut::from(bytes);
        let r = s.ex.handle_input(&s.key, &mut b);
        if matches!(r, Ok(Step::SendProof(_) | Step::Done { .. })) {
            assert!(b.is_empty(), "a message is taken whole");
        }
        r
    }

    fn proof(step: Step) -> Vec<u8> {
        match step {
            Step::SendProof(p) => p,
            other => panic!("expected a proof, got {other:?}"),
        }
    }

    #[test]
    fn both_sides_learn_what_the_other_opened() {
        let (mut c, mut d) = sides((7, 9));
        let (ch, dh) = (c.hello.clone(), d.hello.clone());
        let cp = proof(feed(&mut c, &dh).expect("hello"));
        let dp = proof(feed(&mut d, &ch).expect("hello"));
        assert_eq!(feed(&mut c, &dp).expect("proof"), Step::Done { peer_opened: 9 });
        assert_eq!(feed(&mut d, &cp).expect("proof"), Step::Done { peer_opened: 7 });
    }

    #[test]
    fn a_proof_recorded_from_an_earlier_resume_is_refused() {
        let (mut c, mut d) = sides((1, 1));
        let (ch, dh) = (c.hello.clone(), d.hello.clone());
        let _ = feed(&mut c, &dh).expect("hello");
        let old_dp = proof(feed(&mut d, &ch).expect("hello"));
        // A second resume of the same session: the device's keys are the same, its old proof
        // answers the client's old challenge.
        let (ex, hello) = Exchange::start(Role::Initiator, 1).expect("start");
        c.ex = ex;
        c.hello = hello;
        let _ = feed(&mut c, &dh).expect("the old hello itself is only a challenge");
        assert!(matches!(feed(&mut c, &old_dp), Err(SessionError::ResumeRefused(_))));
    }

    #[test]
    fn another_sessions_reflected_or_forged_proofs_are_refused() {
        // Session 2's device answers session 1's client: under another key.
        let (mut c, _) = sides((3, 4));
        let (_, mut d2) = sides((3, 4));
        let _ = feed(&mut c, &d2.hello.clone()).expect("hello");
        let other = proof(feed(&mut d2, &c.hello.clone()).expect("hello"));
        assert!(matches!(feed(&mut c, &other), Err(SessionError::ResumeRefused(_))));
        // The client's own proof reflected back to it names the client's role.
        let (mut c3, d3) = sides((3, 4));
        let own = proof(feed(&mut c3, &d3.hello).expect("hello"));
        assert!(matches!(feed(&mut c3, &own), Err(SessionError::ResumeRefused(_))));
        // Every flipped bit of a real proof (magic, count or tag) fails.
        for i in 0..PROOF_LEN * 8 {
            let (mut c4, mut d4) = sides((3, 4));
            let _ = feed(&mut c4, &d4.hello.clone()).expect("hello");
            let mut p = proof(feed(&mut d4, &c4.hello.clone()).expect("hello"));
            p[i / 8] ^= 1 << (i % 8);
            assert!(feed(&mut c4, &p).is_err(), "bit {i}");
        }
    }

    #[test]
    fn our_own_hello_reflected_is_refused_and_garbage_too() {
        let (mut c, _) = sides((0, 0));
        let own = c.hello.clone();
        assert!(matches!(feed(&mut c, &own), Err(SessionError::ResumeRefused(_))));
        let (mut c, _) = sides((0, 0));
        assert!(feed(&mut c, &[0u8; HELLO_LEN]).is_err());
        let (mut c, _) = sides((0, 0));
        assert_eq!(feed(&mut c, &[0u8; HELLO_LEN - 1]).ok(), Some(Step::Wait));
    }
}
