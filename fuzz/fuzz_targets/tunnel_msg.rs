//! Tunnel messages (decrypted payloads from any identity that can reach this one) and the
//! target strings a flow asks for, checked against permit-open lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_tunnel::msg::TunnelMsg;
use np_tunnel::PermitOpen;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = TunnelMsg::decode(data) {
        assert_eq!(TunnelMsg::decode(&m.encode()), Some(m));
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The target as a flow's Open frame carries it, against lists an operator might write.
    for list in ["localhost:22", "localhost:*,192.168.1.10:80", "*:443", "[::1]:8080,127.0.0.1:5432"] {
        let permit = PermitOpen::parse_list(list).expect("list");
        if let Ok(t) = permit.check(text) {
            // The normalised form is permitted too, and stable.
            let again = permit.check(&t.to_string()).expect("normalised target still permitted");
            assert_eq!(again, t);
        }
    }
    // The input as a permit-open list itself (operator config, but parsed from text).
    if let Ok(p) = PermitOpen::parse_list(text) {
        let _ = p.check("localhost:22");
        let _ = PermitOpen::parse_list(&p.to_string());
    }
});
