//! The receive half of a flow: the window the peer may fill, and the credit we grant back as
//! the application consumes.

use super::{FlowId, Mux};
use crate::SessionError;

/// Where the peer's direction of a flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecvState {
    /// Data may arrive.
    Open,
    /// Data may arrive, and the flow is in `Mux::credit_ready`: a `Credit` frame goes out at
    /// the next transmit, sized then, so however often the application consumes while the peer
    /// does not read, one grant per flow is all that waits.
    Granting,
    /// The peer's `Fin` arrived: no more data, and no more grants (a stale entry in
    /// `Mux::credit_ready` is skipped).
    Finished,
}

#[derive(Debug)]
pub(super) struct RecvHalf {
    /// Bytes received in total, and the most the peer may have sent (window plus grants).
    total: u64,
    limit: u64,
    consumed: u64,
    /// Consumed but not yet granted back.
    credit_pending: u64,
    pub(super) state: RecvState,
}

impl RecvHalf {
    pub(super) fn new(window: u32) -> RecvHalf {
        RecvHalf { total: 0, limit: u64::from(window), consumed: 0, credit_pending: 0, state: RecvState::Open }
    }

    /// `len` bytes of data arrived; the peer must keep within the window it has been granted.
    pub(super) fn receive(&mut self, len: usize) -> Result<(), SessionError> {
        if self.state == RecvState::Finished {
            return Err(SessionError::Protocol("data after Fin"));
        }
        let total = self.total + len as u64;
        if total > self.limit {
            return Err(SessionError::Protocol("flow credit exceeded"));
        }
        self.total = total;
        Ok(())
    }

    /// The application took `n` bytes; returns whether a grant is now due (the flow goes into
    /// `Mux::credit_ready`).
    fn consume(&mut self, n: usize, threshold: u64) -> bool {
        // Never grant for more than was received: a confused caller must not open the window.
        let n = (n as u64).min(self.total - self.consumed);
        self.consumed += n;
        self.credit_pending += n;
        if self.state == RecvState::Open && self.credit_pending >= threshold {
            self.state = RecvState::Granting;
            return true;
        }
        false
    }

    /// The grant to send now, if any (the flow has left `Mux::credit_ready`). The window opens
    /// only now that the peer is told, so a peer cannot use a grant it has not been sent.
    pub(super) fn take_grant(&mut self) -> Option<u32> {
        if self.state == RecvState::Finished {
            return None;
        }
        self.state = RecvState::Open;
        if self.credit_pending == 0 {
            return None;
        }
        let grant = u32::try_from(self.credit_pending).unwrap_or(u32::MAX);
        self.credit_pending -= u64::from(grant);
        self.limit += u64::from(grant);
        Some(grant)
    }
}

impl Mux {
    /// The application took `n` received bytes of `flow`; grant the peer credit for them.
    /// A flow that no longer exists is ignored.
    pub fn consumed(&mut self, flow: FlowId, n: usize) {
        if self.closed.is_some() {
            return;
        }
        let threshold = u64::from(self.config.initial_window / 4).max(1);
        let Some(f) = self.flows.get_mut(&flow) else {
            return;
        };
        if f.recv.consume(n, threshold) {
            self.credit_ready.push_back(flow);
        }
    }
}
