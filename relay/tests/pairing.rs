//! Pairing, forwarding and refusals against a real relay on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use np_identity::Keys;
use np_relay::{join_transcript, Join, JoinError, RelayConfig, Role};
use np_wire::encode_msg;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn quick() -> RelayConfig {
    RelayConfig {
        auth_deadline: Duration::from_millis(500),
        pairing_deadline: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

fn refused_with(r: Result<TcpStream, JoinError>, want: &str) {
    match r {
        Err(JoinError::Refused(reason)) => assert_eq!(reason, want),
        Err(e) => panic!("expected refusal {want:?}, got error {e}"),
        Ok(_) => panic!("expected refusal {want:?}, got a paired stream"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_and_talk_both_ways_with_half_close() {
    let w = world(quick()).await;
    let (mut c, mut d) = w.pair(session(1)).await;
    w.stats_until("one forwarding session", |s| s.forwarding == 1 && s.sessions == 1).await;
    c.write_all(b"hello device").await.unwrap();
    let mut buf = [0u8; 12];
    d.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello device");
    d.write_all(b"hello client").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello client");

    // Client half-closes; the device sees EOF and can still answer.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    d.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    d.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    d.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_half_closes_first() {
    let w = world(quick()).await;
    let (mut c, mut d) = w.pair(session(2)).await;
    d.write_all(b"banner").await.unwrap();
    d.shutdown().await.unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"banner");
    c.write_all(b"late reply").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    d.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"late reply");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once() {
    let w = world(quick()).await;
    let (c, d) = w.pair(session(3)).await;
    const N: usize = 32 << 20;
    async fn send_and_count(mut s: TcpStream, fill: u8) -> usize {
        let (mut r, mut wr) = s.split();
        let send = async {
            let chunk = vec![fill; 64 * 1024];
            for _ in 0..N / chunk.len() {
                wr.write_all(&chunk).await.unwrap();
            }
            wr.shutdown().await.unwrap();
        };
        let recv = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0;
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    return n;
                }
                assert!(buf[..k].iter().all(|b| *b == fill ^ 0xff));
                n += k;
            }
        };
        tokio::join!(send, recv).1
    }
    let (a, b) = tokio::join!(send_and_count(c, 0x0f), send_and_count(d, 0xf0));
    assert_eq!((a, b), (N, N));
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_first_then_client_and_waiting_is_visible() {
    let w = Arc::new(world(quick()).await);
    let s = session(4);
    let dev = tokio::spawn({
        let w = w.clone();
        async move { w.device(s).await }
    });
    w.stats_until("one waiting session", |st| st.waiting == 1 && st.preauth == 0).await;
    let mut c = w.client(s).await.unwrap();
    let mut d = dev.await.unwrap().unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    d.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");
    drop((c, d));
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_join_times_out() {
    let w = world(quick()).await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    challenge(&mut s).await;
    w.stats_until("one pre-auth", |st| st.preauth == 1).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), refusal(&mut s)).await.unwrap();
    assert_eq!(reason.as_deref(), Some("authentication timed out"));
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_are_refused() {
    let w = world(quick()).await;
    let reason = send_raw(w.addr, &[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    assert!(reason.starts_with("malformed join: frame of 4294967295 bytes exceeds"), "{reason}");
    let reason = send_raw(w.addr, &[0, 0, 16, 1]).await.unwrap();
    assert!(reason.contains("exceeds the limit of 4096"), "{reason}");
    let mut garbage = 12u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"not postcard");
    let reason = send_raw(w.addr, &garbage).await.unwrap();
    assert!(reason.starts_with("malformed join"), "{reason}");
    // Lots of trailing garbage the relay never reads: the reason still arrives.
    let mut lots = garbage.clone();
    lots.extend(std::iter::repeat_n(0xa5u8, 200_000));
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    challenge(&mut s).await;
    let (mut r, mut wr) = s.split();
    let (_, reason) = tokio::join!(
        async {
            let _ = wr.write_all(&lots).await;
        },
        async { tokio::time::timeout(Duration::from_secs(5), refusal_half(&mut r)).await.unwrap() }
    );
    assert!(reason.unwrap().starts_with("malformed join"));
    // Random garbage of many shapes: a refusal or a close, never a stuck relay.
    for i in 0..50u32 {
        let mut bytes = vec![0u8; (i as usize * 37) % 300];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761).wrapping_add(j as u32 * 40503) >> 7) as u8;
        }
        let mut s = TcpStream::connect(w.addr).await.unwrap();
        challenge(&mut s).await;
        s.write_all(&bytes).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), refusal(&mut s)).await.unwrap();
    }
    w.idle().await;
    // Still serving.
    let (_c, _d) = w.pair(session(5)).await;
}

async fn refusal_half(r: &mut tokio::net::tcp::ReadHalf<'_>) -> Option<String> {
    use np_relay::RelayMsg;
    loop {
        match np_wire::io::read_msg::<RelayMsg, _>(r, 4096).await {
            Ok(Some(RelayMsg::Refused { reason })) => return Some(reason),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

fn signed_join(keys: &Keys, relay: &np_identity::Name, nonce: &[u8; 32], s: [u8; 16]) -> Join {
    let t = join_transcript(relay, nonce, &name(ALICE), Role::Client, &s, &name(DEV));
    Join {
        identity: name(ALICE),
        role: Role::Client,
        session: s,
        peer: name(DEV),
        side_nonce: [5; 32],
        sig: keys.sign(&t).to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signature_is_refused() {
    let w = world(quick()).await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let (relay, nonce) = challenge(&mut s).await;
    // Mallory signs a Join claiming to be Alice.
    let forged = signed_join(&w.mallory, &relay, &nonce, session(6));
    s.write_all(&encode_msg(&forged)).await.unwrap();
    assert_eq!(refusal(&mut s).await.as_deref(), Some("bad signature"));
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_join_is_refused() {
    let w = world(quick()).await;
    let sid = session(7);
    // Alice's genuine Join on one connection, as an eavesdropper would capture it.
    let mut s1 = TcpStream::connect(w.addr).await.unwrap();
    let (relay, nonce) = challenge(&mut s1).await;
    let captured = encode_msg(&signed_join(&w.alice, &relay, &nonce, sid));
    s1.write_all(&captured).await.unwrap();
    w.stats_until("alice waiting", |st| st.waiting == 1).await;
    // Resent on a new connection: its nonce differs, so the signature does not verify.
    let mut s2 = TcpStream::connect(w.addr).await.unwrap();
    challenge(&mut s2).await;
    s2.write_all(&captured).await.unwrap();
    assert_eq!(refusal(&mut s2).await.as_deref(), Some("bad signature"));
    assert_eq!(w.relay.stats().sessions, 1);
    drop(s1);
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_role_pairing_and_duplicates_are_refused() {
    let w = Arc::new(world(quick()).await);
    let sid = session(8);
    let first = tokio::spawn({
        let w = w.clone();
        async move { w.client(sid).await }
    });
    w.stats_until("client waiting", |st| st.waiting == 1).await;
    // A second client for the same session (two Clients, no Device): refused.
    refused_with(w.client(sid).await, "session already has a client");
    // The device pairs; a second device is refused too.
    let d = w.device(sid).await.unwrap();
    let c = first.await.unwrap().unwrap();
    refused_with(w.device(sid).await, "session already has a device");
    refused_with(w.client(sid).await, "session already has a client");
    assert_eq!(w.relay.stats().sessions, 1);
    drop((c, d));
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_side_times_out_and_late_side_is_refused() {
    let w = world(quick()).await;
    let sid = session(9);
    let started = std::time::Instant::now();
    refused_with(w.client(sid).await, "pairing deadline passed");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    w.stats_until("no sessions", |st| st.sessions == 0 && st.connections == 0).await;
    refused_with(w.device(sid).await, "pairing deadline passed");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_with_the_session_id_never_pairs() {
    let w = Arc::new(world(quick()).await);
    let sid = session(10);
    let first = tokio::spawn({
        let w = w.clone();
        async move { w.client(sid).await }
    });
    w.stats_until("client waiting", |st| st.waiting == 1).await;
    // Mallory, enrolled and correctly signed, claims to be the device for Alice's session.
    refused_with(w.join_as(&w.mallory, MALLORY, Role::Device, sid, ALICE).await, "pairing deadline passed");
    refused_with(first.await.unwrap(), "pairing deadline passed");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_not_in_allow_list_is_refused() {
    let w = world(RelayConfig { allow: Some(vec![name(ALICE), name(DEV)]), ..quick() }).await;
    refused_with(
        w.join_as(&w.mallory, MALLORY, Role::Client, session(11), DEV).await,
        "identity @mallory is not allowed on this relay",
    );
    let (_c, _d) = w.pair(session(12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_identity_is_refused() {
    let w = world(quick()).await;
    let eve = Keys::generate().unwrap();
    refused_with(w.join_as(&eve, "@eve", Role::Client, session(13), DEV).await, "unknown identity @eve");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_relay_name_is_refused_by_the_side() {
    let w = world(quick()).await;
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let r = np_relay::join(
        stream,
        &w.alice,
        &name(ALICE),
        Role::Client,
        session(14),
        &name(DEV),
        Some(np_relay::ExpectedRelay { name: &name("@other_relay"), signing: &w.relay_keys.public().signing }),
    )
    .await;
    assert!(matches!(r, Err(JoinError::WrongRelay { .. })), "{r:?}");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_prove_its_identity_is_refused_by_the_side() {
    // Something answers with the right name but holds another key (or none): the side stops
    // after the Waiting, before any session byte.
    let w = world(quick()).await;
    let impostor_key = Keys::generate().unwrap().public().signing;
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let expected = np_relay::ExpectedRelay { name: &name("@relay"), signing: &impostor_key };
    let r = np_relay::join(stream, &w.alice, &name(ALICE), Role::Client, session(15), &name(DEV), Some(expected)).await;
    assert!(matches!(r, Err(JoinError::NoProof(_))), "{r:?}");
    // With the real key the same relay is accepted (the proof is what made the difference).
    let s16 = session(16);
    let (a, d) = tokio::join!(
        async {
            let s = TcpStream::connect(w.addr).await.unwrap();
            let real = w.relay_keys.public().signing;
            let expected = np_relay::ExpectedRelay { name: &name("@relay"), signing: &real };
            np_relay::join(s, &w.alice, &name(ALICE), Role::Client, s16, &name(DEV), Some(expected)).await
        },
        w.join_as(&w.dev, DEV, Role::Device, s16, ALICE)
    );
    assert!(a.is_ok(), "{a:?}");
    assert!(d.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limits() {
    let w = Arc::new(
        world(RelayConfig {
            max_sessions_per_identity: 2,
            max_sessions: 3,
            pairing_deadline: Duration::from_secs(5),
            ..quick()
        })
        .await,
    );
    let mut waiting = Vec::new();
    for i in 0..2 {
        let w2 = w.clone();
        waiting.push(tokio::spawn(async move { w2.client(session(20 + i)).await }));
    }
    w.stats_until("two waiting", |st| st.waiting == 2).await;
    refused_with(w.client(session(22)).await, "too many sessions for @alice");
    let m = tokio::spawn({
        let w = w.clone();
        async move { w.join_as(&w.mallory, MALLORY, Role::Client, session(23), DEV).await }
    });
    w.stats_until("three waiting", |st| st.waiting == 3).await;
    refused_with(w.join_as(&w.mallory, MALLORY, Role::Client, session(24), DEV).await, "relay is full");
    m.abort();
    for t in waiting {
        t.abort();
    }
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_unauthenticated_connections() {
    // Deadlines long enough that a loaded machine cannot turn this into a timing test.
    let w = world(RelayConfig {
        max_preauth: 3,
        auth_deadline: Duration::from_secs(5),
        pairing_deadline: Duration::from_secs(5),
        ..RelayConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(w.addr).await.unwrap();
        challenge(&mut s).await;
        held.push(s);
    }
    // At the limit the oldest silent connection gives way to the newcomer, with the reason.
    let _newest = TcpStream::connect(w.addr).await.unwrap();
    assert_eq!(refusal(&mut held[0]).await.as_deref(), Some("too many unauthenticated connections"));
    drop(held);
    drop(_newest);
    w.idle().await;
    let (_c, _d) = w.pair(session(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_a_side_that_has_sent_bytes_outlives_younger_silent_ones() {
    let w = world(RelayConfig {
        max_preauth: 2,
        auth_deadline: Duration::from_secs(10),
        pairing_deadline: Duration::from_secs(10),
        ..RelayConfig::default()
    })
    .await;
    // The older connection has sent the first bytes of its Join (the relay's task may or may
    // not have seen them yet); the younger one has said nothing.
    let mut talker = TcpStream::connect(w.addr).await.unwrap();
    let (relay, nonce) = challenge(&mut talker).await;
    let s = session(33);
    let join = encode_msg(&signed_join(&w.alice, &relay, &nonce, s));
    talker.write_all(&join[..3]).await.unwrap();
    let mut silent = TcpStream::connect(w.addr).await.unwrap();
    challenge(&mut silent).await;
    // A newcomer at the limit: the silent one goes, though it is younger.
    let _newest = TcpStream::connect(w.addr).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), refusal(&mut silent)).await.unwrap();
    assert_eq!(reason.as_deref(), Some("too many unauthenticated connections"));
    // The talker still holds its place: the rest of its Join makes it the waiting client.
    talker.write_all(&join[3..]).await.unwrap();
    w.stats_until("the talker waiting for its device", |st| st.waiting == 1).await;
    w.device(s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_paired_session_is_closed() {
    let w = world(RelayConfig { idle_timeout: Duration::from_millis(400), ..quick() }).await;
    let (mut c, mut d) = w.pair(session(31)).await;
    // Activity keeps it alive past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        d.read_exact(&mut b).await.unwrap();
    }
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.unwrap().unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(350), "{waited:?}");
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_side_that_leaves_frees_its_place() {
    let w = world(RelayConfig { pairing_deadline: Duration::from_secs(30), ..quick() }).await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let (relay, nonce) = challenge(&mut s).await;
    s.write_all(&encode_msg(&signed_join(&w.alice, &relay, &nonce, session(32)))).await.unwrap();
    w.stats_until("waiting", |st| st.waiting == 1).await;
    drop(s);
    w.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_everything() {
    let alice = Keys::generate().unwrap();
    let dev = Keys::generate().unwrap();
    let dir = np_relay::StaticDirectory::new().with(name(ALICE), alice.public()).with(name(DEV), dev.public());
    let relay_keys = Arc::new(Keys::generate().unwrap());
    let config = RelayConfig { keys: Some(relay_keys.clone()), ..quick() };
    let relay = np_relay::Relay::bind("127.0.0.1:0".parse().unwrap(), config, Arc::new(dir)).await.unwrap();
    let relay_pk: &'static [u8; 32] = Box::leak(Box::new(relay_keys.public().signing));
    let addr = relay.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    let s = session(40);
    let side = |keys: &'static Keys, me: &'static str, role, peer: &'static str| async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let expected = np_relay::ExpectedRelay { name: &name("@relay"), signing: relay_pk };
        np_relay::join(stream, keys, &name(me), role, s, &name(peer), Some(expected)).await.unwrap()
    };
    let alice: &'static Keys = Box::leak(Box::new(alice));
    let dev: &'static Keys = Box::leak(Box::new(dev));
    let (mut c, mut d) = tokio::join!(side(alice, ALICE, Role::Client, DEV), side(dev, DEV, Role::Device, ALICE));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "client not closed at shutdown");
    let r = tokio::time::timeout(Duration::from_secs(5), d.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "device not closed at shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}
