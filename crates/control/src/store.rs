//! The control plane's embedded database (redb): identities, enrolment codes, records and the
//! notification queue. Every write is one durable transaction, so a SIGKILL loses nothing that
//! was acknowledged and leaves nothing half-written.

use np_control_proto::{EnrolCode, IdentityInfo, Record};
use np_identity::{Envelope, Name, PublicKeys};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");
const CODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("codes");
const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (expires_ms, recipient, seq) of every queued notification: the sweeper finds the expired ones
/// by a range, instead of reading (and decoding) the whole queue every few seconds, which with a
/// queue of 100 MB held every write up for seconds.
const EXPIRY: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("queue_expiry");
/// Set in META once EXPIRY covers the queue (databases from before it are indexed at open).
const EXPIRY_INDEXED: &str = "expiry_indexed";
/// Most expired notifications one sweep deletes (the next sweep continues).
const SWEEP_BATCH: usize = 10_000;

/// Most records one identity may hold.
pub const MAX_RECORDS_PER_OWNER: usize = 256;
/// How far each start jumps the notification sequence (more than one run could ever hand out
/// between two commits).
const SEQ_GAP: u64 = 1 << 20;
thread_local! {
    /// Inside [`Store::group`] on this thread.
    static GROUPED: Cell<bool> = const { Cell::new(false) };
}

/// Memory redb may use to cache pages (its default is 1 GiB): a large database, or a large
/// backlog streamed out of it, must not become as large a process.
const DB_CACHE: usize = 8 * 1024 * 1024;
/// Default for [`Quota::per_sender`].
pub const MAX_QUEUED_PER_SENDER: u32 = 5_000;
/// Default for [`Quota::per_recipient`].
pub const MAX_QUEUED_PER_RECIPIENT: u32 = 20_000;
/// A sender with fewer than this many notifications queued for a recipient is accepted even when
/// the recipient's total is at its cap: a few identities filling their shares must not lock out
/// everyone else. The total is then bounded by the cap plus this much per enrolled identity
/// (enrolment takes an operator's code, so that number is the operator's).
pub const RESERVED_PER_SENDER: u32 = 16;

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

/// Queued notifications per recipient, in all and by sender. Kept in memory (rebuilt from the
/// queue when the database is opened) so that admitting a notification costs a map lookup rather
/// than a count of the recipient's whole queue. Changed only together with the queue, under its
/// lock, which every queue write takes *before* its write transaction (one order, no deadlock).
#[derive(Default)]
struct Counts {
    by_recipient: HashMap<String, RecipientCounts>,
}

#[derive(Default)]
struct RecipientCounts {
    total: u32,
    by_sender: HashMap<String, u32>,
}

impl Counts {
    fn add(&mut self, to: &str, from: &str) {
        let r = self.by_recipient.entry(to.to_string()).or_default();
        r.total += 1;
        *r.by_sender.entry(from.to_string()).or_default() += 1;
    }

    fn sub(&mut self, to: &str, from: &str) {
        let Some(r) = self.by_recipient.get_mut(to) else { return };
        r.total = r.total.saturating_sub(1);
        if let Some(n) = r.by_sender.get_mut(from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.by_sender.remove(from);
            }
        }
        if r.total == 0 {
            self.by_recipient.remove(to);
        }
    }

    fn of(&self, to: &str, from: &str) -> (u32, u32) {
        match self.by_recipient.get(to) {
            None => (0, 0),
            Some(r) => (r.by_sender.get(from).copied().unwrap_or(0), r.total),
        }
    }

    /// Whether one more from `from` fits; the refusal names only the sender's own share unless
    /// the total is what is full.
    fn admit(&self, to: &str, from: &str, q: Quota) -> Result<(), StoreError> {
        let (mine, total) = self.of(to, from);
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
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// Another process holds the database open.
    #[error("the database in {0} is in use by another process (is np-control already running?)")]
    InUse(String),
    /// A stored value does not decode.
    #[error("stored value under {0} is damaged")]
    Corrupt(String),
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

/// Payload bytes after which a page of the backlog ends (it holds at least one notification).
pub const PAGE_BYTES: usize = 512 * 1024;

/// One page of a recipient's backlog.
#[derive(Debug)]
pub struct Page {
    /// (sequence number, envelope), oldest first.
    pub items: Vec<(u64, Envelope)>,
    /// Where the next page starts (pass as `after`); `None` at the end of the queue.
    pub next: Option<u64>,
}

macro_rules! db {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(e.into()))
    };
}

#[derive(Serialize, Deserialize)]
struct CodeEntry {
    name: Name,
    expires_ms: u64,
    used: bool,
}

#[derive(Serialize, Deserialize)]
struct Queued {
    envelope: Envelope,
    expires_ms: u64,
}

/// The database.
pub struct Store {
    pub(crate) db: Database,
    quota: Quota,
    /// See [`Counts`]; also the lock that orders every write of the queue.
    counts: Mutex<Counts>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

fn dec<T: for<'a> Deserialize<'a>>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|_| StoreError::Corrupt(what.to_string()))
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = match redb::Builder::new().set_cache_size(DB_CACHE).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse(path.display().to_string())),
            Err(e) => return Err(StoreError::Db(e.into())),
        };
        let w = db!(db.begin_write())?;
        {
            db!(w.open_table(IDENTITIES))?;
            db!(w.open_table(CODES))?;
            db!(w.open_table(RECORDS))?;
            db!(w.open_table(QUEUE))?;
            let mut meta = db!(w.open_table(META))?;
            let mut x = db!(w.open_table(EXPIRY))?;
            if db!(meta.get(EXPIRY_INDEXED))?.is_none() {
                let q = db!(w.open_table(QUEUE))?;
                for e in db!(q.iter())? {
                    let (k, v) = db!(e)?;
                    if let Ok(item) = postcard::from_bytes::<Queued>(v.value()) {
                        let (to, seq) = k.value();
                        db!(x.insert((item.expires_ms, to, seq), ()))?;
                    }
                }
                db!(meta.insert(EXPIRY_INDEXED, 1))?;
            }
        }
        db!(w.commit())?;
        let store = Store { db, quota: Quota::default(), counts: Mutex::new(Counts::default()) };
        store.recount()?;
        Ok(store)
    }

    /// The same with other queue limits.
    pub fn with_quota(mut self, quota: Quota) -> Self {
        self.quota = quota;
        self
    }

    /// A write transaction: durable at its commit, unless this thread is inside
    /// [`Store::group`], whose end makes the whole group durable at once.
    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut w = db!(self.db.begin_write())?;
        if GROUPED.with(Cell::get) {
            db!(w.set_durability(redb::Durability::None))?;
        }
        Ok(w)
    }

    /// Runs `f`, whose writes commit without waiting for the disk, then makes them all durable
    /// with one commit that does: one fsync for a whole group of writes. Nothing of the group
    /// may be reported as done before this returns `Ok`.
    pub fn group<T>(&self, f: impl FnOnce(&Store) -> T) -> Result<T, StoreError> {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                GROUPED.with(|g| g.set(false));
            }
        }
        GROUPED.with(|g| g.set(true));
        let reset = Reset;
        let out = f(self);
        drop(reset);
        let w = db!(self.db.begin_write())?;
        db!(w.commit())?;
        Ok(out)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A panic while holding it cannot leave the counts half-changed (they change after the
        // commit, in plain arithmetic), so a poisoned lock is still good.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds [`Counts`] from the queue.
    fn recount(&self) -> Result<(), StoreError> {
        let mut counts = self.counts();
        *counts = Counts::default();
        let r = db!(self.db.begin_read())?;
        let q = db!(r.open_table(QUEUE))?;
        for e in db!(q.iter())? {
            let (k, v) = db!(e)?;
            // A damaged entry is counted under no sender, as `ack_many` and `sweep` remove it.
            let from = postcard::from_bytes::<Queued>(v.value()).map(|i| i.envelope.from.as_str().to_string());
            counts.add(k.value().0, &from.unwrap_or_default());
        }
        Ok(())
    }

    /// Whether a notification from `from` to `to` would be accepted now: checked before a live
    /// push, so a sender over its share is refused before the recipient sees anything.
    /// [`Store::enqueue_at`] checks again, under the queue's lock.
    pub fn admit(&self, to: &Name, from: &Name) -> Result<(), StoreError> {
        self.counts().admit(to.as_str(), from.as_str(), self.quota)
    }

    /// Notifications queued for `to`: (from `from`, in all).
    pub fn queued_for(&self, to: &Name, from: &Name) -> (u32, u32) {
        self.counts().of(to.as_str(), from.as_str())
    }

    /// Stores a new one-time code for `name`, valid until `expires_ms`.
    pub fn issue_code(&self, name: &Name, secret: &[u8; 16], expires_ms: u64) -> Result<(), StoreError> {
        if self.identity(name)?.is_some() {
            return Err(StoreError::NameTaken(name.clone()));
        }
        let w = self.begin_write()?;
        {
            let mut t = db!(w.open_table(CODES))?;
            let entry = CodeEntry { name: name.clone(), expires_ms, used: false };
            db!(t.insert(&EnrolCode::secret_hash(secret)[..], &enc(&entry)[..]))?;
        }
        db!(w.commit())
    }

    /// Consumes a code and enrols `name` with `keys`, in one transaction: either both happen or
    /// neither does.
    pub fn enroll(
        &self,
        secret: &[u8; 16],
        name: &Name,
        keys: &PublicKeys,
        now_ms: u64,
    ) -> Result<IdentityInfo, StoreError> {
        let hash = EnrolCode::secret_hash(secret);
        let w = self.begin_write()?;
        let info = {
            let mut codes = db!(w.open_table(CODES))?;
            let mut entry: CodeEntry = match db!(codes.get(&hash[..]))? {
                None => return Err(StoreError::BadCode),
                Some(v) => dec("code", v.value())?,
            };
            if entry.used {
                return Err(StoreError::CodeUsed);
            }
            if now_ms > entry.expires_ms {
                return Err(StoreError::CodeExpired);
            }
            if &entry.name != name {
                return Err(StoreError::CodeForOtherName(entry.name));
            }
            let mut ids = db!(w.open_table(IDENTITIES))?;
            if db!(ids.get(name.as_str()))?.is_some() {
                return Err(StoreError::NameTaken(name.clone()));
            }
            let info = IdentityInfo { name: name.clone(), keys: *keys, enrolled_ms: now_ms };
            db!(ids.insert(name.as_str(), &enc(&info)[..]))?;
            // Keep the used code as a tombstone so a second attempt is told "already used".
            entry.used = true;
            db!(codes.insert(&hash[..], &enc(&entry)[..]))?;
            info
        };
        db!(w.commit())?;
        Ok(info)
    }

    /// An enrolled identity.
    pub fn identity(&self, name: &Name) -> Result<Option<IdentityInfo>, StoreError> {
        let r = db!(self.db.begin_read())?;
        let t = db!(r.open_table(IDENTITIES))?;
        match db!(t.get(name.as_str()))? {
            None => Ok(None),
            Some(v) => dec("identity", v.value()).map(Some),
        }
    }

    /// Stores or replaces a record (the caller has checked its signature).
    pub fn put_record(&self, rec: &Record) -> Result<(), StoreError> {
        let w = self.begin_write()?;
        {
            let mut t = db!(w.open_table(RECORDS))?;
            let owner = rec.owner.as_str();
            let exists = db!(t.get((owner, rec.key.as_str())))?.is_some();
            if !exists {
                let n = db!(t.range((owner, "")..))?
                    .take_while(|e| e.as_ref().map(|(k, _)| k.value().0 == owner).unwrap_or(false))
                    .count();
                if n >= MAX_RECORDS_PER_OWNER {
                    return Err(StoreError::Limit(format!("{owner} has {n} records, the most allowed")));
                }
            }
            db!(t.insert((owner, rec.key.as_str()), &enc(rec)[..]))?;
        }
        db!(w.commit())
    }

    /// Removes an identity with its records, the notifications queued for it, and those it sent
    /// that still wait for others (a revoked identity's session requests must not reach a device
    /// after it is gone). Returns whether it existed.
    pub fn revoke(&self, name: &Name) -> Result<bool, StoreError> {
        let mut counts = self.counts();
        let n = name.as_str();
        // The recipients holding something from it, known without scanning the whole queue.
        let holders: Vec<String> = counts
            .by_recipient
            .iter()
            .filter(|(to, r)| to.as_str() != n && r.by_sender.contains_key(n))
            .map(|(to, _)| to.clone())
            .collect();
        let w = self.begin_write()?;
        let existed = {
            let mut ids = db!(w.open_table(IDENTITIES))?;
            let existed = db!(ids.remove(name.as_str()))?.is_some();
            let mut recs = db!(w.open_table(RECORDS))?;
            db!(recs.retain_in((n, "")..=(n, "\u{10ffff}"), |_, _| false))?;
            let mut q = db!(w.open_table(QUEUE))?;
            let mut x = db!(w.open_table(EXPIRY))?;
            // What waits for it, and what it sent that waits for others.
            let mut doomed: Vec<(String, u64)> = Vec::new();
            for e in db!(q.range((n, 0)..=(n, u64::MAX)))? {
                doomed.push((n.to_string(), db!(e)?.0.value().1));
            }
            for to in &holders {
                for e in db!(q.range((to.as_str(), 0)..=(to.as_str(), u64::MAX)))? {
                    let (k, v) = db!(e)?;
                    if postcard::from_bytes::<Queued>(v.value()).map_or(true, |i| i.envelope.from.as_str() == n) {
                        doomed.push((to.clone(), k.value().1));
                    }
                }
            }
            for (to, seq) in &doomed {
                remove_queued(&mut q, &mut x, to, *seq)?;
            }
            existed
        };
        db!(w.commit())?;
        counts.by_recipient.remove(n);
        for to in &holders {
            if let Some(r) = counts.by_recipient.get_mut(to) {
                let gone = r.by_sender.remove(n).unwrap_or(0);
                r.total = r.total.saturating_sub(gone);
                if r.total == 0 {
                    counts.by_recipient.remove(to);
                }
            }
        }
        Ok(existed)
    }

    /// One record.
    pub fn record(&self, owner: &Name, key: &str) -> Result<Option<Record>, StoreError> {
        let r = db!(self.db.begin_read())?;
        let t = db!(r.open_table(RECORDS))?;
        match db!(t.get((owner.as_str(), key)))? {
            None => Ok(None),
            Some(v) => dec("record", v.value()).map(Some),
        }
    }

    /// Records with keys starting `prefix` that `reader` may read and is named in (or owns).
    pub fn records_for(&self, reader: &Name, prefix: &str, max: usize) -> Result<Vec<Record>, StoreError> {
        let r = db!(self.db.begin_read())?;
        let t = db!(r.open_table(RECORDS))?;
        let mut out = Vec::new();
        for e in db!(t.iter())? {
            let (k, v) = db!(e)?;
            if !k.value().1.starts_with(prefix) {
                continue;
            }
            let rec: Record = dec("record", v.value())?;
            if &rec.owner == reader || rec.readers.contains(reader) {
                out.push(rec);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The first sequence number this run may hand out. It jumps ahead of anything a previous
    /// run could have handed out (pushed before its commit, then lost in a crash), so a
    /// recipient never sees one number used twice; the jump is persisted before it is used.
    pub fn start_seq(&self) -> Result<u64, StoreError> {
        let w = self.begin_write()?;
        let base = {
            let mut meta = db!(w.open_table(META))?;
            let next = db!(meta.get("next_seq"))?.map(|v| v.value()).unwrap_or(1);
            let base = next.saturating_add(SEQ_GAP);
            db!(meta.insert("next_seq", base))?;
            base
        };
        db!(w.commit())?;
        Ok(base)
    }

    /// Queues an envelope for its recipient under sequence number `seq`, within the recipient's
    /// [`Quota`].
    pub fn enqueue_at(&self, seq: u64, envelope: &Envelope, expires_ms: u64) -> Result<(), StoreError> {
        let mut counts = self.counts();
        let (to, from) = (envelope.to.as_str(), envelope.from.as_str());
        counts.admit(to, from, self.quota)?;
        let w = self.begin_write()?;
        {
            let mut meta = db!(w.open_table(META))?;
            let next = db!(meta.get("next_seq"))?.map(|v| v.value()).unwrap_or(1);
            if seq >= next {
                db!(meta.insert("next_seq", seq + 1))?;
            }
            let mut q = db!(w.open_table(QUEUE))?;
            let item = Queued { envelope: envelope.clone(), expires_ms };
            db!(q.insert((to, seq), &enc(&item)[..]))?;
            let mut x = db!(w.open_table(EXPIRY))?;
            db!(x.insert((expires_ms, to, seq), ()))?;
        }
        db!(w.commit())?;
        counts.add(to, from);
        Ok(())
    }

    /// Unexpired notifications waiting for `to`, oldest first (all of them: for tests; a
    /// connection streams them with [`Store::pending_page`]).
    pub fn pending(&self, to: &Name, now_ms: u64) -> Result<Vec<(u64, Envelope)>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.pending_page(to, after, now_ms, 1024)?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Up to `limit` unexpired notifications for `to` with sequence numbers above `after`,
    /// oldest first, and about [`PAGE_BYTES`] at most: one page of a backlog, read from a
    /// snapshot, so a connection holds a page rather than the whole backlog in memory.
    pub fn pending_page(&self, to: &Name, after: Option<u64>, now_ms: u64, limit: usize) -> Result<Page, StoreError> {
        let r = db!(self.db.begin_read())?;
        let q = db!(r.open_table(QUEUE))?;
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Page { items: Vec::new(), next: None }),
            Some(a) => a + 1,
        };
        let mut items = Vec::new();
        // Expired ones are skipped but still count towards a bound on the work of one page.
        let mut scanned = 0usize;
        let mut bytes = 0usize;
        for e in db!(q.range((to.as_str(), start)..=(to.as_str(), u64::MAX)))? {
            let (k, v) = db!(e)?;
            let item: Queued = dec("queue", v.value())?;
            let seq = k.value().1;
            scanned += 1;
            if item.expires_ms >= now_ms {
                bytes += item.envelope.noise.len();
                items.push((seq, item.envelope));
            }
            if items.len() >= limit || bytes >= PAGE_BYTES || scanned >= limit.saturating_mul(4) {
                return Ok(Page { items, next: Some(seq) });
            }
        }
        Ok(Page { items, next: None })
    }

    /// Deletes a delivered notification. Returns whether it was there.
    pub fn ack(&self, to: &Name, seq: u64) -> Result<bool, StoreError> {
        Ok(self.ack_many(to, &[seq])? == 1)
    }

    /// Deletes delivered notifications, in one transaction; returns how many were there.
    pub fn ack_many(&self, to: &Name, seqs: &[u64]) -> Result<usize, StoreError> {
        let mut counts = self.counts();
        let mut senders = Vec::with_capacity(seqs.len());
        let w = self.begin_write()?;
        {
            let mut q = db!(w.open_table(QUEUE))?;
            let mut x = db!(w.open_table(EXPIRY))?;
            for &seq in seqs {
                if let Some(from) = remove_queued(&mut q, &mut x, to.as_str(), seq)? {
                    senders.push(from);
                }
            }
        }
        db!(w.commit())?;
        for from in &senders {
            counts.sub(to.as_str(), from);
        }
        Ok(senders.len())
    }

    /// Deletes every expired notification; returns how many.
    pub fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut counts = self.counts();
        let w = self.begin_write()?;
        let mut gone: Vec<(String, String)> = Vec::new();
        {
            let mut q = db!(w.open_table(QUEUE))?;
            let mut x = db!(w.open_table(EXPIRY))?;
            // Expired means `expires_ms < now_ms`: every index key below (now_ms, "", 0).
            let mut expired: Vec<(String, u64)> = Vec::new();
            for e in db!(x.range((0, "", 0)..(now_ms, "", 0)))?.take(SWEEP_BATCH) {
                let (k, _) = db!(e)?;
                let (_, to, seq) = k.value();
                expired.push((to.to_string(), seq));
            }
            for (to, seq) in expired {
                if let Some(from) = remove_queued(&mut q, &mut x, &to, seq)? {
                    gone.push((to, from));
                }
            }
        }
        db!(w.commit())?;
        for (to, from) in &gone {
            counts.sub(to, from);
        }
        Ok(gone.len())
    }

    /// Notifications stored, expired or not (for tests and metrics).
    pub fn queued_count(&self) -> Result<u64, StoreError> {
        let r = db!(self.db.begin_read())?;
        let q = db!(r.open_table(QUEUE))?;
        db!(q.len())
    }
}

/// Removes one queued notification and its expiry entry; returns its sender if it was there
/// ("" for a damaged entry, which is counted under no sender).
fn remove_queued(
    q: &mut redb::Table<(&str, u64), &[u8]>,
    x: &mut redb::Table<(u64, &str, u64), ()>,
    to: &str,
    seq: u64,
) -> Result<Option<String>, StoreError> {
    let Some(v) = db!(q.remove((to, seq)))? else {
        // Already gone (acknowledged twice, say); an expiry entry left behind goes with the sweep.
        return Ok(None);
    };
    let item = postcard::from_bytes::<Queued>(v.value()).ok();
    drop(v);
    match item {
        Some(i) => {
            db!(x.remove((i.expires_ms, to, seq)))?;
            Ok(Some(i.envelope.from.as_str().to_string()))
        }
        None => Ok(Some(String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use np_identity::Keys;

    fn n(s: &str) -> Name {
        s.parse().expect("name")
    }

    #[test]
    fn enrolment_rules() {
        let t = tempfile::tempdir().expect("tmp");
        let s = Store::open(&t.path().join("db")).expect("open");
        let k = Keys::generate().expect("k").public();
        s.issue_code(&n("@a"), &[1; 16], 1000).expect("issue");
        assert!(matches!(s.enroll(&[2; 16], &n("@a"), &k, 10), Err(StoreError::BadCode)));
        assert!(matches!(s.enroll(&[1; 16], &n("@b"), &k, 10), Err(StoreError::CodeForOtherName(_))));
        assert!(matches!(s.enroll(&[1; 16], &n("@a"), &k, 2000), Err(StoreError::CodeExpired)));
        s.enroll(&[1; 16], &n("@a"), &k, 10).expect("enrol");
        assert!(matches!(s.enroll(&[1; 16], &n("@a"), &k, 10), Err(StoreError::CodeUsed)));
        assert!(matches!(s.issue_code(&n("@a"), &[3; 16], 1000), Err(StoreError::NameTaken(_))));
    }

    #[test]
    fn queue_ack_and_sweep() {
        let t = tempfile::tempdir().expect("tmp");
        let s = Store::open(&t.path().join("db")).expect("open");
        let (a, b) = (Keys::generate().expect("k"), Keys::generate().expect("k"));
        let env = Envelope::seal(&n("@a"), &a, &n("@b"), &b.public(), 1, b"x").expect("seal");
        let s1 = s.start_seq().expect("seq");
        let s2 = s1 + 1;
        s.enqueue_at(s1, &env, 100).expect("q");
        s.enqueue_at(s2, &env, 10).expect("q");
        assert!(s.start_seq().expect("seq") > s2, "a restart never reuses a number");
        assert_eq!(s.pending(&n("@b"), 50).expect("p").iter().map(|p| p.0).collect::<Vec<_>>(), vec![s1]);
        assert!(s.pending(&n("@a"), 0).expect("p").is_empty());
        assert_eq!(s.sweep(50).expect("sweep"), 1);
        assert!(s.ack(&n("@b"), s1).expect("ack"));
        assert!(!s.ack(&n("@b"), s2).expect("ack"));
        assert_eq!(s.queued_count().expect("n"), 0);
    }

    #[test]
    fn quotas_per_sender_and_in_all_and_what_frees_them() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("db");
        let quota = Quota { per_sender: 3, per_recipient: 5 };
        let s = Store::open(&path).expect("open").with_quota(quota);
        let keys: Vec<Keys> = (0..4).map(|_| Keys::generate().expect("k")).collect();
        let to = n("@dev");
        let env = |from: &str, k: &Keys| Envelope::seal(&n(from), k, &to, &keys[3].public(), 1, b"x").expect("seal");
        let mut seq = s.start_seq().expect("seq");
        let mut put = |from: &str, k: &Keys, expires: u64| {
            seq += 1;
            s.enqueue_at(seq, &env(from, k), expires).map(|()| seq)
        };
        let m: Vec<u64> = (0..3).map(|_| put("@m", &keys[0], 100).expect("within share")).collect();
        assert!(matches!(put("@m", &keys[0], 100), Err(StoreError::Quota(_))), "over her share");
        put("@e", &keys[1], 10).expect("another sender");
        put("@e", &keys[1], 100).expect("another sender");
        // The total (5) is reached; a sender with fewer than RESERVED_PER_SENDER still gets in.
        put("@c", &keys[2], 100).expect("reserve");
        assert_eq!(s.queued_for(&to, &n("@m")), (3, 6));
        // An ack frees a place of that sender; a sweep frees the expired one.
        assert_eq!(s.ack_many(&to, &m[..1]).expect("ack"), 1);
        assert_eq!(s.queued_for(&to, &n("@m")), (2, 5));
        assert_eq!(s.sweep(50).expect("sweep"), 1);
        assert_eq!(s.queued_for(&to, &n("@e")), (1, 4));
        // Revoking @m deletes what she sent that still waits.
        assert!(!s.revoke(&n("@m")).expect("revoke"), "@m was never enrolled here");
        assert_eq!(s.queued_for(&to, &n("@m")), (0, 2));
        assert_eq!(s.pending(&to, 0).expect("p").len(), 2);
        // Counts are rebuilt from the queue when the database is opened again.
        drop(s);
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.queued_for(&to, &n("@e")), (1, 2));
        assert_eq!(s.sweep(1000).expect("sweep"), 2);
        assert_eq!(s.queued_count().expect("n"), 0);
    }

    #[test]
    fn a_backlog_is_read_in_pages() {
        let t = tempfile::tempdir().expect("tmp");
        let s = Store::open(&t.path().join("db")).expect("open");
        let (a, b) = (Keys::generate().expect("k"), Keys::generate().expect("k"));
        let env = Envelope::seal(&n("@a"), &a, &n("@b"), &b.public(), 1, b"x").expect("seal");
        let first = s.start_seq().expect("seq");
        for i in 0..10 {
            s.enqueue_at(first + i, &env, if i == 4 { 5 } else { 100 }).expect("q");
        }
        let mut after = None;
        let mut got = Vec::new();
        loop {
            let page = s.pending_page(&n("@b"), after, 50, 3).expect("page");
            assert!(page.items.len() <= 3);
            got.extend(page.items.iter().map(|p| p.0 - first));
            match page.next {
                Some(x) => after = Some(x),
                None => break,
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3, 5, 6, 7, 8, 9], "in order, the expired one skipped");
    }
}
