//! What the control plane counts, for `np-control serve --metrics ADDR`.

use crate::store::Store;
use np_control_proto::ErrorCode;
use np_metrics::{Counter, Gauge, GaugeFn, Histogram, LabelledCounter, Registry, LATENCY_BUCKETS};
use std::sync::Arc;

/// Every [`ErrorCode`], as a label value.
const CODES: &[&str] = &[
    "bad_code",
    "code_used",
    "code_expired",
    "code_for_other_name",
    "name_taken",
    "unknown_identity",
    "bad_signature",
    "not_authenticated",
    "forbidden",
    "too_large",
    "bad_request",
    "not_found",
    "internal",
    "quota",
];

/// The label value of an error code.
pub(crate) fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadCode => "bad_code",
        ErrorCode::CodeUsed => "code_used",
        ErrorCode::CodeExpired => "code_expired",
        ErrorCode::CodeForOtherName => "code_for_other_name",
        ErrorCode::NameTaken => "name_taken",
        ErrorCode::UnknownIdentity => "unknown_identity",
        ErrorCode::BadSignature => "bad_signature",
        ErrorCode::NotAuthenticated => "not_authenticated",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Internal => "internal",
        ErrorCode::Quota => "quota",
    }
}

/// The control plane's counters, updated where things happen.
pub(crate) struct ControlMetrics {
    pub registry: Arc<Registry>,
    /// Connections between accept and authentication.
    pub preauth: Arc<Gauge>,
    /// Authenticated connections.
    pub authenticated: Arc<Gauge>,
    /// Auth requests by result (`ok` or an error code).
    pub authentications: Arc<LabelledCounter>,
    /// Enrol requests by result (`ok` or an error code).
    pub enrolments: Arc<LabelledCounter>,
    /// Connections that closed before authenticating, by why.
    pub handshake_failures: Arc<LabelledCounter>,
    /// Accept to authenticated (TLS, hello, signature check).
    pub handshake: Arc<Histogram>,
    pub notifications_accepted: Arc<Counter>,
    pub notifications_delivered: Arc<Counter>,
    pub notifications_queued: Arc<Counter>,
    pub notifications_expired: Arc<Counter>,
    /// Error replies sent, by code.
    pub refusals: Arc<LabelledCounter>,
}

impl ControlMetrics {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        let mut r = Registry::new();
        let preauth = Arc::new(Gauge::default());
        let authenticated = Arc::new(Gauge::default());
        let (p, a) = (preauth.clone(), authenticated.clone());
        r.add(
            "np_control_connections",
            "Client connections open now, by state (preauth: not yet authenticated).",
            GaugeFn::new("state", move || vec![("authenticated", a.get() as f64), ("preauth", p.get() as f64)]),
        );
        let authentications = r.labelled(
            "np_control_authentications_total",
            "Authentication attempts, by result (ok or the error code).",
            "result",
            &["ok", "unknown_identity", "bad_signature"],
        );
        let enrolments = r.labelled(
            "np_control_enrolments_total",
            "Enrolment attempts, by result (ok or the error code).",
            "result",
            &["ok", "bad_code", "code_used", "code_expired", "code_for_other_name", "name_taken", "bad_signature"],
        );
        let handshake_failures = r.labelled(
            "np_control_handshake_failures_total",
            "Connections closed before authenticating, by why.",
            "reason",
            &["timeout", "tls", "closed", "refused"],
        );
        let handshake = r.histogram(
            "np_control_handshake_seconds",
            "Time from accept to an authenticated connection (TLS, hello, signature).",
            LATENCY_BUCKETS,
        );
        let notifications_accepted =
            r.counter("np_control_notifications_accepted_total", "Notifications accepted from senders.");
        let notifications_delivered = r.counter(
            "np_control_notifications_delivered_at_once_total",
            "Accepted notifications pushed at once to a connected recipient.",
        );
        let notifications_queued = r.counter(
            "np_control_notifications_queued_total",
            "Accepted notifications whose recipient was not connected (kept until acknowledged or expired).",
        );
        let notifications_expired = r.counter(
            "np_control_notifications_expired_total",
            "Queued notifications deleted because their time-to-live passed.",
        );
        let refusals =
            r.labelled("np_control_refusals_total", "Error replies sent to clients, by error code.", "code", CODES);
        let gauge_store = store.clone();
        r.add(
            "np_control_queue_depth",
            "Notifications stored for absent recipients (read from the database at scrape time).",
            GaugeFn::new("", move || match gauge_store.queued_gauge() {
                Some(n) => vec![("", n as f64)],
                None => Vec::new(),
            }),
        );
        if let Some(pg) = store.pg() {
            register_pg(&mut r, pg, store.clone());
        }
        ControlMetrics {
            registry: Arc::new(r),
            preauth,
            authenticated,
            authentications,
            enrolments,
            handshake_failures,
            handshake,
            notifications_accepted,
            notifications_delivered,
            notifications_queued,
            notifications_expired,
            refusals,
        }
    }

    /// Counts an error reply.
    pub(crate) fn refused(&self, code: ErrorCode) {
        self.refusals.inc(code_name(code));
    }
}

/// The PostgreSQL store's metrics: its pool, how long its operations take, and how late
/// wake-ups from other nodes arrive.
fn register_pg(r: &mut Registry, pg: &crate::store::PgStore, store: Arc<Store>) {
    r.add(
        "np_control_store_connections",
        "PostgreSQL pool connections, by state (max: the pool's size; open; in_use: lent to an operation; \
         waiting: operations waiting for one).",
        GaugeFn::new("state", move || match store.pg().map(|p| p.pool_use()) {
            Some(u) => vec![
                ("max", u.max as f64),
                ("open", u.open as f64),
                ("in_use", u.in_use as f64),
                ("waiting", u.waiting as f64),
            ],
            None => Vec::new(),
        }),
    );
    r.register(
        "np_control_store_operation_seconds",
        "PostgreSQL store operations, from asking for a connection to the answer (a write: its commit).",
        pg.stats.operation.clone(),
    );
    r.register(
        "np_control_store_wake_lag_seconds",
        "From another node's NOTIFY (its clock) to this node reading the wake-up (LISTEN lag).",
        pg.stats.wake_lag.clone(),
    );
}
