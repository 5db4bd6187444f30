//! The README's first command, end to end: scripts/demo.sh on the binaries built for the tests.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

#[test]
fn the_demo_ends_with_ssh_output_from_the_device() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let out = np_tests::output_within(
        Command::new("bash").arg(&script).env("NP_BIN_DIR", np_tests::bin_dir()),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("hello from the device via np"), "{stdout}");
    // Each step carries its time.
    assert!(stdout.lines().filter(|l| l.starts_with('[') && l.contains("s] ")).count() >= 6, "{stdout}");
    // And it cleaned up after itself.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains("npdemo"), "namespaces left behind");
}
