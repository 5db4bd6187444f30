//! Mux frames: the plaintext of records from the peer, read by [`FrameReader`] and handled by a
//! [`Mux`] of either role, with the application answering as the real drivers do (accept or
//! refuse a flow, consume data, write back) and time moving on.
//!
//! Input layout: one byte of role and options, then records as `len:u16` + bytes. With option
//! bit 0x20 the peer never reads: nothing is transmitted until the mux says it is backlogged (the
//! driver then stops reading), and what waits to be sent must stay bounded whatever the records.
//! With option bit 0x10 the session carries UDP: the application refuses some associations and
//! echoes datagrams on the others, and the UDP send queue stays bounded too.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use np_session::frame::FrameReader;
use np_session::handshake::Role;
use np_session::{Event, Mux, MuxConfig};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let Some((&opts, mut rest)) = data.split_first() else { return };
    let role = if opts & 1 == 0 { Role::Initiator } else { Role::Responder };
    let config = MuxConfig {
        initial_window: 4096,
        max_peer_flows: 8,
        max_control_backlog: 16,
        udp: opts & 0x10 != 0,
        max_udp_assocs: 8,
        max_udp_queued: 8192,
        ..MuxConfig::default()
    };
    let never_reads = opts & 0x20 != 0;
    let mut now = Instant::now();
    let mut mux = Mux::new(role, config, now);
    // A client has flows of its own open already, so OpenOk/Data for them are reachable.
    if role == Role::Initiator {
        for _ in 0..(opts >> 1) % 4 {
            let _ = mux.open("localhost:22");
            if let Ok(a) = mux.udp_open("localhost:53", now) {
                mux.udp_send(a, Bytes::from_static(b"query"), now);
            }
        }
    }
    drain(&mut mux, now, opts);
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let take = len.min(rest.len() - 2);
        let record = &rest[2..2 + take];
        rest = &rest[2 + take..];

        // The reader alone: never panics, never reads past the record.
        let mut reader = FrameReader::new(Bytes::copy_from_slice(record));
        for _ in 0..record.len() + 1 {
            match reader.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }

        let was_closed = mux.is_closed();
        let r = mux.handle_frames(Bytes::copy_from_slice(record), now);
        if was_closed {
            assert!(r.is_err(), "a closed mux accepted frames");
        }
        if r.is_err() {
            assert!(mux.is_closed(), "a frame error must close the session");
        }
        if never_reads {
            answer(&mut mux, opts);
            // The backlog before this record was under 16; one record adds at most an answer
            // per flow (8 of the peer's, 3 of ours), a grant per flow, one Pong and one Ping.
            assert!(mux.control_backlog() <= 16 + 11 + 11 + 2, "backlog {}", mux.control_backlog());
            // Under the cap before the record; it adds at most a refusal per association
            // opened in it (each shorter than its UdpOpen, doubled).
            assert!(mux.udp_queued() <= 8192 + 2 * record.len(), "udp queue {}", mux.udp_queued());
            if mux.is_backlogged() {
                drain(&mut mux, now, opts);
            }
        } else {
            drain(&mut mux, now, opts);
        }
        now += Duration::from_millis(u64::from(opts) * 100);
        mux.handle_timeout(now);
        if !never_reads {
            drain(&mut mux, now, opts);
        }
    }
});

/// The application's side only: answers events, transmits nothing.
fn answer(mux: &mut Mux, opts: u8) {
    while let Some(ev) = mux.poll_event() {
        react(mux, ev, opts);
    }
}

fn react(mux: &mut Mux, ev: Event, opts: u8) {
    match ev {
        Event::FlowOpened { flow, .. } => {
            let _ = if flow % 3 == 0 { mux.refuse(flow, "no") } else { mux.accept(flow) };
        }
        Event::FlowData { flow, bytes } => {
            mux.consumed(flow, bytes.len());
            if opts & 0x40 != 0 {
                let _ = mux.send(flow, &bytes);
            }
            if opts & 0x80 != 0 {
                let _ = mux.finish(flow);
            }
        }
        Event::UdpOpened { assoc, .. } if assoc % 3 == 0 => mux.udp_close(assoc, "no"),
        Event::Datagram { assoc, bytes } => {
            mux.udp_send(assoc, bytes, Instant::now());
        }
        _ => {}
    }
}

fn drain(mux: &mut Mux, now: Instant, opts: u8) {
    for _ in 0..10_000 {
        let mut progress = false;
        while let Some(ev) = mux.poll_event() {
            progress = true;
            react(mux, ev, opts);
        }
        while let Some(out) = mux.poll_transmit(now) {
            progress = true;
            assert!(out.len() <= np_session::MAX_RECORD_PLAINTEXT);
        }
        if !progress {
            return;
        }
    }
    panic!("the mux never stops producing output");
}
