//! Choosing a relay for a session: with none named, the relays the control plane's operator
//! lists that the device trusts, best round trip first, measured here with an authenticated
//! probe ([`np_relay_proto::probe()`]: the relay must prove its key) under a short deadline and
//! cached for a while. A relay that cannot be reached is left out at once, not waited for; a
//! session setup that fails at a relay moves on to the next one and forgets the ranking.
//!
//! Only relays on the operator's list are ever dialled: a device's `trust/NAME` record can
//! narrow the choice (a device that trusts only one relay is never sent through another), never
//! widen it.

use std::time::{Duration, Instant};

use np_control_client::ControlClient;
use np_identity::{DeviceRef, Name};
use np_relay_proto::{ExpectedRelay, RelayInfo, RELAY_RECORD};

use crate::daemon::{trust_key, DeviceRelays};

/// How long a probe may take: a relay slower than this to prove itself is no good choice anyway.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Once a relay has answered, the others get at least this long more to answer faster.
pub const GRACE: Duration = Duration::from_millis(50);
/// How long a ranking is reused before the relays are measured again.
pub const RANKING_TTL: Duration = Duration::from_secs(60);

/// Which relays a client uses.
#[derive(Debug)]
pub struct RelayChooser {
    pinned: Option<Name>,
    verbose: bool,
    /// When the relays were last measured, and each one's round trip (`Duration::MAX`: not
    /// reached), best first.
    ranking: tokio::sync::Mutex<Option<(Instant, Ranking)>>,
}

type Ranking = Vec<(Name, Duration)>;

/// Why no relay could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("asking the control plane for its relays: {0}")]
    Control(#[from] np_control_client::ClientError),
    #[error("no relay: name one with --relay @NAME, or ask the control plane's operator to list one (`np-control relay add @NAME`)")]
    NoneListed,
    #[error("{device} trusts none of the operator's relays ({listed}); its npd names its own with --relay")]
    NoneTrusted { device: String, listed: String },
}

impl RelayChooser {
    /// Always `relay` (`--relay @NAME`).
    pub fn pinned(relay: Name) -> RelayChooser {
        RelayChooser { pinned: Some(relay), verbose: false, ranking: tokio::sync::Mutex::new(None) }
    }

    /// The best relay the device trusts, by round trip; with `verbose`, say which and why.
    pub fn automatic(verbose: bool) -> RelayChooser {
        RelayChooser { pinned: None, verbose, ranking: tokio::sync::Mutex::new(None) }
    }

    /// The pinned relay, if any.
    pub fn pinned_relay(&self) -> Option<&Name> {
        self.pinned.as_ref()
    }

    /// The relays to try for `device`, best first.
    pub async fn candidates(&self, ctl: &ControlClient, device: &DeviceRef) -> Result<Vec<Name>, ChooseError> {
        if let Some(r) = &self.pinned {
            return Ok(vec![r.clone()]);
        }
        let ranking = self.ranking(ctl).await?;
        // The device's own list narrows the operator's; none published: it uses the operator's.
        let trusted: Option<Vec<Name>> = match ctl.fetch(&device.identity, &trust_key(&device.device)).await {
            Ok(r) => postcard::from_bytes::<DeviceRelays>(&r.value).ok().and_then(|t| t.relays),
            Err(_) => None,
        };
        let ok = |n: &Name| trusted.as_ref().is_none_or(|list| list.contains(n));
        let trusted_ranking: Vec<&(Name, Duration)> = ranking.iter().filter(|(n, _)| ok(n)).collect();
        // Unreachable ones only when nothing else is left, so the setup can say why.
        let reached = trusted_ranking.iter().any(|(_, d)| *d != Duration::MAX);
        let chosen: Vec<Name> =
            trusted_ranking.iter().filter(|(_, d)| !reached || *d != Duration::MAX).map(|(n, _)| n.clone()).collect();
        if chosen.is_empty() {
            let listed = ranking.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>().join(", ");
            return Err(ChooseError::NoneTrusted { device: device.to_string(), listed });
        }
        if self.verbose {
            let rtt = |n: &Name| ranking.iter().find(|(r, _)| r == n).map(|(_, d)| *d).unwrap_or(Duration::MAX);
            let why: Vec<String> = chosen
                .iter()
                .map(|n| match rtt(n) {
                    Duration::MAX => format!("{n} (not reached)"),
                    d => format!("{n} {:.1} ms", d.as_secs_f64() * 1e3),
                })
                .collect();
            eprintln!("relay for {device}: {} (trusted by it, by round trip: {})", chosen[0], why.join(", "));
        }
        Ok(chosen)
    }

    /// A session setup failed at a relay: measure again next time.
    pub async fn forget(&self) {
        *self.ranking.lock().await = None;
    }

    /// The operator's relays, reachable ones by round trip, then the unreachable ones (last,
    /// so that a setup still says why when nothing answers).
    async fn ranking(&self, ctl: &ControlClient) -> Result<Vec<(Name, Duration)>, ChooseError> {
        let mut cached = self.ranking.lock().await;
        if let Some((at, r)) = cached.as_ref() {
            if at.elapsed() < RANKING_TTL {
                return Ok(r.clone());
            }
        }
        let listed = ctl.relays().await?;
        if listed.is_empty() {
            return Err(ChooseError::NoneListed);
        }
        let listed_names = listed.clone();
        let mut probes = tokio::task::JoinSet::new();
        for relay in listed {
            let ctl = ctl.clone();
            probes.spawn(async move {
                let rtt = probe_relay(&ctl, &relay, PROBE_TIMEOUT).await;
                if let Err(e) = &rtt {
                    tracing::info!(%relay, error = %e, "relay not reached; skipped");
                }
                (relay, rtt.map(|(_, d)| d).unwrap_or(Duration::MAX))
            });
        }
        // Not held up by a relay that stalls: once one has answered, the others get as long
        // again as it took (at least GRACE) to show they are faster; whoever has not answered by
        // then counts as not reached, and is measured again with the next ranking.
        let started = tokio::time::Instant::now();
        let mut cutoff: Option<tokio::time::Instant> = None;
        let mut ranking = Vec::new();
        loop {
            let next = match cutoff {
                Some(at) => match tokio::time::timeout_at(at, probes.join_next()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                None => probes.join_next().await,
            };
            let Some(r) = next else { break };
            let Ok((relay, rtt)) = r else { continue };
            if rtt != Duration::MAX && cutoff.is_none() {
                cutoff = Some(tokio::time::Instant::now() + started.elapsed().max(GRACE));
            }
            ranking.push((relay, rtt));
        }
        for relay in listed_names {
            if !ranking.iter().any(|(r, _)| *r == relay) {
                tracing::info!(%relay, "relay did not answer as fast as another; skipped for now");
                ranking.push((relay, Duration::MAX));
            }
        }
        ranking.sort_by_key(|(n, d)| (*d, n.to_string()));
        *cached = Some((Instant::now(), ranking.clone()));
        Ok(ranking)
    }
}

/// Probes `relay` at the addresses of its signed record, in order, within `timeout` in all:
/// the address that answered with the relay's proof and the round trip, or why none did.
pub async fn probe_relay(ctl: &ControlClient, relay: &Name, timeout: Duration) -> Result<(String, Duration), String> {
    // The record's signature is checked against the relay's pinned key by the client.
    let record = ctl.fetch(relay, RELAY_RECORD).await.map_err(|e| e.to_string())?;
    let info = RelayInfo::decode(&record.value).map_err(|e| e.to_string())?;
    probe_addresses(ctl, relay, &info, timeout).await
}

/// [`probe_relay`] for a record already fetched.
pub async fn probe_addresses(
    ctl: &ControlClient,
    relay: &Name,
    info: &RelayInfo,
    timeout: Duration,
) -> Result<(String, Duration), String> {
    let keys = ctl.lookup(relay).await.map_err(|e| format!("cannot look up its key: {e}"))?;
    let expected = ExpectedRelay { name: relay, signing: &keys.signing };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reasons = Vec::new();
    for address in &info.addresses {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            reasons.push(format!("{address}: not tried, the {timeout:?} deadline passed"));
            continue;
        }
        match np_relay_proto::probe(address, ctl.keys(), ctl.me(), expected, left).await {
            Ok(rtt) => return Ok((address.clone(), rtt)),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(reasons.join("; "))
}
