//! The in-memory device smoltcp reads from and writes to: packets from the TUN wait in `rx`,
//! packets for the TUN in `tx`. smoltcp never sees a file descriptor or a clock.

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};

/// The in-memory device smoltcp reads from and writes to.
pub(crate) struct Queues {
    /// Packets from the TUN, for smoltcp.
    pub(crate) rx: VecDeque<Vec<u8>>,
    /// Packets from smoltcp (and the stack's own replies), for the TUN.
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// smoltcp is told the device is busy while `tx` holds this many.
    pub(crate) max_tx: usize,
    pub(crate) mtu: usize,
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < self.max_tx).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

pub(crate) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub(crate) struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}
