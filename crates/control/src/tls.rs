//! The server's TLS identity: a self-signed certificate created on first start and kept in the
//! data directory. Clients do not check it against a CA; they pin its SHA-256, which they learn
//! from their enrolment code.

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// The certificate and key the server presents.
pub struct TlsIdentity {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl TlsIdentity {
    /// Loads `cert.der`/`key.der` from `dir`, creating them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let (cp, kp) = (dir.join("cert.der"), dir.join("key.der"));
        if cp.exists() && kp.exists() {
            let cert_der = fs::read(&cp).with_context(|| format!("reading {}", cp.display()))?;
            let key_der = fs::read(&kp).with_context(|| format!("reading {}", kp.display()))?;
            return Ok(TlsIdentity { cert_der, key_der });
        }
        let ck = rcgen::generate_simple_self_signed(vec![np_control_proto::TLS_SERVER_NAME.to_string()])
            .context("generating the server certificate")?;
        let cert_der = ck.cert.der().to_vec();
        let key_der = ck.signing_key.serialize_der();
        write_private(&kp, &key_der)?;
        write_private(&cp, &cert_der)?;
        Ok(TlsIdentity { cert_der, key_der })
    }

    /// What clients pin.
    pub fn fingerprint(&self) -> String {
        np_control_proto::cert_fingerprint(&self.cert_der)
    }

    /// A rustls server configuration (TLS 1.3 only: nothing old to be compatible with).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("configuring TLS")?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .context("loading the server certificate")?;
        Ok(Arc::new(cfg))
    }
}

fn write_private(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("creating {}", p.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", p.display()))
}
