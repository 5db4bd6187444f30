//! Wake-ups between nodes sharing one PostgreSQL database: a node that stores a notification
//! sends `NOTIFY np_queue, 'RUN RECIPIENT'` in the same transaction; every node LISTENs on one
//! connection of its own and, for a recipient connected to it, reads that recipient's queue
//! again at once. The payload stays in the table, so a wake-up that is lost (the listening
//! connection broke) costs only time: after reconnecting, a node has every local connection read
//! its queue again.

use super::pg::{PgStore, WAKE_CHANNEL};
use np_identity::Name;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// What a wake-up asks of this node.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Read this recipient's queue again.
    One(Name),
    /// Read every local recipient's queue again (wake-ups may have been missed).
    All,
}

/// Wake-ups queued for the node at most; past this a burst collapses into one [`Wake::All`].
const WAKE_QUEUE: usize = 4096;
/// Longest wait between attempts to listen again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Parses a payload (`RUN RECIPIENT SENT_MS`; a node of an earlier version sends no time):
/// the recipient and when it was sent. `None` for one this node sent itself, or one that does
/// not parse (another program on the channel: ignored rather than trusted).
fn parse(payload: &str, own_run: u64) -> Option<(Name, Option<u64>)> {
    let mut fields = payload.split(' ');
    let (run, to, sent) = (fields.next()?, fields.next()?, fields.next());
    if run.parse::<u64>().ok()? == own_run || fields.next().is_some() {
        return None;
    }
    let sent = match sent {
        Some(ms) => Some(ms.parse().ok()?),
        None => None,
    };
    Some((to.parse().ok()?, sent))
}

/// Listens for the life of the returned receiver, reconnecting with backoff.
pub(crate) fn listen(store: Arc<PgStore>) -> mpsc::Receiver<Wake> {
    let (tx, rx) = mpsc::channel(WAKE_QUEUE);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        // After the first connection, wake-ups may have been missed while none was listening.
        let mut listened = false;
        while !tx.is_closed() {
            match store.cfg.connect(tokio_postgres::NoTls).await {
                Ok((client, mut conn)) => {
                    let (msgs_tx, mut msgs) = mpsc::unbounded_channel();
                    // The connection must be polled for LISTEN itself to complete.
                    let driver = tokio::spawn(async move {
                        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            match m {
                                Ok(AsyncMessage::Notification(n)) if n.channel() == WAKE_CHANNEL => {
                                    let _ = msgs_tx.send(n.payload().to_string());
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "the wake-up connection to PostgreSQL failed");
                                    return;
                                }
                            }
                        }
                    });
                    if let Err(e) = client.batch_execute(&format!("LISTEN {WAKE_CHANNEL}")).await {
                        tracing::warn!(error = %e, target = %store.target(), "LISTEN failed");
                    } else {
                        backoff = Duration::from_millis(100);
                        if listened && tx.send(Wake::All).await.is_err() {
                            return;
                        }
                        listened = true;
                        tracing::info!(target = %store.target(), "listening for wake-ups from other nodes");
                        while let Some(p) = msgs.recv().await {
                            let Some((name, sent)) = parse(&p, store.run.load(Ordering::Relaxed)) else { continue };
                            if let Some(sent) = sent {
                                // Another node's clock: skew shows here too (a clock ahead reads as 0).
                                let lag = crate::now_ms().saturating_sub(sent);
                                store.stats.wake_lag.observe(Duration::from_millis(lag));
                            }
                            match tx.try_send(Wake::One(name)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(_)) => {
                                    // Behind: one full resync later covers all of them.
                                    while msgs.try_recv().is_ok() {}
                                    let _ = tx.send(Wake::All).await;
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => return,
                            }
                        }
                    }
                    driver.abort();
                }
                Err(e) => tracing::warn!(error = %e, target = %store.target(), "cannot listen for wake-ups; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let dev: Name = "@dev".parse().expect("name");
        assert_eq!(parse("7 @dev 1700000000000", 3), Some((dev.clone(), Some(1_700_000_000_000))));
        assert_eq!(parse("7 @dev", 3), Some((dev, None)), "from a node that sends no time");
        assert_eq!(parse("3 @dev 5", 3), None, "our own");
        assert_eq!(parse("x @dev", 3), None);
        assert_eq!(parse("7 @dev soon", 3), None);
        assert_eq!(parse("7 @dev 5 more", 3), None);
        assert_eq!(parse("7 not a name", 3), None);
        assert_eq!(parse("", 3), None);
    }
}
