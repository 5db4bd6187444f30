//! The byte strings that authentication signatures cover. Each is domain-separated and
//! length-prefixed, so no field can be shifted into another.

use np_identity::{Name, PublicKeys};

fn push(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// What an identity signs to authenticate on a connection whose hello carried `nonce`.
pub fn auth_transcript(nonce: &[u8; 32], name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    push(&mut out, b"np-control-auth-v1");
    push(&mut out, nonce);
    push(&mut out, name.as_str().as_bytes());
    out
}

/// What a new identity signs when enrolling: proves it holds the private key of what it enrols.
pub fn enroll_transcript(nonce: &[u8; 32], name: &Name, keys: &PublicKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    push(&mut out, b"np-control-enroll-v1");
    push(&mut out, nonce);
    push(&mut out, name.as_str().as_bytes());
    push(&mut out, &keys.signing);
    push(&mut out, &keys.x25519);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_differ_by_domain_and_nonce() {
        let n: Name = "@a".parse().expect("n");
        let k = PublicKeys { signing: [1; 32], x25519: [2; 32] };
        assert_ne!(auth_transcript(&[0; 32], &n), auth_transcript(&[1; 32], &n));
        assert_ne!(auth_transcript(&[0; 32], &n), enroll_transcript(&[0; 32], &n, &k));
    }
}
