//! Config files: flags win over the file; a bad file is refused with its line.
#![allow(clippy::unwrap_used)]

use np_tests::{bin, free_port, output_within, spawn_listening, Proc};
use std::process::Command;
use std::time::Duration;

#[test]
fn flags_override_the_config_file_and_bad_files_name_the_line() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (free_port(), free_port());
    let cfg = t.path().join("control.toml");
    std::fs::write(&cfg, format!("[serve]\nlisten = \"127.0.0.1:{a}\"\ndata = \"{}\"\n", t.path().join("d").display()))
        .unwrap();

    // From the file.
    let mut cmd = Command::new(bin("np-control"));
    cmd.args(["serve", "--config"]).arg(&cfg);
    let (child, addr) = spawn_listening(cmd, &t.path().join("1.log")).expect("started from the file");
    let _p = Proc(child);
    assert_eq!(addr.port(), a);
    drop(_p);

    // The flag wins.
    let mut cmd = Command::new(bin("np-control"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{b}"), "--config"]).arg(&cfg);
    let (child, addr) = spawn_listening(cmd, &t.path().join("2.log")).expect("started with the flag");
    let _p = Proc(child);
    assert_eq!(addr.port(), b);
    drop(_p);

    // An unknown setting, a syntax error, a value of the wrong kind.
    for (text, want) in [
        ("[serve]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n", "line 3"),
        ("[serve]\nlisten = \n", "line 2"),
        ("[serve]\nmax_preauth = { a = 1 }\n", "max_preauth"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = output_within(
            Command::new(bin("np-control")).args(["serve", "--config"]).arg(&cfg),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want) && err.contains("control.toml"), "{text}: {err}");
    }

    // npd and np read theirs the same way.
    let npd_cfg = t.path().join("npd.toml");
    std::fs::write(&npd_cfg, "device = \"pi4\"\nmanagr = [\"@alice\"]\n").unwrap();
    let out = output_within(Command::new(bin("npd")).arg("--config").arg(&npd_cfg), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));
}
