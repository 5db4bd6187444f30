//! Helpers for the end-to-end tests: start the real binaries (built by `cargo build` before the
//! tests run), enrol identities through them, and speak the raw protocol where a test needs to
//! misbehave.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the built binaries: `$NP_BIN_DIR`, else the target directory this test
/// executable was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NP_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/test-xxxx -> target/debug
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Path of a built binary; panics with a hint if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not found: run `cargo build --workspace` before the tests", p.display());
    p
}

/// A running `np-control` process on its own data directory.
pub struct Control {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
}

impl Control {
    /// Starts on 127.0.0.1 with a random port and fresh data; `extra` flags are added to `serve`.
    /// With `NP_TEST_STORE=postgres` and no `--store` in `extra`, the node gets a fresh
    /// PostgreSQL database of its own (see [`pgstore`]).
    pub fn start(extra: &[&str]) -> Control {
        let dir = tempfile::tempdir().unwrap();
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if pgstore::wanted() && !extra.iter().any(|a| a == "--store") {
            extra.extend(["--store".to_string(), pgstore::fresh_database()]);
        }
        let (child, addr) = spawn_control(dir.path(), "127.0.0.1:0", &extra);
        Control { child, addr, dir, extra }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("control.log")
    }

    /// The `--store` this node was started with, if any.
    fn store_url(&self) -> Option<&str> {
        self.extra.windows(2).find(|w| w[0] == "--store").map(|w| w[1].as_str())
    }

    /// Where this node's store is, to open it while the node is stopped.
    pub fn store_location(&self) -> np_control::store::Location {
        np_control::store::Location::parse(self.store_url(), self.data().join("control.redb")).unwrap()
    }

    /// Whether `needle` is anywhere the node stores data: its data directory and, on this
    /// process's PostgreSQL cluster, the cluster's files (WAL included, written at each commit).
    pub fn find_stored(&self, needle: &[u8]) -> Option<PathBuf> {
        let cluster = self.store_url().and(pgstore::cluster_dir());
        std::iter::once(self.data()).chain(cluster).find_map(|d| bytes_in_tree(&d, needle))
    }

    /// Changes a stored record in place (its signature kept), as someone who rewrote the
    /// storage would; call it while the node is stopped and outside any runtime.
    pub fn tamper_record(&self, owner: &str, key: &str, f: impl FnOnce(&mut np_control_proto::Record)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = np_control::store::Store::open(&self.store_location(), Default::default()).await.unwrap();
            let mut record = store.record(&owner.parse().unwrap(), key).await.unwrap().expect("the record is stored");
            f(&mut record);
            store.put_record(record).await.unwrap();
        });
    }

    /// Kills with SIGKILL (no chance to flush anything) and waits for the exit.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may linger briefly; retry until it binds.
            match try_spawn_control(self.dir.path(), &self.addr.to_string(), &self.extra) {
                Some((child, addr)) => {
                    self.child = child;
                    self.addr = addr;
                    return;
                }
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => panic!("np-control did not restart"),
            }
        }
    }

    /// `np-control enroll NAME`: returns (exit ok, stdout, stderr).
    pub fn enroll_code(&self, name: &str, extra: &[&str]) -> (bool, String, String) {
        let out = self.admin_cmd().args(["enroll", name, "--data"]).arg(self.data()).args(extra).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// A code that must be issued.
    pub fn code(&self, name: &str) -> String {
        let (ok, code, err) = self.enroll_code(name, &[]);
        assert!(ok, "enroll failed: {err}");
        code
    }

    /// Creates and enrols `name` in a new home under this test's directory.
    pub fn identity(&self, name: &str) -> PathBuf {
        let home = self.dir.path().join(format!("home-{}", name.trim_start_matches('@')));
        let code = self.code(name);
        let (ok, out, err) = np_keys_new(&home, name, &self.addr.to_string(), &code);
        assert!(ok, "np keys new failed: {out} {err}");
        home
    }

    /// `np-control` for an admin subcommand, told this node's store (which it opens itself
    /// when the node is stopped).
    pub fn admin_cmd(&self) -> Command {
        let mut cmd = Command::new(bin("np-control"));
        if let Some(url) = self.store_url() {
            cmd.env("NP_CONTROL_STORE", url);
        }
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `np-control relay ARGS --data DATA`: (exit ok, stdout, stderr).
    pub fn relay_cmd(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.admin_cmd().arg("relay").args(args).arg("--data").arg(self.data()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Puts `name` on the operator's relay list (devices without `--relay` trust it).
    pub fn list_relay(&self, name: &str) {
        let (ok, out, err) = self.relay_cmd(&["add", name]);
        assert!(ok, "np-control relay add {name}: {out} {err}");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn_control(dir: &Path, listen: &str, extra: &[String]) -> (Child, SocketAddr) {
    try_spawn_control(dir, listen, extra).expect("np-control did not start")
}

fn try_spawn_control(dir: &Path, listen: &str, extra: &[String]) -> Option<(Child, SocketAddr)> {
    let mut cmd = Command::new(bin("np-control"));
    cmd.args(["serve", "--listen", listen, "--data"])
        .arg(dir.join("data"))
        .args(extra)
        .env("RUST_LOG", std::env::var("NP_TEST_CONTROL_LOG").unwrap_or_else(|_| "debug".into()));
    spawn_listening(cmd, &dir.join("control.log"))
}

/// Spawns a server that prints `listening on ADDR` on stdout once bound, with its standard error
/// appended to `log`; returns it with the address, or `None` if it exited first.
pub fn spawn_listening(mut cmd: Command, log: &Path) -> Option<(Child, SocketAddr)> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    while let Some(Ok(line)) = lines.next() {
        if let Some(a) = line.trim().strip_prefix("listening on") {
            let addr = a.trim().parse().unwrap();
            // Keep draining stdout so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.by_ref() {});
            return Some((child, addr));
        }
    }
    let _ = child.wait();
    None
}

/// Runs a command to completion, killing it after `limit` (so a command that wrongly keeps
/// running fails the test instead of hanging it).
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    out
}

/// A port that was free a moment ago, below the kernel's ephemeral range (32768 and up), so the
/// outgoing connections of other tests running at the same time (floods open thousands) cannot
/// take it before the server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test process starts at its own offset, then walks the range.
    let start = 20_000 + (std::process::id() % 6000) as u16;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + p.wrapping_sub(20_000) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Kills a child on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `np keys new`; returns (exit ok, stdout, stderr).
pub fn np_keys_new(home: &Path, name: &str, control: &str, code: &str) -> (bool, String, String) {
    let out = Command::new(bin("np"))
        .args(["keys", "new", name, "--control", control, "--code", code, "--home"])
        .arg(home)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Raises this process's open-file limit as far as allowed (flood tests open thousands).
pub fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY-free: plain libc calls through the libc crate's safe-to-call wrappers are unsafe fns.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Waits until `f` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs in any file under `dir` (binary search of raw bytes).
pub fn bytes_in_tree(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir)
        .into_iter()
        .find(|p| std::fs::read(p).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false))
}

pub mod hostile;
pub mod impair;
pub mod netns;
pub mod pgstore;
pub mod raw;
pub mod servers;
pub mod sshd;
pub mod stack;
