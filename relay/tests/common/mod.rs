//! Shared helpers for the relay's integration tests: a real relay in-process on 127.0.0.1:0.
#![allow(dead_code, clippy::unwrap_used)]

use np_identity::{Keys, Name};
use np_relay::{
    join_with_timeout, JoinError, Relay, RelayConfig, RelayHandle, RelayMsg, RelayStats, Role, StaticDirectory,
};
use np_wire::io::read_msg;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub fn name(s: &str) -> Name {
    s.parse().unwrap()
}

/// Two enrolled identities and a running relay.
pub struct World {
    pub addr: SocketAddr,
    pub relay: RelayHandle,
    /// The relay identity's keys (it signs its proofs with them).
    pub relay_keys: Arc<Keys>,
    pub alice: Keys,
    pub dev: Keys,
    pub mallory: Keys,
}

pub const ALICE: &str = "@alice";
pub const DEV: &str = "@alice_device";
pub const MALLORY: &str = "@mallory";

pub async fn world(mut config: RelayConfig) -> World {
    let relay_keys = config.keys.clone().unwrap_or_else(|| Arc::new(Keys::generate().unwrap()));
    config.keys = Some(relay_keys.clone());
    let alice = Keys::generate().unwrap();
    let dev = Keys::generate().unwrap();
    let mallory = Keys::generate().unwrap();
    let dir = StaticDirectory::new()
        .with(name(ALICE), alice.public())
        .with(name(DEV), dev.public())
        .with(name(MALLORY), mallory.public());
    let relay = Relay::bind("127.0.0.1:0".parse().unwrap(), config, Arc::new(dir)).await.unwrap();
    let addr = relay.local_addr().unwrap();
    let (handle, _task) = relay.spawn();
    World { addr, relay: handle, relay_keys, alice, dev, mallory }
}

pub fn session(n: u8) -> [u8; 16] {
    let mut s = np_identity::random32().unwrap();
    s[0] = n;
    let mut out = [0u8; 16];
    out.copy_from_slice(&s[..16]);
    out
}

impl World {
    pub async fn join_as(
        &self,
        keys: &Keys,
        identity: &str,
        role: Role,
        session: [u8; 16],
        peer: &str,
    ) -> Result<TcpStream, JoinError> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        join_with_timeout(stream, keys, &name(identity), role, session, &name(peer), None, Duration::from_secs(20))
            .await
    }

    pub async fn client(&self, session: [u8; 16]) -> Result<TcpStream, JoinError> {
        self.join_as(&self.alice, ALICE, Role::Client, session, DEV).await
    }

    pub async fn device(&self, session: [u8; 16]) -> Result<TcpStream, JoinError> {
        self.join_as(&self.dev, DEV, Role::Device, session, ALICE).await
    }

    /// Client and device of one session, joined concurrently.
    pub async fn pair(&self, session: [u8; 16]) -> (TcpStream, TcpStream) {
        let (c, d) = tokio::join!(self.client(session), self.device(session));
        (c.unwrap(), d.unwrap())
    }

    /// Waits (up to 5 s) until the stats satisfy `ok`, returning them; panics otherwise.
    pub async fn stats_until(&self, what: &str, ok: impl Fn(&RelayStats) -> bool) -> RelayStats {
        let start = Instant::now();
        loop {
            let s = self.relay.stats();
            if ok(&s) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(5) {
                panic!("relay stats never reached {what}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the relay holds nothing at all.
    pub async fn idle(&self) -> RelayStats {
        self.stats_until("empty", |s| s.preauth == 0 && s.sessions == 0 && s.connections == 0 && s.forwarding == 0)
            .await
    }
}

/// Reads the relay's Challenge from a raw connection.
pub async fn challenge(stream: &mut TcpStream) -> (Name, [u8; 32]) {
    match read_msg::<RelayMsg, _>(stream, 4096).await.unwrap() {
        Some(RelayMsg::Challenge { relay, nonce }) => (relay, nonce),
        other => panic!("expected challenge, got {other:?}"),
    }
}

/// What the relay said last before closing: `Some(reason)` for a Refused frame.
pub async fn refusal(stream: &mut TcpStream) -> Option<String> {
    loop {
        match read_msg::<RelayMsg, _>(stream, 4096).await {
            Ok(Some(RelayMsg::Refused { reason })) => return Some(reason),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

/// Sends raw bytes after the challenge and returns the relay's refusal reason.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    challenge(&mut s).await;
    s.write_all(bytes).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), refusal(&mut s)).await.unwrap()
}

/// Resident memory of this process, from /proc/self/status.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}
