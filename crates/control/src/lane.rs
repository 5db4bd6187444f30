//! One thread that performs every database write, in the order they were submitted.
//!
//! Order is what lets the server push a notification to a connected recipient *before* its
//! commit reaches the disk (a commit waits for fsync, tens of milliseconds on these machines,
//! which would otherwise sit in every session's setup): the recipient's acknowledgement can only
//! be submitted after the push, so it is always applied after the enqueue it deletes. Reads do
//! not come here; redb serves them from a consistent snapshot without waiting for writers.

use crate::store::{Store, StoreError};
use std::sync::Arc;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&Store) + Send>;

/// The write lane.
pub struct WriteLane {
    tx: std::sync::mpsc::Sender<Job>,
}

impl WriteLane {
    /// Starts the writer thread.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new().name("np-control-writer".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                job(&store);
            }
        })?;
        Ok(WriteLane { tx })
    }

    /// Queues a write; the receiver yields its result once it is committed.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> oneshot::Receiver<Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        // The thread only ends with the process; a failed send just drops the reply sender,
        // which the caller sees as an internal error.
        let _ = self.tx.send(job);
        rx
    }
}
