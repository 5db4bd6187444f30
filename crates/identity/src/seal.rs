//! Messages sealed to a recipient and signed by the sender.
//!
//! The encryption is one message of the Noise `X` one-way pattern (`-> e, es, s, ss`), done by
//! `snow`: the recipient's static X25519 key is known, the sender's static key travels encrypted
//! and is authenticated by the `ss` term. The Noise prologue binds both names, so an envelope
//! cannot be re-addressed. On top, the sender signs the whole envelope with its Ed25519 key, so
//! the control plane (which cannot decrypt) and the recipient can check who sent it before doing
//! any work.

use crate::{verify, IdentityError, Keys, Name, PublicKeys};
use serde::{Deserialize, Serialize};

pub(crate) const NOISE_X: &str = "Noise_X_25519_AESGCM_SHA256";
const DOMAIN: &[u8] = b"np-envelope-v1";
/// Largest plaintext one envelope carries (one Noise message is at most 65535 bytes).
pub const MAX_PLAINTEXT: usize = 60_000;

/// A sealed, signed message from one identity to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender.
    pub from: Name,
    /// The recipient.
    pub to: Name,
    /// Sender's clock when sealed, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The Noise `X` message: ephemeral key, encrypted sender static key, encrypted payload.
    pub noise: Vec<u8>,
    /// Ed25519 signature by `from` over everything above.
    pub sig: Vec<u8>,
}

fn prologue(from: &Name, to: &Name, created_ms: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + 80);
    p.extend_from_slice(DOMAIN);
    for part in [from.as_str().as_bytes(), to.as_str().as_bytes()] {
        p.extend_from_slice(&(part.len() as u32).to_be_bytes());
        p.extend_from_slice(part);
    }
    p.extend_from_slice(&created_ms.to_be_bytes());
    p
}

impl Envelope {
    /// Encrypts `plaintext` to `to` (whose public keys are `to_keys`) and signs it as `from`.
    pub fn seal(
        from: &Name,
        from_keys: &Keys,
        to: &Name,
        to_keys: &PublicKeys,
        created_ms: u64,
        plaintext: &[u8],
    ) -> Result<Self, IdentityError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(IdentityError::Seal(format!("{} bytes exceeds {MAX_PLAINTEXT}", plaintext.len())));
        }
        let params = NOISE_X.parse().map_err(|e| IdentityError::Seal(format!("{e:?}")))?;
        let pro = prologue(from, to, created_ms);
        let mut hs = snow::Builder::new(params)
            .local_private_key(from_keys.x25519_private())
            .and_then(|b| b.remote_public_key(&to_keys.x25519))
            .and_then(|b| b.prologue(&pro))
            .and_then(|b| b.build_initiator())
            .map_err(|e| IdentityError::Seal(format!("{e:?}")))?;
        let mut noise = vec![0u8; plaintext.len() + 200];
        let n = hs.write_message(plaintext, &mut noise).map_err(|e| IdentityError::Seal(format!("{e:?}")))?;
        noise.truncate(n);
        let mut env = Envelope { from: from.clone(), to: to.clone(), created_ms, noise, sig: Vec::new() };
        env.sig = from_keys.sign(&env.signed_bytes()).to_vec();
        Ok(env)
    }

    /// The bytes the sender's signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut b = prologue(&self.from, &self.to, self.created_ms);
        b.extend_from_slice(&self.noise);
        b
    }

    /// Checks the sender's signature only (what the control plane can do).
    pub fn verify_sender(&self, from_signing: &[u8; 32]) -> Result<(), IdentityError> {
        verify(from_signing, &self.signed_bytes(), &self.sig)
    }

    /// Verifies and decrypts as the recipient. `from_keys` are the sender's known public keys;
    /// the sender's static X25519 key inside the Noise message must match them.
    pub fn open(&self, my_keys: &Keys, from_keys: &PublicKeys) -> Result<Vec<u8>, IdentityError> {
        self.verify_sender(&from_keys.signing).map_err(|_| IdentityError::Unseal)?;
        let params = NOISE_X.parse().map_err(|_| IdentityError::Unseal)?;
        let pro = prologue(&self.from, &self.to, self.created_ms);
        let mut hs = snow::Builder::new(params)
            .local_private_key(my_keys.x25519_private())
            .and_then(|b| b.prologue(&pro))
            .and_then(|b| b.build_responder())
            .map_err(|_| IdentityError::Unseal)?;
        let mut out = vec![0u8; self.noise.len()];
        let n = hs.read_message(&self.noise, &mut out).map_err(|_| IdentityError::Unseal)?;
        if hs.get_remote_static() != Some(&from_keys.x25519[..]) {
            return Err(IdentityError::Unseal);
        }
        out.truncate(n);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        s.parse().expect("name")
    }

    #[test]
    fn seal_open_and_every_tamper_fails() {
        let (a, b, c) = (Keys::generate().expect("k"), Keys::generate().expect("k"), Keys::generate().expect("k"));
        let env = Envelope::seal(&name("@a"), &a, &name("@b"), &b.public(), 42, b"secret marker").expect("seal");
        assert!(!env.noise.windows(6).any(|w| w == b"secret"));
        assert_eq!(env.open(&b, &a.public()).expect("open"), b"secret marker");
        // Wrong recipient, or a claimed sender whose keys do not match.
        assert!(env.open(&c, &a.public()).is_err());
        assert!(env.open(&b, &c.public()).is_err());
        // Flip each byte of the Noise message and the signature in turn.
        for i in 0..env.noise.len() {
            let mut t = env.clone();
            t.noise[i] ^= 1;
            assert!(t.open(&b, &a.public()).is_err(), "noise byte {i}");
        }
        for i in 0..env.sig.len() {
            let mut t = env.clone();
            t.sig[i] ^= 0x80;
            assert!(t.open(&b, &a.public()).is_err(), "sig byte {i}");
        }
        // Re-addressed or re-dated envelopes fail.
        let mut t = env.clone();
        t.created_ms += 1;
        assert!(t.open(&b, &a.public()).is_err());
        let mut t = env;
        t.to = name("@c");
        assert!(t.open(&b, &a.public()).is_err());
    }
}
