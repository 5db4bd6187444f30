//! Noise KK handshake messages: the device answering an arbitrary message 1 (it arrives inside
//! a session request from any identity that can reach the device), and the client finishing
//! with an arbitrary message 2 (it arrives over the relay).
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_session::{Initiator, Responder};

const DEVICE_PRIVATE: [u8; 32] = [0x11; 32];
const CLIENT_PRIVATE: [u8; 32] = [0x22; 32];
// Public halves need not match the private keys for parsing; a mismatch only fails the
// handshake, which is the outcome expected for fuzzed input anyway.
const DEVICE_PUBLIC: [u8; 32] = [0x33; 32];
const CLIENT_PUBLIC: [u8; 32] = [0x44; 32];

fuzz_target!(|data: &[u8]| {
    let r = Responder::respond(&DEVICE_PRIVATE, &CLIENT_PUBLIC, b"np-fuzz", data);
    assert!(r.is_err(), "an arbitrary message 1 was accepted");
    if let Ok((init, _msg1)) = Initiator::start(&CLIENT_PRIVATE, &DEVICE_PUBLIC, b"np-fuzz") {
        assert!(init.finish(data).is_err(), "an arbitrary message 2 was accepted");
    }
});
