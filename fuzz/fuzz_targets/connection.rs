//! The sans-IO session connection: a client connection opens flows and sends what the input
//! says; its records reach a device connection in pieces of sizes the input chooses, with one
//! byte flipped where the input says (or none). Nothing panics; a flipped stream ends the
//! device's session with an error that is not an orderly close, and whatever the device was
//! handed before that is exactly a prefix of what was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_identity::Keys;
use np_session::{ConnEvent, Connection, Initiator, MuxConfig, Recv, Responder, SessionError};
use std::sync::OnceLock;
use std::time::Instant;

fn keys() -> &'static (Keys, Keys) {
    static K: OnceLock<(Keys, Keys)> = OnceLock::new();
    K.get_or_init(|| (Keys::generate().expect("keys"), Keys::generate().expect("keys")))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flip, rest)) = data.split_first() else { return };
    let Some((&piece, ops)) = rest.split_first() else { return };
    let (c, d) = keys();
    let Ok((init, msg1)) = Initiator::start(c.x25519_private(), &d.public().x25519, b"fuzz") else { return };
    let Ok((msg2, dk)) = Responder::respond(d.x25519_private(), &c.public().x25519, b"fuzz", &msg1) else { return };
    let Ok(ck) = init.finish(&msg2) else { return };
    let now = Instant::now();
    let mut client = Connection::new(&ck, MuxConfig::default(), now);
    let mut device = Connection::new(&dk, MuxConfig::default(), now);

    // The client's part: open up to four flows and send the input's bytes on them.
    let mut flows = Vec::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for chunk in ops.chunks(97) {
        let which = usize::from(chunk[0] % 5);
        if which >= flows.len() {
            if let Ok(f) = client.open("localhost:22") {
                flows.push(f);
                sent.push(Vec::new());
            }
            continue;
        }
        let n = client.send(flows[which], &chunk[1..]).unwrap_or(0);
        sent[which].extend_from_slice(&chunk[1..1 + n]);
    }
    let mut wire = Vec::new();
    client.poll_transmit(now, &mut wire, usize::MAX);
    let flipped = flip != 0 && !wire.is_empty();
    if flipped {
        let at = (usize::from(flip) * 131 + ops.len()) % wire.len();
        wire[at] ^= 1 << (flip % 8);
    }

    // The device's part: take the records in pieces, accept flows, read everything.
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); flows.len()];
    let mut buf = [0u8; 1000];
    for p in wire.chunks(usize::from(piece).max(1) * 3) {
        device.handle_input(p, now);
        while let Some(ev) = device.poll_event() {
            if let ConnEvent::FlowOpened { flow, .. } = ev {
                let _ = device.accept(flow);
            }
        }
        for (i, f) in flows.iter().enumerate() {
            while let Ok(Recv::Data(n)) = device.recv(*f, &mut buf) {
                got[i].extend_from_slice(&buf[..n]);
            }
        }
    }
    device.handle_eof();
    for (g, s) in got.iter().zip(&sent) {
        assert!(s.starts_with(g), "the device was handed bytes that were not sent");
    }
    let err = device.error().expect("an end of stream ends the session");
    if flipped {
        assert!(!matches!(err, SessionError::Closed(_)), "a flipped stream ended cleanly: {err}");
    }
});
