//! The relay's pre-pairing frames: the Join a side sends (parsed by the relay before it keeps
//! any state) and the relay's own messages (parsed by `np` and `npd`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_relay_proto::decode_join;
use np_relay_proto::{RelayMsg, MAX_PREAUTH_FRAME};
use np_wire::{decode_msg, encode_msg, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    match decode_join(data) {
        Ok(Some(join)) => {
            // A Join that decodes survives a round trip, so the relay and the side agree on it.
            let again = encode_msg(&join);
            assert_eq!(decode_join(&again).ok().flatten(), Some(join));
        }
        Ok(None) => {}
        Err(_) => {}
    }
    let mut dec = FrameDecoder::new(MAX_PREAUTH_FRAME);
    dec.push(data);
    while let Ok(Some(frame)) = dec.next_frame() {
        let _ = decode_msg::<RelayMsg>(&frame);
    }
});
