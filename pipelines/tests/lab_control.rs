//! End-to-end tests of the control channel at scale (issue 6) in the lab: several intercepts,
//! several tcpcopys, a stalled intercept, `--single`, and (once tcpcopy has the flags) the UDP
//! transport with injected loss and authentication.
//!
//! The lab has one assistant and one online host. Tests that need a second one add it
//! themselves: a namespace `<prefix>assistant2` (10.77.0.41) or `<prefix>online2` (10.77.0.21)
//! with a veth onto the lab's bridge `br0` in `<prefix>br`, set up like the lab's own hosts
//! (permanent neighbours both ways, rp_filter 0, IPv6 off, offloads off, ip_forward 0), and
//! removed by the test (processes killed by pid first), also when it fails.
//!
//! Why two assistant *hosts* and not two intercepts on one: the target routes each replayed
//! client address to one gateway; routing half of the clients to each intercept needs two
//! gateway addresses, and an intercept captures what reaches its host. Two intercepts on one
//! host with different ports would both capture every reply and prove nothing about routing.
//! To have two halves the client gets a second address (10.77.0.11): the target routes
//! 10.77.0.10 via the lab's assistant (10.77.0.40) and 10.77.0.11 via assistant2 (10.77.0.41),
//! and the load runs once from each address (a host route on the client picks the source).
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly. Run them
//! one at a time (`--test-threads=1`).

use lab::{Host, Lab, Proc};
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TCPCOPY: &str = env!("CARGO_BIN_EXE_tcpcopy");
const INTERCEPT: &str = env!("CARGO_BIN_EXE_intercept");
/// The second client address (routed via assistant2).
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);

/// Runs `ip ARGS` (or any command) and fails with its output if it fails.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Best effort (cleanup).
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

fn ns_pids(ns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the processes of namespace `ns` (by pid; they are ours: only this test starts
/// programs there) and deletes it.
fn remove_ns(ns: &str) {
    for sig in ["-TERM", "-KILL"] {
        let pids = ns_pids(ns);
        if pids.is_empty() {
            break;
        }
        let mut args = vec![sig];
        args.extend(pids.iter().map(String::as_str));
        sh_quiet("kill", &args);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ns_pids(ns).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    sh_quiet("ip", &["netns", "del", ns]);
}

/// Removes extra hosts left by test processes that died (prefix `tl<pid>x<n>-` whose pid is
/// gone); the lab harness sweeps only its own five namespaces.
fn sweep_stale_extra_hosts() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(prefix) = ["assistant2", "online2"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
        else {
            continue;
        };
        let Some(pid) = prefix
            .strip_prefix("tl")
            .and_then(|p| p.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("lab_control: removing stale namespace {name}");
            remove_ns(&name);
        }
    }
}

/// A host added to a running lab; removed on drop.
struct ExtraHost {
    ns: String,
    addr: Ipv4Addr,
}

impl ExtraHost {
    /// Adds `<prefix><name>` with address 10.77.0.`octet` and MAC 02:77:00:00:00:`octet`.
    fn add(lab: &Lab, name: &str, octet: u8) -> ExtraHost {
        sweep_stale_extra_hosts();
        let ns = format!("{}{name}", lab.prefix());
        let br = lab.bridge_ns();
        let addr = Ipv4Addr::new(10, 77, 0, octet);
        let mac = format!("02:77:00:00:00:{octet:02x}");
        sh("ip", &["netns", "add", &ns]);
        let host = ExtraHost {
            ns: ns.clone(),
            addr,
        };
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        for (k, v) in [
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.lo.rp_filter", "0"),
            ("net.ipv4.ip_forward", "0"),
        ] {
            sh(
                "ip",
                &["netns", "exec", &ns, "sysctl", "-qw", &format!("{k}={v}")],
            );
        }
        sh(
            "ip",
            &[
                "link", "add", "eth0", "netns", &ns, "address", &mac, "type", "veth", "peer",
                "name", name, "netns", &br,
            ],
        );
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.conf.eth0.rp_filter=0",
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        );
        sh("ip", &["-n", &br, "link", "set", name, "master", "br0"]);
        for (space, dev) in [(&ns, "eth0"), (&br, name)] {
            sh_quiet(
                "ip",
                &[
                    "netns", "exec", space, "ethtool", "-K", dev, "tx", "off", "sg", "off", "tso",
                    "off", "gso", "off", "gro", "off",
                ],
            );
        }
        sh("ip", &["-n", &br, "link", "set", name, "up"]);
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        for h in Host::ALL {
            let hmac = h
                .mac()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let h_addr = h.addr().to_string();
            let h_ns = lab.ns(h);
            let my_addr = addr.to_string();
            for (space, who, lladdr) in [(&ns, &h_addr, &hmac), (&h_ns, &my_addr, &mac)] {
                let args: Vec<&str> = vec![
                    "-n",
                    space.as_str(),
                    "neigh",
                    "replace",
                    who.as_str(),
                    "lladdr",
                    lladdr.as_str(),
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ];
                sh("ip", &args);
            }
        }
        host
    }

    /// Starts `program args` in this host (`ip netns exec` twice: both exec in place, so the
    /// returned process is the program itself and signals reach it).
    fn spawn(&self, lab: &Lab, program: &str, args: &[&str]) -> Proc {
        let mut all = vec!["netns", "exec", &self.ns, program];
        all.extend_from_slice(args);
        lab.spawn(Host::Assistant, "ip", &all)
            .unwrap_or_else(|e| panic!("start {program} in {}: {e:#}", self.ns))
    }
}

impl Drop for ExtraHost {
    fn drop(&mut self) {
        remove_ns(&self.ns);
    }
}

/// Gives the client a second address whose replies the target routes via `gateway`.
fn add_second_client(lab: &Lab, gateway: Ipv4Addr) {
    let client = lab.ns(Host::Client);
    sh(
        "ip",
        &[
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT2}/24"),
            "dev",
            "eth0",
        ],
    );
    let cmac = "02:77:00:00:00:0a";
    for h in [Host::Online, Host::Target, Host::Assistant] {
        sh(
            "ip",
            &[
                "-n",
                &lab.ns(h),
                "neigh",
                "replace",
                &CLIENT2.to_string(),
                "lladdr",
                cmac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    }
    sh(
        "ip",
        &[
            "-n",
            &lab.ns(Host::Target),
            "route",
            "add",
            &format!("{CLIENT2}/32"),
            "via",
            &gateway.to_string(),
            "dev",
            "eth0",
        ],
    );
}

/// Makes the client's connections to `online` leave from `source` (a host route's `src`).
fn client_source(lab: &Lab, online: Ipv4Addr, source: Ipv4Addr) {
    sh(
        "ip",
        &[
            "-n",
            &lab.ns(Host::Client),
            "route",
            "replace",
            &format!("{online}/32"),
            "dev",
            "eth0",
            "src",
            &source.to_string(),
        ],
    );
}

/// Where an intercept runs.
#[derive(Clone, Copy)]
enum Site<'a> {
    Lab(Host),
    Extra(&'a ExtraHost),
}

impl Site<'_> {
    fn addr(&self) -> Ipv4Addr {
        match self {
            Site::Lab(h) => h.addr(),
            Site::Extra(x) => x.addr,
        }
    }

    fn spawn(&self, lab: &Lab, program: &str, args: &[&str]) -> Proc {
        match self {
            Site::Lab(h) => lab
                .spawn(*h, program, args)
                .unwrap_or_else(|e| panic!("start {program}: {e:#}")),
            Site::Extra(x) => x.spawn(lab, program, args),
        }
    }
}

/// Starts intercept at `site` capturing the target's replies; TCP: waits until it accepts.
fn start_intercept(lab: &Lab, site: Site, extra: &[&str]) -> Proc {
    let mut args = vec![
        "-i",
        "eth0",
        "-F",
        "tcp and src host 10.77.0.30",
        "--stats-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut p = site.spawn(lab, INTERCEPT, &args);
    p.wait_for_log("starting", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("intercept did not start: {e:#}\n{}", p.log()));
    let udp = extra.windows(2).any(|w| w == ["--transport", "udp"]);
    let port = extra
        .windows(2)
        .find(|w| w[0] == "-p")
        .map_or(36524, |w| w[1].parse().unwrap());
    if !udp {
        lab.wait_port(
            Host::Online,
            SocketAddrV4::new(site.addr(), port),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("intercept is not listening: {e:#}\n{}", p.log()));
    }
    p
}

/// Starts tcpcopy at `site` (an online host) replaying port 80 to the target; waits until it
/// is connected to `connected` intercepts.
fn start_tcpcopy(lab: &Lab, site: Site, servers: &str, extra: &[&str], connected: usize) -> Proc {
    let mut args = vec![
        "-i",
        "eth0",
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        servers,
        "--stats-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut p = site.spawn(lab, TCPCOPY, &args);
    let deadline = Instant::now() + Duration::from_secs(15);
    while p.log().matches("connected to intercept").count() < connected {
        assert!(
            Instant::now() < deadline && p.is_running(),
            "tcpcopy did not connect to {connected} intercept(s):\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// The value after `name ` in a statistics line.
fn counter(line: &str, name: &str) -> u64 {
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

/// The last statistics line of a running program (the periodic one).
fn last_stats(p: &Proc, marker: &str) -> Option<String> {
    p.log()
        .lines()
        .rev()
        .find(|l| l.contains(marker))
        .map(str::to_string)
}

/// Stops `p` (SIGTERM) and returns its final statistics line.
fn stop_final(p: &mut Proc) -> String {
    p.stop();
    let log = p.log();
    log.lines()
        .rev()
        .find(|l| l.contains("final:"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{} printed no final statistics:\n{log}", p.name()))
}

fn load(lab: &Lab, target: &str, args: &[&str]) {
    let mut all = vec!["--target", target];
    all.extend_from_slice(args);
    let report = lab.httpload(Host::Client, &all).expect("httpload runs");
    assert!(report.all_ok(), "load against {target} failed: {report:?}");
}

/// `n` requests to `online:80`: half one connection each (10 in parallel), half over 10
/// keep-alive connections; paths `<prefix>c/…` and `<prefix>k/…`.
fn mixed_load(lab: &Lab, online: Ipv4Addr, prefix: &str, n: usize) {
    let target = format!("{online}:80");
    let half = (n / 2).to_string();
    let (close, keep) = (format!("{prefix}c/"), format!("{prefix}k/"));
    load(
        lab,
        &target,
        &[
            "--mode",
            "close",
            "--requests",
            &half,
            "--concurrency",
            "10",
            "--path-prefix",
            &close,
        ],
    );
    load(
        lab,
        &target,
        &[
            "--mode",
            "keepalive",
            "--connections",
            "10",
            "--requests",
            &half,
            "--path-prefix",
            &keep,
        ],
    );
}

/// Asserts the target saw every path with `prefix` exactly once, `want` of them.
fn assert_each_once(target: &lab::Nginx, prefix: &str, want: usize, context: &dyn Fn() -> String) {
    let seen = lab::wait_count(
        || {
            target
                .paths()
                .iter()
                .filter(|p| p.starts_with(prefix))
                .count()
        },
        want,
        Duration::from_secs(60),
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in target.paths().into_iter().filter(|p| p.starts_with(prefix)) {
        *counts.entry(p).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        seen == want && counts.len() == want && doubled.is_empty(),
        "{prefix}: target saw {seen} requests, {} distinct of {want}; doubled {doubled:?}\n{}",
        counts.len(),
        context()
    );
}

fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.name(), p.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Done-when 2a: one tcpcopy, two intercepts on two assistant hosts, the target routing half
/// of the clients to each: the 2,000-request run replicates every path once, and each
/// intercept served its half (the first one on two capture threads, PACKET_FANOUT).
#[test]
fn two_intercepts_each_serve_half_of_the_clients() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let a2 = ExtraHost::add(&lab, "assistant2", 41);
    add_second_client(&lab, a2.addr);
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut ia = start_intercept(&lab, Site::Lab(Host::Assistant), &["--workers", "2"]);
    let mut ib = start_intercept(&lab, Site::Extra(&a2), &[]);
    let mut tc = start_tcpcopy(
        &lab,
        Site::Lab(Host::Online),
        "10.77.0.40,10.77.0.41",
        &[],
        2,
    );
    let online = Host::Online.addr();
    client_source(&lab, online, Host::Client.addr());
    mixed_load(&lab, online, "/a/", 1000);
    client_source(&lab, online, CLIENT2);
    mixed_load(&lab, online, "/b/", 1000);
    assert_each_once(&target, "/a/", 1000, &|| logs(&[&tc, &ia, &ib]));
    assert_each_once(&target, "/b/", 1000, &|| logs(&[&tc, &ia, &ib]));
    // Each half came back through its own intercept.
    let by_client: HashSet<Ipv4Addr> = target.entries().iter().map(|e| *e.peer.ip()).collect();
    assert_eq!(by_client.len(), 2, "{by_client:?}");
    let tcs = stop_final(&mut tc);
    let (fa, fb) = (stop_final(&mut ia), stop_final(&mut ib));
    for (name, line) in [("assistant", &fa), ("assistant2", &fb)] {
        // 510 sessions each (500 one-request connections, 10 keep-alive ones): a SYN-ACK,
        // an answer and a FIN per session at least.
        assert!(
            counter(line, "routed") >= 1500,
            "{name} did not serve its half: {line}\ntcpcopy: {tcs}"
        );
        // CLIENT_ADD goes to every intercept: each saw all 1,020 sessions.
        assert!(counter(line, "add") >= 1020, "{name}: {line}");
    }
    eprintln!("assistant: {fa}\nassistant2: {fb}\ntcpcopy: {tcs}");
}

/// Done-when 2b: two tcpcopy instances on two online hosts share one intercept; both
/// replicate everything. The second replays its clients as 10.9.9.x (`-c`) so the two never
/// replay the same 4-tuple.
#[test]
fn two_tcpcopys_share_one_intercept() {
    if !lab::require_root() {
        return;
    }
    lab::build_lab_bins().expect("lab binaries");
    let lab = Lab::up().expect("lab up");
    let o2 = ExtraHost::add(&lab, "online2", 21);
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let o2_log = lab.dir().join("online2-labserver.log");
    let o2_listen = format!("{}:80", o2.addr);
    let labserver = lab::workspace_bin("labserver");
    let o2_server = o2.spawn(
        &lab,
        labserver.to_str().unwrap(),
        &["--listen", &o2_listen, "--log", o2_log.to_str().unwrap()],
    );
    lab.wait_port(
        Host::Client,
        SocketAddrV4::new(o2.addr, 80),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("online2 server: {e:#}\n{}", o2_server.log()));
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut ia = start_intercept(&lab, Site::Lab(Host::Assistant), &[]);
    let mut t1 = start_tcpcopy(&lab, Site::Lab(Host::Online), "10.77.0.40", &[], 1);
    let mut t2 = start_tcpcopy(&lab, Site::Extra(&o2), "10.77.0.40", &["-c", "10.9.9.x"], 1);
    // Both at once: the intercept serves the two tcpcopys concurrently.
    std::thread::scope(|s| {
        s.spawn(|| mixed_load(&lab, Host::Online.addr(), "/o1/", 1000));
        s.spawn(|| mixed_load(&lab, o2.addr, "/o2/", 1000));
    });
    assert_each_once(&target, "/o1/", 1000, &|| {
        logs(&[&t1, &t2, &ia, &o2_server])
    });
    assert_each_once(&target, "/o2/", 1000, &|| {
        logs(&[&t1, &t2, &ia, &o2_server])
    });
    for e in target.entries() {
        let from_o2 = e.uri.starts_with("/o2/");
        assert_eq!(
            e.peer.ip().octets()[..3] == [10, 9, 9],
            from_o2,
            "{e:?}: the -c tcpcopy replays as 10.9.9.x, the other as the real client"
        );
    }
    let (s1, s2) = (stop_final(&mut t1), stop_final(&mut t2));
    let fa = stop_final(&mut ia);
    assert!(
        counter(&fa, "connections") >= 4,
        "two tcpcopys x -C 2: {fa}"
    );
    eprintln!("intercept: {fa}\ntcpcopy1: {s1}\ntcpcopy2: {s2}");
}

/// Done-when 5: with two intercepts, one is stopped (SIGSTOP) for at least 5 s; meanwhile
/// every session of the other intercept's half replicates; after SIGCONT both serve again.
#[test]
fn stalled_intercept_does_not_stop_the_other() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let a2 = ExtraHost::add(&lab, "assistant2", 41);
    add_second_client(&lab, a2.addr);
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut ia = start_intercept(&lab, Site::Lab(Host::Assistant), &[]);
    let mut ib = start_intercept(&lab, Site::Extra(&a2), &[]);
    let mut tc = start_tcpcopy(
        &lab,
        Site::Lab(Host::Online),
        "10.77.0.40,10.77.0.41",
        &[],
        2,
    );
    let online = Host::Online.addr();

    // A stops. B's half (the second client address) keeps replicating.
    ia.signal(libc::SIGSTOP).expect("SIGSTOP intercept A");
    let stopped_at = Instant::now();
    client_source(&lab, online, CLIENT2);
    mixed_load(&lab, online, "/during/", 300);
    assert_each_once(&target, "/during/", 300, &|| logs(&[&tc, &ia, &ib]));
    let stopped_for = stopped_at.elapsed();
    // Keep A stopped for 5 s in all (a longer stall only makes the point stronger).
    if stopped_for < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_secs(5) - stopped_for);
    }
    assert!(tc.is_running(), "tcpcopy survived the stall:\n{}", tc.log());
    ia.signal(libc::SIGCONT).expect("SIGCONT intercept A");

    // Both halves replicate afterwards.
    client_source(&lab, online, Host::Client.addr());
    mixed_load(&lab, online, "/after-a/", 200);
    client_source(&lab, online, CLIENT2);
    mixed_load(&lab, online, "/after-b/", 200);
    assert_each_once(&target, "/after-a/", 200, &|| logs(&[&tc, &ia, &ib]));
    assert_each_once(&target, "/after-b/", 200, &|| logs(&[&tc, &ia, &ib]));
    let stats = stop_final(&mut tc);
    let (fa, fb) = (stop_final(&mut ia), stop_final(&mut ib));
    eprintln!(
        "stopped {:?} while the other half replicated\ntcpcopy: {stats}\nA: {fa}\nB: {fb}",
        stopped_at.elapsed()
    );
}

/// intercept `--single -c`: no routes, replies spread over the connected tcpcopy's
/// connections; a second tcpcopy arriving later is refused while the first is connected.
#[test]
fn single_mode_spreads_replies_and_protects_the_first_tcpcopy() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let o2 = ExtraHost::add(&lab, "online2", 21);
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut ia = start_intercept(&lab, Site::Lab(Host::Assistant), &["--single", "-c"]);
    let mut t1 = start_tcpcopy(&lab, Site::Lab(Host::Online), "10.77.0.40", &[], 1);
    mixed_load(&lab, Host::Online.addr(), "/s1/", 200);
    assert_each_once(&target, "/s1/", 200, &|| logs(&[&t1, &ia]));
    // A second tcpcopy more than 3 s after the first: refused (-c), the first keeps working.
    std::thread::sleep(Duration::from_millis(3200));
    let mut t2 = o2.spawn(
        &lab,
        TCPCOPY,
        &["-i", "eth0", "-x", "80-10.77.0.30:8080", "-s", "10.77.0.40"],
    );
    ia.wait_for_log("--single: refusing", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ia.log(), t2.log()));
    mixed_load(&lab, Host::Online.addr(), "/s2/", 200);
    assert_each_once(&target, "/s2/", 200, &|| logs(&[&t1, &ia]));
    t2.stop();
    let fa = stop_final(&mut ia);
    assert!(counter(&fa, "single-refused") >= 1, "{fa}");
    assert_eq!(counter(&fa, "routes"), 0, "--single keeps no routes: {fa}");
    let s1 = stop_final(&mut t1);
    eprintln!("intercept: {fa}\ntcpcopy: {s1}");
}

/// Relays UDP between tcpcopy and an intercept in the assistant's namespace, dropping every
/// 100th datagram each way and counting exactly what it dropped. The sockets are made inside
/// the namespace (they stay there); the threads run in the test process.
struct LossyRelay {
    stop: Arc<AtomicBool>,
    /// [up forwarded, up dropped, down forwarded, down dropped]
    counts: Arc<[AtomicU64; 4]>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LossyRelay {
    fn start(lab: &Lab, listen: SocketAddrV4, intercept: SocketAddrV4, every: u64) -> LossyRelay {
        let (front, back) = lab
            .in_ns(Host::Assistant, move || {
                let front = UdpSocket::bind(listen).expect("relay front");
                let back = UdpSocket::bind("127.0.0.1:0").expect("relay back");
                back.connect(intercept).expect("relay connect");
                (front, back)
            })
            .expect("enter the assistant namespace");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let peer: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let up = {
            let (stop, counts, peer) = (stop.clone(), counts.clone(), peer.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut n_seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *peer.lock().unwrap() = Some(from);
                    n_seen += 1;
                    if n_seen.is_multiple_of(every) {
                        counts[1].fetch_add(1, Ordering::SeqCst);
                    } else if back.send(&buf[..n]).is_ok() {
                        counts[0].fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        let down = {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut n_seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back2.recv(&mut buf) else {
                        continue;
                    };
                    n_seen += 1;
                    if n_seen.is_multiple_of(every) {
                        counts[3].fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let to = *peer.lock().unwrap();
                    if let Some(to) = to {
                        if front2.send_to(&buf[..n], to).is_ok() {
                            counts[2].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        };
        LossyRelay {
            stop,
            counts,
            threads: vec![up, down],
        }
    }

    fn get(&self, i: usize) -> u64 {
        self.counts[i].load(Ordering::SeqCst)
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Done-when 3a: the UDP transport replicates the 2,000-request run.
#[test]
fn udp_transport_replicates_the_2000_run() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut ia = start_intercept(
        &lab,
        Site::Lab(Host::Assistant),
        &["--transport", "udp", "--workers", "2"],
    );
    let mut tc = start_tcpcopy(
        &lab,
        Site::Lab(Host::Online),
        "10.77.0.40",
        &["--transport", "udp"],
        1,
    );
    mixed_load(&lab, Host::Online.addr(), "/u/", 2000);
    assert_each_once(&target, "/u/", 2000, &|| logs(&[&tc, &ia]));
    let stats = stop_final(&mut tc);
    let fa = stop_final(&mut ia);
    assert_eq!(counter(&stats, "udp-rejected"), 0, "{stats}");
    assert!(counter(&fa, "udp-rx") > 0, "{fa}");
    eprintln!("tcpcopy: {stats}\nintercept: {fa}");
}

/// Done-when 3b: UDP with 1% loss injected on the control path (a relay drops every 100th
/// datagram each way): each side's loss counter equals what the relay dropped, and sessions
/// complete or time out cleanly (tcpcopy keeps running, most of the run replicates).
#[test]
fn udp_loss_is_counted_exactly_and_sessions_finish() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    // intercept on 127.0.0.1:36525 behind the relay on 10.77.0.40:36524.
    let mut ia = start_intercept(
        &lab,
        Site::Lab(Host::Assistant),
        &["--transport", "udp", "-b", "127.0.0.1", "-p", "36525"],
    );
    let relay = LossyRelay::start(
        &lab,
        "10.77.0.40:36524".parse().unwrap(),
        "127.0.0.1:36525".parse().unwrap(),
        100,
    );
    let mut tc = start_tcpcopy(
        &lab,
        Site::Lab(Host::Online),
        "10.77.0.40",
        &["--transport", "udp"],
        1,
    );
    mixed_load(&lab, Host::Online.addr(), "/l/", 2000);
    let seen = target.settle(Duration::from_secs(3), Duration::from_secs(90));
    // Keepalives make every drop visible (a gap counts once a later datagram arrives).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut tline, mut iline) = (String::new(), String::new());
    while Instant::now() < deadline {
        tline = last_stats(&tc, "udp-lost").unwrap_or_default();
        iline = last_stats(&ia, "udp-lost").unwrap_or_default();
        if !tline.is_empty()
            && !iline.is_empty()
            && counter(&tline, "udp-lost") == relay.get(3)
            && counter(&iline, "udp-lost") == relay.get(1)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // About 330 datagrams come down for the run (records are batched, 22 to a datagram); fewer
    // go up (101 messages to a datagram, and keepalives), so the upward drops may be 0 — the
    // counters must match the relay either way.
    assert!(
        relay.get(3) >= 2,
        "the relay dropped up {} down {}",
        relay.get(1),
        relay.get(3)
    );
    assert_eq!(
        counter(&tline, "udp-lost"),
        relay.get(3),
        "tcpcopy's loss counter vs the relay's drops\n{tline}"
    );
    assert_eq!(
        counter(&iline, "udp-lost"),
        relay.get(1),
        "intercept's loss counter vs the relay's drops\n{iline}"
    );
    assert!(tc.is_running(), "{}", tc.log());
    // Lost route messages or records cost sessions, not the run: most of it replicates.
    assert!(
        seen * 100 >= 2000 * 95,
        "target saw {seen} of 2000\n{tline}"
    );
    let stats = stop_final(&mut tc);
    let fa = stop_final(&mut ia);
    eprintln!(
        "relay dropped up {} down {}; target saw {seen} of 2000\ntcpcopy: {stats}\nintercept: {fa}",
        relay.get(1),
        relay.get(3)
    );
}

fn write_secret(lab: &Lab, name: &str, secret: &str) -> PathBuf {
    let path = lab.dir().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write the secret");
    path
}

/// Done-when 4: with authentication on, the right secret replicates (TCP and UDP); a wrong
/// secret is refused and counted on both sides; a forged record sent to tcpcopy's UDP port is
/// rejected and counted.
#[test]
fn authentication_refuses_wrong_secrets_and_forged_records() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let _online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let good = write_secret(&lab, "secret", "lab secret: 0123456789abcdef");
    let bad = write_secret(&lab, "wrong", "not the lab secret 0123456789");
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());

    for transport in ["tcp", "udp"] {
        let prefix = format!("/auth-{transport}/");
        let mut ia = start_intercept(
            &lab,
            Site::Lab(Host::Assistant),
            &["--transport", transport, "--auth-file", good],
        );
        // The wrong secret: refused and counted, tcpcopy never comes up.
        let mut wrong = lab
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
                    "--transport",
                    transport,
                    "--auth-file",
                    bad,
                    "--stats-interval",
                    "1",
                ],
            )
            .expect("start tcpcopy");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let refused = last_stats(&ia, "auth-refused").map(|l| counter(&l, "auth-refused"));
            if refused.unwrap_or(0) >= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{transport}: intercept did not count the refusals\n{}\n{}",
                ia.log(),
                wrong.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !wrong.log().contains("connected to intercept"),
            "{}",
            wrong.log()
        );
        let wrong_final = stop_final(&mut wrong);
        if transport == "tcp" {
            // TCP: tcpcopy itself saw intercept's proof fail.
            assert!(counter(&wrong_final, "auth-failures") >= 1, "{wrong_final}");
        }

        // The right secret replicates.
        let mut tc = start_tcpcopy(
            &lab,
            Site::Lab(Host::Online),
            "10.77.0.40",
            &["--transport", transport, "--auth-file", good],
            1,
        );
        mixed_load(&lab, Host::Online.addr(), &prefix, 200);
        assert_each_once(&target, &prefix, 200, &|| logs(&[&tc, &ia]));

        if transport == "udp" {
            // A forged RECORDS datagram (MAC flag set, a made-up session and tag) from the
            // assistant to tcpcopy's UDP port: rejected and counted.
            let log = tc.log();
            let port: u16 = log
                .lines()
                .find(|l| l.contains("control channel over UDP"))
                .and_then(|l| l.split("local=").nth(1))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
                .unwrap_or_else(|| panic!("tcpcopy logs its UDP address:\n{log}"));
            let before = last_stats(&tc, "udp-rejected").map_or(0, |l| counter(&l, "udp-rejected"));
            let mut forged = vec![0x54, 0x55, 1, 4, 0x01, 1, 0, 0];
            forged.extend_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
            forged.extend_from_slice(&1u64.to_be_bytes());
            forged.extend_from_slice(&1u64.to_be_bytes());
            forged.extend_from_slice(&[0x45; 64]);
            forged.extend_from_slice(&[0xee; 16]);
            let to = SocketAddrV4::new(Host::Online.addr(), port);
            lab.in_ns(Host::Assistant, move || {
                let s = UdpSocket::bind("10.77.0.40:0").unwrap();
                for _ in 0..3 {
                    s.send_to(&forged, to).unwrap();
                }
            })
            .expect("send the forged datagrams");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let now =
                    last_stats(&tc, "udp-rejected").map_or(0, |l| counter(&l, "udp-rejected"));
                if now >= before + 3 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "forged datagrams not counted:\n{}",
                    tc.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let stats = stop_final(&mut tc);
        let fa = stop_final(&mut ia);
        assert!(counter(&fa, "auth-ok") >= 1, "{fa}");
        eprintln!("{transport}: tcpcopy: {stats}\nintercept: {fa}");
    }
}
