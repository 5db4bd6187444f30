//! The np relay: pairs two authenticated outbound connections of one session and forwards the
//! (end-to-end encrypted) bytes between them without reading them.
//!
//! - [`proto`]: the frames exchanged before pairing and the signed Join transcript.
//! - [`pairing`]: the pure state machine deciding who pairs with whom, and when to give up.
//! - [`Relay`]: the tokio server around it; [`join`] is the side's half for `np` and `npd`.
//!
//! A connection holds no session state until its Join has passed, in order: the pre-auth
//! deadline and frame limit, the operator's allow list, the key directory, the signature over
//! the relay's per-connection nonce, and the session limits.

mod config;
mod control_directory;
mod directory;
mod forward;
mod join;
mod metrics;
pub mod pairing;
pub mod proto;
pub mod record;
mod refusal;
mod server;
#[cfg(target_os = "linux")]
mod splice;

pub use config::RelayConfig;
pub use control_directory::{ControlDirectory, LOOKUP_TIMEOUT};
pub use directory::{KeyDirectory, Lookup, StaticDirectory};
pub use join::{join, join_with_timeout, ExpectedRelay, JoinError, DEFAULT_JOIN_TIMEOUT};
pub use pairing::{Decision, PairKey, Pairing, PairingLimits, Share};
pub use proto::{join_transcript, proof_transcript, Join, RelayMsg, Role, MAX_PREAUTH_FRAME};
pub use record::{RelayInfo, RELAY_RECORD};
pub use refusal::Refusal;
pub use server::{Relay, RelayHandle, RelayStats};
