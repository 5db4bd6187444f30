//! One suite, both stores: every property of the control plane's store, checked against the
//! embedded redb store and against a throwaway PostgreSQL that each test starts itself
//! (`np-testpg`; skipped, loudly, only when no PostgreSQL binaries exist on the machine; CI
//! installs them).

use np_control::store::{Location, Quota, Store, StoreError};
use np_identity::{Envelope, Keys, Name};
use np_testpg::TempPostgres;
use std::sync::Arc;

fn n(s: &str) -> Name {
    s.parse().expect("name")
}

/// What keeps a store's data alive for one test (held, never read).
enum Backing {
    Redb(#[allow(dead_code)] tempfile::TempDir),
    Pg(TempPostgres),
}

/// One store of a test, and how to open it again.
struct Under {
    at: Location,
    backing: Backing,
}

impl Under {
    /// A fresh store of `kind` ("redb" or "pg"); `None` when PostgreSQL is not installed.
    fn new(kind: &str) -> Option<Under> {
        match kind {
            "redb" => {
                let dir = tempfile::tempdir().expect("tmp");
                Some(Under { at: Location::Embedded(dir.path().join("db")), backing: Backing::Redb(dir) })
            }
            _ => {
                let pg = TempPostgres::start().expect("starting a throwaway PostgreSQL")?;
                Some(Under { at: Location::Postgres(pg.url("postgres")), backing: Backing::Pg(pg) })
            }
        }
    }

    async fn open(&self, quota: Quota) -> Store {
        Store::open(&self.at, quota).await.expect("open")
    }

    /// Ends the store as a crash would: the PostgreSQL server is stopped at once
    /// (`-m immediate`, no checkpoint) and started again; a redb file is simply reopened.
    fn crash(&mut self) {
        if let Backing::Pg(pg) = &mut self.backing {
            pg.stop().expect("stop");
            pg.start_again().expect("start again");
        }
    }
}

/// Declares `redb_NAME` and `pg_NAME`, each running `NAME(kind)`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod redb { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("redb").await })* }
        mod pg { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("pg").await })* }
    };
}

both!(
    enrolment_rules_and_names_never_taken_twice,
    a_code_is_redeemed_once_under_concurrency,
    queue_ack_sweep_and_sequence_numbers,
    quotas_per_sender_and_in_all_and_what_frees_them,
    a_backlog_is_read_in_pages,
    nothing_acknowledged_is_lost,
    relay_list,
    records_and_revocation,
);

async fn enrolment_rules_and_names_never_taken_twice(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let s = u.open(Quota::default()).await;
    let k = Keys::generate().expect("k").public();
    s.issue_code(&n("@a"), [1; 16], 1000).await.expect("issue");
    assert!(matches!(s.enroll([2; 16], &n("@a"), k, 10).await, Err(StoreError::BadCode)));
    assert!(matches!(s.enroll([1; 16], &n("@b"), k, 10).await, Err(StoreError::CodeForOtherName(_))));
    assert!(matches!(s.enroll([1; 16], &n("@a"), k, 2000).await, Err(StoreError::CodeExpired)));
    // A second code for the same name, issued before the first is used.
    s.issue_code(&n("@a"), [4; 16], 1000).await.expect("issue");
    let info = s.enroll([1; 16], &n("@a"), k, 10).await.expect("enrol");
    assert_eq!(info.name, n("@a"));
    assert!(matches!(s.enroll([1; 16], &n("@a"), k, 10).await, Err(StoreError::CodeUsed)));
    assert!(matches!(s.enroll([4; 16], &n("@a"), k, 10).await, Err(StoreError::NameTaken(_))), "never twice");
    assert!(matches!(s.issue_code(&n("@a"), [3; 16], 1000).await, Err(StoreError::NameTaken(_))));
    assert_eq!(s.identity(&n("@a")).await.expect("lookup").expect("enrolled").keys, k);
    assert!(s.identity(&n("@b")).await.expect("lookup").is_none());
}

async fn a_code_is_redeemed_once_under_concurrency(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let a = Arc::new(u.open(Quota::default()).await);
    // On PostgreSQL the race is between two nodes: two stores on the one database.
    let b = match kind {
        "pg" => Arc::new(u.open(Quota::default()).await),
        _ => a.clone(),
    };
    let k = Keys::generate().expect("k").public();
    for round in 0..3u8 {
        let name = n(&format!("@race{round}"));
        let secret = [round + 10; 16];
        a.issue_code(&name, secret, u64::MAX).await.expect("issue");
        let tries: Vec<_> = (0..16)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let name = name.clone();
                tokio::spawn(async move { s.enroll(secret, &name, k, 1).await })
            })
            .collect();
        let mut won = 0;
        for t in tries {
            match t.await.expect("task") {
                Ok(_) => won += 1,
                Err(StoreError::CodeUsed) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!(won, 1, "exactly one redemption of one code");
    }
}

fn envelope(from: &str, fk: &Keys, to: &str, tk: &Keys) -> Envelope {
    Envelope::seal(&n(from), fk, &n(to), &tk.public(), 1, b"x").expect("seal")
}

async fn queue_ack_sweep_and_sequence_numbers(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let s = u.open(Quota::default()).await;
    let (a, b) = (Keys::generate().expect("k"), Keys::generate().expect("k"));
    let env = envelope("@a", &a, "@b", &b);
    let s1 = s.start_seq().await.expect("seq");
    let s2 = s1 + 1;
    s.enqueue_at(s1, env.clone(), 100).await.expect("q");
    s.enqueue_at(s2, env.clone(), 10).await.expect("q");
    assert!(s.start_seq().await.expect("seq") > s2, "a restart never reuses a number");
    drop(s);
    let s = u.open(Quota::default()).await;
    assert!(s.start_seq().await.expect("seq") > s2, "nor does a reopening");
    let pending: Vec<u64> = s.pending(&n("@b"), 50).await.expect("p").iter().map(|p| p.0).collect();
    assert_eq!(pending, vec![s1]);
    assert!(s.pending(&n("@a"), 0).await.expect("p").is_empty());
    assert_eq!(s.sweep(50).await.expect("sweep"), 1);
    assert_eq!(s.ack_many(&n("@b"), vec![s1]).await.expect("ack"), 1);
    assert_eq!(s.ack_many(&n("@b"), vec![s1, s2]).await.expect("ack"), 0, "acknowledged twice, or swept");
    assert_eq!(s.queued_count().await.expect("n"), 0);
}

async fn quotas_per_sender_and_in_all_and_what_frees_them(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let quota = Quota { per_sender: 3, per_recipient: 5 };
    let s = u.open(quota).await;
    let keys: Vec<Keys> = (0..4).map(|_| Keys::generate().expect("k")).collect();
    let to = n("@dev");
    let mut seq = s.start_seq().await.expect("seq");
    let mut put = |from: &str, k: &Keys, expires: u64| {
        seq += 1;
        let w = s.enqueue_at(seq, envelope(from, k, "@dev", &keys[3]), expires);
        let at = seq;
        async move { w.await.map(|()| at) }
    };
    let mut m = Vec::new();
    for _ in 0..3 {
        m.push(put("@m", &keys[0], 100).await.expect("within share"));
    }
    assert!(matches!(put("@m", &keys[0], 100).await, Err(StoreError::Quota(_))), "over her share");
    assert!(matches!(s.admit(&to, &n("@m")).await, Err(StoreError::Quota(_))), "refused before a push too");
    put("@e", &keys[1], 10).await.expect("another sender");
    put("@e", &keys[1], 100).await.expect("another sender");
    // The total (5) is reached; a sender with fewer than RESERVED_PER_SENDER still gets in.
    put("@c", &keys[2], 100).await.expect("reserve");
    assert_eq!(s.queued_for(&to, &n("@m")).await.expect("n"), (3, 6));
    assert_eq!(s.ack_many(&to, m[..1].to_vec()).await.expect("ack"), 1);
    assert_eq!(s.queued_for(&to, &n("@m")).await.expect("n"), (2, 5));
    assert_eq!(s.sweep(50).await.expect("sweep"), 1);
    assert_eq!(s.queued_for(&to, &n("@e")).await.expect("n"), (1, 4));
    // Revoking @m deletes what she sent that still waits.
    assert!(!s.revoke(&n("@m")).await.expect("revoke"), "@m was never enrolled here");
    assert_eq!(s.queued_for(&to, &n("@m")).await.expect("n"), (0, 2));
    assert_eq!(s.pending(&to, 0).await.expect("p").len(), 2);
    // The counts come back with the store.
    drop(s);
    let s = u.open(quota).await;
    assert_eq!(s.queued_for(&to, &n("@e")).await.expect("n"), (1, 2));
    assert_eq!(s.sweep(1000).await.expect("sweep"), 2);
    assert_eq!(s.queued_count().await.expect("n"), 0);
}

async fn a_backlog_is_read_in_pages(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let s = u.open(Quota::default()).await;
    let (a, b) = (Keys::generate().expect("k"), Keys::generate().expect("k"));
    let env = envelope("@a", &a, "@b", &b);
    let first = s.start_seq().await.expect("seq");
    for i in 0..10 {
        s.enqueue_at(first + i, env.clone(), if i == 4 { 5 } else { 100 }).await.expect("q");
    }
    let mut after = None;
    let mut got = Vec::new();
    loop {
        let page = s.pending_page(&n("@b"), after, 50, 3).await.expect("page");
        assert!(page.items.len() <= 3);
        got.extend(page.items.iter().map(|p| p.0 - first));
        match page.next {
            Some(x) => after = Some(x),
            None => break,
        }
    }
    assert_eq!(got, vec![0, 1, 2, 3, 5, 6, 7, 8, 9], "in order, the expired one skipped");
    assert!(s.pending_page(&n("@b"), Some(u64::MAX), 50, 3).await.expect("page").items.is_empty());
}

/// Many writes at once, each acknowledged: after a crash of the database every one is there.
async fn nothing_acknowledged_is_lost(kind: &str) {
    let Some(mut u) = Under::new(kind) else { return };
    let s = Arc::new(u.open(Quota::default()).await);
    let keys: Vec<Keys> = (0..9).map(|_| Keys::generate().expect("k")).collect();
    let first = s.start_seq().await.expect("seq");
    let mut writes = Vec::new();
    for i in 0..80u64 {
        let from = format!("@s{}", i % 8);
        let env = envelope(&from, &keys[(i % 8) as usize], "@dev", &keys[8]);
        // Submitted in a burst, as the server's connections do: the lane groups them.
        writes.push(s.enqueue_at(first + i, env, u64::MAX));
    }
    for w in writes {
        w.await.expect("acknowledged");
    }
    let acked = s.ack_many(&n("@dev"), (0..20).map(|i| first + i).collect()).await.expect("ack");
    assert_eq!(acked, 20);
    drop(s);
    u.crash();
    let s = u.open(Quota::default()).await;
    let left: Vec<u64> = s.pending(&n("@dev"), 0).await.expect("p").iter().map(|p| p.0 - first).collect();
    assert_eq!(left, (20..80).collect::<Vec<_>>(), "every acknowledged write, and no acknowledged delete undone");
}

async fn relay_list(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let s = u.open(Quota::default()).await;
    assert!(s.relays().await.expect("list").is_empty());
    assert!(matches!(s.relay_add(&n("@relay"), 1).await, Err(StoreError::Limit(_))), "not enrolled yet");
    s.issue_code(&n("@relay"), [7; 16], u64::MAX).await.expect("code");
    s.enroll([7; 16], &n("@relay"), Keys::generate().expect("keys").public(), 1).await.expect("enrol");
    s.relay_add(&n("@relay"), 2).await.expect("add");
    s.relay_add(&n("@relay"), 3).await.expect("again");
    assert_eq!(s.relays().await.expect("list"), vec![n("@relay")]);
    assert!(s.relay_remove(&n("@relay")).await.expect("remove"));
    assert!(!s.relay_remove(&n("@relay")).await.expect("remove again"));
    s.relay_add(&n("@relay"), 4).await.expect("add");
    assert!(s.revoke(&n("@relay")).await.expect("revoke"));
    assert!(s.relays().await.expect("list").is_empty(), "a revoked relay leaves the list");
}

async fn records_and_revocation(kind: &str) {
    let Some(u) = Under::new(kind) else { return };
    let s = u.open(Quota::default()).await;
    let (ka, kb) = (Keys::generate().expect("k"), Keys::generate().expect("k"));
    s.issue_code(&n("@a"), [5; 16], u64::MAX).await.expect("code");
    s.enroll([5; 16], &n("@a"), ka.public(), 1).await.expect("enrol");
    let rec = |key: &str, readers: Vec<Name>| {
        let mut r = np_control_proto::Record {
            owner: n("@a"),
            key: key.into(),
            value: b"v".to_vec(),
            readers,
            updated_ms: 1,
            sig: Vec::new(),
        };
        r.sig = ka.sign(&r.signed_bytes()).to_vec();
        r
    };
    s.put_record(rec("device/pi", vec![n("@b")])).await.expect("put");
    s.put_record(rec("device/nas", vec![])).await.expect("put");
    // A prefix with LIKE's wildcards in it matches only itself.
    s.put_record(rec("dev_ce/x", vec![n("@b")])).await.expect("put");
    assert_eq!(s.record(&n("@a"), "device/pi").await.expect("get").expect("there").readers, vec![n("@b")]);
    let for_b: Vec<String> =
        s.records_for(&n("@b"), "device/", 10).await.expect("list").into_iter().map(|r| r.key).collect();
    assert_eq!(for_b, vec!["device/pi".to_string()]);
    assert_eq!(s.records_for(&n("@a"), "device/", 10).await.expect("list").len(), 2);
    assert_eq!(s.records_for(&n("@b"), "dev%", 10).await.expect("list").len(), 0);
    let env = envelope("@a", &ka, "@b", &kb);
    let seq = s.start_seq().await.expect("seq");
    s.enqueue_at(seq, env, u64::MAX).await.expect("q");
    assert!(s.revoke(&n("@a")).await.expect("revoke"));
    assert!(s.identity(&n("@a")).await.expect("lookup").is_none());
    assert!(s.record(&n("@a"), "device/pi").await.expect("get").is_none());
    assert!(s.pending(&n("@b"), 0).await.expect("p").is_empty(), "what it sent goes with it");
}

/// The database lost mid-run: every operation fails at once with an error naming the store
/// (none hangs), and the same store serves again as soon as the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_database_lost_mid_run_refuses_then_serves_again() {
    let Some(mut u) = Under::new("pg") else { return };
    let s = u.open(Quota::default()).await;
    s.issue_code(&n("@a"), [1; 16], u64::MAX).await.expect("issue");
    let Backing::Pg(pg) = &mut u.backing else { unreachable!() };
    pg.stop().expect("stop");
    let e = s.identity(&n("@a")).await.expect_err("refused");
    assert!(e.to_string().starts_with("PostgreSQL store at "), "{e}");
    let k = Keys::generate().expect("k").public();
    assert!(matches!(s.enroll([1; 16], &n("@a"), k, 1).await, Err(StoreError::Postgres(_))));
    pg.start_again().expect("start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let info = loop {
        match s.enroll([1; 16], &n("@a"), k, 1).await {
            Ok(info) => break info,
            // A pooled connection from before the restart fails once, and is then replaced.
            Err(StoreError::Postgres(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("not serving again: {e}"),
        }
    };
    assert_eq!(info.name, n("@a"), "the code survived, unused, and serves now");
}

/// A PostgreSQL store that is down at start: an error naming the store, and the server leaves
/// no data directory behind. Needs no PostgreSQL at all.
#[tokio::test]
async fn a_database_down_at_start_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("postgres://np@{}:5432/np", dir.path().display().to_string().replace('/', "%2F"));
    let e = Store::open(&Location::Postgres(url.clone()), Quota::default()).await.err().expect("refused");
    let msg = e.to_string();
    assert!(msg.starts_with("PostgreSQL store at ") && msg.contains(&dir.path().display().to_string()), "{msg}");
    let data = dir.path().join("data");
    let mut cfg = np_control::ServerConfig::new("127.0.0.1:0".parse().expect("addr"), data.clone());
    cfg.store = Some(url);
    let e = np_control::ControlServer::start(cfg).await.err().expect("refused");
    assert!(format!("{e:#}").contains("PostgreSQL store at"), "{e:#}");
    assert!(!data.exists(), "nothing created");
    assert!(matches!(
        Location::parse(Some("mysql://x"), data.clone()),
        Err(StoreError::Limit(m)) if m.contains("postgres://")
    ));
}

/// A hostile identity holding and releasing ever new keys (each connection holds a few, then
/// leaves) does not grow the presence table: only its newest released keys are kept. PostgreSQL
/// only; the embedded store keeps presence in memory, bounded in `presence.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_released_presence_is_bounded_per_identity() {
    let Some(u) = Under::new("pg") else { return };
    let (a, b) = (u.open(Quota::default()).await, u.open(Quota::default()).await);
    // Each node takes its run number (which names it in the presence table) as it starts.
    a.start_seq().await.expect("node a starts");
    b.start_seq().await.expect("node b starts");
    let m = n("@mallory");
    let keys: Vec<(Name, String)> = (0..200).map(|i| (m.clone(), format!("junk/{i:03}"))).collect();
    for (i, (_, key)) in keys.iter().enumerate() {
        let t = 1_000_000 + 10 * i as u64;
        a.presence_hold(&m, key, t).await.expect("hold");
        a.presence_release(&m, key, t + 1).await.expect("release");
    }
    let seen = b.presence_elsewhere(&keys, 1_000_000 + 10 * 200).await.expect("elsewhere");
    let kept = np_control::store::MAX_RELEASED_PER_OWNER as usize;
    assert!(seen.len() <= kept, "{} released keys kept, at most {kept} allowed", seen.len());
    assert!(seen.contains_key(&keys[199]), "the newest release is kept");
    assert!(!seen.contains_key(&keys[0]), "the oldest is gone");
}
