//! Operating tcpcopy in the lab: `--dump-sent`, the `-m` memory cap, SIGHUP reopening the
//! `-l` log files (logrotate), the "no SYN-ACK comes back" warning, and a clean stop on
//! SIGTERM with the final statistics.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly. Each test
//! builds its own lab and removes it.

mod common;

use common::{counter, start_intercept, start_tcpcopy, Replay, TCPCOPY};
use lab::{Host, Lab};
use pcap_file::pcap::PcapReader;
use pcap_file::DataLink;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn load(lab: &Lab, args: &[&str]) {
    let report = lab.httpload(Host::Client, args).expect("httpload runs");
    assert!(
        report.all_ok(),
        "load against the online server failed: {report:?}"
    );
}

/// Polls `path` until it contains `needle` (bounded); returns its text.
fn wait_file(path: &Path, needle: &str, max: Duration) -> String {
    let deadline = Instant::now() + max;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One packet of the dump: (TCP flags, source port, payload).
fn tcp_of(packet: &[u8]) -> Option<(u8, u16, &[u8])> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    let tcp = packet.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    Some((
        tcp[13],
        u16::from_be_bytes([tcp[0], tcp[1]]),
        tcp.get(offset..)?,
    ))
}

/// `--dump-sent`: the file is a raw-IPv4 pcap holding every packet tcpcopy sent: one SYN per
/// session created, every request, as many records as the final line says were dumped.
#[test]
fn dump_sent_holds_every_syn_and_request() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let dump = lab.dir().join("sent.pcap");
    let dump_arg = dump.to_str().unwrap().to_string();
    let replay = Replay::start(&lab, &["--dump-sent", &dump_arg, "--workers", "2"]);
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "100",
            "--concurrency",
            "4",
            "--path-prefix",
            "/ops/",
        ],
    );
    let seen = target.wait_count(100, Duration::from_secs(20));
    assert_eq!(seen, 100, "the target saw {seen} of 100\n{}", replay.logs());
    // Let the closing handshakes finish, so the SYN count is final.
    std::thread::sleep(Duration::from_secs(2));
    let log = replay.tcpcopy.log();
    let line = replay.stop();
    assert!(!log.contains("no SYN-ACK"), "a false warning:\n{log}");
    let mut reader = PcapReader::new(std::fs::File::open(&dump).expect("dump exists"))
        .expect("the dump is a pcap file");
    assert_eq!(reader.header().datalink, DataLink::RAW);
    let (mut records, mut syns) = (0u64, 0u64);
    let mut syn_ports = HashSet::new();
    let mut paths = HashSet::new();
    let mut requests = 0;
    while let Some(packet) = reader.next_packet() {
        let packet = packet.expect("every record parses");
        records += 1;
        let (flags, port, payload) = tcp_of(&packet.data).expect("an IPv4 TCP packet");
        if flags & 0x12 == 0x02 {
            syns += 1;
            syn_ports.insert(port);
        }
        if let Some(rest) = payload.strip_prefix(b"GET /ops/") {
            requests += 1;
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            paths.insert(rest[..end].to_vec());
        }
    }
    let created = counter(&line, "created");
    assert_eq!(created, 100, "{line}");
    assert_eq!(
        syn_ports.len() as u64,
        created,
        "one SYN flow per session created: {line}"
    );
    assert!(
        syns >= counter(&line, "syn"),
        "{syns} SYNs in the dump: {line}"
    );
    assert_eq!(paths.len(), 100, "every request is in the dump");
    assert!(requests >= 100);
    assert_eq!(records, counter(&line, "dumped"), "{line}");
    assert_eq!(counter(&line, "dump-dropped"), 0, "{line}");
    assert!(records >= counter(&line, "sent"), "{line}");
}

/// `-m`: above 90% of the cap the workers shed idle sessions (counted); still above the cap
/// five seconds later, tcpcopy stops cleanly, says why, prints its summary and exits non-zero.
#[test]
fn memory_cap_sheds_idle_sessions_then_stops() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let _target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut replay = Replay::start(&lab, &["-m", "1"]);
    // Twenty keep-alive connections, each with one answered request, then idle: twenty idle
    // sessions at tcpcopy (RSS is far above 1 MiB from the start).
    let _idle: Vec<TcpStream> = lab
        .in_ns(Host::Client, || {
            (0..20)
                .map(|i| {
                    let mut s = TcpStream::connect("10.77.0.20:80").expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    write!(s, "GET /idle{i} HTTP/1.1\r\nHost: online\r\n\r\n").unwrap();
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).expect("a response");
                    assert!(buf[..n].starts_with(b"HTTP/1.1 "));
                    s
                })
                .collect()
        })
        .expect("enter the client namespace");
    let status = replay
        .tcpcopy
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("tcpcopy did not stop at the cap: {e:#}\n{}", replay.logs()));
    let log = replay.tcpcopy.log();
    assert!(!status.success(), "exit status {status}:\n{log}");
    assert!(
        log.contains("memory cap -m 1 MiB reached: RSS"),
        "no clear message:\n{log}"
    );
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("final:"))
        .unwrap_or_else(|| panic!("no final statistics:\n{log}"));
    assert!(counter(line, "shed") >= 1, "nothing shed: {line}");
    assert!(log.contains("shedding idle sessions"), "{log}");
}

/// SIGHUP reopens `-l` (tcpcopy and intercept): after a rename and SIGHUP each writes a new
/// file, keeps running, and writes its final line there.
#[test]
fn sighup_reopens_the_log_files() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let tcpcopy_log = lab.dir().join("tcpcopy.log");
    let intercept_log = lab.dir().join("intercept.log");
    let (t_arg, i_arg) = (
        tcpcopy_log.to_str().unwrap().to_string(),
        intercept_log.to_str().unwrap().to_string(),
    );
    let mut intercept = lab
        .spawn(
            Host::Assistant,
            common::INTERCEPT,
            &[
                "-i",
                "eth0",
                "-F",
                "tcp and src host 10.77.0.30",
                "--stats-interval",
                "1",
                "-l",
                &i_arg,
            ],
        )
        .expect("start intercept");
    lab.wait_port(
        Host::Online,
        "10.77.0.40:36524".parse().unwrap(),
        Duration::from_secs(10),
    )
    .expect("intercept listens");
    let mut tcpcopy = lab
        .spawn(
            Host::Online,
            TCPCOPY,
            &[
                "-i",
                "eth0",
                "-x",
                "80-10.77.0.30:8080",
                "-s",
                "10.77.0.40",
                "--stats-interval",
                "1",
                "-l",
                &t_arg,
            ],
        )
        .expect("start tcpcopy");
    let text = wait_file(&tcpcopy_log, "captured", Duration::from_secs(15));
    assert!(text.contains("captured"), "no statistics line:\n{text}");
    for (proc, path) in [
        (&mut tcpcopy, &tcpcopy_log),
        (&mut intercept, &intercept_log),
    ] {
        let rotated = path.with_extension("log.1");
        std::fs::rename(path, &rotated).expect("rename the log");
        proc.signal(libc::SIGHUP).expect("SIGHUP");
    }
    for path in [&tcpcopy_log, &intercept_log] {
        // Both write a statistics line a second: the next one goes to a new file.
        let text = wait_file(path, "\n", Duration::from_secs(10));
        assert!(
            !text.is_empty(),
            "{} was not reopened after SIGHUP",
            path.display()
        );
    }
    assert!(tcpcopy.is_running(), "SIGHUP stopped tcpcopy");
    assert!(intercept.is_running(), "SIGHUP stopped intercept");
    assert!(tcpcopy.stop().is_some_and(|s| s.success()));
    assert!(intercept.stop().is_some_and(|s| s.success()));
    for path in [&tcpcopy_log, &intercept_log] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("final:"), "{}:\n{text}", path.display());
        let old = std::fs::read_to_string(path.with_extension("log.1")).unwrap();
        assert!(old.contains("starting") && !old.contains("final:"), "{old}");
    }
}

/// With the target's route to the client via the assistant gone, SYNs go out and no SYN-ACK
/// comes back: tcpcopy warns at run time with the likely causes and the doctor command.
#[test]
fn warns_when_no_syn_ack_comes_back() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let _target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let out = lab
        .run(Host::Target, "ip", &["route", "del", "10.77.0.10/32"])
        .expect("ip route del");
    assert!(out.status.success(), "{out:?}");
    let _intercept = start_intercept(&lab, &[]);
    let mut tcpcopy = start_tcpcopy(&lab, &[]);
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "20",
            "--concurrency",
            "2",
        ],
    );
    let warned = tcpcopy.wait_for_log("no SYN-ACK", Duration::from_secs(20));
    let log = tcpcopy.log();
    assert!(warned.is_ok(), "no warning:\n{log}");
    let warning = log.lines().find(|l| l.contains("no SYN-ACK")).unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    for cause in ["route", "rp_filter", "ip_forward", "tcpcopy-doctor target"] {
        assert!(warning.contains(cause), "'{cause}' not named: {warning}");
    }
    // SIGTERM: a clean stop with the summary.
    let status = tcpcopy.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = tcpcopy.log();
    let line = log.lines().rev().find(|l| l.contains("final:")).unwrap();
    assert_eq!(counter(line, "established"), 0, "{line}");
    assert!(counter(line, "syn") >= 20, "{line}");
}
