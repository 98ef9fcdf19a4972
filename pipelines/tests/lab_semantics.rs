//! Replay semantics in the lab (issue 5): a server-first protocol, pipelined HTTP clients,
//! window stalls (1 MiB uploads and downloads against small receive buffers) and packet loss
//! on either side of tcpcopy, with real servers on the online host and on the target and the
//! real `tcpcopy` (online host) and `intercept` (assistant).
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.
//! Each test builds its own lab and removes it, also when it fails. Run them one at a time
//! (`--test-threads=1`).

use lab::{Host, Lab, Proc};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{counter, start_intercept, start_tcpcopy_to, Greetserver};

/// The replay path: intercept on the assistant, tcpcopy on the online host.
struct Replay {
    intercept: Proc,
    tcpcopy: Proc,
}

impl Replay {
    /// Starts intercept, then tcpcopy with `-x transfer` and `extra` flags.
    fn start(lab: &Lab, transfer: &str, extra: &[&str]) -> Replay {
        let intercept = start_intercept(lab, &["--stats-interval", "1"]);
        let tcpcopy = start_tcpcopy_to(lab, transfer, extra);
        Replay { intercept, tcpcopy }
    }

    /// tcpcopy's latest statistics line ("" before the first one).
    fn last_stats(&self) -> String {
        self.tcpcopy
            .log()
            .lines()
            .rev()
            .find(|l| l.contains("captured ") && l.contains(" created "))
            .unwrap_or("")
            .to_string()
    }

    /// Waits (bounded by `max`) until tcpcopy's statistics show `want` for `name`; returns
    /// the last value seen.
    fn wait_counter(&self, name: &str, want: u64, max: Duration) -> u64 {
        let deadline = Instant::now() + max;
        loop {
            let line = self.last_stats();
            let value = if line.is_empty() {
                0
            } else {
                counter(&line, name)
            };
            if value >= want || Instant::now() >= deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops both (SIGTERM) and returns tcpcopy's final statistics line (also printed).
    fn stop(&mut self) -> String {
        self.tcpcopy.stop();
        self.intercept.stop();
        let log = self.tcpcopy.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("final:"))
            .map(str::to_string)
            .unwrap_or_else(|| {
                panic!(
                    "tcpcopy printed no final statistics:\n{log}\nintercept:\n{}",
                    self.intercept.log()
                )
            });
        eprintln!("tcpcopy {line}");
        line
    }

    /// The tails of both logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- tcpcopy ---\n{}\n--- intercept ---\n{}",
            tail(&self.tcpcopy.log(), 40),
            tail(&self.intercept.log(), 10)
        )
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Asserts that no session was lost: no resets by the target, no timeouts, no give-ups, no
/// queue or pool overflow.
fn assert_no_lost_sessions(stats: &str, logs: &str) {
    for name in [
        "target-rst",
        "timed-out",
        "gave-up",
        "queue-full",
        "table-full",
    ] {
        assert_eq!(counter(stats, name), 0, "{name} in {stats}\n{logs}");
    }
}

fn load(lab: &Lab, args: &[&str]) -> lab::LoadReport {
    let report = lab.httpload(Host::Client, args).expect("httpload runs");
    assert!(
        report.all_ok(),
        "load against the online server failed: {report:?}"
    );
    report
}

/// Every path of `online` arrived at the target exactly once; `target` lists the paths the
/// target logged (with repeats).
fn assert_paths_once(online: &[String], target: &[String], context: &str) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in target {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = online
        .iter()
        .filter(|p| !counts.contains_key(p.as_str()))
        .collect();
    let doubled: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let known: HashSet<&str> = online.iter().map(String::as_str).collect();
    let unknown: Vec<&&str> = counts.keys().filter(|p| !known.contains(**p)).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && unknown.is_empty(),
        "online {} requests, target {}: {} missing (e.g. {:?}), {} doubled (e.g. {:?}), {} unknown \
         (e.g. {:?})\n{context}",
        online.len(),
        target.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
        unknown.len(),
        unknown.iter().take(5).collect::<Vec<_>>(),
    );
}

// ---------------------------------------------------------------------------------------
// 1. A server-first protocol (greeting before the first request).

const GREET_ONLINE_PORT: u16 = 2525;
const GREET_TARGET_PORT: u16 = 2526;
const GREET_PAYLOAD: usize = 3000;
const GREET_CONNECTIONS: usize = 200;
const GREET_REQUESTS: usize = 5;

/// One greetserver session as a client: greeting, `GREET_REQUESTS` requests each waiting for
/// its answer, QUIT, then the server's close. Returns the local port.
fn greet_session(addr: SocketAddr, conn: usize, payload: &[u8]) -> Result<u16, String> {
    let io = |e: std::io::Error| format!("connection {conn}: {e}");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let _ = stream.set_nodelay(true);
    let port = stream.local_addr().map_err(io)?.port();
    let mut out = stream.try_clone().map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    if !line.starts_with("220 greet ") || !line.ends_with("\r\n") {
        return Err(format!("connection {conn}: bad greeting {line:?}"));
    }
    let mut body = vec![0u8; payload.len()];
    for r in 0..GREET_REQUESTS {
        let id = greet_id(conn, r);
        out.write_all(format!("GET {id}\r\n").as_bytes())
            .map_err(io)?;
        line.clear();
        reader.read_line(&mut line).map_err(io)?;
        let want = format!("OK {id} {}\r\n", payload.len());
        if line != want {
            return Err(format!("connection {conn}: {line:?} instead of {want:?}"));
        }
        reader.read_exact(&mut body).map_err(io)?;
        if body != payload {
            return Err(format!("connection {conn}: payload of {id} differs"));
        }
    }
    out.write_all(b"QUIT\r\n").map_err(io)?;
    line.clear();
    reader.read_line(&mut line).map_err(io)?;
    if line != "221 bye\r\n" {
        return Err(format!("connection {conn}: {line:?} after QUIT"));
    }
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).map_err(io)?;
    if !rest.is_empty() {
        return Err(format!("connection {conn}: {} bytes after bye", rest.len()));
    }
    Ok(port)
}

fn greet_id(conn: usize, request: usize) -> String {
    format!("c{conn:03}-r{request}")
}

/// Online greetings are this long.
const GREET_BYTES: usize = 64;

/// Server-first protocol: 200 connections each read a greeting, then send 5 requests, each
/// after the previous answer. Every request reaches the target once, in order per connection,
/// and each connection's requests arrive on one connection from the client's own port.
#[test]
fn server_first_protocol_requests_arrive_once_in_order() {
    if !lab::require_root() {
        return;
    }
    let stats = greet_case(GREET_BYTES);
    assert_eq!(counter(&stats, "pace-releases"), 0, "{stats}");
}

/// The target's greeting is 24 bytes shorter than the online one: each connection's first
/// request is held until the target has been silent for the pacing idle time (one silence
/// release per connection), then everything proceeds as online.
#[test]
fn server_first_protocol_with_a_shorter_target_greeting() {
    if !lab::require_root() {
        return;
    }
    let stats = greet_case(GREET_BYTES - 24);
    assert_eq!(
        counter(&stats, "pace-releases"),
        GREET_CONNECTIONS as u64,
        "{stats}"
    );
}

/// The target's greeting is 36 bytes longer than the online one: requests never wait for
/// silence, and still go out one answer at a time.
#[test]
fn server_first_protocol_with_a_longer_target_greeting() {
    if !lab::require_root() {
        return;
    }
    let stats = greet_case(GREET_BYTES + 36);
    assert_eq!(counter(&stats, "pace-releases"), 0, "{stats}");
}

/// Runs the greeting test with target greetings of `target_greet` bytes (online: `GREET_BYTES`);
/// returns tcpcopy's final statistics line.
fn greet_case(target_greet: usize) -> String {
    let lab = Lab::up().expect("lab up");
    let online = Greetserver::start(
        &lab,
        Host::Online,
        GREET_ONLINE_PORT,
        GREET_BYTES,
        GREET_PAYLOAD,
        &[],
    );
    let target = Greetserver::start(
        &lab,
        Host::Target,
        GREET_TARGET_PORT,
        target_greet,
        GREET_PAYLOAD,
        &[],
    );
    let transfer = format!("{GREET_ONLINE_PORT}-10.77.0.30:{GREET_TARGET_PORT}");
    let mut replay = Replay::start(&lab, &transfer, &[]);
    let addr = SocketAddr::from(SocketAddrV4::new(Host::Online.addr(), GREET_ONLINE_PORT));
    let payload = lab::http::body_bytes(GREET_PAYLOAD, 5);
    let workers = 8;
    let ports: Vec<Result<u16, String>> = lab
        .in_ns(Host::Client, || {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..workers)
                    .map(|w| {
                        let payload = &payload;
                        s.spawn(move || {
                            (w..GREET_CONNECTIONS)
                                .step_by(workers)
                                .map(|c| (c, greet_session(addr, c, payload)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                let mut all: Vec<(usize, Result<u16, String>)> = handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("client thread"))
                    .collect();
                all.sort_by_key(|(c, _)| *c);
                all.into_iter().map(|(_, r)| r).collect()
            })
        })
        .expect("enter the client namespace");
    let failed: Vec<&String> = ports.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "online sessions failed: {failed:?}");
    let total = GREET_CONNECTIONS * GREET_REQUESTS;
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(total, Duration::from_secs(30)), total);
    lab::wait_count(|| target.count(), total, Duration::from_secs(60));
    let seen = lab::settle(
        || target.count(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    replay.wait_counter("closed", GREET_CONNECTIONS as u64, Duration::from_secs(20));
    let logs = replay.logs();
    let stats = replay.stop();
    let context = format!("target logged {seen}\n{stats}\n{logs}");

    // Per connection: the ids in log order, and the peers they came from.
    let mut by_conn: HashMap<usize, (Vec<String>, Vec<SocketAddrV4>)> = HashMap::new();
    for (peer, id) in target.entries() {
        let conn = id
            .strip_prefix('c')
            .and_then(|r| r.split_once('-'))
            .and_then(|(c, _)| c.parse().ok())
            .unwrap_or_else(|| panic!("unexpected id {id:?} at the target"));
        let e = by_conn.entry(conn).or_default();
        e.0.push(id);
        e.1.push(peer);
    }
    let mut wrong = Vec::new();
    for (conn, port) in ports.iter().enumerate() {
        let want: Vec<String> = (0..GREET_REQUESTS).map(|r| greet_id(conn, r)).collect();
        let port = *port.as_ref().expect("checked above");
        let (ids, peers) = by_conn.remove(&conn).unwrap_or_default();
        let one_peer = peers
            .iter()
            .all(|p| *p == SocketAddrV4::new(Host::Client.addr(), port));
        if ids != want || !one_peer {
            wrong.push(format!(
                "connection {conn} (port {port}): {ids:?} from {peers:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} connections wrong at the target, e.g. {:?}\n{context}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(seen, total, "{context}");
    assert_eq!(
        counter(&stats, "created"),
        GREET_CONNECTIONS as u64,
        "{context}"
    );
    assert_eq!(
        counter(&stats, "closed"),
        GREET_CONNECTIONS as u64,
        "{context}"
    );
    assert_no_lost_sessions(&stats, &logs);
    stats
}

// ---------------------------------------------------------------------------------------
// 2. Pipelined HTTP clients.

/// HTTP pipelining against nginx (keep-alive): batches of requests in one write, and batches
/// spread over several writes, all written before the first response is read. Every path
/// arrives at the target exactly once, over as many connections as the client opened.
#[test]
fn pipelined_requests_all_arrive() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut replay = Replay::start(&lab, "80-10.77.0.30:8080", &[]);
    // (prefix, requests, connections, depth, writes per batch)
    let runs = [
        ("/pipe-one-write/", 800, 10, 8, 1),
        ("/pipe-four-writes/", 800, 10, 8, 4),
        ("/pipe-each-write/", 640, 4, 16, 16),
    ];
    for (prefix, requests, connections, depth, writes) in runs {
        let (requests, connections, depth, writes) = (
            requests.to_string(),
            connections.to_string(),
            depth.to_string(),
            writes.to_string(),
        );
        load(
            &lab,
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "keepalive",
                "--connections",
                &connections,
                "--requests",
                &requests,
                "--pipeline",
                &depth,
                "--pipeline-writes",
                &writes,
                "--path-prefix",
                prefix,
            ],
        );
    }
    let total: usize = runs.iter().map(|r| r.1).sum();
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(total, Duration::from_secs(30)), total);
    target.wait_count(total, Duration::from_secs(60));
    let seen = target.settle(Duration::from_secs(2), Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    let context = format!("target logged {seen}\n{stats}\n{logs}");
    assert_paths_once(&online.paths(), &target.paths(), &context);
    for (prefix, _, connections, _, _) in runs {
        let at_target: HashSet<u64> = target
            .entries()
            .iter()
            .filter(|e| e.uri.starts_with(prefix))
            .map(|e| e.connection)
            .collect();
        assert_eq!(
            at_target.len(),
            connections,
            "{prefix}: keep-alive connections at the target\n{context}"
        );
    }
    assert_no_lost_sessions(&stats, &logs);
}

// ---------------------------------------------------------------------------------------
// 3. Window stalls.

const MIB: usize = 1 << 20;

/// `host`'s kernel counters TCPToZeroWindowAdv (it advertised a zero window),
/// TCPFromZeroWindowAdv (it reopened one) and TCPWinProbe (zero-window probes it sent), printed.
fn window_counters(lab: &Lab, host: Host) -> [u64; 3] {
    let names = ["TCPToZeroWindowAdv", "TCPFromZeroWindowAdv", "TCPWinProbe"];
    let values = names.map(|n| {
        lab.net_counter(host, "TcpExt", n)
            .unwrap_or_else(|e| panic!("{e:#}"))
    });
    eprintln!("{}: {names:?} = {values:?}", host.name());
    values
}

/// 50 uploads of 1 MiB to a target that reads slowly through a 4 KiB receive buffer (zero
/// windows): every body arrives whole (length and SHA-256), no session is lost.
#[test]
fn uploads_of_1mib_survive_a_small_slow_target_window() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab
        .labserver_with(
            Host::Target,
            8080,
            &[
                "--rcvbuf",
                "4096",
                "--read-pause-ms",
                "1000",
                "--read-delay-ms",
                "1",
            ],
        )
        .expect("target labserver");
    let mut replay = Replay::start(&lab, "80-10.77.0.30:8080", &[]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "50",
            "--concurrency",
            "5",
            "--post-bytes",
            &MIB.to_string(),
            "--path-prefix",
            "/up/",
        ],
    );
    let seen = target.wait_count(50, Duration::from_secs(180));
    replay.wait_counter("closed", 50, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 50, "{stats}\n{logs}");
    for entry in target.entries() {
        assert_eq!(
            (entry.body_len, entry.sha256.as_str()),
            (MIB as u64, report.body_sha256.as_str()),
            "{entry:?}\n{stats}"
        );
    }
    assert_eq!(counter(&stats, "closed"), 50, "{stats}\n{logs}");
    assert_no_lost_sessions(&stats, &logs);
    let zero = window_counters(&lab, Host::Target);
    assert!(
        zero[0] >= 50,
        "the target advertised only {} zero windows: {zero:?}",
        zero[0]
    );
}

/// A target that leaves its 4 KiB window closed for 25 s before it reads the uploads (a busy
/// backend): a TCP sender keeps probing a zero window as long as the receiver answers the
/// probes, so tcpcopy must not give the sessions up; all 5 bodies arrive whole.
#[test]
fn uploads_survive_a_25s_zero_window() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab
        .labserver_with(
            Host::Target,
            8080,
            &["--rcvbuf", "4096", "--read-pause-ms", "25000"],
        )
        .expect("target labserver");
    let mut replay = Replay::start(&lab, "80-10.77.0.30:8080", &[]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "5",
            "--concurrency",
            "5",
            "--post-bytes",
            "262144",
            "--path-prefix",
            "/zw/",
        ],
    );
    let seen = target.wait_count(5, Duration::from_secs(90));
    replay.wait_counter("closed", 5, Duration::from_secs(30));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(counter(&stats, "gave-up"), 0, "{stats}\n{logs}");
    assert_eq!(seen, 5, "{stats}\n{logs}");
    for entry in target.entries() {
        assert_eq!(
            (entry.body_len, entry.sha256.as_str()),
            (262_144, report.body_sha256.as_str()),
            "{entry:?}\n{stats}"
        );
    }
    assert_no_lost_sessions(&stats, &logs);
}

/// 50 downloads of 1 MiB by a client with a 4 KiB receive buffer that stops reading for 1 s
/// after the first piece of each answer (its window closes) and then reads slowly. The target
/// (4 KiB receive buffer too) answers 200 ms late, so its answer meets the client's closed
/// window as captured by tcpcopy and must resume when the client's window reopens: every
/// session ends with both FINs, i.e. the target's whole answer reached tcpcopy in order.
#[test]
fn downloads_of_1mib_survive_a_small_slow_client_window() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let bytes = MIB.to_string();
    let _online = lab
        .labserver_with(Host::Online, 80, &["--response-bytes", &bytes])
        .expect("online labserver");
    let target = lab
        .labserver_with(
            Host::Target,
            8080,
            &[
                "--response-bytes",
                &bytes,
                "--rcvbuf",
                "4096",
                "--response-delay-ms",
                "200",
            ],
        )
        .expect("target labserver");
    let mut replay = Replay::start(&lab, "80-10.77.0.30:8080", &[]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "50",
            "--concurrency",
            "5",
            "--rcvbuf",
            "4096",
            "--read-pause-ms",
            "1000",
            "--read-delay-ms",
            "1",
            "--path-prefix",
            "/down/",
        ],
    );
    assert_eq!(report.body_bytes_received, 50 * MIB as u64);
    let seen = target.wait_count(50, Duration::from_secs(60));
    let closed = replay.wait_counter("closed", 50, Duration::from_secs(120));
    let logs = replay.logs();
    let stats = replay.stop();
    assert_eq!(seen, 50, "{stats}\n{logs}");
    assert_eq!(closed, 50, "sessions closed by both FINs\n{stats}\n{logs}");
    assert_no_lost_sessions(&stats, &logs);
    let client = window_counters(&lab, Host::Client);
    let target = window_counters(&lab, Host::Target);
    eprintln!("zero-window counters: client {client:?}, target {target:?}");
    assert!(
        client[0] >= 50,
        "the client closed its window only {} times: {client:?}",
        client[0]
    );
}

// ---------------------------------------------------------------------------------------
// 4. Packet loss.

/// Drops 2% of the IPv4 frames the lab's bridge forwards that match `matcher` (an nftables
/// expression such as `oifname "target"`: towards the target; `iifname "client"`: the client's
/// egress). (netem would do, but this kernel has no sch_netem; nftables' `numgen random` is
/// built in.)
fn add_loss(lab: &Lab, matcher: &str) {
    add_drop_rule(
        lab,
        &format!("{matcher} ether type ip numgen random mod 100 < 2"),
    );
}

/// Drops the frames the lab's bridge forwards that match the nftables expression `rule`
/// (a `bridge` table in the bridge namespace; one rule per lab), counting them.
fn add_drop_rule(lab: &Lab, rule: &str) {
    let script = format!(
        "add table bridge loss\n\
         add chain bridge loss lossy {{ type filter hook forward priority 0; policy accept; }}\n\
         add rule bridge loss lossy {rule} counter drop\n"
    );
    let ns = lab.bridge_ns();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ip netns exec ... nft (install nftables: apt-get install nftables)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("write the nft script");
    let out = child.wait_with_output().expect("nft runs");
    assert!(
        out.status.success(),
        "nft in {ns} failed (is nftables installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Frames the [`add_loss`] rule dropped so far.
fn loss_drops(lab: &Lab) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.bridge_ns(),
            "nft",
            "list",
            "chain",
            "bridge",
            "loss",
            "lossy",
        ])
        .output()
        .expect("run nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in:\n{text}"))
}

/// The first frame of every `POST /hole/` request is dropped once on the client's egress (an
/// nftables rule drops every other such frame: the first transmission, not the client's
/// retransmission). The capture sees the rest of each request first and tcpcopy sends it; the
/// client's retransmission fills the hole later. Every body arrives whole.
#[test]
fn capture_holes_are_filled_by_client_retransmissions() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    // The same server online and at the target: the same answers, so no request is held
    // for the silence rule (a held request would let the client's retransmission come in
    // before anything was sent past the hole).
    let online = lab.labserver(Host::Online, 80).expect("online labserver");
    let target = lab.labserver(Host::Target, 8080).expect("target labserver");
    // "POST /hole/" at the start of the TCP payload.
    add_drop_rule(
        &lab,
        "iifname \"client\" ether type ip tcp dport 80 \
         @ih,0,88 0x504f5354202f686f6c652f numgen inc mod 2 0",
    );
    let mut replay = Replay::start(&lab, "80-10.77.0.30:8080", &[]);
    let report = load(
        &lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--connections",
            "1",
            "--requests",
            "30",
            "--post-bytes",
            "4000",
            "--path-prefix",
            "/hole/",
        ],
    );
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(30, Duration::from_secs(30)), 30);
    let seen = target.wait_count(30, Duration::from_secs(30));
    let settled = target.settle(Duration::from_secs(1), Duration::from_secs(10));
    let logs = replay.logs();
    let stats = replay.stop();
    let dropped = loss_drops(&lab);
    assert_eq!(dropped, 30, "first transmissions dropped\n{stats}");
    assert_eq!((seen, settled), (30, 30), "{stats}\n{logs}");
    let paths = |server: &lab::Labserver| -> Vec<String> {
        server.entries().iter().map(|e| e.path.clone()).collect()
    };
    assert_paths_once(&paths(&online), &paths(&target), &stats);
    for e in target.entries() {
        assert_eq!(
            (e.body_len, e.sha256.as_str()),
            (4000, report.body_sha256.as_str()),
            "{e:?}\n{stats}"
        );
    }
    // Each hole is filled once, unless the session was still waiting for the target's SYN-ACK
    // when the rest of its first request was captured (then nothing was sent past the hole).
    let fills = counter(&stats, "hole-fills");
    assert!((29..=30).contains(&fills), "hole-fills {fills}\n{stats}");
    assert_no_lost_sessions(&stats, &logs);
}

/// The mixed load of the loss tests: 300 one-request connections, 300 requests over 10
/// keep-alive connections and 40 POSTs of 256 KiB over 4 keep-alive connections. Returns the
/// POST body's SHA-256.
fn lossy_load(lab: &Lab) -> String {
    load(
        lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            "300",
            "--concurrency",
            "10",
            "--path-prefix",
            "/lc/",
        ],
    );
    load(
        lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--connections",
            "10",
            "--requests",
            "300",
            "--path-prefix",
            "/lk/",
        ],
    );
    load(
        lab,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--connections",
            "4",
            "--requests",
            "40",
            "--post-bytes",
            "262144",
            "--path-prefix",
            "/lp/",
        ],
    )
    .body_sha256
}

/// Runs [`lossy_load`] with a replay running and checks the target got every request once,
/// POST bodies whole. Returns tcpcopy's final statistics line.
fn replay_lossy_load(lab: &Lab, online: &lab::Nginx, target: &lab::Labserver) -> String {
    let mut replay = Replay::start(lab, "80-10.77.0.30:8080", &[]);
    let sha = lossy_load(lab);
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(640, Duration::from_secs(30)), 640);
    target.wait_count(640, Duration::from_secs(120));
    let seen = target.settle(Duration::from_secs(3), Duration::from_secs(60));
    let logs = replay.logs();
    let stats = replay.stop();
    let context = format!("target logged {seen}\n{stats}\n{logs}");
    let entries = target.entries();
    let paths: Vec<String> = entries.iter().map(|e| e.path.clone()).collect();
    assert_paths_once(&online.paths(), &paths, &context);
    for e in entries.iter().filter(|e| e.path.starts_with("/lp/")) {
        assert_eq!(
            (e.body_len, e.sha256.as_str()),
            (262_144, sha.as_str()),
            "{e:?}\n{context}"
        );
    }
    stats
}

/// 2% loss on the way from the bridge to the target (replayed segments, SYNs, fabricated ACKs
/// and FINs): tcpcopy's retransmissions still deliver every request once.
#[test]
fn loss_towards_the_target_is_retransmitted() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.labserver(Host::Target, 8080).expect("target labserver");
    // The target's veth peer in the bridge namespace is named after the host.
    add_loss(&lab, "oifname \"target\"");
    let stats = replay_lossy_load(&lab, &online, &target);
    let dropped = loss_drops(&lab);
    assert!(dropped > 0, "nothing was dropped: {stats}");
    assert!(
        counter(&stats, "retransmits") > 0,
        "no retransmissions with {dropped} packets lost: {stats}"
    );
    assert_no_lost_sessions(&stats, "");
}

/// 2% loss on the client's egress: the capture on the online host sees gaps which the client's
/// own retransmissions fill later; every request still reaches the target once.
#[test]
fn loss_on_the_client_side_is_filled_by_its_retransmissions() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.labserver(Host::Target, 8080).expect("target labserver");
    add_loss(&lab, "iifname \"client\"");
    let retrans_before = lab
        .net_counter(Host::Client, "Tcp", "RetransSegs")
        .expect("client RetransSegs");
    let stats = replay_lossy_load(&lab, &online, &target);
    let dropped = loss_drops(&lab);
    let retrans = lab
        .net_counter(Host::Client, "Tcp", "RetransSegs")
        .expect("client RetransSegs")
        - retrans_before;
    assert!(
        dropped > 0 && retrans > 0,
        "dropped {dropped}, client retransmitted {retrans}"
    );
    assert_no_lost_sessions(&stats, "");
    eprintln!("client-side loss: dropped {dropped}, client retransmitted {retrans}: {stats}");
}
