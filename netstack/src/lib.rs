//! The client network stack behind `np up`: a TUN interface whose TCP flows are terminated by
//! smoltcp and handed to an [`Opener`] that carries them to a device.

pub mod map;

pub use map::{AddressMap, DeviceKey, FlowTarget, MapError, Prefix, DEFAULT_SUBNET};
