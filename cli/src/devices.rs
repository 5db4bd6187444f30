//! `np devices`: the devices that share their info with this identity, live or gone.

use anyhow::Context;
use np_control_client::{ControlClient, Presence, RecordState};
use np_identity::home::Home;
use np_identity::Name;
use np_tunnel::DeviceInfo;
use std::time::Duration;

/// Live while the heartbeat is at most three beats overdue: one late or lost beat is not a
/// device gone. `np doctor` judges a device the same way.
pub fn is_live(age_ms: u64, heartbeat_secs: u64) -> bool {
    age_ms <= 3 * 1000 * heartbeat_secs.max(1)
}

/// Live by both signs: the control plane has not seen its connection close (npd holds its
/// record present; see `np_control_client::ControlClient::hold`), and the heartbeat is recent,
/// which also catches a connection that died without closing (the control plane keeps thinking
/// it is there until TCP notices). With no presence known (an older npd or control plane, or a
/// control plane restarted since), the heartbeat alone decides.
pub fn is_live_now(presence: Presence, age_ms: u64, heartbeat_secs: u64) -> bool {
    !matches!(presence, Presence::Disconnected { .. }) && is_live(age_ms, heartbeat_secs)
}

/// Milliseconds since the Unix epoch, the clock device records are stamped with.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One device as `np devices` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The device identity (`@alice_device`).
    pub identity: Name,
    pub info: DeviceInfo,
    /// Live by presence and heartbeat ([`is_live_now`]).
    pub live: bool,
    /// Milliseconds since its record was last published (its clock against ours).
    pub age_ms: u64,
}

/// The devices whose records `ctl`'s identity may read, each judged live or gone as of
/// `now_ms`. Records whose value is not a device's info are left out.
pub fn device_states(states: &[RecordState], now_ms: u64) -> Vec<DeviceState> {
    states
        .iter()
        .filter_map(|s| {
            let info = postcard::from_bytes::<DeviceInfo>(&s.record.value).ok()?;
            let age_ms = now_ms.saturating_sub(s.record.updated_ms);
            let live = is_live_now(s.presence, age_ms, info.heartbeat_secs);
            Some(DeviceState { identity: s.record.owner.clone(), info, live, age_ms })
        })
        .collect()
}

/// The devices that share their info with `ctl`'s identity, now: one request to the control
/// plane (for `np devices`, and for anything that follows devices coming and going).
pub async fn fetch(ctl: &ControlClient) -> anyhow::Result<Vec<DeviceState>> {
    let states = ctl.list_with_presence("device/").await.context("listing devices")?;
    Ok(device_states(&states, now_ms()))
}

/// Lists the device records `me` may read, one line each.
pub async fn run(home: &Home, me: Option<&Name>) -> anyhow::Result<()> {
    let (ctl, _incoming) = crate::connect_control(home, me).await?;
    let devices = fetch(&ctl).await?;
    if devices.is_empty() {
        println!(
            "no devices share their info with {} (start one with `npd --as @ID --device NAME --manager {}`)",
            ctl.me(),
            ctl.me()
        );
        return Ok(());
    }
    print!("{}", table(&devices));
    Ok(())
}

/// The table `np devices` prints.
pub fn table(devices: &[DeviceState]) -> String {
    let mut out = format!("{:<32} {:<6} {:<12} {:<10} PERMIT-OPEN\n", "DEVICE", "STATE", "LAST SEEN", "VERSION");
    for d in devices {
        let seen = humantime::format_duration(Duration::from_secs(d.age_ms / 1000)).to_string();
        let name = format!("{}@{}", d.info.device, d.identity.bare());
        out += &format!(
            "{:<32} {:<6} {:<12} {:<10} {}\n",
            name,
            if d.live { "live" } else { "gone" },
            format!("{seen} ago"),
            d.info.version,
            d.info.permit_open
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use np_control_client::Record;

    fn record(device: &str, updated_ms: u64, heartbeat_secs: u64, presence: Presence) -> RecordState {
        let info = DeviceInfo {
            device: device.into(),
            version: "0.1.0".into(),
            permit_open: "localhost:22".into(),
            managers: vec![],
            policy: None,
            started_ms: 0,
            heartbeat_secs,
        };
        let record = Record {
            owner: "@alice_device".parse().expect("valid name"),
            key: format!("device/{device}"),
            value: postcard::to_stdvec(&info).expect("encodes"),
            readers: vec![],
            updated_ms,
            sig: vec![],
        };
        RecordState { record, presence }
    }

    #[test]
    fn three_missed_beats_make_a_device_gone() {
        assert!(is_live(30_000, 10));
        assert!(!is_live(30_001, 10));
        // A zero interval counts as one second, not as "always gone".
        assert!(is_live(3_000, 0));
    }

    #[test]
    fn a_closed_connection_makes_a_device_gone_at_once_and_a_stale_heartbeat_still_does() {
        let connected = Presence::Connected { since_ms: 1 };
        assert!(is_live_now(connected, 1_000, 10));
        assert!(!is_live_now(Presence::Disconnected { at_ms: 2 }, 1_000, 10), "closed: gone at once");
        assert!(!is_live_now(connected, 30_001, 10), "half-open: gone when the heartbeat lapses");
        assert!(is_live_now(Presence::Unknown, 30_000, 10), "no presence known: heartbeat alone");
        assert!(!is_live_now(Presence::Unknown, 30_001, 10));
    }

    #[test]
    fn table_says_live_or_gone_and_skips_what_is_not_a_device() {
        let mut junk = record("x", 0, 1, Presence::Unknown);
        junk.record.value = vec![0xff; 3];
        let states = [
            record("pi4", 100_000, 10, Presence::Unknown),
            record("nas", 10_000, 10, Presence::Unknown),
            junk,
            record("tv", 119_000, 10, Presence::Disconnected { at_ms: 119_500 }),
        ];
        let t = table(&device_states(&states, 120_000));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("DEVICE"));
        let has = |line: &str, parts: &[&str]| parts.iter().all(|p| line.contains(p));
        assert!(has(lines[1], &["pi4@alice_device ", " live ", " 20s ago "]), "{t}");
        assert!(has(lines[2], &["nas@alice_device ", " gone ", " 1m 50s ago "]), "{t}");
        assert!(has(lines[3], &["tv@alice_device ", " gone ", " 1s ago "]), "{t}");
    }
}
