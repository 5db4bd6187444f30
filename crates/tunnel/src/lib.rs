//! np sessions end to end, above the control plane, the relay and the session layer:
//!
//! - [`admission`]: the device's decision on a request, as a pure function, and its typed
//!   refusals;
//! - [`relays`]: finding a relay's signed address and joining it, proving who it is;
//! - [`msg`]: what a client, a device and a policy identity say to each other (sealed and signed
//!   by the control-plane client);
//! - [`permit`]: which targets a device dials;
//! - [`replay`]: freshness and single use of requests;
//! - [`client`]: the client's session setup;
//! - [`choose`]: which relay a session goes through;
//! - [`daemon`]: the device daemon's checks and service;
//! - [`policy`]: delegating the decision to a policy identity;
//! - [`routes`]: the LAN routes a device advertises;
//! - [`rejoin`]: both ends rejoining the relay when a session's transport breaks, to resume it.

pub mod admission;
pub mod choose;
pub mod client;
pub mod daemon;
pub mod msg;
pub mod permit;
pub mod policy;
pub mod rejoin;
pub mod relays;
pub mod replay;
pub mod router;
pub mod routes;
pub mod slot;
pub mod udp;

pub use admission::Refusal;
pub use client::{session_id, Connector, SetupError, Transport};
pub use daemon::{trust_key, DaemonConfig, DeviceInfo, DeviceRelays};
pub use permit::PermitOpen;
pub use router::Router;
pub use slot::{SessionSlot, SlotError};
