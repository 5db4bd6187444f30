//! What the relay counts, for `np-relay --metrics ADDR`.

use crate::refusal::Refusal;
use np_metrics::{Counter, Histogram, LabelledCounter, Registry, LATENCY_BUCKETS};
use std::sync::Arc;

/// Counters updated where things happen; gauges are read from the relay's table at scrape time.
pub(crate) struct RelayMetrics {
    /// Sessions whose two sides were paired.
    pub pairings: Arc<Counter>,
    /// Bytes forwarded from the client side to the device side.
    pub client_to_device: Arc<Counter>,
    /// Bytes forwarded from the device side to the client side.
    pub device_to_client: Arc<Counter>,
    /// Refused connections, by [`Refusal::kind`].
    pub refusals: Arc<LabelledCounter>,
    /// First side's verified Join to both sides paired.
    pub handshake: Arc<Histogram>,
}

impl RelayMetrics {
    pub(crate) fn new() -> Self {
        RelayMetrics {
            pairings: Arc::new(Counter::default()),
            client_to_device: Arc::new(Counter::default()),
            device_to_client: Arc::new(Counter::default()),
            refusals: Arc::new(LabelledCounter::new("reason", Refusal::KINDS)),
            handshake: Arc::new(Histogram::new(LATENCY_BUCKETS)),
        }
    }

    /// Adds the counters to `r` (gauges are added by the server, which owns the table).
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register("np_relay_pairings_total", "Sessions whose two sides were paired.", self.pairings.clone());
        let bytes = Arc::new(Bytes { c2d: self.client_to_device.clone(), d2c: self.device_to_client.clone() });
        r.register(
            "np_relay_forwarded_bytes_total",
            "Bytes forwarded between paired sides (ciphertext), by direction.",
            bytes,
        );
        r.register("np_relay_refusals_total", "Connections refused before pairing, by reason.", self.refusals.clone());
        r.register(
            "np_relay_handshake_seconds",
            "Time from a session's first verified Join until both sides are paired.",
            self.handshake.clone(),
        );
    }
}

/// The two byte counters as one labelled metric.
struct Bytes {
    c2d: Arc<Counter>,
    d2c: Arc<Counter>,
}

impl np_metrics::Metric for Bytes {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn render(&self, name: &str, out: &mut String) {
        out.push_str(&format!("{name}{{direction=\"client_to_device\"}} {}\n", self.c2d.get()));
        out.push_str(&format!("{name}{{direction=\"device_to_client\"}} {}\n", self.d2c.get()));
    }
}
