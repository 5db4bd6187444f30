//! Flows: what the stack keeps per flow, the answer to a held SYN (accept or refuse), and the
//! application's side of an open flow (`recv`, `send`, `close`, `abort`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;

use super::{Event, FlowError, FlowId, RefuseKind, Stack};
use crate::map::FlowTarget;
use crate::packet::{self, Segment};

/// A flow's 4-tuple: the application's end and the virtual end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Tuple {
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
}

pub(super) struct Flow {
    pub(super) tuple: Tuple,
    pub(super) target: FlowTarget,
    pub(super) state: FlowState,
}

pub(super) enum FlowState {
    /// The SYN is held until the caller accepts or refuses.
    Pending {
        syn: Vec<u8>,
        seg: Segment,
    },
    Open(OpenFlow),
}

/// A flow smoltcp terminates: its socket, and what has been reported about it.
pub(super) struct OpenFlow {
    pub(super) handle: SocketHandle,
    /// When the SYN-ACK went out; `None` once the handshake completed.
    pub(super) handshake_since: Option<Instant>,
    read: ReadState,
    write: WriteState,
}

/// The application → device direction, as far as the caller has been told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Nothing reported that the caller has not read: data or the end of the stream is reported
    /// with `Readable` when it arrives.
    Quiet,
    /// `Readable` reported; not again until a `recv` has emptied the buffer, so a caller that
    /// reads only part of what is there is not told twice.
    Reported,
    /// `recv` returned `Finished`. No data follows a FIN, so there is nothing more to report.
    Finished,
}

/// The device → application direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    /// The last `send` took everything, or `Writable` has been reported since.
    Open,
    /// `send` took less than offered: report `Writable` when there is room.
    Blocked,
}

impl OpenFlow {
    fn new(handle: SocketHandle, now: Instant) -> OpenFlow {
        OpenFlow { handle, handshake_since: Some(now), read: ReadState::Quiet, write: WriteState::Open }
    }

    /// Turn what smoltcp did to the socket into events; returns whether the flow is over.
    pub(super) fn update(&mut self, id: FlowId, socket: &tcp::Socket, events: &mut VecDeque<Event>) -> bool {
        let state = socket.state();
        let fin_received =
            matches!(state, tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait);
        // Done when smoltcp is closed, or waiting out TIME-WAIT with nothing left to read
        // (a late retransmission then gets a reset from us, which the application ignores).
        // A reset in SYN-RECEIVED sends a smoltcp socket back to LISTEN (RFC 793), where it
        // would take the next SYN to this address and port from anyone: the flow is over.
        let time_waiting = state == tcp::State::TimeWait && !socket.can_recv();
        if time_waiting && self.read != ReadState::Finished {
            // We had closed first, and the application's FIN came after its last byte had
            // been read: the flow ends in this same step, so no read can learn of the FIN any
            // more. Say it here, or the reader would take the end for a reset.
            self.read = ReadState::Finished;
            events.push_back(Event::Finished(id));
            return true;
        }
        if self.read == ReadState::Quiet && (socket.can_recv() || fin_received) {
            self.read = ReadState::Reported;
            events.push_back(Event::Readable(id));
        }
        if self.write == WriteState::Blocked && socket.may_send() && socket.send_queue() < socket.send_capacity() {
            self.write = WriteState::Open;
            events.push_back(Event::Writable(id));
        }
        matches!(state, tcp::State::Closed | tcp::State::Listen) || time_waiting
    }
}

impl Stack {
    /// The device has connected: answer the held SYN with a SYN-ACK.
    pub fn accept_flow(&mut self, id: FlowId, now: Instant) -> Result<(), FlowError> {
        self.advance(now);
        let flow = self.flows.get(&id).ok_or(FlowError::Unknown)?;
        let FlowState::Pending { .. } = flow.state else { return Err(FlowError::NotPending) };
        let tuple = flow.tuple;
        // Let smoltcp see everything queued so far first, so the new listener sees only its SYN.
        self.poll_now();
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.config.rx_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.config.tx_buffer]),
        );
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint { addr: Some(tuple.dst.ip().into()), port: tuple.dst.port() };
        if socket.listen(endpoint).is_err() {
            return Err(FlowError::Closed);
        }
        let handle = self.sockets.add(socket);
        let Some(flow) = self.flows.get_mut(&id) else { return Err(FlowError::Unknown) };
        let old = std::mem::replace(&mut flow.state, FlowState::Open(OpenFlow::new(handle, now)));
        self.pending -= 1;
        if let FlowState::Pending { syn, .. } = old {
            self.queues.rx.push_back(syn);
        }
        self.poll_now();
        if !self.flows.contains_key(&id) {
            // smoltcp left the socket listening, so `poll_now` ended the flow.
            return Err(FlowError::Closed);
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let took_it = socket.state() == tcp::State::SynReceived
            && socket.remote_endpoint().map(|e| SocketAddr::new(e.addr.into(), e.port)) == Some(tuple.src);
        if !took_it {
            // smoltcp refused the SYN (it cannot, for one we parsed, but never leave a listener
            // that could take another flow's SYN).
            socket.abort();
            self.dirty = true;
            return Err(FlowError::Closed);
        }
        self.stats.flows_accepted += 1;
        Ok(())
    }

    /// The device could not open the flow: answer the held SYN with a reset or an unreachable.
    pub fn refuse_flow(&mut self, id: FlowId, kind: RefuseKind) -> Result<(), FlowError> {
        let flow = self.flows.get(&id).ok_or(FlowError::Unknown)?;
        let FlowState::Pending { seg, .. } = &flow.state else { return Err(FlowError::NotPending) };
        let reply = match kind {
            RefuseKind::Refused => {
                self.stats.resets_sent += 1;
                packet::reset_for(seg)
            }
            RefuseKind::Unreachable => {
                self.stats.unreachables_sent += 1;
                packet::unreachable_for(seg)
            }
        };
        self.stats.flows_refused += 1;
        self.forget(id);
        self.reply(reply);
        Ok(())
    }

    /// Read what the application sent. `Ok(0)` means nothing is buffered now (wait for
    /// [`Event::Readable`]); `Err(Finished)` means the application closed its sending side.
    pub fn recv(&mut self, id: FlowId, buf: &mut [u8]) -> Result<usize, FlowError> {
        self.read(id, |socket| socket.recv_slice(buf))
    }

    /// Read what the application sent without copying it out first: `f` is handed the bytes
    /// that lie contiguously at the front of the flow's receive buffer and returns how many of
    /// them it took (more than it was given counts as all of them). Returns that count.
    /// Otherwise as [`Stack::recv`]: `Ok(0)` means nothing is buffered now (and `f` is not
    /// called), `Err(Finished)` that the application closed its sending side. The buffer is a
    /// ring, so the bytes may come in two parts: call again until `Ok(0)`.
    pub fn recv_with(&mut self, id: FlowId, f: impl FnOnce(&[u8]) -> usize) -> Result<usize, FlowError> {
        self.read(id, |socket| {
            socket.recv(|bytes| {
                if bytes.is_empty() {
                    return (0, 0);
                }
                let n = f(bytes).min(bytes.len());
                (n, n)
            })
        })
    }

    /// How many bytes the application has sent that wait in the flow's receive buffer, without
    /// taking any. `Ok(0)` and `Err(Finished)` as for [`Stack::recv`]: `Finished` once the
    /// buffer is empty and the application closed its sending side.
    pub fn recv_pending(&mut self, id: FlowId) -> Result<usize, FlowError> {
        let n = self.recv_queue(id);
        if n > 0 {
            return Ok(n);
        }
        self.recv_with(id, |_| 0)
    }

    /// Bytes waiting in the flow's receive buffer (0 for a flow that is gone or not open).
    pub fn recv_queue(&self, id: FlowId) -> usize {
        match self.flows.get(&id).map(|f| &f.state) {
            Some(FlowState::Open(open)) => self.sockets.get::<tcp::Socket>(open.handle).recv_queue(),
            _ => 0,
        }
    }

    /// `recv` and `recv_with`: `read` takes bytes out of the socket, the rest is bookkeeping.
    fn read(
        &mut self,
        id: FlowId,
        read: impl FnOnce(&mut tcp::Socket<'static>) -> Result<usize, tcp::RecvError>,
    ) -> Result<usize, FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
        let result = match read(socket) {
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => {
                open.read = ReadState::Finished;
                Err(FlowError::Finished)
            }
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                tcp::State::Listen | tcp::State::SynReceived => Ok(0),
                _ => Err(FlowError::Closed),
            },
        };
        if socket.recv_queue() == 0 && open.read == ReadState::Reported {
            open.read = ReadState::Quiet;
        }
        // A read opens the window; smoltcp sends the update when polled.
        self.dirty = true;
        result
    }

    /// Queue bytes for the application; returns how many were taken (fewer when the buffer is
    /// full: wait for [`Event::Writable`]). Before the handshake completes nothing is taken.
    pub fn send(&mut self, id: FlowId, data: &[u8]) -> Result<usize, FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        let socket = self.sockets.get_mut::<tcp::Socket>(open.handle);
        let n = if socket.may_send() {
            socket.send_slice(data).map_err(|_| FlowError::Closed)?
        } else if matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived) {
            0
        } else {
            return Err(FlowError::Closed);
        };
        if n < data.len() {
            open.write = WriteState::Blocked;
        }
        if n > 0 {
            self.dirty = true;
        }
        Ok(n)
    }

    /// Close the sending side toward the application (a FIN after the queued data).
    pub fn close(&mut self, id: FlowId) -> Result<(), FlowError> {
        let open = open_flow(&mut self.flows, id)?;
        self.sockets.get_mut::<tcp::Socket>(open.handle).close();
        self.dirty = true;
        Ok(())
    }

    /// Reset the flow. A pending flow is refused.
    pub fn abort(&mut self, id: FlowId) -> Result<(), FlowError> {
        match open_flow(&mut self.flows, id) {
            Ok(open) => {
                self.sockets.get_mut::<tcp::Socket>(open.handle).abort();
                self.dirty = true;
                Ok(())
            }
            Err(FlowError::Pending) => self.refuse_flow(id, RefuseKind::Refused),
            Err(e) => Err(e),
        }
    }

    /// Drop a flow and its socket (the caller reports it closed if it had been announced).
    pub(super) fn forget(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.remove(&id) {
            self.by_tuple.remove(&flow.tuple);
            match flow.state {
                FlowState::Pending { .. } => self.pending -= 1,
                FlowState::Open(open) => {
                    self.sockets.remove(open.handle);
                }
            }
        }
    }
}

fn open_flow(flows: &mut HashMap<FlowId, Flow>, id: FlowId) -> Result<&mut OpenFlow, FlowError> {
    match flows.get_mut(&id).map(|f| &mut f.state) {
        None => Err(FlowError::Unknown),
        Some(FlowState::Pending { .. }) => Err(FlowError::Pending),
        Some(FlowState::Open(open)) => Ok(open),
    }
}
