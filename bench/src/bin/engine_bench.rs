//! engine-bench: single-core micro-benchmarks of the packet engine on in-memory data.
//!
//! ```text
//! cargo run --release -p bench --bin engine-bench            # everything (~10 minutes)
//! cargo run --release -p bench --bin engine-bench -- --quick # 1k and 100k sessions only
//! cargo run --release -p bench --bin engine-bench -- --case burst --payload 64 --sessions 100000 --repeat 3
//! ```
//!
//! It runs itself again with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc then asks for
//! transparent huge pages on its large allocations: the table and the pool are large and
//! randomly accessed, and 2 MiB pages cut the TLB misses; about 15% on this VM) unless
//! `--no-thp` is given or `GLIBC_TUNABLES` is already set.
//!
//! (a) The tcpcopy established-session path: sessions are opened first (client SYN, the
//!     target's SYN-ACK, the client's handshake ACK), then captured data segments of 64 or 512
//!     payload bytes (timestamps on, as Linux sends) go through the session table in a random
//!     session order, over 1k, 100k and 1M sessions, into an `Output` that discards. The
//!     target acknowledges every session's data every K rounds (K = 8, less where the segment
//!     pool would pass 2 GiB), so queues drain as they do live; the time of those ACK replies
//!     is included. The first K rounds warm up (first touches of pool pages) untimed. Lines:
//!     - `session`: `on_client_packet`, one at a time; the packet is patched in a cache-hot
//!       buffer, as ingress leaves it;
//!     - `burst`: `on_client_burst` (32 at a time) and `on_response_burst`, which prefetch;
//!     - `ingress+session`, `ingress+burst`: tcpcopy's ingress (parse the Ethernet frame,
//!       match the `-x` transfer, rewrite to the target) first, then as above;
//!     - `session ack/1`, `burst ack/1`: the target acknowledges after every round: one reply
//!       per request, as in request/response traffic (each packet moves its session from idle
//!       to busy and back);
//!     - `wait`: `WaitForResponse` pacing (all other lines use `NoWait`; the segments need no
//!       response bytes, so they pass the pacing check and go out at once).
//!     The RTO is 60 s so that no retransmission interferes (the virtual clock advances 100 ns
//!     a packet).
//! (b) The intercept extract-and-route path per reply: `encode_record` + `ResponseHeader`
//!     parse + `RouteTable::get` + `BatchEncoder::push`, over 100k routes.
//! (c) Table memory per session at 1k, 100k, 1M: the structures' sizes, and the resident
//!     memory the process gained creating that many established sessions.
//! (d) Session lookups per second, one at a time (`get`) and batched with prefetch
//!     (`get_batch`), over 100k and 1M sessions.
//! (e) Scaling from 1 to 2 workers: the `burst` line (64 bytes) over 100k sessions split
//!     between pinned threads, each with its own table, timed over the same window.

use engine::control::RouteTable;
use engine::control::{encode_record, BatchEncoder, ConnId, Framing, RecordFormat, ResponseHeader};
use engine::flow::FlowKey;
use engine::session::{
    ClientPacket, ClientSegment, Output, Pacing, Response, Session, SessionConfig, SessionTable,
};
use engine::wire::tcp::{emit_ipv4_tcp, TcpRepr};
use engine::wire::{SeqNum, TcpFlags};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const ISN: u32 = 1000;
const T_ISN: u32 = 700_000;
/// The online server's first byte, as the client acknowledges it.
const O_BASE: u32 = 5001;
const TARGET: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const TARGET_PORT: u16 = 8080;
const ONLINE: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
const ONLINE_PORT: u16 = 80;
const ETH: usize = 14;
/// Most pool memory one run may use.
const POOL_BUDGET: usize = 2 << 30;

/// An `Output` that only counts.
#[derive(Debug, Default)]
struct Discard {
    packets: u64,
    bytes: u64,
}

impl Output for Discard {
    fn transmit(&mut self, packet: &[u8]) {
        self.packets += 1;
        self.bytes += packet.len() as u64;
    }
    fn register(&mut self, _key: FlowKey) {}
    fn unregister(&mut self, _key: FlowKey) {}
}

fn client_ip(s: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A01_0000u32 + (s >> 15) as u32)
}

fn client_port(s: usize) -> u16 {
    20_000 + (s & 0x7FFF) as u16
}

fn key(s: usize) -> FlowKey {
    FlowKey {
        client_ip: client_ip(s),
        client_port: client_port(s),
        target_ip: TARGET,
        target_port: TARGET_PORT,
    }
}

/// An IPv4 packet from session `s`'s client, to `dst`, with timestamps (as Linux sends).
fn client_packet(
    s: usize,
    dst: (Ipv4Addr, u16),
    flags: TcpFlags,
    seq: u32,
    payload: usize,
) -> Vec<u8> {
    let syn = flags.contains(TcpFlags::SYN);
    let repr = TcpRepr {
        src_port: client_port(s),
        dst_port: dst.1,
        seq: SeqNum(seq),
        ack: SeqNum(if syn { 0 } else { O_BASE }),
        flags,
        window: 502,
        mss: syn.then_some(1460),
        window_scale: syn.then_some(7),
        sack_permitted: syn,
        timestamps: Some((1_000_000, if syn { 0 } else { 2_000_000 })),
        payload_len: payload,
    };
    let mut buf = Vec::new();
    emit_ipv4_tcp(
        &mut buf,
        client_ip(s),
        dst.0,
        1,
        64,
        &repr,
        &vec![b'x'; payload],
    );
    buf
}

fn with_ethernet(ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; ETH];
    engine::wire::ethernet::emit_header(&mut frame, [2; 6], [4; 6], 0x0800);
    frame.extend_from_slice(ip);
    frame
}

/// Puts session `s`'s client address and sequence number into a packet (IP header at `ip`).
#[inline]
fn patch(buf: &mut [u8], ip: usize, s: usize, seq: u32) {
    buf[ip + 12..ip + 16].copy_from_slice(&client_ip(s).octets());
    buf[ip + 20..ip + 22].copy_from_slice(&client_port(s).to_be_bytes());
    buf[ip + 24..ip + 28].copy_from_slice(&seq.to_be_bytes());
}

fn ack(s: usize, ack: u32, synack: bool) -> Response {
    Response {
        key: key(s),
        seq: SeqNum(if synack { T_ISN } else { T_ISN + 1 }),
        ack: SeqNum(ack),
        flags: if synack {
            TcpFlags::SYN | TcpFlags::ACK
        } else {
            TcpFlags::ACK
        },
        window: 65535,
        payload_len: 0,
        timestamps: Some((3_000_000, 1_000_000)),
        window_scale: synack.then_some(7),
    }
}

/// A pseudo-random permutation of `0..n` (xorshift, fixed seed).
fn permutation(n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn table_config(
    sessions: usize,
    pool_small: usize,
    pool_large: usize,
    pacing: Pacing,
) -> SessionConfig {
    SessionConfig {
        pacing,
        rto_initial: Duration::from_secs(60),
        rto_max: Duration::from_secs(120),
        max_sessions: sessions,
        pool_small_segments: pool_small,
        pool_segments: pool_large,
        ..SessionConfig::default()
    }
}

/// Opens `n` sessions: SYN, SYN-ACK, the client's handshake ACK.
fn establish(table: &mut SessionTable, n: usize, now: Duration, out: &mut Discard) {
    let syn = client_packet(0, (TARGET, TARGET_PORT), TcpFlags::SYN, ISN, 0);
    let hs = client_packet(0, (TARGET, TARGET_PORT), TcpFlags::ACK, ISN + 1, 0);
    let syn_seg = ClientSegment::parse(&syn).expect("SYN");
    let hs_seg = ClientSegment::parse(&hs).expect("ACK");
    let mut syn = syn;
    let mut hs = hs;
    for s in 0..n {
        patch(&mut syn, 0, s, ISN);
        table.on_client_packet(key(s), &syn, &syn_seg, now, out);
        table.on_response(&ack(s, ISN + 1, true), now, out);
        patch(&mut hs, 0, s, ISN + 1);
        table.on_client_packet(key(s), &hs, &hs_seg, now, out);
    }
    assert_eq!(table.len(), n, "every session opened");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Session,
    Burst,
    Ingress,
    IngressBurst,
    AckEach,
    BurstAckEach,
    Wait,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Session => "session",
            Case::Burst => "burst",
            Case::Ingress => "ingress+session",
            Case::IngressBurst => "ingress+burst",
            Case::AckEach => "session ack/1",
            Case::BurstAckEach => "burst ack/1",
            Case::Wait => "wait",
        }
    }

    fn parse(text: &str) -> Option<Case> {
        Some(match text {
            "session" => Case::Session,
            "burst" => Case::Burst,
            "ingress" => Case::Ingress,
            "ingress-burst" => Case::IngressBurst,
            "ack1" => Case::AckEach,
            "burst-ack1" => Case::BurstAckEach,
            "wait" => Case::Wait,
            _ => return None,
        })
    }
}

struct Outcome {
    packets: u64,
    replies: u64,
    elapsed: Duration,
    ack_every: usize,
}

/// (a) One established-path run.
fn established(case: Case, payload: usize, sessions: usize, min_packets: u64) -> Outcome {
    established_synced(case, payload, sessions, min_packets, None)
}

/// (a) with an optional barrier that every worker of a scaling run passes right before its
/// timed rounds start (so that their timed windows overlap).
fn established_synced(
    case: Case,
    payload: usize,
    sessions: usize,
    min_packets: u64,
    barrier: Option<&std::sync::Barrier>,
) -> Outcome {
    let packet_len = 20 + 32 + payload;
    let slot = if packet_len <= 224 { 256 } else { 2048 };
    let bursts = matches!(case, Case::Burst | Case::BurstAckEach | Case::IngressBurst);
    let mut ack_every = if matches!(case, Case::AckEach | Case::BurstAckEach) {
        1
    } else {
        8
    };
    while ack_every > 1 && sessions * ack_every * slot > POOL_BUDGET {
        ack_every /= 2;
    }
    let slots = sessions * ack_every + 1024;
    let (small, large) = if slot == 256 {
        (slots, 64)
    } else {
        (sessions + 1024, slots)
    };
    let pacing = if case == Case::Wait {
        Pacing::WaitForResponse
    } else {
        Pacing::NoWait
    };
    let mut table = SessionTable::new(table_config(sessions, small, large, pacing));
    let mut out = Discard::default();
    let t0 = Duration::from_secs(1);
    establish(&mut table, sessions, t0, &mut out);
    let order = permutation(sessions);
    let rounds = (min_packets.div_ceil(sessions as u64) as usize).next_multiple_of(ack_every);
    let mut next_seq = vec![ISN + 1; sessions];
    let template = client_packet(0, (TARGET, TARGET_PORT), TcpFlags(0x18), ISN + 1, payload);
    let base_seg = ClientSegment::parse(&template).expect("data segment");
    let mut ip = template.clone();
    let mut frame = with_ethernet(&client_packet(
        0,
        (ONLINE, ONLINE_PORT),
        TcpFlags(0x18),
        ISN + 1,
        payload,
    ));
    #[cfg(feature = "ingress")]
    let mut ingress = {
        use pipelines::tcpcopy::transform::parse_transfers;
        let transfers = parse_transfers(&format!("{ONLINE}:{ONLINE_PORT}-{TARGET}:{TARGET_PORT}"))
            .expect("transfer");
        pipelines::tcpcopy::ingress::Ingress::new(transfers, None)
    };
    let mut rewritten: Vec<u8> = Vec::with_capacity(2048);
    const BURST: usize = 32;
    let mut ring: Vec<Vec<u8>> = vec![template.clone(); BURST];
    let mut ring_keys = [(
        FlowKey::new("0.0.0.0:0".parse().unwrap(), "0.0.0.0:0".parse().unwrap()),
        base_seg,
    ); BURST];
    let mut in_ring = 0;
    let mut now_ns = t0.as_nanos() as u64;
    let mut packets = 0u64;
    let mut replies = 0u64;
    // The first ACK cycle warms up (first touches of pool pages), untimed.
    let mut start = Instant::now();
    for round in 0..rounds + ack_every {
        if round == ack_every {
            if let Some(barrier) = barrier {
                barrier.wait();
            }
            start = Instant::now();
            packets = 0;
            replies = 0;
        }
        for &s in &order {
            let s = s as usize;
            let seq = next_seq[s];
            next_seq[s] = seq.wrapping_add(payload as u32);
            let now = Duration::from_nanos(now_ns);
            match case {
                Case::Session | Case::AckEach | Case::Wait => {
                    patch(&mut ip, 0, s, seq);
                    let mut seg = base_seg;
                    seg.seq = SeqNum(seq);
                    table.on_client_packet(key(s), &ip, &seg, now, &mut out);
                }
                Case::Ingress => {
                    patch(&mut frame, ETH, s, seq);
                    #[cfg(feature = "ingress")]
                    {
                        let (k, seg) = ingress
                            .process(
                                &frame,
                                frame.len(),
                                pipelines::tcpcopy::ingress::LinkType::Ethernet,
                                &mut rewritten,
                            )
                            .expect("accepted");
                        table.on_client_packet(k, &rewritten, &seg, now, &mut out);
                    }
                    #[cfg(not(feature = "ingress"))]
                    unreachable!("built without the ingress feature");
                }
                Case::IngressBurst => {
                    // Ingress into one of 32 buffers; the session table takes them 32 at a time.
                    patch(&mut frame, ETH, s, seq);
                    #[cfg(feature = "ingress")]
                    {
                        let (k, seg) = ingress
                            .process(
                                &frame,
                                frame.len(),
                                pipelines::tcpcopy::ingress::LinkType::Ethernet,
                                &mut ring[in_ring],
                            )
                            .expect("accepted");
                        ring_keys[in_ring] = (k, seg);
                        in_ring += 1;
                        if in_ring == BURST {
                            flush_burst(&mut table, &ring, &ring_keys, now, &mut out);
                            in_ring = 0;
                        }
                    }
                    #[cfg(not(feature = "ingress"))]
                    unreachable!("built without the ingress feature");
                }
                Case::Burst | Case::BurstAckEach => {
                    patch(&mut ring[in_ring], 0, s, seq);
                    let mut seg = base_seg;
                    seg.seq = SeqNum(seq);
                    ring_keys[in_ring] = (key(s), seg);
                    in_ring += 1;
                    if in_ring == BURST {
                        flush_burst(&mut table, &ring, &ring_keys, now, &mut out);
                        in_ring = 0;
                    }
                }
            }
            packets += 1;
            now_ns += 100;
            if packets.is_multiple_of(1024) {
                table.run_timers(Duration::from_nanos(now_ns), 256, &mut out);
            }
        }
        if in_ring > 0 {
            let now = Duration::from_nanos(now_ns);
            flush_burst(
                &mut table,
                &ring[..in_ring],
                &ring_keys[..in_ring],
                now,
                &mut out,
            );
            in_ring = 0;
        }
        if (round + 1) % ack_every == 0 {
            let now = Duration::from_nanos(now_ns);
            if bursts {
                let mut acks: Vec<Response> = Vec::with_capacity(BURST);
                for chunk in order.chunks(BURST) {
                    acks.clear();
                    acks.extend(
                        chunk
                            .iter()
                            .map(|&s| ack(s as usize, next_seq[s as usize], false)),
                    );
                    table.on_response_burst(&acks, now, &mut out);
                    replies += chunk.len() as u64;
                }
            } else {
                for &s in &order {
                    let s = s as usize;
                    table.on_response(&ack(s, next_seq[s], false), now, &mut out);
                    replies += 1;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let _ = &mut rewritten;
    let stats = *table.stats();
    let total = (rounds + ack_every) as u64 * sessions as u64;
    if stats.sent_data != total
        || stats.queue_full + stats.pool_exhausted > 0
        || stats.retransmits > 0
    {
        eprintln!(
            "  warning: {} sent of {total}, queue-full {}, pool-exhausted {}, retransmits {}",
            stats.sent_data, stats.queue_full, stats.pool_exhausted, stats.retransmits
        );
        eprintln!("  (of {total} packets in all)");
    }
    black_box(out.bytes);
    Outcome {
        packets,
        replies,
        elapsed,
        ack_every,
    }
}

fn flush_burst(
    table: &mut SessionTable,
    ring: &[Vec<u8>],
    keys: &[(FlowKey, ClientSegment)],
    now: Duration,
    out: &mut Discard,
) {
    let n = ring.len();
    let burst: [ClientPacket<'_>; 32] = std::array::from_fn(|i| {
        let i = i.min(n - 1);
        ClientPacket {
            key: keys[i].0,
            packet: &ring[i],
            seg: keys[i].1,
        }
    });
    table.on_client_burst(&burst[..n], now, out);
}

/// (e) The scaling table.
fn scaling_report(packets: u64) {
    println!(
        "\n(e) scaling: the burst line, 64-byte segments, 100k sessions split over 1 and 2 \
         workers (threads pinned to cores 0 and 1, each with its own table)"
    );
    let mut one = 0.0;
    for workers in [1usize, 2] {
        let (mpps, per) = scaling(workers, 100_000, packets);
        if workers == 1 {
            one = mpps;
        }
        println!(
            "{workers} worker(s): {mpps:>6.2} Mpps total ({}), {:.2}x of one worker",
            per.iter()
                .map(|m| format!("{m:.2}"))
                .collect::<Vec<_>>()
                .join(" + "),
            mpps / one
        );
    }
}

/// (e) `workers` threads, pinned, each running the burst line over its share of `sessions`
/// at the same time. Returns the total packet rate (Mpps) and each worker's.
fn scaling(workers: usize, sessions: usize, packets: u64) -> (f64, Vec<f64>) {
    let barrier = std::sync::Barrier::new(workers);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let barrier = &barrier;
                let core = cores.get(w % cores.len().max(1)).copied();
                s.spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    established_synced(
                        Case::Burst,
                        64,
                        sessions / workers,
                        packets / workers as u64,
                        Some(barrier),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    let per: Vec<f64> = outcomes
        .iter()
        .map(|o| o.packets as f64 / o.elapsed.as_secs_f64() / 1e6)
        .collect();
    let packets: u64 = outcomes.iter().map(|o| o.packets).sum();
    let longest = outcomes.iter().map(|o| o.elapsed).max().unwrap_or_default();
    (packets as f64 / longest.as_secs_f64() / 1e6, per)
}

/// (b) The intercept extract-and-route path, per reply.
fn intercept(flows: usize, records: u64, format: RecordFormat, payload: usize) -> (u64, Duration) {
    let now = Instant::now();
    let mut routes = RouteTable::new(Duration::from_secs(3600), flows * 2);
    let owner: std::net::IpAddr = std::net::Ipv4Addr::new(10, 77, 0, 20).into();
    for s in 0..flows {
        routes.insert(key(s), ConnId::from_parts((s % 4) as u32, 1), owner, now);
    }
    // A reply of the target to session `s`: target -> client.
    let repr = TcpRepr {
        src_port: TARGET_PORT,
        dst_port: client_port(0),
        seq: SeqNum(T_ISN + 1),
        ack: SeqNum(ISN + 1),
        flags: TcpFlags(0x18),
        window: 502,
        mss: None,
        window_scale: None,
        sack_permitted: false,
        timestamps: Some((3_000_000, 1_000_000)),
        payload_len: payload,
    };
    let mut ip = Vec::new();
    emit_ipv4_tcp(
        &mut ip,
        TARGET,
        client_ip(0),
        1,
        64,
        &repr,
        &vec![b'y'; payload],
    );
    let mut frame = with_ethernet(&ip);
    let order = permutation(flows);
    let mut record = vec![0u8; format.record_len()];
    let mut batch = BatchEncoder::new(format, Framing::Combined);
    let mut wire: Vec<u8> = Vec::with_capacity(Framing::Combined.max_batch_bytes(format));
    let mut routed = 0u64;
    let mut done = 0u64;
    let start = Instant::now();
    'outer: loop {
        for &s in &order {
            let s = s as usize;
            // The reply's destination is the client.
            frame[ETH + 16..ETH + 20].copy_from_slice(&client_ip(s).octets());
            frame[ETH + 22..ETH + 24].copy_from_slice(&client_port(s).to_be_bytes());
            if encode_record(&frame[ETH..], format, &mut record).is_ok() {
                if let Ok(header) = ResponseHeader::parse(&record) {
                    if routes.get(&header.flow_key(), now).is_some() {
                        routed += 1;
                        if batch.push(&record).unwrap_or(true) {
                            batch.finish_into(&mut wire);
                            black_box(&wire);
                            wire.clear();
                        }
                    }
                }
            }
            done += 1;
            if done >= records {
                break 'outer;
            }
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(routed, done, "every reply routed");
    (done, elapsed)
}

/// (d) Lookups of established sessions in a random order, single and batched.
fn lookups(sessions: usize, count: usize) -> (f64, f64) {
    let mut table = SessionTable::new(table_config(sessions, sessions + 1024, 64, Pacing::NoWait));
    let mut out = Discard::default();
    establish(&mut table, sessions, Duration::from_secs(1), &mut out);
    let keys: Vec<FlowKey> = permutation(sessions)
        .iter()
        .map(|&s| key(s as usize))
        .collect();
    let passes = count.div_ceil(sessions);
    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..passes {
        for k in &keys {
            found += usize::from(table.get(black_box(k)).is_some());
        }
    }
    let single = start.elapsed();
    assert_eq!(found, passes * sessions);
    let mut results: Vec<Option<&Session>> = vec![None; 64];
    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..passes {
        for chunk in keys.chunks(64) {
            table.get_batch(black_box(chunk), &mut results);
            found += results[..chunk.len()]
                .iter()
                .filter(|r| r.is_some())
                .count();
        }
    }
    let batched = start.elapsed();
    assert_eq!(found, passes * sessions);
    let n = (passes * sessions) as f64;
    (
        n / single.as_secs_f64() / 1e6,
        n / batched.as_secs_f64() / 1e6,
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

struct Args {
    quick: bool,
    case: Option<Case>,
    payload: Option<usize>,
    sessions: Option<usize>,
    packets: u64,
    repeat: usize,
    no_thp: bool,
    scaling: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        case: None,
        payload: None,
        sessions: None,
        packets: 10_000_000,
        repeat: 1,
        no_thp: false,
        scaling: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{arg} needs a value ({what})"))
        };
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--no-thp" => args.no_thp = true,
            "--scaling" => args.scaling = true,
            "--case" => {
                let v = value("session, burst, ingress, ingress-burst, ack1, burst-ack1, wait");
                args.case = Some(Case::parse(&v).unwrap_or_else(|| panic!("unknown case {v}")));
            }
            "--payload" => args.payload = Some(value("bytes").parse().expect("--payload")),
            "--sessions" => args.sessions = Some(value("count").parse().expect("--sessions")),
            "--packets" => args.packets = value("count").parse().expect("--packets"),
            "--repeat" => args.repeat = value("runs").parse::<usize>().expect("--repeat").max(1),
            "-h" | "--help" => {
                println!(
                    "engine-bench [--quick] [--case session|burst|ingress|ingress-burst|ack1|burst-ack1|wait] \
                     [--payload 64|512] [--sessions N] [--packets N] [--repeat N (best of)] \
                     [--no-thp] [--scaling (only the 1->2 worker table)]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other} (try --help)"),
        }
    }
    args
}

/// glibc backs large allocations with transparent huge pages (2 MiB) only when asked; the
/// table's arrays and the pool are large and randomly accessed, so TLB misses cost much. The
/// benchmark runs itself again with glibc's tunable set, unless told not to.
const THP_TUNABLE: &str = "glibc.malloc.hugetlb=1";

fn rerun_with_thp(args: &Args) {
    if args.no_thp || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", THP_TUNABLE)
        .status()
        .expect("run again with the THP tunable");
    std::process::exit(status.code().unwrap_or(1));
}

/// (c) Table memory per session: structure sizes, and resident memory gained.
fn memory(sizes: &[usize]) {
    println!(
        "\n(c) table memory per session (index + entry + link; the segment pool is per packet)"
    );
    for &sessions in sizes {
        let before = rss_bytes();
        let mut table = SessionTable::new(table_config(sessions, 4096, 64, Pacing::NoWait));
        let mut out = Discard::default();
        establish(&mut table, sessions, Duration::from_secs(1), &mut out);
        let grown = rss_bytes().saturating_sub(before);
        let m = table.memory();
        let per = m.index_bytes as f64 / sessions as f64 + (m.entry_bytes + m.link_bytes) as f64;
        println!(
            "{:>9} sessions: entry {} B + link {} B + index {:.1} B ({} slots x 4 B, load {:.2}) \
             = {:.1} B/session; resident growth {:.1} B/session",
            sessions,
            m.entry_bytes,
            m.link_bytes,
            m.index_bytes as f64 / sessions as f64,
            m.index_slots,
            sessions as f64 / m.index_slots as f64,
            per,
            grown as f64 / sessions as f64
        );
    }
}

fn main() {
    let args = parse_args();
    rerun_with_thp(&args);
    println!(
        "engine-bench: one core, in-memory data, {}; GLIBC_TUNABLES={}",
        cpu_model(),
        std::env::var("GLIBC_TUNABLES").unwrap_or_default()
    );
    let sizes: Vec<usize> = match args.sessions {
        Some(n) => vec![n],
        None if args.quick => vec![1_000, 100_000],
        None => vec![1_000, 100_000, 1_000_000],
    };
    let single = args.case.is_some() || args.sessions.is_some() || args.payload.is_some();
    if !single {
        // First, while the allocator has handed out nothing big yet (resident growth).
        memory(&sizes);
    }
    if args.scaling {
        scaling_report(args.packets);
        return;
    }
    let payloads: Vec<usize> = args.payload.map_or(vec![64, 512], |p| vec![p]);
    let mut cases = vec![
        Case::Session,
        Case::Burst,
        Case::AckEach,
        Case::BurstAckEach,
        Case::Wait,
    ];
    if cfg!(feature = "ingress") {
        cases.insert(2, Case::Ingress);
        cases.insert(3, Case::IngressBurst);
    }
    if let Some(case) = args.case {
        cases = vec![case];
    }

    println!(
        "\n(a) established-session path ({} packets a run, best of {}; the ACK replies' time included)",
        args.packets, args.repeat
    );
    println!(
        "{:<16} {:>7} {:>9} {:>6} {:>10} {:>9} {:>10}",
        "line", "payload", "sessions", "ack/K", "Mpps/core", "ns/pkt", "replies"
    );
    for &payload in &payloads {
        for &sessions in &sizes {
            for &case in &cases {
                let o = (0..args.repeat)
                    .map(|_| established(case, payload, sessions, args.packets))
                    .min_by_key(|o| o.elapsed.as_nanos() * 1_000_000 / u128::from(o.packets))
                    .expect("one run");
                let secs = o.elapsed.as_secs_f64();
                println!(
                    "{:<16} {:>7} {:>9} {:>6} {:>10.2} {:>9.1} {:>10}",
                    case.name(),
                    payload,
                    sessions,
                    o.ack_every,
                    o.packets as f64 / secs / 1e6,
                    secs * 1e9 / o.packets as f64,
                    o.replies
                );
            }
        }
    }
    if single {
        return;
    }

    println!(
        "\n(b) intercept extract-and-route (encode_record + parse + RouteTable::get + BatchEncoder), 100k routes"
    );
    for (format, payload) in [(RecordFormat::Header64, 0), (RecordFormat::Payload192, 100)] {
        let (n, elapsed) = intercept(100_000, 10_000_000, format, payload);
        let secs = elapsed.as_secs_f64();
        println!(
            "{:<12} reply payload {:>3}: {:>6.2} M records/s, {:>6.1} ns/record",
            format!("{format:?}"),
            payload,
            n as f64 / secs / 1e6,
            secs * 1e9 / n as f64
        );
    }

    scaling_report(args.packets);

    println!("\n(d) session lookups (random order)");
    for &sessions in sizes.iter().filter(|&&n| n >= 100_000) {
        let (one, batched) = lookups(sessions, 20_000_000);
        println!(
            "{:>9} sessions: get {:>6.1} M/s, get_batch(64, prefetch) {:>6.1} M/s ({:.2}x)",
            sessions,
            one,
            batched,
            batched / one
        );
    }
}
