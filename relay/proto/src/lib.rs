//! The np relay's wire protocol, apart from the relay server so that the sides (`np`, `npd`,
//! `np doctor`) depend on what they say to a relay and not on the relay itself.
//!
//! - [`msg`]: the frames exchanged before pairing and the signed Join and proof transcripts.
//! - [`record`]: the record a relay publishes about itself: where it is reached.
//! - [`join()`]: the side's half of the exchange.
//! - [`probe()`]: an authenticated round trip to a relay, to measure it.

mod join;
pub mod msg;
pub mod probe;
pub mod record;

pub use join::{join, join_with_timeout, ExpectedRelay, JoinError, DEFAULT_JOIN_TIMEOUT};
pub use msg::{decode_join, join_transcript, proof_transcript, short_hex, Join, RelayMsg, Role, MAX_PREAUTH_FRAME};
pub use probe::{probe, ProbeError};
pub use record::{RelayInfo, RELAY_RECORD};
