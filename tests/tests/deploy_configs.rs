//! The example config files in `deploy/config/` work with the real binaries (each one starts a
//! server, or gets past parsing to the first real check), command-line flags override them, and
//! the systemd units pass `systemd-analyze verify` where it is installed.
#![allow(clippy::unwrap_used)]

use np_tests::stack::Stack;
use np_tests::{bin, bin_dir, free_port, spawn_listening, wait_until, Proc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn deploy(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel)
}

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn control_toml_starts_np_control_with_flags_winning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin("np-control"));
    cmd.args(["serve", "--config"])
        .arg(deploy("config/control.toml"))
        .args(["--listen", "127.0.0.1:0", "--metrics", &metrics.to_string(), "--data"])
        .arg(&data);
    let (child, addr) = spawn_listening(cmd, &dir.path().join("control.log")).unwrap_or_else(|| {
        panic!(
            "np-control did not start: {}",
            std::fs::read_to_string(dir.path().join("control.log")).unwrap_or_default()
        )
    });
    let _p = Proc(child);
    assert!(addr.ip().is_loopback(), "--listen overrides the file's 0.0.0.0:7443: {addr}");
    assert!(data.join("control.redb").exists(), "--data overrides the file's /var/lib/np-control");
    assert!(get(metrics).contains("np_control_queue_depth 0"), "--metrics overrides the file's address");
}

/// `deploy/cluster/control-node.toml` starts a node on a primary and its standby: the file's
/// store URL with the test's two clusters in place of its hosts, and its own parameters kept.
#[test]
fn cluster_control_toml_starts_a_node_on_a_primary_and_standby() {
    let Some(primary) = np_testpg::TempPostgres::start().unwrap() else { return };
    let standby = primary.standby().unwrap();
    let text = std::fs::read_to_string(deploy("cluster/control-node.toml")).unwrap();
    let example = text.lines().find_map(|l| l.strip_prefix("store = \"")?.strip_suffix('"')).unwrap();
    let (_, params) = example.split_once('?').unwrap();
    assert!(params.contains("target_session_attrs=read-write"), "{example}");
    let ours = np_testpg::TempPostgres::url_of_any(&[&primary, &standby], "postgres");
    let url = format!("{}?{params}", ours.split_once('?').unwrap().0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("control.toml");
    std::fs::write(&file, text.replace(example, &url)).unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin("np-control"));
    cmd.args(["serve", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--metrics", &metrics.to_string(), "--data"])
        .arg(dir.path().join("data"));
    let log = dir.path().join("control.log");
    let (child, _) = spawn_listening(cmd, &log)
        .unwrap_or_else(|| panic!("np-control did not start: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    let _p = Proc(child);
    assert!(get(metrics).contains("np_control_store_connections{state=\"max\"} 16"));
}

#[test]
fn relay_npd_and_np_configs_run_a_session() {
    let mut s = Stack::start();

    // np-relay from relay.toml, in place of the stack's relay, on the same port.
    s.relay = None;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut started = None;
    for _ in 0..50 {
        let mut cmd = Command::new(bin("np-relay"));
        cmd.arg("--config")
            .arg(deploy("config/relay.toml"))
            .args(["--listen", &s.relay_addr.to_string(), "--advertise", &s.relay_addr.to_string()])
            .args(["--metrics", &metrics.to_string(), "--home"])
            .arg(&s.relay_home);
        if let Some(x) = spawn_listening(cmd, &s.relay_log()) {
            started = Some(x);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (child, _) =
        started.unwrap_or_else(|| panic!("{}", std::fs::read_to_string(s.relay_log()).unwrap_or_default()));
    s.relay = Some(Proc(child));
    assert!(get(metrics).contains("np_relay_pairings_total 0"));

    // npd from npd.toml: its identity, device name, manager and permit-open come from the file.
    let log = s.dir().join("npd-config.log");
    let npd = Command::new(bin("npd"))
        .arg("--config")
        .arg(deploy("config/npd.toml"))
        .arg("--home")
        .arg(&s.device_home)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _npd = Proc(npd);
    let ready = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).map(|l| l.contains("waiting for session requests")).unwrap_or(false)
    });
    assert!(ready, "npd did not start from npd.toml: {}", std::fs::read_to_string(&log).unwrap_or_default());

    // np doctor sees the device as the file describes it (pi4, manager @alice, localhost:22).
    let out = Command::new(bin("np"))
        .args(["doctor", "--as", "@alice", "--relay", "@relay", "--device", "pi4@alice_device"])
        .arg("--home")
        .arg(&s.client_home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("permit-open of pi4@alice_device: localhost:22 (@alice is a manager)"), "{text}");

    // np forward with np.toml (its [forward] table; the relay given on the command line wins).
    let np_toml = deploy("config/np.toml").to_string_lossy().into_owned();
    let fwd = s.forward("pi4@alice_device", &["0:localhost:22"], &["--config", &np_toml]);
    assert!(fwd.is_ok(), "np forward with np.toml: {}", fwd.err().unwrap_or_default());
}

#[test]
fn up_configs_parse_through_to_the_first_real_check() {
    // `np up` needs CAP_NET_ADMIN and a TUN; with an empty home it stops at the identity, after
    // clap has accepted every key and value of the file (a bad one would exit 2 first).
    let home = tempfile::tempdir().unwrap();
    for file in ["config/up-example.toml", "config/np.toml"] {
        let out = Command::new(bin("np"))
            .arg("--config")
            .arg(deploy(file))
            .arg("--home")
            .arg(home.path())
            .arg("up")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(!err.contains("config file") && !err.contains("Usage"), "{file}: {err}");
        assert!(err.contains("@alice"), "{file}: stops at the identity from the file: {err}");
    }
}

#[test]
fn a_bad_relay_config_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("relay.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\n# comment\nmax_sesions = 3\n").unwrap();
    let out = Command::new(bin("np-relay")).arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("max_sesions"), "{err}");
}

#[test]
fn systemd_units_verify() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    };
    if !v.status.success() {
        return;
    }
    // The units name /usr/local/bin; point them at the built binaries so verify finds them.
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    let mut names: Vec<String> = ["np-control.service", "np-relay.service", "npd.service", "np-up@.service"]
        .iter()
        .map(|n| format!("systemd/{n}"))
        .collect();
    // The cluster's PostgreSQL units name Debian's binaries of one version; point them at ours.
    let pg = np_testpg::find_bin();
    if pg.is_some() {
        names.extend(["cluster/np-postgres.service", "cluster/np-postgres-standby-init.service"].map(String::from));
    }
    for path in &names {
        let name = path.rsplit('/').next().unwrap();
        let text = std::fs::read_to_string(deploy(path)).unwrap();
        let mut text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir().display()));
        if let Some(pg) = &pg {
            text = text.replace("/usr/lib/postgresql/15/bin/", &format!("{}/", pg.display()));
        }
        for (key, want) in [
            ("NoNewPrivileges=", "yes"),
            ("ProtectSystem=", "strict"),
            ("ProtectHome=", "yes"),
            ("PrivateTmp=", "yes"),
            ("Restart=", "on-failure"),
            ("SystemCallFilter=", "@system-service"),
        ] {
            assert!(text.lines().any(|l| l == format!("{key}{want}")), "{name}: {key}{want}");
        }
        let caps = text.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).unwrap();
        if name == "np-up@.service" {
            assert_eq!(caps, "CAP_NET_ADMIN");
            assert!(text.contains("DeviceAllow=/dev/net/tun"));
            assert!(text.contains("--config /etc/np/up-%i.toml up"));
        } else {
            assert_eq!(caps, "", "{name}: no capabilities");
            assert!(text.lines().any(|l| l.starts_with("User=") && l != "User=root"), "{name}: a dedicated user");
        }
        let file = dir.path().join(name.replace("@.", "@test."));
        std::fs::write(&file, text).unwrap();
        units.push(file);
    }
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&units).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
}
