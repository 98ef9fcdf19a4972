//! The control channel over loopback TCP: `ControlClient` (tcpcopy side) against
//! `ControlServer` (intercept side), reconnects, back-pressure, and byte-exact exchanges with
//! hand-written raw peers that speak the C tools' format.
//!
//! Every wait is a bounded loop (at most ~10 s), not a timed assertion.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::control::{
    encode_record, ClientConfig, ClientMessage, ControlClient, ControlServer, Framing,
    RecordFormat, ResponseHeader, ServerEvent,
};
use engine::flow::FlowKey;

const BOUND: Duration = Duration::from_secs(10);
const TICK: Option<Duration> = Some(Duration::from_millis(5));

fn key(client: &str, target: &str) -> FlowKey {
    FlowKey::new(client.parse().unwrap(), target.parse().unwrap())
}

fn loopback_any() -> SocketAddrV4 {
    "127.0.0.1:0".parse().unwrap()
}

/// A SYN-ACK from the target `key.target()` to the client `key.client()` with sequence `seq`
/// (20 bytes IP, 36 bytes TCP: mss 1460, nop, nop, timestamps 7/5).
fn syn_ack(key: FlowKey, seq: u32) -> Vec<u8> {
    let mut p = vec![
        0x45, 0x00, 0x00, 0x38, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00,
    ];
    p.extend_from_slice(&key.target_ip.octets());
    p.extend_from_slice(&key.client_ip.octets());
    p.extend_from_slice(&key.target_port.to_be_bytes());
    p.extend_from_slice(&key.client_port.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[
        0x00, 0x00, 0x03, 0xe9, 0x90, 0x12, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00,
    ]);
    p.extend_from_slice(&[0x02, 0x04, 0x05, 0xb4, 0x01, 0x01, 0x08, 0x0a]);
    p.extend_from_slice(&[0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x05]);
    p
}

fn record(key: FlowKey, seq: u32) -> Vec<u8> {
    let mut r = vec![0u8; 64];
    encode_record(&syn_ack(key, seq), RecordFormat::Header64, &mut r).unwrap();
    r
}

/// Polls both ends until `done` says so or the bound passes; `true` if done.
fn pump(
    client: &mut ControlClient,
    mut server: Option<&mut ControlServer>,
    events: &mut Vec<ServerEvent>,
    records: &mut Vec<ResponseHeader>,
    mut done: impl FnMut(&ControlClient, &[ServerEvent], &[ResponseHeader]) -> bool,
) -> bool {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if done(client, events, records) {
            return true;
        }
        client.poll(TICK, &mut |h| records.push(*h)).unwrap();
        if let Some(server) = server.as_deref_mut() {
            server.poll(TICK, &mut |e| events.push(e)).unwrap();
        }
    }
    done(client, events, records)
}

/// Collects WARN-level events (message and fields) of the current thread.
#[derive(Clone, Default)]
struct WarnLog(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl tracing::Subscriber for WarnLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl WarnLog {
    fn contains(&self, needle: &str, also: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle) && l.contains(also))
    }
}

#[test]
fn client_and_server_exchange_reconnect_and_resume() {
    let log = WarnLog::default();
    tracing::subscriber::with_default(log.clone(), || exchange_reconnect_and_resume(&log));
}

fn exchange_reconnect_and_resume(log: &WarnLog) {
    let mut server =
        ControlServer::bind(loopback_any(), RecordFormat::Header64, Framing::Combined).unwrap();
    let addr = server.local_addr();
    let mut config = ClientConfig::new(vec![addr]);
    config.connections_per_server = 2;
    let mut client = ControlClient::new(config).unwrap();
    let mut events = Vec::new();
    let mut records = Vec::new();

    // Both connections come up and say hello.
    assert!(pump(
        &mut client,
        Some(&mut server),
        &mut events,
        &mut records,
        |c, e, _| {
            c.stats().connections_up == 2
                && e.iter()
                    .filter(|e| matches!(e, ServerEvent::Connected(..)))
                    .count()
                    == 2
        }
    ));
    assert!(client.is_connected(addr));
    assert!(!client.all_down());
    let connected: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Connected(id, _) => Some(*id),
            _ => None,
        })
        .collect();

    // CLIENT_ADD arrives on one of them.
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    assert!(client.client_add(k));
    assert!(pump(
        &mut client,
        Some(&mut server),
        &mut events,
        &mut records,
        |_, e, _| { e.iter().any(|e| matches!(e, ServerEvent::Message(..))) }
    ));
    let (conn, message) = events
        .iter()
        .find_map(|e| match e {
            ServerEvent::Message(id, m) => Some((*id, *m)),
            _ => None,
        })
        .unwrap();
    assert_eq!(message, ClientMessage::add(k));
    assert!(connected.contains(&conn));
    assert_eq!(server.stats().hellos, 2);

    // 40 records back on that connection, decoded in order.
    for seq in 0..40 {
        assert!(server.send_record(conn, &record(k, seq)));
    }
    assert!(pump(
        &mut client,
        Some(&mut server),
        &mut events,
        &mut records,
        |_, _, r| { r.len() >= 40 }
    ));
    assert_eq!(records.len(), 40);
    for (seq, h) in records.iter().enumerate() {
        assert_eq!(h.seq, seq as u32);
        assert_eq!(h.flow_key(), k);
        assert!(h.is_syn() && h.has_ack());
        assert_eq!(h.mss(), Some(1460));
        assert_eq!(h.timestamps(), Some((7, 5)));
    }
    assert_eq!(client.stats().records_received, 40);
    assert_eq!(server.stats().records_queued, 40);
    assert!(server.stats().batches >= 3); // 16 + 16 + 8

    // The intercept goes away: both connections are lost, logged, and retried.
    drop(server);
    events.clear();
    assert!(pump(
        &mut client,
        None,
        &mut events,
        &mut records,
        |c, _, _| c.all_down()
    ));
    assert_eq!(client.stats().disconnects, 2);
    assert!(client.should_exit()); // without -L the caller would stop here
    assert!(!client.client_add(k));
    assert!(log.contains("lost connection to intercept", &addr.to_string()));

    // A new intercept on the same port: the client comes back by itself.
    let mut server = ControlServer::bind(addr, RecordFormat::Header64, Framing::Combined).unwrap();
    assert!(pump(
        &mut client,
        Some(&mut server),
        &mut events,
        &mut records,
        |c, _, _| { c.stats().connections_up == 2 }
    ));
    assert!(client.stats().reconnects >= 2);
    assert!(log.contains("reconnected to intercept", &addr.to_string()));
    let k2 = key("10.0.0.1:40001", "10.0.0.2:8080");
    assert!(client.client_add(k2));
    assert!(pump(
        &mut client,
        Some(&mut server),
        &mut events,
        &mut records,
        |_, e, _| {
            e.iter()
                .any(|e| matches!(e, ServerEvent::Message(_, m) if *m == ClientMessage::add(k2)))
        }
    ));
}

#[test]
fn unreachable_server_is_retried_without_panicking() {
    // A port nobody listens on.
    let addr = match TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
    {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut config = ClientConfig::new(vec![addr]);
    config.reconnect_initial = Duration::from_millis(5);
    config.reconnect_max = Duration::from_millis(40);
    config.lonely = true;
    let mut client = ControlClient::new(config).unwrap();
    let mut events = Vec::new();
    let mut records = Vec::new();
    assert!(pump(
        &mut client,
        None,
        &mut events,
        &mut records,
        |c, _, _| { c.stats().connect_failures >= 8 }
    ));
    assert!(client.all_down());
    assert!(!client.should_exit());
    assert!(!client.is_connected(addr));
    assert_eq!(client.stats().connects, 0);
    assert!(!client.client_add(key("10.0.0.1:1", "10.0.0.2:2")));
    assert_eq!(client.stats().messages_dropped, 1);
    assert!(!client
        .wait_connected(Duration::from_millis(50), &mut |_| {})
        .unwrap());
}

#[test]
fn slow_server_fills_the_backlog_and_messages_are_dropped() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = match listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut config = ClientConfig::new(vec![addr]);
    config.connections_per_server = 1;
    config.max_buffer_bytes = 64 * 1024;
    let mut client = ControlClient::new(config).unwrap();
    assert!(client.wait_connected(BOUND, &mut |_| {}).unwrap());
    let (_never_read, _) = listener.accept().unwrap();

    // The peer never reads: socket buffers fill, then the 64 KiB backlog, then drops.
    let mut sent = 0u64;
    for i in 0..4_000_000u32 {
        let k = key("10.0.0.1:1", "10.0.0.2:2");
        let k = FlowKey {
            client_ip: i.into(),
            ..k
        };
        client.client_add(k);
        sent += 1;
        if i % 1000 == 0 {
            client.poll(Some(Duration::ZERO), &mut |_| {}).unwrap();
            if client.stats().messages_dropped > 0 {
                break;
            }
        }
    }
    let stats = client.stats();
    assert!(stats.messages_dropped > 0, "{stats:?} after {sent}");
    assert_eq!(stats.messages_sent + stats.messages_dropped, sent);
    assert_eq!(
        stats.connections_up, 1,
        "EAGAIN must not abandon the connection"
    );
    assert!(client.is_connected(addr));
}

/// The 64-byte record of `syn_ack(10.0.0.1:40000 -> 10.0.0.2:8080, seq)`, written out by hand.
fn golden_record(seq: [u8; 4]) -> [u8; 64] {
    let mut r = [0u8; 64];
    let head = [
        0x45, 0x00, 0x00, 0x38, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, // IP
        0x0a, 0x00, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x01, // 10.0.0.2 > 10.0.0.1
        0x1f, 0x90, 0x9c, 0x40, // 8080 > 40000
        seq[0], seq[1], seq[2], seq[3], // seq
        0x00, 0x00, 0x03, 0xe9, 0x90, 0x12, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, // ack..urg
        0x02, 0x04, 0x05, 0xb4, 0x01, 0x01, 0x08, 0x0a, // mss, nop, nop, ts
        0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x05,
    ];
    r[..head.len()].copy_from_slice(&head);
    r
}

const HELLO: [u8; 14] = [0, 0, 0, 0, 0, 0, 0x00, 0x06, 0, 0, 0, 0, 0, 0];
const ADD_40000: [u8; 14] = [
    0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0x1f, 0x90,
];

fn poll_server_until(
    server: &mut ControlServer,
    mut done: impl FnMut(&ServerEvent) -> bool,
) -> bool {
    let deadline = Instant::now() + BOUND;
    let mut hit = false;
    while !hit && Instant::now() < deadline {
        server.poll(TICK, &mut |e| hit |= done(&e)).unwrap();
    }
    hit
}

#[test]
fn raw_c_tcpcopy_talks_to_control_server() {
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    for framing in [Framing::Combined, Framing::Plain] {
        let mut server =
            ControlServer::bind(loopback_any(), RecordFormat::Header64, framing).unwrap();
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        raw.set_read_timeout(Some(BOUND)).unwrap();
        // The C intercept reads the hello as 8 + 6 bytes; send it that way, then the message.
        raw.write_all(&HELLO[..8]).unwrap();
        raw.flush().unwrap();
        raw.write_all(&HELLO[8..]).unwrap();
        raw.write_all(&ADD_40000).unwrap();
        let mut conn = None;
        assert!(poll_server_until(&mut server, |e| {
            if let ServerEvent::Message(id, m) = e {
                assert_eq!(*m, ClientMessage::add(k));
                conn = Some(*id);
                true
            } else {
                false
            }
        }));
        let conn = conn.unwrap();
        assert!(server.send_record(conn, &record(k, 1)));
        assert!(server.send_record(conn, &record(k, 2)));
        server.flush_all();

        let mut expected = Vec::new();
        if framing == Framing::Combined {
            expected.extend_from_slice(&[0x00, 0x02]);
        }
        expected.extend_from_slice(&golden_record([0, 0, 0, 1]));
        expected.extend_from_slice(&golden_record([0, 0, 0, 2]));
        let mut got = vec![0u8; expected.len()];
        raw.read_exact(&mut got).unwrap();
        assert_eq!(got, expected, "{framing:?}");
        assert_eq!(server.stats().hellos, 1);
    }
}

#[test]
fn control_server_refuses_a_peer_without_hello() {
    let mut server =
        ControlServer::bind(loopback_any(), RecordFormat::Header64, Framing::Combined).unwrap();
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(BOUND)).unwrap();
    raw.write_all(&ADD_40000).unwrap();
    assert!(poll_server_until(&mut server, |e| matches!(
        e,
        ServerEvent::Disconnected(_)
    )));
    let mut buf = [0u8; 1];
    assert_eq!(
        raw.read(&mut buf).unwrap(),
        0,
        "the server closes the connection"
    );
    assert_eq!(server.stats().peers_too_old, 1);
}

#[test]
fn control_client_talks_to_raw_c_intercept() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = match listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut config = ClientConfig::new(vec![addr]);
    config.connections_per_server = 1;
    config.reconnect_initial = Duration::from_millis(5);
    let mut client = ControlClient::new(config).unwrap();
    assert!(client.wait_connected(BOUND, &mut |_| {}).unwrap());
    let (mut raw, _) = listener.accept().unwrap();
    raw.set_read_timeout(Some(BOUND)).unwrap();

    let mut got = [0u8; 14];
    raw.read_exact(&mut got).unwrap();
    assert_eq!(got, HELLO);
    let k = key("10.0.0.1:40000", "10.0.0.2:8080");
    assert!(client.client_add(k));
    raw.read_exact(&mut got).unwrap();
    assert_eq!(got, ADD_40000);
    assert!(client.client_del(k));
    raw.read_exact(&mut got).unwrap();
    assert_eq!(got[6..8], [0x00, 0x02]);

    // A combined batch of two records, written in awkward pieces.
    let mut batch = vec![0x00, 0x02];
    batch.extend_from_slice(&golden_record([0x12, 0x34, 0x56, 0x78]));
    batch.extend_from_slice(&golden_record([0x12, 0x34, 0x56, 0x79]));
    let mut records = Vec::new();
    for piece in [&batch[..1], &batch[1..7], &batch[7..100], &batch[100..]] {
        raw.write_all(piece).unwrap();
        raw.flush().unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        while Instant::now() < deadline {
            client.poll(TICK, &mut |h| records.push(*h)).unwrap();
        }
    }
    let deadline = Instant::now() + BOUND;
    while records.len() < 2 && Instant::now() < deadline {
        client.poll(TICK, &mut |h| records.push(*h)).unwrap();
    }
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].seq, 0x1234_5678);
    assert_eq!(records[1].seq, 0x1234_5679);
    assert_eq!(records[0].flow_key(), k);
    assert_eq!(records[0].ack, 1001);
    assert_eq!(records[0].window, 0xfaf0);
    assert_eq!(records[0].payload_len, 0);

    // A count of 0 is a protocol error: the client drops the connection and reconnects.
    raw.write_all(&[0x00, 0x00]).unwrap();
    let deadline = Instant::now() + BOUND;
    while client.stats().protocol_errors == 0 && Instant::now() < deadline {
        client.poll(TICK, &mut |_| {}).unwrap();
    }
    assert_eq!(client.stats().protocol_errors, 1);
    assert!(client.wait_connected(BOUND, &mut |_| {}).unwrap());
    let (mut raw2, _) = listener.accept().unwrap();
    raw2.set_read_timeout(Some(BOUND)).unwrap();
    raw2.read_exact(&mut got).unwrap();
    assert_eq!(got, HELLO);
    assert_eq!(client.stats().reconnects, 1);
}
