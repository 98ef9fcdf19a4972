//! control-bench: response records per second through the control channel, end to end on one
//! machine: encode (intercept's `encode_record` + `BatchEncoder`, combined framing) -> loopback
//! TCP -> decode (tcpcopy's `RecordDecoder` + `ResponseHeader::parse`) -> dispatch by flow to N
//! worker rings (crossbeam `ArrayQueue`), drained by N worker threads.
//!
//! ```text
//! cargo run --release -p bench --bin control-bench                       # 64-byte records, 2 workers
//! cargo run --release -p bench --bin control-bench -- --records 50000000 --workers 1
//! cargo run --release -p bench --bin control-bench -- --format 192 --framing plain
//! cargo run --release -p bench --bin control-bench -- --transport udp    # datagrams; the
//!                         # receiver's socket buffer overflows at full speed: loss is printed
//! ```
//!
//! The sender (intercept side) and the receiver (tcpcopy side) are each pinned to a core of
//! their own (cores 0 and 1) when the machine has them; the workers are not pinned. Each side
//! does the per-record work of the real pipelines: the sender builds every record from a
//! captured IPv4/TCP packet (1024 distinct flows, a SYN-ACK with options), batches 16 records
//! per count-prefixed batch and writes 256 KiB at a time; the receiver reads 256 KiB at a time,
//! splits batches into records, parses each into a `ResponseHeader` and pushes it to the ring
//! of the worker that owns its flow (`FlowKey::shard`), spinning while that ring is full (the
//! wait is counted). Workers pop and touch each header. Printed: records/s, ns/record on each
//! side (wall time of the run / records), and where the receiver waited.

use crossbeam::queue::ArrayQueue;
use engine::control::udp::{Datagram, DatagramBuilder, DatagramKind};
use engine::control::{
    encode_record, BatchEncoder, Framing, RecordDecoder, RecordFormat, ResponseHeader,
};
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 * 1024;
const FLOWS: usize = 1024;
const RING: usize = 16 * 1024;

#[derive(Debug, Clone, Copy)]
struct Args {
    records: u64,
    workers: usize,
    format: RecordFormat,
    framing: Framing,
    udp: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: control-bench [--records N] [--workers N] [--format 64|192] \
         [--framing combined|plain] [--transport tcp|udp]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        records: 20_000_000,
        workers: 2,
        format: RecordFormat::Header64,
        framing: Framing::Combined,
        udp: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--records" => a.records = value().parse().unwrap_or_else(|_| usage()),
            "--workers" => a.workers = value().parse().unwrap_or_else(|_| usage()),
            "--format" => {
                a.format = match value().as_str() {
                    "64" => RecordFormat::Header64,
                    "192" => RecordFormat::Payload192,
                    _ => usage(),
                }
            }
            "--framing" => {
                a.framing = match value().as_str() {
                    "combined" => Framing::Combined,
                    "plain" => Framing::Plain,
                    _ => usage(),
                }
            }
            "--transport" => {
                a.udp = match value().as_str() {
                    "tcp" => false,
                    "udp" => true,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    if a.workers == 0 || a.records == 0 {
        usage();
    }
    a
}

/// A SYN-ACK of flow `i` (target 10.77.0.30:8080 -> client 10.9.x.y:port) with MSS, SACK-OK,
/// timestamps and window scale: 60 bytes, as intercept captures it.
fn packet(i: usize) -> Vec<u8> {
    let client = Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8);
    let port = 20_000 + i as u16;
    let mut p = vec![
        0x45, 0x00, 0x00, 0x3c, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 77, 0, 30,
    ];
    p.extend_from_slice(&client.octets());
    p.extend_from_slice(&8080u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&(i as u32 * 7919).to_be_bytes());
    p.extend_from_slice(&[
        0x00, 0x00, 0x03, 0xe9, 0xa0, 0x12, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00,
    ]);
    p.extend_from_slice(&[
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
        0x05, 0x01, 0x03, 0x03, 0x07,
    ]);
    p
}

/// CPU time (user + system) of the calling thread so far, from `/proc/thread-self/stat`
/// (clock ticks of 10 ms: use runs of a few seconds).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn pin(core: usize) -> bool {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    cores
        .get(core)
        .is_some_and(|&id| core_affinity::set_for_current(id))
}

/// Sender: encodes `n` records and writes them in 256 KiB chunks.
fn send_tcp(
    mut stream: TcpStream,
    n: u64,
    format: RecordFormat,
    framing: Framing,
) -> (Duration, Duration) {
    let packets: Vec<Vec<u8>> = (0..FLOWS).map(packet).collect();
    let mut enc = BatchEncoder::new(format, framing);
    let mut record = vec![0u8; format.record_len()];
    let mut out = Vec::with_capacity(CHUNK + 4096);
    let cpu0 = thread_cpu();
    let start = Instant::now();
    for i in 0..n {
        encode_record(&packets[i as usize % FLOWS], format, &mut record).expect("record");
        if enc.push(&record).expect("push") {
            enc.finish_into(&mut out);
            if out.len() >= CHUNK {
                stream.write_all(&out).expect("write");
                out.clear();
            }
        }
    }
    enc.finish_into(&mut out);
    stream.write_all(&out).expect("write");
    let elapsed = start.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    (elapsed, cpu)
}

/// Receiver-side counters.
#[derive(Debug, Default)]
struct Recv {
    records: u64,
    bytes: u64,
    ring_full_spins: u64,
    elapsed: Duration,
    cpu: Duration,
}

fn dispatch(rings: &[Arc<ArrayQueue<ResponseHeader>>], h: ResponseHeader, spins: &mut u64) {
    let ring = &rings[h.flow_key().shard(rings.len())];
    let mut h = h;
    loop {
        match ring.push(h) {
            Ok(()) => return,
            Err(back) => {
                h = back;
                *spins += 1;
                // The worker may share this core (the machine may have fewer cores than
                // threads): let it run.
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

fn receive_tcp(
    mut stream: TcpStream,
    rings: &[Arc<ArrayQueue<ResponseHeader>>],
    format: RecordFormat,
    framing: Framing,
) -> Recv {
    let mut dec = RecordDecoder::new(format, framing);
    let mut buf = vec![0u8; CHUNK];
    let mut r = Recv::default();
    let mut start = None;
    let cpu0 = thread_cpu();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        };
        start.get_or_insert_with(Instant::now);
        r.bytes += n as u64;
        let spins = &mut r.ring_full_spins;
        let records = &mut r.records;
        dec.feed(&buf[..n], |rec| {
            let h = ResponseHeader::parse(rec).expect("record");
            *records += 1;
            dispatch(rings, h, spins);
        })
        .expect("stream");
    }
    r.elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    r.cpu = thread_cpu().saturating_sub(cpu0);
    r
}

/// UDP variant: 22 (or 7) records per datagram, sequence numbers, no authentication.
fn send_udp(
    socket: UdpSocket,
    to: SocketAddrV4,
    n: u64,
    format: RecordFormat,
) -> (Duration, Duration) {
    let packets: Vec<Vec<u8>> = (0..FLOWS).map(packet).collect();
    let mut b = DatagramBuilder::new(DatagramKind::Records, format);
    let mut record = vec![0u8; format.record_len()];
    let mut seq = 0u64;
    let cpu0 = thread_cpu();
    let start = Instant::now();
    for i in 0..n {
        encode_record(&packets[i as usize % FLOWS], format, &mut record).expect("record");
        if b.push(&record).expect("push") {
            seq += 1;
            let _ = socket.send_to(b.finish(1, 1, seq, 0, None), to);
            b.clear();
        }
    }
    if !b.is_empty() {
        seq += 1;
        let _ = socket.send_to(b.finish(1, 1, seq, 0, None), to);
    }
    let elapsed = start.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    // An empty datagram says "done".
    for _ in 0..100 {
        let _ = socket.send_to(&[], to);
        std::thread::sleep(Duration::from_millis(1));
    }
    (elapsed, cpu)
}

fn receive_udp(
    socket: UdpSocket,
    rings: &[Arc<ArrayQueue<ResponseHeader>>],
    format: RecordFormat,
) -> Recv {
    let mut buf = vec![0u8; 65536];
    let mut r = Recv::default();
    let mut start = None;
    let cpu0 = thread_cpu();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    while let Ok(n) = socket.recv(&mut buf) {
        if n == 0 {
            break;
        }
        start.get_or_insert_with(Instant::now);
        r.bytes += n as u64;
        let Ok(d) = Datagram::parse(&buf[..n], false, format) else {
            continue;
        };
        for rec in d.items() {
            let h = ResponseHeader::parse(rec).expect("record");
            r.records += 1;
            dispatch(rings, h, &mut r.ring_full_spins);
        }
    }
    r.elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    r.cpu = thread_cpu().saturating_sub(cpu0);
    r
}

fn main() {
    let args = parse_args();
    let cores = core_affinity::get_core_ids().map_or(0, |c| c.len());
    println!(
        "control-bench: {} records of {} bytes, {:?} framing, {}, {} worker ring(s); {} cores",
        args.records,
        args.format.record_len(),
        args.framing,
        if args.udp {
            "loopback UDP"
        } else {
            "loopback TCP"
        },
        args.workers,
        cores
    );
    let rings: Vec<Arc<ArrayQueue<ResponseHeader>>> = (0..args.workers)
        .map(|_| Arc::new(ArrayQueue::new(RING)))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = rings
        .iter()
        .map(|ring| {
            let (ring, done, consumed) = (ring.clone(), done.clone(), consumed.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut acc = 0u64;
                loop {
                    match ring.pop() {
                        Some(h) => {
                            n += 1;
                            acc = acc.wrapping_add(u64::from(h.seq) ^ u64::from(h.dst_port));
                        }
                        None => {
                            if done.load(Ordering::Acquire) && ring.is_empty() {
                                break;
                            }
                            std::thread::yield_now();
                        }
                    }
                }
                black_box(acc);
                consumed.fetch_add(n, Ordering::SeqCst);
            })
        })
        .collect();

    let wall = Instant::now();
    let ((sent_in, sent_cpu), recv) = if args.udp {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = match rx.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!(),
        };
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (n, format) = (args.records, args.format);
        let sender = std::thread::spawn(move || {
            pin(0);
            send_udp(tx, to, n, format)
        });
        let recv = {
            pin(1);
            receive_udp(rx, &rings, args.format)
        };
        (sender.join().expect("sender"), recv)
    } else {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (n, format, framing) = (args.records, args.format, args.framing);
        let sender = std::thread::spawn(move || {
            pin(0);
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            send_tcp(stream, n, format, framing)
        });
        let (stream, _) = listener.accept().expect("accept");
        pin(1);
        let recv = receive_tcp(stream, &rings, args.format, args.framing);
        (sender.join().expect("sender"), recv)
    };
    done.store(true, Ordering::Release);
    for w in workers {
        w.join().expect("worker");
    }
    let total = wall.elapsed();
    let consumed = consumed.load(Ordering::SeqCst);
    assert_eq!(
        consumed, recv.records,
        "every dispatched record was consumed"
    );
    let per_s = recv.records as f64 / recv.elapsed.as_secs_f64();
    println!(
        "records received {} of {} ({:.2}% lost), {:.1} MB",
        recv.records,
        args.records,
        100.0 * (1.0 - recv.records as f64 / args.records as f64),
        recv.bytes as f64 / 1e6
    );
    let ns = |d: Duration, n: u64| d.as_nanos() as f64 / n.max(1) as f64;
    println!(
        "sender:   {:>6.2} M records/s wall, {:>6.1} ns/record CPU ({:.2} s on its core)  \
         encode + batch + write",
        args.records as f64 / sent_in.as_secs_f64() / 1e6,
        ns(sent_cpu, args.records),
        sent_cpu.as_secs_f64()
    );
    println!(
        "receiver: {:>6.2} M records/s wall, {:>6.1} ns/record CPU ({:.2} s on its core)  \
         read + decode + parse + dispatch",
        per_s / 1e6,
        ns(recv.cpu, recv.records),
        recv.cpu.as_secs_f64()
    );
    println!(
        "end to end: {:.2} M records/s over {:.2} s; receiver spun {} times on full rings",
        recv.records as f64 / total.as_secs_f64() / 1e6,
        total.as_secs_f64(),
        recv.ring_full_spins
    );
}
