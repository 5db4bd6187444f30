//! `np devices`: the devices that share their info with this identity, live or gone.

use anyhow::Context;
use np_control_proto::Record;
use np_identity::home::Home;
use np_identity::Name;
use np_tunnel::DeviceInfo;
use std::time::Duration;

/// Live while the heartbeat is at most three beats overdue: one late or lost beat is not a
/// device gone. `np doctor` judges a device the same way.
pub fn is_live(age_ms: u64, heartbeat_secs: u64) -> bool {
    age_ms <= 3 * 1000 * heartbeat_secs.max(1)
}

/// Milliseconds since the Unix epoch, the clock device records are stamped with.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Lists the device records `me` may read, one line each.
pub async fn run(home: &Home, me: Option<&Name>) -> anyhow::Result<()> {
    let (ctl, _incoming) = crate::connect_control(home, me).await?;
    let records = ctl.list("device/").await.context("listing devices")?;
    if records.is_empty() {
        println!(
            "no devices share their info with {} (start one with `npd --as @ID --device NAME --manager {}`)",
            ctl.me(),
            ctl.me()
        );
        return Ok(());
    }
    print!("{}", table(&records, now_ms()));
    Ok(())
}

/// The table `np devices` prints, as of `now_ms`. Records whose value is not a device's info
/// are left out.
pub fn table(records: &[Record], now_ms: u64) -> String {
    let mut out = format!("{:<32} {:<6} {:<12} {:<10} PERMIT-OPEN\n", "DEVICE", "STATE", "LAST SEEN", "VERSION");
    for r in records {
        let Ok(info) = postcard::from_bytes::<DeviceInfo>(&r.value) else { continue };
        let age = now_ms.saturating_sub(r.updated_ms);
        let seen = humantime::format_duration(Duration::from_secs(age / 1000)).to_string();
        let name = format!("{}@{}", info.device, r.owner.bare());
        out += &format!(
            "{:<32} {:<6} {:<12} {:<10} {}\n",
            name,
            if is_live(age, info.heartbeat_secs) { "live" } else { "gone" },
            format!("{seen} ago"),
            info.version,
            info.permit_open
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, updated_ms: u64, heartbeat_secs: u64) -> Record {
        let info = DeviceInfo {
            device: device.into(),
            version: "0.1.0".into(),
            permit_open: "localhost:22".into(),
            managers: vec![],
            policy: None,
            started_ms: 0,
            heartbeat_secs,
        };
        Record {
            owner: "@alice_device".parse().expect("valid name"),
            key: format!("device/{device}"),
            value: postcard::to_stdvec(&info).expect("encodes"),
            readers: vec![],
            updated_ms,
            sig: vec![],
        }
    }

    #[test]
    fn three_missed_beats_make_a_device_gone() {
        assert!(is_live(30_000, 10));
        assert!(!is_live(30_001, 10));
        // A zero interval counts as one second, not as "always gone".
        assert!(is_live(3_000, 0));
    }

    #[test]
    fn table_says_live_or_gone_and_skips_what_is_not_a_device() {
        let mut junk = record("x", 0, 1);
        junk.value = vec![0xff; 3];
        let t = table(&[record("pi4", 100_000, 10), record("nas", 10_000, 10), junk], 120_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("DEVICE"));
        let has = |line: &str, parts: &[&str]| parts.iter().all(|p| line.contains(p));
        assert!(has(lines[1], &["pi4@alice_device ", " live ", " 20s ago "]), "{t}");
        assert!(has(lines[2], &["nas@alice_device ", " gone ", " 1m 50s ago "]), "{t}");
    }
}
