//! The client network stack behind `np up`: a TUN interface whose TCP flows are terminated by
//! smoltcp and handed to an [`Opener`] that carries them to a device.
//!
//! [`stack`] is the pure core (packets and `now` in, packets and events out); [`map`] says which
//! device owns a destination.

pub mod map;
mod packet;
pub mod stack;

pub use map::{AddressMap, DeviceKey, FlowTarget, MapError, Prefix, DEFAULT_SUBNET};
pub use stack::{Event, FlowError, FlowId, RefuseKind, Stack, StackConfig, Stats};
