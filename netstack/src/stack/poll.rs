//! Running smoltcp: timers, transmits, and socket states turned into [`Event`]s.

use std::time::{Duration, Instant};

use smoltcp::socket::tcp;

use super::flow::FlowState;
use super::{Event, Stack};

impl Stack {
    /// Let timers run: call at the instant [`Stack::poll_at`] returned.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.dirty = true;
    }

    /// Takes back a packet from [`Stack::poll_transmit`] once written, to reuse its buffer.
    pub fn recycle(&mut self, packet: Vec<u8>) {
        super::device::recycle(&mut self.queues.tx_free, packet);
    }

    /// The next packet to write to the TUN.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.poll_if_dirty();
        let was_full = self.queues.tx.len() >= self.queues.max_tx;
        let packet = self.queues.tx.pop_front()?;
        if was_full {
            // smoltcp stopped sending when the queue was full; let it continue.
            self.dirty = true;
        }
        self.stats.packets_out += 1;
        Some(packet)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.poll_if_dirty();
        self.events.pop_front()
    }

    /// When to call [`Stack::handle_timeout`] next (`now` if there is work already), or `None`
    /// if no timer is running.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        self.advance(now);
        if self.dirty || !self.events.is_empty() || !self.queues.tx.is_empty() {
            return Some(self.now);
        }
        let smol = self.iface.poll_at(self.smol_now(), &self.sockets);
        let smol = smol.map(|at| self.base + Duration::from_micros(at.total_micros().max(0) as u64));
        match (smol, self.next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn advance(&mut self, now: Instant) {
        // Time never goes backwards for smoltcp, whatever the caller passes.
        if now > self.now {
            self.now = now;
        }
    }

    pub(super) fn smol_now(&self) -> smoltcp::time::Instant {
        let micros = self.now.saturating_duration_since(self.base).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn poll_if_dirty(&mut self) {
        if self.dirty {
            self.poll_now();
        }
    }

    /// Run smoltcp, then turn socket states into events.
    pub(super) fn poll_now(&mut self) {
        self.dirty = false;
        let now = self.smol_now();
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
        let mut closed = Vec::new();
        let (mut half_open, mut next_deadline) = (0, None::<Instant>);
        let deadline_after = self.config.handshake_timeout;
        for (&id, flow) in &mut self.flows {
            let FlowState::Open(open) = &mut flow.state else { continue };
            if let Some(since) = open.handshake_since {
                let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
                if socket.state() != tcp::State::SynReceived {
                    open.handshake_since = None;
                } else if self.now >= since + deadline_after {
                    // Never completed: give up (a reset to the claimed source) and end the flow.
                    socket.abort();
                    self.dirty = true;
                    self.stats.handshake_timeouts += 1;
                    closed.push(id);
                    continue;
                } else {
                    half_open += 1;
                    let d = since + deadline_after;
                    next_deadline = Some(next_deadline.map_or(d, |n: Instant| n.min(d)));
                }
            }
            if open.update(id, self.sockets.get::<tcp::Socket>(open.handle), &mut self.events) {
                closed.push(id);
            }
        }
        self.half_open = half_open;
        self.next_deadline = next_deadline;
        for id in closed {
            tracing::trace!(flow = %id, "flow closed");
            self.forget(id);
            self.events.push_back(Event::Closed(id));
        }
    }
}
