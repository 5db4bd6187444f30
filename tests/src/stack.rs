//! A whole np deployment on loopback, from the real binaries: control plane, relay, device
//! daemons, and clients.

use crate::{bin, spawn_listening, wait_until, Control, Proc};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Stack {
    pub ctl: Control,
    pub relay: Option<Proc>,
    pub relay_addr: SocketAddr,
    pub relay_home: PathBuf,
    /// @alice, the person.
    pub client_home: PathBuf,
    /// @alice_device, the device identity.
    pub device_home: PathBuf,
    /// Extra flags the relay is started (and restarted) with.
    pub relay_args: Vec<String>,
    /// Where the relay really listens (and publishes). A test that sets `relay_addr` to a proxy
    /// in front of it makes clients dial the proxy (`--relay-address`); devices still dial the
    /// published address.
    pub published_relay_addr: SocketAddr,
}

/// A running `np forward`.
pub struct Forward {
    pub proc: Proc,
    pub addrs: Vec<SocketAddr>,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with_relay(&[])
    }

    /// A stack whose relay runs with `relay_args` added (e.g. `--idle-timeout 2s`).
    pub fn start_with_relay(relay_args: &[&str]) -> Stack {
        Stack::start_on(Control::start(&[]), relay_args)
    }

    /// A stack around a control plane already running (e.g. on a shared PostgreSQL store).
    pub fn start_on(ctl: Control, relay_args: &[&str]) -> Stack {
        let relay_home = ctl.identity("@relay");
        let client_home = ctl.identity("@alice");
        let device_home = ctl.identity("@alice_device");
        let mut s = Stack {
            relay: None,
            relay_addr: "127.0.0.1:1".parse().unwrap(),
            relay_home,
            client_home,
            device_home,
            ctl,
            relay_args: relay_args.iter().map(|a| a.to_string()).collect(),
            published_relay_addr: "127.0.0.1:1".parse().unwrap(),
        };
        s.start_relay("127.0.0.1:0");
        s.ctl.list_relay("@relay");
        s
    }

    pub fn dir(&self) -> &Path {
        self.ctl.dir.path()
    }

    pub fn relay_log(&self) -> PathBuf {
        self.dir().join("relay.log")
    }

    fn start_relay(&mut self, listen: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new(bin("np-relay"));
            cmd.args(["--as", "@relay", "--listen", listen, "--home"]).arg(&self.relay_home).env("RUST_LOG", "debug");
            cmd.args(&self.relay_args);
            if let Some((child, addr)) = spawn_listening(cmd, &self.relay_log()) {
                self.relay = Some(Proc(child));
                self.relay_addr = addr;
                self.published_relay_addr = addr;
                // Its address record is published before it says it listens, if the control
                // plane answered in time; make sure it did.
                let published = wait_until(Duration::from_secs(10), || {
                    std::fs::read_to_string(self.relay_log()).is_ok_and(|l| l.contains("relay record published"))
                });
                assert!(
                    published,
                    "np-relay did not publish its record: {}",
                    std::fs::read_to_string(self.relay_log()).unwrap_or_default()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "np-relay did not start: {}",
                std::fs::read_to_string(self.relay_log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the relay (SIGKILL) and starts it again on the same port.
    pub fn restart_relay(&mut self) {
        self.relay = None;
        let listen = self.relay_addr.to_string();
        self.start_relay(&listen);
    }

    /// Starts `npd --as @alice_device --device NAME` with `args`; waits until it is ready.
    pub fn npd(&self, device: &str, args: &[&str]) -> Proc {
        self.npd_as(&self.device_home, "@alice_device", device, args)
    }

    pub fn npd_as(&self, home: &Path, me: &str, device: &str, args: &[&str]) -> Proc {
        let log = self.dir().join(format!("npd-{device}.log"));
        let child = Command::new(bin("npd"))
            .args(["--as", me, "--device", device, "--home"])
            .arg(home)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Proc(child);
        let ok = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).map(|l| l.contains("waiting for session requests")).unwrap_or(false)
        });
        assert!(ok, "npd did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        p
    }

    /// `np forward` as @alice.
    pub fn forward(&self, to: &str, forwards: &[&str], extra: &[&str]) -> Result<Forward, String> {
        self.forward_as(&self.client_home, "@alice", to, forwards, extra)
    }

    /// Starts `np forward`; returns once every forward is listening, or the error it exited with.
    pub fn forward_as(
        &self,
        home: &Path,
        me: &str,
        to: &str,
        forwards: &[&str],
        extra: &[&str],
    ) -> Result<Forward, String> {
        self.forward_via(home, me, to, Some("@relay"), forwards, extra)
    }

    /// [`Stack::forward_as`] through `relay`, or with none named: np forward chooses.
    pub fn forward_via(
        &self,
        home: &Path,
        me: &str,
        to: &str,
        relay: Option<&str>,
        forwards: &[&str],
        extra: &[&str],
    ) -> Result<Forward, String> {
        let mut cmd = Command::new(bin("np"));
        cmd.args(["forward", "--as", me, "--to", to, "--home"]).arg(home);
        if let Some(relay) = relay {
            cmd.args(["--relay", relay]);
            if self.relay_addr != self.published_relay_addr {
                cmd.args(["--relay-address", &self.relay_addr.to_string()]);
            }
        }
        for f in forwards {
            cmd.args(["-L", f]);
        }
        let log = self.dir().join("forward.log");
        let mut child =
            cmd.args(extra).env("RUST_LOG", "debug").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Stderr to a file (appending, as it comes), read back on failure.
        let logc = log.clone();
        std::thread::spawn(move || {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(logc) {
                let _ = std::io::copy(&mut stderr, &mut f);
            }
        });
        let mut addrs = Vec::new();
        let mut lines = BufReader::new(stdout).lines();
        while addrs.len() < forwards.len() {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("forwarding ") {
                        addrs.push(rest.split_whitespace().next().unwrap().parse().unwrap());
                    }
                }
                _ => {
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(std::fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(Forward { proc: Proc(child), addrs })
    }
}

/// Runs `np` with `args` to completion: (success, stdout, stderr).
pub fn np(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("np")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
