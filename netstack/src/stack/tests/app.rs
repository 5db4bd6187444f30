//! Whole flows: an application on the other side of the TUN, played by a second smoltcp
//! interface, exchanging data, FINs and resets with the stack.

use smoltcp::socket::tcp;

use super::*;

use crate::testapp::App;

/// Move packets both ways until neither side has anything to say; the clock advances 1 ms
/// per round, enough for delayed ACKs.
fn exchange(h: &mut Harness, app: &mut App) {
    for _ in 0..10_000 {
        app.poll(h.now);
        let mut moved = false;
        while let Some(p) = app.queues.tx.pop_front() {
            h.input(&p);
            moved = true;
        }
        for p in h.output() {
            app.queues.rx.push_back(p);
            moved = true;
        }
        if !moved {
            // Jump to the next timer of either side if it is near (delayed ACKs,
            // retransmissions); otherwise the exchange is over.
            let app_now = smoltcp::time::Instant::from_micros(h.now.duration_since(app.base).as_micros() as i64);
            let app_next =
                app.iface.poll_delay(app_now, &app.sockets).map(|d| h.now + Duration::from_micros(d.total_micros()));
            let next = [h.stack.poll_at(h.now), app_next].into_iter().flatten().min();
            match next {
                Some(t) if t <= h.now + Duration::from_millis(200) => {
                    h.now = t.max(h.now);
                    h.stack.handle_timeout(h.now);
                    continue;
                }
                _ => return,
            }
        }
        h.now += Duration::from_millis(1);
        h.stack.handle_timeout(h.now);
    }
    panic!("no quiescence");
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

#[test]
fn a_whole_flow_data_both_ways_and_fin() {
    let mut h = Harness::new();
    let mut app = App::new(h.now);
    let c = app.connect("100.80.0.2:22", 40000);
    exchange(&mut h, &mut app);
    assert_eq!(app.socket(c).state(), tcp::State::SynSent);
    let id = h.new_flows()[0];
    h.stack.accept_flow(id, h.now).expect("accept");

    // The device speaks first (an SSH banner) before the handshake has completed.
    assert_eq!(h.stack.send(id, b"SSH-2.0-x\r\n"), Ok(0));
    exchange(&mut h, &mut app);
    assert_eq!(app.socket(c).state(), tcp::State::Established);
    assert!(h.events.contains(&Event::Writable(id)));
    h.events.clear();

    // 1 MiB each way through 256 KiB buffers: flow control both ways.
    let up = pattern(1 << 20, 1);
    let down = pattern(1 << 20, 2);
    let (mut up_sent, mut down_sent) = (0, 0);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 100_000];
    let mut rounds = 0;
    while got_up.len() < up.len() || got_down.len() < down.len() {
        rounds += 1;
        assert!(rounds < 10_000, "stalled at {} / {}", got_up.len(), got_down.len());
        if up_sent < up.len() && app.socket(c).can_send() {
            up_sent += app.socket(c).send_slice(&up[up_sent..]).expect("app send");
        }
        if down_sent < down.len() {
            down_sent += h.stack.send(id, &down[down_sent..]).expect("send");
        }
        loop {
            let n = h.stack.recv(id, &mut buf).expect("recv");
            if n == 0 {
                break;
            }
            got_up.extend_from_slice(&buf[..n]);
        }
        while app.socket(c).can_recv() {
            let n = app.socket(c).recv_slice(&mut buf).expect("app recv");
            got_down.extend_from_slice(&buf[..n]);
        }
        exchange(&mut h, &mut app);
    }
    assert!(got_up == up, "application → device bytes intact");
    assert!(got_down == down, "device → application bytes intact");
    assert!(h.events.contains(&Event::Readable(id)));
    assert!(h.events.contains(&Event::Writable(id)), "the send buffer filled and drained");

    // The application closes first; the stack sees the end of the stream, then closes too.
    h.events.clear();
    app.socket(c).close();
    exchange(&mut h, &mut app);
    assert_eq!(h.events, [Event::Readable(id)]);
    assert_eq!(h.stack.recv(id, &mut buf), Err(FlowError::Finished));
    h.stack.send(id, b"bye").expect("half-closed: still sending");
    h.stack.close(id).expect("close");
    exchange(&mut h, &mut app);
    let mut tail = [0u8; 8];
    assert_eq!(app.socket(c).recv_slice(&mut tail), Ok(3));
    assert!(h.events.contains(&Event::Closed(id)), "{:?}", h.events);
    assert_eq!(h.stack.flow_count(), 0);
    assert_eq!(h.stack.sockets.iter().count(), 0);
    assert_eq!(h.stack.recv(id, &mut buf), Err(FlowError::Unknown));
}

#[test]
fn the_device_closes_first_and_abort_resets() {
    let mut h = Harness::new();
    let mut app = App::new(h.now);
    let c1 = app.connect("100.80.0.2:22", 40000);
    let c2 = app.connect("192.168.1.10:80", 40001);
    exchange(&mut h, &mut app);
    let ids = h.new_flows();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        h.stack.accept_flow(*id, h.now).expect("accept");
    }
    exchange(&mut h, &mut app);
    assert_eq!(app.socket(c1).state(), tcp::State::Established);
    assert_eq!(app.socket(c2).state(), tcp::State::Established);

    h.stack.send(ids[0], b"last words").expect("send");
    h.stack.close(ids[0]).expect("close");
    h.stack.abort(ids[1]).expect("abort");
    exchange(&mut h, &mut app);
    assert_eq!(app.socket(c1).state(), tcp::State::CloseWait);
    assert_eq!(app.socket(c2).state(), tcp::State::Closed, "reset");
    assert!(h.events.contains(&Event::Closed(ids[1])));
    app.socket(c1).close();
    exchange(&mut h, &mut app);
    assert!(h.events.contains(&Event::Closed(ids[0])), "{:?}", h.events);
    assert_eq!(h.stack.flow_count(), 0);
}

#[test]
fn many_flows_to_one_port_stay_apart() {
    let mut h = Harness::new();
    let mut app = App::new(h.now);
    let conns: Vec<_> = (0..20).map(|i| app.connect("100.80.0.2:22", 41000 + i)).collect();
    exchange(&mut h, &mut app);
    let ids = h.new_flows();
    assert_eq!(ids.len(), 20);
    // Accept in reverse order, one per exchange, while the others keep retransmitting SYNs.
    for id in ids.iter().rev() {
        h.stack.accept_flow(*id, h.now).expect("accept");
        h.now += Duration::from_secs(1);
        exchange(&mut h, &mut app);
    }
    for (i, id) in ids.iter().enumerate() {
        h.stack.send(*id, format!("flow {i}").as_bytes()).expect("send");
    }
    exchange(&mut h, &mut app);
    for (i, c) in conns.iter().enumerate() {
        let mut buf = [0u8; 32];
        let n = app.socket(*c).recv_slice(&mut buf).expect("recv");
        assert_eq!(&buf[..n], format!("flow {i}").as_bytes());
    }
}

#[test]
fn recv_with_reads_in_place_and_keeps_recv_semantics() {
    // A small receive buffer, so the data wraps around smoltcp's ring and needs window updates.
    let mut h = Harness::with(StackConfig { rx_buffer: 4096, tx_buffer: 4096, ..StackConfig::default() });
    let mut app = App::new(h.now);
    let c = app.connect("100.80.0.2:22", 40000);
    exchange(&mut h, &mut app);
    let id = h.new_flows()[0];
    let mut called = false;
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("pending")), Err(FlowError::Pending));
    h.stack.accept_flow(id, h.now).expect("accept");
    // Before the handshake completes there is nothing to read, and `f` is not called.
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("nothing buffered")), Ok(0));
    exchange(&mut h, &mut app);
    assert_eq!(app.socket(c).state(), tcp::State::Established);
    h.events.clear();

    // Part of what is there, then more than offered (counts as all of it).
    let first = pattern(3000, 7);
    assert_eq!(app.socket(c).send_slice(&first), Ok(3000));
    exchange(&mut h, &mut app);
    assert_eq!(h.events, [Event::Readable(id)]);
    let mut got = Vec::new();
    let n = h.stack.recv_with(id, |b| {
        assert_eq!(b.len(), 3000, "contiguous at the start of the ring");
        got.extend_from_slice(&b[..1000]);
        1000
    });
    assert_eq!(n, Ok(1000));
    exchange(&mut h, &mut app);
    assert_eq!(h.events, [Event::Readable(id)], "not reported again before the buffer is empty");
    let n = h.stack.recv_with(id, |b| {
        got.extend_from_slice(b);
        usize::MAX
    });
    assert_eq!(n, Ok(2000));
    assert_eq!(got, first);
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("emptied")), Ok(0));

    // 12 KiB more through the 4 KiB buffer: the reads open the window, and data that wraps
    // around the end of the ring comes in two parts.
    h.events.clear();
    let second = pattern(12 * 1024, 9);
    let (mut sent, mut got) = (0, Vec::new());
    let (mut parts, mut wrapped) = (0, false);
    let mut rounds = 0;
    while got.len() < second.len() {
        rounds += 1;
        assert!(rounds < 1000, "stalled at {}", got.len());
        if sent < second.len() && app.socket(c).can_send() {
            sent += app.socket(c).send_slice(&second[sent..]).expect("app send");
        }
        exchange(&mut h, &mut app);
        let mut reads = 0;
        loop {
            let n = h.stack.recv_with(id, |b| {
                called = true;
                got.extend_from_slice(b);
                b.len()
            });
            let n = n.expect("recv_with");
            if n == 0 {
                break;
            }
            assert!(n <= 4096);
            parts += 1;
            reads += 1;
        }
        // More than one read with nothing arriving between: the first stopped at the ring's end.
        wrapped |= reads > 1;
    }
    assert!(got == second, "bytes intact and in order");
    assert!(called && parts > 3, "{parts} reads");
    assert!(wrapped, "the data wrapped around the ring");
    assert!(h.events.iter().filter(|e| **e == Event::Readable(id)).count() > 1, "reported again after emptying");

    // The application's FIN: reported, then `Finished`, without calling `f`, and not again.
    h.events.clear();
    app.socket(c).close();
    exchange(&mut h, &mut app);
    assert_eq!(h.events, [Event::Readable(id)]);
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("finished")), Err(FlowError::Finished));
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("finished")), Err(FlowError::Finished));
    h.events.clear();
    exchange(&mut h, &mut app);
    assert!(h.events.is_empty(), "{:?}", h.events);
    h.stack.abort(id).expect("abort");
    exchange(&mut h, &mut app);
    assert_eq!(h.stack.recv_with(id, |_| unreachable!("gone")), Err(FlowError::Unknown));
}
