//! The control plane's database behind one interface, in one of two stores:
//! - embedded ([`RedbStore`], the default): one redb file in the data directory, so one command
//!   runs everything;
//! - PostgreSQL ([`PgStore`], `--store postgres://…`): a database that several nodes can share,
//!   and that people already run highly available.
//!
//! Both keep the same promises, checked by one test suite run against each: every write is one
//! durable transaction, an enrolment code is used once however many redeem it at once, a name is
//! never enrolled twice, and nothing acknowledged is lost.
//!
//! Reads are `async fn`s. Writes are submitted the moment the method is called, to one ordered
//! lane per store (see `lane`), and the returned [`Write`] yields the result once the write is
//! durable: submitting before awaiting is what lets the server push a notification while its
//! commit is still on its way, and still apply the recipient's acknowledgement after it.

mod embedded;
mod embedded_relays;
mod pg;
mod pg_wake;

pub use embedded::RedbStore;
pub use pg::{PgStats, PgStore, PoolUse, MAX_RELEASED_PER_OWNER, PRESENCE_LEASE, STORE_BUCKETS};
pub use pg_wake::Wake;

use crate::lane::{AsyncLane, WriteLane};
use np_control_proto::{IdentityInfo, Record};
use np_identity::{Envelope, Name, PublicKeys};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// Most records one identity may hold.
pub const MAX_RECORDS_PER_OWNER: usize = 256;
/// Most relays on the list: it is sent whole to every device that asks.
pub const MAX_RELAYS: usize = 64;
/// Default for [`Quota::per_sender`].
pub const MAX_QUEUED_PER_SENDER: u32 = 5_000;
/// Default for [`Quota::per_recipient`].
pub const MAX_QUEUED_PER_RECIPIENT: u32 = 20_000;
/// A sender with fewer than this many notifications queued for a recipient is accepted even when
/// the recipient's total is at its cap: a few identities filling their shares must not lock out
/// everyone else. The total is then bounded by the cap plus this much per enrolled identity
/// (enrolment takes an operator's code, so that number is the operator's).
pub const RESERVED_PER_SENDER: u32 = 16;
/// Payload bytes after which a page of the backlog ends (it holds at least one notification).
pub const PAGE_BYTES: usize = 512 * 1024;

/// How many notifications may wait for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// From any one sender: one sender filling its share leaves the recipient reachable by all
    /// others.
    pub per_sender: u32,
    /// From all senders together, so one absent identity cannot fill the disk (see
    /// [`RESERVED_PER_SENDER`]).
    pub per_recipient: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Quota { per_sender: MAX_QUEUED_PER_SENDER, per_recipient: MAX_QUEUED_PER_RECIPIENT }
    }
}

/// Whether one more notification for `to` fits, given `mine` already queued from its sender and
/// `total` in all; the refusal names only the sender's own share unless the total is what is full.
pub(crate) fn admit_check(to: &str, mine: u32, total: u32, q: Quota) -> Result<(), StoreError> {
    if mine >= q.per_sender {
        return Err(StoreError::Quota(format!(
            "{to} already has {mine} notifications from you waiting, the most one sender may queue for it; \
             they are delivered when it connects (or dropped when they expire)"
        )));
    }
    if total >= q.per_recipient && mine >= RESERVED_PER_SENDER {
        return Err(StoreError::Quota(format!(
            "{to} has {total} notifications waiting, the most it may hold; try again once it has caught up"
        )));
    }
    Ok(())
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("database: {0}")]
    Redb(#[from] redb::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("PostgreSQL store {0}")]
    Postgres(String),
    /// Another process holds the database open.
    #[error("the database in {0} is in use by another process (is np-control already running?)")]
    InUse(String),
    /// A stored value does not decode.
    #[error("stored value under {0} is damaged")]
    Corrupt(String),
    /// The writer of the store stopped (its task or thread ended), so the write's outcome is unknown.
    #[error("the database writer stopped")]
    WriterGone,
    /// The code is unknown.
    #[error("unknown enrolment code: check that it was copied whole")]
    BadCode,
    /// The code was used before.
    #[error("this enrolment code was already used; ask the operator for a new one")]
    CodeUsed,
    /// The code expired.
    #[error("this enrolment code expired; ask the operator for a new one")]
    CodeExpired,
    /// The code was issued for another name.
    #[error("this enrolment code was issued for {0}, not for the name given")]
    CodeForOtherName(Name),
    /// The name is enrolled already.
    #[error("{0} is already enrolled")]
    NameTaken(Name),
    /// A per-identity limit was reached.
    #[error("{0}")]
    Limit(String),
    /// The recipient holds as many queued notifications from this sender (or in all) as allowed.
    #[error("{0}")]
    Quota(String),
}

/// One page of a recipient's backlog.
#[derive(Debug)]
pub struct Page {
    /// (sequence number, envelope), oldest first.
    pub items: Vec<(u64, Envelope)>,
    /// Where the next page starts (pass as `after`); `None` at the end of the queue.
    pub next: Option<u64>,
}

/// Where the data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A redb file.
    Embedded(PathBuf),
    /// A PostgreSQL connection string (`postgres://…`).
    Postgres(String),
}

impl Location {
    /// The `--store` setting: `redb` (or nothing) for the file `default_file`, or a
    /// `postgres://` / `postgresql://` URL.
    pub fn parse(setting: Option<&str>, default_file: PathBuf) -> Result<Self, StoreError> {
        match setting.map(str::trim) {
            None | Some("") | Some("redb") => Ok(Location::Embedded(default_file)),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                Ok(Location::Postgres(s.to_string()))
            }
            Some(_) => Err(StoreError::Limit(
                "--store takes `redb` (the default: a file in the data directory) or a postgres:// URL".into(),
            )),
        }
    }
}

/// A write's result, once it is durable (see the module's note).
pub struct Write<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> Future for Write<T> {
    type Output = Result<T, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(StoreError::WriterGone)))
    }
}

enum Kind {
    Embedded { db: Arc<RedbStore>, lane: WriteLane },
    Pg { db: Arc<PgStore>, lane: AsyncLane, queued: Arc<AtomicU64> },
}

/// The database, whichever store holds it.
pub struct Store {
    kind: Kind,
}

/// Runs `$body` on the store named `$s`: on a blocking thread for redb (its reads may wait for
/// the disk), as a future for PostgreSQL. Arguments the body uses must be owned.
macro_rules! read {
    ($self:ident, |$s:ident| $body:expr) => {
        match &$self.kind {
            Kind::Embedded { db, .. } => {
                let $s = db.clone();
                match tokio::task::spawn_blocking(move || {
                    let $s = &*$s;
                    $body
                })
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::WriterGone),
                }
            }
            Kind::Pg { db, .. } => {
                let $s = &**db;
                $s.bounded($body).await
            }
        }
    };
}

/// Submits `$body` to the store's ordered write lane now; see [`Write`].
macro_rules! write {
    ($self:ident, |$s:ident| $body:expr) => {
        match &$self.kind {
            Kind::Embedded { lane, .. } => Write(lane.submit(move |$s: &RedbStore| $body)),
            Kind::Pg { db, lane, .. } => {
                let $s = db.clone();
                Write(lane.submit(async move {
                    let $s = &*$s;
                    $s.bounded($body).await
                }))
            }
        }
    };
}

impl Store {
    /// Opens the store (creating its tables, or migrating its schema, as needed), with the
    /// given queue limits. A PostgreSQL store that cannot be reached is an error naming it, and
    /// nothing has been written anywhere.
    pub async fn open(at: &Location, quota: Quota) -> Result<Self, StoreError> {
        let kind = match at {
            Location::Embedded(path) => {
                let path = path.clone();
                let db = tokio::task::spawn_blocking(move || RedbStore::open(&path))
                    .await
                    .map_err(|_| StoreError::WriterGone)??
                    .with_quota(quota);
                let db = Arc::new(db);
                let lane = WriteLane::start(db.clone())
                    .map_err(|e| StoreError::Limit(format!("starting the database writer: {e}")))?;
                Kind::Embedded { db, lane }
            }
            Location::Postgres(url) => {
                let db = Arc::new(PgStore::connect(url, quota).await?);
                let queued = Arc::new(AtomicU64::new(db.queued_count().await?));
                Kind::Pg { db, lane: AsyncLane::start(), queued }
            }
        };
        Ok(Store { kind })
    }

    /// Which store this is, for the operator ("redb /path", "PostgreSQL host:port/db").
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Embedded { db, .. } => format!("redb {}", db.path().display()),
            Kind::Pg { db, .. } => format!("PostgreSQL {}", db.target()),
        }
    }

    /// The store's kind, for anyone who asks (`np doctor`): `redb` or `PostgreSQL`, never
    /// where it is.
    pub fn kind(&self) -> &'static str {
        match &self.kind {
            Kind::Embedded { .. } => "redb",
            Kind::Pg { .. } => "PostgreSQL",
        }
    }

    /// Whether the store answers now (a shared database within `limit`; the embedded file
    /// whenever it can be read).
    pub async fn answers(&self, limit: std::time::Duration) -> bool {
        match &self.kind {
            Kind::Embedded { db, .. } => db.queued_count().is_ok(),
            Kind::Pg { db, .. } => db.answers(limit).await,
        }
    }

    /// The PostgreSQL store's measurements and pool (`None` for redb).
    pub fn pg(&self) -> Option<&PgStore> {
        match &self.kind {
            Kind::Pg { db, .. } => Some(db),
            Kind::Embedded { .. } => None,
        }
    }

    /// An enrolled identity.
    pub async fn identity(&self, name: &Name) -> Result<Option<IdentityInfo>, StoreError> {
        let name = name.clone();
        read!(self, |s| s.identity(&name))
    }

    /// One record.
    pub async fn record(&self, owner: &Name, key: &str) -> Result<Option<Record>, StoreError> {
        let (owner, key) = (owner.clone(), key.to_string());
        read!(self, |s| s.record(&owner, &key))
    }

    /// Records with keys starting `prefix` that `reader` may read and is named in (or owns).
    pub async fn records_for(&self, reader: &Name, prefix: &str, max: usize) -> Result<Vec<Record>, StoreError> {
        let (reader, prefix) = (reader.clone(), prefix.to_string());
        read!(self, |s| s.records_for(&reader, &prefix, max))
    }

    /// Up to `limit` unexpired notifications for `to` after `after`, oldest first: one page of
    /// a backlog (about [`PAGE_BYTES`] at most).
    pub async fn pending_page(
        &self,
        to: &Name,
        after: Option<u64>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let to = to.clone();
        read!(self, |s| s.pending_page(&to, after, now_ms, limit))
    }

    /// Every unexpired notification waiting for `to` (for tests).
    pub async fn pending(&self, to: &Name, now_ms: u64) -> Result<Vec<(u64, Envelope)>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.pending_page(to, after, now_ms, 1024).await?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// The relay list, by name.
    pub async fn relays(&self) -> Result<Vec<Name>, StoreError> {
        read!(self, |s| s.relays())
    }

    /// Notifications queued for `to`: (from `from`, in all).
    pub async fn queued_for(&self, to: &Name, from: &Name) -> Result<(u32, u32), StoreError> {
        match &self.kind {
            Kind::Embedded { db, .. } => Ok(db.queued_for(to, from)),
            Kind::Pg { db, .. } => db.bounded(db.queued_for(to, from)).await,
        }
    }

    /// Whether a notification from `from` to `to` would be accepted now: checked before a live
    /// push, so a sender over its share is refused before the recipient sees anything (the
    /// write checks again).
    pub async fn admit(&self, to: &Name, from: &Name) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Embedded { db, .. } => db.admit(to, from),
            Kind::Pg { db, .. } => db.bounded(db.admit(to, from)).await,
        }
    }

    /// Notifications stored, expired or not.
    pub async fn queued_count(&self) -> Result<u64, StoreError> {
        read!(self, |s| s.queued_count())
    }

    /// The queue's depth for the metrics gauge, which cannot wait: read at once from redb, or
    /// the value the last sweep saw in PostgreSQL.
    pub fn queued_gauge(&self) -> Option<u64> {
        match &self.kind {
            Kind::Embedded { db, .. } => db.queued_count().ok(),
            Kind::Pg { queued, .. } => Some(queued.load(Ordering::Relaxed)),
        }
    }

    /// The first notification sequence number this run may hand out: above, and apart from,
    /// every number any other run (or, on PostgreSQL, any other node) hands out.
    pub async fn start_seq(&self) -> Result<u64, StoreError> {
        write!(self, |s| s.start_seq()).await
    }

    /// Stores a new one-time code for `name`, valid until `expires_ms`.
    pub fn issue_code(&self, name: &Name, secret: [u8; 16], expires_ms: u64) -> Write<()> {
        let name = name.clone();
        write!(self, |s| s.issue_code(&name, &secret, expires_ms))
    }

    /// Consumes a code and enrols `name` with `keys`, in one transaction.
    pub fn enroll(&self, secret: [u8; 16], name: &Name, keys: PublicKeys, now_ms: u64) -> Write<IdentityInfo> {
        let name = name.clone();
        write!(self, |s| s.enroll(&secret, &name, &keys, now_ms))
    }

    /// Stores or replaces a record (the caller has checked its signature).
    pub fn put_record(&self, rec: Record) -> Write<()> {
        write!(self, |s| s.put_record(&rec))
    }

    /// Removes an identity with its records, its queued notifications (to it and from it) and
    /// its place on the relay list. Returns whether it was enrolled.
    pub fn revoke(&self, name: &Name) -> Write<bool> {
        let name = name.clone();
        write!(self, |s| s.revoke(&name))
    }

    /// Adds an enrolled identity to the relay list.
    pub fn relay_add(&self, name: &Name, now_ms: u64) -> Write<()> {
        let name = name.clone();
        write!(self, |s| s.relay_add(&name, now_ms))
    }

    /// Removes a relay from the list. Returns whether it was there.
    pub fn relay_remove(&self, name: &Name) -> Write<bool> {
        let name = name.clone();
        write!(self, |s| s.relay_remove(&name))
    }

    /// Queues an envelope for its recipient under `seq`, within the recipient's [`Quota`].
    pub fn enqueue_at(&self, seq: u64, envelope: Envelope, expires_ms: u64) -> Write<()> {
        write!(self, |s| s.enqueue_at(seq, &envelope, expires_ms))
    }

    /// Deletes delivered notifications, in one transaction; returns how many were there.
    pub fn ack_many(&self, to: &Name, seqs: Vec<u64>) -> Write<usize> {
        let to = to.clone();
        write!(self, |s| s.ack_many(&to, &seqs))
    }

    /// Deletes expired notifications (a bounded batch); returns how many.
    pub async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let n = write!(self, |s| s.sweep(now_ms)).await?;
        if let Kind::Pg { db, queued, .. } = &self.kind {
            queued.store(db.bounded(db.queued_count()).await?, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Wake-ups from other nodes sharing the database (PostgreSQL only): a notification for
    /// the recipient named was stored by another node. `None` for a store no other node shares.
    pub fn wakes(&self) -> Option<tokio::sync::mpsc::Receiver<Wake>> {
        match &self.kind {
            Kind::Pg { db, .. } if db.wakes => Some(pg_wake::listen(db.clone())),
            _ => None,
        }
    }

    /// Records that this node holds `owner`'s record `key`, for the other nodes (nothing to do
    /// when no other node shares the store).
    pub async fn presence_hold(&self, owner: &Name, key: &str, now_ms: u64) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Pg { db, .. } => db.bounded(db.presence_hold(owner, key, now_ms)).await,
            Kind::Embedded { .. } => Ok(()),
        }
    }

    /// Records that no connection on this node holds it any more.
    pub async fn presence_release(&self, owner: &Name, key: &str, now_ms: u64) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Pg { db, .. } => db.bounded(db.presence_release(owner, key, now_ms)).await,
            Kind::Embedded { .. } => Ok(()),
        }
    }

    /// Extends this node's presence leases (PostgreSQL; call more often than
    /// [`PRESENCE_LEASE`]).
    pub async fn presence_renew(&self, now_ms: u64) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Pg { db, .. } => db.bounded(db.presence_renew(now_ms)).await,
            Kind::Embedded { .. } => Ok(()),
        }
    }

    /// Whether other nodes may hold connections (and so presence) of this store's identities.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Pg { .. })
    }

    /// What the other nodes sharing the store say of these records' presence (none for redb).
    pub async fn presence_elsewhere(
        &self,
        keys: &[(Name, String)],
        now_ms: u64,
    ) -> Result<std::collections::HashMap<(Name, String), np_control_proto::Presence>, StoreError> {
        match &self.kind {
            Kind::Pg { db, .. } => db.bounded(db.presence_elsewhere(keys, now_ms)).await,
            Kind::Embedded { .. } => Ok(Default::default()),
        }
    }

    /// Resolves once every write submitted before it is done.
    pub fn barrier(&self) -> Write<()> {
        write!(self, |s| s.nothing())
    }
}
