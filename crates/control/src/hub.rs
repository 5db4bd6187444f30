//! Which identities are connected right now, and how to push to them.

use np_control_proto::{Delivery, ServerFrame};
use np_identity::Name;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

/// Frames a connection may have waiting to be written before it counts as stuck.
pub const CONN_QUEUE: usize = 256;

struct Entry {
    conn: u64,
    tx: mpsc::Sender<ServerFrame>,
    kill: Arc<Notify>,
}

/// The connected identities.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<HashMap<Name, Vec<Entry>>>,
}

impl Hub {
    /// Registers a connection of `name`.
    pub fn add(&self, name: &Name, conn: u64, tx: mpsc::Sender<ServerFrame>, kill: Arc<Notify>) {
        if let Ok(mut m) = self.conns.lock() {
            m.entry(name.clone()).or_default().push(Entry { conn, tx, kill });
        }
    }

    /// Forgets a connection.
    pub fn remove(&self, name: &Name, conn: u64) {
        if let Ok(mut m) = self.conns.lock() {
            if let Some(v) = m.get_mut(name) {
                v.retain(|e| e.conn != conn);
                if v.is_empty() {
                    m.remove(name);
                }
            }
        }
    }

    /// Closes every connection of `name` (after a revocation).
    pub fn close_all(&self, name: &Name) {
        if let Ok(m) = self.conns.lock() {
            for e in m.get(name).into_iter().flatten() {
                e.kill.notify_one();
            }
        }
    }

    /// Pushes to every connection of the recipient; returns whether any took it. A connection
    /// whose queue is full is told to close: its client reconnects and receives the queue from
    /// the database, so nothing is lost and no memory grows.
    pub fn push(&self, to: &Name, d: &Delivery) -> bool {
        let Ok(m) = self.conns.lock() else {
            return false;
        };
        let mut delivered = false;
        for e in m.get(to).into_iter().flatten() {
            match e.tx.try_send(ServerFrame::Push(d.clone())) {
                Ok(()) => delivered = true,
                Err(_) => e.kill.notify_one(),
            }
        }
        delivered
    }
}
