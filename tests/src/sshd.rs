//! A real OpenSSH server on a loopback port, with its own host key and one authorised client key.

use crate::{free_port, wait_until, Proc};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub struct Sshd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    _proc: Proc,
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for k in ["host", "client"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "np-test", "-f"])
                .arg(d.join(k))
                .status()
                .unwrap();
            assert!(st.success());
        }
        std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", "/dev/null", "-p", &port.to_string()])
            .args(["-o", "ListenAddress=127.0.0.1", "-o", "PidFile=none", "-o", "StrictModes=no"])
            .args(["-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no"])
            .arg("-o")
            .arg(format!("HostKey={}", d.join("host").display()))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", d.join("authorized_keys").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "sshd did not start: {}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
        Sshd { port, dir, _proc: Proc(child) }
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    /// Runs `ssh` to `127.0.0.1:port` (e.g. a forward of this server) with `command`.
    pub fn ssh(&self, port: u16, command: &str) -> Output {
        Command::new("ssh")
            .arg("-i")
            .arg(self.client_key())
            .args(["-p", &port.to_string(), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "root@127.0.0.1", command])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}
