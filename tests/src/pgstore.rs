//! `NP_TEST_STORE=postgres`: every `np-control` the tests start (through [`crate::Control`],
//! unless the test gives its own `--store`) gets a fresh database of its own, in one throwaway
//! PostgreSQL cluster per test process (an `initdb` costs about a second; a `createdb` a few
//! tens of milliseconds). Without it, nodes keep the default embedded redb store.
//!
//! The cluster is stopped and deleted when the test process exits (an `atexit` hook: the Rust
//! runtime never drops statics).

use np_testpg::TempPostgres;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The environment variable that picks the store of the nodes the tests start.
pub const ENV: &str = "NP_TEST_STORE";

static CLUSTER: Mutex<Option<TempPostgres>> = Mutex::new(None);
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// Whether the nodes of this run use PostgreSQL (`NP_TEST_STORE=postgres`); any other value
/// than `redb` or nothing is a mistake worth failing on.
pub fn wanted() -> bool {
    match std::env::var(ENV).as_deref() {
        Ok("postgres") => true,
        Ok("redb") | Ok("") | Err(_) => false,
        Ok(other) => panic!("{ENV}={other}: expected `postgres` or `redb`"),
    }
}

extern "C" fn stop_cluster() {
    // At exit no test thread runs any more; `try_lock` only guards against a poisoned or held
    // lock turning the exit into a hang.
    if let Ok(mut c) = CLUSTER.try_lock() {
        drop(c.take());
    }
}

/// Runs `f` on the process's cluster, starting it first if needed. Panics when PostgreSQL is
/// wanted but cannot run: a run asked to test PostgreSQL must not quietly test redb.
fn with_cluster<T>(f: impl FnOnce(&TempPostgres) -> T) -> T {
    let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if c.is_none() {
        let pg = TempPostgres::start()
            .unwrap_or_else(|e| panic!("{ENV}=postgres: the throwaway cluster did not start: {e}"))
            .unwrap_or_else(|| panic!("{ENV}=postgres, but PostgreSQL is not installed"));
        *c = Some(pg);
        // SAFETY: registers a plain `extern "C" fn` with no captured state.
        #[allow(unsafe_code)]
        unsafe {
            libc::atexit(stop_cluster);
        }
    }
    f(c.as_ref().expect("started above"))
}

/// A URL of a new, empty database for one node.
pub fn fresh_database() -> String {
    with_cluster(|pg| {
        let db = format!("node{}", NEXT_DB.fetch_add(1, Ordering::SeqCst));
        pg.create_db(&db).unwrap_or_else(|e| panic!("createdb {db}: {e}"));
        pg.url(&db)
    })
}

/// The cluster's directory (data files and WAL), if this process started one.
pub fn cluster_dir() -> Option<PathBuf> {
    let c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    c.as_ref().map(|pg| pg.dir().to_path_buf())
}
