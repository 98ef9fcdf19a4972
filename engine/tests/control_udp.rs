//! The control channel over loopback UDP: `ControlClient` against `ControlServer` with the
//! UDP transport, loss counting through a deterministic lossy relay (every 100th datagram of a
//! direction is dropped, so the expected loss is exact), forged and replayed datagrams, and a
//! restarted intercept.
//!
//! Every wait is a bounded loop (at most ~10 s), not a timed assertion.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::control::rxdrops::socket_drops;
use engine::control::{
    encode_record, ClientConfig, ClientMessage, ConnId, ControlClient, ControlServer, Framing,
    RecordFormat, ResponseHeader, Secret, ServerConfig, ServerEvent, Transport,
};
use engine::flow::FlowKey;

const BOUND: Duration = Duration::from_secs(10);
const TICK: Option<Duration> = Some(Duration::from_millis(2));

fn key(client: &str, target: &str) -> FlowKey {
    FlowKey::new(client.parse().unwrap(), target.parse().unwrap())
}

fn loopback_any() -> SocketAddrV4 {
    "127.0.0.1:0".parse().unwrap()
}

/// A SYN-ACK record for `key` with sequence `seq`.
fn record(key: FlowKey, seq: u32) -> Vec<u8> {
    let mut p = vec![
        0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00,
    ];
    p.extend_from_slice(&key.target_ip.octets());
    p.extend_from_slice(&key.client_ip.octets());
    p.extend_from_slice(&key.target_port.to_be_bytes());
    p.extend_from_slice(&key.client_port.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[
        0x00, 0x00, 0x03, 0xe9, 0x50, 0x12, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00,
    ]);
    let mut r = vec![0u8; 64];
    encode_record(&p, RecordFormat::Header64, &mut r).unwrap();
    r
}

fn udp_server(secret: Option<&Secret>) -> ControlServer {
    let mut config = ServerConfig::new(loopback_any(), RecordFormat::Header64, Framing::Combined);
    config.transport = Transport::Udp;
    config.auth = secret.cloned();
    ControlServer::with_config(config).unwrap()
}

fn udp_client(servers: Vec<SocketAddrV4>, secret: Option<&Secret>) -> ControlClient {
    let mut config = ClientConfig::new(servers);
    config.transport = Transport::Udp;
    config.auth = secret.cloned();
    config.reconnect_initial = Duration::from_millis(5);
    config.udp_keepalive = Duration::from_millis(20);
    config.udp_dead_after = Duration::from_millis(600);
    config.lonely = true;
    ControlClient::new(config).unwrap()
}

/// Polls both ends until `done` says so or the bound passes; `true` if done.
fn pump(
    client: &mut ControlClient,
    server: &mut ControlServer,
    events: &mut Vec<ServerEvent>,
    records: &mut Vec<ResponseHeader>,
    mut done: impl FnMut(&ControlClient, &ControlServer, &[ServerEvent], &[ResponseHeader]) -> bool,
) -> bool {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if done(client, server, events, records) {
            return true;
        }
        client.poll(TICK, &mut |h| records.push(*h)).unwrap();
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    done(client, server, events, records)
}

fn connected(events: &[ServerEvent]) -> Option<ConnId> {
    events.iter().find_map(|e| match e {
        ServerEvent::Connected(id, _) => Some(*id),
        _ => None,
    })
}

/// Drops the next datagrams of one kind going one way: `pass` of them go through, then
/// `drop` are dropped (the tail of a burst).
#[derive(Debug, Clone, Copy)]
struct TailDrop {
    kind: u8,
    pass: u64,
    drop: u64,
}

/// One direction of the relay: what it forwarded and dropped, and a tail to drop.
#[derive(Default)]
struct Way {
    forwarded: AtomicU64,
    /// Dropped on purpose (every n-th, or the tail) or because the send failed.
    dropped: AtomicU64,
    /// Items (messages or records) in the datagrams dropped.
    dropped_items: AtomicU64,
    tail: Mutex<Option<TailDrop>>,
}

impl Way {
    /// Whether the `n_seen`-th datagram `d` is to be dropped (counted).
    fn drops(&self, d: &[u8], n_seen: u64, every: u64) -> bool {
        let mut dropped = every != 0 && n_seen.is_multiple_of(every);
        if let Some(t) = self.tail.lock().unwrap().as_mut() {
            if d.len() > 5 && d[3] == t.kind {
                if t.pass > 0 {
                    t.pass -= 1;
                } else if t.drop > 0 {
                    t.drop -= 1;
                    dropped = true;
                }
            }
        }
        if dropped {
            self.lose(d);
        }
        dropped
    }

    fn lose(&self, d: &[u8]) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
        // MESSAGES (3) and RECORDS (4) carry `count` items.
        if d.len() > 5 && (d[3] == 3 || d[3] == 4) {
            self.dropped_items
                .fetch_add(u64::from(d[5]), Ordering::SeqCst);
        }
    }
}

/// Relays datagrams between a client (who sends to `addr()`) and `upstream`, dropping every
/// `drop_up`-th datagram going up and every `drop_down`-th coming down (1-based counts; 0:
/// never), or the tail of a burst ([`LossyRelay::drop_tail_up`]), counting exactly what it
/// dropped, including what its own sockets' receive buffers dropped (read from `/proc`, so a
/// relay starved of CPU still accounts for every datagram). Keeps the last RECORDS datagram
/// it forwarded down (keepalive answers keep coming after it).
struct LossyRelay {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    up: Arc<Way>,
    down: Arc<Way>,
    /// The sockets that receive each way (clones, for their drop counts).
    up_socket: UdpSocket,
    down_socket: UdpSocket,
    last_down: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
}

impl LossyRelay {
    fn start(upstream: SocketAddrV4, drop_up: u64, drop_down: u64) -> LossyRelay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(upstream).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let addr = match front.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(Way::default());
        let down = Arc::new(Way::default());
        let last_down = Arc::new(Mutex::new(Vec::new()));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (up_socket, down_socket) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let t_up = {
            let (stop, up, client) = (stop.clone(), up.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut n_seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    n_seen += 1;
                    if up.drops(&buf[..n], n_seen, drop_up) {
                        continue;
                    }
                    if back.send(&buf[..n]).is_ok() {
                        up.forwarded.fetch_add(1, Ordering::SeqCst);
                    } else {
                        up.lose(&buf[..n]);
                    }
                }
            })
        };
        let t_down = {
            let (stop, down, last) = (stop.clone(), down.clone(), last_down.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut n_seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back2.recv(&mut buf) else {
                        continue;
                    };
                    n_seen += 1;
                    if down.drops(&buf[..n], n_seen, drop_down) {
                        continue;
                    }
                    let to = *client.lock().unwrap();
                    let sent = to.is_some_and(|to| front2.send_to(&buf[..n], to).is_ok());
                    if sent {
                        down.forwarded.fetch_add(1, Ordering::SeqCst);
                        if n > 5 && buf[3] == 4 {
                            *last.lock().unwrap() = buf[..n].to_vec();
                        }
                    } else {
                        down.lose(&buf[..n]);
                    }
                }
            })
        };
        LossyRelay {
            addr,
            stop,
            up,
            down,
            up_socket,
            down_socket,
            last_down,
            threads: vec![t_up, t_down],
        }
    }

    /// The receive-buffer drops of one of the relay's sockets.
    fn overflow(socket: &UdpSocket) -> u64 {
        // A row of /proc/self/net/udp can be missed while other tests close sockets.
        (0..100)
            .find_map(|_| socket_drops(socket))
            .expect("the relay's socket in /proc/self/net/udp")
    }

    /// (forwarded, dropped) going up; dropped includes the receive-buffer drops of the
    /// relay's socket.
    fn up(&self) -> (u64, u64) {
        let overflow = Self::overflow(&self.up_socket);
        (
            self.up.forwarded.load(Ordering::SeqCst),
            self.up.dropped.load(Ordering::SeqCst) + overflow,
        )
    }

    /// (forwarded, dropped) coming down, as [`up`](Self::up).
    fn down(&self) -> (u64, u64) {
        let overflow = Self::overflow(&self.down_socket);
        (
            self.down.forwarded.load(Ordering::SeqCst),
            self.down.dropped.load(Ordering::SeqCst) + overflow,
        )
    }

    /// Of the next datagrams of `kind` going up, lets `pass` through and drops `drop`.
    fn drop_tail_up(&self, kind: u8, pass: u64, drop: u64) {
        *self.up.tail.lock().unwrap() = Some(TailDrop { kind, pass, drop });
    }

    /// As [`drop_tail_up`](Self::drop_tail_up), coming down.
    fn drop_tail_down(&self, kind: u8, pass: u64, drop: u64) {
        *self.down.tail.lock().unwrap() = Some(TailDrop { kind, pass, drop });
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether every datagram and item each end sent through `relay` is accounted for on the
/// other: the relay handled every datagram (forwarded or dropped), the far end read every
/// one forwarded (or its socket dropped it), and the keepalives closed the tails (every
/// message and record is received or counted lost).
fn accounted(relay: &LossyRelay, c: &ControlClient, s: &ControlServer) -> bool {
    let (cs, ss) = (c.stats(), s.stats());
    let (up_fwd, up_drop) = relay.up();
    let (down_fwd, down_drop) = relay.down();
    cs.datagrams_sent == up_fwd + up_drop
        && ss.datagrams_sent == down_fwd + down_drop
        && ss.datagrams_received
            + ss.datagrams_receive_dropped
            + ss.datagrams_rejected
            + ss.datagrams_replayed
            == up_fwd
        && cs.datagrams_received
            + cs.datagrams_receive_dropped
            + cs.datagrams_rejected
            + cs.datagrams_replayed
            == down_fwd
        && ss.messages_received + ss.messages_lost == cs.messages_sent
        && cs.records_received + cs.records_lost == ss.records_queued
}

/// Polls both ends until [`accounted`] holds (bounded); `true` if it does.
fn settle(
    relay: &LossyRelay,
    client: &mut ControlClient,
    server: &mut ControlServer,
    events: &mut Vec<ServerEvent>,
    records: &mut Vec<ResponseHeader>,
) -> bool {
    pump(client, server, events, records, |c, s, _, _| {
        accounted(relay, c, s)
    })
}

#[test]
fn udp_exchange_messages_and_records() {
    let mut server = udp_server(None);
    let addr = server.local_addr();
    let mut client = udp_client(vec![addr], None);
    assert!(client.udp_local_addr().is_some());
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| c.is_connected(addr) && connected(e).is_some()
    ));
    let conn = connected(&events).unwrap();
    assert_eq!(server.stats().connections_up, 1);
    assert_eq!(client.stats().connections_up, 1);

    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    assert!(client.client_add(k));
    assert!(client.client_del(k));
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |_, _, e, _| e
            .iter()
            .filter(|e| matches!(e, ServerEvent::Message(..)))
            .count()
            == 2
    ));
    let messages: Vec<ClientMessage> = events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Message(id, m) => {
                assert_eq!(*id, conn);
                Some(*m)
            }
            _ => None,
        })
        .collect();
    assert_eq!(messages, vec![ClientMessage::add(k), ClientMessage::del(k)]);

    // 100 records: batched 22 to a datagram, delivered in order.
    for seq in 0..100 {
        assert!(server.send_record(conn, &record(k, seq)));
    }
    server.flush_all();
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |_, _, _, r| r.len() >= 100
    ));
    assert_eq!(records.len(), 100);
    for (i, h) in records.iter().enumerate() {
        assert_eq!(h.seq, i as u32);
        assert_eq!(h.flow_key(), k);
    }
    let (cs, ss) = (client.stats(), server.stats());
    assert_eq!(cs.records_received, 100);
    assert_eq!(ss.batches, 5); // 22 + 22 + 22 + 22 + 12
    assert_eq!((cs.datagrams_lost, ss.datagrams_lost), (0, 0));
    assert_eq!((cs.datagrams_rejected, ss.datagrams_rejected), (0, 0));
    assert!(cs.datagrams_sent >= 2 && ss.datagrams_sent >= 6);
}

/// Drives traffic both ways through the relay: `rounds` times, 5 datagrams of messages up and
/// 20 datagrams of records down, waiting after each round until both ends have accounted for
/// it. Whatever the machine's load (a starved relay overflowing its socket, a full socket
/// buffer at either end), every datagram and every item is then either received or counted
/// lost, and the loss counters equal what the relay dropped.
fn lossy_traffic(secret: Option<&Secret>) {
    let mut server = udp_server(secret);
    let relay = LossyRelay::start(server.local_addr(), 100, 100);
    let mut client = udp_client(vec![relay.addr], secret);
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| c.connected_servers() == 1 && connected(e).is_some()
    ));
    let conn = connected(&events).unwrap();
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    let mut sent_messages = 0u64;
    let mut sent_records = 0u64;
    for round in 0..60u32 {
        for i in 0..5 * 101u32 {
            let k = FlowKey {
                client_port: (i % 60000) as u16,
                ..k
            };
            client.client_add(k);
            sent_messages += 1;
        }
        client.flush();
        for i in 0..20 * 22u32 {
            server.send_record(conn, &record(k, round * 10_000 + i));
            sent_records += 1;
        }
        server.flush_all();
        // Wait for the round to be accounted for, tails included (the keepalives close them).
        let done = settle(&relay, &mut client, &mut server, &mut events, &mut records);
        assert!(
            done,
            "round {round}: relay up {:?} down {:?}\nclient {:?}\nserver {:?}",
            relay.up(),
            relay.down(),
            client.stats(),
            server.stats()
        );
    }
    let (cs, ss) = (client.stats(), server.stats());
    let (_, up_drop) = relay.up();
    let (_, down_drop) = relay.down();
    let context = format!("relay up {up_drop} down {down_drop}\nclient {cs:?}\nserver {ss:?}");
    // The relay dropped something each way (about 1 in 100: 300+ datagrams up, 1200+ down).
    assert!(up_drop >= 3 && down_drop >= 12, "{context}");
    // Datagrams: each side's loss on the way is exactly what the relay dropped.
    assert_eq!(ss.datagrams_lost, up_drop, "{context}");
    assert_eq!(cs.datagrams_lost, down_drop, "{context}");
    assert_eq!(
        cs.datagrams_replayed + ss.datagrams_replayed,
        0,
        "{context}"
    );
    assert_eq!(
        cs.datagrams_rejected + ss.datagrams_rejected,
        0,
        "{context}"
    );
    // Messages: every one sent is received or counted lost; the client counts what it could
    // not send at all.
    assert_eq!(
        sent_messages,
        cs.messages_sent + cs.messages_dropped,
        "{context}"
    );
    assert_eq!(
        cs.messages_sent,
        ss.messages_received + ss.messages_lost,
        "{context}"
    );
    assert_eq!(
        ss.messages_lost % 101,
        0,
        "whole datagrams are lost: {context}"
    );
    // Records likewise, and the ones that arrived are exactly the ones delivered.
    assert_eq!(records.len() as u64, cs.records_received, "{context}");
    assert_eq!(
        sent_records,
        cs.records_received + cs.records_lost + ss.records_dropped + ss.records_no_connection,
        "{context}"
    );
    assert_eq!(
        cs.records_lost % 22,
        0,
        "whole datagrams are lost: {context}"
    );
    assert!(cs.records_lost <= 22 * down_drop, "{context}");
    eprintln!(
        "relay dropped {up_drop} up / {down_drop} down; counted lost: server {} client {}; \
         socket drops: server {} client {}; messages lost {} of {sent_messages}, records lost {} \
         of {sent_records}",
        ss.datagrams_lost,
        cs.datagrams_lost,
        ss.datagrams_receive_dropped,
        cs.datagrams_receive_dropped,
        ss.messages_lost,
        cs.records_lost,
    );
}

#[test]
fn udp_loss_counter_matches_what_the_relay_dropped() {
    lossy_traffic(None);
}

#[test]
fn udp_loss_counter_matches_with_authentication() {
    let secret = Secret::new(b"lab secret, 32 bytes long......").unwrap();
    lossy_traffic(Some(&secret));
}

/// Done-when 1: the relay drops the last `N` datagrams of a burst, which no later data
/// datagram reveals; the far side counts exactly `N` lost (and their items) once the next
/// keepalive exchange arrives: within one keepalive interval (20 ms here) plus the one-way
/// delay for messages, plus the round trip for records (checked on a virtual clock in
/// `udp::tests`; here the wait is bounded and the time only printed).
#[test]
fn udp_tail_loss_is_counted_by_the_next_keepalive() {
    const MESSAGES: u8 = 3;
    const RECORDS: u8 = 4;
    let mut server = udp_server(None);
    let relay = LossyRelay::start(server.local_addr(), 0, 0);
    let mut client = udp_client(vec![relay.addr], None);
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| c.connected_servers() == 1 && connected(e).is_some()
    ));
    let conn = connected(&events).unwrap();
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    for n in [1u64, 3, 7] {
        let (cs0, ss0) = (client.stats(), server.stats());
        // Up: 10 datagrams of 101 messages; the relay drops the last n.
        relay.drop_tail_up(MESSAGES, 10 - n, n);
        for i in 0..1010u32 {
            client.client_add(FlowKey {
                client_port: i as u16,
                ..k
            });
        }
        client.flush();
        let up_sent = Instant::now();
        // Down: 10 datagrams of 22 records; the relay drops the last n.
        relay.drop_tail_down(RECORDS, 10 - n, n);
        for i in 0..220 {
            assert!(server.send_record(conn, &record(k, i)));
        }
        server.flush_all();
        let mut up_counted = None;
        let done = pump(
            &mut client,
            &mut server,
            &mut events,
            &mut records,
            |c, s, _, _| {
                if up_counted.is_none() && s.stats().datagrams_lost - ss0.datagrams_lost == n {
                    up_counted = Some(up_sent.elapsed());
                }
                accounted(&relay, c, s)
            },
        );
        let (cs, ss) = (client.stats(), server.stats());
        let context = format!("n {n}\nclient {cs:?}\nserver {ss:?}");
        assert!(done, "{context}");
        assert_eq!(ss.datagrams_lost - ss0.datagrams_lost, n, "{context}");
        assert_eq!(ss.messages_lost - ss0.messages_lost, 101 * n, "{context}");
        assert_eq!(
            ss.messages_received - ss0.messages_received,
            101 * (10 - n),
            "{context}"
        );
        assert_eq!(cs.datagrams_lost - cs0.datagrams_lost, n, "{context}");
        assert_eq!(cs.records_lost - cs0.records_lost, 22 * n, "{context}");
        assert_eq!(
            cs.records_received - cs0.records_received,
            22 * (10 - n),
            "{context}"
        );
        eprintln!(
            "tail of {n} dropped each way: counted by intercept {:?} after the burst \
             (keepalive every 20 ms)",
            up_counted
        );
    }
    assert_eq!(relay.up.dropped_items.load(Ordering::SeqCst), 101 * 11);
    assert_eq!(relay.down.dropped_items.load(Ordering::SeqCst), 22 * 11);
}

/// A tcpcopy that does not read while intercept sends a long burst: its socket's receive
/// buffer overflows. Those datagrams are counted as dropped here (`datagrams_receive_dropped`,
/// from the kernel), not as lost on the way, and their records as lost.
#[test]
fn udp_socket_overflow_is_dropped_here_not_lost_on_the_way() {
    let mut server = udp_server(None);
    let addr = server.local_addr();
    // The client does not poll during a burst; on a loaded machine that can outlast the
    // tests' 600 ms of silence before an intercept counts as down.
    let mut config = ClientConfig::new(vec![addr]);
    config.transport = Transport::Udp;
    config.reconnect_initial = Duration::from_millis(5);
    config.udp_keepalive = Duration::from_millis(20);
    config.udp_dead_after = BOUND;
    config.lonely = true;
    let mut client = ControlClient::new(config).unwrap();
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| c.is_connected(addr) && connected(e).is_some()
    ));
    let conn = connected(&events).unwrap();
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    let r = record(k, 1);
    // Bursts of 2000 full datagrams (2.8 MB) with nobody reading, until the socket drops some
    // (whatever its buffer size).
    let mut bursts = 0;
    loop {
        for _ in 0..2000 * 22 {
            assert!(server.send_record(conn, &r));
        }
        server.flush_all();
        bursts += 1;
        let done = pump(
            &mut client,
            &mut server,
            &mut events,
            &mut records,
            |c, s, _, _| {
                let (cs, ss) = (c.stats(), s.stats());
                cs.datagrams_received + cs.datagrams_receive_dropped == ss.datagrams_sent
                    && cs.records_received + cs.records_lost == ss.records_queued
            },
        );
        let (cs, ss) = (client.stats(), server.stats());
        assert!(done, "client {cs:?}\nserver {ss:?}");
        if cs.datagrams_receive_dropped > 0 || bursts == 20 {
            break;
        }
    }
    let (cs, ss) = (client.stats(), server.stats());
    let context = format!("{bursts} bursts\nclient {cs:?}\nserver {ss:?}");
    assert!(cs.datagrams_receive_dropped > 0, "{context}");
    assert_eq!(
        cs.datagrams_lost, 0,
        "nothing was lost on the way: {context}"
    );
    assert_eq!(ss.datagrams_send_dropped, 0, "{context}");
    assert!(cs.records_lost > 0, "{context}");
    assert_eq!(cs.records_lost % 22, 0, "{context}");
    assert_eq!(records.len() as u64, cs.records_received, "{context}");
    eprintln!(
        "{bursts} bursts: the client's socket dropped {} datagrams ({} records), none lost on the way",
        cs.datagrams_receive_dropped, cs.records_lost
    );
}

#[test]
fn forged_and_replayed_datagrams_are_rejected_by_the_client() {
    let secret = Secret::new(b"lab secret, 32 bytes long......").unwrap();
    let mut server = udp_server(Some(&secret));
    let relay = LossyRelay::start(server.local_addr(), 0, 0);
    let mut client = udp_client(vec![relay.addr], Some(&secret));
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| c.connected_servers() == 1 && connected(e).is_some()
    ));
    let conn = connected(&events).unwrap();
    assert_eq!(server.stats().auth_ok, 1);
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    assert!(server.send_record(conn, &record(k, 7)));
    server.flush_all();
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |_, _, _, r| r.len() == 1
    ));
    // The genuine datagram as it went by; wait until the relay has stored it.
    let deadline = Instant::now() + BOUND;
    let genuine = loop {
        let d = relay.last_down.lock().unwrap().clone();
        if d.len() == 32 + 64 + 16 || Instant::now() >= deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        genuine.len(),
        32 + 64 + 16,
        "a RECORDS datagram with one record"
    );
    let port = client.udp_local_addr().unwrap().port();
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = SocketAddrV4::new([127, 0, 0, 1].into(), port);
    let before = client.stats();

    // 1. A forged record: the genuine datagram with another sequence number in the record.
    let mut forged = genuine.clone();
    forged[32 + 24] ^= 0x80;
    attacker.send_to(&forged, to).unwrap();
    // 2. The same with a later datagram sequence number too (looks new to the window).
    let mut forged2 = forged.clone();
    forged2[31] = forged2[31].wrapping_add(5);
    attacker.send_to(&forged2, to).unwrap();
    // 3. A made-up datagram for a session nobody has.
    let mut junk = forged.clone();
    junk[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
    attacker.send_to(&junk, to).unwrap();
    // 4. Not this protocol at all.
    attacker.send_to(b"GET / HTTP/1.0\r\n\r\n", to).unwrap();
    // 5. The genuine datagram replayed.
    attacker.send_to(&genuine, to).unwrap();

    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        client.poll(TICK, &mut |h| records.push(*h)).unwrap();
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
        let s = client.stats();
        if s.datagrams_rejected >= before.datagrams_rejected + 4
            && s.datagrams_replayed > before.datagrams_replayed
        {
            break;
        }
    }
    let after = client.stats();
    assert_eq!(
        after.datagrams_rejected - before.datagrams_rejected,
        4,
        "{after:?}"
    );
    assert_eq!(
        after.datagrams_replayed - before.datagrams_replayed,
        1,
        "{after:?}"
    );
    assert_eq!(
        records.len(),
        1,
        "no forged or replayed record was delivered"
    );
    assert_eq!(records[0].seq, 7);
    assert!(client.is_connected(relay.addr));
}

#[test]
fn udp_authentication_refuses_a_wrong_secret_and_a_plain_peer() {
    let secret = Secret::new(b"lab secret, 32 bytes long......").unwrap();
    let wrong = Secret::new(b"not the lab secret, but as long").unwrap();
    let mut server = udp_server(Some(&secret));
    let addr = server.local_addr();
    let mut bad = udp_client(vec![addr], Some(&wrong));
    let mut plain = udp_client(vec![addr], None);
    let (mut events, mut records) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline && server.stats().auth_refused < 6 {
        bad.poll(TICK, &mut |h| records.push(*h)).unwrap();
        plain.poll(TICK, &mut |h| records.push(*h)).unwrap();
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    let ss = server.stats();
    assert!(ss.auth_refused >= 6, "{ss:?}");
    assert_eq!(ss.datagrams_rejected, ss.auth_refused);
    assert_eq!(ss.connections_accepted, 0);
    assert!(events.is_empty(), "{events:?}");
    assert!(bad.all_down() && plain.all_down());
    assert!(bad.stats().connect_failures > 0);
    // The right secret still gets in.
    let mut good = udp_client(vec![addr], Some(&secret));
    assert!(pump(
        &mut good,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| { c.connected_servers() == 1 && connected(e).is_some() }
    ));
    assert_eq!(server.stats().auth_ok, 1);
}

#[test]
fn restarted_udp_intercept_is_taken_up_again() {
    let mut server = udp_server(None);
    let addr = server.local_addr();
    let mut client = udp_client(vec![addr], None);
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| { c.connected_servers() == 1 && connected(e).is_some() }
    ));
    drop(server);
    // Silence: the client counts the intercept down after udp_dead_after.
    let deadline = Instant::now() + BOUND;
    while client.connected_servers() == 1 && Instant::now() < deadline {
        client.poll(TICK, &mut |h| records.push(*h)).unwrap();
    }
    assert!(client.all_down());
    assert_eq!(client.stats().disconnects, 1);
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    assert!(!client.client_add(k));
    let mut config = ServerConfig::new(addr, RecordFormat::Header64, Framing::Combined);
    config.transport = Transport::Udp;
    let mut server = ControlServer::with_config(config).unwrap();
    events.clear();
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |c, _, e, _| { c.connected_servers() == 1 && connected(e).is_some() }
    ));
    assert_eq!(client.stats().reconnects, 1);
    assert!(client.client_add(k));
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |_, _, e, _| {
            e.contains(&ServerEvent::Message(
                connected(e).unwrap(),
                ClientMessage::add(k),
            ))
        }
    ));
}

#[test]
fn silent_udp_peer_is_forgotten() {
    let mut config = ServerConfig::new(loopback_any(), RecordFormat::Header64, Framing::Combined);
    config.transport = Transport::Udp;
    config.udp_peer_timeout = Duration::from_millis(300);
    let mut server = ControlServer::with_config(config).unwrap();
    let mut client = udp_client(vec![server.local_addr()], None);
    let (mut events, mut records) = (Vec::new(), Vec::new());
    assert!(pump(
        &mut client,
        &mut server,
        &mut events,
        &mut records,
        |_, _, e, _| { connected(e).is_some() }
    ));
    let conn = connected(&events).unwrap();
    drop(client);
    let deadline = Instant::now() + BOUND;
    while !events.contains(&ServerEvent::Disconnected(conn)) && Instant::now() < deadline {
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    assert!(events.contains(&ServerEvent::Disconnected(conn)));
    assert_eq!(server.stats().connections_up, 0);
    assert!(!server.send_record(conn, &[0u8; 64]));
}
