//! Mux frames: a small hand-written big-endian binary format, one or more per record.
//!
//! `type:u8` then the fields; strings are `len:u16` + UTF-8, `Data` is `flow:u32 len:u32 bytes`.
//! Decoding borrows `Data` payloads out of the record plaintext (`Bytes::slice`), so received
//! bytes are never copied between decryption and the application's read buffer.

use bytes::Bytes;

use crate::record::MAX_RECORD_PLAINTEXT;
use crate::SessionError;

/// Longest `target` or `reason` string accepted, in bytes.
pub const MAX_TEXT: usize = 1024;
/// Header bytes in front of a `Data` payload.
pub const DATA_HEADER: usize = 9;

const OPEN: u8 = 1;
const OPEN_OK: u8 = 2;
const OPEN_ERR: u8 = 3;
const DATA: u8 = 4;
const CREDIT: u8 = 5;
const FIN: u8 = 6;
const RESET: u8 = 7;
const PING: u8 = 8;
const PONG: u8 = 9;
const CLOSE: u8 = 10;
const UDP_OPEN: u8 = 11;
const DATAGRAM: u8 = 12;
const UDP_CLOSE: u8 = 13;

/// Header bytes in front of a `Datagram` payload (`type assoc:u32 len:u16`).
pub const DATAGRAM_HEADER: usize = 7;
/// Largest datagram a session carries: the largest UDP payload over IPv4 (65535 less the IP and
/// UDP headers), which also fits a record with its header. Longer ones are dropped and counted.
pub const MAX_DATAGRAM: usize = 65_507;
const ACK: u8 = 14;

/// One mux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client asks the device to dial `target` (`host:port`) for a new flow.
    Open {
        /// The new flow's id.
        flow: u32,
        /// Where the device should connect.
        target: String,
    },
    /// The flow was accepted (the target is connected).
    OpenOk {
        /// The accepted flow.
        flow: u32,
    },
    /// The flow was refused.
    OpenErr {
        /// The refused flow.
        flow: u32,
        /// Why, for the user.
        reason: String,
    },
    /// Bytes of one flow.
    Data {
        /// The flow carrying them.
        flow: u32,
        /// The bytes.
        bytes: Bytes,
    },
    /// The receiver grants `bytes` more of window.
    Credit {
        /// The flow.
        flow: u32,
        /// Additional bytes the sender may send.
        bytes: u32,
    },
    /// The sender will send no more on this flow (half-close).
    Fin {
        /// The flow.
        flow: u32,
    },
    /// The flow is aborted in both directions.
    Reset {
        /// The flow.
        flow: u32,
        /// Why.
        reason: String,
    },
    /// Keepalive probe.
    Ping {
        /// Echoed in the `Pong`.
        id: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The `Ping`'s id.
        id: u64,
    },
    /// Client asks the device for a UDP association to `target` (`host:port`); only in a
    /// session that negotiated UDP.
    UdpOpen {
        /// The new association's id.
        assoc: u32,
        /// Where the device should send.
        target: String,
    },
    /// One whole datagram of an association.
    Datagram {
        /// The association.
        assoc: u32,
        /// The payload (at most [`MAX_DATAGRAM`]).
        bytes: Bytes,
    },
    /// The association is over (refused, idle, evicted); either side may send it.
    UdpClose {
        /// The association.
        assoc: u32,
        /// Why.
        reason: String,
    },
    /// The whole session ends.
    Close {
        /// Why.
        reason: String,
    },
    /// The sender has opened this many of the receiver's records (the count, not an index), so
    /// the receiver may forget them (see [`crate::retain`]).
    Ack {
        /// Records opened.
        records: u64,
    },
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Longer texts are cut at a char boundary rather than refused: they are only diagnostics
    // (targets are checked at `Mux::open`).
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Frame {
    /// Appends the encoding of this frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Open { flow, target } => {
                out.push(OPEN);
                out.extend_from_slice(&flow.to_be_bytes());
                put_text(out, target);
            }
            Frame::OpenOk { flow } => {
                out.push(OPEN_OK);
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Frame::OpenErr { flow, reason } => {
                out.push(OPEN_ERR);
                out.extend_from_slice(&flow.to_be_bytes());
                put_text(out, reason);
            }
            Frame::Data { flow, bytes } => {
                encode_data_header(out, *flow, bytes.len());
                out.extend_from_slice(bytes);
            }
            Frame::Credit { flow, bytes } => {
                out.push(CREDIT);
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&bytes.to_be_bytes());
            }
            Frame::Fin { flow } => {
                out.push(FIN);
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Frame::Reset { flow, reason } => {
                out.push(RESET);
                out.extend_from_slice(&flow.to_be_bytes());
                put_text(out, reason);
            }
            Frame::Ping { id } => {
                out.push(PING);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Frame::Pong { id } => {
                out.push(PONG);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Frame::Close { reason } => {
                out.push(CLOSE);
                put_text(out, reason);
            }
            Frame::UdpOpen { assoc, target } => {
                out.push(UDP_OPEN);
                out.extend_from_slice(&assoc.to_be_bytes());
                put_text(out, target);
            }
            Frame::Datagram { assoc, bytes } => {
                // Senders never queue more (`Mux::udp_send` drops it): cut rather than corrupt.
                let n = bytes.len().min(MAX_DATAGRAM);
                out.push(DATAGRAM);
                out.extend_from_slice(&assoc.to_be_bytes());
                out.extend_from_slice(&(n as u16).to_be_bytes());
                out.extend_from_slice(&bytes[..n]);
            }
            Frame::UdpClose { assoc, reason } => {
                out.push(UDP_CLOSE);
                out.extend_from_slice(&assoc.to_be_bytes());
                put_text(out, reason);
            }
            Frame::Ack { records } => {
                out.push(ACK);
                out.extend_from_slice(&records.to_be_bytes());
            }
        }
    }

    /// Size of the encoding (texts as they would be cut by `encode`).
    pub fn encoded_len(&self) -> usize {
        let text = |s: &String| 2 + s.len().min(MAX_TEXT);
        match self {
            Frame::Open { target: s, .. } | Frame::OpenErr { reason: s, .. } => 5 + text(s),
            Frame::Reset { reason: s, .. } => 5 + text(s),
            Frame::OpenOk { .. } | Frame::Fin { .. } => 5,
            Frame::Data { bytes, .. } => DATA_HEADER + bytes.len(),
            Frame::Credit { .. } => 9,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::Ack { .. } => 9,
            Frame::Close { reason } => 1 + text(reason),
            Frame::UdpOpen { target: s, .. } | Frame::UdpClose { reason: s, .. } => 5 + text(s),
            Frame::Datagram { bytes, .. } => DATAGRAM_HEADER + bytes.len().min(MAX_DATAGRAM),
        }
    }
}

/// Is this record plaintext a lone `Ack` (which needs no acknowledgement of its own)?
pub fn is_ack_only(plaintext: &[u8]) -> bool {
    plaintext.len() == 9 && plaintext[0] == ACK
}

/// Writes a `Data` header; the caller appends `len` payload bytes right after.
pub fn encode_data_header(out: &mut Vec<u8>, flow: u32, len: usize) {
    out.push(DATA);
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Rewrites the length of the data frame whose header starts `frame` (written by
/// [`encode_data_header`] before the bytes were known).
pub fn set_data_len(frame: &mut [u8], len: usize) {
    if let Some(field) = frame.get_mut(5..DATA_HEADER) {
        field.copy_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Iterates the frames of one record plaintext.
#[derive(Debug)]
pub struct FrameReader {
    buf: Bytes,
    pos: usize,
}

impl FrameReader {
    /// Reads frames from one record's plaintext.
    pub fn new(buf: Bytes) -> FrameReader {
        FrameReader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], SessionError> {
        let end = self.pos.checked_add(n).ok_or(SessionError::BadFrame("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or(SessionError::BadFrame("truncated frame"))?;
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, SessionError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, SessionError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, SessionError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn text(&mut self) -> Result<String, SessionError> {
        let n = self.u16()? as usize;
        if n > MAX_TEXT {
            return Err(SessionError::BadFrame("text too long"));
        }
        let b = self.take(n)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| SessionError::BadFrame("text is not UTF-8"))
    }

    /// The next frame, `None` at the end of the record.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let ty = self.take(1)?[0];
        let f = match ty {
            OPEN => Frame::Open { flow: self.u32()?, target: self.text()? },
            OPEN_OK => Frame::OpenOk { flow: self.u32()? },
            OPEN_ERR => Frame::OpenErr { flow: self.u32()?, reason: self.text()? },
            DATA => {
                let flow = self.u32()?;
                let len = self.u32()? as usize;
                if len > MAX_RECORD_PLAINTEXT {
                    return Err(SessionError::BadFrame("data frame too long"));
                }
                let start = self.pos;
                self.take(len)?;
                Frame::Data { flow, bytes: self.buf.slice(start..start + len) }
            }
            CREDIT => Frame::Credit { flow: self.u32()?, bytes: self.u32()? },
            FIN => Frame::Fin { flow: self.u32()? },
            RESET => Frame::Reset { flow: self.u32()?, reason: self.text()? },
            PING => Frame::Ping { id: self.u64()? },
            PONG => Frame::Pong { id: self.u64()? },
            CLOSE => Frame::Close { reason: self.text()? },
            UDP_OPEN => Frame::UdpOpen { assoc: self.u32()?, target: self.text()? },
            DATAGRAM => {
                let assoc = self.u32()?;
                let len = self.u16()? as usize;
                if len > MAX_DATAGRAM {
                    return Err(SessionError::BadFrame("datagram too long"));
                }
                let start = self.pos;
                self.take(len)?;
                Frame::Datagram { assoc, bytes: self.buf.slice(start..start + len) }
            }
            UDP_CLOSE => Frame::UdpClose { assoc: self.u32()?, reason: self.text()? },
            ACK => Frame::Ack { records: self.u64()? },
            _ => return Err(SessionError::BadFrame("unknown frame type")),
        };
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex(".{0,40}").expect("regex")
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u32>(), text()).prop_map(|(flow, target)| Frame::Open { flow, target }),
            any::<u32>().prop_map(|flow| Frame::OpenOk { flow }),
            (any::<u32>(), text()).prop_map(|(flow, reason)| Frame::OpenErr { flow, reason }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(flow, b)| { Frame::Data { flow, bytes: Bytes::from(b) } }),
            (any::<u32>(), any::<u32>()).prop_map(|(flow, bytes)| Frame::Credit { flow, bytes }),
            any::<u32>().prop_map(|flow| Frame::Fin { flow }),
            (any::<u32>(), text()).prop_map(|(flow, reason)| Frame::Reset { flow, reason }),
            any::<u64>().prop_map(|id| Frame::Ping { id }),
            any::<u64>().prop_map(|id| Frame::Pong { id }),
            text().prop_map(|reason| Frame::Close { reason }),
            (any::<u32>(), text()).prop_map(|(assoc, target)| Frame::UdpOpen { assoc, target }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(assoc, b)| Frame::Datagram { assoc, bytes: Bytes::from(b) }),
            (any::<u32>(), text()).prop_map(|(assoc, reason)| Frame::UdpClose { assoc, reason }),
            any::<u64>().prop_map(|records| Frame::Ack { records }),
        ]
    }

    #[test]
    fn long_text_is_cut_on_char_boundary() {
        let f = Frame::Close { reason: "é".repeat(MAX_TEXT) };
        let mut out = Vec::new();
        f.encode(&mut out);
        let mut r = FrameReader::new(Bytes::from(out));
        match r.next_frame() {
            Ok(Some(Frame::Close { reason })) => assert_eq!(reason.len(), MAX_TEXT),
            other => panic!("unexpected {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn prop_round_trip(frames in proptest::collection::vec(frame(), 0..10)) {
            let mut out = Vec::new();
            for f in &frames {
                let before = out.len();
                f.encode(&mut out);
                prop_assert_eq!(out.len() - before, f.encoded_len());
            }
            let mut r = FrameReader::new(Bytes::from(out));
            let mut got = Vec::new();
            while let Some(f) = r.next_frame().expect("decode") { got.push(f); }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn prop_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut r = FrameReader::new(Bytes::from(data));
            for _ in 0..1000 {
                match r.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
