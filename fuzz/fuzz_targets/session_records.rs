//! Session records: AES-256-GCM records as the relay delivers them, opened with a fixed key.
//!
//! Two halves: arbitrary bytes into an [`Opener`] (in reads of a size the input chooses), which
//! must fail or ask for more and never yield plaintext; and the input sealed by a [`Sealer`],
//! then one byte of it changed where the input says, which must never open to other plaintext.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_session::record::{Opener, Sealer, MAX_RECORD_PLAINTEXT};

const KEY: [u8; 32] = [0x42; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1) * 7;

    // 1. Garbage never opens.
    let mut o = Opener::new(&KEY);
    for piece in rest.chunks(chunk) {
        o.push(piece);
        match o.next() {
            Ok(None) => {}
            Ok(Some(p)) => panic!("{} bytes of garbage opened as a record", p.len()),
            Err(_) => {
                assert!(o.next().is_err(), "errors are sticky");
                return;
            }
        }
    }
    let _ = o.finish();

    // 2. Real records, cut at the input's byte, then one byte flipped.
    let Some((&flip, body)) = rest.split_first() else { return };
    let mut s = Sealer::new(&KEY);
    let mut wire = Vec::new();
    let records: Vec<&[u8]> = body.chunks(usize::from(flip).max(1)).collect();
    for r in &records {
        assert!(r.len() <= MAX_RECORD_PLAINTEXT);
        s.seal(r, &mut wire).expect("seal");
    }
    let at = if wire.is_empty() { return } else { (usize::from(split) * 257 + usize::from(flip)) % wire.len() };
    let mut o = Opener::new(&KEY);
    o.push(&wire);
    for r in &records {
        assert_eq!(o.next().ok().flatten().as_deref(), Some(*r));
    }
    assert!(o.finish().is_ok());
    wire[at] ^= 1 << (flip % 8);
    let mut o = Opener::new(&KEY);
    o.push(&wire);
    let mut opened = 0;
    loop {
        match o.next() {
            Ok(Some(p)) => {
                assert_eq!(Some(&&p[..]), records.get(opened), "a flipped byte opened to other plaintext");
                opened += 1;
            }
            Ok(None) => {
                assert!(o.finish().is_err(), "a flipped stream ended cleanly");
                break;
            }
            Err(_) => break,
        }
    }
    assert!(opened < records.len(), "every record opened despite a flipped byte");
});
