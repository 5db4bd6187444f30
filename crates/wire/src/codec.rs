use serde::{de::DeserializeOwned, Serialize};

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The peer announced a frame larger than this side accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The frame's bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The underlying connection failed.
    #[error("i/o error: {0}")]
    Io(String),
}

/// Encodes `payload` as one frame.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    // Callers never build frames over 4 GiB; the limits they enforce on decode are far lower.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Serialises a message (postcard) and frames it.
pub fn encode_msg<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + LEN_PREFIX);
    encode_frame(&body, &mut out);
    out
}

/// Parses one message from a frame's payload; trailing bytes are an error.
pub fn decode_msg<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Splits a byte stream into frames. Feed it bytes as they arrive; take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose payload is larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max, buf: Vec::new() }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame's payload, `Ok(None)` if more bytes are needed.
    ///
    /// The length is checked against the limit as soon as the prefix is complete, so a
    /// too-large announcement fails before its body is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let Some(len) = self.announced()? else {
            return Ok(None);
        };
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let frame = self.buf[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.buf.drain(..LEN_PREFIX + len);
        Ok(Some(frame))
    }

    /// How many more bytes the current frame needs (at least 1 when nothing is buffered).
    pub fn wanted(&self) -> Result<usize, WireError> {
        match self.announced()? {
            None => Ok(LEN_PREFIX - self.buf.len()),
            Some(len) => Ok((LEN_PREFIX + len).saturating_sub(self.buf.len()).max(1)),
        }
    }

    fn announced(&self) -> Result<Option<usize>, WireError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; LEN_PREFIX];
        prefix.copy_from_slice(&self.buf[..LEN_PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_body() {
        let mut d = FrameDecoder::new(16);
        d.push(&1_000_000u32.to_be_bytes());
        assert_eq!(d.next_frame(), Err(WireError::TooLarge { len: 1_000_000, max: 16 }));
        assert_eq!(d.buffered(), 4);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut body = postcard::to_stdvec(&7u32).unwrap_or_default();
        body.push(0);
        assert!(matches!(decode_msg::<u32>(&body), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn frames_roundtrip_in_any_split(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8), split in 1usize..50) {
            let mut stream = Vec::new();
            for p in &payloads { encode_frame(p, &mut stream); }
            let mut d = FrameDecoder::new(300);
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                d.push(chunk);
                while let Some(f) = d.next_frame().map_err(|e| TestCaseError::fail(e.to_string()))? { got.push(f); }
            }
            prop_assert_eq!(got, payloads);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new(64);
            d.push(&bytes);
            while let Ok(Some(f)) = d.next_frame() { let _ = decode_msg::<(u64, String)>(&f); }
        }
    }
}
