//! The embedded store (redb, the default): identities, enrolment codes, records and the
//! notification queue in one file. Every write is one durable transaction, so a SIGKILL loses
//! nothing that was acknowledged and leaves nothing half-written.

use super::{admit_check, Page, Quota, StoreError, MAX_RECORDS_PER_OWNER, PAGE_BYTES};
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

/// How far each start jumps the notification sequence (more than one run could ever hand out
/// between two commits).
const SEQ_GAP: u64 = 1 << 20;
thread_local! {
    /// Inside [`RedbStore::group`] on this thread.
    static GROUPED: Cell<bool> = const { Cell::new(false) };
}

/// Memory redb may use to cache pages (its default is 1 GiB): a large database, or a large
/// backlog streamed out of it, must not become as large a process.
const DB_CACHE: usize = 8 * 1024 * 1024;
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

    /// Whether one more from `from` fits.
    fn admit(&self, to: &str, from: &str, q: Quota) -> Result<(), StoreError> {
        let (mine, total) = self.of(to, from);
        admit_check(to, mine, total, q)
    }
}

macro_rules! db {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Redb(e.into()))
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

/// The embedded database.
pub struct RedbStore {
    pub(crate) db: Database,
    path: std::path::PathBuf,
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

impl RedbStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = match redb::Builder::new().set_cache_size(DB_CACHE).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse(path.display().to_string())),
            Err(e) => return Err(StoreError::Redb(e.into())),
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
        let store =
            RedbStore { db, path: path.to_path_buf(), quota: Quota::default(), counts: Mutex::new(Counts::default()) };
        store.recount()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write that writes nothing (see [`crate::store::Store::barrier`]).
    pub fn nothing(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The same with other queue limits.
    pub fn with_quota(mut self, quota: Quota) -> Self {
        self.quota = quota;
        self
    }

    /// A write transaction: durable at its commit, unless this thread is inside
    /// [`RedbStore::group`], whose end makes the whole group durable at once.
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
    pub fn group<T>(&self, f: impl FnOnce(&RedbStore) -> T) -> Result<T, StoreError> {
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
    /// [`RedbStore::enqueue_at`] checks again, under the queue's lock.
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

    /// Removes an identity with its records, the notifications queued for it, those it sent
    /// that still wait for others (a revoked identity's session requests must not reach a device
    /// after it is gone), and its place on the relay list. Returns whether it existed.
    pub fn revoke(&self, name: &Name) -> Result<bool, StoreError> {
        let existed = self.revoke_identity(name)?;
        self.relay_remove(name)?;
        Ok(existed)
    }

    /// All that [`RedbStore::revoke`] removes but the relay-list entry.
    fn revoke_identity(&self, name: &Name) -> Result<bool, StoreError> {
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
    /// connection streams them with [`RedbStore::pending_page`]).
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
