//! The np control plane: enrols identities, authenticates them by challenge–response, publishes
//! their signed records, and carries end-to-end encrypted notifications between them: pushed at
//! once to a connected recipient, queued durably with a time-to-live for an absent one.
//!
//! It never holds a private key of an identity and never sees a payload's plaintext: envelopes
//! are sealed by the sender to the recipient before they arrive here.

mod admin;
mod conn;
mod hub;
mod lane;
mod metrics;
mod presence;
mod server;
mod state;
pub mod store;
pub mod tls;

pub use admin::{issue_code, relays, revoke};
pub use np_control_proto::AdminRequest;
pub use server::ControlServer;
pub use state::ServerConfig;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
