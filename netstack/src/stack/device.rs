//! The in-memory device smoltcp reads from and writes to: packets from the TUN wait in `rx`,
//! packets for the TUN in `tx`. smoltcp never sees a file descriptor or a clock.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};

/// The in-memory device smoltcp reads from and writes to.
pub(crate) struct Queues {
    /// Packets from the TUN, for smoltcp.
    pub(crate) rx: VecDeque<Vec<u8>>,
    /// Packets from smoltcp (and the stack's own replies), for the TUN.
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// smoltcp is told the device is busy while `tx` holds this many.
    pub(crate) max_tx: usize,
    pub(crate) mtu: usize,
    /// smoltcp leaves TCP checksums to the kernel (see `StackConfig::tcp_checksum_offload`).
    pub(crate) tcp_checksum_offload: bool,
    /// Spent packet buffers, reused for the next packets either way: a 64 KiB allocation and
    /// free per packet made the allocator grow and shrink the heap (page faults, TLB
    /// shootdowns) on every transfer.
    pub(crate) rx_free: Vec<Vec<u8>>,
    pub(crate) tx_free: Vec<Vec<u8>>,
}

/// Spent buffers kept per direction.
const POOL: usize = 64;

/// Keeps `buf` for reuse if the pool has room.
pub(crate) fn recycle(pool: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if pool.len() < POOL {
        pool.push(buf);
    }
}

impl Queues {
    /// Empty queues for packets of at most `mtu` bytes, `max_tx` of them waiting at most.
    pub(crate) fn new(max_tx: usize, mtu: usize, tcp_checksum_offload: bool) -> Queues {
        Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            max_tx,
            mtu,
            tcp_checksum_offload,
            rx_free: Vec::new(),
            tx_free: Vec::new(),
        }
    }

    /// A copy of `packet` for `rx`, in a reused buffer when there is one.
    pub(crate) fn rx_copy(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut buf = self.rx_free.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        buf
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet, &mut self.rx_free), TxToken(&mut self.tx, &mut self.tx_free)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < self.max_tx).then_some(TxToken(&mut self.tx, &mut self.tx_free))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Every packet in `rx` passed the intake's parse, which checked its IPv4 and TCP
        // checksums (`packet::parse_tcp`); checking them again is a second pass over every byte.
        // smoltcp still computes them on what it sends.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = if self.tcp_checksum_offload { Checksum::None } else { Checksum::Tx };
        caps
    }
}

pub(crate) struct RxToken<'a>(Vec<u8>, &'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        recycle(self.1, self.0);
        r
    }
}

pub(crate) struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>, &'a mut Vec<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // A reused buffer is cut or grown to `len`; smoltcp writes every byte of it.
        let mut buf = self.1.pop().unwrap_or_default();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}
