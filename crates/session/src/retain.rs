//! Sealed records kept until the peer acknowledges them, to be resent as they are after a
//! resume (see [`crate::resume`]).
//!
//! Records are kept in the batches they were sealed in (one `Bytes` per transmit call, shared
//! with the shell that writes it, so keeping them costs no copy on the zero-copy transmit path).
//! An acknowledgement drops whole batches, and cuts into the first one by walking its records'
//! length prefixes (our own bytes, so trusted).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::record::HEADER_LEN;

#[derive(Debug)]
struct Batch {
    /// The record counter (nonce) of the first record in `bytes`.
    first: u64,
    /// Records in `bytes`.
    count: u64,
    bytes: Bytes,
}

/// Records sealed and not yet acknowledged, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    batches: VecDeque<Batch>,
    /// Records below this were acknowledged (the peer's latest acknowledgement).
    acked: u64,
    /// Bytes held.
    bytes: usize,
    /// Batches acknowledged in full, kept so their buffers can be sealed into again once the
    /// writer is done with them (see [`Retained::reusable`]).
    spent: Vec<Bytes>,
}

/// Acknowledged batches kept for their buffers: a fresh buffer per batch (half a megabyte,
/// faulted in and zeroed by the kernel) cost a resuming np forward three quarters more CPU per
/// byte than one that does not resume.
const SPARE_BUFFERS: usize = 4;

impl Retained {
    /// Keeps `count` records starting at counter `first`, laid end to end in `bytes`. They must
    /// follow on from what is kept already.
    pub(crate) fn push(&mut self, first: u64, count: u64, bytes: Bytes) {
        if count == 0 {
            return;
        }
        debug_assert_eq!(self.batches.back().map_or(self.acked, |b| b.first + b.count), first);
        self.bytes += bytes.len();
        self.batches.push_back(Batch { first, count, bytes });
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The peer's latest acknowledgement: it has opened every record below this.
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    /// The peer has opened every record below `upto` (which the caller has checked is no more
    /// than we sealed): forget them. An acknowledgement below an earlier one changes nothing:
    /// a record resent after a resume still carries the `Ack` it was sealed with, older than
    /// what the resume itself told us.
    pub(crate) fn ack(&mut self, upto: u64) {
        if upto <= self.acked {
            return;
        }
        self.acked = upto;
        while let Some(front) = self.batches.front_mut() {
            if front.first + front.count <= upto {
                self.bytes -= front.bytes.len();
                if let Some(batch) = self.batches.pop_front() {
                    if self.spent.len() < SPARE_BUFFERS {
                        self.spent.push(batch.bytes);
                    }
                }
                continue;
            }
            if front.first < upto {
                let mut at = 0;
                for _ in front.first..upto {
                    at += HEADER_LEN + record_len(&front.bytes[at..]);
                }
                let at = at.min(front.bytes.len());
                self.bytes -= at;
                front.bytes = front.bytes.slice(at..);
                front.count -= upto - front.first;
                front.first = upto;
            }
            break;
        }
    }

    /// Everything held, in order: what to resend after [`Retained::ack`] of what the peer has.
    pub(crate) fn all(&self) -> impl Iterator<Item = Bytes> + '_ {
        self.batches.iter().map(|b| b.bytes.clone())
    }

    /// Drops everything (the session ended).
    pub(crate) fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
        self.spent.clear();
    }

    /// An empty buffer of at least `capacity` bytes that an acknowledged batch was sealed in, if
    /// nothing else (the writer) still holds that batch.
    pub(crate) fn reusable(&mut self, capacity: usize) -> Option<Vec<u8>> {
        let mut i = 0;
        while i < self.spent.len() {
            if !self.spent[i].is_unique() {
                i += 1;
                continue;
            }
            let Ok(mut buf) = self.spent.swap_remove(i).try_into_mut() else { continue };
            // Empty first: turning it back into a Vec then moves no bytes.
            buf.clear();
            let buf = Vec::from(buf);
            if buf.capacity() >= capacity {
                return Some(buf);
            }
        }
        None
    }

    /// Forgets the spare buffers (the session is idle: it should hold no memory it needs not).
    pub(crate) fn shed_spares(&mut self) {
        self.spent.clear();
    }
}

/// The ciphertext length a record's prefix announces (0 for a short slice, never reached: the
/// records are our own, complete).
fn record_len(record: &[u8]) -> usize {
    match record.get(..HEADER_LEN) {
        Some(h) => u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Sealer;

    fn sealed(first: u64, n: u64) -> Bytes {
        let mut s = Sealer::with_counter(&[1; 32], first, 1 << 20);
        let mut out = Vec::new();
        for i in first..first + n {
            s.seal(&vec![i as u8; i as usize * 10], &mut out).expect("seal");
        }
        Bytes::from(out)
    }

    #[test]
    fn acks_drop_whole_batches_and_cut_into_the_first() {
        let mut r = Retained::default();
        let (a, b) = (sealed(0, 3), sealed(3, 4));
        r.push(0, 3, a.clone());
        r.push(3, 4, b.clone());
        assert_eq!(r.bytes(), a.len() + b.len());
        r.ack(2);
        let rest: Vec<u8> = r.all().flat_map(|b| b.to_vec()).collect();
        let mut want = sealed(2, 1).to_vec();
        want.extend_from_slice(&b);
        assert_eq!(rest, want, "exactly the records from 2 on, byte for byte");
        assert_eq!(r.bytes(), want.len());
        r.ack(5);
        assert_eq!(r.all().flat_map(|b| b.to_vec()).collect::<Vec<u8>>(), sealed(5, 2).to_vec());
        r.ack(4);
        assert_eq!(r.acked(), 5, "an older acknowledgement changes nothing");
        r.ack(7);
        assert_eq!((r.bytes(), r.all().count()), (0, 0));
    }

    #[test]
    fn an_acknowledged_batchs_buffer_is_sealed_into_again_once_the_writer_is_done() {
        let mut r = Retained::default();
        let mut v = Vec::with_capacity(4096);
        v.extend_from_slice(&sealed(0, 3));
        let batch = Bytes::from(v);
        let writing = batch.clone();
        r.push(0, 3, batch);
        assert!(r.reusable(4096).is_none(), "still held until acknowledged");
        r.ack(3);
        assert!(r.reusable(4096).is_none(), "the writer still holds it");
        drop(writing);
        let again = r.reusable(4096).expect("free now");
        assert!(again.is_empty() && again.capacity() >= 4096);
        assert!(r.reusable(1).is_none(), "handed out once");
        // Idle: spares are forgotten.
        r.push(3, 1, sealed(3, 1));
        r.ack(4);
        r.shed_spares();
        assert!(r.reusable(1).is_none());
    }
}
