//! `tcpcopy-doctor` in the lab: on a correct setup with intercept running it reports no FAIL
//! on any host (and sees live requests on the online host); then each piece is broken in turn
//! (the target's route to the client via the assistant, the assistant's ip_forward, intercept
//! itself) and the FAIL line names it; each is restored before the next.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.

use lab::{Host, Lab};
use std::time::{Duration, Instant};

const DOCTOR: &str = env!("CARGO_BIN_EXE_tcpcopy-doctor");
mod common;
use common::start_intercept;

const ONLINE: &[&str] = &[
    "online",
    "-i",
    "eth0",
    "-x",
    "80-10.77.0.30:8080",
    "-s",
    "10.77.0.40",
    "--listen-s",
    "0",
    "--connect-timeout-ms",
    "1000",
];
const TARGET: &[&str] = &[
    "target",
    "--clients",
    "10.77.0.10,10.9.9.0/24",
    "--assistant",
    "10.77.0.40",
    "--port",
    "8080",
];
const ASSISTANT: &[&str] = &[
    "assistant",
    "-i",
    "eth0",
    "-F",
    "tcp and src host 10.77.0.30",
    "--port",
    "36524",
];

/// The doctor's exit code and its report (stdout).
struct Report {
    code: i32,
    out: String,
}

impl Report {
    fn fails(&self) -> Vec<&str> {
        self.out.lines().filter(|l| l.starts_with("FAIL")).collect()
    }

    fn assert_healthy(&self, host: &str) {
        assert!(
            self.code == 0 && self.fails().is_empty(),
            "{host}: expected no FAIL (exit {}):\n{}",
            self.code,
            self.out
        );
        assert!(
            self.out
                .lines()
                .all(|l| l.starts_with("OK") || l.starts_with("WARN") || l.starts_with("FAIL")),
            "{host}: every line is a verdict:\n{}",
            self.out
        );
    }

    /// Asserts exit 1 and a FAIL line containing every word; returns that line.
    fn assert_fail(&self, host: &str, words: &[&str]) -> String {
        assert_eq!(self.code, 1, "{host}: expected exit 1:\n{}", self.out);
        self.fails()
            .into_iter()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .unwrap_or_else(|| panic!("{host}: no FAIL line with {words:?}:\n{}", self.out))
            .to_string()
    }
}

fn doctor(lab: &Lab, host: Host, args: &[&str]) -> Report {
    let out = lab.run(host, DOCTOR, args).expect("run tcpcopy-doctor");
    Report {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn sh(lab: &Lab, host: Host, program: &str, args: &[&str]) {
    let out = lab.run(host, program, args).expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        host.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn doctor_passes_a_good_setup_and_names_each_broken_piece() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let _target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept = start_intercept(&lab, &[]);

    // A correct setup: no FAIL anywhere.
    let online = doctor(&lab, Host::Online, ONLINE);
    online.assert_healthy("online");
    eprintln!("--- online ---\n{}", online.out);
    for needle in [
        "OK   interface eth0 (-i): exists and is up",
        "OK   capture permission",
        "compiles",
        "OK   receive offloads of eth0: GRO/LRO off",
        "OK   route to the target 10.77.0.30: on-link, dev eth0",
        "OK   intercept 10.77.0.40:36524: accepts connections",
    ] {
        assert!(
            online.out.contains(needle),
            "online: no '{needle}':\n{}",
            online.out
        );
    }
    let target = doctor(&lab, Host::Target, TARGET);
    target.assert_healthy("target");
    for needle in [
        "OK   route to client 10.77.0.10: via the assistant 10.77.0.40",
        "OK   route to clients 10.9.9.0/24 (sample 10.9.9.1): via the assistant 10.77.0.40",
        "OK   rp_filter on eth0: 0 (off)",
        "OK   service port 8080: listening",
    ] {
        assert!(
            target.out.contains(needle),
            "target: no '{needle}':\n{}",
            target.out
        );
    }
    let assistant = doctor(&lab, Host::Assistant, ASSISTANT);
    assistant.assert_healthy("assistant");
    for needle in [
        "OK   net.ipv4.ip_forward = 0",
        "OK   intercept port 36524: listening (TCP)",
        "OK   rp_filter on eth0",
    ] {
        assert!(
            assistant.out.contains(needle),
            "assistant: no '{needle}':\n{}",
            assistant.out
        );
    }

    // The live capture sees the clients' requests while they flow.
    live_capture_sees_requests(&lab);

    // 1. The target's route to the client via the assistant is gone.
    sh(
        &lab,
        Host::Target,
        "ip",
        &["route", "del", "10.77.0.10/32", "via", "10.77.0.40"],
    );
    let broken = doctor(&lab, Host::Target, TARGET);
    let line = broken.assert_fail(
        "target",
        &["route to client 10.77.0.10", "not via the assistant"],
    );
    assert!(
        line.contains("fix: ip route replace 10.77.0.10/32 via 10.77.0.40"),
        "{line}"
    );
    assert_eq!(
        broken.fails().len(),
        1,
        "only the route fails:\n{}",
        broken.out
    );
    sh(
        &lab,
        Host::Target,
        "ip",
        &[
            "route",
            "add",
            "10.77.0.10/32",
            "via",
            "10.77.0.40",
            "dev",
            "eth0",
        ],
    );
    doctor(&lab, Host::Target, TARGET).assert_healthy("target (route restored)");

    // 2. The assistant forwards.
    sh(
        &lab,
        Host::Assistant,
        "sysctl",
        &["-qw", "net.ipv4.ip_forward=1"],
    );
    let broken = doctor(&lab, Host::Assistant, ASSISTANT);
    let line = broken.assert_fail("assistant", &["net.ipv4.ip_forward = 1"]);
    assert!(
        line.contains("fix: sysctl -w net.ipv4.ip_forward=0"),
        "{line}"
    );
    sh(
        &lab,
        Host::Assistant,
        "sysctl",
        &["-qw", "net.ipv4.ip_forward=0"],
    );
    doctor(&lab, Host::Assistant, ASSISTANT).assert_healthy("assistant (ip_forward restored)");

    // 3. intercept is stopped: the online host cannot reach it, the assistant sees no listener.
    intercept.stop();
    let broken = doctor(&lab, Host::Online, ONLINE);
    let line = broken.assert_fail("online", &["intercept 10.77.0.40:36524", "unreachable"]);
    assert!(
        line.contains("connection refused") && line.contains("start intercept"),
        "{line}"
    );
    let broken = doctor(&lab, Host::Assistant, ASSISTANT);
    broken.assert_fail("assistant", &["intercept port 36524", "nothing listens"]);
    let _intercept = start_intercept(&lab, &[]);
    doctor(&lab, Host::Online, ONLINE).assert_healthy("online (intercept restarted)");
}

/// Runs the online doctor with a 2 s capture while a client sends requests; its live-capture
/// line counts them.
fn live_capture_sees_requests(lab: &Lab) {
    let mut args: Vec<&str> = ONLINE.to_vec();
    let listen = args.iter().position(|a| *a == "--listen-s").unwrap();
    args[listen + 1] = "2";
    let load = || {
        let report = lab
            .httpload(
                Host::Client,
                &[
                    "--target",
                    "10.77.0.20:80",
                    "--mode",
                    "close",
                    "--requests",
                    "20",
                ],
            )
            .expect("httpload");
        assert!(report.all_ok(), "{report:?}");
    };
    // Once before: builds the load generator (first use) and warms ARP.
    load();
    let mut proc = lab
        .spawn(Host::Online, DOCTOR, &args)
        .expect("spawn doctor");
    proc.wait_for_log("capturing", Duration::from_secs(10))
        .expect("doctor starts capturing");
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.is_running() && Instant::now() < deadline {
        load();
    }
    let status = proc
        .wait_exit(Duration::from_secs(30))
        .expect("doctor exits");
    let out = proc.stdout();
    assert_eq!(status.code(), Some(0), "{}", proc.log());
    let line = out
        .lines()
        .find(|l| l.contains("incoming frames on eth0"))
        .unwrap_or_else(|| panic!("no live-capture line:\n{out}"));
    eprintln!("live capture: {line}");
    assert!(line.starts_with("OK"), "{line}");
    let matched: u64 = line
        .split("matched ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    // At least one request's SYN and data were seen.
    assert!(matched >= 2, "{line}");
}
