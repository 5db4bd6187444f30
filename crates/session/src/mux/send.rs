//! The send half of a flow: credit, the bytes queued for the next records, and our `Fin`.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::{FlowId, FlowState, Mux};
use crate::SessionError;

/// Where our direction of a flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendState {
    /// `send` takes what credit allows.
    Open,
    /// The last `send` was cut short by credit (or by the early budget): report
    /// [`Event::FlowWritable`](super::Event::FlowWritable) when there is room again.
    Blocked,
    /// The application finished: a `Fin` goes out after the queued bytes. No more `send`, and
    /// no `FlowWritable` (there is nothing left to write).
    Finishing,
    /// Our `Fin` is sent.
    Finished,
}

#[derive(Debug)]
pub(super) struct SendHalf {
    /// Bytes `send` may still accept.
    pub(super) credit: u64,
    /// Accepted by `send`, not yet in a record.
    pub(super) queue: BytesMut,
    /// Accepted by `send_bytes` (owned, so not copied in), after `queue` in stream order; while
    /// any wait here, `send` appends here too, so the order holds.
    pub(super) chunks: VecDeque<Bytes>,
    /// Bytes the application holds in its own buffer for this flow and lets the mux pull
    /// straight into a record ([`Mux::offer`]): no queue, one copy fewer. Credit is taken when
    /// they are pulled, not when offered.
    pub(super) offered: u64,
    pub(super) state: SendState,
}

impl SendHalf {
    pub(super) fn new(window: u32) -> SendHalf {
        SendHalf {
            credit: u64::from(window),
            queue: BytesMut::new(),
            chunks: VecDeque::new(),
            offered: 0,
            state: SendState::Open,
        }
    }

    /// Is there anything for a record: bytes, or a `Fin` not yet sent? A flow is in the mux's
    /// send rotation (`Mux::ready`) exactly while this holds.
    pub(super) fn has_work(&self) -> bool {
        self.has_queued() || self.can_pull() || self.state == SendState::Finishing
    }

    /// Bytes accepted by `send` or `send_bytes` wait for a record.
    pub(super) fn has_queued(&self) -> bool {
        !self.queue.is_empty() || !self.chunks.is_empty()
    }

    /// Offered bytes that credit lets a record take now.
    pub(super) fn can_pull(&self) -> bool {
        self.offered > 0 && self.credit > 0
    }

    /// The peer granted `bytes` more; returns whether to report the flow writable.
    pub(super) fn grant(&mut self, bytes: u32) -> bool {
        self.credit = self.credit.saturating_add(u64::from(bytes));
        self.unblock_if(bytes > 0)
    }

    /// The peer accepted the flow, so the early budget no longer holds it back; returns whether
    /// to report it writable.
    pub(super) fn accepted(&mut self) -> bool {
        self.unblock_if(self.credit > 0)
    }

    fn unblock_if(&mut self, room: bool) -> bool {
        if self.state == SendState::Blocked && room {
            self.state = SendState::Open;
            return true;
        }
        false
    }
}

impl Mux {
    /// Queues as much of `data` as the flow's credit allows and returns how much that was.
    /// When it is less than `data.len()`, a [`Event::FlowWritable`] follows once credit arrives.
    ///
    /// [`Event::FlowWritable`]: super::Event::FlowWritable
    pub fn send(&mut self, flow: FlowId, data: &[u8]) -> Result<usize, SessionError> {
        self.queue_data(flow, data.len(), |half, n| {
            if half.chunks.is_empty() {
                half.queue.extend_from_slice(&data[..n]);
            } else {
                half.chunks.push_back(Bytes::copy_from_slice(&data[..n]));
            }
        })
    }

    /// [`Mux::send`] for bytes the caller owns: what credit allows is split off the front of
    /// `data` and queued without a copy (the rest stays in `data`); returns how much that was.
    pub fn send_bytes(&mut self, flow: FlowId, data: &mut Bytes) -> Result<usize, SessionError> {
        self.queue_data(flow, data.len(), |half, n| half.chunks.push_back(data.split_to(n)))
    }

    /// `send` and `send_bytes`: checks, credit and the early budget, then `put` queues `n` bytes.
    fn queue_data(
        &mut self,
        flow: FlowId,
        len: usize,
        put: impl FnOnce(&mut SendHalf, usize),
    ) -> Result<usize, SessionError> {
        self.check_open()?;
        let f = self.flows.get_mut(&flow).ok_or(SessionError::UnknownFlow(flow))?;
        if f.state == FlowState::Incoming {
            return Err(SessionError::Protocol("flow not accepted yet"));
        }
        if matches!(f.send.state, SendState::Finishing | SendState::Finished) {
            return Err(SessionError::Protocol("flow already finished"));
        }
        let mut allowed = f.send.credit;
        if f.state == FlowState::Opening {
            // Before the answer, the session's early budget limits us too; past it the data
            // waits for the flow's OpenOk (which wakes the writer, see `FlowWritable`).
            allowed = allowed.min(u64::from(self.config.early_budget).saturating_sub(self.early_sent));
        }
        let n = len.min(usize::try_from(allowed).unwrap_or(usize::MAX));
        if n < len {
            f.send.state = SendState::Blocked;
        }
        if n > 0 {
            let was_idle = !f.send.has_work();
            put(&mut f.send, n);
            f.send.credit -= n as u64;
            if f.state == FlowState::Opening {
                f.early += n as u64;
                self.early_sent += n as u64;
            }
            if was_idle {
                self.ready.push_back(flow);
            }
        }
        Ok(n)
    }

    /// Pull mode, the alternative to [`Mux::send`] for an application whose bytes already sit in
    /// a buffer of its own (`np up`: smoltcp's receive ring): it says how many it holds, and
    /// [`Mux::poll_transmit_with`] pulls them into records as credit allows, through the
    /// application's `pull` callback, which also reports what is left. `available` is the
    /// total held now, not an increment. Only for an accepted flow (the early budget before the
    /// answer is `send`'s business), and not mixed with `send` on the same flow.
    pub fn offer(&mut self, flow: FlowId, available: u64) -> Result<(), SessionError> {
        self.check_open()?;
        let f = self.flows.get_mut(&flow).ok_or(SessionError::UnknownFlow(flow))?;
        if f.state != FlowState::Open {
            return Err(SessionError::Protocol("flow not accepted yet"));
        }
        if matches!(f.send.state, SendState::Finishing | SendState::Finished) {
            return Err(SessionError::Protocol("flow already finished"));
        }
        let was_idle = !f.send.has_work();
        f.send.offered = available;
        if was_idle && f.send.has_work() {
            self.ready.push_back(flow);
        }
        Ok(())
    }

    /// Credit `send` would accept on this flow right now.
    pub fn send_credit(&self, flow: FlowId) -> u64 {
        self.flows.get(&flow).map_or(0, |f| f.send.credit)
    }

    /// Half-closes our direction of `flow` once queued data is sent.
    pub fn finish(&mut self, flow: FlowId) -> Result<(), SessionError> {
        self.check_open()?;
        let f = self.flows.get_mut(&flow).ok_or(SessionError::UnknownFlow(flow))?;
        if f.state == FlowState::Incoming {
            return Err(SessionError::Protocol("flow not accepted yet"));
        }
        if matches!(f.send.state, SendState::Open | SendState::Blocked) {
            let was_idle = !f.send.has_work();
            f.send.state = SendState::Finishing;
            if was_idle {
                self.ready.push_back(flow);
            }
        }
        Ok(())
    }
}
