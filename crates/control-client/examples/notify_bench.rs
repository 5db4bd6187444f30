//! Times the control plane delivering `-n` notifications (default 5,000) to a recipient that was
//! offline, from its connect until it has received them all (the backlog drained), against the
//! same number sent while it is connected (live, 16 senders' requests in flight). Used by
//! `scripts/bench.sh` (section `backlog`); prints one line.
//!
//! ```text
//! notify_bench --sender-home H1 --sender @a --recipient-home H2 --recipient @b [-n 5000]
//! ```

use np_control_client::{ControlClient, Incoming};
use np_identity::home::Home;
use np_identity::Name;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARALLEL: usize = 16;
/// About the size of a session request.
const PAYLOAD: usize = 200;

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned()
}

async fn send_all(c: &ControlClient, to: &Name, n: usize) -> Result<(), Box<dyn Error>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let (c, to, next) = (c.clone(), to.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let payload = vec![7u8; PAYLOAD];
            while next.fetch_add(1, Ordering::Relaxed) < n {
                c.send(&to, &payload, Duration::from_secs(3600)).await?;
            }
            Ok::<_, np_control_client::ClientError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn receive_all(inc: &mut Incoming, n: usize) -> Result<(), Box<dyn Error>> {
    for i in 0..n {
        match tokio::time::timeout(Duration::from_secs(60), inc.recv()).await {
            Ok(Some(_)) => {}
            _ => return Err(format!("only {i} of {n} received").into()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let need = |f: &str| arg(&args, f).ok_or_else(|| format!("missing {f}"));
    let (sh, sender, rh, recipient) =
        (need("--sender-home")?, need("--sender")?, need("--recipient-home")?, need("--recipient")?);
    let n: usize = arg(&args, "-n").map(|v| v.parse()).transpose()?.unwrap_or(5000);
    let sender: Name = sender.parse()?;
    let recipient: Name = recipient.parse()?;
    let (s, _si) = ControlClient::connect(&Home::new(&sh), &sender).await?;

    // Queued: the recipient is offline while they are sent.
    send_all(&s, &recipient, n).await?;
    let t = Instant::now();
    let (r, mut ri) = ControlClient::connect(&Home::new(&rh), &recipient).await?;
    receive_all(&mut ri, n).await?;
    let drained = t.elapsed();

    // Live: the same number while it is connected.
    let t = Instant::now();
    let (sent, got) = tokio::join!(send_all(&s, &recipient, n), receive_all(&mut ri, n));
    sent?;
    got?;
    let live = t.elapsed();
    // Let the last acknowledgements go out (they are batched in the background), so a second
    // run does not start with this one's leftovers queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(r);
    println!(
        "control plane: {n} queued notifications drained in {:.0} ms from the recipient's connect ({:.0} µs each); \
         the same {n} sent live in {:.0} ms: drained/live {:.2}",
        drained.as_secs_f64() * 1e3,
        drained.as_secs_f64() * 1e6 / n as f64,
        live.as_secs_f64() * 1e3,
        drained.as_secs_f64() / live.as_secs_f64()
    );
    Ok(())
}
