//! Routes decrypted messages from the control plane: answers to whoever waits for them (by
//! request or query id), requests to the daemon or policy service.

use crate::msg::TunnelMsg;
use np_control_client::Incoming;
use np_identity::Name;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// A message with its verified sender.
#[derive(Clone, Debug)]
pub struct FromPeer {
    pub from: Name,
    pub msg: TunnelMsg,
}

type Waiters = Arc<Mutex<HashMap<[u8; 16], oneshot::Sender<FromPeer>>>>;

/// Hands answers to waiters. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    waiters: Waiters,
}

impl Router {
    /// Starts routing `incoming`; requests (session requests, policy queries) go to the returned
    /// receiver.
    pub fn start(mut incoming: Incoming) -> (Router, mpsc::Receiver<FromPeer>) {
        let waiters: Waiters = Arc::default();
        let (tx, rx) = mpsc::channel(256);
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Some(m) = incoming.recv().await {
                let Some(msg) = TunnelMsg::decode(&m.payload) else {
                    tracing::warn!(from = %m.from, "dropping a message that does not parse");
                    continue;
                };
                let id = match &msg {
                    TunnelMsg::SessionRefused { request_id, .. } => Some(*request_id),
                    TunnelMsg::PolicyAnswer { query_id, .. } => Some(*query_id),
                    TunnelMsg::SessionsEnded { request_id, .. } => Some(*request_id),
                    _ => None,
                };
                let fp = FromPeer { from: m.from, msg };
                match id {
                    Some(id) => {
                        let waiter = w.lock().ok().and_then(|mut m| m.remove(&id));
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(fp);
                            }
                            None => tracing::debug!(from = %fp.from, "answer nobody waits for (late or duplicate)"),
                        }
                    }
                    None => {
                        // A full queue means the daemon is swamped: dropping is what a lost
                        // request looks like to its sender, who times out with a clear message.
                        if tx.try_send(fp).is_err() {
                            tracing::warn!("request queue full; dropping a request");
                        }
                    }
                }
            }
        });
        (Router { waiters }, rx)
    }

    /// Registers interest in the answer with id `id`.
    pub fn expect(&self, id: [u8; 16]) -> oneshot::Receiver<FromPeer> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.waiters.lock() {
            m.insert(id, tx);
        }
        rx
    }

    /// Stops waiting for `id`.
    pub fn forget(&self, id: &[u8; 16]) {
        if let Ok(mut m) = self.waiters.lock() {
            m.remove(id);
        }
    }
}
