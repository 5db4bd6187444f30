//! Which identities are connected right now, and how to push to them.

use np_control_proto::{Delivery, ServerFrame};
use np_identity::Name;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

/// Live pushes a connection may have waiting to be written. Beyond it they are left to the
/// database (where each already is, or is about to be) and the connection rereads its queue.
pub const CONN_QUEUE: usize = 256;

/// How the hub reaches one connection.
pub struct ConnHandle {
    /// Live pushes, for its writer.
    pub tx: mpsc::Sender<ServerFrame>,
    /// Closes it (revocation).
    pub kill: Arc<Notify>,
    /// Tells it that a live push did not fit, so it must read its queue from the database again.
    pub resync: Arc<Notify>,
}

struct Entry {
    conn: u64,
    h: ConnHandle,
}

/// The connected identities.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<HashMap<Name, Vec<Entry>>>,
}

impl Hub {
    /// Registers a connection of `name`.
    pub fn add(&self, name: &Name, conn: u64, h: ConnHandle) {
        if let Ok(mut m) = self.conns.lock() {
            m.entry(name.clone()).or_default().push(Entry { conn, h });
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
                e.h.kill.notify_one();
            }
        }
    }

    /// Pushes to every connection of the recipient. A connection whose queue is full (a slow
    /// client, or one whose push window is full because it does not acknowledge) is left out and
    /// returned in [`Pushed::overflowed`]: once the notification is committed, the caller tells
    /// it to reread its queue from the database. So nothing is lost, no memory grows, and the
    /// connection stays up and keeps answering requests (closing it, as before, let any sender
    /// cut a recipient off by pushing faster than it reads).
    /// Makes every local connection of `name` read its queue again (a notification for it was
    /// stored by another node).
    pub fn resync(&self, name: &Name) {
        if let Ok(m) = self.conns.lock() {
            for e in m.get(name).into_iter().flatten() {
                e.h.resync.notify_one();
            }
        }
    }

    /// The same for every local connection (after wake-ups from other nodes may have been missed).
    pub fn resync_all(&self) {
        if let Ok(m) = self.conns.lock() {
            for e in m.values().flatten() {
                e.h.resync.notify_one();
            }
        }
    }

    pub fn push(&self, to: &Name, d: &Delivery) -> Pushed {
        let mut pushed = Pushed { delivered: false, overflowed: Vec::new() };
        let Ok(m) = self.conns.lock() else {
            return pushed;
        };
        for e in m.get(to).into_iter().flatten() {
            match e.h.tx.try_send(ServerFrame::Push(d.clone())) {
                Ok(()) => pushed.delivered = true,
                Err(_) => pushed.overflowed.push(e.h.resync.clone()),
            }
        }
        pushed
    }
}

/// What [`Hub::push`] did.
pub struct Pushed {
    /// A connection of the recipient took it.
    pub delivered: bool,
    /// Connections that had no room; notify each once the notification is committed (not
    /// before: it must be in the database when they reread it).
    pub overflowed: Vec<Arc<Notify>>,
}
