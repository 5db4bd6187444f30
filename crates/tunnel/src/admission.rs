//! The device's decision on a session request, as one pure function: who may connect, is the
//! request fresh and not replayed, are its targets permitted, is its relay trusted, and has the
//! requester room for another session. No IO, no clock: the daemon gathers what the decision
//! needs (the policy's verdict, the time, its live sessions) and acts on the answer.
//!
//! A [`Refusal`] is typed and travels on the wire to the requester, who prints its `Display`.

use crate::msg::SessionRequest;
use crate::permit::{PermitOpen, Proto, Target};
use crate::replay::{ReplayGuard, Stale};
use np_identity::Name;
use serde::{Deserialize, Serialize};

/// Most targets one request may name.
pub const MAX_TARGETS: usize = 64;
/// Longest text taken from a policy answer into a refusal.
const MAX_REASON: usize = 300;

/// Why a device refuses a session (or, for [`Refusal::CannotReachRelay`], could not serve it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The requester is neither a manager nor permitted by the policy. Also the answer, word for
    /// word, to an unpermitted requester naming a device that does not exist, so that nobody
    /// learns which devices exist without being permitted.
    #[error("{who} is not permitted to connect to {device}")]
    NotPermitted { who: Name, device: String },
    /// No device of that name runs under the identity (told only to permitted requesters).
    #[error("no device named {device} under {identity}")]
    UnknownDevice { device: String, identity: Name },
    /// The policy identity said no, with its reason.
    #[error("{reason}")]
    PolicyDenied { reason: String },
    /// The policy identity could not be asked, or did not answer.
    #[error("the device could not get an answer from its policy service {policy}; try again shortly")]
    PolicyUnavailable { policy: Name },
    /// The request's timestamp is too far from the device's clock.
    #[error(
        "request timestamp is {skew_ms} ms away from the device's clock (allowed ±{window_ms} ms): check both clocks"
    )]
    Stale { skew_ms: i64, window_ms: u64 },
    /// The request id was used before.
    #[error("replayed request (this request id was already used)")]
    Replayed,
    /// The device is taking too many requests to remember another one.
    #[error("the device is busy (too many requests); try again shortly")]
    Busy,
    /// The request names no target.
    #[error("the request names no target: say what to reach (e.g. localhost:22)")]
    NoTargets,
    /// The request names more targets than a device checks.
    #[error("the request names more than {max} targets")]
    TooManyTargets { max: usize },
    /// A target is not `HOST:PORT`.
    #[error("{target:?} is not HOST:PORT")]
    BadTarget { target: String },
    /// A target is outside the device's permit-open list.
    #[error("{target} is not in the device's permit-open list ({permit_open})")]
    TargetNotPermitted { target: String, permit_open: String },
    /// A target is permitted by the device, but not for this requester by the policy.
    #[error("{target} is not permitted for you by the policy")]
    TargetNotPermittedByPolicy { target: String },
    /// The request names a relay this device does not trust.
    #[error("the device does not trust relay {relay}: use a relay it trusts (its owner lists them with `npd --relay`, or the operator with `np-control relay add`)")]
    RelayNotTrusted { relay: Name },
    /// The device could not reach and authenticate the relay. One text whatever happened there:
    /// nothing that answered at the relay's address is ever shown.
    #[error("the device cannot reach relay {relay}")]
    CannotReachRelay { relay: Name },
    /// The requester holds as many sessions with this device as it may.
    #[error("you hold {limit} sessions with this device, the most it allows per requester; close one first")]
    TooManySessions { limit: u32 },
    /// The handshake message did not verify.
    #[error("handshake failed")]
    Handshake,
    /// Something failed inside the device.
    #[error("internal error on the device")]
    Internal,
}

/// What the policy identity answered about this requester (the daemon asks it, then decides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// Permitted, to at most these targets (further limited by the device's permit-open).
    Permit(PermitOpen),
    /// Not permitted, with the policy's reason.
    Deny(String),
    /// No answer (unreachable, timed out, malformed).
    Unavailable,
}

/// The device's settings the decision depends on.
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// This daemon's device name.
    pub device: String,
    /// The device identity.
    pub identity: Name,
    /// Identities always permitted.
    pub managers: Vec<Name>,
    /// The policy identity asked about everyone else, if any.
    pub policy: Option<Name>,
    /// What the device dials.
    pub permit: PermitOpen,
    /// The relays this device joins sessions at.
    pub trusted_relays: Vec<Name>,
    /// Sessions one requester may hold at once.
    pub max_sessions_per_requester: usize,
}

/// The device's permit-open, narrowed further by the policy's answer when there is one.
#[derive(Clone, Debug)]
pub struct Permits {
    pub device: PermitOpen,
    pub policy: Option<PermitOpen>,
}

impl Permits {
    /// The normalised target if both lists permit it (for a TCP flow).
    pub fn check(&self, target: &str) -> Result<Target, Refusal> {
        self.check_proto(Proto::Tcp, target)
    }

    /// [`Permits::check`] for `proto` (a UDP association needs a `udp/` pattern in both).
    pub fn check_proto(&self, proto: Proto, target: &str) -> Result<Target, Refusal> {
        let t: Target = target.parse().map_err(|_| Refusal::BadTarget { target: clip(target) })?;
        let shown = || if proto == Proto::Udp { format!("udp/{t}") } else { t.to_string() };
        if !self.device.permits(proto, &t) {
            return Err(Refusal::TargetNotPermitted { target: shown(), permit_open: self.device.to_string() });
        }
        if let Some(p) = &self.policy {
            if !p.permits(proto, &t) {
                return Err(Refusal::TargetNotPermittedByPolicy { target: shown() });
            }
        }
        Ok(t)
    }
}

/// An admitted request: what its flows may reach, and the relay to join.
#[derive(Clone, Debug)]
pub struct Admission {
    pub permits: Permits,
    pub relay: Name,
}

/// Whether the decision for `from` needs the policy identity's verdict first.
pub fn needs_policy(cfg: &AdmissionConfig, from: &Name) -> bool {
    !cfg.managers.contains(from) && cfg.policy.is_some()
}

/// The refusal for a request naming another device of this identity that does not exist: the
/// same words as for an existing device unless the requester is a manager, so that nobody
/// learns which device names exist without being permitted.
pub fn unknown_device(cfg: &AdmissionConfig, from: &Name, device: &str) -> Refusal {
    if cfg.managers.contains(from) {
        Refusal::UnknownDevice { device: clip(device), identity: cfg.identity.clone() }
    } else {
        Refusal::NotPermitted { who: from.clone(), device: format!("{}@{}", clip(device), cfg.identity.bare()) }
    }
}

/// Decides on `req` from `from` at `now_ms`. `verdict` is the policy's answer when
/// [`needs_policy`] said to ask; `live` is how many sessions `from` holds now. Records the request
/// id in `replay` only once the requester is known to be permitted, so unpermitted identities
/// cannot fill it.
///
/// Order: an empty request first (it costs nothing and reveals nothing), then who, then
/// freshness, then targets, relay and room. Everything is checked before the device makes any
/// connection; the identity comes before the targets so that an unpermitted identity learns
/// nothing of the permit-open list.
pub fn admit(
    cfg: &AdmissionConfig,
    from: &Name,
    req: &SessionRequest,
    now_ms: u64,
    verdict: Option<&PolicyVerdict>,
    replay: &mut ReplayGuard,
    live: usize,
) -> Result<Admission, Refusal> {
    if req.targets.is_empty() {
        return Err(Refusal::NoTargets);
    }
    let device = format!("{}@{}", cfg.device, cfg.identity.bare());
    let policy = if cfg.managers.contains(from) {
        None
    } else {
        match (&cfg.policy, verdict) {
            (Some(_), Some(PolicyVerdict::Permit(p))) => Some(p.clone()),
            (Some(_), Some(PolicyVerdict::Deny(reason))) => {
                return Err(Refusal::PolicyDenied { reason: clip(reason) });
            }
            (Some(policy), Some(PolicyVerdict::Unavailable)) => {
                return Err(Refusal::PolicyUnavailable { policy: policy.clone() });
            }
            _ => return Err(Refusal::NotPermitted { who: from.clone(), device }),
        }
    };
    replay.check(req.request_id, req.timestamp_ms, now_ms).map_err(|e| match e {
        Stale::Skew(skew_ms, window_ms) => Refusal::Stale { skew_ms, window_ms },
        Stale::Replayed => Refusal::Replayed,
        Stale::Full => Refusal::Busy,
    })?;
    if req.targets.len() > MAX_TARGETS {
        return Err(Refusal::TooManyTargets { max: MAX_TARGETS });
    }
    let permits = Permits { device: cfg.permit.clone(), policy };
    for t in &req.targets {
        // `udp/HOST:PORT` names a UDP association (`np forward -U`); anything else a TCP flow.
        match t.strip_prefix("udp/") {
            Some(u) => permits.check_proto(Proto::Udp, u)?,
            None => permits.check(t)?,
        };
    }
    if !cfg.trusted_relays.contains(&req.relay) {
        return Err(Refusal::RelayNotTrusted { relay: req.relay.clone() });
    }
    if live >= cfg.max_sessions_per_requester {
        return Err(Refusal::TooManySessions {
            limit: u32::try_from(cfg.max_sessions_per_requester).unwrap_or(u32::MAX),
        });
    }
    Ok(Admission { permits, relay: req.relay.clone() })
}

/// A peer's string, cut to a length fit for a message.
fn clip(s: &str) -> String {
    if s.len() <= MAX_REASON {
        return s.to_string();
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn n(s: &str) -> Name {
        s.parse().expect("name")
    }

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            device: "pi4".into(),
            identity: n("@alice_device"),
            managers: vec![n("@alice")],
            policy: None,
            permit: PermitOpen::parse_list("localhost:22,db.lan:5432").expect("permit"),
            trusted_relays: vec![n("@relay")],
            max_sessions_per_requester: 2,
        }
    }

    fn req(id: u8) -> SessionRequest {
        SessionRequest {
            request_id: [id; 16],
            timestamp_ms: NOW,
            device: "pi4".into(),
            relay: n("@relay"),
            session: [9; 16],
            handshake: vec![1, 2, 3],
            targets: vec!["localhost:22".into()],
            features: Default::default(),
        }
    }

    fn guard() -> ReplayGuard {
        ReplayGuard::new(30_000, 100)
    }

    fn run(
        c: &AdmissionConfig,
        from: &str,
        r: &SessionRequest,
        v: Option<&PolicyVerdict>,
    ) -> Result<Admission, Refusal> {
        admit(c, &n(from), r, NOW, v, &mut guard(), 0)
    }

    #[test]
    fn a_manager_with_a_fresh_request_for_a_permitted_target_at_a_trusted_relay_is_admitted() {
        let a = run(&cfg(), "@alice", &req(1), None).expect("admitted");
        assert_eq!(a.relay, n("@relay"));
        assert!(a.permits.check("localhost:22").is_ok());
        assert!(matches!(a.permits.check("127.0.0.1:22"), Err(Refusal::TargetNotPermitted { .. })));
    }

    #[test]
    fn udp_targets_are_checked_against_udp_patterns_only() {
        let mut c = cfg();
        c.permit = PermitOpen::parse_list("localhost:22,udp/localhost:53").expect("list");
        let mut r = req(1);
        r.targets = vec!["udp/localhost:53".into()];
        let a = run(&c, "@alice", &r, None).expect("admitted");
        assert!(a.permits.check_proto(Proto::Udp, "localhost:53").is_ok());
        assert!(a.permits.check("localhost:53").is_err(), "a UDP pattern permits no TCP");
        r.targets = vec!["udp/localhost:22".into()];
        assert!(
            matches!(run(&c, "@alice", &r, None), Err(Refusal::TargetNotPermitted { target, .. }) if target == "udp/localhost:22")
        );
        // A policy narrows UDP as it does TCP: its TCP pattern permits no association.
        c.policy = Some(n("@policy"));
        let policy = PolicyVerdict::Permit(PermitOpen::parse_list("localhost:53").expect("list"));
        r.targets = vec!["udp/localhost:53".into()];
        assert!(matches!(run(&c, "@bob", &r, Some(&policy)), Err(Refusal::TargetNotPermittedByPolicy { .. })));
    }

    #[test]
    fn no_targets_is_refused_first() {
        let mut r = req(1);
        r.targets.clear();
        assert_eq!(run(&cfg(), "@alice", &r, None).expect_err("refused"), Refusal::NoTargets);
        // Even for a stranger, and before the replay guard sees it.
        let mut g = guard();
        assert_eq!(admit(&cfg(), &n("@mallory"), &r, NOW, None, &mut g, 0).expect_err("refused"), Refusal::NoTargets);
        r.targets.push("localhost:22".into());
        assert!(admit(&cfg(), &n("@alice"), &r, NOW, None, &mut g, 0).is_ok(), "id was not consumed");
    }

    #[test]
    fn strangers_learn_nothing_about_targets_or_relays() {
        let mut r = req(1);
        r.targets = vec!["10.0.0.1:80".into()];
        r.relay = n("@evil");
        let e = run(&cfg(), "@mallory", &r, None).expect_err("refused");
        assert_eq!(e, Refusal::NotPermitted { who: n("@mallory"), device: "pi4@alice_device".into() });
        assert_eq!(e.to_string(), "@mallory is not permitted to connect to pi4@alice_device");
    }

    #[test]
    fn an_unknown_device_reads_like_an_unpermitted_one_to_strangers() {
        let c = cfg();
        let real = run(&c, "@mallory", &req(1), None).expect_err("refused");
        let mut r = req(1);
        r.device = "pi9".into();
        let ghost = unknown_device(&c, &n("@mallory"), &r.device);
        assert_eq!(real.to_string().replace("pi4", "pi9"), ghost.to_string());
        assert_eq!(
            unknown_device(&c, &n("@alice"), "pi9"),
            Refusal::UnknownDevice { device: "pi9".into(), identity: n("@alice_device") }
        );
    }

    #[test]
    fn freshness_and_replay() {
        let c = cfg();
        let mut g = guard();
        let mut r = req(1);
        r.timestamp_ms = NOW - 31_000;
        assert!(matches!(admit(&c, &n("@alice"), &r, NOW, None, &mut g, 0), Err(Refusal::Stale { .. })));
        let r = req(2);
        assert!(admit(&c, &n("@alice"), &r, NOW, None, &mut g, 0).is_ok());
        assert_eq!(admit(&c, &n("@alice"), &r, NOW, None, &mut g, 0).expect_err("refused"), Refusal::Replayed);
        let mut small = ReplayGuard::new(30_000, 1);
        assert!(admit(&c, &n("@alice"), &req(3), NOW, None, &mut small, 0).is_ok());
        assert_eq!(admit(&c, &n("@alice"), &req(4), NOW, None, &mut small, 0).expect_err("refused"), Refusal::Busy);
    }

    #[test]
    fn targets_are_checked_against_permit_open_spelling_and_count() {
        let c = cfg();
        let mut r = req(1);
        r.targets = vec!["localhost:22".into(), "0.0.0.0:22".into()];
        assert!(matches!(run(&c, "@alice", &r, None), Err(Refusal::TargetNotPermitted { .. })));
        r.targets = vec!["no-port".into()];
        assert!(matches!(run(&c, "@alice", &r, None), Err(Refusal::BadTarget { .. })));
        r.targets = vec!["localhost:22".into(); MAX_TARGETS + 1];
        assert_eq!(run(&c, "@alice", &r, None).expect_err("refused"), Refusal::TooManyTargets { max: MAX_TARGETS });
        r.targets = vec!["DB.lan.:5432".into()];
        assert!(run(&c, "@alice", &r, None).is_ok());
    }

    #[test]
    fn only_trusted_relays() {
        let mut r = req(1);
        r.relay = n("@attacker_relay");
        assert_eq!(
            run(&cfg(), "@alice", &r, None).expect_err("refused"),
            Refusal::RelayNotTrusted { relay: n("@attacker_relay") }
        );
        let mut c = cfg();
        c.trusted_relays.clear();
        assert_eq!(
            run(&c, "@alice", &req(1), None).expect_err("refused"),
            Refusal::RelayNotTrusted { relay: n("@relay") }
        );
    }

    #[test]
    fn sessions_per_requester_are_capped() {
        let c = cfg();
        let mut g = guard();
        assert!(admit(&c, &n("@alice"), &req(1), NOW, None, &mut g, 1).is_ok());
        assert_eq!(
            admit(&c, &n("@alice"), &req(2), NOW, None, &mut g, 2).expect_err("refused"),
            Refusal::TooManySessions { limit: 2 }
        );
    }

    #[test]
    fn the_policy_decides_for_non_managers_and_narrows_targets() {
        let mut c = cfg();
        c.policy = Some(n("@policy"));
        assert!(needs_policy(&c, &n("@bob")));
        assert!(!needs_policy(&c, &n("@alice")));
        let permit = PolicyVerdict::Permit(PermitOpen::parse_list("localhost:22").expect("p"));
        assert!(run(&c, "@bob", &req(1), Some(&permit)).is_ok());
        let mut r = req(2);
        r.targets = vec!["db.lan:5432".into()];
        assert_eq!(
            run(&c, "@bob", &r, Some(&permit)).expect_err("refused"),
            Refusal::TargetNotPermittedByPolicy { target: "db.lan:5432".into() }
        );
        let deny = PolicyVerdict::Deny("x".repeat(10_000));
        match run(&c, "@bob", &req(3), Some(&deny)).expect_err("refused") {
            Refusal::PolicyDenied { reason } => assert!(reason.len() < 400),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            run(&c, "@bob", &req(4), Some(&PolicyVerdict::Unavailable)).expect_err("refused"),
            Refusal::PolicyUnavailable { policy: n("@policy") }
        );
        // Asked nothing: not permitted (never admitted by default).
        assert!(matches!(run(&c, "@bob", &req(5), None), Err(Refusal::NotPermitted { .. })));
    }

    #[test]
    fn refusals_round_trip_on_the_wire() {
        let all = [
            Refusal::NotPermitted { who: n("@a"), device: "d@b".into() },
            Refusal::CannotReachRelay { relay: n("@relay") },
            Refusal::Stale { skew_ms: -5, window_ms: 30_000 },
            Refusal::TooManySessions { limit: 16 },
        ];
        for r in all {
            let b = postcard::to_stdvec(&r).expect("encode");
            assert_eq!(postcard::from_bytes::<Refusal>(&b).expect("decode"), r);
        }
    }
}
