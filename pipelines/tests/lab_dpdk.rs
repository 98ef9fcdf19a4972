//! tcpcopy and intercept on DPDK virtual devices (net_af_packet over the lab's veths): the
//! 2,000-request run of the first issue, and the start-up failures that must name their fix.
//! Needs root, hugepages (`scripts/hugepages.sh reserve 512`, as `scripts/test.sh` does) and
//! a build with `--features dpdk`.
#![cfg(feature = "dpdk")]

use lab::{Host, Lab, Proc};
use std::collections::BTreeMap;
use std::time::Duration;

mod common;
use common::{counter, INTERCEPT, TCPCOPY};

fn dpdk_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "--dpdk-vdev",
        "net_af_packet0,iface=eth0",
        "--dpdk-rx",
        "net_af_packet0",
    ];
    args.extend_from_slice(extra);
    args
}

fn wait_log(proc: &mut Proc, needle: &str) {
    proc.wait_for_log(needle, Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "{} did not log {needle:?}: {e:#}\n{}",
                proc.name(),
                proc.log()
            )
        });
}

#[test]
fn replicates_2000_requests_on_dpdk_vdevs() {
    if !lab::require_root() {
        return;
    }
    replicate_on_vdevs(&[]);
}

/// Issue 4 on DPDK: two workers, each with its own queue pair of the vdev (the PMD spreads the
/// flows with a kernel fanout hash, which no reply can reproduce): every path once, both
/// workers took part, and every reply reached the worker that owns its session (learned from
/// the worker's CLIENT_ADD).
#[test]
fn replicates_2000_requests_on_two_dpdk_workers() {
    if !lab::require_root() {
        return;
    }
    let log = replicate_on_vdevs(&["--workers", "2"]);
    let workers: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker ") && l.contains("replies-dispatched"))
        .collect();
    assert!(workers.len() >= 2, "no per-worker lines:\n{log}");
    let mut created_total = 0;
    for (i, line) in workers.iter().rev().take(2).enumerate() {
        let created = counter(line, "sessions-created");
        let handled = counter(line, "replies");
        let unmatched = counter(line, "replies-unmatched");
        assert!(
            created > 200,
            "worker {i} created only {created} sessions: {line}"
        );
        assert!(
            handled > 1000,
            "worker {i} handled only {handled} replies: {line}"
        );
        assert_eq!(
            unmatched, 0,
            "worker {i} got replies it does not own: {line}"
        );
        created_total += created;
    }
    assert!(created_total >= 1020, "{log}");
}

/// The 2,000-request run on net_af_packet vdevs with extra tcpcopy flags; returns tcpcopy's
/// log (its final report last).
fn replicate_on_vdevs(extra: &[&'static str]) -> String {
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept_args =
        dpdk_args(&["-F", "tcp and src host 10.77.0.30", "--stats-interval", "1"]);
    intercept_args.retain(|_| true);
    let mut intercept = lab
        .spawn(Host::Assistant, INTERCEPT, &intercept_args)
        .expect("intercept");
    wait_log(&mut intercept, "starting");
    lab.wait_port(
        Host::Online,
        "10.77.0.40:36524".parse().unwrap(),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("intercept not listening: {e:#}\n{}", intercept.log()));
    let mut tcpcopy_args = dpdk_args(&[
        "--next-hop",
        "02:77:00:00:00:1e",
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        "10.77.0.40",
        "--stats-interval",
        "1",
    ]);
    tcpcopy_args.extend_from_slice(extra);
    let mut tcpcopy = lab
        .spawn(Host::Online, TCPCOPY, &tcpcopy_args)
        .expect("tcpcopy");
    wait_log(&mut tcpcopy, "connected to intercept");
    for (mode, prefix) in [("close", "/dc/"), ("keepalive", "/dk/")] {
        let report = lab
            .httpload(
                Host::Client,
                &[
                    "--target",
                    "10.77.0.20:80",
                    "--mode",
                    mode,
                    "--requests",
                    "1000",
                    "--connections",
                    "20",
                    "--concurrency",
                    "10",
                    "--path-prefix",
                    prefix,
                ],
            )
            .expect("httpload");
        assert!(report.all_ok(), "{report:?}");
    }
    // nginx logs a request after answering it: wait for the last lines.
    assert_eq!(online.wait_count(2000, Duration::from_secs(30)), 2000);
    let seen = target.settle(Duration::from_secs(2), Duration::from_secs(60));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for path in target.paths() {
        *counts.entry(path).or_default() += 1;
    }
    let logs = format!(
        "--- tcpcopy ---\n{}\n--- intercept ---\n{}",
        tcpcopy.log(),
        intercept.log()
    );
    assert_eq!(seen, 2000, "{logs}");
    assert_eq!(counts.len(), 2000, "{logs}");
    assert!(
        counts.values().all(|n| *n == 1),
        "a path arrived twice\n{logs}"
    );
    tcpcopy.stop();
    intercept.stop();
    tcpcopy.log()
}

/// Starts tcpcopy on DPDK with `vdev` and `rx` (behind `wrapper` when not empty: a command that
/// ends by running its arguments); it must fail. Returns what it printed on stderr.
fn failed_start(lab: &Lab, wrapper: &[&str], vdev: &str, rx: &str) -> String {
    let mut args: Vec<&str> = wrapper.to_vec();
    let program = if wrapper.is_empty() {
        TCPCOPY
    } else {
        args.push(TCPCOPY);
        args.remove(0)
    };
    args.extend_from_slice(&[
        "--dpdk-vdev",
        vdev,
        "--dpdk-rx",
        rx,
        "--next-hop",
        "02:77:00:00:00:1e",
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        "10.77.0.40",
    ]);
    let out = lab
        .run_timeout(Host::Online, program, &args, Duration::from_secs(30))
        .expect("tcpcopy runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "tcpcopy started: {err}");
    err
}

#[test]
fn a_missing_device_fails_at_once_naming_it() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let err = failed_start(&lab, &[], "net_af_packet0,iface=eth0", "net_af_packet7");
    assert!(err.contains("net_af_packet7"), "{err}");
    let err = failed_start(&lab, &[], "net_af_packet0,iface=nosuch0", "net_af_packet0");
    assert!(err.contains("nosuch0"), "{err}");
}

#[test]
fn no_hugepages_fails_at_once_with_the_fix() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    // A private mount namespace where no hugetlbfs is mounted: DPDK finds no hugepages there.
    let script = "for m in $(awk '$3 == \"hugetlbfs\" {print $2}' /proc/mounts); do umount \"$m\"; done; exec \"$@\"";
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ];
    let err = failed_start(
        &lab,
        &wrapper,
        "net_af_packet0,iface=eth0",
        "net_af_packet0",
    );
    assert!(err.contains("hugepages"), "{err}");
    assert!(err.contains("scripts/hugepages.sh reserve 512"), "{err}");
    // Nothing was left mounted in the real mount namespace by the failed start.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("/dev/hugepages-tcpcopy-"), "{mounts}");
}
