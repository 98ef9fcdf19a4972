//! What the lab tests share: starting intercept on the assistant and tcpcopy on the online
//! host, and reading tcpcopy's statistics lines. Each test file uses part of it.
#![allow(dead_code)]

use lab::{Host, Lab, Proc};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

/// The tcpcopy binary of this build.
pub const TCPCOPY: &str = env!("CARGO_BIN_EXE_tcpcopy");
/// The intercept binary of this build.
pub const INTERCEPT: &str = env!("CARGO_BIN_EXE_intercept");

/// Starts intercept on the assistant (capturing the target's replies on eth0) with `extra`
/// flags and waits until it listens for tcpcopy.
pub fn start_intercept(lab: &Lab, extra: &[&str]) -> Proc {
    let mut args = vec!["-i", "eth0", "-F", "tcp and src host 10.77.0.30"];
    args.extend_from_slice(extra);
    let mut intercept = lab
        .spawn(Host::Assistant, INTERCEPT, &args)
        .expect("start intercept");
    intercept
        .wait_for_log("starting", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("intercept did not start: {e:#}\n{}", intercept.log()));
    lab.wait_port(
        Host::Online,
        "10.77.0.40:36524".parse().unwrap(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("intercept is not listening: {e:#}\n{}", intercept.log()));
    intercept
}

/// Starts tcpcopy on the online host (`-x 80-10.77.0.30:8080 -s 10.77.0.40`, a statistics
/// line a second) with `extra` flags and waits until it is connected to intercept.
pub fn start_tcpcopy(lab: &Lab, extra: &[&str]) -> Proc {
    start_tcpcopy_to(lab, "80-10.77.0.30:8080", extra)
}

/// [`start_tcpcopy`] with another `-x` transfer.
pub fn start_tcpcopy_to(lab: &Lab, transfer: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "-i",
        "eth0",
        "-x",
        transfer,
        "-s",
        "10.77.0.40",
        "--stats-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    start_tcpcopy_with(lab, Host::Online, &args)
}

/// Starts tcpcopy in `host` with exactly `args` (no `-i` added) and waits until it is
/// connected to intercept.
pub fn start_tcpcopy_with(lab: &Lab, host: Host, args: &[&str]) -> Proc {
    let mut tcpcopy = lab.spawn(host, TCPCOPY, args).expect("start tcpcopy");
    tcpcopy
        .wait_for_log("connected to intercept", Duration::from_secs(10))
        .unwrap_or_else(|e| {
            panic!(
                "tcpcopy {args:?} on {} did not connect: {e:#}\n{}",
                host.name(),
                tcpcopy.log()
            )
        });
    tcpcopy
}

/// The replay path: intercept on the assistant, tcpcopy on the online host.
pub struct Replay {
    /// intercept.
    pub intercept: Proc,
    /// tcpcopy.
    pub tcpcopy: Proc,
}

impl Replay {
    /// Starts intercept (a statistics line a second), then tcpcopy with `extra` flags.
    pub fn start(lab: &Lab, extra: &[&str]) -> Replay {
        let intercept = start_intercept(lab, &["--stats-interval", "1"]);
        let tcpcopy = start_tcpcopy(lab, extra);
        Replay { intercept, tcpcopy }
    }

    /// Stops both (SIGTERM) and returns tcpcopy's final statistics line.
    pub fn stop(mut self) -> String {
        let line = final_line(&mut self.tcpcopy);
        self.intercept.stop();
        line
    }

    /// Both logs, for a failure message.
    pub fn logs(&self) -> String {
        format!(
            "--- tcpcopy ---\n{}\n--- intercept ---\n{}",
            self.tcpcopy.log(),
            self.intercept.log()
        )
    }
}

/// Stops tcpcopy (SIGTERM) and returns its final statistics line.
pub fn final_line(tcpcopy: &mut Proc) -> String {
    tcpcopy.stop();
    let log = tcpcopy.log();
    log.lines()
        .rev()
        .find(|l| l.contains("final:"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("tcpcopy printed no final statistics:\n{log}"))
}

/// The value after `name ` in a statistics line.
pub fn counter(line: &str, name: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| {
            w[1].trim_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no counter '{name}' in: {line}"))
}

/// `greetserver` running in a lab host; the request log is `log`.
pub struct Greetserver {
    _proc: Proc,
    log: PathBuf,
}

impl Greetserver {
    /// Starts it with greetings of `greet_bytes` bytes, `payload_bytes`-byte answers and
    /// `extra` flags.
    pub fn start(
        lab: &Lab,
        host: Host,
        port: u16,
        greet_bytes: usize,
        payload_bytes: usize,
        extra: &[&str],
    ) -> Greetserver {
        lab::build_lab_bins().expect("build lab's binaries");
        let addr = SocketAddrV4::new(host.addr(), port);
        let log = lab
            .dir()
            .join(format!("greetserver-{}-{port}.log", host.name()));
        let (listen, log_arg, payload, greet) = (
            addr.to_string(),
            log.to_string_lossy().into_owned(),
            payload_bytes.to_string(),
            greet_bytes.to_string(),
        );
        let mut args = vec![
            "--listen",
            &listen,
            "--log",
            &log_arg,
            "--payload-bytes",
            &payload,
            "--greet-bytes",
            &greet,
        ];
        args.extend_from_slice(extra);
        let mut proc = lab
            .spawn(host, lab::workspace_bin("greetserver"), &args)
            .expect("start greetserver");
        if let Err(e) = lab.wait_port(host, addr, lab::START_TIMEOUT) {
            panic!("greetserver did not listen: {e:#}\n{}", proc.log());
        }
        assert!(proc.is_running(), "{}", proc.log());
        Greetserver { _proc: proc, log }
    }

    /// (peer, id) of every logged request, in log order.
    pub fn entries(&self) -> Vec<(SocketAddrV4, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (peer, id) = l.split_once(' ')?;
                Some((peer.parse().ok()?, id.to_string()))
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.entries().len()
    }

    /// Waits (bounded by `max`) until the log holds `want` entries; returns the count.
    pub fn wait_count(&self, want: usize, max: Duration) -> usize {
        let deadline = std::time::Instant::now() + max;
        loop {
            let n = self.count();
            if n >= want || std::time::Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits like [`Greetserver::wait_count`], then a little longer for stragglers.
    pub fn settle_count(&self, want: usize, max: Duration) -> usize {
        self.wait_count(want, max);
        std::thread::sleep(Duration::from_millis(500));
        self.count()
    }
}
