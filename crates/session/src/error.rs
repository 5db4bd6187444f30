use std::sync::Arc;

/// Why a session (or one operation on it) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// A handshake message or a record failed authentication or decryption. Deliberately says
    /// nothing more: no oracle for an attacker.
    #[error("cryptographic failure (handshake or record authentication)")]
    Crypto,
    /// The handshake was driven out of order or its message had an unexpected shape.
    #[error("handshake protocol error: {0}")]
    Handshake(&'static str),
    /// The record counter reached 2^64 - 1, the nonce Noise reserves for rekeying; the session
    /// must end rather than reuse a nonce. (Keys themselves are replaced long before their data
    /// limit, see [`crate::record`].)
    #[error("session record counter exhausted (2^64 - 1 records)")]
    KeyExhausted,
    /// A record's announced or actual size is above the limit.
    #[error("record of {len} bytes exceeds the limit")]
    RecordTooLarge {
        /// The offending length in bytes.
        len: usize,
    },
    /// The stream ended in the middle of a record.
    #[error("stream truncated inside a record")]
    Truncated,
    /// The peer sent a frame that does not parse.
    #[error("malformed frame: {0}")]
    BadFrame(&'static str),
    /// The peer sent a well-formed frame that breaks the protocol (credit, flow ids, ordering).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// An operation named a flow that does not exist (or no longer exists).
    #[error("unknown flow {0}")]
    UnknownFlow(u32),
    /// The session is closed (locally, by the peer, or by a keepalive timeout).
    #[error("session closed: {0}")]
    Closed(String),
    /// Reading or writing the underlying byte stream failed.
    #[error("transport I/O failed: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(Arc::new(e))
    }
}
