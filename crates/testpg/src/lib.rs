//! A throwaway PostgreSQL for tests: `initdb` and `pg_ctl` in a temporary directory, listening
//! only on a Unix socket inside it (so tests running at once never fight over a TCP port), with
//! trust authentication for its one user, and stopped and deleted on drop.
//!
//! The binaries are looked for in `$NP_PG_BIN`, then on `PATH`, then in Debian's
//! `/usr/lib/postgresql/VERSION/bin` (newest first). PostgreSQL refuses to run as root, so under
//! root the cluster runs as the `postgres` user (or `nobody`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The database user every cluster has.
pub const USER: &str = "np";
/// The socket's port number: only its name (`.s.PGSQL.5432`) in the cluster's private socket
/// directory, as the cluster listens on no TCP port.
const PORT: u16 = 5432;

/// A running throwaway cluster.
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    running: bool,
}

/// Where PostgreSQL's server binaries are, if anywhere: the directory `pg_ctl` really lives in
/// (a symlink on PATH is followed), so `pg_basebackup` beside it is found too.
pub fn find_bin() -> Option<PathBuf> {
    let has = |d: &Path| d.join("pg_ctl").is_file() && d.join("initdb").is_file();
    let real = |d: PathBuf| {
        std::fs::canonicalize(d.join("pg_ctl")).ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or(d)
    };
    if let Some(d) = std::env::var_os("NP_PG_BIN").map(PathBuf::from) {
        return has(&d).then(|| real(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has(d)) {
            return Some(real(d));
        }
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has(d))
        .collect();
    debian.sort();
    debian.pop().map(|(_, d)| d)
}

/// The user to run PostgreSQL as when we are root: (uid, gid) from /etc/passwd.
fn unprivileged() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self").ok()?.uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    ["postgres", "nobody"].iter().find_map(|want| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == *want).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    })
}

impl TempPostgres {
    /// Starts a new cluster. `Ok(None)` (after a loud message on stderr) when no PostgreSQL
    /// binaries exist on this machine; an error when they exist but the cluster does not start.
    pub fn start() -> Result<Option<Self>, String> {
        let Some(bin) = find_bin() else {
            eprintln!(
                "\n!!! SKIPPED: no PostgreSQL binaries (initdb, pg_ctl) in $NP_PG_BIN, on PATH or in \
                 /usr/lib/postgresql/*/bin; install Debian's `postgresql` to run the PostgreSQL tests !!!\n"
            );
            return Ok(None);
        };
        let mut pg = Self::stopped(bin)?;
        let data = pg.data_dir();
        pg.run("initdb", &["-D", path(&data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"])?;
        pg.start_again()?;
        Ok(Some(pg))
    }

    /// A new temporary directory with its socket directory, owned by the user PostgreSQL runs
    /// as; no cluster in it yet.
    fn stopped(bin: PathBuf) -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("np-pg").tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let owner = unprivileged();
        let pg = TempPostgres { dir, bin, owner, running: false };
        std::fs::create_dir(pg.socket_dir()).map_err(|e| format!("socket dir: {e}"))?;
        if let Some((uid, gid)) = owner {
            for d in [pg.dir.path(), &pg.socket_dir()] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
            }
        }
        Ok(pg)
    }

    /// A streaming-replication standby of this cluster (`pg_basebackup -R`), in a temporary
    /// directory and on a socket of its own, running and read-only until
    /// [`TempPostgres::promote`]. Replication is asynchronous, so a write committed on the
    /// primary just before it dies may be missing on the standby: wait for
    /// [`TempPostgres::caught_up`] first where that matters.
    pub fn standby(&self) -> Result<Self, String> {
        let mut sb = Self::stopped(self.bin.clone())?;
        let data = sb.data_dir();
        let from = self.socket_dir();
        let port = PORT.to_string();
        sb.run(
            "pg_basebackup",
            &["-D", path(&data), "-R", "-h", path(&from), "-p", &port, "-U", USER, "-c", "fast", "--no-sync"],
        )?;
        sb.start_again()?;
        Ok(sb)
    }

    /// Makes a standby the primary (`pg_ctl promote`); returns once it accepts writes.
    pub fn promote(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", path(&data), "-w", "-t", "60", "promote"])
    }

    /// Whether this standby has replayed everything its primary had written when `lsn` (from
    /// [`TempPostgres::current_lsn`] on the primary) was read.
    pub fn caught_up(&self, lsn: &str) -> Result<bool, String> {
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        Ok(self.psql(&sql)? == "t")
    }

    /// The primary's current write-ahead log position.
    pub fn current_lsn(&self) -> Result<String, String> {
        self.psql("SELECT pg_current_wal_lsn()")
    }

    /// One value from one query, through `psql`.
    fn psql(&self, sql: &str) -> Result<String, String> {
        let sock = self.socket_dir();
        let port = PORT.to_string();
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-h", path(&sock), "-p", &port, "-U", USER, "-d", "postgres", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if !out.status.success() {
            return Err(format!("psql {sql}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// Where `tool` is: beside `pg_ctl`, or beside what `pg_ctl` links to (a directory on
    /// `PATH` may hold links to only the server's tools), else on `PATH`.
    fn tool(&self, tool: &str) -> PathBuf {
        let linked = std::fs::canonicalize(self.bin.join("pg_ctl")).ok().and_then(|p| Some(p.parent()?.join(tool)));
        [Some(self.bin.join(tool)), linked].into_iter().flatten().find(|p| p.is_file()).unwrap_or_else(|| tool.into())
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let mut cmd = Command::new(self.tool(tool));
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().map_err(|e| format!("running {tool}: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            return Err(format!("{tool} failed: {}\n{log}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// Starts the server (again, after [`TempPostgres::stop`]); returns once it accepts
    /// connections.
    pub fn start_again(&mut self) -> Result<(), String> {
        let opts = format!(
            "-k {} -p {PORT} -c listen_addresses='' -c shared_buffers=16MB -c max_connections=60",
            path(&self.socket_dir())
        );
        let (data, log) = (self.data_dir(), self.dir.path().join("log"));
        self.run("pg_ctl", &["-D", path(&data), "-l", path(&log), "-o", &opts, "-w", "-t", "60", "start"])?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once (as a crash would: `-m immediate`).
    pub fn stop(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", path(&data), "-m", "immediate", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    /// The cluster's directory (its data files and WAL are under it), e.g. to search what the
    /// database wrote to disk.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates an empty database `db` (a name of letters, digits and `_`), e.g. one per node so
    /// that the nodes of several tests share one cluster without seeing each other's data.
    pub fn create_db(&self, db: &str) -> Result<(), String> {
        let sock = self.socket_dir();
        let port = PORT.to_string();
        self.run("createdb", &["-h", path(&sock), "-p", &port, "-U", USER, db])
    }

    /// A connection URL for database `db` (`postgres` always exists).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@{}/{db}", self.host())
    }

    /// A URL naming several clusters for database `db`, which connects to whichever of them
    /// takes writes (`target_session_attrs=read-write`), as a client of a primary and its
    /// standbys does.
    pub fn url_of_any(clusters: &[&TempPostgres], db: &str) -> String {
        let hosts: Vec<String> = clusters.iter().map(|c| c.host()).collect();
        format!("postgres://{USER}@{}/{db}?target_session_attrs=read-write", hosts.join(","))
    }

    /// `SOCKETDIR:PORT`, the directory percent-encoded, for a URL.
    fn host(&self) -> String {
        let sock: String = path(&self.socket_dir())
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("{sock}:{PORT}")
    }
}

fn path(p: &Path) -> &str {
    // Temporary directories have UTF-8 names.
    p.to_str().unwrap_or_default()
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop();
        }
    }
}
