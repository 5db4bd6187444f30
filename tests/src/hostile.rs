//! Hostile but permitted peers: they set up a session the normal way (signed request, relay
//! join, handshake; as a client or as a device), then seal records of their own making and never read what comes back.

use np_control_client::ControlClient;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_session::frame::Frame;
use np_session::record::{Sealer, DEFAULT_RECORDS_PER_KEY};
use np_session::{MuxConfig, Responder, SessionKeys, MAX_RECORD_PLAINTEXT};
use np_tunnel::msg::{prologue, TunnelMsg};
use np_tunnel::relays::RelayBook;
use np_tunnel::router::FromPeer;
use np_tunnel::{Connector, Router};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stack::Stack;

/// How a session request names the stack's relay: by its identity, which the devices trust
/// (one place to change if the stack names it differently).
pub fn relay_ref(_s: &Stack) -> String {
    "@relay".to_string()
}

/// A session, from either side, that this process drives by hand.
pub struct HostilePeer {
    pub stream: TcpStream,
    pub sealer: Sealer,
    /// Keeps the control-plane connection (and its router) alive for the session's length.
    _ctl: Box<dyn std::any::Any + Send>,
    buf: Vec<u8>,
}

impl HostilePeer {
    /// Requests a session to `device` as `me` (whose keys are in `home`) and completes the
    /// handshake, as `np forward` would.
    pub async fn open(
        home: &Path,
        me: &str,
        device: &str,
        relay: &str,
        targets: &[String],
    ) -> anyhow::Result<HostilePeer> {
        let me: Name = me.parse()?;
        let device: DeviceRef = device.parse()?;
        let relay: Name = relay.parse()?;
        let (ctl, incoming) = ControlClient::connect(&Home::new(home), &me).await?;
        let (router, _requests) = Router::start(incoming);
        let connector = Connector {
            ctl,
            router,
            timeout: Duration::from_secs(10),
            mux: MuxConfig::default(),
            relays: RelayBook::default(),
            choice: std::sync::Arc::new(np_tunnel::choose::RelayChooser::pinned(relay.clone())),
        };
        let (stream, keys) = connector.open_transport(&device, &relay, targets, &|_| {}).await?;
        Ok(HostilePeer::new(stream, &keys, Box::new(connector)))
    }

    /// Plays the device `me` (whose keys are in `home`): waits up to `limit` for one session
    /// request and answers it as `npd` would (handshake, relay join), whoever sent it.
    pub async fn answer(home: &Path, me: &str, limit: Duration) -> anyhow::Result<HostilePeer> {
        let me: Name = me.parse()?;
        let (ctl, incoming) = ControlClient::connect(&Home::new(home), &me).await?;
        let (router, mut requests) = Router::start(incoming);
        let wait = async {
            loop {
                match requests.recv().await {
                    Some(FromPeer { from, msg: TunnelMsg::SessionRequest(r) }) => return Ok((from, r)),
                    Some(_) => continue,
                    None => anyhow::bail!("the control-plane connection ended"),
                }
            }
        };
        let (from, r) = tokio::time::timeout(limit, wait).await??;
        let client = ctl.lookup(&from).await?;
        let pro = prologue(&r.session, &from, &me, &r.device, &r.relay);
        let (msg2, keys) = Responder::respond(ctl.keys().x25519_private(), &client.x25519, &pro, &r.handshake)?;
        // As npd does: the relay named, at the address it signed, proving its identity.
        let mut stream = RelayBook::default()
            .join(&ctl, &r.relay, np_relay::Role::Device, r.session, &from, Duration::from_secs(10))
            .await?;
        np_wire::io::write_frame(&mut stream, &msg2).await?;
        Ok(HostilePeer::new(stream, &keys, Box::new((ctl, router))))
    }

    fn new(stream: TcpStream, keys: &SessionKeys, ctl: Box<dyn std::any::Any + Send>) -> HostilePeer {
        let sealer = Sealer::with_counter(keys.send_key(), 0, DEFAULT_RECORDS_PER_KEY);
        HostilePeer { stream, sealer, _ctl: ctl, buf: Vec::new() }
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
