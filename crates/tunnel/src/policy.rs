//! Policy: a device can delegate "who may connect, and to what" to a policy identity, which
//! answers over the control plane (sealed, signed by it). The daemon caches answers briefly.
//!
//! The policy service (`np policy serve`) reads rules from a TOML file:
//!
//! ```toml
//! serves = ["@alice_device"]          # device identities this policy answers (optional when
//!                                     # every rule names its devices' identity)
//! [[rule]]
//! identities = ["@bob", "@carol"]     # who
//! devices = ["pi4@alice_device", "*@alice_device"]   # which devices ("*" for any)
//! permit = ["localhost:22"]           # what they may open there (further limited by the device's permit-open)
//! ```

use crate::admission::PolicyVerdict;
use crate::msg::TunnelMsg;
use crate::permit::PermitOpen;
use crate::router::{FromPeer, Router};
use np_control_client::ControlClient;
use np_identity::Name;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a daemon trusts a policy answer.
pub const CACHE_FOR: Duration = Duration::from_secs(30);
/// How long a daemon waits for the policy service.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// One rule of the policy file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub identities: Vec<Name>,
    pub devices: Vec<String>,
    pub permit: Vec<String>,
}

/// The policy file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The device identities this policy answers for. Default: those its rules name
    /// (`pi4@alice_device`, `*@alice_device`). A query from any other identity gets "no" and
    /// nothing else, so nobody learns a rule by asking about a device of its own.
    #[serde(default)]
    pub serves: Vec<Name>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

impl PolicyFile {
    /// Parses the file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut p: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for r in &p.rules {
            PermitOpen::parse_list(&r.permit.join(",")).map_err(|e| format!("in a rule's permit list: {e}"))?;
        }
        if p.serves.is_empty() {
            for d in p.rules.iter().flat_map(|r| &r.devices) {
                if let Some((_, id)) = d.split_once('@') {
                    let id: Name = format!("@{id}").parse().map_err(|e| format!("device {d:?}: {e}"))?;
                    if !p.serves.contains(&id) {
                        p.serves.push(id);
                    }
                }
            }
        }
        if p.serves.is_empty() && p.rules.iter().any(|r| r.devices.iter().any(|d| d == "*")) {
            return Err("a rule for devices = [\"*\"] needs `serves = [\"@DEVICE_IDENTITY\", ...]`: the device identities this policy answers for".into());
        }
        Ok(p)
    }

    /// Whether this policy answers queries from the device identity `id`.
    pub fn serves(&self, id: &Name) -> bool {
        self.serves.contains(id)
    }

    /// The decision for `who` on `device` (`NAME@ID`): the union of matching rules' permits.
    pub fn decide(&self, who: &Name, device: &str) -> (bool, Vec<String>) {
        let id = device.split_once('@').map(|(_, id)| id).unwrap_or("");
        let mut permit = Vec::new();
        let mut any = false;
        for r in &self.rules {
            let dev_ok = r.devices.iter().any(|d| d == "*" || d == device || d.strip_prefix("*@") == Some(id));
            if dev_ok && r.identities.contains(who) {
                any = true;
                permit.extend(r.permit.iter().cloned());
            }
        }
        (any, permit)
    }
}

/// Serves policy queries addressed to this identity until the client is gone.
pub async fn serve(ctl: ControlClient, mut requests: mpsc::Receiver<FromPeer>, policy: PolicyFile) {
    while let Some(q) = requests.recv().await {
        let TunnelMsg::PolicyQuery { query_id, requester, device, targets } = q.msg else { continue };
        // Only a device identity this policy serves may ask, and only about its own devices.
        let owner_ok = policy.serves(&q.from)
            && device.split_once('@').map(|(_, id)| format!("@{id}") == q.from.as_str()).unwrap_or(false);
        let (allow, permit) = if owner_ok { policy.decide(&requester, &device) } else { (false, Vec::new()) };
        let reason = if allow {
            String::new()
        } else {
            format!("the policy of {} does not permit {requester} on {device}", ctl.me())
        };
        tracing::info!(%requester, %device, ?targets, allow, "policy query answered");
        let answer = TunnelMsg::PolicyAnswer { query_id, allow, permit, reason };
        if let Err(e) = ctl.send(&q.from, &answer.encode(), Duration::from_secs(30)).await {
            tracing::warn!(to = %q.from, error = %e, "could not answer a policy query");
        }
    }
}

/// The daemon's side: asks the policy identity and caches answers.
pub struct PolicyClient {
    ctl: ControlClient,
    router: Router,
    policy: Name,
    cache: Mutex<HashMap<Name, (Instant, PermitOpen)>>,
}

impl PolicyClient {
    pub fn new(ctl: ControlClient, router: Router, policy: Name) -> Self {
        PolicyClient { ctl, router, policy, cache: Mutex::new(HashMap::new()) }
    }

    /// What `who` may open on `device`, or why not.
    pub async fn ask(&self, who: &Name, device: &str, targets: &[String]) -> PolicyVerdict {
        if let Some((at, p)) = self.cache.lock().ok().and_then(|c| c.get(who).cloned()) {
            if at.elapsed() < CACHE_FOR {
                return PolicyVerdict::Permit(p);
            }
        }
        let mut query_id = [0u8; 16];
        if np_identity::random_bytes(&mut query_id).is_err() {
            return PolicyVerdict::Unavailable;
        }
        let rx = self.router.expect(query_id);
        let q = TunnelMsg::PolicyQuery {
            query_id,
            requester: who.clone(),
            device: device.to_string(),
            targets: targets.to_vec(),
        };
        let sent = self.ctl.send(&self.policy, &q.encode(), ASK_TIMEOUT).await;
        if let Err(e) = sent {
            self.router.forget(&query_id);
            tracing::warn!(policy = %self.policy, error = %e, "cannot ask the policy service");
            return PolicyVerdict::Unavailable;
        }
        let answer = tokio::time::timeout(ASK_TIMEOUT, rx).await;
        self.router.forget(&query_id);
        let Ok(Ok(a)) = answer else {
            tracing::warn!(policy = %self.policy, timeout_s = ASK_TIMEOUT.as_secs(), "the policy service did not answer");
            return PolicyVerdict::Unavailable;
        };
        if a.from != self.policy {
            tracing::warn!(policy = %self.policy, from = %a.from, "policy answer from another identity");
            return PolicyVerdict::Unavailable;
        }
        match a.msg {
            TunnelMsg::PolicyAnswer { allow: true, permit, .. } => match PermitOpen::parse_list(&permit.join(",")) {
                Ok(p) => {
                    if let Ok(mut c) = self.cache.lock() {
                        c.insert(who.clone(), (Instant::now(), p.clone()));
                    }
                    PolicyVerdict::Permit(p)
                }
                Err(e) => {
                    tracing::warn!(policy = %self.policy, error = %e, "the policy answer does not parse");
                    PolicyVerdict::Unavailable
                }
            },
            TunnelMsg::PolicyAnswer { reason, .. } => PolicyVerdict::Deny(reason),
            _ => PolicyVerdict::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_bad_files() {
        let p = PolicyFile::parse(
            r#"
            [[rule]]
            identities = ["@bob"]
            devices = ["*@alice_device"]
            permit = ["localhost:22"]
            [[rule]]
            identities = ["@bob", "@carol"]
            devices = ["pi4@alice_device"]
            permit = ["localhost:80"]
            "#,
        )
        .expect("parse");
        let bob: Name = "@bob".parse().expect("n");
        let carol: Name = "@carol".parse().expect("n");
        assert_eq!(p.decide(&bob, "pi4@alice_device"), (true, vec!["localhost:22".into(), "localhost:80".into()]));
        assert_eq!(p.decide(&carol, "pi5@alice_device"), (false, vec![]));
        assert_eq!(p.decide(&bob, "pi4@other"), (false, vec![]));
        let err = PolicyFile::parse("[[rule]]\nidentities = [\"@bob\"]\ndevice = []\n").expect_err("bad");
        assert!(err.contains("line"), "{err}");
        assert!(p.serves(&"@alice_device".parse().expect("n")));
        assert!(!p.serves(&"@other".parse().expect("n")));
    }

    #[test]
    fn a_wildcard_rule_serves_only_the_identities_listed() {
        let star = "[[rule]]\nidentities = [\"@bob\"]\ndevices = [\"*\"]\npermit = [\"localhost:22\"]\n";
        let err = PolicyFile::parse(star).expect_err("needs serves");
        assert!(err.contains("serves"), "{err}");
        let p = PolicyFile::parse(&format!("serves = [\"@alice_device\"]\n{star}")).expect("parse");
        assert!(p.serves(&"@alice_device".parse().expect("n")));
        // @mallory asking about a device of its own learns nothing of the "*" rule.
        assert!(!p.serves(&"@mallory".parse().expect("n")));
    }
}
