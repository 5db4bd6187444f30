//! Connections between accept and authentication, bounded.
//!
//! At the limit, the *oldest* connection that has not said a word (else the oldest) is told to
//! close to make room. A flood of idle connections then keeps cycling through its own places
//! while a real client, which authenticates within milliseconds, still gets in; refusing the
//! newest instead would lock everyone out for as long as the flood lasts.
//!
//! Whether a connection has spoken is first known to the kernel, and only later to the task
//! serving it: on a busy server that task may wait tens of milliseconds to be scheduled, and a
//! flood evicts a thousand connections in that time. So a connection told to close as a silent
//! one asks [`PreAuthPermit::keeps_place`] with what its socket holds: if its first bytes had
//! already arrived, it was not silent, and it gets its place back (the next oldest silent one
//! goes instead).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The connection was told to close: a newer one took its place at the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted;

/// Whether the peer's first bytes are already waiting in `tcp`, asked of the kernel with a
/// non-blocking peek (not of tokio's readiness, which reports a freshly accepted socket readable
/// at once, and lags behind the kernel on a busy runtime).
pub fn bytes_waiting(tcp: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut b), Ok(n) if n > 0)
}

/// What the registry and a connection's permit both know about the connection.
#[derive(Default)]
struct State {
    /// It has sent something: evicted only when every connection has.
    spoke: AtomicBool,
    /// It was evicted as the oldest silent one (not because every connection had spoken).
    evicted_silent: AtomicBool,
}

/// A connection waiting to authenticate.
struct Waiting {
    conn: u64,
    evicted: Arc<Notify>,
    state: Arc<State>,
}

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
    state: Arc<State>,
}

impl PreAuthPermit {
    /// Marks the connection as having sent something: silent ones are evicted first.
    pub fn spoke(&self) {
        self.state.spoke.store(true, Ordering::Relaxed);
    }

    /// Called once each time `evicted` fired, with whether bytes from the peer are waiting in
    /// the socket. A connection evicted as silent that had in fact spoken (bytes waiting, or
    /// [`PreAuthPermit::spoke`] called meanwhile) gets its place back, at the cost of the next
    /// oldest silent one, and the call returns true: go on. Otherwise it must close.
    pub fn keeps_place(&self, bytes_waiting: bool) -> bool {
        let Ok(mut q) = self.reg.q.lock() else {
            return false;
        };
        let as_silent = self.state.evicted_silent.swap(false, Ordering::Relaxed);
        if !as_silent || !(bytes_waiting || self.state.spoke.load(Ordering::Relaxed)) {
            return false;
        }
        self.state.spoke.store(true, Ordering::Relaxed);
        self.reg.insert(&mut q, Waiting { conn: self.conn, evicted: self.evicted.clone(), state: self.state.clone() });
        true
    }

    /// Waits until the peer's first byte has really arrived in `tcp` (or its end of stream, or
    /// an error: the peek's result), then marks the connection as having spoken. A peek waits
    /// for a byte; `readable()` would not, as tokio reports a fresh socket readable at once.
    /// Told to leave as the oldest silent connection meanwhile, it looks at the socket itself
    /// ([`PreAuthPermit::keeps_place`]): under a flood this task may be scheduled long after the
    /// bytes arrived, and such a connection stays. `Err` means: close now.
    pub async fn first_byte(&self, tcp: &TcpStream) -> Result<std::io::Result<usize>, Evicted> {
        let mut first = [0u8; 1];
        loop {
            tokio::select! {
                biased;
                () = self.evicted.notified() => {
                    if !self.keeps_place(bytes_waiting(tcp)) {
                        return Err(Evicted);
                    }
                }
                r = tcp.peek(&mut first) => {
                    self.spoke();
                    return Ok(r);
                }
            }
        }
    }

    /// Runs `fut` (the rest of the authentication) unless told to leave. Once the connection has
    /// spoken, that happens only when every connection has, or when it was picked as silent just
    /// before it was marked (then it keeps its place and `fut` goes on).
    pub async fn unless_evicted<F: Future>(&self, fut: F) -> Result<F::Output, Evicted> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => return Ok(r),
                () = self.evicted.notified() => {
                    if !self.keeps_place(false) {
                        return Err(Evicted);
                    }
                }
            }
        }
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
        let state = Arc::new(State { spoke: AtomicBool::new(spoke_already), ..State::default() });
        let mut was_full = false;
        if let Ok(mut q) = self.q.lock() {
            was_full = self.insert(&mut q, Waiting { conn, evicted: evicted.clone(), state: state.clone() });
        }
        (PreAuthPermit { reg: self.clone(), conn, evicted, state }, was_full)
    }

    /// Adds `w` at the young end, evicting the oldest silent connection (else the oldest) if
    /// the limit is reached. Returns whether one was evicted.
    fn insert(&self, q: &mut VecDeque<Waiting>, w: Waiting) -> bool {
        let mut was_full = false;
        if q.len() >= self.max {
            let silent = q.iter().position(|v| !v.state.spoke.load(Ordering::Relaxed));
            if let Some(victim) = q.remove(silent.unwrap_or(0)) {
                victim.state.evicted_silent.store(silent.is_some(), Ordering::Relaxed);
                // notify_one keeps the wake-up even if that task has not started waiting.
                victim.evicted.notify_one();
                was_full = true;
            }
        }
        q.push_back(w);
        was_full
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
            if let Some(i) = q.iter().position(|w| w.conn == self.conn) {
                q.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Whether `permit`'s eviction signal is set (consuming it).
    fn told_to_close(permit: &PreAuthPermit) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(permit.evicted.notified());
        f.as_mut().poll(&mut cx).is_ready()
    }

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
        assert!(told_to_close(&a));
        assert!(!told_to_close(&b));
        // Nothing was waiting in its socket: it must go.
        assert!(!a.keeps_place(false));
        drop(a);
        assert_eq!(p.len(), 2);
        drop(b);
        assert_eq!(p.len(), 1, "only the third is left");
    }

    #[test]
    fn a_silent_looking_one_whose_bytes_had_arrived_gets_its_place_back() {
        let p = PreAuth::new(2);
        let (a, _) = p.admit(1, false);
        let (b, _) = p.admit(2, false);
        let (c, _) = p.admit(3, false);
        assert!(told_to_close(&a));
        // Its Join was already in the socket, unseen by its task: it stays, `b` goes instead.
        assert!(a.keeps_place(true));
        assert_eq!(p.len(), 2);
        assert!(told_to_close(&b));
        assert!(!told_to_close(&c));
        assert!(!b.keeps_place(false));
        // Its task had seen the bytes, just after it was picked: the same.
        let (d, _) = p.admit(4, false);
        assert!(told_to_close(&c));
        c.spoke();
        assert!(c.keeps_place(false));
        assert!(told_to_close(&d));
        assert!(!d.keeps_place(false));
        drop((b, d));
        assert_eq!(p.len(), 2, "a and c");
    }

    #[test]
    fn when_all_have_spoken_the_oldest_goes_and_stays_gone() {
        let p = PreAuth::new(2);
        let (a, _) = p.admit(1, true);
        let (b, _) = p.admit(2, true);
        let (_c, evicted) = p.admit(3, true);
        assert!(evicted);
        assert!(told_to_close(&a));
        assert!(!told_to_close(&b));
        // Evicted because every place had spoken, not as a silent one: no appeal.
        assert!(!a.keeps_place(true));
        // And one appeal per eviction: asking again changes nothing.
        assert!(!a.keeps_place(true));
        drop(a);
        assert_eq!(p.len(), 2);
    }
}
