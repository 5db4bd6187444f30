//! The device's decision on a session request (`np_tunnel::admission::admit`), on any request
//! a peer could send: it never panics, and whatever it admits is really admissible (targets
//! named and permitted, relay trusted, under the requester's cap, fresh and single use).
#![no_main]

use libfuzzer_sys::fuzz_target;
use np_tunnel::admission::{admit, AdmissionConfig, PolicyVerdict};
use np_tunnel::msg::{SessionRequest, TunnelMsg};
use np_tunnel::replay::ReplayGuard;
use np_tunnel::PermitOpen;

const NOW: u64 = 1_800_000_000_000;

fn name(s: &str) -> np_identity::Name {
    s.parse().expect("name")
}

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else { return };
    let req: SessionRequest = match TunnelMsg::decode(rest) {
        Some(TunnelMsg::SessionRequest(r)) => r,
        _ => match postcard::from_bytes(rest) {
            Ok(r) => r,
            Err(_) => return,
        },
    };
    let from = match knobs & 3 {
        0 => name("@alice"),
        1 => name("@bob"),
        _ => name("@mallory"),
    };
    let cfg = AdmissionConfig {
        device: "pi4".into(),
        identity: name("@alice_device"),
        managers: vec![name("@alice")],
        policy: (knobs & 4 != 0).then(|| name("@policy")),
        permit: PermitOpen::parse_list("localhost:22,*:443").expect("permit"),
        trusted_relays: vec![name("@relay")],
        max_sessions_per_requester: 2,
    };
    let verdict = match (knobs >> 3) & 3 {
        0 => None,
        1 => Some(PolicyVerdict::Permit(PermitOpen::parse_list("localhost:22").expect("p"))),
        2 => Some(PolicyVerdict::Deny("no".into())),
        _ => Some(PolicyVerdict::Unavailable),
    };
    let live = usize::from(knobs >> 5);
    let mut replay = ReplayGuard::new(30_000, 16);
    if let Ok(a) = admit(&cfg, &from, &req, NOW, verdict.as_ref(), &mut replay, live) {
        assert!(!req.targets.is_empty());
        assert!(cfg.trusted_relays.contains(&a.relay) && a.relay == req.relay);
        assert!(live < cfg.max_sessions_per_requester);
        assert!(req.timestamp_ms.abs_diff(NOW) <= 30_000);
        assert!(from == name("@alice") || matches!(verdict, Some(PolicyVerdict::Permit(_))));
        for t in &req.targets {
            assert!(a.permits.check(t).is_ok());
        }
        // Single use: the same request again is refused.
        assert!(admit(&cfg, &from, &req, NOW, verdict.as_ref(), &mut replay, live).is_err());
    }
});
