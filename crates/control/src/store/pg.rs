//! The PostgreSQL store: the same tables as the embedded one, in a database several nodes can
//! share. Every write is one transaction, durable at its commit (PostgreSQL's default
//! `synchronous_commit`). The SQL keeps to what CockroachDB also runs: no advisory locks, no
//! `SERIAL`, no `FILTER`, no `LIMIT` on `DELETE`.

use super::{admit_check, Page, Quota, StoreError, MAX_RECORDS_PER_OWNER, MAX_RELAYS, PAGE_BYTES};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use np_control_proto::{EnrolCode, IdentityInfo, Record};
use np_identity::{Envelope, Name, PublicKeys};
use std::str::FromStr;

/// Connections one node holds open at most: the write lane uses one at a time, the rest serve
/// reads (a backlog page, a lookup) of the connections this node holds.
const POOL_SIZE: usize = 16;
/// How long a new connection may take when the URL does not say (`connect_timeout`); with
/// several hosts, each one is given this long.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The server's bound on one statement (`statement_timeout`) unless the URL's `options` set
/// one: a statement stuck behind a lock must not hold the node's write lane for ever.
const STATEMENT_TIMEOUT_MS: u64 = 10_000;
/// The client's bound on one store operation (waiting for a connection, its statements and
/// commit): a primary that vanished without closing its sockets (a dead host, a partition)
/// fails requests after this long instead of holding them. Above [`STATEMENT_TIMEOUT_MS`], so
/// a slow statement is the server's to cancel first.
pub(crate) const OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// TCP keepalive idle time unless the URL sets one, so a wake-up connection to a host that
/// died silently is noticed in seconds (idle, then 3 probes 2 s apart), not after the
/// kernel's two hours.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long sent data may stay unacknowledged on a TCP connection to PostgreSQL before the
/// kernel drops the connection (`tcp_user_timeout`), unless the URL sets it.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most expired notifications one sweep deletes (the next sweep continues).
const SWEEP_BATCH: i64 = 10_000;
/// Sequence numbers of one run of one node: `run << RUN_SHIFT` upwards. Runs are numbered by the
/// database, so two nodes (or two starts of one) never hand out the same number, without any
/// round trip per notification (the number is needed before the commit, for the live push).
const RUN_SHIFT: u32 = 40;

/// The schema, one migration per version, applied in order at start (each in its own
/// transaction, recorded in `np_schema`). Never edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE np_identities (name TEXT PRIMARY KEY, info BYTEA NOT NULL);
CREATE TABLE np_codes (hash BYTEA PRIMARY KEY, name TEXT NOT NULL, expires_ms BIGINT NOT NULL, used BOOLEAN NOT NULL);
CREATE TABLE np_records (owner TEXT NOT NULL, key TEXT NOT NULL, rec BYTEA NOT NULL, PRIMARY KEY (owner, key));
CREATE TABLE np_queue (
    recipient TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    envelope BYTEA NOT NULL,
    PRIMARY KEY (recipient, seq)
);
CREATE INDEX np_queue_expiry ON np_queue (expires_ms);
CREATE INDEX np_queue_sender ON np_queue (sender);
CREATE TABLE np_relays (name TEXT PRIMARY KEY, added_ms BIGINT NOT NULL);
CREATE TABLE np_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
",
    "
CREATE TABLE np_presence (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    node BIGINT NOT NULL,
    since_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    live BOOLEAN NOT NULL,
    PRIMARY KEY (owner, key, node)
);
CREATE INDEX np_presence_node ON np_presence (node);
",
];

/// How long a node's claim that it holds a record lasts unless renewed: a node that dies has its
/// devices read as gone this long after its last renewal, at most.
pub const PRESENCE_LEASE: std::time::Duration = std::time::Duration::from_secs(6);
/// Presence rows older than this (their node gone or the record released) are deleted.
const PRESENCE_KEEP_MS: i64 = 24 * 3600 * 1000;
/// Released keys kept per identity and node (a connection holds at most `MAX_HOLDS` at once).
pub const MAX_RELEASED_PER_OWNER: i64 = 64;

/// The channel on which a node that stores a notification wakes the node holding its recipient.
/// The payload is `RUN RECIPIENT SENT_MS` (the sender's clock, for the wake-up lag metric); the
/// notification itself stays in `np_queue`.
pub(crate) const WAKE_CHANNEL: &str = "np_queue";

/// Buckets for store operations and wake-ups, which on a local database take well under a
/// millisecond: 100 µs to 10 s.
pub const STORE_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What the PostgreSQL store measures, for the node's metrics.
pub struct PgStats {
    /// One store operation, from asking for a connection to its answer (a write: its commit).
    pub operation: std::sync::Arc<np_metrics::Histogram>,
    /// From a node's NOTIFY (the sender's clock, in the payload) to this node reading it.
    pub wake_lag: std::sync::Arc<np_metrics::Histogram>,
}

/// Connections of the pool, now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUse {
    /// The most it opens.
    pub max: usize,
    /// Open now.
    pub open: usize,
    /// Open and lent out to an operation.
    pub in_use: usize,
    /// Operations waiting for a connection.
    pub waiting: usize,
}

/// The PostgreSQL store.
pub struct PgStore {
    /// What it measures.
    pub stats: PgStats,
    pool: Pool,
    pub(crate) cfg: tokio_postgres::Config,
    quota: Quota,
    /// host:port/dbname, for messages (never the password).
    target: String,
    /// Whether the server has LISTEN/NOTIFY (PostgreSQL does; CockroachDB does not).
    pub(crate) wakes: bool,
    /// This node's run number (see [`RUN_SHIFT`]), 0 before [`PgStore::start_seq`].
    pub(crate) run: std::sync::atomic::AtomicU64,
}

/// Milliseconds and sequence numbers as PostgreSQL's BIGINT (a far-off expiry saturates).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

fn dec<T: for<'a> serde::Deserialize<'a>>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|_| StoreError::Corrupt(what.to_string()))
}

/// Where a connection string points, without its password.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = cfg.get_ports().get(i).or(cfg.get_ports().first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    format!("{}/{}", hosts.join(","), cfg.get_dbname().unwrap_or(cfg.get_user().unwrap_or("")))
}

/// Bounds every wait on the database that the URL leaves unbounded: connecting, a statement,
/// and a TCP connection whose peer vanished. A URL that sets one keeps its own.
fn bound(cfg: &mut tokio_postgres::Config) {
    if cfg.get_connect_timeout().is_none() {
        // An unreachable host must fail a request, not hold it (and the write lane) forever.
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    let options = cfg.get_options().unwrap_or_default();
    if !options.contains("statement_timeout") {
        let joined = format!("{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}");
        cfg.options(joined.trim_start());
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if cfg.get_keepalives() && cfg.get_keepalives_idle() == tokio_postgres::Config::new().get_keepalives_idle() {
        cfg.keepalives_idle(KEEPALIVE_IDLE);
        if cfg.get_keepalives_interval().is_none() {
            cfg.keepalives_interval(std::time::Duration::from_secs(2));
        }
        if cfg.get_keepalives_retries().is_none() {
            cfg.keepalives_retries(3);
        }
    }
}

impl PgStore {
    /// Runs one store operation within [`OP_TIMEOUT`]; past it the operation is abandoned (a
    /// write's outcome is then unknown, as when a connection breaks at its commit) and the
    /// request fails with an error naming the store.
    pub(crate) async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let r = match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(r) => r,
            Err(_) => Err(self.err(format_args!("no answer within {} s", OP_TIMEOUT.as_secs()))),
        };
        self.stats.operation.observe(started.elapsed());
        r
    }

    /// The pool's connections now.
    pub fn pool_use(&self) -> PoolUse {
        let s = self.pool.status();
        PoolUse { max: s.max_size, open: s.size, in_use: s.size.saturating_sub(s.available), waiting: s.waiting }
    }

    /// Whether the database answers a query now, within `limit`.
    pub async fn answers(&self, limit: std::time::Duration) -> bool {
        let probe = async { self.client().await?.simple_query("SELECT 1").await.map_err(|e| self.pg(e)) };
        matches!(tokio::time::timeout(limit, probe).await, Ok(Ok(_)))
    }

    /// Connects, and brings the schema up to date. A database that cannot be reached is an
    /// error naming it, before anything is written.
    pub async fn connect(url: &str, quota: Quota) -> Result<Self, StoreError> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Postgres(format!("connection string does not parse: {e}")))?;
        bound(&mut cfg);
        let target = describe(&cfg);
        // Fast recycling: a pooled connection whose socket closed (its server died, or failed
        // over) is dropped when next taken, and a new one is made to whichever host now takes
        // writes (`target_session_attrs=read-write` with several hosts).
        let mgr = Manager::from_config(
            cfg.clone(),
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(OP_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(format!("at {target}: {e}")))?;
        let stats = PgStats {
            operation: std::sync::Arc::new(np_metrics::Histogram::new(STORE_BUCKETS)),
            wake_lag: std::sync::Arc::new(np_metrics::Histogram::new(STORE_BUCKETS)),
        };
        let mut store = PgStore { stats, pool, cfg, quota, target, wakes: true, run: Default::default() };
        store.migrate().await?;
        let version: String =
            store.client().await?.query_one("SELECT version()", &[]).await.map_err(|e| store.pg(e))?.get(0);
        store.wakes = !version.contains("CockroachDB");
        Ok(store)
    }

    /// host:port/dbname.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Postgres(format!("at {}: {e}", self.target))
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        match e.as_db_error() {
            Some(db) => self.err(format_args!("{db}")),
            None => self.err(e),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.err(e))
    }

    /// Applies the migrations not yet applied. Nodes starting together each try: the first to
    /// insert a version's row applies it, the others wait on that row and then skip it.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS np_schema (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(|e| self.pg(e))?;
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            let tx = c.transaction().await.map_err(|e| self.pg(e))?;
            let fresh = tx
                .execute(
                    "INSERT INTO np_schema (version, applied_ms) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
                    &[&version, &big(crate::now_ms())],
                )
                .await
                .map_err(|e| self.pg(e))?;
            if fresh == 1 {
                tx.batch_execute(sql).await.map_err(|e| self.pg(e))?;
                tx.commit().await.map_err(|e| self.pg(e))?;
                tracing::info!(version, target = %self.target, "applied a schema migration");
            }
        }
        Ok(())
    }

    /// See [`super::Store::start_seq`].
    pub async fn start_seq(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "INSERT INTO np_meta (key, value) VALUES ('run', 1)
                 ON CONFLICT (key) DO UPDATE SET value = np_meta.value + 1 RETURNING value",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let run: i64 = row.get(0);
        if !(1..1 << (63 - RUN_SHIFT)).contains(&run) {
            return Err(self.err(format_args!("run number {run} is out of range")));
        }
        self.run.store(run as u64, std::sync::atomic::Ordering::Relaxed);
        Ok((run as u64) << RUN_SHIFT)
    }

    /// A write that writes nothing.
    pub async fn nothing(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// An enrolled identity.
    pub async fn identity(&self, name: &Name) -> Result<Option<IdentityInfo>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT info FROM np_identities WHERE name = $1", &[&name.as_str()])
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| dec("identity", r.get(0))).transpose()
    }

    /// Stores a new one-time code for `name`.
    pub async fn issue_code(&self, name: &Name, secret: &[u8; 16], expires_ms: u64) -> Result<(), StoreError> {
        if self.identity(name).await?.is_some() {
            return Err(StoreError::NameTaken(name.clone()));
        }
        let c = self.client().await?;
        c.execute(
            "INSERT INTO np_codes (hash, name, expires_ms, used) VALUES ($1, $2, $3, FALSE)
             ON CONFLICT (hash) DO UPDATE SET name = EXCLUDED.name, expires_ms = EXCLUDED.expires_ms, used = FALSE",
            &[&&EnrolCode::secret_hash(secret)[..], &name.as_str(), &big(expires_ms)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// Consumes a code and enrols `name`, in one transaction. The code's row is locked first,
    /// so of two nodes redeeming it at once the second waits, then sees it used.
    pub async fn enroll(
        &self,
        secret: &[u8; 16],
        name: &Name,
        keys: &PublicKeys,
        now_ms: u64,
    ) -> Result<IdentityInfo, StoreError> {
        let hash = EnrolCode::secret_hash(secret);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.pg(e))?;
        let row = tx
            .query_opt("SELECT name, expires_ms, used FROM np_codes WHERE hash = $1 FOR UPDATE", &[&&hash[..]])
            .await
            .map_err(|e| self.pg(e))?
            .ok_or(StoreError::BadCode)?;
        let (code_name, expires, used): (&str, i64, bool) = (row.get(0), row.get(1), row.get(2));
        if used {
            return Err(StoreError::CodeUsed);
        }
        if big(now_ms) > expires {
            return Err(StoreError::CodeExpired);
        }
        if code_name != name.as_str() {
            let other = code_name.parse().map_err(|_| StoreError::Corrupt("code".into()))?;
            return Err(StoreError::CodeForOtherName(other));
        }
        let info = IdentityInfo { name: name.clone(), keys: *keys, enrolled_ms: now_ms };
        let added = tx
            .execute(
                "INSERT INTO np_identities (name, info) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name.as_str(), &enc(&info)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if added == 0 {
            return Err(StoreError::NameTaken(name.clone()));
        }
        // The used code stays as a tombstone, so a second attempt is told "already used".
        tx.execute("UPDATE np_codes SET used = TRUE WHERE hash = $1", &[&&hash[..]]).await.map_err(|e| self.pg(e))?;
        tx.commit().await.map_err(|e| self.pg(e))?;
        Ok(info)
    }

    /// Stores or replaces a record (the caller has checked its signature).
    pub async fn put_record(&self, rec: &Record) -> Result<(), StoreError> {
        let owner = rec.owner.as_str();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.pg(e))?;
        let exists = tx
            .query_opt("SELECT 1 FROM np_records WHERE owner = $1 AND key = $2", &[&owner, &rec.key.as_str()])
            .await
            .map_err(|e| self.pg(e))?
            .is_some();
        if !exists {
            let n: i64 = tx
                .query_one("SELECT count(*) FROM np_records WHERE owner = $1", &[&owner])
                .await
                .map_err(|e| self.pg(e))?
                .get(0);
            if n as usize >= MAX_RECORDS_PER_OWNER {
                return Err(StoreError::Limit(format!("{owner} has {n} records, the most allowed")));
            }
        }
        tx.execute(
            "INSERT INTO np_records (owner, key, rec) VALUES ($1, $2, $3)
             ON CONFLICT (owner, key) DO UPDATE SET rec = EXCLUDED.rec",
            &[&owner, &rec.key.as_str(), &enc(rec)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        tx.commit().await.map_err(|e| self.pg(e))
    }

    /// See [`super::Store::revoke`].
    pub async fn revoke(&self, name: &Name) -> Result<bool, StoreError> {
        let n = name.as_str();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.pg(e))?;
        let existed = tx.execute("DELETE FROM np_identities WHERE name = $1", &[&n]).await.map_err(|e| self.pg(e))? > 0;
        for sql in [
            "DELETE FROM np_records WHERE owner = $1",
            "DELETE FROM np_queue WHERE recipient = $1 OR sender = $1",
            "DELETE FROM np_relays WHERE name = $1",
        ] {
            tx.execute(sql, &[&n]).await.map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        Ok(existed)
    }

    /// One record.
    pub async fn record(&self, owner: &Name, key: &str) -> Result<Option<Record>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT rec FROM np_records WHERE owner = $1 AND key = $2", &[&owner.as_str(), &key])
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| dec("record", r.get(0))).transpose()
    }

    /// Records with keys starting `prefix` that `reader` may read.
    pub async fn records_for(&self, reader: &Name, prefix: &str, max: usize) -> Result<Vec<Record>, StoreError> {
        let c = self.client().await?;
        // substr rather than LIKE, whose wildcards a prefix could contain.
        let rows = c
            .query("SELECT rec FROM np_records WHERE substr(key, 1, length($1)) = $1 ORDER BY owner, key", &[&prefix])
            .await
            .map_err(|e| self.pg(e))?;
        let mut out = Vec::new();
        for r in rows {
            let rec: Record = dec("record", r.get(0))?;
            if &rec.owner == reader || rec.readers.contains(reader) {
                out.push(rec);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Notifications queued for `to`: (from `from`, in all).
    pub async fn queued_for(&self, to: &Name, from: &Name) -> Result<(u32, u32), StoreError> {
        let c = self.client().await?;
        self.counts(&**c, to.as_str(), from.as_str()).await
    }

    async fn counts(
        &self,
        c: &impl tokio_postgres::GenericClient,
        to: &str,
        from: &str,
    ) -> Result<(u32, u32), StoreError> {
        let row = c
            .query_one(
                "SELECT count(CASE WHEN sender = $2 THEN 1 END), count(*) FROM np_queue WHERE recipient = $1",
                &[&to, &from],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let (mine, total): (i64, i64) = (row.get(0), row.get(1));
        Ok((u32::try_from(mine).unwrap_or(u32::MAX), u32::try_from(total).unwrap_or(u32::MAX)))
    }

    /// Whether one more notification from `from` to `to` fits.
    pub async fn admit(&self, to: &Name, from: &Name) -> Result<(), StoreError> {
        let (mine, total) = self.queued_for(to, from).await?;
        admit_check(to.as_str(), mine, total, self.quota)
    }

    /// Queues an envelope under `seq`, within the recipient's quota (counted in the same
    /// transaction).
    pub async fn enqueue_at(&self, seq: u64, envelope: &Envelope, expires_ms: u64) -> Result<(), StoreError> {
        let (to, from) = (envelope.to.as_str(), envelope.from.as_str());
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.pg(e))?;
        let (mine, total) = self.counts(&*tx, to, from).await?;
        admit_check(to, mine, total, self.quota)?;
        tx.execute(
            "INSERT INTO np_queue (recipient, seq, sender, expires_ms, envelope) VALUES ($1, $2, $3, $4, $5)",
            &[&to, &big(seq), &from, &big(expires_ms), &enc(envelope)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        if self.wakes {
            // Sent at the commit, and only if it commits: the node that holds the recipient
            // reads the queue as soon as the notification is there to read.
            let wake = format!("{} {to} {}", self.run.load(std::sync::atomic::Ordering::Relaxed), crate::now_ms());
            tx.execute("SELECT pg_notify($1, $2)", &[&WAKE_CHANNEL, &wake]).await.map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))
    }

    /// One page of `to`'s backlog after `after` (see [`super::Store::pending_page`]).
    pub async fn pending_page(
        &self,
        to: &Name,
        after: Option<u64>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let after = match after {
            None => -1,
            Some(a) => match i64::try_from(a) {
                Ok(a) => a,
                Err(_) => return Ok(Page { items: Vec::new(), next: None }),
            },
        };
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT seq, envelope FROM np_queue WHERE recipient = $1 AND seq > $2 AND expires_ms >= $3
                 ORDER BY seq LIMIT $4",
                &[&to.as_str(), &after, &big(now_ms), &(limit.max(1) as i64)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let full = rows.len() >= limit.max(1);
        let mut items = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for r in rows {
            let seq: i64 = r.get(0);
            let envelope: Envelope = dec("queue", r.get(1))?;
            bytes += envelope.noise.len();
            items.push((seq as u64, envelope));
            if bytes >= PAGE_BYTES {
                break;
            }
        }
        let next = if full || bytes >= PAGE_BYTES { items.last().map(|i| i.0) } else { None };
        Ok(Page { items, next })
    }

    /// Deletes delivered notifications, in one transaction; returns how many were there.
    pub async fn ack_many(&self, to: &Name, seqs: &[u64]) -> Result<usize, StoreError> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|s| i64::try_from(*s).ok()).collect();
        let c = self.client().await?;
        let n = c
            .execute("DELETE FROM np_queue WHERE recipient = $1 AND seq = ANY($2)", &[&to.as_str(), &seqs])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(n as usize)
    }

    /// Deletes expired notifications (up to a batch); returns how many.
    pub async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM np_queue WHERE (recipient, seq) IN
                 (SELECT recipient, seq FROM np_queue WHERE expires_ms < $1 LIMIT $2)",
                &[&big(now_ms), &SWEEP_BATCH],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(n as usize)
    }

    /// Notifications stored, expired or not.
    pub async fn queued_count(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c.query_one("SELECT count(*) FROM np_queue", &[]).await.map_err(|e| self.pg(e))?.get(0);
        Ok(n as u64)
    }

    fn node(&self) -> i64 {
        self.run.load(std::sync::atomic::Ordering::Relaxed) as i64
    }

    /// This node holds `owner`'s record `key` (a connection of the owner holds it here).
    pub async fn presence_hold(&self, owner: &Name, key: &str, now_ms: u64) -> Result<(), StoreError> {
        let lease = big(now_ms).saturating_add(PRESENCE_LEASE.as_millis() as i64);
        let c = self.client().await?;
        c.execute(
            "INSERT INTO np_presence (owner, key, node, since_ms, lease_ms, live) VALUES ($1, $2, $3, $4, $5, TRUE)
             ON CONFLICT (owner, key, node) DO UPDATE SET since_ms = EXCLUDED.since_ms, lease_ms = EXCLUDED.lease_ms, live = TRUE",
            &[&owner.as_str(), &key, &self.node(), &big(now_ms), &lease],
        )
        .await
        .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// No connection on this node holds the record any more: gone as of `now_ms`.
    pub async fn presence_release(&self, owner: &Name, key: &str, now_ms: u64) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE np_presence SET live = FALSE, lease_ms = $4 WHERE owner = $1 AND key = $2 AND node = $3",
            &[&owner.as_str(), &key, &self.node(), &big(now_ms)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        // Only the newest released keys of an identity are kept: one holding and releasing ever
        // new keys would otherwise grow the table for as long as released rows are kept.
        c.execute(
            "DELETE FROM np_presence WHERE owner = $1 AND node = $2 AND NOT live AND (lease_ms, key) < (
                 SELECT lease_ms, key FROM np_presence WHERE owner = $1 AND node = $2 AND NOT live
                 ORDER BY lease_ms DESC, key DESC LIMIT 1 OFFSET $3)",
            &[&owner.as_str(), &self.node(), &(MAX_RELEASED_PER_OWNER - 1)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// Extends the lease of everything this node holds, and forgets presence long gone.
    pub async fn presence_renew(&self, now_ms: u64) -> Result<(), StoreError> {
        let lease = big(now_ms).saturating_add(PRESENCE_LEASE.as_millis() as i64);
        let c = self.client().await?;
        c.execute("UPDATE np_presence SET lease_ms = $2 WHERE node = $1 AND live", &[&self.node(), &lease])
            .await
            .map_err(|e| self.pg(e))?;
        c.execute("DELETE FROM np_presence WHERE lease_ms < $1", &[&big(now_ms).saturating_sub(PRESENCE_KEEP_MS)])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// What other nodes say of these records: live (a lease not expired) since when, or gone at
    /// when (released, or the lease ran out).
    pub async fn presence_elsewhere(
        &self,
        keys: &[(Name, String)],
        now_ms: u64,
    ) -> Result<std::collections::HashMap<(Name, String), np_control_proto::Presence>, StoreError> {
        use np_control_proto::Presence;
        let mut out: std::collections::HashMap<(Name, String), Presence> = Default::default();
        if keys.is_empty() {
            return Ok(out);
        }
        let owners: Vec<&str> = keys.iter().map(|(o, _)| o.as_str()).collect();
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT owner, key, since_ms, lease_ms, live FROM np_presence WHERE node <> $1 AND owner = ANY($2)",
                &[&self.node(), &owners],
            )
            .await
            .map_err(|e| self.pg(e))?;
        for r in rows {
            let (Ok(owner), key) = (r.get::<_, &str>(0).parse::<Name>(), r.get::<_, &str>(1).to_string()) else {
                continue;
            };
            let k = (owner, key);
            if !keys.contains(&k) {
                continue;
            }
            let (since, lease, live): (i64, i64, bool) = (r.get(2), r.get(3), r.get(4));
            let this = if live && lease >= big(now_ms) {
                Presence::Connected { since_ms: since.max(0) as u64 }
            } else {
                Presence::Disconnected { at_ms: lease.max(0) as u64 }
            };
            let merged = match (out.remove(&k), this) {
                (None, p) => p,
                (Some(a), b) => crate::presence::either(a, b),
            };
            out.insert(k, merged);
        }
        Ok(out)
    }

    /// Adds an enrolled identity to the relay list.
    pub async fn relay_add(&self, name: &Name, now_ms: u64) -> Result<(), StoreError> {
        if self.identity(name).await?.is_none() {
            return Err(StoreError::Limit(format!(
                "{name} is not enrolled: enrol the relay's identity first (`np-control enroll {name}`)"
            )));
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.pg(e))?;
        let present = tx
            .query_opt("SELECT 1 FROM np_relays WHERE name = $1", &[&name.as_str()])
            .await
            .map_err(|e| self.pg(e))?
            .is_some();
        if present {
            return Ok(());
        }
        let n: i64 = tx.query_one("SELECT count(*) FROM np_relays", &[]).await.map_err(|e| self.pg(e))?.get(0);
        if n as usize >= MAX_RELAYS {
            return Err(StoreError::Limit(format!("the relay list holds {MAX_RELAYS} relays, the most allowed")));
        }
        tx.execute(
            "INSERT INTO np_relays (name, added_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name.as_str(), &big(now_ms)],
        )
        .await
        .map_err(|e| self.pg(e))?;
        tx.commit().await.map_err(|e| self.pg(e))
    }

    /// Removes a relay from the list. Returns whether it was there.
    pub async fn relay_remove(&self, name: &Name) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c.execute("DELETE FROM np_relays WHERE name = $1", &[&name.as_str()]).await.map_err(|e| self.pg(e))?;
        Ok(n > 0)
    }

    /// The relay list, by name.
    pub async fn relays(&self) -> Result<Vec<Name>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT name FROM np_relays ORDER BY name", &[]).await.map_err(|e| self.pg(e))?;
        rows.iter().map(|r| r.get::<_, &str>(0).parse().map_err(|_| StoreError::Corrupt("relays".into()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bounded(url: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::from_str(url).expect("parses");
        bound(&mut cfg);
        cfg
    }

    #[test]
    fn every_wait_is_bounded_unless_the_url_says() {
        let cfg = bounded("postgres://np@a:5432,b:5433/np?target_session_attrs=read-write");
        assert_eq!(cfg.get_hosts().len(), 2);
        assert_eq!(cfg.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        assert_eq!(cfg.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(cfg.get_options(), Some("-c statement_timeout=10000"));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(cfg.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(describe(&cfg), "a:5432,b:5433/np");

        let cfg = bounded(
            "postgres://np@a/np?connect_timeout=2&options=-c%20search_path%3Dnp&tcp_user_timeout=3&keepalives_idle=60",
        );
        assert_eq!(cfg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(cfg.get_options(), Some("-c search_path=np -c statement_timeout=10000"));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(60));

        let cfg = bounded("postgres://np@a/np?options=-c%20statement_timeout%3D500");
        assert_eq!(cfg.get_options(), Some("-c statement_timeout=500"), "the URL's own is kept");
    }
}
