//! The client network stack behind `np up`: a TUN interface whose TCP flows are terminated by
//! smoltcp and handed to an [`Opener`] that carries them to a device.
//!
//! - [`map`]: which device owns a destination, and what it dials there.
//! - [`stack`]: the pure core (packets and `now` in; packets, events and timers out).
//! - [`tun`]: the interface itself.
//! - [`Netstack`] (in `shell`): the tokio driver tying them to an [`Opener`].

pub mod map;
mod packet;
mod shell;
pub mod stack;
pub mod tun;

pub use map::{AddressMap, DeviceKey, FlowTarget, MapError, Prefix, DEFAULT_SUBNET};
pub use shell::{BoxFuture, Netstack, NetstackConfig, NetstackError, OpenRefused, Opener, Status, StatusHandle};
pub use stack::{Event, FlowError, FlowId, RefuseKind, Stack, StackConfig, Stats};
