//! Metrics exposition in the lab: tcpcopy with `--metrics-file x.json --metrics-listen
//! 127.0.0.1:9114` and intercept with `--metrics-file x.prom` replay 200 one-request sessions;
//! the served Prometheus page, the served JSON and the file written at exit all count 200
//! sessions, and intercept's file is valid Prometheus text.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.

use lab::{Host, Lab};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod common;
use common::{INTERCEPT, TCPCOPY};
const REQUESTS: u64 = 200;
const LISTEN: &str = "127.0.0.1:9114";

/// `GET path` on `LISTEN` from inside the online namespace: (status line, body).
fn http_get(lab: &Lab, path: &str) -> (String, String) {
    let path = path.to_string();
    lab.in_ns(Host::Online, move || {
        let mut s = TcpStream::connect(LISTEN).expect("connect to --metrics-listen");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read the answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    })
    .expect("enter the online namespace")
}

/// Sample lines of Prometheus text -> value (comments must be HELP or TYPE).
fn prometheus_samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    out
}

#[test]
fn metrics_file_and_endpoint_count_the_replayed_requests() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let intercept_file = lab.dir().join("intercept.prom");
    let tcpcopy_file = lab.dir().join("tcpcopy.json");
    let intercept_file_arg = intercept_file.to_string_lossy().into_owned();
    let tcpcopy_file_arg = tcpcopy_file.to_string_lossy().into_owned();
    let mut intercept = lab
        .spawn(
            Host::Assistant,
            INTERCEPT,
            &[
                "-i",
                "eth0",
                "-F",
                "tcp and src host 10.77.0.30",
                "--stats-interval",
                "1",
                "--metrics-file",
                &intercept_file_arg,
            ],
        )
        .expect("start intercept");
    intercept
        .wait_for_log("starting", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("intercept did not start: {e:#}\n{}", intercept.log()));
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
                "--metrics-file",
                &tcpcopy_file_arg,
                "--metrics-listen",
                LISTEN,
            ],
        )
        .expect("start tcpcopy");
    tcpcopy
        .wait_for_log("connected to intercept", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("tcpcopy did not connect: {e:#}\n{}", tcpcopy.log()));

    let requests = REQUESTS.to_string();
    let report = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "close",
                "--requests",
                &requests,
                "--concurrency",
                "5",
                "--path-prefix",
                "/m/",
            ],
        )
        .expect("httpload");
    assert!(report.all_ok(), "{report:?}");
    let seen = target.wait_count(REQUESTS as usize, Duration::from_secs(60));
    assert_eq!(seen as u64, REQUESTS, "target requests\n{}", tcpcopy.log());

    // The served page follows the run (refreshed every second): wait until the counters
    // settle at the number of sessions, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let (status, body) = http_get(&lab, "/metrics");
        let samples = (status.contains("200")).then(|| prometheus_samples(&body));
        let settled = samples.as_ref().is_some_and(|s| {
            s.get("tcpcopy_sessions_created_total{worker=\"all\"}") == Some(&(REQUESTS as f64))
                && s.get("tcpcopy_sessions_established_total{worker=\"all\"}")
                    == Some(&(REQUESTS as f64))
        });
        if settled || Instant::now() >= deadline {
            break samples.unwrap_or_else(|| panic!("GET /metrics: {status}\n{body}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        samples["tcpcopy_sessions_created_total{worker=\"all\"}"],
        REQUESTS as f64,
        "{samples:?}\n{}",
        tcpcopy.log()
    );
    assert_eq!(
        samples["tcpcopy_sessions_created_total{worker=\"0\"}"],
        REQUESTS as f64
    );
    assert_eq!(
        samples["tcpcopy_sessions_established_total{worker=\"all\"}"],
        REQUESTS as f64
    );
    assert_eq!(samples["tcpcopy_control_connections_up"], 2.0);
    assert!(samples["tcpcopy_reply_latency_seconds_count{worker=\"all\"}"] >= REQUESTS as f64);

    let (status, body) = http_get(&lab, "/stats.json");
    assert!(status.contains("200"), "{status}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/stats.json parses");
    assert_eq!(v["sessions"]["created"], REQUESTS);
    assert_eq!(v["workers"][0]["sessions"]["created"], REQUESTS);

    // The file written at the intervals parses; the one written at exit has the final counts.
    let during: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tcpcopy_file).expect("metrics file"))
            .expect("metrics file parses");
    assert_eq!(during["tool"], "tcpcopy");
    tcpcopy.stop();
    let log = tcpcopy.log();
    let end: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tcpcopy_file).expect("metrics file"))
            .expect("final metrics file parses");
    assert_eq!(end["sessions"]["created"], REQUESTS, "{log}");
    assert_eq!(end["sessions"]["established"], REQUESTS, "{log}");
    assert!(
        end["ingress"]["accepted_data"].as_u64().unwrap() >= REQUESTS,
        "{end}"
    );
    assert!(!lab.dir().join("tcpcopy.json.tmp").exists());

    intercept.stop();
    let text = std::fs::read_to_string(&intercept_file).expect("intercept metrics file");
    let samples = prometheus_samples(&text);
    assert!(
        samples["intercept_routed_total"] >= REQUESTS as f64,
        "{text}"
    );
    assert!(
        samples["intercept_client_add_total"] >= REQUESTS as f64,
        "{text}"
    );
}
