//! End-to-end replication in the lab: four network namespaces (client, online, target,
//! assistant), real nginx servers, the real `tcpcopy` and `intercept` binaries.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.
//! Each test builds its own lab and removes it, also when it fails. Run them one at a time
//! (`--test-threads=1`): they measure replication under load on a 2-core machine.

use lab::{Host, Lab};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

mod common;
use common::*;

fn load(lab: &Lab, args: &[&str]) -> lab::LoadReport {
    let report = lab.httpload(Host::Client, args).expect("httpload runs");
    assert!(
        report.all_ok(),
        "load against the online server failed: {report:?}"
    );
    report
}

/// Test 1 of the issue: 2,000 requests with distinct paths, half one connection per request,
/// half over 20 keep-alive connections; the target's access log holds every path exactly once.
#[test]
fn replicates_2000_requests_each_path_once() {
    if !lab::require_root() {
        return;
    }
    let stats = replicate_2000(&[]);
    assert!(counter(&stats, "created") >= 1020, "{stats}");
}

/// Issue 4: the same run on two workers; every reply is handled by the worker that owns its
/// session (each worker's replies are all matched, and both workers took part).
#[test]
fn replicates_2000_requests_on_two_workers() {
    if !lab::require_root() {
        return;
    }
    let log = replicate_2000(&["--workers", "2"]);
    let workers: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker ") && l.contains("replies-dispatched"))
        .collect();
    assert!(workers.len() >= 2, "no per-worker lines:\n{log}");
    let mut created_total = 0;
    for (i, line) in workers.iter().rev().take(2).enumerate() {
        let created = counter(line, "sessions-created");
        let dispatched = counter(line, "replies-dispatched");
        let handled = counter(line, "replies");
        let unmatched = counter(line, "replies-unmatched");
        assert!(
            created > 300,
            "worker {i} created only {created} sessions: {line}"
        );
        assert!(
            handled > 1000,
            "worker {i} handled only {handled} replies: {line}"
        );
        // Replies queued while the worker stopped may stay untaken.
        assert!(
            handled <= dispatched && dispatched - handled <= 20,
            "worker {i}: {line}"
        );
        assert_eq!(
            unmatched, 0,
            "worker {i} got replies of sessions it does not own: {line}"
        );
        created_total += created;
    }
    assert!(created_total >= 1020, "{log}");
}

/// Runs test 1 with extra tcpcopy flags; returns tcpcopy's whole log (final line last).
fn replicate_2000(extra: &[&str]) -> String {
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let replay = Replay::start(&lab, extra);
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "1000",
            "--concurrency",
            "10",
            "--path-prefix",
            "/c/",
        ],
    );
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--connections",
            "20",
            "--requests",
            "1000",
            "--path-prefix",
            "/k/",
        ],
    );
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(2000, Duration::from_secs(30)), 2000);
    let seen = target.settle(Duration::from_secs(2), Duration::from_secs(60));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for path in target.paths() {
        *counts.entry(path).or_default() += 1;
    }
    let online_paths: HashSet<String> = online.paths().into_iter().collect();
    let missing: Vec<&String> = online_paths
        .iter()
        .filter(|p| !counts.contains_key(*p))
        .collect();
    let doubled: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let logs = replay.logs();
    let mut replay = replay;
    replay.tcpcopy.stop();
    let full_log = replay.tcpcopy.log();
    let stats = replay.stop();
    assert!(
        missing.is_empty() && doubled.is_empty() && seen == 2000,
        "target saw {seen} requests; {} paths missing (e.g. {:?}), {} doubled (e.g. {:?})\n{stats}\n{logs}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
    );
    // Keep-alive sessions were replayed as keep-alive sessions: 20 connections at the target.
    let keepalive: HashSet<u64> = target
        .entries()
        .iter()
        .filter(|e| e.uri.starts_with("/k/"))
        .map(|e| e.connection)
        .collect();
    assert_eq!(keepalive.len(), 20, "keep-alive connections at the target");
    format!("{full_log}\n{stats}")
}

/// Test 2: a POST with a 1 MiB body arrives whole at the target.
#[test]
fn replicates_a_1mib_post_whole() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.labserver(Host::Target, 8080).expect("target labserver");
    let replay = Replay::start(&lab, &[]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "3",
            "--post-bytes",
            "1048576",
            "--path-prefix",
            "/upload/",
        ],
    );
    let seen = target.wait_count(3, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 3, "{stats}\n{logs}");
    for entry in target.entries() {
        assert_eq!(entry.body_len, 1_048_576, "{entry:?}\n{stats}");
        assert_eq!(entry.sha256, report.body_sha256, "{entry:?}");
    }
}

/// Test 3: with `-c 10.9.9.x` the target sees clients from 10.9.9.0/24, requests whole.
#[test]
fn client_addresses_are_rewritten_with_c() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.labserver(Host::Target, 8080).expect("target labserver");
    let replay = Replay::start(&lab, &["-c", "10.9.9.x"]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--connections",
            "4",
            "--requests",
            "200",
            "--post-bytes",
            "5000",
            "--path-prefix",
            "/cx/",
        ],
    );
    let seen = target.wait_count(200, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 200, "{stats}\n{logs}");
    for entry in target.entries() {
        let ip = entry.peer.ip().octets();
        assert_eq!(
            &ip[..3],
            &[10, 9, 9],
            "client {} is not from 10.9.9.0/24",
            entry.peer
        );
        assert_ne!(ip[3], 0);
        assert_eq!(
            (entry.body_len, entry.sha256.as_str()),
            (5000, report.body_sha256.as_str())
        );
    }
}

/// Test 4: intercept killed and restarted mid-run: tcpcopy logs it, reconnects, and sessions
/// that start after the restart are replicated.
#[test]
fn survives_an_intercept_restart() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut replay = Replay::start(&lab, &[]);
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "100",
            "--path-prefix",
            "/before/",
        ],
    );
    assert_eq!(
        target.wait_count(100, Duration::from_secs(30)),
        100,
        "{}",
        replay.logs()
    );
    replay
        .intercept
        .signal(libc_sigkill())
        .expect("kill intercept");
    replay
        .intercept
        .wait_exit(Duration::from_secs(10))
        .expect("intercept exits");
    replay
        .tcpcopy
        .wait_for_log("lost", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("tcpcopy did not log the loss: {e:#}\n{}", replay.logs()));
    // Sessions while intercept is down are not replicated (no replies come back): expected.
    replay.intercept = start_intercept(&lab, &["--stats-interval", "1"]);
    let log_before = replay
        .tcpcopy
        .log()
        .matches("connected to intercept")
        .count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while replay
        .tcpcopy
        .log()
        .matches("connected to intercept")
        .count()
        <= log_before
    {
        assert!(
            std::time::Instant::now() < deadline,
            "tcpcopy did not reconnect:\n{}",
            replay.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "100",
            "--path-prefix",
            "/after/",
        ],
    );
    let after = |t: &lab::Nginx| {
        t.paths()
            .iter()
            .filter(|p| p.starts_with("/after/"))
            .count()
    };
    let seen = lab::wait_count(|| after(&target), 100, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 100, "{stats}\n{logs}");
    assert!(counter(&stats, "reconnects") >= 1, "{stats}");
}

fn libc_sigkill() -> i32 {
    9
}

/// Test 5: malformed frames sent onto the capture interface are counted by reason and dropped;
/// tcpcopy keeps running and later sessions replicate.
#[test]
fn malformed_frames_are_counted_and_dropped() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    // A filter on the destination host only, so the kernel hands us every malformed frame.
    let replay = Replay::start(&lab, &["-F", "tcp and dst host 10.77.0.20"]);
    let script = lab.dir().join("malformed.py");
    std::fs::write(&script, MALFORMED_PY).expect("write script");
    let out = lab
        .run(Host::Client, "python3", &[script.to_str().unwrap()])
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "50",
            "--path-prefix",
            "/later/",
        ],
    );
    let seen = target.wait_count(50, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 50, "{stats}\n{logs}");
    for (reason, want) in [
        ("truncated", 2),
        ("bad-ihl", 2),
        ("bad-total-len", 2),
        ("bad-data-offset", 2),
        ("bad-version", 1),
    ] {
        assert_eq!(counter(&stats, reason), want, "{reason}: {stats}");
    }
}

/// Frames from the client to the online host's MAC, each broken in one way.
const MALFORMED_PY: &str = r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
eth = bytes.fromhex('027700000014' '02770000000a' '0800')
src, dst = socket.inet_aton('10.77.0.10'), socket.inet_aton('10.77.0.20')
def ip(ver_ihl=0x45, total=None, payload=b'', opts=b''):
    hl = 20 + len(opts)
    total = hl + len(payload) if total is None else total
    h = struct.pack('!BBHHHBBH4s4s', ver_ihl, 0, total, 1, 0x4000, 64, 6, 0, src, dst) + opts
    h = h[:10] + struct.pack('!H', csum(h)) + h[12:]
    return h + payload
def tcp(doff=5, payload=b''):
    return struct.pack('!HHIIBBHHH', 33333, 80, 1, 0, doff << 4, 0x18, 1024, 0, 0) + payload
frames = [
    ip(payload=tcp()[:10]),                   # truncated TCP header
    ip(payload=b''),                          # no TCP header at all
    ip(ver_ihl=0x43, payload=tcp()),          # IHL 3 < 5
    ip(ver_ihl=0x4f, payload=tcp()),          # IHL 15: header beyond the packet
    ip(total=400, payload=tcp(payload=b'GET / HTTP/1.1\r\n\r\n')),  # total length beyond the frame
    ip(total=10, payload=tcp()),              # total length below the header
    ip(payload=tcp(doff=2)),                  # data offset 2 < 5
    ip(payload=tcp(doff=15)),                 # data offset beyond the segment
    ip(ver_ihl=0x65, payload=tcp()),          # version 6 in an IPv4 frame
]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
for f in frames:
    s.send(eth + f)
print('sent', len(frames))
"#;

/// Test 7: bursts of 30,000 new-connection requests from one client IP at the load generator's
/// top speed (ports are reused within the run): at least 99.9% reach the target, 3 runs of 3.
#[test]
fn bursts_of_new_connections_replicate() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let replay = Replay::start(&lab, &[]);
    let mut before = 0;
    let mut results = Vec::new();
    for run in 0..3 {
        let out = lab
            .run_timeout(
                Host::Client,
                "ab",
                &[
                    "-q",
                    "-n",
                    "30000",
                    "-c",
                    "10",
                    "-r",
                    "http://10.77.0.20/burst",
                ],
                Duration::from_secs(120),
            )
            .expect("ab runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let complete: usize = text
            .lines()
            .find(|l| l.starts_with("Complete requests:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ab output without a count: {text}"));
        let rps = text
            .lines()
            .find(|l| l.starts_with("Requests per second:"))
            .unwrap_or("")
            .to_string();
        let total = target.settle(Duration::from_secs(2), Duration::from_secs(60));
        let replicated = total - before;
        before = total;
        results.push(format!(
            "run {run}: online {complete} target {replicated} ({rps})"
        ));
        assert!(
            replicated * 1000 >= complete * 999,
            "run {run}: {replicated} of {complete} replicated\n{}\n{}",
            results.join("\n"),
            replay.logs()
        );
    }
    let stats = replay.stop();
    eprintln!("{}\n{stats}", results.join("\n"));
}

/// `-d`, `-P` and `-l`: the daemon detaches, writes its pid file and log, replicates, and removes
/// the pid file when stopped.
#[test]
fn daemon_mode_writes_pid_file_and_log() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let _intercept = start_intercept(&lab, &["--stats-interval", "1"]);
    let pid_file = lab.dir().join("tcpcopy.pid");
    let log_file = lab.dir().join("tcpcopy.log");
    let (pid_s, log_s) = (pid_file.to_str().unwrap(), log_file.to_str().unwrap());
    let out = lab
        .run(
            Host::Online,
            TCPCOPY,
            &[
                "-d",
                "-P",
                pid_s,
                "-l",
                log_s,
                "-i",
                "eth0",
                "-x",
                "80-10.77.0.30:8080",
                "-s",
                "10.77.0.40",
            ],
        )
        .expect("tcpcopy -d runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_file)
        .unwrap_or_default()
        .contains("connected to intercept")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not connect: {:?}",
            std::fs::read_to_string(&log_file)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} is not running"
    );
    load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "20",
            "--path-prefix",
            "/d/",
        ],
    );
    assert_eq!(target.wait_count(20, Duration::from_secs(20)), 20);
    assert_eq!(terminate(pid), 0, "SIGTERM the daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pid_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pid file was not removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("final:"), "{log}");
}

/// `kill -TERM pid` through the kill(1) command (the tests stay free of unsafe code).
fn terminate(pid: i32) -> i32 {
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}
