//! The np relay: pairs two authenticated outbound connections of one session and forwards the
//! (end-to-end encrypted) bytes between them without reading them.
//!
//! - [`pairing`]: the pure state machine deciding who pairs with whom, and when to give up.
//! - [`Relay`]: the tokio server around it.
//!
//! What a side and the relay say to each other (the frames, the Join transcript, the relay's
//! record, the side's half of joining) is the crate `np-relay-proto`, which `np` and `npd` use
//! without this server; it is re-exported here so a test that starts a relay and joins it needs
//! one import.
//!
//! A connection holds no session state until its Join has passed, in order: the pre-auth
//! deadline and frame limit, the operator's allow list, the key directory, the signature over
//! the relay's per-connection nonce, and the session limits.

mod config;
mod control_directory;
mod directory;
mod forward;
mod metrics;
pub mod pairing;
mod refusal;
mod server;
#[cfg(target_os = "linux")]
mod splice;

pub use config::RelayConfig;
pub use control_directory::{ControlDirectory, LOOKUP_TIMEOUT};
pub use directory::{KeyDirectory, Lookup, StaticDirectory};
pub use np_relay_proto::msg as proto;
pub use np_relay_proto::{
    join, join_transcript, join_with_timeout, proof_transcript, record, ExpectedRelay, Join, JoinError, RelayInfo,
    RelayMsg, Role, DEFAULT_JOIN_TIMEOUT, MAX_PREAUTH_FRAME, RELAY_RECORD,
};
pub use pairing::{Decision, PairKey, Pairing, PairingLimits, Share};
pub use refusal::Refusal;
pub use server::{Relay, RelayHandle, RelayStats};
