//! Frame scheduling: what goes into the next record. Control frames first (the Pong, credit
//! grants, answers), then data round-robin over the flows that have some.

use std::time::Instant;

use bytes::Buf;

use super::send::SendState;
use super::Mux;
use crate::frame::{encode_data_header, set_data_len, Frame, DATA_HEADER};
use crate::record::MAX_RECORD_PLAINTEXT;

/// The application's side of pull mode (see [`Mux::poll_transmit_with`]).
pub type Pull<'a> = dyn FnMut(super::FlowId, &mut Vec<u8>, usize) -> u64 + 'a;

impl Mux {
    /// Is there anything to transmit?
    pub fn wants_transmit(&self) -> bool {
        self.pong.is_some()
            || !self.control.is_empty()
            || !self.credit_ready.is_empty()
            // Flow data and datagrams wait while the connection holds all the unacknowledged
            // records it may (see `set_data_paused`); datagrams beyond their queue are dropped.
            || (!self.data_paused && (!self.ready.is_empty() || self.udp.has_output()))
    }

    /// Are so many control frames waiting to be sent that the driver should stop reading from
    /// the peer until it has sent some? Reading on would let a peer that never reads make us
    /// queue answers (to its opens, ...) without bound; pausing pushes back on its writes.
    pub fn is_backlogged(&self) -> bool {
        // UDP answers count too: each refusal of a peer's association queues a `UdpClose`.
        self.control.len() >= self.config.max_control_backlog || self.udp_queued() >= self.config.max_udp_queued
    }

    /// Control frames waiting to be sent (for tests and metrics).
    pub fn control_backlog(&self) -> usize {
        self.control.len() + usize::from(self.pong.is_some()) + self.credit_ready.len()
    }

    /// Plaintext for one record (at most [`MAX_RECORD_PLAINTEXT`] bytes), if anything is pending.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.poll_transmit_into(now, &mut out, MAX_RECORD_PLAINTEXT).then_some(out)
    }

    /// Appends pending frames to `out`, at most `max` bytes (at least 2 KiB is assumed, so any
    /// control frame fits). Control frames go first, then data round-robin over the flows that
    /// have some, so no flow starves the others. Returns whether anything was written.
    pub fn poll_transmit_into(&mut self, now: Instant, out: &mut Vec<u8>, max: usize) -> bool {
        self.poll_transmit_with(now, out, max, &mut |_, _, _| 0)
    }

    /// [`Mux::poll_transmit_into`] for flows in pull mode too ([`Mux::offer`]): for such a flow,
    /// `pull(flow, out, max)` must append at most `max` of the flow's bytes to `out` (taking
    /// them from its buffer) and return how many it still holds after that, which becomes the
    /// flow's new offer. Appending more than `max` is cut back; appending nothing ends the
    /// offer.
    pub fn poll_transmit_with(&mut self, now: Instant, out: &mut Vec<u8>, max: usize, pull: &mut Pull<'_>) -> bool {
        let start = out.len();
        let used = |out: &Vec<u8>| out.len() - start;
        if let Some(id) = self.pong.take() {
            Frame::Pong { id }.encode(out);
        }
        while let Some(&flow) = self.credit_ready.front() {
            if used(out) + 9 > max {
                break;
            }
            self.credit_ready.pop_front();
            let Some(grant) = self.flows.get_mut(&flow).and_then(|f| f.recv.take_grant()) else {
                continue;
            };
            Frame::Credit { flow, bytes: grant }.encode(out);
        }
        while let Some(f) = self.control.front() {
            if used(out) > 0 && used(out) + f.encoded_len() > max {
                break;
            }
            if let Some(f) = self.control.pop_front() {
                f.encode(out);
            }
        }
        // Datagrams next: at most half the record while flows have data, so neither starves.
        let rounds = if self.data_paused { 0 } else { self.ready.len() };
        if !self.data_paused {
            let udp_room = if self.ready.is_empty() { max } else { max / 2 };
            let before = used(out);
            self.transmit_udp(out, before, udp_room, max);
        }
        for _ in 0..rounds {
            let room = max.saturating_sub(used(out));
            if room <= DATA_HEADER {
                break;
            }
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(f) = self.flows.get_mut(&id) else {
                continue;
            };
            let send = &mut f.send;
            if send.has_queued() {
                if !send.queue.is_empty() {
                    let chunk = send.queue.len().min(room - DATA_HEADER);
                    encode_data_header(out, id, chunk);
                    out.extend_from_slice(&send.queue[..chunk]);
                    send.queue.advance(chunk);
                }
                // Owned chunks (after the queue, in stream order), as many as fit: small ones
                // share a record rather than take one each.
                while let Some(front) = send.chunks.front_mut().filter(|_| send.queue.is_empty()) {
                    let room = max.saturating_sub(used(out));
                    if room <= DATA_HEADER {
                        break;
                    }
                    let chunk = front.len().min(room - DATA_HEADER);
                    encode_data_header(out, id, chunk);
                    out.extend_from_slice(&front[..chunk]);
                    front.advance(chunk);
                    if front.is_empty() {
                        send.chunks.pop_front();
                    }
                }
            } else if send.can_pull() {
                let want = usize::try_from(send.offered.min(send.credit)).unwrap_or(usize::MAX).min(room - DATA_HEADER);
                let at = out.len();
                encode_data_header(out, id, want);
                let left = pull(id, out, want);
                let got = out.len().saturating_sub(at + DATA_HEADER).min(want);
                out.truncate(at + DATA_HEADER + got);
                if got == 0 {
                    out.truncate(at);
                    send.offered = 0;
                } else {
                    set_data_len(&mut out[at..], got);
                    send.credit -= got as u64;
                    send.offered = left;
                }
            }
            if !send.has_queued() && send.offered == 0 && send.state == SendState::Finishing {
                let fin = Frame::Fin { flow: id };
                if used(out) + fin.encoded_len() <= max {
                    fin.encode(out);
                    send.state = SendState::Finished;
                }
            }
            // Still work to do: back to the end of the rotation (see `SendHalf::has_work`).
            if send.has_work() {
                self.ready.push_back(id);
            } else {
                self.maybe_retire(id);
            }
        }
        let wrote = used(out) > 0;
        if wrote {
            self.last_send = now;
        }
        wrote
    }
}
