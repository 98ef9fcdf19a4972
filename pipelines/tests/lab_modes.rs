//! Replay modes in the lab (issue 5): sessions captured mid-stream (and `-O`), `-n` copies and
//! `-r` sampling, with real nginx servers and the real `tcpcopy` and `intercept` binaries.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly. Each test
//! builds its own lab and removes it, also when it fails. Run them one at a time.

use lab::{Host, Lab};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// 20 keep-alive connections are open and sending when tcpcopy starts. Returns the paths the
/// online server answered after tcpcopy was capturing, the target's paths, tcpcopy's final line
/// and the number of distinct connections the online server saw.
fn midstream_run(extra: &[&str]) -> (Vec<String>, Vec<String>, String, usize) {
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept = start_intercept(&lab, &[]);
    lab::build_lab_bins().expect("build the lab's binaries");
    let mut load = lab
        .spawn(
            Host::Client,
            lab::workspace_bin("httpload"),
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "keepalive",
                "--connections",
                "20",
                "--requests",
                "1200",
                "--rate",
                "150",
                "--path-prefix",
                "/m/",
            ],
        )
        .expect("start httpload");
    // Let every connection carry requests before tcpcopy exists.
    let started = online.wait_count(200, Duration::from_secs(30));
    assert!(started >= 200, "the load did not start:\n{}", load.log());
    let mut tcpcopy = start_tcpcopy(&lab, extra);
    // The capture is open once tcpcopy is connected; requests logged from here on were sent
    // while it captured (a request in flight now may or may not be seen: skip a few).
    std::thread::sleep(Duration::from_millis(300));
    let from = online.count() + 20;
    let status = load
        .wait_exit(Duration::from_secs(60))
        .expect("httpload ends");
    assert!(status.success(), "httpload failed:\n{}", load.log());
    let online_entries = online.entries();
    assert_eq!(online_entries.len(), 1200, "online requests");
    let connections: HashSet<u64> = online_entries.iter().map(|e| e.connection).collect();
    let after: Vec<String> = online_entries[from..]
        .iter()
        .map(|e| e.uri.clone())
        .collect();
    target.settle(Duration::from_secs(2), Duration::from_secs(30));
    let line = final_line(&mut tcpcopy);
    intercept.stop();
    (after, target.paths(), line, connections.len())
}

/// Issue 5, test 1: every request sent after tcpcopy started arrives at the target, although
/// its connection opened before (a fabricated handshake per connection).
#[test]
fn sessions_open_before_the_start_are_replayed() {
    if !lab::require_root() {
        return;
    }
    let (after, at_target, line, connections) = midstream_run(&[]);
    assert_eq!(connections, 20, "the load used 20 keep-alive connections");
    let seen: HashSet<&String> = at_target.iter().collect();
    let missing: Vec<&String> = after.iter().filter(|p| !seen.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} requests sent after the start are missing at the target (e.g. {:?})\n{line}",
        missing.len(),
        after.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for p in &at_target {
        *counts.entry(p).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "a path doubled\n{line}");
    assert_eq!(counter(&line, "mid-stream"), 20, "{line}");
    assert_eq!(counter(&line, "created"), 20, "{line}");
    assert_eq!(counter(&line, "answered"), 20, "{line}");
    println!(
        "mid-stream: {} requests after the start, all {} at the target; {line}",
        after.len(),
        at_target.len()
    );
}

/// Issue 5, test 1 with `-O`: none of those connections is replayed.
#[test]
fn with_o_sessions_open_before_the_start_are_not_replayed() {
    if !lab::require_root() {
        return;
    }
    let (after, at_target, line, _) = midstream_run(&["-O"]);
    assert!(after.len() > 500, "{}", after.len());
    assert!(
        at_target.is_empty(),
        "{:?}\n{line}",
        &at_target[..5.min(at_target.len())]
    );
    assert_eq!(counter(&line, "created"), 0, "{line}");
    assert!(counter(&line, "no-session") > 500, "{line}");
}

/// Issue 5, test 5: `-n 3` gives three times the connections and requests at the target, and no
/// two replayed sessions share a 4-tuple.
#[test]
fn three_copies_triple_the_sessions_without_port_collisions() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept = start_intercept(&lab, &[]);
    let mut tcpcopy = start_tcpcopy(&lab, &["-n", "3", "--workers", "2"]);
    for (mode, prefix) in [("close", "/c/"), ("keepalive", "/k/")] {
        let report = lab
            .httpload(
                Host::Client,
                &[
                    "--target",
                    "10.77.0.20:80",
                    "--mode",
                    mode,
                    "--requests",
                    "500",
                    "--concurrency",
                    "5",
                    "--connections",
                    "10",
                    "--path-prefix",
                    prefix,
                ],
            )
            .expect("httpload runs");
        assert!(report.all_ok(), "{report:?}");
    }
    let seen = target.wait_count(3000, Duration::from_secs(60));
    target.settle(Duration::from_secs(2), Duration::from_secs(10));
    let line = final_line(&mut tcpcopy);
    intercept.stop();
    let entries = target.entries();
    assert_eq!(seen, 3000, "{line}");
    assert_eq!(entries.len(), 3000, "{line}");
    // Each path three times, from three different client ports.
    let mut by_path: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    for e in &entries {
        by_path.entry(&e.uri).or_default().insert(e.peer.port());
    }
    assert_eq!(by_path.len(), 1000, "{line}");
    let bad: Vec<_> = by_path
        .iter()
        .filter(|(_, ports)| ports.len() != 3)
        .collect();
    assert!(
        bad.is_empty(),
        "paths not from 3 ports: {:?}\n{line}",
        &bad[..bad.len().min(5)]
    );
    // Three times the connections: 3 x 500 one-request connections and 3 x 10 keep-alive ones.
    let connections: HashSet<u64> = entries.iter().map(|e| e.connection).collect();
    assert_eq!(connections.len(), 1530, "{line}");
    // A keep-alive connection at the target carries one session's requests only: its client
    // port is the same in every entry.
    let mut ports_of: BTreeMap<u64, BTreeSet<u16>> = BTreeMap::new();
    for e in &entries {
        ports_of
            .entry(e.connection)
            .or_default()
            .insert(e.peer.port());
    }
    assert!(ports_of.values().all(|p| p.len() == 1), "{line}");
    assert_eq!(counter(&line, "port-reuse-reset"), 0, "{line}");
    assert_eq!(
        counter(&line, "copies"),
        counter(&line, "accepted") * 2,
        "{line}"
    );
}

/// 2,000 sequential requests, each on its own connection from source port 20000 + i.
fn fixed_port_clients(lab: &Lab, run: u32) {
    let script = format!(
        r#"
import socket, sys
ok = 0
for port in range(20000, 22000):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("10.77.0.10", port))
    s.connect(("10.77.0.20", 80))
    s.sendall(b"GET /r/%d/{run} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n" % port)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if data.startswith(b"HTTP/1.1 "):
        ok += 1
print("ok", ok)
sys.exit(0 if ok == 2000 else 1)
"#
    );
    let out = lab
        .run_timeout(
            Host::Client,
            "python3",
            &["-c", &script],
            Duration::from_secs(120),
        )
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "client run {run} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 5, test 5: `-r 50` replays 50% +- 5% of 2,000 sessions, whole, and the same sessions
/// when tcpcopy runs again.
#[test]
fn sampling_half_replays_the_same_half_on_every_run() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept = start_intercept(&lab, &[]);
    let mut runs: Vec<BTreeSet<u16>> = Vec::new();
    for run in 1..=2u32 {
        let mut tcpcopy = start_tcpcopy(&lab, &["-r", "50"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        fixed_port_clients(&lab, run);
        target.settle(Duration::from_secs(2), Duration::from_secs(30));
        let line = final_line(&mut tcpcopy);
        let suffix = format!("/{run}");
        let ports: BTreeSet<u16> = target
            .paths()
            .iter()
            .filter(|p| p.ends_with(&suffix))
            .filter_map(|p| p.split('/').nth(2).and_then(|n| n.parse().ok()))
            .collect();
        let entries = target
            .paths()
            .iter()
            .filter(|p| p.ends_with(&suffix))
            .count();
        assert_eq!(
            entries,
            ports.len(),
            "a sampled session replayed twice\n{line}"
        );
        assert!(
            (900..=1100).contains(&ports.len()),
            "run {run}: {} of 2000 sessions replayed\n{line}",
            ports.len()
        );
        let sampled_out = counter(&line, "sampled-out");
        assert!(sampled_out > 0, "{line}");
        println!(
            "run {run}: {} of 2000 sessions replayed; {line}",
            ports.len()
        );
        runs.push(ports);
        // Let the online server's TIME_WAIT and tcpcopy's lingering sessions pass their
        // shortest span before the same ports connect again.
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    }
    intercept.stop();
    assert_eq!(runs[0], runs[1], "the second run replayed other sessions");
}

/// One authenticated client of greetserver: greeting, `AUTH lab-secret`, `before` requests
/// `GET c<conn>-r<i>`, a pause, then `after` more, 100 ms apart, each waiting for its answer
/// (100 payload bytes), then `QUIT`.
fn auth_client(conn: usize, before: usize, pause: Duration, after: usize) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let err = |e: std::io::Error| format!("connection {conn}: {e}");
    let stream = std::net::TcpStream::connect("10.77.0.20:2525").map_err(err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut out = stream.try_clone().map_err(err)?;
    let mut reader = BufReader::new(stream);
    let expect = |reader: &mut BufReader<std::net::TcpStream>, prefix: &str| {
        let mut line = String::new();
        reader.read_line(&mut line).map_err(err)?;
        if line.starts_with(prefix) {
            Ok(())
        } else {
            Err(format!(
                "connection {conn}: expected {prefix:?}, got {line:?}"
            ))
        }
    };
    expect(&mut reader, "220 ")?;
    out.write_all(b"AUTH lab-secret\r\n").map_err(err)?;
    expect(&mut reader, "235 ")?;
    let mut body = [0u8; 100];
    for i in 0..before + after {
        if i == before {
            std::thread::sleep(pause);
        }
        out.write_all(format!("GET c{conn}-r{i}\r\n").as_bytes())
            .map_err(err)?;
        expect(&mut reader, "OK ")?;
        reader.read_exact(&mut body).map_err(err)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    out.write_all(b"QUIT\r\n").map_err(err)?;
    expect(&mut reader, "221 ")
}

/// Issue 5, protocol modules: a server that requires `AUTH` first (greetserver
/// `--require-auth`). Ten connections authenticate before tcpcopy starts, so tcpcopy sees
/// them only mid-stream and the target would refuse their requests (`530`). With
/// `--module line-auth`, a session seen from its SYN teaches the module the client's `AUTH`
/// line (its configured default is deliberately wrong), and the module sends that line in
/// front of each of the ten sessions: every request sent after the start is served at the
/// target.
#[test]
fn a_protocol_module_reauthenticates_sessions_captured_mid_stream() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let auth = ["--require-auth", "lab-secret"];
    let online = Greetserver::start(&lab, Host::Online, 2525, 64, 100, &auth);
    let target = Greetserver::start(&lab, Host::Target, 2526, 64, 100, &auth);
    let mut intercept = start_intercept(&lab, &[]);
    let line = std::thread::scope(|s| {
        let clients = s.spawn(|| {
            lab.in_ns(Host::Client, || {
                std::thread::scope(|s| {
                    let all: Vec<_> = (0..10)
                        .map(|c| s.spawn(move || auth_client(c, 3, Duration::from_secs(5), 30)))
                        .collect();
                    all.into_iter()
                        .map(|h| h.join().expect("client thread"))
                        .collect::<Result<Vec<()>, String>>()
                })
            })
            .expect("enter the client namespace")
        });
        // Every connection has authenticated and sent its first requests before tcpcopy.
        assert_eq!(
            online.wait_count(30, Duration::from_secs(20)),
            30,
            "the clients did not start"
        );
        let mut tcpcopy = start_tcpcopy_to(
            &lab,
            "2525-10.77.0.30:2526",
            &["--module", "line-auth=AUTH :AUTH wrong-default"],
        );
        // A whole session, seen from its SYN: the module learns the client's AUTH line.
        lab.in_ns(Host::Client, || auth_client(99, 1, Duration::ZERO, 0))
            .expect("enter the client namespace")
            .unwrap_or_else(|e| panic!("the learning client failed: {e}"));
        clients
            .join()
            .expect("clients")
            .unwrap_or_else(|e| panic!("a client failed: {e}"));
        target.settle_count(301, Duration::from_secs(10));
        final_line(&mut tcpcopy)
    });
    intercept.stop();
    let after: Vec<String> = online
        .entries()
        .into_iter()
        .map(|(_, id)| id)
        .filter(|id| {
            id == "c99-r0"
                || id
                    .split("-r")
                    .nth(1)
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i >= 3)
        })
        .collect();
    assert_eq!(after.len(), 301);
    let at_target: HashSet<String> = target.entries().into_iter().map(|(_, id)| id).collect();
    let missing: Vec<&String> = after.iter().filter(|id| !at_target.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of 301 requests sent after the start were not served at the target (e.g. {:?})\n{line}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(counter(&line, "mid-stream"), 10, "{line}");
    assert_eq!(counter(&line, "module-prefixes"), 10, "{line}");
}
