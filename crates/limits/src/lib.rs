//! Connections between accept and authentication, bounded.
//!
//! At the limit, the *oldest* connection that has not said a word (else the oldest) is told to
//! close to make room. A flood of idle connections then keeps cycling through its own places
//! while a real client, which authenticates within milliseconds, still gets in; refusing the
//! newest instead would lock everyone out for as long as the flood lasts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A connection waiting to authenticate: its id, its eviction signal, whether it has spoken.
type Waiting = (u64, Arc<Notify>, Arc<AtomicBool>);

/// The unauthenticated connections of one server.
pub struct PreAuth {
    max: usize,
    q: Mutex<VecDeque<Waiting>>,
}

/// A connection's place; `evicted` fires when it must give it up. Dropping it frees the place.
pub struct PreAuthPermit {
    reg: Arc<PreAuth>,
    conn: u64,
    /// Notified when a newer connection took this one's place.
    pub evicted: Arc<Notify>,
    spoke: Arc<AtomicBool>,
}

impl PreAuthPermit {
    /// Marks the connection as having sent something: silent ones are evicted first.
    pub fn spoke(&self) {
        self.spoke.store(true, Ordering::Relaxed);
    }
}

impl PreAuth {
    /// At most `max` connections at once (at least one).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PreAuth { max: max.max(1), q: Mutex::new(VecDeque::new()) })
    }

    /// Admits connection `conn`; the flag says whether an older one was evicted for it.
    pub fn admit(self: &Arc<Self>, conn: u64, spoke_already: bool) -> (PreAuthPermit, bool) {
        let evicted = Arc::new(Notify::new());
        let spoke = Arc::new(AtomicBool::new(spoke_already));
        let mut was_full = false;
        if let Ok(mut q) = self.q.lock() {
            if q.len() >= self.max {
                let i = q.iter().position(|(_, _, s)| !s.load(Ordering::Relaxed)).unwrap_or(0);
                if let Some((_, oldest, _)) = q.remove(i) {
                    // notify_one keeps the wake-up even if that task has not started waiting.
                    oldest.notify_one();
                    was_full = true;
                }
            }
            q.push_back((conn, evicted.clone(), spoke.clone()));
        }
        (PreAuthPermit { reg: self.clone(), conn, evicted, spoke }, was_full)
    }

    /// Connections holding a place now.
    pub fn len(&self) -> usize {
        self.q.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Whether no connection holds a place.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PreAuthPermit {
    fn drop(&mut self) {
        if let Ok(mut q) = self.reg.q.lock() {
            if let Some(i) = q.iter().position(|(c, _, _)| *c == self.conn) {
                q.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn the_oldest_silent_one_makes_room() {
        let p = PreAuth::new(2);
        let (a, _) = p.admit(1, false);
        let (b, _) = p.admit(2, false);
        b.spoke();
        let (_c, evicted) = p.admit(3, true);
        assert!(evicted);
        assert_eq!(p.len(), 2);
        // `a` was the oldest silent one: its signal is set, `b`'s is not.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        {
            let mut fa = std::pin::pin!(a.evicted.notified());
            let mut fb = std::pin::pin!(b.evicted.notified());
            assert!(fa.as_mut().poll(&mut cx).is_ready());
            assert!(fb.as_mut().poll(&mut cx).is_pending());
        }
        drop(b);
        assert_eq!(p.len(), 1, "only the third is left");
    }
}
