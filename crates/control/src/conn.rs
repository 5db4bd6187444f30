//! One client connection: TLS, hello, authentication (or enrolment) within a deadline, then
//! requests and pushes.

use crate::state::Shared;
use crate::store::StoreError;
use np_control_proto::{
    auth_transcript, enroll_transcript, ClientFrame, Delivery, ErrorCode, ErrorReply, IdentityInfo, Record,
    RecordState, Reply, Request, ServerFrame, ServerHello, MAX_ACK_BATCH, MAX_FRAME, MAX_PREAUTH_FRAME,
    PROTOCOL_VERSION, PUSH_WINDOW,
};
use np_identity::Name;
use np_wire::io::{read_msg, write_msg};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;

type Tls = TlsStream<TcpStream>;

/// Largest record value, key and reader list a client may publish.
const MAX_RECORD_VALUE: usize = 16 * 1024;
const MAX_RECORD_KEY: usize = 128;
const MAX_READERS: usize = 64;
/// Most records one `List` returns.
const MAX_LIST: usize = 1000;

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply { code, message: message.into() }
}

fn store_err(e: StoreError) -> ErrorReply {
    match e {
        StoreError::BadCode => err(ErrorCode::BadCode, e.to_string()),
        StoreError::CodeUsed => err(ErrorCode::CodeUsed, e.to_string()),
        StoreError::CodeExpired => err(ErrorCode::CodeExpired, e.to_string()),
        StoreError::CodeForOtherName(_) => err(ErrorCode::CodeForOtherName, e.to_string()),
        StoreError::NameTaken(_) => err(ErrorCode::NameTaken, e.to_string()),
        StoreError::Limit(_) => err(ErrorCode::TooLarge, e.to_string()),
        StoreError::Quota(_) => err(ErrorCode::Quota, e.to_string()),
        StoreError::Redb(_)
        | StoreError::Postgres(_)
        | StoreError::InUse(_)
        | StoreError::Corrupt(_)
        | StoreError::WriterGone => {
            tracing::error!(error = %e, "storage failure");
            err(ErrorCode::Internal, "the control plane could not complete this (storage failure); try again")
        }
    }
}

/// A store operation's result as a reply.
async fn db<T>(f: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, ErrorReply> {
    f.await.map_err(store_err)
}

/// Serves one connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: u64,
    permit: np_limits::PreAuthPermit,
) {
    let deadline = shared.cfg.auth_timeout;
    let started = std::time::Instant::now();
    let preauth = shared.metrics.preauth.track();
    let authed = tokio::time::timeout(deadline, async {
        // A client that says something is kept over silent ones when the limit is reached
        // (np-limits: marked once a byte has really arrived, evicted only as a silent one that
        // really was). An end of stream or an error here fails in `authenticate`.
        let evicted = || PreauthFailure { kind: EVICTED, reason: String::new() };
        permit.first_byte(&tcp).await.map_err(|np_limits::Evicted| evicted())?.map_err(closed)?;
        permit.unless_evicted(authenticate(&shared, acceptor, tcp)).await.map_err(|np_limits::Evicted| evicted())?
    })
    .await;
    drop(permit);
    drop(preauth);
    let m = &shared.metrics;
    let (rd, wr, me) = match authed {
        Err(_) => {
            m.handshake_failures.inc("timeout");
            tracing::debug!(%peer, "closed: authentication timed out");
            return;
        }
        Ok(Err(failure)) if failure.kind == EVICTED => {
            tracing::debug!(%peer, "closed: the oldest unauthenticated connection, evicted at the limit");
            return;
        }
        Ok(Err(failure)) => {
            m.handshake_failures.inc(failure.kind);
            tracing::debug!(%peer, reason = %failure.reason, "closed before authentication");
            return;
        }
        Ok(Ok(x)) => x,
    };
    m.handshake.observe(started.elapsed());
    let _authenticated = m.authenticated.track();
    tracing::info!(name = %me.name, %peer, conn, "authenticated");
    let (live_tx, live_rx) = mpsc::channel(crate::hub::CONN_QUEUE);
    let (reply_tx, reply_rx) = mpsc::channel(MAX_CONCURRENT_REQUESTS + 1);
    let kill = Arc::new(Notify::new());
    let resync = Arc::new(Notify::new());
    let window = Arc::new(Window::default());
    // Registered before the queue is read, so a notification arriving in between is pushed (and
    // perhaps sent twice; the writer and the client drop duplicates) rather than missed.
    shared.hub.add(&me.name, conn, crate::hub::ConnHandle { tx: live_tx, kill: kill.clone(), resync: resync.clone() });
    shared.presence.open(conn);
    // A notification pushed just before this registration missed it, and its commit may still be
    // on its way, so the queue read next could miss it too and it would reach this connection
    // never. Every such commit was submitted to the (ordered) write lane before now: wait for
    // the lane to get past this point first.
    if db(shared.store.barrier()).await.is_err() {
        tracing::error!(name = %me.name, "the database writer failed");
    }
    let (pages_tx, pages_rx) = mpsc::channel(1);
    let backlog = tokio::spawn(read_backlog(shared.clone(), me.name.clone(), pages_tx, resync));
    let mut writer = tokio::spawn(write_loop(reply_rx, live_rx, pages_rx, window.clone(), wr));
    let result = tokio::select! {
        r = read_loop(&shared, &me, conn, rd, reply_tx, &window) => r,
        _ = kill.notified() => Err("closed by the operator (revoked)".into()),
        _ = &mut writer => Err("writing to it failed".into()),
    };
    shared.hub.remove(&me.name, conn);
    // At once, before the writer drains: readers see the device gone within their next request.
    let now = crate::now_ms();
    for (_, key) in shared.presence.close(conn, now) {
        tracing::info!(name = %me.name, conn, %key, "no connection holds the record any more: disconnected");
        if let Err(e) = shared.store.presence_release(&me.name, &key, now).await {
            tracing::warn!(name = %me.name, error = %e, "could not tell the other nodes of a released record");
        }
    }
    backlog.abort();
    // The writer ends once every reply of the requests still running is written.
    if !writer.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut writer).await;
        writer.abort();
    }
    match result {
        Ok(()) => tracing::info!(name = %me.name, conn, "disconnected"),
        Err(reason) => tracing::info!(name = %me.name, conn, %reason, "connection closed"),
    }
}

/// Requests of one connection handled at once: a slow one (a notification waits for its commit)
/// does not hold up a lookup behind it, and a client cannot make the server hold more than this
/// many (the reader stops reading until one is answered).
const MAX_CONCURRENT_REQUESTS: usize = 16;
/// Notifications read from the database at a time when streaming a backlog.
const BACKLOG_PAGE: usize = 128;

/// The pushes of a connection that are written and not yet acknowledged. At most
/// [`PUSH_WINDOW`]: the client's push queue holds at least that many, so its reader never waits
/// for the code that drains that queue (which needs the same reader for its lookups and acks).
#[derive(Default)]
struct Window {
    in_flight: std::sync::Mutex<HashSet<u64>>,
    /// Room was made by an acknowledgement.
    freed: Notify,
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_room(&self) -> bool {
        self.lock().len() < PUSH_WINDOW
    }

    /// Marks `seq` as written; false if it already is (written once, unacknowledged).
    fn sent(&self, seq: u64) -> bool {
        self.lock().insert(seq)
    }

    fn acked(&self, seqs: &[u64]) {
        let mut w = self.lock();
        let mut any = false;
        for s in seqs {
            any |= w.remove(s);
        }
        drop(w);
        if any {
            self.freed.notify_one();
        }
    }
}

/// Streams the recipient's queue from the database, a page at a time, to the writer (which takes
/// a page only when its window has room, so at most two pages are in memory). At the end it waits
/// for a resync (a live push that did not fit) and reads the queue again from the start; what
/// was acknowledged meanwhile is gone, and what is still in flight the writer skips.
async fn read_backlog(
    shared: Arc<Shared>,
    name: Name,
    pages: mpsc::Sender<Vec<(u64, np_identity::Envelope)>>,
    resync: Arc<Notify>,
) {
    loop {
        let mut after = None;
        let mut total = 0usize;
        loop {
            let page = match db(shared.store.pending_page(&name, after, crate::now_ms(), BACKLOG_PAGE)).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(%name, error = %e.message, "could not read queued notifications");
                    break;
                }
            };
            total += page.items.len();
            if !page.items.is_empty() && pages.send(page.items).await.is_err() {
                return;
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        if total > 0 {
            tracing::debug!(%name, queued = total, "delivered queued notifications");
        }
        resync.notified().await;
    }
}

/// Writes a connection's frames: replies first (they never wait behind pushes), then live pushes,
/// then the backlog; pushes only while the window has room.
async fn write_loop(
    mut replies: mpsc::Receiver<(ServerFrame, OwnedSemaphorePermit)>,
    mut live: mpsc::Receiver<ServerFrame>,
    mut pages: mpsc::Receiver<Vec<(u64, np_identity::Envelope)>>,
    window: Arc<Window>,
    mut wr: WriteHalf<Tls>,
) {
    let mut page: std::collections::VecDeque<(u64, np_identity::Envelope)> = Default::default();
    loop {
        // Whatever is ready, by priority, without waiting.
        let frame = if let Ok((reply, _permit)) = replies.try_recv() {
            Some(reply)
        } else if !window.has_room() {
            None
        } else if let Ok(push) = live.try_recv() {
            Some(push)
        } else {
            page.pop_front().map(|(seq, envelope)| ServerFrame::Push(Delivery { seq, envelope }))
        };
        let frame = match frame {
            Some(f) => f,
            None => {
                let room = window.has_room();
                tokio::select! {
                    biased;
                    r = replies.recv() => match r {
                        Some((reply, _permit)) => reply,
                        // The reader and every request it started are done.
                        None => break,
                    },
                    p = live.recv(), if room => match p {
                        Some(p) => p,
                        None => break,
                    },
                    p = pages.recv(), if room && page.is_empty() => {
                        if let Some(p) = p {
                            page.extend(p);
                        }
                        continue;
                    }
                    _ = window.freed.notified(), if !room => continue,
                }
            }
        };
        // A push already in flight (sent from the backlog, then live, or the reverse) is not
        // sent twice.
        if let ServerFrame::Push(d) = &frame {
            if !window.sent(d.seq) {
                continue;
            }
        }
        if write_msg(&mut wr, &frame).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Why a connection ended before authenticating: `kind` for the metrics, `reason` for the log.
struct PreauthFailure {
    kind: &'static str,
    reason: String,
}

/// The `kind` of a connection evicted at the pre-auth limit (logged, not counted as a failed
/// handshake).
const EVICTED: &str = "evicted";

fn closed(reason: impl ToString) -> PreauthFailure {
    PreauthFailure { kind: "closed", reason: reason.to_string() }
}

async fn authenticate(
    shared: &Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> Result<(ReadHalf<Tls>, WriteHalf<Tls>, IdentityInfo), PreauthFailure> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| PreauthFailure { kind: "tls", reason: format!("TLS handshake failed: {e}") })?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let nonce = np_identity::random32().map_err(closed)?;
    write_msg(&mut wr, &ServerHello { version: PROTOCOL_VERSION, nonce }).await.map_err(closed)?;
    let frame: ClientFrame = match read_msg(&mut rd, MAX_PREAUTH_FRAME).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(closed("closed by the client")),
        Err(e) => {
            // Tell a confused client why, then close.
            shared.metrics.refused(ErrorCode::BadRequest);
            let reply = ServerFrame::Reply { id: 0, result: Err(err(ErrorCode::BadRequest, e.to_string())) };
            let _ = write_msg(&mut wr, &reply).await;
            return Err(PreauthFailure { kind: "refused", reason: e.to_string() });
        }
    };
    let result = first_request(shared, &nonce, frame.req).await;
    if let Err(e) = &result {
        shared.metrics.refused(e.code);
    }
    let reply =
        ServerFrame::Reply { id: frame.id, result: result.as_ref().map(|(r, _)| r.clone()).map_err(|e| e.clone()) };
    write_msg(&mut wr, &reply).await.map_err(closed)?;
    match result {
        Ok((_, info)) => Ok((rd, wr, info)),
        Err(e) => {
            let _ = wr.shutdown().await;
            Err(PreauthFailure { kind: "refused", reason: e.message })
        }
    }
}

/// The result label of an attempt.
fn result_label<T>(r: &Result<T, ErrorReply>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => crate::metrics::code_name(e.code),
    }
}

async fn first_request(
    shared: &Arc<Shared>,
    nonce: &[u8; 32],
    req: Request,
) -> Result<(Reply, IdentityInfo), ErrorReply> {
    match req {
        Request::Auth { name, sig } => {
            let r = auth(shared, nonce, name, sig).await;
            shared.metrics.authentications.inc(result_label(&r));
            r
        }
        Request::Enroll { secret, name, keys, sig } => {
            let r = enroll(shared, nonce, secret, name, keys, sig).await;
            shared.metrics.enrolments.inc(result_label(&r));
            r
        }
        _ => Err(err(ErrorCode::NotAuthenticated, "authenticate first (Auth or Enroll)")),
    }
}

async fn auth(
    shared: &Arc<Shared>,
    nonce: &[u8; 32],
    name: Name,
    sig: Vec<u8>,
) -> Result<(Reply, IdentityInfo), ErrorReply> {
    let info = db(shared.store.identity(&name))
        .await?
        .ok_or_else(|| err(ErrorCode::UnknownIdentity, format!("{name} is not enrolled on this control plane")))?;
    np_identity::verify(&info.keys.signing, &auth_transcript(nonce, &name), &sig).map_err(|_| {
        err(
            ErrorCode::BadSignature,
            format!("authentication as {name} failed: signature does not verify with its enrolled key"),
        )
    })?;
    Ok((Reply::Authenticated { name }, info))
}

async fn enroll(
    shared: &Arc<Shared>,
    nonce: &[u8; 32],
    secret: [u8; 16],
    name: Name,
    keys: np_identity::PublicKeys,
    sig: Vec<u8>,
) -> Result<(Reply, IdentityInfo), ErrorReply> {
    np_identity::verify(&keys.signing, &enroll_transcript(nonce, &name, &keys), &sig)
        .map_err(|_| err(ErrorCode::BadSignature, "enrolment signature does not verify"))?;
    let info = db(shared.store.enroll(secret, &name, keys, crate::now_ms())).await?;
    tracing::info!(%name, keys = %keys.fingerprint(), "enrolled");
    Ok((Reply::Enrolled { name }, info))
}

async fn read_loop(
    shared: &Arc<Shared>,
    me: &IdentityInfo,
    conn: u64,
    mut rd: ReadHalf<Tls>,
    replies: mpsc::Sender<(ServerFrame, OwnedSemaphorePermit)>,
    window: &Arc<Window>,
) -> Result<(), String> {
    let running = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
    loop {
        // One permit per request, returned when its reply is written: the reply channel never
        // fills, and a client that does not read its replies stops being read.
        let Ok(permit) = running.clone().acquire_owned().await else {
            return Err("closed".into());
        };
        let frame: ClientFrame = match read_msg(&mut rd, MAX_FRAME).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                shared.metrics.refused(ErrorCode::BadRequest);
                let reply = ServerFrame::Reply { id: 0, result: Err(err(ErrorCode::BadRequest, e.to_string())) };
                let _ = replies.send((reply, permit)).await;
                return Err(e.to_string());
            }
        };
        // Acknowledgements open the window at once; the deletion follows through the write lane.
        match &frame.req {
            Request::Ack { seq } => window.acked(&[*seq]),
            Request::AckMany { seqs } if seqs.len() <= MAX_ACK_BATCH => window.acked(seqs),
            _ => {}
        }
        let (shared, me, replies) = (shared.clone(), me.clone(), replies.clone());
        tokio::spawn(async move {
            let result = handle(&shared, &me, conn, frame.req).await;
            if let Err(e) = &result {
                shared.metrics.refused(e.code);
            }
            let _ = replies.send((ServerFrame::Reply { id: frame.id, result }, permit)).await;
        });
    }
}

/// How long a `Status` request waits for the store to answer before saying it does not.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn handle(shared: &Arc<Shared>, me: &IdentityInfo, conn: u64, req: Request) -> Result<Reply, ErrorReply> {
    let store = &shared.store;
    match req {
        Request::Auth { .. } | Request::Enroll { .. } => Err(err(ErrorCode::BadRequest, "already authenticated")),
        Request::Ping => Ok(Reply::Pong),
        // The kind only, never the database's address; a check costs one round trip to it, as a
        // lookup does.
        Request::Status => Ok(Reply::Status(np_control_proto::NodeStatus {
            store: store.kind().to_string(),
            store_answers: store.answers(STATUS_TIMEOUT).await,
        })),
        Request::Lookup { name } => db(store.identity(&name))
            .await?
            .map(Reply::Identity)
            .ok_or_else(|| err(ErrorCode::UnknownIdentity, format!("{name} is not enrolled on this control plane"))),
        Request::Resolve { name } => match db(store.identity(&name)).await? {
            Some(_) => Ok(Reply::Node { address: shared.public_address.clone() }),
            None => Err(err(ErrorCode::UnknownIdentity, format!("{name} is not enrolled on this control plane"))),
        },
        Request::Publish { record } => {
            if record.owner != me.name {
                return Err(err(ErrorCode::Forbidden, "a record can only be published by its owner"));
            }
            if record.value.len() > MAX_RECORD_VALUE
                || record.key.len() > MAX_RECORD_KEY
                || record.readers.len() > MAX_READERS
            {
                return Err(err(ErrorCode::TooLarge, format!("records are limited to a {MAX_RECORD_KEY}-byte key, {MAX_RECORD_VALUE}-byte value and {MAX_READERS} readers")));
            }
            np_identity::verify(&me.keys.signing, &record.signed_bytes(), &record.sig)
                .map_err(|_| err(ErrorCode::BadSignature, "record signature does not verify"))?;
            db(store.put_record(record)).await?;
            Ok(Reply::Published)
        }
        Request::Fetch { owner, key } => {
            let reader = &me.name;
            match db(store.record(&owner, &key)).await? {
                Some(r) if r.readable_by(reader) => Ok(Reply::Record(r)),
                _ => Err(err(ErrorCode::NotFound, format!("no record {key} of {owner} that you may read"))),
            }
        }
        Request::List { key_prefix } => {
            Ok(Reply::Records(db(store.records_for(&me.name, &key_prefix, MAX_LIST)).await?))
        }
        Request::ListWithPresence { key_prefix } => {
            let records = db(store.records_for(&me.name, &key_prefix, MAX_LIST)).await?;
            Ok(Reply::RecordStates(with_presence(shared, records).await))
        }
        Request::FetchWithPresence { owner, key } => {
            let reader = &me.name;
            match db(store.record(&owner, &key)).await? {
                Some(r) if r.readable_by(reader) => {
                    let mut states = with_presence(shared, vec![r]).await;
                    states.pop().map(Reply::RecordState).ok_or_else(|| err(ErrorCode::Internal, "record lost"))
                }
                _ => Err(err(ErrorCode::NotFound, format!("no record {key} of {owner} that you may read"))),
            }
        }
        Request::Hold { key } => {
            if key.len() > MAX_RECORD_KEY {
                return Err(err(ErrorCode::TooLarge, format!("record keys are limited to {MAX_RECORD_KEY} bytes")));
            }
            // Keyed by the authenticated name: a connection holds only its own identity's records.
            let now = crate::now_ms();
            match shared.presence.hold(conn, &me.name, &key, now) {
                Ok(()) => {
                    tracing::debug!(name = %me.name, conn, %key, "record held while this connection lasts");
                    // For the other nodes sharing the store; this node's own answers need none of it.
                    if let Err(e) = store.presence_hold(&me.name, &key, now).await {
                        tracing::warn!(name = %me.name, error = %e, "could not tell the other nodes of a held record");
                    }
                    Ok(Reply::Held)
                }
                Err(e @ crate::presence::HoldError::Closed) => Err(err(ErrorCode::BadRequest, e.to_string())),
                Err(e) => Err(err(ErrorCode::TooLarge, e.to_string())),
            }
        }
        Request::Notify { envelope, ttl_secs } => notify(shared, me, envelope, ttl_secs).await,
        Request::Relays => Ok(Reply::Relays(db(store.relays()).await?)),
        Request::Ack { seq } => {
            db(store.ack_many(&me.name, vec![seq])).await?;
            Ok(Reply::Acked)
        }
        Request::AckMany { seqs } => {
            if seqs.len() > MAX_ACK_BATCH {
                return Err(err(ErrorCode::TooLarge, format!("at most {MAX_ACK_BATCH} acknowledgements at once")));
            }
            db(store.ack_many(&me.name, seqs)).await?;
            Ok(Reply::Acked)
        }
    }
}

/// Records with their presence: this node's own, merged with what the other nodes sharing the
/// store say (a device may hold its record on any of them).
async fn with_presence(shared: &Shared, records: Vec<Record>) -> Vec<RecordState> {
    let keys: Vec<(Name, String)> = match shared.store.is_shared() {
        true => records.iter().map(|r| (r.owner.clone(), r.key.clone())).collect(),
        false => Vec::new(),
    };
    let elsewhere = match shared.store.presence_elsewhere(&keys, crate::now_ms()).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "presence on other nodes unknown");
            Default::default()
        }
    };
    records
        .into_iter()
        .map(|record| {
            let here = shared.presence.of(&record.owner, &record.key);
            let presence = match elsewhere.get(&(record.owner.clone(), record.key.clone())) {
                Some(there) => crate::presence::either(here, *there),
                None => here,
            };
            RecordState { presence, record }
        })
        .collect()
}

async fn notify(
    shared: &Arc<Shared>,
    me: &IdentityInfo,
    envelope: np_identity::Envelope,
    ttl_secs: u32,
) -> Result<Reply, ErrorReply> {
    if envelope.from != me.name {
        return Err(err(
            ErrorCode::Forbidden,
            format!("envelope claims to be from {}, but you are {}", envelope.from, me.name),
        ));
    }
    envelope
        .verify_sender(&me.keys.signing)
        .map_err(|_| err(ErrorCode::BadSignature, "envelope signature does not verify"))?;
    let to: Name = envelope.to.clone();
    if db(shared.store.identity(&to)).await?.is_none() {
        return Err(err(ErrorCode::UnknownIdentity, format!("{to} is not enrolled on this control plane")));
    }
    // Over its share: refused before the recipient sees anything (checked again, under the
    // queue's lock, when it is stored).
    db(shared.store.admit(&to, &me.name)).await?;
    let ttl_ms = (u64::from(ttl_secs) * 1000).min(shared.cfg.max_ttl.as_millis() as u64);
    let expires = crate::now_ms().saturating_add(ttl_ms);
    let seq = shared.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stored = shared.store.enqueue_at(seq, envelope.clone(), expires);
    // Pushed before the commit completes (see `lane`); the sender's answer waits for it.
    let pushed = shared.hub.push(&to, &Delivery { seq, envelope });
    let stored = stored.await;
    for resync in pushed.overflowed {
        resync.notify_one();
    }
    let delivered = pushed.delivered;
    stored.map_err(store_err)?;
    let m = &shared.metrics;
    m.notifications_accepted.inc();
    if delivered {
        m.notifications_delivered.inc()
    } else {
        m.notifications_queued.inc()
    }
    tracing::debug!(from = %me.name, %to, seq, delivered, "notification accepted");
    Ok(Reply::Accepted { seq, delivered })
}
