//! The control-plane protocol.
//!
//! A connection is TLS 1.3 to a server whose certificate the client pins (the SHA-256 carried in
//! its enrolment code). Inside, np-wire frames carry postcard messages:
//!
//! 1. server → [`ServerHello`] with a fresh nonce;
//! 2. client → [`ClientFrame`]s: `Enroll` or `Auth` first (each signs a transcript that includes the
//!    nonce, so a captured signature is useless on another connection), then anything else;
//! 3. server → [`ServerFrame`]s: a `Reply` per request (matched by id), and `Push` for each
//!    notification addressed to this identity, which the client acknowledges with `Ack` or
//!    `AckMany`. At most [`PUSH_WINDOW`] pushes are unacknowledged at a time, and the server
//!    writes replies before pushes, so a client's requests are answered however long its backlog.

mod code;
mod msg;
mod transcript;

pub use code::{EnrolCode, CODE_PREFIX};
pub use msg::*;
pub use transcript::{auth_transcript, enroll_transcript};

/// Protocol version carried in the hello.
pub const PROTOCOL_VERSION: u16 = 3;
/// The first version that knows `Hold`, `ListWithPresence` and `FetchWithPresence`. A server
/// closes a connection on a request it cannot decode, so clients send these only to servers
/// whose hello says this version or later.
pub const PRESENCE_VERSION: u16 = 2;
/// The first version that knows `Status`.
pub const STATUS_VERSION: u16 = 3;
/// Most keys one connection may hold present (a device daemon holds one).
pub const MAX_HOLDS: usize = 16;
/// Largest frame either side accepts after authentication.
pub const MAX_FRAME: usize = 128 * 1024;
/// Largest frame accepted before authentication: enough for an enrolment, far below a flood's
/// appetite.
pub const MAX_PREAUTH_FRAME: usize = 4 * 1024;
/// Most pushes a server leaves unacknowledged on one connection. A client's push queue must hold
/// at least this many, so that reading never waits for the code that consumes pushes.
pub const PUSH_WINDOW: usize = 256;
/// Most sequence numbers one `AckMany` may carry.
pub const MAX_ACK_BATCH: usize = 1024;
/// The TLS server name clients ask for; the certificate is pinned by hash, not by name.
pub const TLS_SERVER_NAME: &str = "np-control";

/// SHA-256 of a certificate's DER, hex: what clients pin.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}
