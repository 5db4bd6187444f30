//! Moving opaque bytes between the two sides of a paired session.
//!
//! One buffer per direction and no queue: a direction reads only after its previous chunk is
//! fully written, so a slow reader stops the relay reading from the other side (TCP flow control
//! then pushes back to the sender) and memory per session is two buffers whatever the peers do.

use np_metrics::Counter;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How a forwarded session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides sent EOF and everything was delivered.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// Bytes moved per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Moved {
    pub(crate) a_to_b: u64,
    pub(crate) b_to_a: u64,
}

/// Last time a byte moved, in milliseconds since `base`; shared by both directions of one task.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { base: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Forwards `a` <-> `b` until both directions reached EOF, either side failed, or nothing moved
/// for `idle`. EOF in one direction half-closes the other side's write end and keeps the other
/// direction flowing.
///
/// With `zero_copy` (Linux), bytes go socket -> pipe -> socket through `splice(2)` and the pipe
/// is the buffer; otherwise (or if no pipe can be made) through a user-space buffer.
pub(crate) async fn forward(
    a: &mut TcpStream,
    b: &mut TcpStream,
    buffer: usize,
    idle: Duration,
    zero_copy: bool,
    (total_ab, total_ba): (&Counter, &Counter),
) -> (io::Result<Ended>, Moved) {
    let activity = Activity::new();
    let moved_ab = AtomicU64::new(0);
    let moved_ba = AtomicU64::new(0);
    let pipes = if zero_copy {
        #[cfg(target_os = "linux")]
        {
            crate::splice::Pipe::new(buffer).and_then(|p| Ok((p, crate::splice::Pipe::new(buffer)?))).ok()
        }
        #[cfg(not(target_os = "linux"))]
        {
            None::<()>
        }
    } else {
        None
    };
    let both = async {
        #[cfg(target_os = "linux")]
        if let Some((pab, pba)) = &pipes {
            let (a, b) = (&*a, &*b);
            let count = |moved: &AtomicU64, total: &Counter, n: usize| {
                activity.touch();
                moved.fetch_add(n as u64, Ordering::Relaxed);
                total.add(n as u64);
            };
            return tokio::try_join!(
                crate::splice::pump(a, b, pab, buffer, |n| count(&moved_ab, total_ab, n)),
                crate::splice::pump(b, a, pba, buffer, |n| count(&moved_ba, total_ba, n)),
            );
        }
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        tokio::try_join!(
            pump(&mut ar, &mut bw, buffer, &activity, (&moved_ab, total_ab)),
            pump(&mut br, &mut aw, buffer, &activity, (&moved_ba, total_ba)),
        )
    };
    let watchdog = async {
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let result = tokio::select! {
        r = both => r.map(|_| Ended::Closed),
        () = watchdog => Ok(Ended::Idle),
    };
    let moved = Moved { a_to_b: moved_ab.load(Ordering::Relaxed), b_to_a: moved_ba.load(Ordering::Relaxed) };
    (result, moved)
}

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    buffer: usize,
    activity: &Activity,
    (moved, total): (&AtomicU64, &Counter),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Zeroed allocation: pages are only touched (and counted in RSS) as data passes through.
    let mut buf = vec![0u8; buffer.max(1)];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        w.write_all(&buf[..n]).await?;
        activity.touch();
        moved.fetch_add(n as u64, Ordering::Relaxed);
        total.add(n as u64);
        tracing::trace!(bytes = n, "forwarded");
    }
}
