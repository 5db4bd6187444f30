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
    /// The peer went past a limit that a well-behaved peer keeps to (flows per session, data
    /// before acceptance), or we would have (`Mux::open` past the flow limit). The peer is
    /// treated as abusive: its session ends, other sessions are untouched.
    #[error("session limit exceeded: {0}")]
    Limit(&'static str),
    /// An operation named a flow that does not exist (or no longer exists).
    #[error("unknown flow {0}")]
    UnknownFlow(u32),
    /// The session is closed (locally, by the peer, or by a keepalive timeout).
    #[error("session closed: {0}")]
    Closed(String),
    /// A resume attempt on a new transport was refused: the peer's resume message was
    /// malformed, forged, replayed or from another session. Only that attempt fails; the session
    /// waits for another within its resume window.
    #[error("resume refused: {0}")]
    ResumeRefused(&'static str),
    /// The transport broke and no resume succeeded within the resume window: every flow is
    /// gone, as when a session ends.
    #[error("the session's transport broke and it did not resume within {0} s")]
    ResumeExpired(u64),
    /// Reading or writing the underlying byte stream failed.
    #[error("transport I/O failed: {0}")]
    Io(Arc<std::io::Error>),
}

impl SessionError {
    /// Whether the session was merely stale, so a flow whose open failed with this error is worth
    /// one more try on a new session.
    ///
    /// Yes when it ended (an orderly close, a keepalive timeout, the counter at its end), its
    /// connection broke, or its stream stopped short (a relay restart). No when it failed its
    /// authentication or the peer broke the protocol: the stream was tampered with, so the
    /// application should get a clear error now. A new session would meet the same attacker,
    /// and when the tampering is a held-back or dropped record it is only revealed by the next
    /// keepalive, so retrying would keep the flow open a second keepalive interval.
    pub fn is_stale(&self) -> bool {
        match self {
            SessionError::Closed(_)
            | SessionError::Io(_)
            | SessionError::Truncated
            | SessionError::KeyExhausted
            | SessionError::ResumeExpired(_) => true,
            SessionError::Crypto
            | SessionError::Handshake(_)
            | SessionError::RecordTooLarge { .. }
            | SessionError::BadFrame(_)
            | SessionError::Protocol(_)
            | SessionError::Limit(_)
            | SessionError::ResumeRefused(_)
            | SessionError::UnknownFlow(_) => false,
        }
    }
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stale_session_is_worth_a_new_one() {
        for stale in [
            SessionError::Closed("keepalive timeout".into()),
            SessionError::Io(Arc::new(std::io::ErrorKind::ConnectionReset.into())),
            SessionError::Truncated,
            SessionError::KeyExhausted,
            SessionError::ResumeExpired(600),
        ] {
            assert!(stale.is_stale(), "{stale}");
        }
        for tampered in [
            SessionError::Crypto,
            SessionError::BadFrame("x"),
            SessionError::Protocol("x"),
            SessionError::Limit("x"),
            SessionError::RecordTooLarge { len: 1 << 20 },
        ] {
            assert!(!tampered.is_stale(), "{tampered}");
        }
    }
}
