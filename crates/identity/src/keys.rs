use crate::IdentityError;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes in an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The public halves of an identity's keys: what the control plane stores and publishes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    /// Ed25519 verifying key.
    pub signing: [u8; 32],
    /// X25519 public key that messages are sealed to.
    pub x25519: [u8; 32],
}

impl fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKeys(ed25519:{}, x25519:{})", hex::encode(&self.signing[..8]), hex::encode(&self.x25519[..8]))
    }
}

impl PublicKeys {
    /// A short fingerprint for humans (first 16 hex digits of each key).
    pub fn fingerprint(&self) -> String {
        format!("{}:{}", hex::encode(&self.signing[..8]), hex::encode(&self.x25519[..8]))
    }
}

/// An identity's private keys. Never serialised onto the network; `Debug` shows no secret.
pub struct Keys {
    signing: Ed25519KeyPair,
    signing_seed: [u8; 32],
    x25519_private: [u8; 32],
    public: PublicKeys,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({:?})", self.public)
    }
}

impl Keys {
    /// Fresh keys from the system's random source.
    pub fn generate() -> Result<Self, IdentityError> {
        let seed = crate::random32()?;
        let x = snow::Builder::new(crate::seal::NOISE_X.parse().map_err(|_| IdentityError::Random)?)
            .generate_keypair()
            .map_err(|_| IdentityError::Random)?;
        let mut xp = [0u8; 32];
        let mut xpub = [0u8; 32];
        xp.copy_from_slice(&x.private);
        xpub.copy_from_slice(&x.public);
        Self::from_parts(seed, xp, xpub)
    }

    /// Rebuilds keys from their stored secrets.
    pub fn from_parts(
        signing_seed: [u8; 32],
        x25519_private: [u8; 32],
        x25519_public: [u8; 32],
    ) -> Result<Self, IdentityError> {
        let signing = Ed25519KeyPair::from_seed_unchecked(&signing_seed).map_err(|_| IdentityError::Random)?;
        let mut spub = [0u8; 32];
        spub.copy_from_slice(signing.public_key().as_ref());
        Ok(Keys { signing, signing_seed, x25519_private, public: PublicKeys { signing: spub, x25519: x25519_public } })
    }

    /// The public halves.
    pub fn public(&self) -> PublicKeys {
        self.public
    }

    /// Signs `msg` with the Ed25519 key.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.signing.sign(msg).as_ref());
        out
    }

    /// The X25519 private key, for handshakes (Noise) that this identity takes part in.
    pub fn x25519_private(&self) -> &[u8; 32] {
        &self.x25519_private
    }

    pub(crate) fn signing_seed(&self) -> &[u8; 32] {
        &self.signing_seed
    }
}

/// Verifies an Ed25519 signature.
pub fn verify(signing_pk: &[u8; 32], msg: &[u8], sig: &[u8]) -> Result<(), IdentityError> {
    UnparsedPublicKey::new(&ED25519, signing_pk).verify(msg, sig).map_err(|_| IdentityError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let k = Keys::generate().expect("keys");
        let sig = k.sign(b"hello");
        assert!(verify(&k.public().signing, b"hello", &sig).is_ok());
        assert!(verify(&k.public().signing, b"hellO", &sig).is_err());
        let other = Keys::generate().expect("keys");
        assert!(verify(&other.public().signing, b"hello", &sig).is_err());
        assert!(!format!("{k:?}").contains(&hex::encode(k.signing_seed())));
    }
}
