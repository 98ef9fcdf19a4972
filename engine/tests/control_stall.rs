//! A stalled intercept does not stop tcpcopy's other intercept from serving: two
//! `ControlServer`s, each on its own thread that answers every `CLIENT_ADD` with a record; one
//! thread is paused (it stops reading, as a SIGSTOPped intercept does) while the client keeps
//! registering sessions. The running intercept gets every message and answers every one; the
//! stalled one costs only its own backlog (drops counted); after it resumes, both serve again.
//! Over TCP and over UDP.
//!
//! Every wait is a bounded loop (at most ~20 s), not a timed assertion.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::control::{
    encode_record, ClientConfig, ControlClient, ControlServer, Framing, MessageType, RecordFormat,
    ServerConfig, ServerEvent, Transport,
};
use engine::flow::FlowKey;

const BOUND: Duration = Duration::from_secs(20);

/// An intercept on its own thread: answers each CLIENT_ADD with a SYN-ACK record whose
/// sequence number is `id` (so the client can tell who answered).
struct Intercept {
    addr: SocketAddrV4,
    paused: Arc<AtomicBool>,
    /// Set by the thread once it has seen `paused` and stopped working.
    idle: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    adds: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

fn syn_ack(key: FlowKey, seq: u32) -> Vec<u8> {
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

impl Intercept {
    fn start(id: u32, transport: Transport) -> Intercept {
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let adds = Arc::new(AtomicU64::new(0));
        let idle = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (paused, stop, adds) = (paused.clone(), stop.clone(), adds.clone());
            let idle = idle.clone();
            std::thread::spawn(move || {
                let mut config = ServerConfig::new(
                    "127.0.0.1:0".parse().unwrap(),
                    RecordFormat::Header64,
                    Framing::Combined,
                );
                config.transport = transport;
                config.max_buffer_bytes = 256 * 1024;
                config.udp_peer_timeout = Duration::from_secs(30);
                let mut server = ControlServer::with_config(config).unwrap();
                tx.send(server.local_addr()).unwrap();
                let mut events = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::SeqCst) {
                        idle.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    idle.store(false, Ordering::SeqCst);
                    server
                        .poll(Some(Duration::from_millis(1)), &mut |e| events.push(e))
                        .unwrap();
                    for e in events.drain(..) {
                        if let ServerEvent::Message(conn, m) = e {
                            if m.kind == MessageType::ClientAdd {
                                adds.fetch_add(1, Ordering::SeqCst);
                                server.send_record(conn, &syn_ack(m.flow_key(), id));
                            }
                        }
                    }
                }
            })
        };
        Intercept {
            addr: rx.recv().unwrap(),
            paused,
            idle,
            stop,
            adds,
            thread: Some(thread),
        }
    }

    fn adds(&self) -> u64 {
        self.adds.load(Ordering::SeqCst)
    }

    /// Stops the thread (like SIGSTOP) and waits until it has stopped.
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + BOUND;
        while !self.idle.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(self.idle.load(Ordering::SeqCst));
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn flow(i: u32) -> FlowKey {
    FlowKey::new(
        SocketAddrV4::new((0x0a00_0000 | (i >> 16)).into(), i as u16),
        "10.77.0.30:8080".parse().unwrap(),
    )
}

/// Registers `n` sessions from `next`, then polls until `a` has them all (bounded); returns
/// whether it did.
fn register(
    client: &mut ControlClient,
    next: &mut u32,
    n: u32,
    a: &Intercept,
    a_expected: &mut u64,
    answers: &mut [u64; 2],
) -> bool {
    for _ in 0..n {
        if client.client_add(flow(*next)) {
            *a_expected += u64::from(client.is_connected(a.addr));
        }
        *next += 1;
    }
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        client
            .poll(Some(Duration::from_millis(1)), &mut |h| {
                answers[h.seq as usize] += 1;
            })
            .unwrap();
        if a.adds() == *a_expected && answers[0] == *a_expected {
            return true;
        }
    }
    false
}

fn stalled_intercept(transport: Transport) {
    let a = Intercept::start(0, transport);
    let b = Intercept::start(1, transport);
    let mut config = ClientConfig::new(vec![a.addr, b.addr]);
    config.transport = transport;
    config.connections_per_server = 2;
    config.max_buffer_bytes = 64 * 1024;
    config.udp_keepalive = Duration::from_millis(50);
    config.udp_dead_after = Duration::from_millis(500);
    config.reconnect_initial = Duration::from_millis(5);
    config.lonely = true;
    let mut client = ControlClient::new(config).unwrap();
    assert!(client.wait_connected(BOUND, &mut |_| {}).unwrap());
    let mut answers = [0u64; 2];
    let mut next = 0u32;
    let mut a_expected = 0u64;

    // Both serve.
    assert!(register(
        &mut client,
        &mut next,
        100,
        &a,
        &mut a_expected,
        &mut answers
    ));
    let deadline = Instant::now() + BOUND;
    while answers[1] < 100 && Instant::now() < deadline {
        client
            .poll(Some(Duration::from_millis(1)), &mut |h| {
                answers[h.seq as usize] += 1
            })
            .unwrap();
    }
    assert_eq!(answers, [100, 100]);
    assert_eq!(client.stats().messages_dropped, 0);

    // B stalls. Keep registering sessions until B's backlog overflowed (TCP) or B counted
    // down (UDP), and for at least 20,000 sessions: A answers every one meanwhile.
    b.pause();
    let stall_start = next;
    // Answers B sent before it stopped may still be on their way.
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        client
            .poll(Some(Duration::from_millis(1)), &mut |h| {
                answers[h.seq as usize] += 1
            })
            .unwrap();
    }
    let b_answers_before = answers[1];
    let deadline = Instant::now() + BOUND;
    while (client.stats().messages_dropped == 0 || next - stall_start < 20_000)
        && Instant::now() < deadline
    {
        assert!(
            register(&mut client, &mut next, 1000, &a, &mut a_expected, &mut answers),
            "A stopped serving while B stalled: A has {} of {a_expected}, answered {answers:?}; {:?}",
            a.adds(),
            client.stats()
        );
    }
    let stats = client.stats();
    assert!(stats.messages_dropped > 0, "{stats:?}");
    let stalled = u64::from(next - stall_start);
    assert!(stalled >= 20_000);
    assert_eq!(a.adds(), a_expected);
    assert_eq!(answers[0], a_expected);
    assert_eq!(a_expected, u64::from(next), "A got every session");
    // Every message went to A; B's went into its backlog or were dropped and counted.
    assert_eq!(
        stats.messages_sent + stats.messages_dropped,
        2 * u64::from(next)
    );
    assert_eq!(answers[1], b_answers_before, "B answered while stalled?");
    assert!(client.is_connected(a.addr));
    eprintln!(
        "{transport}: {stalled} sessions while B stalled; dropped for B: {}; {stats:?}",
        stats.messages_dropped
    );

    // B resumes: it works through what it had, and serves new sessions again.
    b.paused.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + BOUND;
    while !client.is_connected(b.addr) && Instant::now() < deadline {
        client
            .poll(Some(Duration::from_millis(1)), &mut |h| {
                answers[h.seq as usize] += 1
            })
            .unwrap();
    }
    assert!(client.is_connected(b.addr));
    let b_before = b.adds();
    let first_new = next;
    for _ in 0..100 {
        client.client_add(flow(next));
        next += 1;
    }
    let deadline = Instant::now() + BOUND;
    while b.adds() < b_before + 100 && Instant::now() < deadline {
        client
            .poll(Some(Duration::from_millis(1)), &mut |h| {
                answers[h.seq as usize] += 1
            })
            .unwrap();
    }
    assert!(
        b.adds() >= b_before + 100,
        "B serves again: {} -> {} (sessions {first_new}..{next})",
        b_before,
        b.adds()
    );
}

#[test]
fn stalled_tcp_intercept_does_not_stop_the_other() {
    stalled_intercept(Transport::Tcp);
}

#[test]
fn stalled_udp_intercept_does_not_stop_the_other() {
    stalled_intercept(Transport::Udp);
}
