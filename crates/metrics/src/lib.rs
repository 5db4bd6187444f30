//! Prometheus text metrics for the np servers, with nothing but atomics and a tiny HTTP
//! responder.
//!
//! A [`Registry`] holds named metrics with their help text; the server keeps `Arc`s of the
//! metrics it updates and hands the registry to [`http::serve`], which renders the text
//! exposition format (version 0.0.4) on `GET /metrics`. Values that already exist elsewhere
//! (sessions in a table, rows in a database) are read at scrape time by [`GaugeFn`] instead of
//! being mirrored.

pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Something that renders its samples under a metric name.
pub trait Metric: Send + Sync {
    /// `counter`, `gauge` or `histogram`.
    fn kind(&self) -> &'static str;
    /// Appends its sample lines (not the HELP and TYPE lines).
    fn render(&self, name: &str, out: &mut String);
}

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "{name} {}", self.get());
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds one now and takes it away when the returned guard drops, however the holder ends.
    pub fn track(self: &Arc<Self>) -> GaugeGuard {
        self.inc();
        GaugeGuard(self.clone())
    }
}

impl Metric for Gauge {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "{name} {}", self.get());
    }
}

/// See [`Gauge::track`].
#[derive(Debug)]
pub struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counters under one label, e.g. refusals by `reason`. Label values come from code (enum
/// variant names), never from the network, so the set stays small.
#[derive(Debug)]
pub struct LabelledCounter {
    label: &'static str,
    values: Mutex<BTreeMap<&'static str, u64>>,
}

impl LabelledCounter {
    /// A family under `label`, with `known` values shown (at zero) before they first happen.
    pub fn new(label: &'static str, known: &[&'static str]) -> Self {
        LabelledCounter { label, values: Mutex::new(known.iter().map(|k| (*k, 0)).collect()) }
    }

    /// Adds one under `value`.
    pub fn inc(&self, value: &'static str) {
        self.add(value, 1);
    }

    /// Adds `n` under `value`.
    pub fn add(&self, value: &'static str, n: u64) {
        let mut m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(value).or_insert(0) += n;
    }

    /// The value under `value` (0 if it never happened).
    pub fn get(&self, value: &str) -> u64 {
        let m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        m.get(value).copied().unwrap_or(0)
    }
}

impl Metric for LabelledCounter {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn render(&self, name: &str, out: &mut String) {
        let m = self.values.lock().unwrap_or_else(|e| e.into_inner());
        for (v, n) in m.iter() {
            let _ = writeln!(out, "{name}{{{}=\"{}\"}} {n}", self.label, escape(v));
        }
    }
}

/// Durations in fixed buckets (seconds), as Prometheus histograms are.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at most each bound (not cumulative; summed when rendered).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Buckets for handshakes and requests on a LAN or the internet: 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Histogram {
    /// A histogram with upper bounds `bounds` (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Metric for Histogram {
    fn kind(&self) -> &'static str {
        "histogram"
    }
    fn render(&self, name: &str, out: &mut String) {
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A gauge read at scrape time: `f` returns `(label value, value)` pairs under `label`, or one
/// pair with an empty label value for an unlabelled gauge.
pub struct GaugeFn<F> {
    label: &'static str,
    f: F,
}

impl<F: Fn() -> Vec<(&'static str, f64)> + Send + Sync> GaugeFn<F> {
    /// A gauge computed by `f`.
    pub fn new(label: &'static str, f: F) -> Self {
        GaugeFn { label, f }
    }
}

impl<F: Fn() -> Vec<(&'static str, f64)> + Send + Sync> Metric for GaugeFn<F> {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn render(&self, name: &str, out: &mut String) {
        for (v, n) in (self.f)() {
            if v.is_empty() {
                let _ = writeln!(out, "{name} {n}");
            } else {
                let _ = writeln!(out, "{name}{{{}=\"{}\"}} {n}", self.label, escape(v));
            }
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Entry {
    name: String,
    help: String,
    metric: Arc<dyn Metric>,
}

/// Named metrics, rendered in the order they were added.
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `metric` as `name` with a one-line `help`; returns it for the caller to update.
    pub fn add<M: Metric + 'static>(&mut self, name: &str, help: &str, metric: M) -> Arc<M> {
        let m = Arc::new(metric);
        self.register(name, help, m.clone());
        m
    }

    /// Adds a metric the caller already shares.
    pub fn register(&mut self, name: &str, help: &str, metric: Arc<dyn Metric>) {
        self.entries.push(Entry { name: name.to_string(), help: help.replace('\n', " "), metric });
    }

    /// A new counter.
    pub fn counter(&mut self, name: &str, help: &str) -> Arc<Counter> {
        self.add(name, help, Counter::default())
    }

    /// A new gauge.
    pub fn gauge(&mut self, name: &str, help: &str) -> Arc<Gauge> {
        self.add(name, help, Gauge::default())
    }

    /// A new labelled counter.
    pub fn labelled(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        known: &[&'static str],
    ) -> Arc<LabelledCounter> {
        self.add(name, help, LabelledCounter::new(label, known))
    }

    /// A new histogram.
    pub fn histogram(&mut self, name: &str, help: &str, bounds: &'static [f64]) -> Arc<Histogram> {
        self.add(name, help, Histogram::new(bounds))
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        for e in &self.entries {
            let _ = writeln!(out, "# HELP {} {}", e.name, e.help);
            let _ = writeln!(out, "# TYPE {} {}", e.name, e.metric.kind());
            e.metric.render(&e.name, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_kind() {
        let mut r = Registry::new();
        let c = r.counter("np_things_total", "Things.");
        let g = r.gauge("np_open", "Open now.");
        let l = r.labelled("np_refusals_total", "Refusals.", "reason", &["full"]);
        let h = r.histogram("np_wait_seconds", "Waits.", &[0.01, 0.1]);
        r.add("np_rows", "Rows.", GaugeFn::new("", || vec![("", 7.0)]));
        r.add("np_sessions", "Sessions.", GaugeFn::new("state", || vec![("waiting", 1.0), ("paired", 2.0)]));
        c.add(3);
        {
            let _a = g.track();
            let _b = g.track();
        }
        g.inc();
        l.inc("bad \"sig\"");
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let text = r.render();
        for line in [
            "# HELP np_things_total Things.",
            "# TYPE np_things_total counter",
            "np_things_total 3",
            "# TYPE np_open gauge",
            "np_open 1",
            "np_refusals_total{reason=\"full\"} 0",
            "np_refusals_total{reason=\"bad \\\"sig\\\"\"} 1",
            "# TYPE np_wait_seconds histogram",
            "np_wait_seconds_bucket{le=\"0.01\"} 1",
            "np_wait_seconds_bucket{le=\"0.1\"} 2",
            "np_wait_seconds_bucket{le=\"+Inf\"} 3",
            "np_wait_seconds_sum 3.055",
            "np_wait_seconds_count 3",
            "np_rows 7",
            "np_sessions{state=\"paired\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
