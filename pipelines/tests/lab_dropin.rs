//! Drop-in for the C tools' users (issue #11): the command lines of the C tools' usage notes,
//! run as written (with the lab's addresses and ports), replicate every request exactly once;
//! two online hosts feed one target through one intercept; and a frame tcpcopy sees on two
//! interfaces (a bridge and its port, a VLAN or a macvlan and its parent) is replayed once.
//!
//! The usage notes' lines, and what they become here:
//!
//! ```text
//!  intercept -i eth0 -F 'tcp and src port 11511' -d          intercept -i eth0 -F 'tcp and src port 8080' -d
//!  tcpcopy -x 11311-10.100.10.31:11511 -s 10.100.10.32 -d    tcpcopy -x 80-10.77.0.30:8080 -s 10.77.0.40 -d
//! ```
//!
//! Both are daemons without a log file (no `-l`): the test finds them with `ip netns pids`,
//! knows tcpcopy is ready when its namespace has an established connection to intercept, and
//! judges the run by the target's access log alone. If a test fails before it stops them, the
//! lab's teardown (`lab.sh down`) kills every process left in its namespaces, daemons included.
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly. Each test
//! builds its own lab and removes it, also when it fails. Run them one at a time
//! (`--test-threads=1`).

use lab::http::load_path;
use lab::{Host, Lab, LabConfig, Nginx};
use pcap_file::pcap::PcapReader;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// `intercept -i eth0 -F 'tcp and src port 11511' -d`, with the lab target's port.
const INTERCEPT_LINE: [&str; 5] = ["-i", "eth0", "-F", "tcp and src port 8080", "-d"];
/// `tcpcopy -x 11311-10.100.10.31:11511 -s 10.100.10.32 -d`, with the lab's ports and addresses.
const TCPCOPY_LINE: [&str; 5] = ["-x", "80-10.77.0.30:8080", "-s", "10.77.0.40", "-d"];
/// Where intercept listens for tcpcopy.
const INTERCEPT_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 40), 36524);
/// How long the test waits for a daemon to appear, connect or stop.
const DAEMON_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Daemons

/// A daemon started in a lab host with `-d`. The process the test starts exits at once; the
/// daemon is the one new process of the namespace running the same program.
struct Daemon {
    line: String,
    pid: u32,
}

impl Daemon {
    /// Runs `program args` in `host` (bounded), which must exit 0, and finds the daemon it left.
    fn start(lab: &Lab, host: Host, program: &str, args: &[&str]) -> Daemon {
        let exe = std::fs::canonicalize(program)
            .unwrap_or_else(|e| panic!("cannot resolve {program}: {e}"));
        let line = format!(
            "{} {}",
            exe.file_name().unwrap().to_string_lossy(),
            args.iter()
                .map(|a| if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    (*a).to_string()
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        let before = lab.pids(host).expect("ip netns pids");
        let out = lab
            .run_timeout(host, program, args, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("`{line}` in {}: {e:#}", host.name()));
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "`{line}` failed in {} ({}); stdout: {stdout}\nstderr: {}",
            host.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + DAEMON_WAIT;
        loop {
            let found: Vec<u32> = lab
                .pids(host)
                .expect("ip netns pids")
                .into_iter()
                .filter(|p| !before.contains(p) && runs(*p, &exe))
                .collect();
            match found[..] {
                [pid] => {
                    // tcpcopy-rs prints the daemon's pid (the C tools print nothing).
                    if let Ok(printed) = stdout.parse::<u32>() {
                        assert_eq!(printed, pid, "`{line}` printed another pid");
                    }
                    return Daemon { line, pid };
                }
                [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => panic!(
                    "`{line}` left {} daemons in {} after {DAEMON_WAIT:?} (want 1): {found:?}; \
                     processes there: {}",
                    found.len(),
                    host.name(),
                    describe(&lab.pids(host).unwrap_or_default())
                ),
            }
        }
    }

    /// Panics unless the daemon is still running.
    fn assert_running(&self) {
        assert!(
            !gone(self.pid),
            "the daemon `{}` (pid {}) has exited",
            self.line,
            self.pid
        );
    }

    /// SIGTERM; the daemon must exit within [`DAEMON_WAIT`].
    fn stop(self) {
        self.assert_running();
        let status = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {} ({})", self.pid, self.line);
        let deadline = Instant::now() + DAEMON_WAIT;
        while !gone(self.pid) {
            assert!(
                Instant::now() < deadline,
                "the daemon `{}` (pid {}) did not exit within {DAEMON_WAIT:?} of SIGTERM",
                self.line,
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether process `pid` runs `exe` (a rebuilt binary shows as "... (deleted)").
fn runs(pid: u32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| {
        let p = p.to_string_lossy();
        p.strip_suffix(" (deleted)").unwrap_or(&p) == exe.to_string_lossy()
    })
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet: a daemon's parent is init).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .filter(|state| *state != "Z" && *state != "X")
            .is_none(),
    }
}

/// `pid: command line` of each process, for failure messages.
fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            format!("{p}: {}", cmd.trim())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Established TCP connections from `host` to `to` (its `/proc/net/tcp`).
fn established_to(lab: &Lab, host: Host, to: SocketAddrV4) -> usize {
    let text = lab
        .in_ns(host, || {
            std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default()
        })
        .expect("enter the namespace");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "01" && proc_net_addr(f[2]) == Some(to)
        })
        .count()
}

/// `0A4D0028:8EAC`-style address of `/proc/net/tcp` (the address in memory order).
fn proc_net_addr(text: &str) -> Option<SocketAddrV4> {
    let (ip, port) = text.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// Waits until the daemonized tcpcopy in `host` is connected to intercept (it opens its
/// capture before it connects, so it captures from then on).
fn wait_tcpcopy_daemon_connected(lab: &Lab, host: Host, tcpcopy: &Daemon) {
    let deadline = Instant::now() + DAEMON_WAIT;
    while established_to(lab, host, INTERCEPT_ADDR) == 0 {
        tcpcopy.assert_running();
        assert!(
            Instant::now() < deadline,
            "`{}` did not connect to intercept within {DAEMON_WAIT:?}",
            tcpcopy.line
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the usage notes' intercept line as a daemon on the assistant and waits until it
/// listens for tcpcopy (it opens its capture before it listens).
fn start_intercept_daemon(lab: &Lab) -> Daemon {
    let intercept = Daemon::start(lab, Host::Assistant, INTERCEPT, &INTERCEPT_LINE);
    if let Err(e) = lab.wait_port(Host::Online, INTERCEPT_ADDR, DAEMON_WAIT) {
        intercept.assert_running();
        panic!("`{}` is not listening: {e:#}", intercept.line);
    }
    intercept
}

// ---------------------------------------------------------------------------------------------
// Load and counting

/// Sends `requests` requests with paths `<prefix>000000`... from the client to `server`: one
/// connection per request (10 at a time) in `close` mode, else over `connections` keep-alive
/// connections.
fn load(lab: &Lab, server: &str, mode: &str, requests: u64, connections: u64, prefix: &str) {
    let (requests, connections) = (requests.to_string(), connections.to_string());
    let mut args = vec![
        "--target",
        server,
        "--mode",
        mode,
        "--requests",
        &requests,
        "--path-prefix",
        prefix,
    ];
    if mode == "close" {
        args.extend(["--concurrency", "10"]);
    } else {
        args.extend(["--connections", &connections]);
    }
    let report = lab.httpload(Host::Client, &args).expect("httpload runs");
    assert!(
        report.all_ok(),
        "load against the online server failed: {report:?}"
    );
}

/// The paths of a [`load`] run: `<prefix>000000` .. `<prefix><n-1>`.
fn paths(prefix: &str, n: u64) -> BTreeSet<String> {
    (0..n).map(|i| load_path(prefix, None, i)).collect()
}

/// Log entries of `server` whose path starts with one of `prefixes`.
fn logged(server: &Nginx, prefixes: &[&str]) -> Vec<String> {
    server
        .paths()
        .into_iter()
        .filter(|p| prefixes.iter().any(|x| p.starts_with(x)))
        .collect()
}

/// Waits until each online server logged its `expected` paths (nginx logs after answering),
/// then until the target holds as many paths of those prefixes and has stayed unchanged for
/// 2 s (so late duplicates show); then asserts that every expected path reached the target
/// exactly once and nothing else did, but for at most `may_miss` missing paths (none but
/// where the caller says why). Returns the number of requests the target logged.
fn assert_each_once(
    onlines: &[(&Nginx, &BTreeSet<String>)],
    target: &Nginx,
    prefixes: &[&str],
    may_miss: &dyn Fn() -> usize,
    logs: &dyn Fn() -> String,
) -> usize {
    let mut want = BTreeSet::new();
    for (online, expected) in onlines {
        let count = || logged(online, prefixes).len();
        let n = lab::wait_count(count, expected.len(), Duration::from_secs(30));
        let seen: BTreeSet<String> = logged(online, prefixes).into_iter().collect();
        assert!(
            n == expected.len() && seen == **expected,
            "the online server {} logged {n} of {} requests",
            online.addr(),
            expected.len()
        );
        want.extend(expected.iter().cloned());
    }
    let count = || logged(target, prefixes).len();
    lab::wait_count(count, want.len(), Duration::from_secs(60));
    let seen = lab::settle(count, Duration::from_secs(2), Duration::from_secs(30));
    let mut at_target: BTreeMap<String, usize> = BTreeMap::new();
    for path in logged(target, prefixes) {
        *at_target.entry(path).or_default() += 1;
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|p| !at_target.contains_key(*p))
        .collect();
    let doubled: Vec<(&String, &usize)> = at_target.iter().filter(|(_, n)| **n > 1).collect();
    let foreign: Vec<&String> = at_target.keys().filter(|p| !want.contains(*p)).collect();
    let may_miss = may_miss();
    assert!(
        missing.len() <= may_miss
            && doubled.is_empty()
            && foreign.is_empty()
            && seen + missing.len() == want.len(),
        "the target logged {seen} of {} requests; {} paths missing (e.g. {:?}), {} more than \
         once (e.g. {:?}), {} not sent (e.g. {:?})\n{}",
        want.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
        foreign.len(),
        foreign.iter().take(5).collect::<Vec<_>>(),
        logs()
    );
    seen
}

/// Keep-alive connections the target served requests of `prefix` on.
fn target_connections(target: &Nginx, prefix: &str) -> usize {
    target
        .entries()
        .iter()
        .filter(|e| e.uri.starts_with(prefix))
        .map(|e| e.connection)
        .collect::<BTreeSet<u64>>()
        .len()
}

// ---------------------------------------------------------------------------------------------
// The usage notes' lines

/// The usage notes' two lines as written, both daemons, tcpcopy without `-i` (it captures on
/// every interface): 2,000 new-connection and 2,000 keep-alive requests, each path at the
/// target exactly once, keep-alive sessions replayed as 20 connections, and both daemons stop
/// on SIGTERM.
#[test]
fn usage_note_lines_verbatim() {
    if !lab::require_root() {
        return;
    }
    assert_eq!(usage_note_lines(&[]), 4000);
}

/// The same lines with `-i eth0` added to tcpcopy: the same exact count.
#[test]
fn usage_note_lines_with_interface_give_the_same_count() {
    if !lab::require_root() {
        return;
    }
    assert_eq!(usage_note_lines(&["-i", "eth0"]), 4000);
}

/// Runs the usage notes' lines, tcpcopy's with `tcpcopy_extra` appended; returns the number of
/// requests the target logged (after asserting each path once).
fn usage_note_lines(tcpcopy_extra: &[&str]) -> usize {
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let intercept = start_intercept_daemon(&lab);
    let mut args = TCPCOPY_LINE.to_vec();
    args.extend_from_slice(tcpcopy_extra);
    let tcpcopy = Daemon::start(&lab, Host::Online, TCPCOPY, &args);
    wait_tcpcopy_daemon_connected(&lab, Host::Online, &tcpcopy);

    load(&lab, "10.77.0.20:80", "close", 2000, 0, "/vc/");
    load(&lab, "10.77.0.20:80", "keepalive", 2000, 20, "/vk/");
    let mut expected = paths("/vc/", 2000);
    expected.extend(paths("/vk/", 2000));
    let logs = || {
        format!(
            "daemons (no log file): `{}` pid {}, `{}` pid {}",
            tcpcopy.line, tcpcopy.pid, intercept.line, intercept.pid
        )
    };
    let seen = assert_each_once(
        &[(&online, &expected)],
        &target,
        &["/vc/", "/vk/"],
        &|| 0,
        &logs,
    );
    assert_eq!(
        target_connections(&target, "/vk/"),
        20,
        "keep-alive connections at the target"
    );
    tcpcopy.stop();
    intercept.stop();
    seen
}

/// intercept daemonized with only `-i` and `-F` (and `-d`), tcpcopy in the foreground: 1,000
/// requests (500 new connections, 500 over 10 keep-alive connections), each at the target once.
#[test]
fn intercept_daemon_with_only_i_and_f() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let intercept = start_intercept_daemon(&lab);
    let mut tcpcopy = start_tcpcopy(&lab, &[]);
    load(&lab, "10.77.0.20:80", "close", 500, 0, "/dc/");
    load(&lab, "10.77.0.20:80", "keepalive", 500, 10, "/dk/");
    let mut expected = paths("/dc/", 500);
    expected.extend(paths("/dk/", 500));
    let log = || tcpcopy.log();
    assert_each_once(
        &[(&online, &expected)],
        &target,
        &["/dc/", "/dk/"],
        &|| 0,
        &log,
    );
    let stats = final_line(&mut tcpcopy);
    assert!(counter(&stats, "created") >= 510, "{stats}");
    assert!(counter(&stats, "replies") > 0, "{stats}");
    intercept.stop();
}

// ---------------------------------------------------------------------------------------------
// Two online hosts

/// The usage notes' adserver example: two online hosts, each with its own nginx, its own
/// clients' traffic and its own tcpcopy (no `-c`), one target, one intercept. The target logs
/// exactly the sum of both online servers' requests of the run, each path once.
///
/// Both online servers are loaded by the one client host, one after the other, with disjoint
/// ephemeral port ranges: without `-c` both tcpcopys replay the client's own address, so a
/// source port the client used towards both servers at once would be one 4-tuple at the target
/// (a collision of the setup, not of the tools).
#[test]
fn two_online_hosts_into_one_target() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up_with(LabConfig {
        second_online: true,
        ..LabConfig::default()
    })
    .expect("lab up");
    let online1 = lab.nginx(Host::Online, 80).expect("online nginx");
    let online2 = lab.nginx(Host::Online2, 80).expect("second online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let replay = Replay::start(&lab, &[]);
    let tcpcopy2 = start_tcpcopy_with(
        &lab,
        Host::Online2,
        // The usage notes' form: no -i (the first online host's tcpcopy has -i eth0).
        &[
            "-x",
            "80-10.77.0.30:8080",
            "-s",
            "10.77.0.40",
            "--stats-interval",
            "1",
        ],
    );
    let mut expected = [BTreeSet::new(), BTreeSet::new()];
    for (i, (server, ports)) in [
        ("10.77.0.20:80", "32768 45999"),
        ("10.77.0.21:80", "46000 60999"),
    ]
    .into_iter()
    .enumerate()
    {
        let range = format!("net.ipv4.ip_local_port_range={ports}");
        let out = lab
            .run(Host::Client, "sysctl", &["-qw", &range])
            .expect("sysctl");
        assert!(out.status.success(), "sysctl -w {range}");
        let (close, keep) = (format!("/o{}c/", i + 1), format!("/o{}k/", i + 1));
        load(&lab, server, "close", 1000, 0, &close);
        load(&lab, server, "keepalive", 1000, 20, &keep);
        expected[i].extend(paths(&close, 1000));
        expected[i].extend(paths(&keep, 1000));
    }
    let logs = || {
        format!(
            "{}\n--- tcpcopy on online2 ---\n{}",
            replay.logs(),
            tcpcopy2.log()
        )
    };
    let seen = assert_each_once(
        &[(&online1, &expected[0]), (&online2, &expected[1])],
        &target,
        &["/o1c/", "/o1k/", "/o2c/", "/o2k/"],
        &|| 0,
        &logs,
    );
    // Nothing else reached either server: the target's whole log is the sum of theirs.
    assert_eq!(
        (online1.count(), online2.count(), target.count()),
        (2000, 2000, seen)
    );
    assert_eq!(seen, 4000);
    for prefix in ["/o1k/", "/o2k/"] {
        assert_eq!(target_connections(&target, prefix), 20, "{prefix}");
    }
    let mut tcpcopy2 = tcpcopy2;
    let stats2 = final_line(&mut tcpcopy2);
    let stats1 = replay.stop();
    for stats in [&stats1, &stats2] {
        assert!(counter(stats, "created") >= 1020, "{stats}");
    }
}

// ---------------------------------------------------------------------------------------------
// Frames seen on two interfaces
//
// The online host receives its traffic on two interfaces that carry the same frames: a bridge
// and its port, a VLAN sub-interface and its parent, a macvlan and its parent. tcpcopy runs
// with `-i eth0` (the baseline), with both interfaces listed, and with no `-i` (every
// interface), 1,000 requests each (500 new connections, 500 over 10 keep-alive connections).
// Every path reaches the target exactly once, and tcpcopy sent nothing twice: in its
// `--dump-sent` pcap no data segment (4-tuple, sequence number) appears more often than its own
// `retransmits` counter allows, and it absorbed no more client retransmissions than the
// client's kernel made (a frame captured twice would be absorbed as one).

/// (i) The online host's eth0 enslaved to a bridge br0 that holds its address (and eth0's
/// MAC): every frame to it is seen on eth0, then on br0.
#[test]
fn no_frame_replayed_twice_on_a_bridge() {
    if !lab::require_root() {
        return;
    }
    no_frame_replayed_twice(
        online_behind_a_bridge,
        &[
            ("bridge -i eth0", &["-i", "eth0"]),
            ("bridge -i eth0,br0", &["-i", "eth0,br0"]),
            ("bridge, no -i", &[]),
        ],
    );
}

/// (ii) The client and online hosts talk over VLAN 100 sub-interfaces eth0.100 (10.78.0.10 and
/// .20/24; the lab's bridge passes tagged frames as they are; the target routes 10.78.0.0/24
/// via the assistant): every frame is seen on eth0, then on eth0.100. Needs a kernel with
/// 802.1Q support (CONFIG_VLAN_8021Q), which the kernel of our machines and CI lacks (`ip link
/// add ... type vlan`: "Unknown device type"): so it is ignored by default and fails, naming
/// the cause, when run (`--ignored`) on such a kernel. The bridge and macvlan tests cover the
/// stacked-device case here.
#[test]
#[ignore = "needs a kernel with 802.1Q (CONFIG_VLAN_8021Q), which CI's lacks: run with --ignored where it has it"]
fn no_frame_replayed_twice_on_a_vlan() {
    if !lab::require_root() {
        return;
    }
    vlan_supported();
    no_frame_replayed_twice(
        client_and_online_over_vlan,
        &[
            ("vlan -i eth0", &["-i", "eth0"]),
            ("vlan -i eth0,eth0.100", &["-i", "eth0,eth0.100"]),
            ("vlan, no -i", &[]),
        ],
    );
}

/// (iii) The online host's address on a macvlan mv0 (passthru: eth0's MAC) over eth0: every
/// frame is seen on eth0, then on mv0. (The stacked-device case on kernels without 802.1Q.)
#[test]
fn no_frame_replayed_twice_on_a_macvlan() {
    if !lab::require_root() {
        return;
    }
    no_frame_replayed_twice(
        online_on_a_macvlan,
        &[
            ("macvlan -i eth0", &["-i", "eth0"]),
            ("macvlan -i eth0,mv0", &["-i", "eth0,mv0"]),
            ("macvlan, no -i", &[]),
        ],
    );
}

/// A lab shaped by `topology` (which returns the online server's address), nginx on the online
/// host and the target, intercept; then one [`replay_once_each`] run per capture mode.
fn no_frame_replayed_twice(topology: fn(&Lab) -> SocketAddrV4, modes: &[(&str, &[&str])]) {
    let lab = Lab::up().expect("lab up");
    let online_addr = topology(&lab);
    let online = lab
        .nginx_at(Host::Online, online_addr)
        .expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    lab.wait_port(Host::Client, online_addr, Duration::from_secs(10))
        .expect("the client reaches the online server");
    let _intercept = start_intercept(&lab, &["--stats-interval", "1"]);
    for (name, capture) in modes {
        let summary = replay_once_each(&lab, &online, &target, name, capture);
        eprintln!("{summary}");
    }
}

/// Checks that this kernel can make VLAN sub-interfaces (probed in a namespace of its own);
/// panics naming the cause when it cannot.
fn vlan_supported() {
    let ns = format!("tlvlanprobe{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip")
    };
    assert!(
        ip(&["netns", "add", &ns]).status.success(),
        "ip netns add {ns}"
    );
    let probe = ip(&[
        "-n", &ns, "link", "add", "link", "lo", "name", "lo.100", "type", "vlan", "id", "100",
    ]);
    let _ = ip(&["netns", "del", &ns]);
    assert!(
        probe.status.success(),
        "this kernel cannot make VLAN interfaces (CONFIG_VLAN_8021Q?): `ip link add ... type \
         vlan`: {}",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
}

/// One run of [`no_frame_replayed_twice`]: tcpcopy with `capture` flags and
/// `--dump-sent`, 500 new-connection and 500 keep-alive requests (10 connections) to `online`;
/// asserts as the test says and returns a summary line.
fn replay_once_each(
    lab: &Lab,
    online: &Nginx,
    target: &Nginx,
    name: &str,
    capture: &[&str],
) -> String {
    let tag: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>();
    let dump = lab.dir().join(format!("sent-{tag}.pcap"));
    let dump_arg = dump.to_string_lossy().into_owned();
    let mut args = capture.to_vec();
    args.extend([
        "-x",
        "80-10.77.0.30:8080",
        "-s",
        "10.77.0.40",
        "--stats-interval",
        "1",
        "--dump-sent",
        &dump_arg,
    ]);
    let mut tcpcopy = start_tcpcopy_with(lab, Host::Online, &args);
    let client_retransmits_before = lab
        .net_counter(Host::Client, "Tcp", "RetransSegs")
        .expect("client RetransSegs");
    let server = online.addr().to_string();
    let (close, keep) = (format!("/{tag}c/"), format!("/{tag}k/"));
    load(lab, &server, "close", 500, 0, &close);
    load(lab, &server, "keepalive", 500, 10, &keep);
    let mut expected = paths(&close, 500);
    expected.extend(paths(&keep, 500));
    let log = || format!("{name}: tcpcopy {args:?}\n{}", tcpcopy.log());
    // What this test is about is duplicates. A client that reuses a port while the replay of
    // the connection that had it is still in its handshake (the client closes in a millisecond,
    // the replay waits for the target's SYN-ACK through intercept) makes tcpcopy reset that
    // replay, and its request is lost (counted in port-reuse-reset; seen once in five runs):
    // as many paths may be missing, never more, and none may arrive twice.
    let reuse_resets = || {
        tcpcopy
            .log()
            .lines()
            .rev()
            .find(|l| l.contains("port-reuse-reset"))
            .map_or(0, |l| counter(l, "port-reuse-reset") as usize)
    };
    assert_each_once(
        &[(online, &expected)],
        target,
        &[&close, &keep],
        &reuse_resets,
        &log,
    );
    let client_retransmits = lab
        .net_counter(Host::Client, "Tcp", "RetransSegs")
        .expect("client RetransSegs")
        - client_retransmits_before;
    let stats = final_line(&mut tcpcopy);
    let sent = SentDump::read(&dump);
    assert_eq!(counter(&stats, "dump-dropped"), 0, "{name}: {stats}");
    assert_eq!(
        sent.records,
        counter(&stats, "dumped"),
        "{name}: records in {} vs the dumped counter: {stats}",
        dump.display()
    );
    assert!(
        sent.data >= 1000,
        "{name}: only {} data segments sent: {stats}",
        sent.data
    );
    let retransmits = counter(&stats, "retransmits");
    assert!(
        sent.repeated <= retransmits,
        "{name}: {} data segments sent again (e.g. {:?}) but tcpcopy retransmitted {retransmits}: \
         a captured frame was replayed twice\n{stats}",
        sent.repeated,
        sent.example
    );
    let absorbed = counter(&stats, "client-retransmits");
    assert!(
        absorbed <= client_retransmits,
        "{name}: tcpcopy absorbed {absorbed} client retransmissions but the client retransmitted \
         {client_retransmits} segments: frames were captured twice\n{stats}"
    );
    format!(
        "{name}: 1000 of 1000 paths once; sent {} packets ({} data, {} again), retransmits \
         {retransmits}, client-retransmits {absorbed} (client kernel {client_retransmits}), \
         captured {}",
        sent.records,
        sent.data,
        sent.repeated,
        counter(&stats, "captured")
    )
}

/// What a `--dump-sent` pcap holds (LINKTYPE_RAW: one IPv4 packet per record).
#[derive(Debug, Default)]
struct SentDump {
    /// Records in the file.
    records: u64,
    /// TCP segments with payload.
    data: u64,
    /// Data segments whose (4-tuple, sequence number) came earlier in the file.
    repeated: u64,
    /// One of them: (source, destination, sequence number, payload length).
    example: Option<(SocketAddrV4, SocketAddrV4, u32, usize)>,
}

impl SentDump {
    fn read(path: &Path) -> SentDump {
        let file =
            std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut reader = PcapReader::new(file).expect("a pcap file");
        let mut dump = SentDump::default();
        let mut seen: HashMap<(SocketAddrV4, SocketAddrV4, u32), u32> = HashMap::new();
        while let Some(packet) = reader.next_packet() {
            let packet = packet.expect("a whole pcap record");
            dump.records += 1;
            let ip = &packet.data[..];
            assert!(ip.len() >= 20 && ip[0] >> 4 == 4, "not IPv4: {ip:02x?}");
            if ip[9] != 6 {
                continue;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let tcp = &ip[ihl..total];
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            let payload = tcp.len() - data_offset;
            if payload == 0 {
                continue;
            }
            dump.data += 1;
            let addr = |a: &[u8], p: &[u8]| {
                SocketAddrV4::new(
                    Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                    u16::from_be_bytes([p[0], p[1]]),
                )
            };
            let source = addr(&ip[12..16], &tcp[0..2]);
            let destination = addr(&ip[16..20], &tcp[2..4]);
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let n = seen.entry((source, destination, seq)).or_default();
            *n += 1;
            if *n > 1 {
                dump.repeated += 1;
                dump.example
                    .get_or_insert((source, destination, seq, payload));
            }
        }
        dump
    }
}

/// Runs `cmd` (split on spaces) in `host`; it must succeed unless `best_effort`.
fn sh(lab: &Lab, host: Host, cmd: &str, best_effort: bool) {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let out = lab
        .run(host, words[0], &words[1..])
        .unwrap_or_else(|e| panic!("{cmd} in {}: {e:#}", host.name()));
    assert!(
        best_effort || out.status.success(),
        "`{cmd}` failed in {}: {}",
        host.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_text(host: Host) -> String {
    host.mac()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Moves the online host's address from eth0 to a new bridge br0 with eth0 as its port (and
/// eth0's MAC): every frame to the online host is seen on eth0, then on br0. Returns the
/// online server's address.
fn online_behind_a_bridge(lab: &Lab) -> SocketAddrV4 {
    let online = Host::Online;
    let mac = mac_text(online);
    for cmd in [
        "ip link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0".to_string(),
        format!("ip link set br0 address {mac}"),
        "ip addr del 10.77.0.20/24 dev eth0".to_string(),
        "ip link set eth0 master br0".to_string(),
        "ip addr add 10.77.0.20/24 dev br0".to_string(),
        "sysctl -qw net.ipv4.conf.br0.rp_filter=0".to_string(),
        "ip link set br0 up".to_string(),
    ] {
        sh(lab, online, &cmd, false);
    }
    sh(
        lab,
        online,
        "ethtool -K br0 tx off sg off tso off gso off gro off",
        true,
    );
    neighbours_on(lab, "br0");
    SocketAddrV4::new(online.addr(), 80)
}

/// Moves the online host's address from eth0 to a macvlan mv0 over it in passthru mode (which
/// keeps eth0's MAC): every frame to the online host is seen on eth0, then on mv0. Returns the
/// online server's address.
fn online_on_a_macvlan(lab: &Lab) -> SocketAddrV4 {
    let online = Host::Online;
    for cmd in [
        "ip link add mv0 link eth0 type macvlan mode passthru",
        "ip addr del 10.77.0.20/24 dev eth0",
        "ip addr add 10.77.0.20/24 dev mv0",
        "sysctl -qw net.ipv4.conf.mv0.rp_filter=0",
        "ip link set mv0 up",
    ] {
        sh(lab, online, cmd, false);
    }
    sh(
        lab,
        online,
        "ethtool -K mv0 tx off sg off tso off gso off gro off",
        true,
    );
    neighbours_on(lab, "mv0");
    SocketAddrV4::new(online.addr(), 80)
}

/// Permanent neighbour entries on the online host's `dev` for the other lab hosts.
fn neighbours_on(lab: &Lab, dev: &str) {
    for other in [Host::Client, Host::Target, Host::Assistant] {
        let cmd = format!(
            "ip neigh replace {} lladdr {} dev {dev} nud permanent",
            other.addr(),
            mac_text(other)
        );
        sh(lab, Host::Online, &cmd, false);
    }
}

/// Gives the client and the online host VLAN 100 sub-interfaces eth0.100 (10.78.0.10 and
/// 10.78.0.20/24; the lab's bridge passes tagged frames as they are), and the target a route
/// to 10.78.0.0/24 via the assistant. Returns the online server's address (10.78.0.20:80).
fn client_and_online_over_vlan(lab: &Lab) -> SocketAddrV4 {
    for (host, addr, peer, peer_host) in [
        (Host::Client, "10.78.0.10", "10.78.0.20", Host::Online),
        (Host::Online, "10.78.0.20", "10.78.0.10", Host::Client),
    ] {
        for cmd in [
            "ip link add link eth0 name eth0.100 type vlan id 100".to_string(),
            "sysctl -qw net.ipv4.conf.eth0/100.rp_filter=0".to_string(),
            format!("ip addr add {addr}/24 dev eth0.100"),
            "ip link set eth0.100 up".to_string(),
            format!(
                "ip neigh replace {peer} lladdr {} dev eth0.100 nud permanent",
                mac_text(peer_host)
            ),
        ] {
            sh(lab, host, &cmd, false);
        }
        sh(
            lab,
            host,
            "ethtool -K eth0.100 tx off sg off tso off gso off gro off",
            true,
        );
    }
    sh(
        lab,
        Host::Target,
        "ip route add 10.78.0.0/24 via 10.77.0.40 dev eth0",
        false,
    );
    SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 20), 80)
}
