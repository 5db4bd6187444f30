//! `np relays`: the relays the control plane's operator lists, whether each is up, its region,
//! the round trip to it from here, and which of your devices trust it.
//!
//! Everything shown about a relay comes from the record it signed itself (checked against its
//! pinned key; a record that does not verify is skipped, never dialled) and from a probe at the
//! addresses in it that the relay must answer with a proof of its key
//! ([`np_relay_proto::probe()`]). Only relays on the operator's list are dialled: a device's
//! record cannot make `np relays` connect anywhere.

use crate::devices::{now_ms, DeviceState};
use anyhow::Context;
use np_control_client::{ControlClient, Presence, RecordState};
use np_identity::home::Home;
use np_identity::Name;
use np_relay_proto::record::STALE_AFTER;
use np_relay_proto::{RelayInfo, RELAY_RECORD};
use np_tunnel::DeviceRelays;
use std::time::Duration;

/// Up unless the control plane saw the relay's connection close, and its signed record is
/// recent (it republishes every [`np_relay_proto::record::REFRESH`]; a relay whose host died
/// without closing its connection stops doing so).
pub fn is_up(presence: Presence, age_ms: u64) -> bool {
    !matches!(presence, Presence::Disconnected { .. }) && age_ms <= STALE_AFTER.as_millis() as u64
}

/// What `np relays` learnt about one relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayRow {
    pub name: Name,
    pub status: RelayStatus,
    /// Devices that trust it (`NAME@ID`).
    pub trusted_by: Vec<String>,
}

/// A relay's record and probe, or why it was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayStatus {
    /// Its record verified.
    Listed {
        info: RelayInfo,
        up: bool,
        /// The address that answered and the time to its proof, or why none did.
        probe: Result<(String, Duration), String>,
    },
    /// No usable record (a bad signature, none published, garbage): not trusted, not dialled.
    Skipped(String),
}

/// A device (`NAME@ID`) and the relays it trusts (`None`: the operator's list).
pub type DeviceTrust = (String, Option<Vec<Name>>);

/// Which of `devices` trust `relay`: those whose own list names it, and those that use the
/// operator's list (`relay` is on it: `np relays` shows only those).
pub fn trusted_by(relay: &Name, devices: &[DeviceTrust]) -> Vec<String> {
    devices
        .iter()
        .filter(|(_, relays)| relays.as_ref().is_none_or(|list| list.contains(relay)))
        .map(|(d, _)| d.clone())
        .collect()
}

/// The trust lists of `devices`, from their `trust/NAME` records; the second list holds the
/// devices that publish none (an npd from before `np relays`).
pub fn device_trust(devices: &[DeviceState], trust: &[np_control_client::Record]) -> (Vec<DeviceTrust>, Vec<String>) {
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for d in devices {
        let label = format!("{}@{}", d.info.device, d.identity.bare());
        let found = trust.iter().find_map(|r| {
            let t = postcard::from_bytes::<DeviceRelays>(&r.value).ok()?;
            (r.owner == d.identity && t.device == d.info.device).then_some(t.relays)
        });
        match found {
            Some(relays) => known.push((label, relays)),
            None => unknown.push(label),
        }
    }
    (known, unknown)
}

/// Fetches and probes one relay, within `timeout` for the probe.
async fn examine(ctl: ControlClient, relay: Name, timeout: Duration) -> RelayStatus {
    // The record's signature is checked against the relay's pinned key by the client.
    let state: RecordState = match ctl.fetch_with_presence(&relay, RELAY_RECORD).await {
        Ok(s) => s,
        Err(e) => return RelayStatus::Skipped(e.to_string()),
    };
    let info = match RelayInfo::decode(&state.record.value) {
        Ok(i) => i,
        Err(e) => return RelayStatus::Skipped(e.to_string()),
    };
    let up = is_up(state.presence, now_ms().saturating_sub(state.record.updated_ms));
    let probe = np_tunnel::choose::probe_addresses(&ctl, &relay, &info, timeout).await;
    RelayStatus::Listed { probe, info, up }
}

/// Runs `np relays`.
pub async fn run(home: &Home, me: Option<&Name>, timeout: Duration) -> anyhow::Result<()> {
    let (ctl, _incoming) = crate::connect_control(home, me).await?;
    let operator = ctl.relays().await.context("asking the control plane for its relays")?;
    if operator.is_empty() {
        println!(
            "the control plane lists no relays (its operator adds them with `np-control relay add @NAME`); devices started with `npd --relay @NAME` use their own"
        );
        return Ok(());
    }
    let devices = crate::devices::fetch(&ctl).await?;
    let trust = ctl.list("trust/").await.context("listing which relays your devices trust")?;
    let (known, unknown) = device_trust(&devices, &trust);
    // Every relay at once, so the whole list takes one deadline, not one per relay.
    let mut probes = tokio::task::JoinSet::new();
    for (i, relay) in operator.iter().enumerate() {
        let (ctl, relay) = (ctl.clone(), relay.clone());
        probes.spawn(async move { (i, examine(ctl, relay, timeout).await) });
    }
    let mut statuses: Vec<Option<RelayStatus>> = vec![None; operator.len()];
    while let Some(r) = probes.join_next().await {
        if let Ok((i, status)) = r {
            statuses[i] = Some(status);
        }
    }
    let rows: Vec<RelayRow> = operator
        .iter()
        .zip(statuses)
        .map(|(name, status)| RelayRow {
            name: name.clone(),
            status: status.unwrap_or_else(|| RelayStatus::Skipped("its check failed".into())),
            trusted_by: trusted_by(name, &known),
        })
        .collect();
    print!("{}", table(&rows, devices.len(), &unknown));
    Ok(())
}

/// The table `np relays` prints, with a line per problem below it.
pub fn table(rows: &[RelayRow], devices: usize, unknown: &[String]) -> String {
    let mut out =
        format!("{:<24} {:<7} {:<10} {:<12} {:<24} ADDRESS\n", "RELAY", "STATE", "REGION", "RTT", "TRUSTED BY");
    let mut notes = Vec::new();
    for r in rows {
        let trusted = if devices == 0 {
            "-".to_string()
        } else if r.trusted_by.is_empty() {
            "none".to_string()
        } else {
            r.trusted_by.join(",")
        };
        match &r.status {
            RelayStatus::Listed { info, up, probe } => {
                let (rtt, address) = match probe {
                    Ok((a, rtt)) => (format!("{:.1} ms", rtt.as_secs_f64() * 1e3), a.clone()),
                    Err(e) => {
                        notes.push(format!("{}: unreachable: {e}", r.name));
                        ("unreachable".to_string(), info.addresses.join(","))
                    }
                };
                out += &format!(
                    "{:<24} {:<7} {:<10} {:<12} {:<24} {}\n",
                    r.name.as_str(),
                    if *up { "up" } else { "gone" },
                    info.region.as_deref().unwrap_or("-"),
                    rtt,
                    trusted,
                    address
                );
            }
            RelayStatus::Skipped(why) => {
                out += &format!("{:<24} {:<7} {:<10} {:<12} {:<24} -\n", r.name.as_str(), "skipped", "-", "-", trusted);
                notes.push(format!("{}: skipped, not trusted and not dialled: {why}", r.name));
            }
        }
    }
    for d in unknown {
        notes.push(format!("{d} does not say which relays it trusts (its npd is older than `np relays`)"));
    }
    for n in notes {
        out += &format!("{n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        s.parse().expect("name")
    }

    #[test]
    fn up_needs_an_open_connection_and_a_recent_record() {
        let stale = STALE_AFTER.as_millis() as u64 + 1;
        assert!(is_up(Presence::Connected { since_ms: 0 }, 1_000));
        assert!(is_up(Presence::Unknown, 1_000), "no presence known: the record's age decides");
        assert!(!is_up(Presence::Disconnected { at_ms: 5 }, 1_000), "its connection closed");
        assert!(!is_up(Presence::Connected { since_ms: 0 }, stale), "half-open: its refreshes stopped");
    }

    #[test]
    fn devices_trust_their_own_list_or_the_operators() {
        let devices = vec![
            ("pi4@a".to_string(), None),
            ("nas@a".to_string(), Some(vec![n("@relay2")])),
            ("tv@a".to_string(), Some(vec![])),
        ];
        assert_eq!(trusted_by(&n("@relay"), &devices), vec!["pi4@a"]);
        assert_eq!(trusted_by(&n("@relay2"), &devices), vec!["pi4@a", "nas@a"]);
    }

    #[test]
    fn the_table_says_up_gone_unreachable_and_skipped() {
        let info = |region: Option<&str>| RelayInfo {
            addresses: vec!["198.18.0.1:7444".into()],
            region: region.map(Into::into),
        };
        let rows = vec![
            RelayRow {
                name: n("@relay"),
                status: RelayStatus::Listed {
                    info: info(Some("eu")),
                    up: true,
                    probe: Ok(("198.18.0.1:7444".into(), Duration::from_micros(1500))),
                },
                trusted_by: vec!["pi4@alice_device".into()],
            },
            RelayRow {
                name: n("@relay2"),
                status: RelayStatus::Listed { info: info(None), up: false, probe: Err("cannot connect".into()) },
                trusted_by: vec![],
            },
            RelayRow { name: n("@relay3"), status: RelayStatus::Skipped("bad signature".into()), trusted_by: vec![] },
        ];
        let t = table(&rows, 1, &["nas@alice_device".to_string()]);
        let lines: Vec<&str> = t.lines().collect();
        let has = |line: &str, parts: &[&str]| parts.iter().all(|p| line.contains(p));
        assert!(
            has(lines[1], &["@relay ", " up ", " eu ", " 1.5 ms ", " pi4@alice_device ", "198.18.0.1:7444"]),
            "{t}"
        );
        assert!(has(lines[2], &["@relay2 ", " gone ", " unreachable ", " none "]), "{t}");
        assert!(has(lines[3], &["@relay3 ", " skipped "]), "{t}");
        assert!(has(lines[4], &["@relay2: unreachable: cannot connect"]), "{t}");
        assert!(has(lines[5], &["@relay3: skipped, not trusted and not dialled: bad signature"]), "{t}");
        assert!(has(lines[6], &["nas@alice_device does not say"]), "{t}");
    }
}
