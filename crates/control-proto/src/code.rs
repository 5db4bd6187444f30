//! Enrolment codes: a one-time secret plus the server certificate's fingerprint, so that the
//! code alone lets a new identity both prove it was invited and pin the server (as join tokens
//! carry a CA hash).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::str::FromStr;

/// Every code starts with this, so a pasted wrong string is recognised at once.
pub const CODE_PREFIX: &str = "npe1_";

/// A parsed enrolment code.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolCode {
    /// The one-time secret; the server stores only its hash.
    pub secret: [u8; 16],
    /// SHA-256 of the server's certificate.
    pub cert_sha256: [u8; 32],
}

impl fmt::Debug for EnrolCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnrolCode(cert {})", hex::encode(&self.cert_sha256[..8]))
    }
}

/// Why a string is not an enrolment code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not an enrolment code: expected {CODE_PREFIX}… as printed by `np-control enroll`")]
pub struct BadCode;

impl EnrolCode {
    /// Hash of the secret, the key under which the server stores the code.
    pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret).as_ref());
        out
    }

    /// The pinned certificate fingerprint as hex.
    pub fn cert_hex(&self) -> String {
        hex::encode(self.cert_sha256)
    }
}

impl fmt::Display for EnrolCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(48);
        raw.extend_from_slice(&self.secret);
        raw.extend_from_slice(&self.cert_sha256);
        write!(f, "{CODE_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }
}

impl FromStr for EnrolCode {
    type Err = BadCode;
    fn from_str(s: &str) -> Result<Self, BadCode> {
        let body = s.trim().strip_prefix(CODE_PREFIX).ok_or(BadCode)?;
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| BadCode)?;
        if raw.len() != 48 {
            return Err(BadCode);
        }
        let mut secret = [0u8; 16];
        let mut cert_sha256 = [0u8; 32];
        secret.copy_from_slice(&raw[..16]);
        cert_sha256.copy_from_slice(&raw[16..]);
        Ok(EnrolCode { secret, cert_sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let c = EnrolCode { secret: [7; 16], cert_sha256: [9; 32] };
        assert_eq!(c.to_string().parse::<EnrolCode>(), Ok(c.clone()));
        assert_eq!(format!(" {c}\n").parse::<EnrolCode>(), Ok(c));
        for bad in ["", "npe1_", "npe1_!!!", "xyz", "npe1_AAAA"] {
            assert_eq!(bad.parse::<EnrolCode>(), Err(BadCode));
        }
    }
}
