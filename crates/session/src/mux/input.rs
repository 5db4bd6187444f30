//! Frames from the peer: one record's plaintext at a time, each frame checked against the
//! flow it names. Anything a well-behaved peer never sends ends the session.

use std::time::Instant;

use bytes::Bytes;

use super::recv::RecvState;
use super::{Event, Flow, FlowState, Mux, PINGS_PER_SEC, PING_BURST};
use crate::frame::{Frame, FrameReader};
use crate::SessionError;

impl Mux {
    /// Processes one record's plaintext (one or more frames). An error is fatal: the session is
    /// closed and a `Close` frame carrying the reason is queued.
    pub fn handle_frames(&mut self, plaintext: Bytes, now: Instant) -> Result<(), SessionError> {
        self.check_open()?;
        self.last_recv = now;
        let refill = now.saturating_duration_since(self.ping_refilled).as_secs_f64() * PINGS_PER_SEC;
        self.ping_tokens = (self.ping_tokens + refill).min(PING_BURST);
        self.ping_refilled = now;
        let mut reader = FrameReader::new(plaintext);
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e)),
            };
            if let Err(e) = self.handle_frame(frame, now) {
                return Err(self.fail(e));
            }
            if self.closed.is_some() {
                return Ok(());
            }
        }
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        self.close(&e.to_string());
        e
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        match frame {
            Frame::Open { flow, target } => {
                if flow == 0 || self.is_local(flow) {
                    return Err(SessionError::Protocol("peer opened a flow with our parity"));
                }
                if flow <= self.highest_peer {
                    return Err(SessionError::Protocol("flow id reused"));
                }
                self.highest_peer = flow;
                // A sender keeps to the same limit (`open`), so only an abusive peer gets here;
                // refusing each extra Open instead would queue an answer per frame.
                if self.peer_flows >= self.config.max_peer_flows {
                    return Err(SessionError::Limit("peer opened more flows than a session allows"));
                }
                self.peer_flows += 1;
                self.flows.insert(flow, Flow::new(FlowState::Incoming, self.config.initial_window));
                self.events.push_back(Event::FlowOpened { flow, target });
            }
            Frame::OpenOk { flow } => {
                let past_local = self.is_local(flow) && self.is_past(flow);
                match self.flows.get_mut(&flow) {
                    Some(f) if f.state == FlowState::Opening => {
                        f.state = FlowState::Open;
                        self.early_sent = self.early_sent.saturating_sub(f.early);
                        f.early = 0;
                        self.events.push_back(Event::FlowAccepted { flow });
                        if f.send.accepted() {
                            // It was held back by the early budget.
                            self.events.push_back(Event::FlowWritable { flow });
                        }
                        self.maybe_retire(flow);
                    }
                    Some(_) => return Err(SessionError::Protocol("unexpected OpenOk")),
                    None if past_local => {}
                    None => return Err(SessionError::Protocol("OpenOk for unknown flow")),
                }
            }
            Frame::OpenErr { flow, reason } => match self.flows.get(&flow) {
                Some(f) if f.state == FlowState::Opening => {
                    self.remove_flow(flow);
                    self.events.push_back(Event::FlowRefused { flow, reason });
                }
                Some(_) => return Err(SessionError::Protocol("unexpected OpenErr")),
                None if self.is_local(flow) && self.is_past(flow) => {}
                None => return Err(SessionError::Protocol("OpenErr for unknown flow")),
            },
            Frame::Data { flow, bytes } => {
                let past = self.is_past(flow);
                let Some(f) = self.flows.get_mut(&flow) else {
                    return if past { Ok(()) } else { Err(SessionError::Protocol("data for unknown flow")) };
                };
                if f.state == FlowState::Opening {
                    return Err(SessionError::Protocol("data before OpenOk"));
                }
                f.recv.receive(bytes.len())?;
                if f.state == FlowState::Incoming {
                    f.early += bytes.len() as u64;
                    self.early_recv += bytes.len() as u64;
                    if self.early_recv > u64::from(self.config.early_budget) {
                        return Err(SessionError::Limit("peer sent more data before acceptance than a session allows"));
                    }
                }
                if !bytes.is_empty() {
                    self.events.push_back(Event::FlowData { flow, bytes });
                }
            }
            Frame::Credit { flow, bytes } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    let was_idle = !f.send.has_work();
                    if f.send.grant(bytes) {
                        self.events.push_back(Event::FlowWritable { flow });
                    }
                    // Offered bytes that waited for credit can go now (see `Mux::offer`).
                    if was_idle && f.send.has_work() {
                        self.ready.push_back(flow);
                    }
                } else if !self.is_past(flow) {
                    return Err(SessionError::Protocol("credit for unknown flow"));
                }
            }
            Frame::Fin { flow } => {
                let past = self.is_past(flow);
                match self.flows.get_mut(&flow) {
                    Some(f) if f.state != FlowState::Opening && f.recv.state != RecvState::Finished => {
                        f.recv.state = RecvState::Finished;
                        self.events.push_back(Event::FlowFin { flow });
                        self.maybe_retire(flow);
                    }
                    Some(_) => return Err(SessionError::Protocol("unexpected Fin")),
                    None if past => {}
                    None => return Err(SessionError::Protocol("Fin for unknown flow")),
                }
            }
            Frame::Reset { flow, reason } => {
                if self.flows.contains_key(&flow) {
                    self.remove_flow(flow);
                    self.events.push_back(Event::FlowReset { flow, reason });
                } else if !self.is_past(flow) {
                    return Err(SessionError::Protocol("Reset for unknown flow"));
                }
            }
            // Only the newest Ping needs an answer: it proves we are alive as well as all of them.
            Frame::Ping { id } => {
                if self.ping_tokens < 1.0 {
                    return Err(SessionError::Limit("peer sent Pings faster than a session allows"));
                }
                self.ping_tokens -= 1.0;
                self.pong = Some(id);
            }
            Frame::Pong { .. } => {}
            f @ (Frame::UdpOpen { .. } | Frame::Datagram { .. } | Frame::UdpClose { .. }) => {
                self.handle_udp_frame(f, now)?;
            }
            Frame::Ack { records } => self.events.push_back(Event::Acked { records }),
            Frame::Close { reason } => {
                self.closed = Some(reason.clone());
                self.clear_flows();
                self.events.push_back(Event::Closed { reason });
            }
        }
        Ok(())
    }
}
