//! A suspended session resuming on a new transport, fed whatever the input says as the other
//! end's side of the resume exchange: nothing panics, a session never resumes without a proof
//! under its own keys (so never from these bytes), and it never ends for a refused attempt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_session::{Connection, MuxConfig, ResumeConfig, TransportState};
use std::sync::OnceLock;
use std::time::Instant;

fn keys() -> &'static np_session::SessionKeys {
    static K: OnceLock<np_session::SessionKeys> = OnceLock::new();
    K.get_or_init(|| np_session::in_memory_pair(b"fuzz resume").expect("handshake").0)
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let config = MuxConfig { resume: Some(ResumeConfig::default()), ..MuxConfig::default() };
    let mut conn = Connection::new(keys(), config, now);
    let _ = conn.open("localhost:22");
    conn.handle_eof();
    assert_eq!(conn.transport_state(), TransportState::Suspended);
    conn.resume(now).expect("resume");
    for piece in data.chunks(7) {
        conn.handle_input(piece, now);
        let mut out = Vec::new();
        conn.poll_transmit(now, &mut out, usize::MAX);
    }
    assert_ne!(conn.transport_state(), TransportState::Live, "resumed without a proof");
    assert!(conn.error().is_none(), "a refused attempt ended the session");
});
