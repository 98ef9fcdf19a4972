//! Session engine tests on a virtual clock: packets in, packets out.

use super::*;
use crate::wire::tcp::{emit_ipv4_tcp, TcpRepr};
use std::net::SocketAddrV4;

#[derive(Debug, Default)]
struct Rec {
    sent: Vec<Vec<u8>>,
    registered: Vec<FlowKey>,
    unregistered: Vec<FlowKey>,
}

impl Output for Rec {
    fn transmit(&mut self, packet: &[u8]) {
        self.sent.push(packet.to_vec());
    }
    fn register(&mut self, key: FlowKey) {
        self.registered.push(key);
    }
    fn unregister(&mut self, key: FlowKey) {
        self.unregistered.push(key);
    }
}

/// A sent packet, decoded (and its checksums verified).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    flags: TcpFlags,
    seq: u32,
    ack: u32,
    len: usize,
    ts: Option<(u32, u32)>,
}

impl Rec {
    fn take(&mut self) -> Vec<Out> {
        self.sent
            .drain(..)
            .map(|p| {
                let ip = Ipv4Packet::new_checked(&p[..]).expect("valid IPv4");
                assert!(ip.verify_checksum(), "IPv4 checksum");
                let tcp = TcpPacket::new_checked(ip.payload()).expect("valid TCP");
                assert!(
                    tcp.verify_checksum(ip.src_addr(), ip.dst_addr()),
                    "TCP checksum"
                );
                assert_eq!(ip.src_addr(), key().client_ip);
                assert_eq!(ip.dst_addr(), key().target_ip);
                Out {
                    flags: tcp.flags(),
                    seq: tcp.seq_number().0,
                    ack: tcp.ack_number().0,
                    len: tcp.payload_len(),
                    ts: tcp.timestamps(),
                }
            })
            .collect()
    }
}

fn key() -> FlowKey {
    FlowKey::new(
        SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 10), 40000),
        SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 30), 8080),
    )
}

const C_ISN: u32 = 1_000;
/// The online server's first byte (its ISN + 1): what the client acknowledges first.
const O_BASE: u32 = 5_001;
const T_ISN: u32 = 900_000;
const T_BASE: u32 = T_ISN + 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A captured client packet, already target-facing.
fn client(
    flags: TcpFlags,
    seq: u32,
    ack: u32,
    payload: &[u8],
    ts: Option<u32>,
) -> (Vec<u8>, ClientSegment) {
    let repr = TcpRepr {
        src_port: key().client_port,
        dst_port: key().target_port,
        seq: SeqNum(seq),
        ack: SeqNum(ack),
        flags,
        window: 502,
        mss: if flags.contains(TcpFlags::SYN) {
            Some(1460)
        } else {
            None
        },
        window_scale: if flags.contains(TcpFlags::SYN) {
            Some(7)
        } else {
            None
        },
        sack_permitted: flags.contains(TcpFlags::SYN),
        timestamps: ts.map(|v| (v, 0)),
        payload_len: payload.len(),
    };
    let mut buf = Vec::new();
    emit_ipv4_tcp(
        &mut buf,
        key().client_ip,
        key().target_ip,
        7,
        64,
        &repr,
        payload,
    );
    let seg = ClientSegment::parse(&buf).expect("parse");
    (buf, seg)
}

fn resp(flags: TcpFlags, seq: u32, ack: u32, len: u32) -> Response {
    Response {
        key: key(),
        seq: SeqNum(seq),
        ack: SeqNum(ack),
        flags,
        window: 512,
        payload_len: len,
        timestamps: None,
        window_scale: if flags.contains(TcpFlags::SYN) {
            Some(7)
        } else {
            None
        },
    }
}

const A: TcpFlags = TcpFlags::ACK;
const PA: TcpFlags = TcpFlags(0x18);
const FA: TcpFlags = TcpFlags(0x11);

struct Harness {
    table: SessionTable,
    out: Rec,
}

impl Harness {
    fn new(config: SessionConfig) -> Harness {
        Harness {
            table: SessionTable::new(config),
            out: Rec::default(),
        }
    }
    fn client(&mut self, flags: TcpFlags, seq: u32, ack: u32, payload: &[u8], now: Duration) {
        let (p, s) = client(flags, seq, ack, payload, None);
        self.table
            .on_client_packet(key(), &p, &s, now, &mut self.out);
    }
    fn resp(&mut self, flags: TcpFlags, seq: u32, ack: u32, len: u32, now: Duration) {
        self.table
            .on_response(&resp(flags, seq, ack, len), now, &mut self.out);
    }
    fn timers(&mut self, now: Duration) {
        self.table.run_timers(now, usize::MAX, &mut self.out);
    }
    /// SYN from the client, SYN-ACK from the target, handshake ACK from the client.
    fn establish(&mut self) {
        self.client(TcpFlags::SYN, C_ISN, 0, b"", ms(0));
        self.resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0, ms(1));
        self.client(A, C_ISN + 1, O_BASE, b"", ms(1));
        self.out.take();
    }
}

#[test]
fn handshake_then_data_with_rewritten_ack() {
    let mut h = Harness::new(SessionConfig::default());
    h.client(TcpFlags::SYN, C_ISN, 0, b"", ms(0));
    assert_eq!(h.out.registered, vec![key()], "CLIENT_ADD before the SYN");
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].flags, TcpFlags::SYN);
    assert_eq!(sent[0].seq, C_ISN);
    // Client data captured before the target answered waits for the handshake.
    h.client(A, C_ISN + 1, O_BASE, b"", ms(1));
    h.client(PA, C_ISN + 1, O_BASE, b"GET / HTTP/1.1\r\n\r\n", ms(1));
    assert!(h.out.take().is_empty());
    h.resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0, ms(2));
    let sent = h.out.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        sent[0],
        Out {
            flags: A,
            seq: C_ISN + 1,
            ack: T_BASE,
            len: 0,
            ts: None
        }
    );
    assert_eq!(sent[1].flags, PA);
    assert_eq!(
        (sent[1].seq, sent[1].ack, sent[1].len),
        (C_ISN + 1, T_BASE, 18)
    );
    assert_eq!(h.table.stats().established, 1);
    assert_eq!(h.table.stats().client_acks_absorbed, 1);
}

#[test]
fn requests_are_paced_behind_response_bytes() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"req1", ms(2));
    assert_eq!(h.out.take().len(), 1);
    // The online server answered 100 bytes before the client sent request 2.
    h.client(PA, C_ISN + 5, O_BASE + 100, b"req2", ms(3));
    assert!(
        h.out.take().is_empty(),
        "request 2 waits for the target's answer"
    );
    h.resp(A, T_BASE, C_ISN + 5, 60, ms(4));
    let sent = h.out.take();
    assert_eq!(
        sent,
        vec![Out {
            flags: A,
            seq: C_ISN + 5,
            ack: T_BASE + 60,
            len: 0,
            ts: None
        }]
    );
    h.resp(A, T_BASE + 60, C_ISN + 5, 40, ms(5));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "request 2 carries the ACK: {sent:?}");
    assert_eq!(
        (sent[0].seq, sent[0].ack, sent[0].len),
        (C_ISN + 5, T_BASE + 100, 4)
    );
    assert_eq!(h.table.stats().pace_releases, 0);
}

#[test]
fn shorter_target_answer_is_released_after_silence() {
    let config = SessionConfig {
        pace_idle: ms(50),
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"req1", ms(2));
    h.client(PA, C_ISN + 5, O_BASE + 100, b"req2", ms(3));
    h.resp(A, T_BASE, C_ISN + 5, 70, ms(10));
    h.out.take();
    h.timers(ms(40));
    assert!(h.out.take().is_empty(), "not yet silent long enough");
    h.timers(ms(61));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].seq, sent[0].ack, sent[0].len),
        (C_ISN + 5, T_BASE + 70, 4)
    );
    assert_eq!(h.table.stats().pace_releases, 1);
    // The write-off carries over: request 3 after another 100 online bytes needs 100 more.
    h.resp(A, T_BASE + 70, C_ISN + 9, 100, ms(62));
    h.out.take();
    h.client(PA, C_ISN + 9, O_BASE + 200, b"req3", ms(63));
    assert_eq!(h.out.take().len(), 1);
}

#[test]
fn no_wait_sends_as_captured() {
    let config = SessionConfig {
        pacing: Pacing::NoWait,
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"req1", ms(2));
    h.client(PA, C_ISN + 5, O_BASE + 100, b"req2", ms(3));
    assert_eq!(h.out.take().len(), 2);
}

#[test]
fn syn_and_data_are_retransmitted_then_given_up() {
    let config = SessionConfig {
        rto_initial: ms(100),
        max_retries: 2,
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.client(TcpFlags::SYN, C_ISN, 0, b"", ms(0));
    h.out.take();
    h.timers(ms(99));
    assert!(h.out.take().is_empty());
    h.timers(ms(100));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].flags, TcpFlags::SYN);
    assert_eq!(
        h.out.registered.len(),
        2,
        "the route is registered again with the SYN"
    );
    h.resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0, ms(150));
    h.client(PA, C_ISN + 1, O_BASE, b"data", ms(150));
    h.out.take();
    // Not acknowledged: retransmitted at 250 ms (backoff reset by the SYN-ACK), then 450 ms.
    h.timers(ms(250));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].seq, sent[0].len), (C_ISN + 1, 4));
    h.timers(ms(450));
    assert_eq!(h.out.take().len(), 1);
    h.timers(ms(850));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].flags.contains(TcpFlags::RST), "{sent:?}");
    assert_eq!(
        sent[0].seq,
        C_ISN + 1,
        "at what the target acknowledged last"
    );
    let s = h.table.stats();
    assert_eq!((s.retransmits, s.gave_up), (3, 1));
}

#[test]
fn fin_exchange_closes_and_the_session_is_removed() {
    let config = SessionConfig {
        linger: ms(1000),
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"GET", ms(2));
    // The target answers 10 bytes and closes (HTTP/1.0).
    h.resp(PA, T_BASE, C_ISN + 4, 10, ms(3));
    h.resp(FA, T_BASE + 10, C_ISN + 4, 0, ms(3));
    let sent = h.out.take();
    assert_eq!(
        sent.last().unwrap().ack,
        T_BASE + 11,
        "the target's FIN is acknowledged"
    );
    // The client's FIN acknowledged 10 bytes + FIN online.
    h.client(FA, C_ISN + 4, O_BASE + 11, b"", ms(4));
    let sent = h.out.take();
    assert_eq!(
        sent,
        vec![Out {
            flags: FA,
            seq: C_ISN + 4,
            ack: T_BASE + 11,
            len: 0,
            ts: None
        }]
    );
    h.resp(A, T_BASE + 11, C_ISN + 5, 0, ms(5));
    assert_eq!(h.table.stats().closed, 1);
    assert!(h.table.get(&key()).unwrap().is_closed());
    h.timers(ms(1004));
    assert!(h.table.get(&key()).is_some());
    h.timers(ms(1006));
    assert!(h.table.is_empty());
    assert_eq!(h.out.unregistered, vec![key()]);
}

#[test]
fn client_fin_waits_for_the_response() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"GET", ms(2));
    h.out.take();
    h.client(FA, C_ISN + 4, O_BASE + 50, b"", ms(3));
    assert!(h.out.take().is_empty(), "FIN held until 50 response bytes");
    h.resp(PA, T_BASE, C_ISN + 4, 50, ms(4));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].flags, FA);
    assert_eq!(h.table.stats().sent_fin, 1);
}

#[test]
fn port_reuse_resets_the_old_session_before_the_new_syn() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"GET", ms(2));
    h.out.take();
    h.client(TcpFlags::SYN, 77_000, 0, b"", ms(3));
    let sent = h.out.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent[0].flags.contains(TcpFlags::RST));
    assert_eq!(
        sent[0].seq,
        C_ISN + 1,
        "at the target's last acknowledgement"
    );
    assert_eq!(sent[1].flags, TcpFlags::SYN);
    assert_eq!(sent[1].seq, 77_000);
    assert_eq!(h.table.stats().port_reuse_resets, 1);
    assert_eq!(h.out.unregistered, vec![key()]);
    assert_eq!(h.out.registered, vec![key(), key()]);
    // A retransmitted SYN of the new connection is absorbed.
    h.client(TcpFlags::SYN, 77_000, 0, b"", ms(4));
    assert!(h.out.take().is_empty());
    assert_eq!(h.table.stats().client_syn_retransmits, 1);
}

#[test]
fn retransmissions_and_pure_acks_are_absorbed() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"abcd", ms(2));
    h.client(PA, C_ISN + 1, O_BASE, b"abcd", ms(3));
    h.client(A, C_ISN + 5, O_BASE, b"", ms(3));
    assert_eq!(h.out.take().len(), 1);
    let s = h.table.stats();
    assert_eq!((s.client_retransmits, s.client_acks_absorbed), (1, 2));
}

#[test]
fn target_reset_closes() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    h.resp(TcpFlags::RST, T_BASE, 0, 0, ms(3));
    assert!(h.table.get(&key()).unwrap().is_closed());
    assert_eq!(h.table.stats().target_resets, 1);
}

#[test]
fn silent_target_times_out() {
    let config = SessionConfig {
        timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.establish();
    h.timers(Duration::from_secs(6));
    let sent = h.out.take();
    assert!(
        sent.iter().any(|o| o.flags.contains(TcpFlags::RST)),
        "{sent:?}"
    );
    assert_eq!(h.table.stats().timed_out, 1);
}

#[test]
fn timestamps_are_rewritten_and_monotonic() {
    let mut h = Harness::new(SessionConfig::default());
    let (p, s) = client(TcpFlags::SYN, C_ISN, 0, b"", Some(500));
    h.table.on_client_packet(key(), &p, &s, ms(0), &mut h.out);
    let mut synack = resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0);
    synack.timestamps = Some((7_000, 500));
    h.table.on_response(&synack, ms(1), &mut h.out);
    let sent = h.out.take();
    assert_eq!(
        sent[1].ts,
        Some((500, 7_000)),
        "handshake ACK echoes the target"
    );
    let (p, s) = client(PA, C_ISN + 1, O_BASE, b"req1", Some(510));
    h.table.on_client_packet(key(), &p, &s, ms(2), &mut h.out);
    // Captured later but with an older TSval (reordering): never goes backwards.
    let (p2, s2) = client(PA, C_ISN + 5, O_BASE, b"req2", Some(505));
    h.table.on_client_packet(key(), &p2, &s2, ms(2), &mut h.out);
    let sent = h.out.take();
    assert_eq!(sent[0].ts, Some((510, 7_000)));
    assert_eq!(sent[1].ts, Some((510, 7_000)));
}

#[test]
fn queue_is_bounded() {
    let config = SessionConfig {
        max_queued_segments: 3,
        ..SessionConfig::default()
    };
    let mut h = Harness::new(config);
    h.client(TcpFlags::SYN, C_ISN, 0, b"", ms(0));
    for i in 0..5u32 {
        h.client(PA, C_ISN + 1 + i, O_BASE, b"x", ms(1));
    }
    assert_eq!(
        h.table.get(&key()).unwrap().queued(),
        3,
        "the SYN and two segments"
    );
    assert_eq!(h.table.stats().queue_full, 3);
}

#[test]
fn table_is_bounded_and_shutdown_resets_everything() {
    let config = SessionConfig {
        max_sessions: 2,
        ..SessionConfig::default()
    };
    let mut table = SessionTable::new(config);
    let mut out = Rec::default();
    for port in 1..=3u16 {
        let mut k = key();
        k.client_port = port;
        let (p, s) = client(TcpFlags::SYN, C_ISN, 0, b"", None);
        table.on_client_packet(k, &p, &s, ms(0), &mut out);
    }
    assert_eq!(table.len(), 2);
    assert_eq!(table.stats().table_full, 1);
    out.sent.clear();
    table.shutdown(ms(1), &mut out);
    assert!(table.is_empty());
    assert_eq!(out.sent.len(), 2, "one RST per open session");
    assert_eq!(out.unregistered.len(), 2);
}

/// The window field of every packet sent so far, undecoded.
fn windows(rec: &Rec) -> Vec<u16> {
    rec.sent
        .iter()
        .map(|p| {
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            TcpPacket::new_checked(ip.payload()).unwrap().window_len()
        })
        .collect()
}

#[test]
fn with_o_mid_stream_segments_are_counted_not_replayed() {
    let mut h = Harness::new(SessionConfig {
        mid_stream: false,
        ..SessionConfig::default()
    });
    h.client(PA, C_ISN + 1, O_BASE, b"data", ms(0));
    assert!(h.out.take().is_empty());
    assert_eq!(h.table.stats().client_no_session, 1);
    assert!(h.table.is_empty());
    h.resp(A, T_BASE, C_ISN, 0, ms(0));
    assert_eq!(h.table.stats().response_no_session, 1);
}

#[test]
fn a_session_captured_mid_stream_starts_with_a_fabricated_syn() {
    let mut h = Harness::new(SessionConfig {
        fake_syn_mss: 1200,
        ..SessionConfig::default()
    });
    // A pure ACK never starts a session.
    h.client(A, C_ISN + 1, O_BASE + 300, b"", ms(0));
    assert!(h.out.take().is_empty() && h.table.is_empty());
    // Data does: a SYN just before its first byte, window 65535, MSS -D, nothing else.
    h.client(
        PA,
        C_ISN + 1,
        O_BASE + 300,
        b"GET /a HTTP/1.1\r\n\r\n",
        ms(1),
    );
    assert_eq!(h.out.registered, vec![key()]);
    let syn = h.out.sent[0].clone();
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].flags, sent[0].seq, sent[0].ts),
        (TcpFlags::SYN, C_ISN, None)
    );
    let ip = Ipv4Packet::new_checked(&syn[..]).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    let repr = TcpRepr::parse(&tcp);
    assert_eq!(
        (repr.mss, repr.window_scale, repr.sack_permitted),
        (Some(1200), None, false)
    );
    assert_eq!(repr.window, 65535);
    assert_eq!(h.table.stats().mid_stream_created, 1);
    assert_eq!(h.table.stats().created, 1);
    // The next request of the keep-alive connection waits for the answer to the first.
    h.client(
        PA,
        C_ISN + 20,
        O_BASE + 700,
        b"GET /b HTTP/1.1\r\n\r\n",
        ms(2),
    );
    assert!(h.out.take().is_empty());
    // SYN-ACK: our third handshake ACK, then the first request, with the window forced.
    h.resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0, ms(3));
    let wins = windows(&h.out);
    let sent = h.out.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        (sent[0].flags, sent[0].seq, sent[0].ack),
        (A, C_ISN + 1, T_BASE)
    );
    assert_eq!(
        (sent[1].seq, sent[1].ack, sent[1].len),
        (C_ISN + 1, T_BASE, 19)
    );
    assert_eq!(wins, vec![65535, 65535]);
    // The target answers 400 bytes (the online server had sent 400 too): /b goes out.
    h.resp(PA, T_BASE, C_ISN + 20, 400, ms(4));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].seq, sent[0].ack, sent[0].len),
        (C_ISN + 20, T_BASE + 400, 19)
    );
    assert_eq!(h.table.stats().answered, 1);
    h.resp(PA, T_BASE + 400, C_ISN + 39, 100, ms(5));
    assert_eq!(h.table.stats().answered, 1, "once per session");
}

#[test]
fn a_session_the_target_reset_is_rebuilt_with_its_undelivered_data() {
    let mut h = Harness::new(SessionConfig {
        max_reconstructions: 1,
        ..SessionConfig::default()
    });
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"first", ms(2));
    h.resp(A, T_BASE, C_ISN + 6, 0, ms(3));
    // The target closed the connection (e.g. its keep-alive timeout) but the online one is
    // open: the next request meets an RST.
    h.client(PA, C_ISN + 6, O_BASE, b"second", ms(10));
    assert_eq!(h.out.take().len(), 2, "data + (first) ACK-less send");
    h.resp(TcpFlags::RST, C_ISN + 6, 0, 0, ms(11));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].flags, sent[0].seq), (TcpFlags::SYN, C_ISN + 5));
    assert_eq!(h.table.stats().reconstructed, 1);
    assert_eq!(h.table.stats().target_resets, 1);
    h.resp(TcpFlags::SYN | A, T_ISN + 77, C_ISN + 6, 0, ms(12));
    let sent = h.out.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[0].flags, sent[0].ack), (A, T_ISN + 78));
    assert_eq!(
        (sent[1].seq, sent[1].ack, sent[1].len),
        (C_ISN + 6, T_ISN + 78, 6)
    );
    // A second reset is one too many (max_reconstructions 1): the session ends.
    h.resp(TcpFlags::RST, C_ISN + 6, 0, 0, ms(13));
    assert!(h.out.take().is_empty());
    assert!(h.table.get(&key()).is_some_and(|s| s.is_closed()));
    assert_eq!(h.table.stats().reconstructed, 1);
}

#[test]
fn a_late_segment_fills_the_hole_behind_sent_data() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    // The capture missed "bbbb" the first time; the client retransmits it after "cccc".
    h.client(PA, C_ISN + 1, O_BASE, b"aaaa", ms(2));
    h.client(PA, C_ISN + 9, O_BASE, b"cccc", ms(2));
    assert_eq!(h.out.take().len(), 2);
    h.client(PA, C_ISN + 5, O_BASE, b"bbbb", ms(3));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "the hole is filled at once");
    assert_eq!((sent[0].seq, sent[0].len), (C_ISN + 5, 4));
    assert_eq!(h.table.stats().client_hole_fills, 1);
    assert_eq!(h.table.stats().client_retransmits, 0);
    // Its duplicate is absorbed; the target's ACK of everything empties the queue.
    h.client(PA, C_ISN + 5, O_BASE, b"bbbb", ms(3));
    assert!(h.out.take().is_empty());
    assert_eq!(h.table.stats().client_retransmits, 1);
    h.resp(A, T_BASE, C_ISN + 13, 0, ms(4));
    assert_eq!(h.table.get(&key()).unwrap().queued(), 0);
    // Acknowledged data captured again is a duplicate too.
    h.client(PA, C_ISN + 1, O_BASE, b"aaaa", ms(5));
    assert_eq!(h.table.stats().client_retransmits, 2);
}

#[test]
fn duplicate_acks_and_partial_acks_retransmit_holes() {
    let mut h = Harness::new(SessionConfig::default());
    h.establish();
    for i in 0..5u32 {
        h.client(PA, C_ISN + 1 + 4 * i, O_BASE, b"data", ms(2));
    }
    assert_eq!(h.out.take().len(), 5);
    // The target lost segments 2 and 4: it acknowledges segment 1, then duplicates.
    h.resp(A, T_BASE, C_ISN + 5, 0, ms(3));
    for _ in 0..3 {
        h.resp(A, T_BASE, C_ISN + 5, 0, ms(3));
    }
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].seq, C_ISN + 5, "fast retransmit of the first hole");
    // Partial ACK up to the second hole: retransmitted at once.
    h.resp(A, T_BASE, C_ISN + 13, 0, ms(4));
    let sent = h.out.take();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].seq, C_ISN + 13);
    h.resp(A, T_BASE, C_ISN + 21, 0, ms(5));
    assert!(h.out.take().is_empty());
    assert_eq!(h.table.stats().retransmits, 2);
}

#[test]
fn a_stale_connection_at_the_target_is_reset_and_the_syn_resent() {
    let mut h = Harness::new(SessionConfig::default());
    h.client(TcpFlags::SYN, C_ISN, 0, b"", ms(0));
    h.out.take();
    // The target still has an older connection on this 4-tuple: a challenge ACK.
    h.resp(A, 55_555, 123_456, 0, ms(1));
    let sent = h.out.take();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[0].flags, sent[0].seq), (TcpFlags::RST, 123_456));
    assert_eq!((sent[1].flags, sent[1].seq), (TcpFlags::SYN, C_ISN));
    assert_eq!(h.table.stats().stale_target_resets, 1);
    h.resp(TcpFlags::SYN | A, T_ISN, C_ISN + 1, 0, ms(2));
    assert_eq!(h.table.stats().established, 1);
}

#[test]
fn a_zero_window_is_probed_without_giving_up_while_the_target_answers() {
    let mut h = Harness::new(SessionConfig {
        pacing: Pacing::NoWait,
        max_retries: 3,
        ..SessionConfig::default()
    });
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"aaaa", ms(2));
    h.client(PA, C_ISN + 5, O_BASE, b"bbbb", ms(2));
    assert_eq!(h.out.take().len(), 2);
    // The target takes nothing and closes its window; it answers every probe the same way.
    let zero = |h: &mut Harness, at: Duration| {
        let mut r = resp(A, T_BASE, C_ISN + 1, 0);
        r.window = 0;
        h.table.on_response(&r, at, &mut h.out);
    };
    zero(&mut h, ms(3));
    zero(&mut h, ms(3));
    zero(&mut h, ms(3));
    zero(&mut h, ms(3));
    assert_eq!(
        h.table.stats().retransmits,
        0,
        "window updates are not duplicate ACKs"
    );
    let mut now = 3;
    for _ in 0..10 {
        now += 4_000;
        h.timers(ms(now));
        zero(&mut h, ms(now));
    }
    assert_eq!(h.table.stats().gave_up, 0);
    assert!(h.table.stats().retransmits >= 10, "{:?}", h.table.stats());
    assert!(h.table.get(&key()).is_some_and(|s| s.is_established()));
    // The window opens: everything is acknowledged and the session goes on.
    h.resp(A, T_BASE, C_ISN + 9, 0, ms(now + 1));
    assert_eq!(h.table.get(&key()).unwrap().queued(), 0);
    // A target that falls silent is still given up.
    h.client(PA, C_ISN + 9, O_BASE, b"cccc", ms(now + 2));
    for i in 1..=10 {
        h.timers(ms(now + 2 + i * 4_000));
    }
    assert_eq!(h.table.stats().gave_up, 1);
}

#[test]
fn a_module_puts_its_bytes_in_front_of_a_mid_stream_session() {
    let mut h = Harness::new(SessionConfig::default());
    h.table
        .set_module(Box::new(LineAuth::from_arg("AUTH :AUTH lab")));
    h.client(PA, C_ISN + 1, O_BASE + 64, b"GET 7\r\n", ms(1));
    let sent = h.out.take();
    // "AUTH lab\r\n" is 10 bytes: the SYN moves back by them.
    assert_eq!((sent[0].flags, sent[0].seq), (TcpFlags::SYN, C_ISN - 10));
    h.resp(TcpFlags::SYN | A, T_ISN, C_ISN - 9, 0, ms(2));
    let sent = h.out.take();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!((sent[1].seq, sent[1].len), (C_ISN - 9, 10));
    assert_eq!((sent[2].seq, sent[2].len), (C_ISN + 1, 7));
    assert_eq!(h.table.stats().module_prefixes, 1);
    assert_eq!(h.table.module().map(|m| m.name()), Some("line-auth"));
}

#[test]
fn a_module_learns_from_sessions_seen_from_their_syn() {
    let mut h = Harness::new(SessionConfig::default());
    h.table.set_module(Box::new(LineAuth::from_arg("AUTH ")));
    h.establish();
    h.client(PA, C_ISN + 1, O_BASE, b"AUTH learned\r\n", ms(2));
    h.out.take();
    // Another session of the same client, captured mid-stream, gets the learned line.
    let other = FlowKey {
        client_port: 40001,
        ..key()
    };
    let (mut p, s) = client(PA, 50_000, O_BASE, b"GET 1\r\n", None);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
        let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
        tcp.rewrite_src_port(40001);
    }
    h.table.on_client_packet(other, &p, &s, ms(3), &mut h.out);
    let syn = h.out.take();
    assert_eq!(syn[0].seq, 50_000 - 1 - 14);
    assert_eq!(h.table.stats().module_prefixes, 1);
}
