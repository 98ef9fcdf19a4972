//! `lab-rate`: the highest request rate at which tcpcopy still replicates every request exactly
//! once, and the CPU that tcpcopy and intercept use at each rate.
//!
//! Brings up the four-host lab, runs nginx on the online and target hosts, intercept and tcpcopy
//! (release builds), then for each rate sends a bounded load from the client (half new
//! connections, half keep-alive over 20 connections, distinct paths), waits for the target to
//! settle, and checks that every path arrived exactly once. CPU is read from /proc (user + system
//! time of each process over the run), as a percentage of one core.
//!
//! Run as root: `cargo build --release --workspace && target/release/lab-rate [RATE...]`
//! (`LAB_RATE_WORKERS=2` runs tcpcopy with two workers; `LAB_RATE_TCPCOPY_ARGS` adds flags,
//! e.g. its DPDK ports).

use anyhow::{bail, Context};
use lab::{Host, Lab};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc stat")?;
    let after = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn main() -> anyhow::Result<()> {
    if !lab::require_root() {
        bail!("lab-rate needs root (network namespaces)");
    }
    let rates: Vec<u64> = {
        let given: Vec<u64> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if given.is_empty() {
            vec![2000, 5000, 10000, 15000, 20000, 25000, 30000, 0]
        } else {
            given
        }
    };
    let bin = |name: &str| lab::workspace_bin(name);
    // tcpcopy worker threads (LAB_RATE_WORKERS, default 1).
    let workers = std::env::var("LAB_RATE_WORKERS").unwrap_or_else(|_| "1".into());
    let lab = Lab::up()?;
    let _online = lab.nginx(Host::Online, 80)?;
    let target = lab.nginx(Host::Target, 8080)?;
    let mut intercept = lab.spawn(
        Host::Assistant,
        bin("intercept"),
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
    // Extra tcpcopy flags (LAB_RATE_TCPCOPY_ARGS), e.g. its DPDK ports:
    // "--dpdk-vdev net_af_packet0,iface=eth0 --dpdk-rx net_af_packet0 --next-hop 02:77:00:00:00:1e"
    let extra = std::env::var("LAB_RATE_TCPCOPY_ARGS").unwrap_or_default();
    let mut args: Vec<&str> = vec![
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        "10.77.0.40",
        "--stats-interval",
        "0",
        "--workers",
        &workers,
    ];
    if !extra.contains("--dpdk-rx") {
        args.extend_from_slice(&["-i", "eth0"]);
    }
    args.extend(extra.split_whitespace());
    let mut tcpcopy = lab.spawn(Host::Online, bin("tcpcopy"), &args)?;
    tcpcopy.wait_for_log("connected to intercept", Duration::from_secs(10))?;
    let hz = 100.0; // USER_HZ on Linux
    println!(
        "{:>10} {:>10} {:>9} {:>9} {:>8} {:>13} {:>15}",
        "rate/s", "achieved/s", "requests", "at target", "exact", "tcpcopy CPU%", "intercept CPU%"
    );
    let mut best = None;
    for (round, rate) in rates.iter().enumerate() {
        // About five seconds of load: two halves (new connections, then keep-alive) one after
        // the other, each at the full rate; bounded to 50,000 requests per half.
        let per_half = if *rate == 0 {
            50_000
        } else {
            (rate * 5 / 2).clamp(1_000, 50_000)
        };
        let per_half_s = per_half.to_string();
        let rate_s = rate.to_string();
        let before = target.count();
        let t0 = Instant::now();
        let (c0, i0) = (cpu_ticks(tcpcopy.pid())?, cpu_ticks(intercept.pid())?);
        let mut ok = 0;
        for (mode, prefix) in [
            ("close", format!("/r{round}c/")),
            ("keepalive", format!("/r{round}k/")),
        ] {
            let mut args = vec![
                "--target",
                "10.77.0.20:80",
                "--mode",
                mode,
                "--requests",
                &per_half_s,
                "--path-prefix",
                &prefix,
                "--connections",
                "20",
                "--concurrency",
                "20",
                "--timeout-s",
                "120",
            ];
            if *rate > 0 {
                args.extend_from_slice(&["--rate", &rate_s]);
            }
            let report = lab.httpload(Host::Client, &args)?;
            ok += report.ok;
        }
        let load_time = t0.elapsed();
        let (c1, i1) = (cpu_ticks(tcpcopy.pid())?, cpu_ticks(intercept.pid())?);
        let busy = load_time.as_secs_f64();
        let total = per_half as usize * 2;
        let seen = target.settle(Duration::from_secs(2), Duration::from_secs(60)) - before;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for p in target.paths() {
            if p.starts_with(&format!("/r{round}")) {
                *counts.entry(p).or_default() += 1;
            }
        }
        let exact =
            counts.len() == total && counts.values().all(|n| *n == 1) && ok as usize == total;
        if exact {
            best = Some(*rate);
        }
        println!(
            "{:>10} {:>10.0} {:>9} {:>9} {:>8} {:>13.1} {:>15.1}",
            if *rate == 0 {
                "max".to_string()
            } else {
                rate.to_string()
            },
            ok as f64 / load_time.as_secs_f64(),
            total,
            seen,
            if exact { "yes" } else { "NO" },
            (c1 - c0) as f64 / hz / busy * 100.0,
            (i1 - i0) as f64 / hz / busy * 100.0,
        );
    }
    tcpcopy.stop();
    intercept.stop();
    match best {
        Some(0) => println!("every rate held, up to the load generator's maximum"),
        Some(rate) => println!("highest rate with every request replicated exactly once: {rate}/s"),
        None => println!("no rate replicated every request exactly once"),
    }
    if let Some(line) = tcpcopy.log().lines().rev().find(|l| l.contains("final:")) {
        println!("{line}");
    }
    Ok(())
}
