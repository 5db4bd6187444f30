//! UDP associations between two muxes in memory, on a fake clock, and a hostile client's frames.

use super::*;
use crate::frame::{DATAGRAM_HEADER, MAX_DATAGRAM};

fn udp() -> MuxConfig {
    MuxConfig { udp: true, ..MuxConfig::default() }
}

fn datagrams(events: &mut Vec<Event>, assoc: AssocId) -> Vec<Bytes> {
    let mut v = Vec::new();
    events.retain(|e| match e {
        Event::Datagram { assoc: a, bytes } if *a == assoc => {
            v.push(bytes.clone());
            false
        }
        _ => true,
    });
    v
}

#[test]
fn datagrams_go_both_ways_whole_and_are_counted() {
    let mut p = Pair::new(udp());
    let a = p.client.udp_open("resolver:53", p.now).expect("open");
    assert!(p.client.udp_send(a, Bytes::from_static(b"query"), p.now));
    assert!(p.client.udp_send(a, Bytes::from_static(b""), p.now), "an empty datagram is a datagram");
    p.pump();
    assert_eq!(p.device_events.remove(0), Event::UdpOpened { assoc: a, target: "resolver:53".into() });
    assert_eq!(datagrams(&mut p.device_events, a), vec![Bytes::from_static(b"query"), Bytes::new()]);
    assert!(p.device.udp_send(a, Bytes::from(vec![7u8; 1200]), p.now));
    p.pump();
    assert_eq!(datagrams(&mut p.client_events, a), vec![Bytes::from(vec![7u8; 1200])]);
    let s = &p.client.udp_stats()[0];
    assert_eq!((s.datagrams_sent, s.bytes_sent, s.datagrams_received, s.bytes_received), (2, 5, 1, 1200));
    assert_eq!(p.device.udp_stats()[0].target, "resolver:53");
}

#[test]
fn a_refusal_ends_the_association_and_late_datagrams_are_dropped_not_fatal() {
    let mut p = Pair::new(udp());
    let a = p.client.udp_open("x:9", p.now).expect("open");
    p.pump();
    // A datagram in flight while the device refuses.
    assert!(p.client.udp_send(a, Bytes::from_static(b"late"), p.now));
    p.device.udp_close(a, "udp/x:9 is not permitted");
    p.pump();
    assert!(p.client_events.contains(&Event::UdpClosed { assoc: a, reason: "udp/x:9 is not permitted".into() }));
    assert!(!p.client.has_assoc(a) && !p.device.has_assoc(a));
    assert_eq!(p.device.udp_counters().dropped_unknown, 1);
    assert!(!p.client.udp_send(a, Bytes::from_static(b"x"), p.now));
    assert_eq!(p.client.udp_counters().dropped_unknown, 1);
    assert!(!p.client.is_closed() && !p.device.is_closed());
}

#[test]
fn without_negotiation_there_is_no_udp_and_a_udp_frame_is_a_protocol_error() {
    let mut p = Pair::new(MuxConfig::default());
    assert!(p.client.udp_open("x:9", p.now).is_err());
    let r = p.device.handle_frames(record(&[Frame::UdpOpen { assoc: 1, target: "x:9".into() }]), p.now);
    assert!(r.is_err() && p.device.is_closed());
    // Only the client opens associations.
    let mut p = Pair::new(udp());
    assert!(p.device.udp_open("x:9", p.now).is_err());
    assert!(p.client.handle_frames(record(&[Frame::UdpOpen { assoc: 1, target: "x:9".into() }]), p.now).is_err());
}

#[test]
fn hostile_association_frames_end_the_session() {
    for frames in [
        vec![Frame::Datagram { assoc: 1, bytes: Bytes::new() }],
        vec![Frame::UdpClose { assoc: 5, reason: "r".into() }],
        vec![Frame::UdpOpen { assoc: 2, target: "x:1".into() }],
        vec![Frame::UdpOpen { assoc: 3, target: "x:1".into() }, Frame::UdpOpen { assoc: 3, target: "x:1".into() }],
        vec![Frame::UdpOpen { assoc: 3, target: "x:1".into() }, Frame::UdpOpen { assoc: 1, target: "x:1".into() }],
    ] {
        let mut device = Mux::new(Role::Responder, udp(), Instant::now());
        assert!(device.handle_frames(record(&frames), Instant::now()).is_err(), "{frames:?}");
    }
}

#[test]
fn idle_associations_expire_on_both_sides() {
    let cfg = MuxConfig { udp_idle_timeout: Duration::from_secs(2), ..udp() };
    let mut p = Pair::new(cfg);
    let a = p.client.udp_open("x:9", p.now).expect("open");
    let b = p.client.udp_open("y:9", p.now).expect("open");
    p.pump();
    assert!(p.client.poll_timeout().is_some_and(|t| t <= p.now + Duration::from_secs(2)));
    p.now += Duration::from_millis(1500);
    assert!(p.client.udp_send(b, Bytes::from_static(b"keep"), p.now));
    p.pump();
    p.now += Duration::from_millis(600);
    p.client.handle_timeout(p.now);
    p.pump();
    assert!(p.client_events.contains(&Event::UdpClosed { assoc: a, reason: "idle".into() }));
    assert!(p.device_events.iter().any(|e| matches!(e, Event::UdpClosed { assoc, .. } if *assoc == a)));
    assert!(p.client.has_assoc(b) && p.device.has_assoc(b), "activity keeps it");
    p.now += Duration::from_secs(2);
    p.device.handle_timeout(p.now);
    p.pump();
    assert!(!p.client.has_assoc(b) && !p.device.has_assoc(b));
    assert_eq!(p.device.udp_counters().expired, 1);
    assert_eq!(p.client.udp_counters().expired, 1);
    assert!(!p.client.is_closed(), "the session outlives its associations");
}

#[test]
fn a_flood_of_associations_is_capped_by_evicting_the_least_recently_used() {
    let cfg = MuxConfig { max_udp_assocs: 8, ..udp() };
    let mut p = Pair::new(cfg);
    let first = p.client.udp_open("x:1", p.now).expect("open");
    for i in 0..10_000u32 {
        p.now += Duration::from_micros(1);
        let a = p.client.udp_open(&format!("x:{}", 2 + i % 60_000), p.now).expect("open");
        assert!(p.client.udp_send(a, Bytes::from_static(b"q"), p.now));
        if i % 100 == 0 {
            p.pump();
        }
        assert!(p.client.udp_stats().len() <= 8);
    }
    p.pump();
    assert!(!p.client.has_assoc(first));
    assert_eq!(p.device.udp_stats().len(), 8);
    assert_eq!(p.client.udp_counters().evicted, 10_001 - 8);
    assert!(!p.device.is_closed());
    // A client that opens past the cap without evicting is abusive.
    let mut device = Mux::new(Role::Responder, MuxConfig { max_udp_assocs: 2, ..udp() }, p.now);
    let opens: Vec<Frame> = (0..3).map(|i| Frame::UdpOpen { assoc: 2 * i + 1, target: "x:1".into() }).collect();
    assert!(matches!(device.handle_frames(record(&opens), p.now), Err(SessionError::Limit(_))));
}

#[test]
fn the_send_queue_is_bounded_and_flows_still_get_half_of_each_record() {
    let cfg = MuxConfig { max_udp_queued: 200_000, ..udp() };
    let mut p = Pair::new(cfg);
    let f = p.client.open("x:22").expect("open");
    p.pump();
    p.device.accept(f).expect("accept");
    p.pump();
    let a = p.client.udp_open("x:5201", p.now).expect("open");
    let mut sent = 0;
    for _ in 0..1000 {
        sent += usize::from(p.client.udp_send(a, Bytes::from(vec![0u8; 1400]), p.now));
    }
    assert!(p.client.udp_queued() <= 200_000);
    assert_eq!(sent, 200_000 / (1400 + DATAGRAM_HEADER));
    assert_eq!(p.client.udp_counters().dropped_queue_full, (1000 - sent) as u64);
    assert!(!p.client.udp_send(a, Bytes::from(vec![0u8; MAX_DATAGRAM + 1]), p.now));
    assert_eq!(p.client.udp_counters().dropped_oversized, 1);
    assert!(p.client.udp_queued() > 200_000 - (1400 + DATAGRAM_HEADER), "the queue was filled");
    // The flow's bytes share the first record with the datagrams.
    assert_eq!(p.client.send(f, &[9u8; 50_000]).expect("send"), 50_000);
    let out = p.client.poll_transmit(p.now).expect("record");
    p.device.handle_frames(Bytes::from(out.clone()), p.now).expect("the device takes it");
    let frames = frames_of(out);
    let data: usize = frames.iter().map(|f| if let Frame::Data { bytes, .. } = f { bytes.len() } else { 0 }).sum();
    assert!(data >= MAX_RECORD_PLAINTEXT / 2 - 2 * (1400 + DATAGRAM_HEADER), "flow got {data} bytes");
    assert!(frames.iter().any(|f| matches!(f, Frame::Datagram { .. })));
    // A whole-size datagram still goes out.
    p.pump();
    assert!(p.client.udp_send(a, Bytes::from(vec![1u8; MAX_DATAGRAM]), p.now));
    p.pump();
    assert_eq!(datagrams(&mut p.device_events, a).last().map(Bytes::len), Some(MAX_DATAGRAM));
}

proptest! {
    /// A client that never reads sends any association frames; the device refuses every other
    /// association and answers datagrams. What waits to be sent stays bounded (reading pauses
    /// while the mux is backlogged, as the driver does).
    #[test]
    fn prop_hostile_udp_leaves_a_bounded_queue(
        records in proptest::collection::vec(proptest::collection::vec(
            prop_oneof![
                (0u32..4000).prop_map(|i| Frame::UdpOpen { assoc: 2 * i + 1, target: "x:1".into() }),
                ((0u32..4000), 0usize..2000).prop_map(|(i, n)| Frame::Datagram { assoc: 2 * i + 1, bytes: Bytes::from(vec![0u8; n]) }),
                (0u32..4000).prop_map(|i| Frame::UdpClose { assoc: 2 * i + 1, reason: "r".into() }),
            ], 1..200), 1..30),
    ) {
        let now = Instant::now();
        let cfg = MuxConfig { max_udp_queued: 16 * 1024, max_udp_assocs: 16, ..udp() };
        let mut device = Mux::new(Role::Responder, cfg, now);
        for frames in records {
            if device.handle_frames(record(&frames), now).is_err() {
                break;
            }
            while let Some(ev) = device.poll_event() {
                match ev {
                    Event::UdpOpened { assoc, .. } if assoc % 4 == 1 => device.udp_close(assoc, "no"),
                    Event::Datagram { assoc, bytes } => { device.udp_send(assoc, bytes, now); }
                    _ => {}
                }
            }
            prop_assert!(device.udp_queued() <= 16 * 1024 + 200 * 10, "queued {}", device.udp_queued());
            if device.is_backlogged() {
                while device.poll_transmit(now).is_some() {}
            }
        }
    }
}
