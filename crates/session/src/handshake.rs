//! Noise `KK` handshake (`Noise_KK_25519_AESGCM_SHA256`) via `snow`.
//!
//! Both sides already know each other's static X25519 key from the identity records, so `KK`
//! authenticates both in one round trip. The session keys mix in the ephemeral-ephemeral DH of
//! message 2, so a recorded session stays secret if a long-term key is stolen later.
//!
//! Message 1 travels inside the encrypted control-plane request, message 2 over the relay
//! connection. Message 1 carries no payload; message 2 may carry the device's feature bits (at
//! most [`MAX_FEATURES_LEN`] bytes, encrypted and authenticated by the handshake), but only when
//! the client's request said it reads them: an older client refuses any payload. The prologue is chosen by the caller and binds the
//! session id, identity names and relay address: a mismatch makes the handshake fail.

use crate::SessionError;

/// The Noise protocol name; both sides must agree on it exactly.
pub const NOISE_PARAMS: &str = "Noise_KK_25519_AESGCM_SHA256";

/// Size of each handshake message without payload: a 32-byte ephemeral key and a 16-byte tag.
pub const HANDSHAKE_MSG_LEN: usize = 48;

/// Longest feature payload message 2 may carry.
pub const MAX_FEATURES_LEN: usize = 16;

/// Which end of the handshake this side was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sent message 1 (the client).
    Initiator,
    /// Answered with message 2 (the device).
    Responder,
}

/// Per-direction 32-byte AES-256-GCM keys from the finished handshake.
///
/// The initiator sends with the first split key, the responder with the second. Key bytes are
/// overwritten when dropped (best effort: no `unsafe`, so no volatile write).
pub struct SessionKeys {
    role: Role,
    initiator_to_responder: [u8; 32],
    responder_to_initiator: [u8; 32],
    handshake_hash: [u8; 32],
}

impl SessionKeys {
    /// This side's role in the handshake.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The key this side seals records with.
    pub fn send_key(&self) -> &[u8; 32] {
        match self.role {
            Role::Initiator => &self.initiator_to_responder,
            Role::Responder => &self.responder_to_initiator,
        }
    }

    /// The key this side opens records with.
    pub fn recv_key(&self) -> &[u8; 32] {
        match self.role {
            Role::Initiator => &self.responder_to_initiator,
            Role::Responder => &self.initiator_to_responder,
        }
    }

    /// The Noise handshake hash: identical on both sides, usable for channel binding.
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys").field("role", &self.role).finish_non_exhaustive()
    }
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        self.initiator_to_responder.fill(0);
        self.responder_to_initiator.fill(0);
        std::hint::black_box(&self.initiator_to_responder);
        std::hint::black_box(&self.responder_to_initiator);
    }
}

/// The client's half-finished handshake, waiting for message 2.
pub struct Initiator {
    state: snow::HandshakeState,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator").finish_non_exhaustive()
    }
}

fn builder<'a>(
    my_private: &'a [u8; 32],
    peer_public: &'a [u8; 32],
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, SessionError> {
    let params: snow::params::NoiseParams =
        NOISE_PARAMS.parse().map_err(|_| SessionError::Handshake("unsupported noise parameters"))?;
    snow::Builder::new(params)
        .local_private_key(my_private)
        .and_then(|b| b.remote_public_key(peer_public))
        .and_then(|b| b.prologue(prologue))
        .map_err(|_| SessionError::Handshake("bad handshake key material"))
}

fn split(state: &mut snow::HandshakeState, role: Role) -> Result<SessionKeys, SessionError> {
    if !state.is_handshake_finished() {
        return Err(SessionError::Handshake("handshake not finished"));
    }
    let (first, second) = state.dangerously_get_raw_split();
    let mut handshake_hash = [0u8; 32];
    let h = state.get_handshake_hash();
    if h.len() != 32 {
        return Err(SessionError::Handshake("unexpected handshake hash length"));
    }
    handshake_hash.copy_from_slice(h);
    Ok(SessionKeys { role, initiator_to_responder: first, responder_to_initiator: second, handshake_hash })
}

/// Reads a handshake message that must carry no payload.
fn read_empty(state: &mut snow::HandshakeState, msg: &[u8]) -> Result<(), SessionError> {
    if msg.len() != HANDSHAKE_MSG_LEN {
        return Err(SessionError::Crypto);
    }
    let mut payload = [0u8; HANDSHAKE_MSG_LEN];
    let n = state.read_message(msg, &mut payload).map_err(|_| SessionError::Crypto)?;
    if n != 0 {
        return Err(SessionError::Crypto);
    }
    Ok(())
}

impl Initiator {
    /// Starts a handshake towards the device; returns the state to keep and message 1 to send.
    pub fn start(
        my_x25519_private: &[u8; 32],
        device_x25519_public: &[u8; 32],
        prologue: &[u8],
    ) -> Result<(Initiator, Vec<u8>), SessionError> {
        let mut state = builder(my_x25519_private, device_x25519_public, prologue)?
            .build_initiator()
            .map_err(|_| SessionError::Handshake("cannot build initiator"))?;
        let mut msg1 = vec![0u8; HANDSHAKE_MSG_LEN];
        let n = state.write_message(&[], &mut msg1).map_err(|_| SessionError::Crypto)?;
        msg1.truncate(n);
        Ok((Initiator { state }, msg1))
    }

    /// Consumes the device's message 2 and yields the session keys.
    pub fn finish(mut self, msg2: &[u8]) -> Result<SessionKeys, SessionError> {
        read_empty(&mut self.state, msg2)?;
        split(&mut self.state, Role::Initiator)
    }

    /// [`Initiator::finish`] for a client that asked for the device's features: message 2 may
    /// carry them (empty from a device too old to know any).
    pub fn finish_with_features(mut self, msg2: &[u8]) -> Result<(SessionKeys, Vec<u8>), SessionError> {
        if msg2.len() < HANDSHAKE_MSG_LEN || msg2.len() > HANDSHAKE_MSG_LEN + MAX_FEATURES_LEN {
            return Err(SessionError::Crypto);
        }
        let mut payload = [0u8; HANDSHAKE_MSG_LEN + MAX_FEATURES_LEN];
        let n = self.state.read_message(msg2, &mut payload).map_err(|_| SessionError::Crypto)?;
        let features = payload.get(..n).ok_or(SessionError::Crypto)?.to_vec();
        Ok((split(&mut self.state, Role::Initiator)?, features))
    }
}

/// Both ends of a whole handshake between two throwaway static keys, run in memory: the
/// (initiator, responder) session keys. For tests and fuzzing, which need a session but no
/// identities; real sessions always run [`Initiator`] and [`Responder`] on separate hosts.
pub fn in_memory_pair(prologue: &[u8]) -> Result<(SessionKeys, SessionKeys), SessionError> {
    let params: snow::params::NoiseParams =
        NOISE_PARAMS.parse().map_err(|_| SessionError::Handshake("unsupported noise parameters"))?;
    let keypair = || {
        let k = snow::Builder::new(params.clone())
            .generate_keypair()
            .map_err(|_| SessionError::Handshake("cannot generate a key pair"))?;
        let private: [u8; 32] =
            k.private.as_slice().try_into().map_err(|_| SessionError::Handshake("bad handshake key material"))?;
        let public: [u8; 32] =
            k.public.as_slice().try_into().map_err(|_| SessionError::Handshake("bad handshake key material"))?;
        Ok::<_, SessionError>((private, public))
    };
    let ((c_private, c_public), (d_private, d_public)) = (keypair()?, keypair()?);
    let (init, msg1) = Initiator::start(&c_private, &d_public, prologue)?;
    let (msg2, device) = Responder::respond(&d_private, &c_public, prologue, &msg1)?;
    Ok((init.finish(&msg2)?, device))
}

/// The device's side of the handshake: one call, as `KK` needs only one message each way.
#[derive(Debug)]
pub struct Responder;

impl Responder {
    /// Checks the client's message 1 and returns message 2 plus the session keys.
    pub fn respond(
        my_x25519_private: &[u8; 32],
        client_x25519_public: &[u8; 32],
        prologue: &[u8],
        msg1: &[u8],
    ) -> Result<(Vec<u8>, SessionKeys), SessionError> {
        Responder::respond_with_features(my_x25519_private, client_x25519_public, prologue, msg1, &[])
    }

    /// [`Responder::respond`] with `features` in message 2, for a client that said it reads
    /// them (at most [`MAX_FEATURES_LEN`] bytes).
    pub fn respond_with_features(
        my_x25519_private: &[u8; 32],
        client_x25519_public: &[u8; 32],
        prologue: &[u8],
        msg1: &[u8],
        features: &[u8],
    ) -> Result<(Vec<u8>, SessionKeys), SessionError> {
        if features.len() > MAX_FEATURES_LEN {
            return Err(SessionError::Handshake("feature payload too long"));
        }
        let mut state = builder(my_x25519_private, client_x25519_public, prologue)?
            .build_responder()
            .map_err(|_| SessionError::Handshake("cannot build responder"))?;
        read_empty(&mut state, msg1)?;
        let mut msg2 = vec![0u8; HANDSHAKE_MSG_LEN + features.len()];
        let n = state.write_message(features, &mut msg2).map_err(|_| SessionError::Crypto)?;
        msg2.truncate(n);
        let keys = split(&mut state, Role::Responder)?;
        Ok((msg2, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use np_identity::Keys;

    fn pair() -> (Keys, Keys) {
        (Keys::generate().expect("keys"), Keys::generate().expect("keys"))
    }

    fn run(client: &Keys, device: &Keys, p1: &[u8], p2: &[u8]) -> Result<(SessionKeys, SessionKeys), SessionError> {
        let (init, msg1) = Initiator::start(client.x25519_private(), &device.public().x25519, p1)?;
        assert_eq!(msg1.len(), HANDSHAKE_MSG_LEN);
        let (msg2, dev_keys) = Responder::respond(device.x25519_private(), &client.public().x25519, p2, &msg1)?;
        let cli_keys = init.finish(&msg2)?;
        Ok((cli_keys, dev_keys))
    }

    #[test]
    fn keys_match_per_direction() {
        let (c, d) = pair();
        let (ck, dk) = run(&c, &d, b"sess", b"sess").expect("handshake");
        assert_eq!(ck.send_key(), dk.recv_key());
        assert_eq!(ck.recv_key(), dk.send_key());
        assert_ne!(ck.send_key(), ck.recv_key());
        assert_eq!(ck.handshake_hash(), dk.handshake_hash());
        assert_eq!(ck.role(), Role::Initiator);
        assert_eq!(dk.role(), Role::Responder);
    }

    #[test]
    fn fresh_keys_each_session() {
        let (c, d) = pair();
        let (a, _) = run(&c, &d, b"p", b"p").expect("handshake");
        let (b, _) = run(&c, &d, b"p", b"p").expect("handshake");
        assert_ne!(a.send_key(), b.send_key());
    }

    #[test]
    fn prologue_mismatch_fails() {
        let (c, d) = pair();
        assert!(matches!(run(&c, &d, b"relay-a", b"relay-b"), Err(SessionError::Crypto)));
    }

    #[test]
    fn wrong_static_keys_fail() {
        let (c, d) = pair();
        let (_, mallory) = pair();
        // Device expects mallory as the client.
        let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        assert!(Responder::respond(d.x25519_private(), &mallory.public().x25519, b"p", &msg1).is_err());
        // Mallory answers instead of the device.
        let (init2, msg1b) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        let r = Responder::respond(mallory.x25519_private(), &c.public().x25519, b"p", &msg1b);
        if let Ok((msg2, _)) = r {
            assert!(init2.finish(&msg2).is_err());
        }
        drop(init);
    }

    #[test]
    fn tampered_messages_fail() {
        let (c, d) = pair();
        for i in 0..HANDSHAKE_MSG_LEN {
            let (_, mut msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
            msg1[i] ^= 1;
            assert!(Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &msg1).is_err());
        }
        for i in 0..HANDSHAKE_MSG_LEN {
            let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
            let (mut msg2, _) =
                Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &msg1).expect("respond");
            msg2[i] ^= 0x80;
            assert!(init.finish(&msg2).is_err());
        }
    }

    #[test]
    fn wrong_lengths_fail() {
        let (c, d) = pair();
        let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        let mut long = msg1.clone();
        long.push(0);
        assert!(Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &long).is_err());
        assert!(Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &msg1[..47]).is_err());
        assert!(Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &[]).is_err());
        assert!(init.finish(&[0u8; 10]).is_err());
    }

    #[test]
    fn features_travel_in_message_2_only_to_a_client_that_reads_them() {
        let (c, d) = pair();
        let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        let (msg2, dk) =
            Responder::respond_with_features(d.x25519_private(), &c.public().x25519, b"p", &msg1, &[0, 0, 0, 1])
                .expect("respond");
        let (ck, features) = init.finish_with_features(&msg2).expect("finish");
        assert_eq!(features, vec![0, 0, 0, 1]);
        assert_eq!(ck.send_key(), dk.recv_key());
        // An older client (strict `finish`) refuses a payload: a device sends one only when asked.
        let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        let (msg2, _) = Responder::respond_with_features(d.x25519_private(), &c.public().x25519, b"p", &msg1, &[1])
            .expect("respond");
        assert!(init.finish(&msg2).is_err());
        // A new client reads an older device's empty answer as no features.
        let (init, msg1) = Initiator::start(c.x25519_private(), &d.public().x25519, b"p").expect("start");
        let (msg2, _) = Responder::respond(d.x25519_private(), &c.public().x25519, b"p", &msg1).expect("respond");
        assert_eq!(init.finish_with_features(&msg2).expect("finish").1, Vec::<u8>::new());
        let too_long = [0u8; MAX_FEATURES_LEN + 1];
        assert!(
            Responder::respond_with_features(d.x25519_private(), &c.public().x25519, b"p", &msg1, &too_long).is_err()
        );
    }
}
