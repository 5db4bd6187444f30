//! The operator's relay list: the relays that devices trust when they name none themselves
//! (`np-control relay add @NAME`). A relay on the list must be an enrolled identity, because a
//! device checks at every join that the relay proves it holds that identity's key.

use crate::store::{Store, StoreError};
use np_identity::Name;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

/// Relay name → when it was added (ms since the Unix epoch).
const RELAYS: TableDefinition<&str, u64> = TableDefinition::new("relays");

/// Most relays on the list: it is sent whole to every device that asks.
pub const MAX_RELAYS: usize = 64;

fn db<T>(r: Result<T, impl Into<redb::Error>>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Db(e.into()))
}

impl Store {
    /// Adds an enrolled identity to the relay list; adding one already there changes nothing.
    pub fn relay_add(&self, name: &Name, now_ms: u64) -> Result<(), StoreError> {
        if self.identity(name)?.is_none() {
            return Err(StoreError::Limit(format!(
                "{name} is not enrolled: enrol the relay's identity first (`np-control enroll {name}`)"
            )));
        }
        let w = db(self.db.begin_write())?;
        {
            let mut t = db(w.open_table(RELAYS))?;
            let present = db(t.get(name.as_str()))?.is_some();
            if !present && db(t.len())? as usize >= MAX_RELAYS {
                return Err(StoreError::Limit(format!("the relay list holds {MAX_RELAYS} relays, the most allowed")));
            }
            if !present {
                db(t.insert(name.as_str(), now_ms))?;
            }
        }
        db(w.commit())
    }

    /// Removes a relay from the list. Returns whether it was there.
    pub fn relay_remove(&self, name: &Name) -> Result<bool, StoreError> {
        let w = db(self.db.begin_write())?;
        let had = {
            let mut t = db(w.open_table(RELAYS))?;
            let had = db(t.remove(name.as_str()))?.is_some();
            had
        };
        db(w.commit())?;
        Ok(had)
    }

    /// The relay list, by name.
    pub fn relays(&self) -> Result<Vec<Name>, StoreError> {
        let r = db(self.db.begin_read())?;
        let t = match r.open_table(RELAYS) {
            Ok(t) => t,
            // Never written: no relay listed yet.
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Db(e.into())),
        };
        let mut out = Vec::new();
        for e in db(t.iter())? {
            let (k, _) = db(e)?;
            match k.value().parse::<Name>() {
                Ok(n) => out.push(n),
                Err(_) => return Err(StoreError::Corrupt("relays".into())),
            }
        }
        Ok(out)
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
    fn add_list_remove_and_only_enrolled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        assert_eq!(s.relays().expect("list"), Vec::<Name>::new());
        assert!(matches!(s.relay_add(&n("@relay"), 1), Err(StoreError::Limit(_))), "not enrolled yet");
        let secret = [7u8; 16];
        s.issue_code(&n("@relay"), &secret, u64::MAX).expect("code");
        s.enroll(&secret, &n("@relay"), &Keys::generate().expect("keys").public(), 1).expect("enrol");
        s.relay_add(&n("@relay"), 2).expect("add");
        s.relay_add(&n("@relay"), 3).expect("again");
        assert_eq!(s.relays().expect("list"), vec![n("@relay")]);
        assert!(s.relay_remove(&n("@relay")).expect("remove"));
        assert!(!s.relay_remove(&n("@relay")).expect("remove again"));
        assert!(s.relays().expect("list").is_empty());
    }
}
