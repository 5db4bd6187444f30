use np_control_proto::ErrorCode;

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {address}: {reason}")]
    Connect { address: String, reason: String },
    /// TLS failed (including a certificate that does not match the pin).
    #[error("TLS with the control plane at {address} failed: {reason}")]
    Tls { address: String, reason: String },
    /// The server refused the request.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The server said something that does not follow the protocol.
    #[error("control-plane protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("the control plane did not answer in time ({0})")]
    Timeout(&'static str),
    /// The connection dropped while the request was outstanding.
    #[error("the connection to the control plane dropped")]
    Disconnected,
    /// The client was shut down.
    #[error("the control-plane client has shut down")]
    Closed,
    /// Keys or home directory.
    #[error(transparent)]
    Identity(#[from] np_identity::IdentityError),
    /// A peer's keys differ from the pinned ones.
    #[error(transparent)]
    Pin(#[from] np_identity::home::PinError),
}
