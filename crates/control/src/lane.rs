//! One thread that performs every database write, in the order they were submitted.
//!
//! Order is what lets the server push a notification to a connected recipient *before* its
//! commit reaches the disk (a commit waits for fsync, tens of milliseconds on these machines,
//! which would otherwise sit in every session's setup): the recipient's acknowledgement can only
//! be submitted after the push, so it is always applied after the enqueue it deletes. Reads do
//! not come here; redb serves them from a consistent snapshot without waiting for writers.
//!
//! Writes that queue up while one is on the disk are applied together as a group
//! ([`RedbStore::group`]): each commits without waiting, one final commit makes them all durable,
//! and only then is any of them answered. So many senders (or a backlog's acknowledgements) cost
//! one fsync per group instead of one each, and nothing is reported done before it is durable.

use crate::store::{RedbStore, StoreError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A write; what it returns hands its result over, and is called only once the write is durable
/// (dropped uncalled if that fails, which its caller sees as an internal error).
type Job = Box<dyn FnOnce(&RedbStore) -> Box<dyn FnOnce() + Send> + Send>;
/// Most writes in one group.
const GROUP_MAX: usize = 256;

/// The write lane of the embedded store.
pub struct WriteLane {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriteLane {
    /// Waits for the writer to finish what was submitted and let go of the database, so the
    /// file can be opened again as soon as the store is dropped.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WriteLane {
    /// Starts the writer thread.
    pub fn start(store: Arc<RedbStore>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("np-control-writer".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                let mut jobs = vec![job];
                while jobs.len() < GROUP_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                if jobs.len() == 1 {
                    // Alone: its own commit is durable.
                    for job in jobs {
                        job(&store)();
                    }
                    continue;
                }
                match store.group(|s| jobs.into_iter().map(|job| job(s)).collect::<Vec<_>>()) {
                    Ok(done) => done.into_iter().for_each(|d| d()),
                    // The group's commits may be lost with the process. `group` dropped their
                    // handovers, so each caller sees an internal error, never success.
                    Err(e) => tracing::error!(error = %e, "making a group of writes durable failed"),
                }
            }
        })?;
        Ok(WriteLane { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues a write; the receiver yields its result once it is committed.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RedbStore) -> Result<T, StoreError> + Send + 'static,
    ) -> oneshot::Receiver<Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            let r = f(s);
            Box::new(move || {
                let _ = tx.send(r);
            })
        });
        // The thread only ends with the process; a failed send just drops the reply sender,
        // which the caller sees as an internal error.
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
        rx
    }
}

/// The write lane of the PostgreSQL store: one task that runs every write to its end before it
/// starts the next, so writes apply in the order they were submitted (the same order the
/// embedded lane keeps; see above). Each write is its own transaction, durable at its commit.
pub struct AsyncLane {
    tx: tokio::sync::mpsc::UnboundedSender<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl AsyncLane {
    /// Starts the writer task (on the current runtime).
    pub fn start() -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Pin<Box<dyn Future<Output = ()> + Send>>>();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                job.await;
            }
        });
        AsyncLane { tx }
    }

    /// Queues a write; the receiver yields its result once it is committed.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> oneshot::Receiver<Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        // A failed send (the runtime is shutting down) drops the reply sender: an error, never
        // a success.
        let _ = self.tx.send(Box::pin(async move {
            let _ = tx.send(f.await);
        }));
        rx
    }
}
