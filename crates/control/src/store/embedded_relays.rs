//! The operator's relay list in the embedded store: the relays that devices trust when they name none themselves
//! (`np-control relay add @NAME`). A relay on the list must be an enrolled identity, because a
//! device checks at every join that the relay proves it holds that identity's key.

use super::embedded::RedbStore;
use super::{StoreError, MAX_RELAYS};
use np_identity::Name;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

/// Relay name → when it was added (ms since the Unix epoch).
const RELAYS: TableDefinition<&str, u64> = TableDefinition::new("relays");

fn db<T>(r: Result<T, impl Into<redb::Error>>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Redb(e.into()))
}

impl RedbStore {
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
            Err(e) => return Err(StoreError::Redb(e.into())),
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
