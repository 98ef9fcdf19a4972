//! `offline-rate`: the highest `-a` at which `tcpcopy --pcap` still replays at least 99.9% of
//! a recorded capture's requests.
//!
//! Records, with tcpdump on the online host, `OFFLINE_RATE_REQUESTS` (default 5,000)
//! one-connection-per-request GETs with distinct paths sent at `OFFLINE_RATE_RPS` (default
//! 1,000) per second to the online nginx. Then, for each acceleration (arguments; default 1 5
//! 10 20 50 100), brings up a fresh lab (so no TIME_WAIT entry of an earlier run is in the
//! way), runs nginx on the target, intercept on the assistant and `tcpcopy --pcap FILE -a N`
//! on the online host until it exits by itself, and counts the distinct recorded paths in the
//! target's access log. Prints one table line per run: the capture's span and the schedule
//! (span / a), how long releasing the file's packets took and the request rate that makes, what
//! reached the target, whether the schedule was kept, tcpcopy's CPU. tcpcopy never drops a
//! packet that is late: above its capacity the replay stretches instead ("on schedule: no").
//!
//! Run as root: `cargo build --profile ci -p pipelines -p bench --bins &&
//! target/ci/offline-rate [A...]`.

use anyhow::{bail, Context};
use lab::{Host, Lab};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The share of the recorded requests that must reach the target.
const TARGET_SHARE: f64 = 0.999;
/// A replay keeps its schedule when releasing the packets took at most this much of it (+10 ms).
const ON_SCHEDULE: f64 = 1.1;

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("bad {name}={v}: a whole number")),
        Err(_) => Ok(default),
    }
}

/// Records the capture; returns its copy outside the lab directory and the recorded paths.
fn record(requests: u64, rps: u64, out: &Path) -> anyhow::Result<(HashSet<String>, String)> {
    let lab = Lab::up()?;
    let online = lab.nginx(Host::Online, 80)?;
    let file = lab.dir().join("capture.pcap");
    let file_arg = file.to_str().context("utf-8 lab dir")?.to_string();
    let mut tcpdump = lab.spawn(
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
            "--immediate-mode",
            "-U",
            "-w",
            &file_arg,
            "tcp port 80",
        ],
    )?;
    tcpdump.wait_for_log("listening on", Duration::from_secs(10))?;
    lab::build_lab_bins()?;
    let t0 = Instant::now();
    let report = lab.httpload(
        Host::Client,
        &[
            "--target",
            "10.77.0.20:80",
            "--mode",
            "close",
            "--requests",
            &requests.to_string(),
            "--concurrency",
            "16",
            "--rate",
            &rps.to_string(),
            "--path-prefix",
            "/rate/",
            "--timeout-s",
            "300",
        ],
    )?;
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.signal(libc::SIGINT)?;
    tcpdump.wait_exit(Duration::from_secs(10))?;
    if !report.all_ok() {
        bail!("the load against the online server failed: {report:?}");
    }
    let paths: HashSet<String> = online.paths().into_iter().collect();
    let drops = tcpdump
        .log()
        .lines()
        .find(|l| l.contains("dropped by kernel"))
        .unwrap_or("")
        .trim()
        .to_string();
    std::fs::copy(&file, out).context("copy the capture out of the lab")?;
    let note = format!(
        "recorded {} requests in {:.2} s ({:.0}/s), {} bytes; tcpdump: {drops}",
        paths.len(),
        took.as_secs_f64(),
        paths.len() as f64 / took.as_secs_f64(),
        std::fs::metadata(out)?.len()
    );
    Ok((paths, note))
}

/// One replay of the capture at `-a acceleration` in a fresh lab.
struct Run {
    took_s: f64,
    span_s: f64,
    scheduled_s: f64,
    at_target: usize,
    duplicates: usize,
    cpu_percent: f64,
    summary: String,
}

fn replay(file: &Path, acceleration: f64, paths: &HashSet<String>) -> anyhow::Result<Run> {
    let lab = Lab::up()?;
    let target = lab.nginx(Host::Target, 8080)?;
    let mut intercept = lab.spawn(
        Host::Assistant,
        lab::workspace_bin("intercept"),
        &[
            "-i",
            "eth0",
            "-F",
            "tcp and src host 10.77.0.30",
            "--stats-interval",
            "0",
        ],
    )?;
    lab.wait_port(
        Host::Online,
        "10.77.0.40:36524".parse()?,
        Duration::from_secs(10),
    )?;
    let file_arg = file.to_str().context("utf-8 path")?.to_string();
    let a = acceleration.to_string();
    let mut tcpcopy = lab.spawn(
        Host::Online,
        lab::workspace_bin("tcpcopy"),
        &[
            "--pcap",
            &file_arg,
            "-a",
            &a,
            "-x",
            "80-10.77.0.30:8080",
            "-s",
            "10.77.0.40",
            "--stats-interval",
            "0",
            "--offline-tail-s",
            "5",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut ticks = 0;
    while tcpcopy.is_running() {
        if Instant::now() > deadline {
            tcpcopy.stop();
            bail!(
                "tcpcopy -a {acceleration} did not finish:\n{}",
                tcpcopy.log()
            );
        }
        if let Some(t) = cpu_ticks(tcpcopy.pid()) {
            ticks = t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = tcpcopy.log();
    let round = log
        .lines()
        .find(|l| l.contains("offline round 1/1 done"))
        .with_context(|| format!("tcpcopy printed no round line:\n{log}"))?;
    let number_after = |key: &str| -> anyhow::Result<f64> {
        round
            .split(key)
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no '{key}' in {round}"))
    };
    let took_s = number_after(" packets in ")?;
    let span_s = number_after("capture span ")?;
    let scheduled_s = number_after("scheduled ")?;
    target.settle(Duration::from_secs(2), Duration::from_secs(60));
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    for path in target.paths() {
        if paths.contains(&path) && !seen.insert(path) {
            duplicates += 1;
        }
    }
    intercept.stop();
    let summary = log
        .lines()
        .find(|l| l.contains("offline replay complete"))
        .unwrap_or("")
        .to_string();
    Ok(Run {
        took_s,
        span_s,
        scheduled_s,
        at_target: seen.len(),
        duplicates,
        // USER_HZ ticks over the process' life (startup and the idle tail add little) per
        // second of replay.
        cpu_percent: ticks as f64 / 100.0 / took_s.max(1e-3) * 100.0,
        summary,
    })
}

fn main() -> anyhow::Result<()> {
    if !lab::require_root() {
        bail!("offline-rate needs root (network namespaces)");
    }
    let accelerations: Vec<f64> = {
        let given: Vec<f64> = std::env::args()
            .skip(1)
            .map(|a| a.parse().with_context(|| format!("bad acceleration {a}")))
            .collect::<anyhow::Result<_>>()?;
        if given.is_empty() {
            vec![1.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        } else {
            given
        }
    };
    let requests = env_u64("OFFLINE_RATE_REQUESTS", 5_000)?;
    let rps = env_u64("OFFLINE_RATE_RPS", 1_000)?;
    let file: PathBuf =
        std::env::temp_dir().join(format!("offline-rate-{}.pcap", std::process::id()));
    let (paths, note) = record(requests, rps, &file)?;
    println!("{note}");
    println!(
        "{:>6} {:>9} {:>11} {:>8} {:>10} {:>10} {:>8} {:>5} {:>12} {:>14}",
        "-a",
        "capture s",
        "schedule s",
        "took s",
        "offered/s",
        "at target",
        "share",
        "dups",
        "on schedule",
        "tcpcopy CPU%"
    );
    let (mut best, mut best_on_time) = (None, None);
    for &a in &accelerations {
        let run = match replay(&file, a, &paths) {
            Ok(run) => run,
            Err(e) => {
                println!("{a:>6} failed: {e:#}");
                continue;
            }
        };
        let share = run.at_target as f64 / paths.len() as f64;
        let on_time = run.took_s <= run.scheduled_s * ON_SCHEDULE + 0.01;
        let rate = paths.len() as f64 / run.took_s.max(1e-6);
        println!(
            "{a:>6} {:>9.3} {:>11.3} {:>8.3} {rate:>10.0} {:>10} {:>7.2}% {:>5} {:>12} {:>14.0}",
            run.span_s,
            run.scheduled_s,
            run.took_s,
            run.at_target,
            share * 100.0,
            run.duplicates,
            if on_time { "yes" } else { "no" },
            run.cpu_percent,
        );
        if std::env::var_os("OFFLINE_RATE_VERBOSE").is_some() {
            println!("       {}", run.summary);
        }
        if share >= TARGET_SHARE {
            if best.is_none_or(|(b, _)| a > b) {
                best = Some((a, rate));
            }
            if on_time && best_on_time.is_none_or(|(b, _)| a > b) {
                best_on_time = Some((a, rate));
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    let percent = TARGET_SHARE * 100.0;
    match best {
        Some((a, rate)) => println!(
            "highest -a replaying >= {percent:.1}% of the requests: {a} ({rate:.0} requests/s)"
        ),
        None => println!("no -a replayed >= {percent:.1}% of the requests"),
    }
    match best_on_time {
        Some((a, rate)) => println!(
            "highest -a replaying >= {percent:.1}% on schedule (within {:.0}% of it): {a} \
             ({rate:.0} requests/s)",
            (ON_SCHEDULE - 1.0) * 100.0
        ),
        None => println!("no -a replayed >= {percent:.1}% on schedule"),
    }
    Ok(())
}
