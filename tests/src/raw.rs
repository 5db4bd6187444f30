//! The control-plane protocol spoken by hand, so tests can send what a real client never would.

use np_control_proto::{ClientFrame, ServerFrame, ServerHello, MAX_FRAME, TLS_SERVER_NAME};
use np_wire::io::{read_msg, write_msg};
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS connection to the control plane after the hello.
pub struct RawConn {
    pub tls: TlsStream<TcpStream>,
    pub nonce: [u8; 32],
}

impl RawConn {
    /// Connects with the certificate pinned to `pin` (hex SHA-256) and reads the hello.
    pub async fn connect(addr: SocketAddr, pin: &str) -> anyhow::Result<RawConn> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = np_control_client::tls::pinned_connector(pin)?;
        let name = rustls::pki_types::ServerName::try_from(TLS_SERVER_NAME)?;
        let mut tls = connector.connect(name, tcp).await?;
        let hello: ServerHello = read_msg(&mut tls, MAX_FRAME).await?.ok_or_else(|| anyhow::anyhow!("no hello"))?;
        Ok(RawConn { tls, nonce: hello.nonce })
    }

    pub async fn send(&mut self, f: &ClientFrame) -> anyhow::Result<()> {
        write_msg(&mut self.tls, f).await?;
        Ok(())
    }

    pub async fn send_bytes(&mut self, b: &[u8]) -> anyhow::Result<()> {
        self.tls.write_all(b).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// The next frame, `None` on a close.
    pub async fn recv(&mut self) -> anyhow::Result<Option<ServerFrame>> {
        Ok(read_msg(&mut self.tls, MAX_FRAME).await?)
    }
}

/// The pinned fingerprint stored in a home for `name`.
pub fn pin_of(home: &std::path::Path, name: &str) -> String {
    let h = np_identity::home::Home::new(home);
    h.load_control(&name.parse().unwrap_or_else(|_| panic!("bad name {name}")))
        .map(|c| c.cert_sha256)
        .unwrap_or_default()
}
