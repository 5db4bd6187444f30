//! Packets from the TUN: whose they are, which flow they belong to, and what to answer for
//! those no flow takes. Only segments of open flows reach smoltcp.

use std::net::SocketAddr;
use std::time::Instant;

use np_session::frame::MAX_DATAGRAM;

use super::flow::{Flow, FlowState, Tuple};
use super::{Event, FlowId, RxChecksum, Stack};
use crate::packet::{self, Segment, Unusable};

impl Stack {
    /// Take a packet read from the TUN. A packet whose source is not the interface's own address
    /// (see [`AddressMap::is_interface_addr`]), and anything that is not a well-formed TCP
    /// segment to a mapped address, is dropped and counted.
    ///
    /// [`AddressMap::is_interface_addr`]: crate::map::AddressMap::is_interface_addr
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        self.handle_packet_with(packet, RxChecksum::Complete, now);
    }

    /// [`Stack::handle_packet`] with what the TUN said of the packet's TCP checksum.
    pub fn handle_packet_with(&mut self, packet: &[u8], checksum: RxChecksum, now: Instant) {
        if self.intake(packet, checksum, now) {
            let copy = self.queues.rx_copy(packet);
            self.queues.rx.push_back(copy);
        }
    }

    /// [`Stack::handle_packet`] for a packet read into a buffer of [`Stack::packet_buffer`]: a
    /// segment of an open flow goes to smoltcp as it is, without a copy.
    pub fn handle_packet_owned(&mut self, packet: Vec<u8>, now: Instant) {
        self.handle_packet_owned_with(packet, RxChecksum::Complete, now);
    }

    /// [`Stack::handle_packet_owned`] with what the TUN said of the packet's TCP checksum.
    pub fn handle_packet_owned_with(&mut self, packet: Vec<u8>, checksum: RxChecksum, now: Instant) {
        if self.intake(&packet, checksum, now) {
            self.queues.rx.push_back(packet);
        } else {
            super::device::recycle(&mut self.queues.rx_free, packet);
        }
    }

    /// A buffer of `len` bytes to read the next packet into (see [`Stack::handle_packet_owned`]),
    /// reused when one is spare.
    pub fn packet_buffer(&mut self, len: usize) -> Vec<u8> {
        // Growing a buffer zeroes what it grows by: take one that held a big packet.
        let pool = &mut self.queues.rx_free;
        let mut buf = match pool.iter().rposition(|b| b.len() >= len / 2) {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        buf.resize(len, 0);
        buf
    }

    /// Everything about a packet but handing it to smoltcp: true if it should be (a segment of
    /// an open flow).
    fn intake(&mut self, packet: &[u8], checksum: RxChecksum, now: Instant) -> bool {
        self.advance(now);
        self.stats.packets_in += 1;
        if packet::is_ipv6_multicast(packet) {
            // The kernel's own listener reports and solicitations, from a link-local source.
            self.stats.multicast += 1;
            return false;
        }
        // First of all, whose packet it is: only this host's own (its source address is the
        // interface's). Anything else was forwarded in from another host and gets no flow, no
        // reset, no ICMP: nothing that would tell it a device is there.
        match packet::source(packet) {
            None => {
                self.stats.malformed += 1;
                return false;
            }
            Some(src) if !self.map.is_interface_addr(src) => {
                self.stats.foreign_source += 1;
                tracing::trace!(%src, "dropped a packet from another host");
                return false;
            }
            Some(_) => {}
        }
        let seg = match packet::parse_tcp_with(packet, checksum) {
            Ok(seg) => seg,
            Err(Unusable::Malformed) => {
                self.stats.malformed += 1;
                return false;
            }
            Err(Unusable::Fragment) => {
                self.stats.fragments += 1;
                return false;
            }
            Err(Unusable::Ipv6Extension) => {
                self.stats.ipv6_extension_headers += 1;
                return false;
            }
            Err(Unusable::NotTcp) => {
                self.intake_udp(packet, checksum);
                return false;
            }
        };
        let tuple = Tuple { src: seg.src, dst: seg.dst };
        if let Some(&id) = self.by_tuple.get(&tuple) {
            return self.segment_of_known_flow(id, seg);
        }
        if !seg.is_syn() {
            // Not a flow we know: a reset tells the application so (nothing answers a reset).
            if !seg.is_rst() {
                self.reply(packet::reset_for(&seg));
                self.stats.resets_sent += 1;
            }
            return false;
        }
        let Some(target) = self.map.lookup(seg.dst.ip(), seg.dst.port()) else {
            // An unassigned address in our subnet: say so rather than let connect() hang.
            self.stats.unmapped += 1;
            self.reply(packet::unreachable_for(&seg));
            self.stats.unreachables_sent += 1;
            return false;
        };
        if self.pending + self.half_open >= self.config.max_pending {
            self.stats.pending_full += 1;
            return false;
        }
        if self.flows.len() >= self.config.max_flows {
            self.stats.flows_refused += 1;
            self.stats.resets_sent += 1;
            self.reply(packet::reset_for(&seg));
            return false;
        }
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.stats.flows_new += 1;
        tracing::trace!(flow = %id, src = %seg.src, dst = %seg.dst, "new flow");
        self.events.push_back(Event::NewFlow { id, src: seg.src, dst: seg.dst, target: target.clone() });
        self.flows.insert(id, Flow { tuple, target, state: FlowState::Pending { syn: packet.to_vec(), seg } });
        self.by_tuple.insert(tuple, id);
        self.pending += 1;
        false
    }

    fn segment_of_known_flow(&mut self, id: FlowId, seg: Segment) -> bool {
        let Some(flow) = self.flows.get(&id) else { return false };
        match &flow.state {
            FlowState::Pending { .. } if seg.is_syn() => self.stats.syn_retransmits += 1,
            FlowState::Pending { .. } if seg.is_rst() => {
                // The application gave up before the device answered.
                self.forget(id);
                self.events.push_back(Event::Closed(id));
            }
            FlowState::Pending { .. } => {}
            // A listening socket on the same address and port would take a stray SYN as a new
            // connection; smoltcp retransmits its own SYN-ACK, so a repeated SYN adds nothing.
            FlowState::Open(_) if seg.is_syn() => {}
            FlowState::Open(_) => {
                self.dirty = true;
                return true;
            }
        }
        false
    }

    /// A packet that is not TCP: a UDP datagram to a mapped address becomes an
    /// [`Event::Datagram`]; anything else is dropped and counted.
    fn intake_udp(&mut self, packet: &[u8], checksum: RxChecksum) {
        let d = match packet::parse_udp_with(packet, checksum) {
            Ok(d) => d,
            Err(Unusable::NotTcp) => {
                self.stats.not_tcp += 1;
                return;
            }
            // Fragments and extension headers were told apart by the TCP parse already.
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let Some(payload) = packet.get(d.payload.clone()) else {
            self.stats.malformed += 1;
            return;
        };
        if payload.len() > MAX_DATAGRAM {
            // Only IPv6 can carry one (a session carries what fits IPv4).
            self.stats.udp_oversized += 1;
            return;
        }
        let Some(target) = self.map.lookup(d.dst.ip(), d.dst.port()) else {
            self.stats.unmapped += 1;
            self.reply(packet::port_unreachable(d.src, d.dst, payload));
            self.stats.unreachables_sent += 1;
            return;
        };
        self.stats.udp_datagrams_in += 1;
        self.events.push_back(Event::Datagram { src: d.src, dst: d.dst, target, payload: payload.to_vec() });
    }

    /// Writes a datagram from `from` (a virtual address) to `to` (the application) to the TUN.
    pub fn send_datagram(&mut self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let p = packet::udp_packet(from, to, payload);
        if p.is_empty() {
            self.stats.udp_oversized += 1;
            return;
        }
        self.stats.udp_datagrams_out += 1;
        self.reply(p);
    }

    /// Tells the application at `app` that its datagrams to `virt` are not delivered (an ICMP
    /// port unreachable quoting `payload`, the datagram it answers, or nothing).
    pub fn udp_unreachable(&mut self, app: SocketAddr, virt: SocketAddr, payload: &[u8]) {
        self.stats.unreachables_sent += 1;
        self.reply(packet::port_unreachable(app, virt, payload));
    }

    /// Queue a packet the stack wrote itself (a reset, an unreachable), unless the queue is full.
    pub(super) fn reply(&mut self, packet: Vec<u8>) {
        if packet.is_empty() {
            return;
        }
        if self.queues.tx.len() >= self.queues.max_tx {
            self.stats.tx_queue_full += 1;
            return;
        }
        self.queues.tx.push_back(packet);
    }
}
