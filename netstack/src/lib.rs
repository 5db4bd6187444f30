//! The client network stack behind `np up`: a TUN interface whose TCP flows are terminated by
//! smoltcp and carried through each device's encrypted session.
//!
//! - [`map`]: which device owns a destination, and what it dials there.
//! - [`stack`]: the pure core (packets and `now` in; packets, events and timers out).
//! - [`tun`]: the interface itself.
//! - [`bridge`]: the stack and each device's session connection as one pure state machine.
//! - [`Netstack`] (in `shell`): the tokio driver: the TUN, the relay connections, session setup.

pub mod bridge;
pub mod map;
mod packet;
mod shell;
pub mod stack;
#[cfg(test)]
mod testapp;
pub mod tun;
mod vnet;

pub use bridge::{Action, Bridge, BridgeConfig, BridgeStats, Established, LinkId, SetupFailed, UdpStatus};
pub use map::{AddressMap, DeviceKey, FlowTarget, MapError, Prefix, DEFAULT_SUBNET};
pub use shell::{BoxFuture, Dialed, Dialer, Netstack, NetstackConfig, NetstackError, Status, StatusHandle};
pub use stack::{Event, FlowError, FlowId, RefuseKind, RxChecksum, Stack, StackConfig, Stats};
