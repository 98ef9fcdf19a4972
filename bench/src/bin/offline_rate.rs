//! `offline-rate`: the highest `-a` at which `tcpcopy --pcap` still replays at least 99.9% of
//! a recorded capture's requests.
//!
//! Records, with tcpdump on the online host, `OFFLINE_RATE_REQUESTS` (default 5,000)
//! one-connection-per-request GETs with distinct paths sent at `OFFLINE_RATE_RPS` (default
//! 1,000) per second to the online nginx. Then, for each acceleration (arguments; default 1 5
//! 10 20 50 100), brings up a fresh lab (so no TIME_WAIT entry of an earlier run is in the
//! way), runs nginx on the target, intercept on the assistant and `tcpcopy --pcap FILE -a N`
//! on the online host until it exits by itself, and counts the distinct recorded paths in the
//! target's access log. Prints one table line per run: the schedule (capture span / a), how long
//! reading the file took, the offered request rate, what reached the target, tcpcopy's CPU.
//!
//! Run as root: `cargo build --profile ci -p pipelines -p bench --bins &&
//! target/ci/offline-rate [A...]`.

use anyhow::{bail, Context};
use lab::{Host, Lab};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TARGET_SHARE: f64 = 0.999;

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
    let started = Instant::now();
    let mut ran_for = Duration::ZERO;
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
            ran_for = started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = tcpcopy.log();
    let round = log
        .lines()
        .find(|l| l.contains("offline round 1/1 done"))
        .with_context(|| format!("tcpcopy printed no round line:\n{log}"))?;
    let took_s: f64 = round
        .split(" packets in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no span in {round}"))?;
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
        at_target: seen.len(),
        duplicates,
        cpu_percent: ticks as f64 / 100.0 / ran_for.as_secs_f64().max(1e-3) * 100.0,
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
    let span = requests as f64 / rps as f64;
    println!(
        "{:>7} {:>11} {:>8} {:>12} {:>10} {:>8} {:>6} {:>13}",
        "-a", "schedule s", "took s", "offered/s", "at target", "share", "dups", "tcpcopy CPU%"
    );
    let mut best = None;
    for &a in &accelerations {
        let run = match replay(&file, a, &paths) {
            Ok(run) => run,
            Err(e) => {
                println!("{a:>7} failed: {e:#}");
                continue;
            }
        };
        let share = run.at_target as f64 / paths.len() as f64;
        println!(
            "{a:>7} {:>11.3} {:>8.3} {:>12.0} {:>10} {:>7.2}% {:>6} {:>13.0}",
            span / a,
            run.took_s,
            paths.len() as f64 / run.took_s.max(1e-6),
            run.at_target,
            share * 100.0,
            run.duplicates,
            run.cpu_percent,
        );
        if std::env::var_os("OFFLINE_RATE_VERBOSE").is_some() {
            println!("        {}", run.summary);
        }
        if share >= TARGET_SHARE {
            best = Some(best.map_or(a, |b: f64| b.max(a)));
        }
    }
    let _ = std::fs::remove_file(&file);
    match best {
        Some(a) => println!(
            "highest -a replaying >= {:.1}% of the requests: {a} ({:.0} requests/s offered)",
            TARGET_SHARE * 100.0,
            paths.len() as f64 / (span / a)
        ),
        None => println!(
            "no -a replayed >= {:.1}% of the requests",
            TARGET_SHARE * 100.0
        ),
    }
    Ok(())
}
