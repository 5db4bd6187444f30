//! The control plane's embedded database (redb): identities, enrolment codes, records and the
//! notification queue. Every write is one durable transaction, so a SIGKILL loses nothing that
//! was acknowledged and leaves nothing half-written.

use np_control_proto::{EnrolCode, IdentityInfo, Record};
use np_identity::{Envelope, Name, PublicKeys};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");
const CODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("codes");
const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most records one identity may hold.
pub const MAX_RECORDS_PER_OWNER: usize = 256;
/// How far each start jumps the notification sequence (more than one run could ever hand out
/// between two commits).
const SEQ_GAP: u64 = 1 << 20;
/// Most notifications queued for one recipient; beyond it new ones are refused, so one absent
/// identity cannot fill the disk.
pub const MAX_QUEUED_PER_RECIPIENT: usize = 10_000;

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
        let db = match Database::create(path) {
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
            db!(w.open_table(META))?;
        }
        db!(w.commit())?;
        Ok(Store { db })
    }

    /// Stores a new one-time code for `name`, valid until `expires_ms`.
    pub fn issue_code(&self, name: &Name, secret: &[u8; 16], expires_ms: u64) -> Result<(), StoreError> {
        if self.identity(name)?.is_some() {
            return Err(StoreError::NameTaken(name.clone()));
        }
        let w = db!(self.db.begin_write())?;
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
        let w = db!(self.db.begin_write())?;
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
        let w = db!(self.db.begin_write())?;
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

    /// Removes an identity with its records and queued notifications. Returns whether it existed.
    pub fn revoke(&self, name: &Name) -> Result<bool, StoreError> {
        let w = db!(self.db.begin_write())?;
        let existed = {
            let mut ids = db!(w.open_table(IDENTITIES))?;
            let existed = db!(ids.remove(name.as_str()))?.is_some();
            let n = name.as_str();
            let mut recs = db!(w.open_table(RECORDS))?;
            db!(recs.retain_in((n, "")..=(n, "\u{10ffff}"), |_, _| false))?;
            let mut q = db!(w.open_table(QUEUE))?;
            db!(q.retain_in((n, 0)..=(n, u64::MAX), |_, _| false))?;
            existed
        };
        db!(w.commit())?;
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
        let w = db!(self.db.begin_write())?;
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

    /// Queues an envelope for its recipient under sequence number `seq`.
    pub fn enqueue_at(&self, seq: u64, envelope: &Envelope, expires_ms: u64) -> Result<(), StoreError> {
        let w = db!(self.db.begin_write())?;
        {
            let mut meta = db!(w.open_table(META))?;
            let next = db!(meta.get("next_seq"))?.map(|v| v.value()).unwrap_or(1);
            if seq >= next {
                db!(meta.insert("next_seq", seq + 1))?;
            }
            let mut q = db!(w.open_table(QUEUE))?;
            let to = envelope.to.as_str();
            let queued = db!(q.range((to, 0)..=(to, u64::MAX)))?.count();
            if queued >= MAX_QUEUED_PER_RECIPIENT {
                return Err(StoreError::Limit(format!("{to} has {queued} notifications waiting, the most allowed")));
            }
            let item = Queued { envelope: envelope.clone(), expires_ms };
            db!(q.insert((to, seq), &enc(&item)[..]))?;
        }
        db!(w.commit())
    }

    /// Unexpired notifications waiting for `to`, oldest first.
    pub fn pending(&self, to: &Name, now_ms: u64) -> Result<Vec<(u64, Envelope)>, StoreError> {
        let r = db!(self.db.begin_read())?;
        let q = db!(r.open_table(QUEUE))?;
        let mut out = Vec::new();
        for e in db!(q.range((to.as_str(), 0)..=(to.as_str(), u64::MAX)))? {
            let (k, v) = db!(e)?;
            let item: Queued = dec("queue", v.value())?;
            if item.expires_ms >= now_ms {
                out.push((k.value().1, item.envelope));
            }
        }
        Ok(out)
    }

    /// Deletes a delivered notification. Returns whether it was there.
    pub fn ack(&self, to: &Name, seq: u64) -> Result<bool, StoreError> {
        let w = db!(self.db.begin_write())?;
        let had = {
            let mut q = db!(w.open_table(QUEUE))?;
            let removed = db!(q.remove((to.as_str(), seq)))?.is_some();
            removed
        };
        db!(w.commit())?;
        Ok(had)
    }

    /// Deletes every expired notification; returns how many.
    pub fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let w = db!(self.db.begin_write())?;
        let mut n = 0;
        {
            let mut q = db!(w.open_table(QUEUE))?;
            db!(q.retain(|_, v| {
                let keep = postcard::from_bytes::<Queued>(v).map(|i| i.expires_ms >= now_ms).unwrap_or(false);
                if !keep {
                    n += 1;
                }
                keep
            }))?;
        }
        db!(w.commit())?;
        Ok(n)
    }

    /// Notifications stored, expired or not (for tests and metrics).
    pub fn queued_count(&self) -> Result<u64, StoreError> {
        let r = db!(self.db.begin_read())?;
        let q = db!(r.open_table(QUEUE))?;
        db!(q.len())
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
}
