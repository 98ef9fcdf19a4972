//! UDP replay in the lab (issue 5): `tcpcopy --udp` on the online host replays the datagrams
//! the client sends to udp/5353 onto the target's udp/5353. A `udpserver` answers on both
//! hosts (so the client's traffic is normal, and the target's replies travel towards the
//! assistant as in a real deployment); the target's log proves each datagram arrived once.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.
//! Each test builds its own lab and removes it, also when it fails.

use lab::{Host, Lab, Proc};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::{counter, final_line, TCPCOPY};
const PORT: u16 = 5353;

/// `udpserver` in a lab host.
struct UdpServer {
    /// Stops the server when dropped.
    _proc: Proc,
    log: PathBuf,
}

impl UdpServer {
    fn start(lab: &Lab, host: Host) -> UdpServer {
        lab::build_lab_bins().expect("build lab's binaries");
        let log = lab
            .dir()
            .join(format!("udpserver-{}-{PORT}.log", host.name()));
        let listen = format!("{}:{PORT}", host.addr());
        let log_arg = log.to_string_lossy().into_owned();
        let mut proc = lab
            .spawn(
                host,
                lab::workspace_bin("udpserver"),
                &["--listen", &listen, "--log", &log_arg],
            )
            .expect("start udpserver");
        proc.wait_for_log("udpserver listening on", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("udpserver did not start: {e:#}"));
        UdpServer { _proc: proc, log }
    }

    /// `(peer, len, sha256)` of every datagram logged so far.
    fn entries(&self) -> Vec<(String, usize, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.parse().ok()?,
                    w.next()?.to_string(),
                ))
            })
            .collect()
    }

    fn count(&self) -> usize {
        self.entries().len()
    }
}

fn start_tcpcopy(lab: &Lab, extra: &[&str]) -> Proc {
    let transfer = format!("{PORT}-10.77.0.30:{PORT}");
    let mut args = vec![
        "--udp",
        "-i",
        "eth0",
        "-x",
        &transfer,
        "--stats-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut tcpcopy = lab
        .spawn(Host::Online, TCPCOPY, &args)
        .expect("start tcpcopy");
    tcpcopy
        .wait_for_log("udp replay started", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("tcpcopy --udp did not start: {e:#}"));
    tcpcopy
}

/// The payload of datagram `id`: its id, then a pattern that depends on it, `size` bytes.
fn payload(id: usize, size: usize) -> Vec<u8> {
    let mut p = format!("id {id:06} ").into_bytes();
    let mut x = id as u32 ^ 0x9E37_79B9;
    while p.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p.push(x as u8);
    }
    p.truncate(size);
    p
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sends `count` datagrams of `size` bytes from the client to the online server, `burst` at a
/// time with a 2 ms pause between bursts, and reads the server's replies as they come.
/// Returns how many replies arrived.
fn send(lab: &Lab, count: usize, size: usize, burst: usize) -> usize {
    lab.in_ns(Host::Client, || {
        let socket = UdpSocket::bind("10.77.0.10:0").expect("bind the client socket");
        socket
            .connect(format!("10.77.0.20:{PORT}"))
            .expect("connect the client socket");
        socket.set_nonblocking(true).expect("non-blocking");
        let mut replies = 0;
        let drain = |socket: &UdpSocket| {
            let mut buf = [0u8; 256];
            let mut n = 0;
            while socket.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        };
        for id in 0..count {
            let p = payload(id, size);
            let deadline = Instant::now() + Duration::from_secs(5);
            // A full send buffer (EAGAIN) is retried, bounded.
            while let Err(e) = socket.send(&p) {
                assert!(
                    e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline,
                    "send {id}: {e}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            if id % burst == burst - 1 {
                std::thread::sleep(Duration::from_millis(2));
                replies += drain(&socket);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while replies < count && Instant::now() < deadline {
            replies += drain(&socket);
            std::thread::sleep(Duration::from_millis(5));
        }
        replies
    })
    .expect("enter the client namespace")
}

/// Waits (bounded) until `server` logged `want` datagrams and then nothing more for 1 s.
fn settle(server: &UdpServer, want: usize) -> usize {
    lab::wait_count(|| server.count(), want, Duration::from_secs(30));
    lab::settle(
        || server.count(),
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
}

/// Asserts the target logged each of the `count` payloads exactly once, whole, from the client.
fn assert_each_once(target: &UdpServer, count: usize, size: usize, context: &str) {
    let ids: HashMap<String, usize> = (0..count)
        .map(|id| (sha256_hex(&payload(id, size)), id))
        .collect();
    let mut seen = vec![0u32; count];
    let mut strangers = Vec::new();
    for (peer, len, sha) in target.entries() {
        match ids.get(&sha) {
            Some(&id) if len == size && peer.starts_with("10.77.0.10:") => seen[id] += 1,
            _ => strangers.push(format!("{peer} {len} {sha}")),
        }
    }
    let missing: Vec<usize> = (0..count).filter(|&i| seen[i] == 0).collect();
    let twice: Vec<usize> = (0..count).filter(|&i| seen[i] > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && strangers.is_empty(),
        "{} missing (first {:?}), {} more than once (first {:?}), {} unknown (first {:?})\n{context}",
        missing.len(),
        &missing[..missing.len().min(10)],
        twice.len(),
        &twice[..twice.len().min(10)],
        strangers.len(),
        &strangers[..strangers.len().min(5)],
    );
}

/// 2,000 small datagrams with unique ids: each reaches the target exactly once.
#[test]
fn replays_2000_datagrams_each_once() {
    if !lab::require_root() {
        return;
    }
    const COUNT: usize = 2000;
    const SIZE: usize = 100;
    let lab = Lab::up().expect("lab up");
    let online = UdpServer::start(&lab, Host::Online);
    let target = UdpServer::start(&lab, Host::Target);
    let mut tcpcopy = start_tcpcopy(&lab, &[]);
    let replies = send(&lab, COUNT, SIZE, 20);
    let at_online = settle(&online, COUNT);
    let at_target = settle(&target, COUNT);
    let stats = final_line(&mut tcpcopy);
    let context = format!(
        "online got {at_online}, target got {at_target}, client got {replies} replies\n{stats}\n\
         --- tcpcopy ---\n{}",
        tcpcopy.log()
    );
    assert_eq!(
        at_online, COUNT,
        "the lab lost datagrams before tcpcopy\n{context}"
    );
    assert_each_once(&target, COUNT, SIZE, &context);
    assert_eq!(counter(&stats, "accepted"), COUNT as u64, "{context}");
    assert_eq!(counter(&stats, "datagrams"), COUNT as u64, "{context}");
    assert_eq!(counter(&stats, "sent"), COUNT as u64, "{context}");
    assert_eq!(counter(&stats, "fragmented"), 0, "{context}");
    assert_eq!(counter(&stats, "malformed"), 0, "{context}");
    assert_eq!(counter(&stats, "tx-errors"), 0, "{context}");
}

/// 3,000-byte datagrams: the client's kernel fragments them on the 1500-byte veth; tcpcopy
/// reassembles each and, with `-M 576`, sends it to the target in six fragments of at most
/// 576 bytes, which the target's kernel reassembles: every datagram arrives whole, once.
#[test]
fn replays_fragmented_datagrams_whole_at_a_smaller_mtu() {
    if !lab::require_root() {
        return;
    }
    const COUNT: usize = 500;
    const SIZE: usize = 3000;
    // 3,008 UDP bytes in fragments of 552 payload bytes (576 - 20, rounded down to 8).
    const FRAGMENTS: u64 = 6;
    let lab = Lab::up().expect("lab up");
    let online = UdpServer::start(&lab, Host::Online);
    let target = UdpServer::start(&lab, Host::Target);
    let reasm_before = lab
        .net_counter(Host::Target, "Ip", "ReasmOKs")
        .expect("target ReasmOKs");
    let mut tcpcopy = start_tcpcopy(&lab, &["-M", "576"]);
    let replies = send(&lab, COUNT, SIZE, 10);
    let at_online = settle(&online, COUNT);
    let at_target = settle(&target, COUNT);
    let stats = final_line(&mut tcpcopy);
    let target_counter = |section, name| {
        lab.net_counter(Host::Target, section, name)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    let reasm = target_counter("Ip", "ReasmOKs") - reasm_before;
    let context = format!(
        "online got {at_online}, target got {at_target} (kernel reassembled {reasm}, reassembly \
         failures {}, udp receive-buffer drops {}), client got {replies} replies\n{stats}\n\
         --- tcpcopy ---\n{}",
        target_counter("Ip", "ReasmFails"),
        target_counter("Udp", "RcvbufErrors"),
        tcpcopy.log()
    );
    assert_eq!(
        at_online, COUNT,
        "the lab lost datagrams before tcpcopy\n{context}"
    );
    assert_each_once(&target, COUNT, SIZE, &context);
    assert_eq!(counter(&stats, "reassembled"), COUNT as u64, "{context}");
    assert_eq!(counter(&stats, "fragmented"), COUNT as u64, "{context}");
    assert_eq!(
        counter(&stats, "fragments-out"),
        FRAGMENTS * COUNT as u64,
        "{context}"
    );
    assert_eq!(counter(&stats, "overlaps"), 0, "{context}");
    assert_eq!(counter(&stats, "bad"), 0, "{context}");
    assert_eq!(counter(&stats, "tx-errors"), 0, "{context}");
    assert!(
        reasm >= COUNT as u64,
        "the target reassembled only {reasm} datagrams: tcpcopy's fragments did not arrive as \
         fragments\n{context}"
    );
}

/// The flags of UDP mode are checked before anything starts (no root needed).
#[test]
fn udp_flags_are_checked() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(TCPCOPY)
            .args(args)
            .output()
            .expect("run tcpcopy");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["-i", "lo", "-x", "53-10.0.0.1:53"]);
    assert!(
        err.contains("-s SERVERS") && err.contains("ip[:port]"),
        "{err}"
    );
    // Without -i, --udp captures on every interface, as TCP replay does (checked, not run).
    let out = std::process::Command::new(TCPCOPY)
        .args(["--udp", "-x", "53-10.0.0.1:53", "--check"])
        .output()
        .expect("run tcpcopy");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("capture afpacket any"), "{text}");
    let err = run(&[
        "--udp",
        "--pcap",
        "/nonexistent.pcap",
        "-x",
        "53-10.0.0.1:53",
    ]);
    assert!(err.contains("--udp replays live captures only"), "{err}");
    let err = run(&["--udp", "-i", "lo", "-x", "53-10.0.0.1:53", "-M", "500"]);
    assert!(
        err.contains("bad -M value 500") && err.contains("576..=65535"),
        "{err}"
    );
    let err = run(&["--udp", "-i", "lo", "-x", "53-10.0.0.1:53", "-M", "70000"]);
    assert!(err.contains("-M"), "{err}");
    let err = run(&["--udp", "-i", "lo", "-x", "53-10.0.0.1:53", "-r", "50"]);
    assert!(err.contains("-r is for TCP sessions"), "{err}");
}
