//! Offline replay in the lab (issue 5): tcpdump records HTTP requests to the online nginx, then
//! `tcpcopy --pcap` replays the file onto the target through intercept, and the target's access
//! log is checked path by path.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.
//! Each test builds its own lab and removes it. Run them one at a time (`--test-threads=1`).

use lab::{Host, Lab};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

mod common;
use common::{counter, start_intercept, TCPCOPY};

/// A recorded capture and what went into it.
struct Capture {
    file: PathBuf,
    /// The distinct request paths the client sent.
    paths: BTreeSet<String>,
}

/// Records `requests` one-connection-per-request GETs (distinct paths under `prefix`) sent at
/// `rate` per second from the client to the online nginx, with tcpdump on the online host.
fn record(lab: &Lab, requests: u32, rate: u32, prefix: &str) -> Capture {
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let file = lab.dir().join("capture.pcap");
    let file_arg = file.to_str().expect("utf-8 lab dir").to_string();
    let mut tcpdump = lab
        .spawn(
            Host::Online,
            "tcpdump",
            &[
                "-i",
                "eth0",
                "-s",
                "0",
                "-n",
                "-Z",
                "root",
                // Deliver and write each packet at once: SIGINT must not lose a ring block.
                "--immediate-mode",
                "-U",
                "-w",
                &file_arg,
                "tcp port 80",
            ],
        )
        .expect("start tcpdump (apt install tcpdump)");
    tcpdump
        .wait_for_log("listening on", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("tcpdump did not start: {e:#}"));
    let report = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "close",
                "--requests",
                &requests.to_string(),
                "--concurrency",
                "4",
                "--rate",
                &rate.to_string(),
                "--path-prefix",
                prefix,
            ],
        )
        .expect("httpload runs");
    assert!(
        report.all_ok(),
        "load against the online server failed: {report:?}"
    );
    // Let the last FINs pass, then stop tcpdump so it flushes the file.
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.signal(libc::SIGINT).expect("signal tcpdump");
    let status = tcpdump
        .wait_exit(Duration::from_secs(10))
        .expect("tcpdump exits on SIGINT");
    assert!(status.success(), "tcpdump: {status}\n{}", tcpdump.log());
    let paths: BTreeSet<String> = online.paths().into_iter().collect();
    assert_eq!(
        paths.len(),
        requests as usize,
        "distinct paths at the online server"
    );
    Capture { file, paths }
}

/// A finished offline replay.
struct Replayed {
    status: ExitStatus,
    log: String,
    intercept_log: String,
}

/// Runs intercept, then `tcpcopy --pcap file extra...` until it exits by itself (bounded).
fn replay(lab: &Lab, file: &Path, extra: &[&str]) -> Replayed {
    let mut intercept = start_intercept(lab, &["--stats-interval", "1"]);
    let file_arg = file.to_str().expect("utf-8 path").to_string();
    let mut args = vec![
        "--pcap",
        &file_arg,
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        "10.77.0.40",
        "--stats-interval",
        "1",
        "--offline-tail-s",
        "3",
    ];
    args.extend_from_slice(extra);
    let mut tcpcopy = lab
        .spawn(Host::Online, TCPCOPY, &args)
        .expect("start tcpcopy");
    let status = match tcpcopy.wait_exit(Duration::from_secs(90)) {
        Ok(status) => status,
        Err(e) => {
            tcpcopy.stop();
            panic!("{e:#}\n{}", tcpcopy.log());
        }
    };
    intercept.stop();
    Replayed {
        status,
        log: tcpcopy.log(),
        intercept_log: intercept.log(),
    }
}

impl Replayed {
    fn logs(&self) -> String {
        format!(
            "--- tcpcopy ---\n{}\n--- intercept ---\n{}",
            self.log, self.intercept_log
        )
    }

    /// The summary line (`offline replay complete: ...`).
    fn summary(&self) -> &str {
        self.log
            .lines()
            .find(|l| l.contains("offline replay complete"))
            .unwrap_or_else(|| panic!("no replay summary\n{}", self.logs()))
    }
}

/// `name=value` from a summary line.
fn field(line: &str, name: &str) -> f64 {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| {
            v.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '/')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name}= in: {line}"))
}

/// How many times each path reached the target nginx, once its log is quiet.
fn target_counts(target: &lab::Nginx, want: usize) -> BTreeMap<String, usize> {
    target.wait_count(want, Duration::from_secs(30));
    target.settle(Duration::from_secs(1), Duration::from_secs(30));
    let mut counts = BTreeMap::new();
    for path in target.paths() {
        *counts.entry(path).or_insert(0) += 1;
    }
    counts
}

/// Asserts every path of `paths` reached the target exactly `times` times, and nothing else did.
fn assert_each(
    counts: &BTreeMap<String, usize>,
    paths: &BTreeSet<String>,
    times: usize,
    logs: &str,
) {
    let wrong: Vec<(&String, usize)> = paths
        .iter()
        .map(|p| (p, counts.get(p).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != times)
        .collect();
    let extra: Vec<&String> = counts.keys().filter(|p| !paths.contains(*p)).collect();
    assert!(
        wrong.is_empty() && extra.is_empty(),
        "{} of {} paths not seen {times} time(s) at the target (e.g. {:?}); {} unexpected paths\n{logs}",
        wrong.len(),
        paths.len(),
        wrong.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
    );
}

/// The request paths whose `GET` line is in the packets of `file` (what a replay of it can
/// deliver), read with the same crate tcpcopy uses; stops quietly at a truncated end.
fn paths_in(file: &Path) -> (BTreeSet<String>, f64) {
    let reader = std::fs::File::open(file).expect("open capture");
    let mut reader = pcap_file::pcap::PcapReader::new(reader).expect("pcap header");
    let mut paths = BTreeSet::new();
    let (mut first, mut last) = (None, 0.0f64);
    while let Some(Ok(packet)) = reader.next_packet() {
        let data = &packet.data;
        // Ethernet + IPv4 + TCP to port 80.
        if data.len() < 14 + 20 + 20 || data[12..14] != [0x08, 0x00] || data[23] != 6 {
            continue;
        }
        let ihl = usize::from(data[14] & 0x0f) * 4;
        let tcp = 14 + ihl;
        if data.len() < tcp + 20 || data[tcp + 2..tcp + 4] != [0, 80] {
            continue;
        }
        let at = packet.timestamp.as_secs_f64();
        first.get_or_insert(at);
        last = at;
        let payload = &data[tcp + usize::from(data[tcp + 12] >> 4) * 4..];
        if let Some(rest) = payload.strip_prefix(b"GET ") {
            if let Some(end) = rest.iter().position(|&b| b == b' ') {
                paths.insert(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
        }
    }
    (paths, last - first.unwrap_or(last))
}

/// 500 requests recorded at 250/s, replayed at capture speed: every path once at the target,
/// and tcpcopy exits by itself with the summary.
#[test]
fn replays_a_recorded_capture_every_path_once() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let capture = record(&lab, 500, 250, "/off/");
    let (in_file, _) = paths_in(&capture.file);
    assert_eq!(in_file, capture.paths, "tcpdump recorded every request");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let run = replay(&lab, &capture.file, &[]);
    assert!(
        run.status.success(),
        "tcpcopy: {}\n{}",
        run.status,
        run.logs()
    );
    let counts = target_counts(&target, capture.paths.len());
    assert_each(&counts, &capture.paths, 1, &run.logs());
    let summary = run.summary();
    assert_eq!(field(summary, "rounds"), 1.0, "{summary}");
    assert_eq!(field(summary, "stopped-early"), 0.0, "{summary}");
    assert!(run.log.contains("final:"), "{}", run.logs());
}

/// Issue 4's dispatcher: one capture file, two workers. Every path arrives once, both workers
/// replay a share of the sessions, and every reply reaches the worker that owns its session.
#[test]
fn two_workers_share_a_capture_file() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let capture = record(&lab, 500, 250, "/two/");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let run = replay(&lab, &capture.file, &["--workers", "2", "-a", "4"]);
    assert!(
        run.status.success(),
        "tcpcopy: {}\n{}",
        run.status,
        run.logs()
    );
    let counts = target_counts(&target, capture.paths.len());
    assert_each(&counts, &capture.paths, 1, &run.logs());
    let workers: Vec<&str> = run
        .log
        .lines()
        .filter(|l| l.contains("worker ") && l.contains("replies-dispatched"))
        .collect();
    assert!(workers.len() >= 2, "no per-worker lines\n{}", run.logs());
    for line in workers.iter().rev().take(2) {
        assert!(counter(line, "sessions-created") > 50, "{line}");
        assert_eq!(counter(line, "replies-unmatched"), 0, "{line}");
    }
}

/// `-a 10` replays about ten times faster than captured (the round's span is printed; asserted
/// loosely: less than half the capture's span), and still delivers every path.
#[test]
fn acceleration_10_replays_faster() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let capture = record(&lab, 500, 100, "/fast/");
    let (_, span) = paths_in(&capture.file);
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let run = replay(&lab, &capture.file, &["-a", "10"]);
    assert!(
        run.status.success(),
        "tcpcopy: {}\n{}",
        run.status,
        run.logs()
    );
    let counts = target_counts(&target, capture.paths.len());
    assert_each(&counts, &capture.paths, 1, &run.logs());
    let round = run
        .log
        .lines()
        .find(|l| l.contains("offline round 1/1 done"))
        .unwrap_or_else(|| panic!("no round line\n{}", run.logs()));
    let replayed: f64 = round
        .split(" packets in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no span in: {round}"));
    println!(
        "capture span {span:.3} s, replayed in {replayed:.3} s with -a 10 ({:.1}x)",
        span / replayed.max(1e-6)
    );
    assert!(span > 4.0, "the capture spans {span} s");
    assert!(
        replayed < span / 2.0,
        "-a 10 took {replayed} s for a {span} s capture"
    );
}

/// `-T 3`: three rounds, each starting after the previous one's sessions ended; every path
/// three times at the target.
#[test]
fn three_rounds_give_each_path_three_times() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let capture = record(&lab, 300, 300, "/rounds/");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let run = replay(&lab, &capture.file, &["-T", "3", "-a", "2"]);
    assert!(
        run.status.success(),
        "tcpcopy: {}\n{}",
        run.status,
        run.logs()
    );
    let counts = target_counts(&target, 3 * capture.paths.len());
    assert_each(&counts, &capture.paths, 3, &run.logs());
    let summary = run.summary();
    assert_eq!(field(summary, "rounds"), 3.0, "{summary}");
    for round in 1..=3 {
        assert!(
            run.log.contains(&format!("offline round {round}/3 done")),
            "{}",
            run.logs()
        );
    }
}

/// A capture cut in the middle: the requests before the cut reach the target, and the log says
/// where reading stopped.
#[test]
fn a_truncated_capture_replays_the_requests_before_the_cut() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let capture = record(&lab, 400, 250, "/cut/");
    let bytes = std::fs::read(&capture.file).expect("read capture");
    let cut_at = bytes.len() / 2 + 7;
    let cut = lab.dir().join("cut.pcap");
    std::fs::write(&cut, &bytes[..cut_at]).expect("write the cut file");
    let (before_cut, _) = paths_in(&cut);
    assert!(
        before_cut.len() > 100 && before_cut.len() < capture.paths.len(),
        "{} requests before the cut",
        before_cut.len()
    );
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let run = replay(&lab, &cut, &[]);
    assert!(
        run.status.success(),
        "tcpcopy: {}\n{}",
        run.status,
        run.logs()
    );
    let counts = target_counts(&target, before_cut.len());
    assert_each(&counts, &before_cut, 1, &run.logs());
    let stop = run
        .log
        .lines()
        .find(|l| l.contains("stopped reading at byte offset"))
        .unwrap_or_else(|| panic!("no stop line\n{}", run.logs()));
    let offset: usize = stop
        .split("byte offset ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in: {stop}"));
    println!("{stop}");
    assert!(
        offset < cut_at && cut_at - offset <= 16 + 262_144,
        "stopped at {offset}, the file ends at {cut_at}: {stop}"
    );
    assert!(stop.contains("truncated"), "{stop}");
    assert_eq!(field(run.summary(), "stopped-early"), 1.0);
}
