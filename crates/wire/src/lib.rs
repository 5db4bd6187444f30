//! Frames: a 4-byte big-endian length followed by that many bytes of payload.
//!
//! Every np protocol that is not raw ciphertext uses these frames. The decoder is a pure state
//! machine over bytes ([`FrameDecoder`]); the tokio helpers in [`io`] are a thin shell over it.
//! A length above the caller's limit is an error *before* any buffer is grown, so an attacker
//! cannot make us allocate by announcing a huge frame.

mod codec;
#[cfg(feature = "tokio")]
pub mod io;

pub use codec::{decode_msg, encode_frame, encode_msg, FrameDecoder, WireError, LEN_PREFIX};
