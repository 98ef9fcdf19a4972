//! httpload against labserver (and small scripted servers) on loopback; needs no root.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use lab::http::{body_bytes, load_path, sha256_hex};
use lab::{LabserverEntry, LoadReport};

const HTTPLOAD: &str = env!("CARGO_BIN_EXE_httpload");
const LABSERVER: &str = env!("CARGO_BIN_EXE_labserver");

struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn start(tag: &str, extra: &[&str]) -> Server {
        let log =
            std::env::temp_dir().join(format!("labserver-test-{}-{tag}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut child = Command::new(LABSERVER)
            .args(["--listen", "127.0.0.1:0", "--log"])
            .arg(&log)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
        Server { child, port, log }
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn entries(&self) -> Vec<LabserverEntry> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| LabserverEntry::parse(l).unwrap_or_else(|| panic!("bad log line {l:?}")))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn httpload(args: &[&str]) -> (Output, LoadReport) {
    let out = Command::new(HTTPLOAD)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: LoadReport = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout:?} {}", String::from_utf8_lossy(&out.stderr)));
    (out, report)
}

#[test]
fn keepalive_and_close_runs_reach_every_path() {
    let s = Server::start("modes", &[]);
    let t = s.target();
    let (out, r) = httpload(&[
        "--target",
        &t,
        "--requests",
        "300",
        "--mode",
        "keepalive",
        "--connections",
        "7",
        "--tag",
        "ka",
    ]);
    assert!(out.status.success(), "{r:?}");
    assert_eq!((r.ok, r.failed, r.connections_opened), (300, 0, 7));
    assert_eq!(r.status.get("200"), Some(&300));
    let (out, r) = httpload(&[
        "--target",
        &t,
        "--requests",
        "200",
        "--mode",
        "close",
        "--concurrency",
        "5",
        "--tag",
        "cl",
    ]);
    assert!(out.status.success(), "{r:?}");
    assert_eq!((r.ok, r.connections_opened), (200, 200));

    let entries = s.entries();
    assert_eq!(entries.len(), 500);
    let paths: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for i in 0..300 {
        assert!(paths.contains(load_path("/p/", Some("ka"), i).as_str()));
    }
    for i in 0..200 {
        assert!(paths.contains(load_path("/p/", Some("cl"), i).as_str()));
    }
    let ka_ports: HashSet<u16> = entries
        .iter()
        .filter(|e| e.path.contains("/ka-"))
        .map(|e| e.peer.port())
        .collect();
    let cl_ports: HashSet<u16> = entries
        .iter()
        .filter(|e| e.path.contains("/cl-"))
        .map(|e| e.peer.port())
        .collect();
    assert_eq!((ka_ports.len(), cl_ports.len()), (7, 200));
    assert!(entries.iter().all(|e| e.method == "GET" && e.body_len == 0));
}

#[test]
fn post_bodies_arrive_intact_with_length_and_chunked() {
    let s = Server::start("post", &[]);
    let t = s.target();
    let body = body_bytes(300_000, 9);
    let (out, r) = httpload(&[
        "--target",
        &t,
        "--requests",
        "4",
        "--post-bytes",
        "300000",
        "--seed",
        "9",
        "--mode",
        "keepalive",
        "--connections",
        "2",
        "--tag",
        "len",
    ]);
    assert!(out.status.success(), "{r:?}");
    assert_eq!(
        (r.body_len, r.body_sha256.as_str()),
        (300_000, sha256_hex(&body).as_str())
    );
    let (out, r) = httpload(&[
        "--target",
        &t,
        "--requests",
        "3",
        "--post-bytes",
        "300000",
        "--seed",
        "9",
        "--chunked",
        "--chunk-bytes",
        "1000",
        "--tag",
        "chk",
    ]);
    assert!(out.status.success(), "{r:?}");
    let entries = s.entries();
    assert_eq!(entries.len(), 7);
    for e in &entries {
        assert_eq!(
            (e.method.as_str(), e.body_len, e.sha256.as_str()),
            ("POST", 300_000, r.body_sha256.as_str())
        );
    }
}

#[test]
fn large_responses_are_read_completely() {
    let s = Server::start("big", &["--response-bytes", "2000000"]);
    let (out, r) = httpload(&[
        "--target",
        &s.target(),
        "--requests",
        "6",
        "--mode",
        "keepalive",
        "--connections",
        "2",
    ]);
    assert!(out.status.success(), "{r:?}");
    assert_eq!(r.body_bytes_received, 12_000_000);
}

#[test]
fn failures_are_counted_and_bounded() {
    // Nothing listens: refused, exit 1.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, r) = httpload(&["--target", &format!("127.0.0.1:{port}"), "--requests", "5"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!((r.ok, r.failed), (0, 5));
    assert_eq!(r.errors.get("connect_refused"), Some(&5));

    // A server that accepts and never answers: read timeouts, then the run deadline.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (out, r) = httpload(&[
        "--target",
        &addr,
        "--requests",
        "50",
        "--concurrency",
        "1",
        "--io-timeout-s",
        "0.3",
        "--timeout-s",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r.ok, 0);
    assert!(
        r.errors.get("read_timeout").copied().unwrap_or(0) >= 1,
        "{r:?}"
    );
    assert!(r.not_started > 0, "{r:?}");
    assert_eq!(r.errors.get("not_started"), Some(&r.not_started));

    // Non-2xx answers count as failures.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf).unwrap();
        c.write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
            .unwrap();
    });
    let (out, r) = httpload(&["--target", &addr, "--requests", "1"]);
    h.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r.status.get("503"), Some(&1));
}

#[test]
fn keepalive_retries_when_the_server_closes_between_requests() {
    // Answers one request per connection, claims keep-alive, then closes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        for _ in 0..5 {
            let (c, _) = l.accept().unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 && !line.ends_with("\r\n\r\n") {}
            (&c).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (out, r) = httpload(&[
        "--target",
        &addr,
        "--requests",
        "5",
        "--mode",
        "keepalive",
        "--connections",
        "1",
    ]);
    h.join().unwrap();
    assert!(out.status.success(), "{r:?}");
    assert_eq!((r.ok, r.retries, r.connections_opened), (5, 4, 5));
}

#[test]
fn rate_limit_spreads_requests() {
    let s = Server::start("rate", &[]);
    let (out, r) = httpload(&[
        "--target",
        &s.target(),
        "--requests",
        "20",
        "--rate",
        "100",
        "--concurrency",
        "4",
    ]);
    assert!(out.status.success(), "{r:?}");
    // 20 requests at 100/s: the last one is scheduled 190 ms after the start.
    assert!(r.elapsed_ms >= 190, "{r:?}");
}
