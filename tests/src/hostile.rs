//! Hostile but permitted peers: they set up a session the normal way (signed request, relay
//! join, handshake), then seal records of their own making and never read what comes back.

use np_control_client::ControlClient;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_session::frame::Frame;
use np_session::record::{Sealer, DEFAULT_RECORDS_PER_KEY};
use np_session::{MuxConfig, SessionKeys, MAX_RECORD_PLAINTEXT};
use np_tunnel::{Connector, Router};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stack::Stack;

/// How a session request names the stack's relay (one place to change when relays become
/// identities).
pub fn relay_ref(s: &Stack) -> String {
    s.relay_addr.to_string()
}

/// A session, from the client side, that this process drives by hand.
pub struct HostileClient {
    pub stream: TcpStream,
    pub sealer: Sealer,
    /// Keeps the control-plane connection (and its router) alive for the session's length.
    _ctl: Connector,
    buf: Vec<u8>,
}

impl HostileClient {
    /// Requests a session to `device` as `me` (whose keys are in `home`) and completes the
    /// handshake, as `np forward` would.
    pub async fn open(
        home: &Path,
        me: &str,
        device: &str,
        relay: &str,
        targets: &[String],
    ) -> anyhow::Result<HostileClient> {
        let me: Name = me.parse()?;
        let device: DeviceRef = device.parse()?;
        let (ctl, incoming) = ControlClient::connect(&Home::new(home), &me).await?;
        let (router, _requests) = Router::start(incoming);
        let connector = Connector { ctl, router, timeout: Duration::from_secs(10), mux: MuxConfig::default() };
        let (stream, keys) = connector.open_transport(&device, relay, targets, &|_| {}).await?;
        Ok(HostileClient::new(stream, &keys, connector))
    }

    fn new(stream: TcpStream, keys: &SessionKeys, ctl: Connector) -> HostileClient {
        let sealer = Sealer::with_counter(keys.send_key(), 0, DEFAULT_RECORDS_PER_KEY);
        HostileClient { stream, sealer, _ctl: ctl, buf: Vec::new() }
    }

    /// Seals `plaintext` (at most one record's worth) and writes it, waiting at most `limit`
    /// for the peer to take it. `Ok(false)` when it did not within `limit`.
    pub async fn send(&mut self, plaintext: &[u8], limit: Duration) -> anyhow::Result<bool> {
        self.buf.clear();
        self.sealer.seal(plaintext, &mut self.buf)?;
        match tokio::time::timeout(limit, self.stream.write_all(&self.buf)).await {
            Ok(r) => r.map(|()| true).map_err(Into::into),
            Err(_) => Ok(false),
        }
    }
}

/// One record's plaintext full of `Ping` frames.
pub fn ping_record() -> Vec<u8> {
    let mut pt = Vec::with_capacity(MAX_RECORD_PLAINTEXT);
    let mut id = 0u64;
    while pt.len() + 9 <= MAX_RECORD_PLAINTEXT {
        Frame::Ping { id }.encode(&mut pt);
        id += 1;
    }
    pt
}

/// Records that open `flow` to `target` and fill it with `bytes` of data before any answer.
pub fn open_and_fill(flow: u32, target: &str, bytes: usize) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut first = Vec::new();
    Frame::Open { flow, target: target.to_owned() }.encode(&mut first);
    let mut left = bytes;
    let mut pt = first;
    loop {
        let room = MAX_RECORD_PLAINTEXT - pt.len() - np_session::frame::DATA_HEADER;
        let n = room.min(left);
        if n > 0 {
            Frame::Data { flow, bytes: vec![0x5a; n].into() }.encode(&mut pt);
            left -= n;
        }
        records.push(std::mem::take(&mut pt));
        if left == 0 {
            return records;
        }
    }
}
