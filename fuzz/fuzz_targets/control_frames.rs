//! Control-plane frames: the np-wire length-prefixed framing, then postcard messages of both
//! directions, the way np-control (before and after authentication) and its clients read them.
//!
//! The first byte chooses how the stream is split into reads, so the decoder sees frames cut
//! at every place a socket could cut them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_control_proto::{ClientFrame, ServerFrame, ServerHello, MAX_FRAME, MAX_PREAUTH_FRAME};
use np_wire::{decode_msg, encode_msg, FrameDecoder, WireError};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1);
    for max in [MAX_PREAUTH_FRAME, MAX_FRAME] {
        let mut dec = FrameDecoder::new(max);
        'feed: for piece in stream.chunks(chunk) {
            dec.push(piece);
            // The decoder must never hold more than one frame plus its prefix and one read.
            assert!(dec.buffered() <= max + 4 + chunk, "decoder holds {} bytes", dec.buffered());
            loop {
                match dec.next_frame() {
                    Ok(Some(frame)) => {
                        assert!(frame.len() <= max);
                        if let Ok(m) = decode_msg::<ClientFrame>(&frame) {
                            // What decodes re-encodes to the same message.
                            let again = encode_msg(&m);
                            assert_eq!(decode_msg::<ClientFrame>(&again[4..]).ok(), Some(m));
                        }
                        if let Ok(m) = decode_msg::<ServerFrame>(&frame) {
                            let again = encode_msg(&m);
                            assert_eq!(decode_msg::<ServerFrame>(&again[4..]).ok(), Some(m));
                        }
                        let _ = decode_msg::<ServerHello>(&frame);
                    }
                    Ok(None) => break,
                    Err(WireError::TooLarge { len, max: m }) => {
                        assert!(len > m);
                        break 'feed;
                    }
                    Err(e) => panic!("the decoder only fails on size: {e}"),
                }
            }
            let _ = dec.wanted();
        }
    }
});
