//! The np session layer: everything between client and device once both are paired at a relay.
//!
//! - [`handshake`]: Noise `KK` (both sides know each other's static X25519 key) producing
//!   per-direction [`SessionKeys`].
//! - [`record`]: AES-256-GCM records with implicit counter nonces, sealed and opened in place.
//! - [`mux`]: many TCP flows in one session with per-flow credit-based flow control and
//!   keepalives, as a pure state machine (bytes and `Instant`s in, frames and events out).
//! - [`connection`]: the three above as one sans-IO session (bytes and time in; sealed records,
//!   events and deadlines out), with each flow's received bytes until the application takes them.
//! - [`resume`]: moving a session to a new transport (records acknowledged and kept until then,
//!   an authenticated exchange, the same ciphertext resent).
//! - [`driver`]: the thin tokio shell that runs the above over one byte stream.
//!
//! The first three modules read no clock and touch no socket, so tests drive whole sessions in
//! memory with a fake clock.

pub mod connection;
pub mod driver;
mod error;
pub mod frame;
pub mod handshake;
pub mod mux;
pub mod record;
pub mod resume;
mod retain;

pub use error::SessionError;
pub use handshake::{in_memory_pair, Initiator, Responder, Role, SessionKeys};

pub use connection::{Chunk, ConnEvent, ConnStats, Connection, Recv, TransportState};
pub use driver::{
    client_session, device_session, DeviceSession, FlowStream, IncomingFlow, OpenError, SessionHandle, UdpAssoc,
    UdpSender,
};
pub use mux::{AssocId, AssocStats, Event, FlowId, Mux, MuxConfig, UdpCounters};
pub use record::{Opener, Sealer, MAX_RECORD_PLAINTEXT};
pub use resume::ResumeConfig;
