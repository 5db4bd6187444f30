//! Identities: who is who in np, and the keys that prove it.
//!
//! An identity is a name such as `@alice`. It owns an Ed25519 key (signatures: authentication to
//! the control plane and relay, signed records and messages) and an X25519 key (messages sealed
//! to it). Private halves are created on the edge machine by [`home::Home`] and never leave it.

mod error;
pub mod home;
mod keys;
mod name;
pub mod seal;

pub use error::IdentityError;
pub use keys::{verify, Keys, PublicKeys, SIGNATURE_LEN};
pub use name::{DeviceRef, Name};
pub use seal::Envelope;

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), IdentityError> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| IdentityError::Random)
}

/// A fresh random 32-byte value.
pub fn random32() -> Result<[u8; 32], IdentityError> {
    let mut b = [0u8; 32];
    random_bytes(&mut b)?;
    Ok(b)
}
