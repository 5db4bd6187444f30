//! What an operator can set.

use np_identity::{Keys, Name};
use std::sync::Arc;
use std::time::Duration;

/// Limits and identity of a relay. Every field is public so a binary can fill it from flags.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The relay's own name, sent in every Challenge and signed into every Join.
    pub name: Name,
    /// Identities allowed to use the relay; `None` (or an empty list) means any identity the key
    /// directory knows.
    pub allow: Option<Vec<Name>>,
    /// Connections that have not finished authenticating, at most; beyond it a new connection
    /// gets a Refused and is closed at once.
    pub max_preauth: usize,
    /// Time from accept to a verified Join.
    pub auth_deadline: Duration,
    /// Time the first side of a session waits for the second.
    pub pairing_deadline: Duration,
    /// A paired session with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Sessions (waiting or paired) one identity may take part in at once.
    pub max_sessions_per_identity: usize,
    /// Sessions (waiting or paired) on the relay at once.
    pub max_sessions: usize,
    /// How long a session whose first side timed out is remembered, so a late second side gets
    /// "pairing deadline passed" instead of waiting alone for a peer that gave up.
    pub expired_memory: Duration,
    /// Bytes buffered in the relay per direction of a paired session (the user-space buffer, or
    /// the pipe size with `zero_copy`). 256 KiB per read keeps system calls per GiB low; the
    /// memory it costs is paid only by paired sessions, and only for pages data went through.
    pub forward_buffer: usize,
    /// Forward with `splice(2)` through a pipe (Linux) instead of copying through user space.
    ///
    /// On by default in `np-relay` (`--forward splice`): on loopback alone the copy loop moved
    /// more (2.5–3.0 GiB/s against 1.9–2.1 GiB/s, `tests/throughput.rs`), but on the whole path
    /// between hosts, where the relay shares two cores with both edges, splice took 0.41–0.46
    /// CPU s/GB against 0.50–0.52 and `np up` went from 1.52x to 1.95x the reverse SSH tunnel
    /// (`scripts/bench.sh`, two rounds each). Off in this struct's default, which tests use.
    pub zero_copy: bool,
    /// The relay identity's keys: every `Waiting` carries a signature with them, so a side can
    /// check it reached the relay it trusts. `None` only in tests (sides that expect a relay
    /// identity then refuse it).
    pub keys: Option<Arc<Keys>>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            name: default_name(),
            allow: None,
            max_preauth: 1024,
            auth_deadline: Duration::from_secs(5),
            pairing_deadline: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_sessions_per_identity: 64,
            max_sessions: 4096,
            expired_memory: Duration::from_secs(60),
            forward_buffer: 256 * 1024,
            zero_copy: false,
            keys: None,
        }
    }
}

fn default_name() -> Name {
    match "@relay".parse() {
        Ok(n) => n,
        Err(_) => unreachable!("\"@relay\" is a valid name"),
    }
}

impl RelayConfig {
    /// Whether `identity` may use this relay (before looking up its keys).
    pub fn allows(&self, identity: &Name) -> bool {
        match &self.allow {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list.contains(identity),
        }
    }
}
