//! UDP associations over the tokio shell: each one an [`UdpAssoc`] with its own bounded queue of
//! received datagrams. Datagrams that find the queue full are dropped (and counted), as a real
//! network would, so a flood on one association never blocks the session's reader.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{now, Inner, Shared};
use crate::mux::AssocId;
use crate::SessionError;

/// Datagrams one association holds for the application before it drops more: about a burst
/// at line rate for the few milliseconds a task takes to be scheduled.
const ASSOC_QUEUE: usize = 256;

/// One UDP association. Dropping it ends it (a `UdpClose` to the peer).
pub struct UdpAssoc {
    inner: Arc<Inner>,
    assoc: AssocId,
    target: String,
    rx: mpsc::Receiver<Bytes>,
    /// Already ended (its drop has nothing to do).
    pub(super) ended: bool,
}

impl std::fmt::Debug for UdpAssoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpAssoc").field("assoc", &self.assoc).field("target", &self.target).finish()
    }
}

/// The sending side of an association, for a task other than the one receiving. It does not
/// keep the association alive: once it has ended, `send` returns `false`.
#[derive(Clone)]
pub struct UdpSender {
    inner: Arc<Inner>,
    assoc: AssocId,
}

impl std::fmt::Debug for UdpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSender").field("assoc", &self.assoc).finish()
    }
}

impl UdpSender {
    /// The association's id.
    pub fn id(&self) -> AssocId {
        self.assoc
    }

    /// Sends one datagram; `false` if it was dropped (queue full, too long, or the association
    /// is gone).
    pub fn send(&self, bytes: Bytes) -> bool {
        let mut st = self.inner.lock();
        let sent = st.conn.udp_send(self.assoc, bytes, now());
        if sent {
            self.inner.transmit.notify_one();
        }
        sent
    }
}

impl Shared {
    /// Makes the receiving queue of a new association.
    pub(super) fn udp_slot(&mut self, assoc: AssocId) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(ASSOC_QUEUE);
        self.udp_slots.insert(assoc, tx);
        rx
    }

    /// Hands a datagram to its association's queue, or drops it.
    pub(super) fn udp_deliver(&mut self, assoc: AssocId, bytes: Bytes) {
        let delivered = self.udp_slots.get(&assoc).is_some_and(|tx| tx.try_send(bytes).is_ok());
        if !delivered {
            self.udp_dropped += 1;
            tracing::trace!(assoc, "datagram dropped: the association's queue is full or gone");
        }
    }
}

impl UdpAssoc {
    pub(super) fn new(inner: Arc<Inner>, assoc: AssocId, target: String, rx: mpsc::Receiver<Bytes>) -> UdpAssoc {
        UdpAssoc { inner, assoc, target, rx, ended: false }
    }

    /// The association's id.
    pub fn id(&self) -> AssocId {
        self.assoc
    }

    /// Where the client sends (`host:port`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The next datagram from the peer; `None` once the association has ended (the peer
    /// closed it, it went idle, or the session ended).
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Sends one datagram; `false` if it was dropped (queue full, too long, or the association
    /// is gone).
    pub fn send(&self, bytes: Bytes) -> bool {
        self.sender().send(bytes)
    }

    /// A handle that sends on this association from another task.
    pub fn sender(&self) -> UdpSender {
        UdpSender { inner: self.inner.clone(), assoc: self.assoc }
    }

    /// Ends the association; the peer is told `reason` (a refusal, on the device).
    pub fn close(mut self, reason: &str) {
        self.end(reason);
    }

    fn end(&mut self, reason: &str) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut st = self.inner.lock();
        st.udp_slots.remove(&self.assoc);
        if st.conn.has_assoc(self.assoc) {
            st.conn.udp_close(self.assoc, reason);
            self.inner.transmit.notify_one();
        }
    }
}

impl Drop for UdpAssoc {
    fn drop(&mut self) {
        self.end("closed");
    }
}

impl super::SessionHandle {
    /// Opens a UDP association to `target` (`host:port` as the device will send to it).
    /// There is no answer to wait for: a refusal ends it ([`UdpAssoc::recv`] returns `None`).
    pub fn udp_open(&self, target: &str) -> Result<UdpAssoc, SessionError> {
        let inner = &self.guard.inner;
        let mut st = inner.lock();
        let assoc = st.conn.udp_open(target, now())?;
        let rx = st.udp_slot(assoc);
        // An eviction may have ended another association.
        inner.dispatch(&mut st);
        Ok(UdpAssoc::new(inner.clone(), assoc, target.to_owned(), rx))
    }

    /// Does this session carry UDP (the device's npd knows it)?
    pub fn has_udp(&self) -> bool {
        self.guard.inner.lock().conn.has_udp()
    }

    /// Datagrams received but dropped here because their association's queue was full.
    pub fn udp_dropped(&self) -> u64 {
        self.guard.inner.lock().udp_dropped
    }
}
