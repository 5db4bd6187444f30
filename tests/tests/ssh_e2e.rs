//! OpenSSH through np (root required): np-control and np-relay in pr; npd and a real sshd in pd;
//! in pc the real `ssh`, `scp`, `rsync` and `git` with the `Host *.np` block `np ssh-config`
//! prints (ProxyCommand `np nc %h %p`), and `np ssh`. No TUN in pc, except in the last test,
//! where `np up` runs and `np nc` must ride its session.
#![allow(clippy::unwrap_used)]

use np_tests::netns::{connect_in, sh_in, spawn_in, Deployment, DeploymentOptions};
use np_tests::{bin, wait_until};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const HOST: &str = "pi4.alice_device.np";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `sh -c SCRIPT` in pc: (output, stdout, stderr).
fn sh(d: &Deployment, script: &str, limit: Duration) -> (Output, String, String) {
    let out = sh_in(&d.hosts.pc, script, limit);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    (out, o, e)
}

/// The ssh client's files in the test directory: `ssh_config` (np's block, then the test's key,
/// user and known_hosts) and `plain_config` (without np's block, for `np ssh`). known_hosts
/// holds the device's real host key under its name, so host-key checking stays strict.
struct SshFiles {
    config: PathBuf,
    plain: PathBuf,
    known_hosts: PathBuf,
}

fn ssh_files(d: &Deployment) -> SshFiles {
    let dir = d.path();
    let (ok, block, err) = d.np_in_pc(&["ssh-config"]);
    assert!(ok, "np ssh-config: {err}");
    assert!(block.contains("Host *.np") && block.contains(" nc %h %p"), "{block}");
    let np = bin("np");
    assert!(block.contains(&format!("ProxyCommand {}", np.display())), "not the absolute path of np: {block}");
    let lower = block.to_ascii_lowercase();
    for weak in ["stricthostkeychecking", "userknownhostsfile", "hostkeyalias", "checkhostip"] {
        assert!(!lower.contains(weak), "the block touches {weak}:\n{block}");
    }
    let host_key = std::fs::read_to_string(d.sshd.dir.path().join("host.pub")).unwrap();
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("{HOST} {}\n", host_key.trim())).unwrap();
    let common = format!(
        "Host *\n    User root\n    IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    \
         StrictHostKeyChecking yes\n    BatchMode yes\n    LogLevel ERROR\n    ConnectTimeout 20\n",
        d.sshd.client_key().display(),
        known_hosts.display()
    );
    let config = dir.join("ssh_config");
    std::fs::write(&config, format!("{block}\n{common}")).unwrap();
    let plain = dir.join("plain_config");
    std::fs::write(&plain, &common).unwrap();
    SshFiles { config, plain, known_hosts }
}

/// `sha256sum` of a file.
fn sha256(d: &Deployment, p: &Path) -> String {
    let (out, o, e) = sh(d, &format!("sha256sum {}", p.display()), Duration::from_secs(30));
    assert!(out.status.success(), "{e}");
    o.split_whitespace().next().unwrap().to_string()
}

/// "npd accepted a session" lines so far.
fn sessions_accepted(d: &Deployment) -> usize {
    d.log("npd.log").matches("session accepted").count()
}

/// `np nc ARGS` in pc with nothing on its standard input: (exit code, stdout, stderr, time taken).
fn np_nc(d: &Deployment, args: &str) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let script = format!("{} --home {} nc {args} </dev/null", bin("np").display(), d.client_home.display());
    let (out, o, e) = sh(d, &script, Duration::from_secs(30));
    (out.status.code(), o, e, t.elapsed())
}

#[test]
fn ssh_scp_rsync_git_and_failures_through_the_ssh_config_block() {
    let mut d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let f = ssh_files(&d);
    let dir = d.path().to_path_buf();
    let ssh = format!("ssh -F {}", f.config.display());
    let long = Duration::from_secs(120);

    // ssh runs a command, by the device's name, with strict host-key checking.
    let t = Instant::now();
    let (out, o, e) = sh(&d, &format!("{ssh} {HOST} 'echo ok; uname -s'"), long);
    assert!(out.status.success(), "ssh: {e}\n{}", d.log("npd.log"));
    assert_eq!(o.trim(), "ok\nLinux");
    eprintln!("ssh via np nc: {:?}", t.elapsed());
    // And as pi@..., the way users write it: the known_hosts entry is the device's name.
    let (out, _, e) = sh(&d, &format!("{ssh} root@PI4.alice_device.np true"), long);
    assert!(out.status.success(), "ssh root@PI4...: {e}");
    assert_eq!(std::fs::read_to_string(&f.known_hosts).unwrap().lines().count(), 1, "known_hosts grew");

    // scp of 64 MiB up and back: the same SHA-256.
    let (up, back) = (dir.join("up.bin"), dir.join("back.bin"));
    let (out, _, e) = sh(&d, &format!("head -c 64M /dev/urandom > {}", up.display()), long);
    assert!(out.status.success(), "{e}");
    let remote = dir.join("remote.bin");
    let t = Instant::now();
    let scp = format!("scp -q -F {}", f.config.display());
    let script = format!(
        "{scp} {} {HOST}:{} && {scp} {HOST}:{} {}",
        up.display(),
        remote.display(),
        remote.display(),
        back.display()
    );
    let (out, _, e) = sh(&d, &script, long);
    assert!(out.status.success(), "scp: {e}");
    eprintln!("scp 64 MiB up and back: {:?}", t.elapsed());
    assert_eq!(sha256(&d, &up), sha256(&d, &back));

    // Half-close: ssh's standard input ends, `cat` on the device sees EOF, the command completes.
    let written = dir.join("written.bin");
    let script = format!("head -c 1M {} | {ssh} {HOST} 'cat > {}'", up.display(), written.display());
    let (out, _, e) = sh(&d, &script, Duration::from_secs(60));
    assert!(out.status.success(), "ssh 'cat > f' < file: {e}");
    let (_, o, _) = sh(&d, &format!("head -c 1M {} | sha256sum", up.display()), long);
    assert_eq!(sha256(&d, &written), o.split_whitespace().next().unwrap());

    // rsync -e ssh.
    let (src, dst) = (dir.join("tree"), dir.join("tree-copy"));
    let script = format!(
        "mkdir -p {s}/a/b && echo one > {s}/a/one && head -c 300k /dev/urandom > {s}/a/b/two && \
         rsync -a -e '{ssh}' {s}/ {HOST}:{t}/ && diff -r {s} {t}",
        s = src.display(),
        t = dst.display()
    );
    let (out, o, e) = sh(&d, &script, long);
    assert!(out.status.success(), "rsync: {o}{e}");

    // git clone over ssh from a bare repository on the device.
    let (work, bare, clone) = (dir.join("work"), dir.join("repo.git"), dir.join("clone"));
    let script = format!(
        "set -e; git init -q {w}; echo hello > {w}/README; git -C {w} add README; \
         git -C {w} -c user.name=t -c user.email=t@example.com commit -qm first; \
         git clone -q --bare {w} {b}; GIT_SSH_COMMAND='{ssh}' git clone -q {HOST}:{b} {c}; cat {c}/README",
        w = work.display(),
        b = bare.display(),
        c = clone.display()
    );
    let (out, o, e) = sh(&d, &script, long);
    assert!(out.status.success(), "git clone: {o}{e}");
    assert_eq!(o.trim(), "hello");

    // 16 concurrent ssh commands all answer.
    let t = Instant::now();
    let (pc, ssh_ref) = (&d.hosts.pc, &ssh);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..16).map(|i| s.spawn(move || sh_in(pc, &format!("{ssh_ref} {HOST} echo n{i}"), long))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "ssh {i} of 16: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), format!("n{i}"));
    }
    eprintln!("16 concurrent ssh: {:?}", t.elapsed());

    // Binary data both ways through np nc (-v, so there are logs): standard output carries the
    // flow's bytes and nothing else.
    let back = dir.join("echoed.bin");
    let script = format!(
        "head -c 4M {} | {} -v --home {} nc pi4@alice_device {} > {}",
        up.display(),
        bin("np").display(),
        d.client_home.display(),
        d.echo_port,
        back.display()
    );
    let (out, _, e) = sh(&d, &script, long);
    assert!(out.status.success(), "np nc to the echo port: {e}");
    assert!(e.contains("session ready"), "-v said nothing on stderr: {e}");
    let (out, _, e) = sh(&d, &format!("head -c 4M {} | cmp - {}", up.display(), back.display()), long);
    assert!(out.status.success(), "the echoed bytes differ: {e}");

    // The device's answer the other way: its source server's bytes, then its close, with np nc's
    // standard input still open (np nc ends its output when the device ends the flow).
    let fifo = dir.join("held-open");
    let script = format!(
        "mkfifo {f}; sleep 30 > {f} & {} --home {} nc pi4@alice_device {} < {f} | sha256sum; kill $!",
        bin("np").display(),
        d.client_home.display(),
        d.source_port,
        f = fifo.display()
    );
    let t = Instant::now();
    let (_, o, e) = sh(&d, &script, Duration::from_secs(25));
    assert!(t.elapsed() < Duration::from_secs(20), "np nc's output did not end with the flow: {e}");
    assert_eq!(o.split_whitespace().next().unwrap(), np_tests::servers::pattern_sha256(1 << 20), "{e}");

    // An unpermitted port: refused at once, with the device's reason; ssh shows it too.
    let (code, o, e, took) = np_nc(&d, "pi4@alice_device 2");
    assert_eq!(code, Some(3), "{e}");
    assert!(o.is_empty(), "stdout: {o}");
    assert!(e.contains("refused") && e.contains("permit-open"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "not one line: {e}");
    assert!(took < Duration::from_secs(5), "refusal took {took:?}");
    let (out, _, e) = sh(&d, &format!("{ssh} -p 2 {HOST} true"), long);
    assert!(!out.status.success());
    assert!(e.contains("permit-open"), "ssh did not show the device's reason: {e}");

    // Unknown devices.
    let (code, _, e, _) = np_nc(&d, "pi5@alice_device 22");
    assert_eq!(code, Some(4), "{e}");
    assert!(e.contains("unknown device"), "{e}");
    let (code, _, e, _) = np_nc(&d, "pi4.nobody_here.np 22");
    assert_eq!(code, Some(4), "{e}");
    assert!(e.contains("unknown device"), "{e}");
    // An address only np up gives out, with none running.
    let (code, _, e, _) = np_nc(&d, "100.80.0.2 22");
    assert_eq!(code, Some(4), "{e}");

    // The device offline: said so, well within the timeout.
    d.npd = None;
    let (code, _, e, took) = np_nc(&d, "--timeout 8s pi4@alice_device 22");
    assert_eq!(code, Some(5), "{e}");
    assert!(e.contains("offline"), "{e}");
    assert!(took < Duration::from_secs(9), "took {took:?}");
    eprintln!("offline device: {took:?}: {}", e.trim());

    // The relay gone: said so.
    d.procs.truncate(1);
    let (code, _, e, _) = np_nc(&d, "--timeout 5s pi4@alice_device 22");
    assert!(matches!(code, Some(5) | Some(6)), "{code:?} {e}");
}

#[test]
fn np_ssh_runs_commands_and_forwards() {
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let f = ssh_files(&d);
    let np = format!("{} --home {}", bin("np").display(), d.client_home.display());
    let plain = f.plain.display();

    let (out, o, e) = sh(&d, &format!("{np} ssh pi4@alice_device -F {plain} -- uname -a"), Duration::from_secs(60));
    assert!(out.status.success(), "np ssh: {e}");
    assert!(o.starts_with("Linux "), "{o}");
    // The same with a user, and ssh's exit code passed back.
    let (out, _, e) = sh(&d, &format!("{np} ssh root@pi4@alice_device -F {plain} 'exit 7'"), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(7), "{e}");

    // -L through it.
    let port = np_tests::free_port();
    let mut cmd = Command::new(bin("np"));
    cmd.arg("--home").arg(&d.client_home).args(["ssh", "pi4@alice_device", "-F"]).arg(&f.plain).args([
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        &format!("127.0.0.1:{port}:localhost:{}", d.echo_port),
    ]);
    let _fwd = spawn_in(&d.hosts.pc, &cmd, &d.path().join("np-ssh-L.log"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listening =
        wait_until(Duration::from_secs(20), || connect_in(&d.hosts.pc, addr, Duration::from_secs(1)).is_ok());
    assert!(listening, "ssh -L did not listen: {}", d.log("np-ssh-L.log"));
    let mut c = connect_in(&d.hosts.pc, addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"through -L").unwrap();
    let mut back = [0u8; 10];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"through -L");
}

#[test]
fn np_nc_rides_np_ups_session_and_its_socket_is_roots() {
    let d = Deployment::start(DeploymentOptions { lan: false, source_len: Some(1 << 20) });
    let f = ssh_files(&d);
    let up = d.up(&["--device", "pi4@alice_device"]).unwrap_or_else(|e| panic!("{e}"));
    let dev = up.device("pi4@alice_device");
    let np = format!("{} --home {}", bin("np").display(), d.client_home.display());
    let long = Duration::from_secs(60);
    let dir = d.path().to_path_buf();

    // The first flow sets up np up's session (it is lazy); then no np nc adds one.
    let data = dir.join("data.bin");
    let (out, _, e) = sh(&d, &format!("head -c 2M /dev/urandom > {}", data.display()), long);
    assert!(out.status.success(), "{e}");
    let echo = |device: &str| {
        let back = dir.join("back.bin");
        let script = format!(
            "{np} -v nc {device} {} < {} > {} && cmp {} {}",
            d.echo_port,
            data.display(),
            back.display(),
            data.display(),
            back.display()
        );
        let (out, _, e) = sh(&d, &script, long);
        assert!(out.status.success(), "np nc {device}: {e}\n{}", up.log());
        e
    };
    echo("pi4@alice_device");
    let before = sessions_accepted(&d);
    assert!(before >= 1, "{}", d.log("npd.log"));
    for device in ["pi4@alice_device", HOST, &dev.to_string()] {
        let e = echo(device);
        assert!(!e.contains("session ready"), "np nc set up its own session: {e}");
    }
    let ssh = format!("ssh -F {}", f.config.display());
    for i in 0..3 {
        let (out, o, e) = sh(&d, &format!("{ssh} {HOST} echo n{i}"), long);
        assert!(out.status.success(), "ssh with np up running: {e}");
        assert_eq!(o.trim(), format!("n{i}"));
    }
    assert_eq!(sessions_accepted(&d), before, "np nc made new sessions:\n{}", d.log("npd.log"));

    // Another identity's np nc does not borrow np up's session: it asks the device as itself
    // (and @bob, no manager of it, is refused).
    let bob = d.enrol("@bob", &d.hosts.pc);
    let script =
        format!("{} --home {} nc pi4@alice_device {} </dev/null", bin("np").display(), bob.display(), d.echo_port);
    let (out, _, e) = sh(&d, &script, long);
    assert_eq!(out.status.code(), Some(3), "@bob's np nc: {e}");
    assert!(e.contains("not permitted"), "{e}");

    // A refusal through np up still brings the device's reason.
    let (out, _, e) = sh(&d, &format!("{np} nc pi4@alice_device 2 </dev/null"), long);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("permit-open"), "{e}");

    // The socket is root's: mode 0600 in the 0700 run directory; a non-root user cannot reach it.
    let (_, ino, _) = sh(&d, "stat -L -c %i /proc/self/ns/net", long);
    let sock = PathBuf::from(format!("/run/np/{}.{}.flows", up.name, ino.trim()));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600), "{}", sock.display());
    let probe = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({:?})\n    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e)\n",
        sock.display().to_string()
    );
    let out = np_tests::netns::output_in(
        &d.hosts.pc,
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &probe,
        ]),
        long,
    );
    assert!(
        !text(&out.stdout).contains("CONNECTED") && text(&out.stdout).contains("refused"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // A flood of silent connections: np up's descriptors stay bounded, and np nc still gets in.
    let fds = np_tests::fd_count(up.pid);
    let flood = format!(
        "import socket, time\nss = []\nfor i in range(300):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({:?})\n    ss.append(s)\nprint('flooding', flush=True)\ntime.sleep(60)\n",
        sock.display().to_string()
    );
    let log = dir.join("flood.log");
    let _flood = spawn_in(&d.hosts.pc, Command::new("/usr/bin/python3").args(["-c", &flood]), &log);
    assert!(
        wait_until(Duration::from_secs(20), || np_tests::netns::read(&log).contains("flooding")),
        "{}",
        np_tests::netns::read(&log)
    );
    let bounded =
        wait_until(Duration::from_secs(10), || np_tests::fd_count(up.pid) <= fds + np_cli_limits::MAX_WAITING + 8);
    assert!(bounded, "np up holds {} fds (was {fds}) under a flood of 300", np_tests::fd_count(up.pid));
    let e = echo("pi4@alice_device");
    assert!(!e.contains("session ready"), "{e}");
    assert_eq!(sessions_accepted(&d), before);
}

/// np up's limits on its flow socket, as the test needs them (np-cli is a binary crate's
/// library the tests do not link).
mod np_cli_limits {
    /// `np_cli::local_flows::MAX_WAITING`.
    pub const MAX_WAITING: usize = 32;
}
