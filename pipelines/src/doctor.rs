//! `tcpcopy-doctor`: checks that a host is set up for its part in a replay (online, target,
//! assistant) and says, for each problem, what it will cause and the command that fixes it.
//!
//! Two layers: facts are gathered from the system (`ip`, `ethtool`, `/proc`, `/sys`, a TCP
//! connect, a short AF_PACKET capture) by the `gather_*`/`diagnose_*` functions, and turned into
//! [`Verdict`]s by pure `check_*` functions that take the facts as values or as the text the
//! tools printed, so every verdict is unit-tested without a network.

use crate::tcpcopy::transform::Transfer;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx, PortError};
use engine::port::RxPort;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// As it should be.
    Ok,
    /// May cost replicated sessions; look at it.
    Warn,
    /// Replication will not work until fixed.
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// The outcome of one check: printed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// OK, WARN or FAIL.
    pub level: Level,
    /// What was checked and what was found.
    pub check: String,
    /// For WARN/FAIL: what it will cause.
    pub consequence: String,
    /// For WARN/FAIL: the command (or step) that fixes it.
    pub fix: String,
}

impl Verdict {
    /// A passed check.
    pub fn ok(check: impl Into<String>) -> Verdict {
        Verdict {
            level: Level::Ok,
            check: check.into(),
            consequence: String::new(),
            fix: String::new(),
        }
    }

    /// A warning with its likely consequence and fix.
    pub fn warn(
        check: impl Into<String>,
        consequence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Verdict {
        Verdict {
            level: Level::Warn,
            check: check.into(),
            consequence: consequence.into(),
            fix: fix.into(),
        }
    }

    /// A failure with its consequence and fix.
    pub fn fail(
        check: impl Into<String>,
        consequence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Verdict {
        Verdict {
            level: Level::Fail,
            check: check.into(),
            consequence: consequence.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Verdict {
    /// `OK   what` or `FAIL what | consequence: ... | fix: ...`, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4} {}", self.level, self.check)?;
        if self.level != Level::Ok {
            write!(
                f,
                " | consequence: {} | fix: {}",
                self.consequence, self.fix
            )?;
        }
        Ok(())
    }
}

/// The process exit status for a set of verdicts: 0 without a FAIL, 1 with one.
pub fn exit_status(verdicts: &[Verdict]) -> i32 {
    i32::from(verdicts.iter().any(|v| v.level == Level::Fail))
}

// ---------------------------------------------------------------------------------------------
// Facts and their parsers (pure)

/// One interface as `ip -o link show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    /// Its name (without `@peer`).
    pub name: String,
    /// The flags between `<` and `>` (`UP`, `LOWER_UP`, `LOOPBACK`, ...).
    pub flags: Vec<String>,
    /// The operational state (`UP`, `DOWN`, `UNKNOWN`, `LOWERLAYERDOWN`).
    pub state: String,
    /// Its MTU.
    pub mtu: Option<u32>,
}

impl LinkFacts {
    /// Administratively up (`ip link set IF up`).
    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }

    /// Has a carrier (`LOWER_UP`).
    pub fn has_carrier(&self) -> bool {
        self.flags.iter().any(|f| f == "LOWER_UP")
    }

    /// The loopback interface.
    pub fn is_loopback(&self) -> bool {
        self.flags.iter().any(|f| f == "LOOPBACK")
    }
}

/// Parses one line of `ip -o link show`, e.g.
/// `4: eth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP ...`.
pub fn parse_link(line: &str) -> Option<LinkFacts> {
    let mut words = line.split_whitespace();
    let _index = words.next()?.strip_suffix(':')?;
    let name = words.next()?.strip_suffix(':')?;
    let name = name.split('@').next()?.to_string();
    let flags = words.next()?;
    let flags = flags.strip_prefix('<')?.strip_suffix('>')?;
    let flags = flags
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    let rest: Vec<&str> = words.collect();
    let after = |key: &str| {
        rest.windows(2)
            .find(|w| w[0] == key)
            .map(|w| w[1].to_string())
    };
    Some(LinkFacts {
        name,
        flags,
        state: after("state").unwrap_or_default(),
        mtu: after("mtu").and_then(|m| m.parse().ok()),
    })
}

/// The process's effective user and capabilities (from `/proc/self/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Privileges {
    /// Effective user id.
    pub euid: Option<u32>,
    /// Effective capability set (`CapEff`).
    pub cap_eff: Option<u64>,
}

/// `CAP_NET_RAW`'s bit.
pub const CAP_NET_RAW: u32 = 13;

impl Privileges {
    /// May open AF_PACKET and raw sockets.
    pub fn can_capture(&self) -> bool {
        self.euid == Some(0) || self.cap_eff.is_some_and(|c| c & (1 << CAP_NET_RAW) != 0)
    }
}

/// Parses the `Uid:` and `CapEff:` lines of `/proc/self/status`.
pub fn parse_status(text: &str) -> Privileges {
    let mut p = Privileges::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            p.euid = rest.split_whitespace().nth(1).and_then(|u| u.parse().ok());
        } else if let Some(rest) = line.strip_prefix("CapEff:") {
            p.cap_eff = u64::from_str_radix(rest.trim(), 16).ok();
        }
    }
    p
}

/// One feature line of `ethtool -k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    /// The feature name, e.g. `generic-receive-offload`.
    pub name: String,
    /// Enabled.
    pub on: bool,
    /// Cannot be changed (`[fixed]`).
    pub fixed: bool,
}

/// Parses `ethtool -k IF` output (`name: on|off [fixed]` lines; the header is skipped).
pub fn parse_offloads(text: &str) -> Vec<Offload> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(':')?;
            let mut words = rest.split_whitespace();
            let on = match words.next()? {
                "on" => true,
                "off" => false,
                _ => return None,
            };
            Some(Offload {
                name: name.trim().to_string(),
                on,
                fixed: words.any(|w| w.contains("fixed")),
            })
        })
        .collect()
}

/// What `ip -4 route get ADDR` says about a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    /// The route type: `unicast`, or the keyword it starts with (`local`, `unreachable`,
    /// `blackhole`, `prohibit`, `broadcast`, ...).
    pub kind: String,
    /// The gateway, if not on-link.
    pub via: Option<Ipv4Addr>,
    /// The outgoing interface.
    pub dev: Option<String>,
    /// The preferred source address.
    pub src: Option<Ipv4Addr>,
}

/// Parses the first line of `ip -4 route get ADDR`, e.g.
/// `10.77.0.10 via 10.77.0.40 dev eth0 src 10.77.0.30 uid 0` or `local 127.0.0.1 dev lo ...`.
pub fn parse_route_get(text: &str) -> Option<RouteFacts> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let first = *words.first()?;
    let kind = if first.parse::<Ipv4Addr>().is_ok() {
        "unicast".to_string()
    } else {
        first.to_string()
    };
    let after = |key: &str| words.windows(2).find(|w| w[0] == key).map(|w| w[1]);
    Some(RouteFacts {
        kind,
        via: after("via").and_then(|v| v.parse().ok()),
        dev: after("dev").map(str::to_string),
        src: after("src").and_then(|v| v.parse().ok()),
    })
}

/// Local ports of the sockets in a `/proc/net/tcp`, `tcp6`, `udp` or `udp6` table whose state
/// is `state` (`0A`: TCP LISTEN; `07`: an unconnected UDP socket).
pub fn socket_ports(table: &str, state: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let local = words.get(1)?;
            if !words.get(3)?.eq_ignore_ascii_case(state) {
                return None;
            }
            let port = local.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// One hugepage pool (`/sys/kernel/mm/hugepages/hugepages-<size>kB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugepagePool {
    /// Page size in kB.
    pub size_kb: u64,
    /// Pages reserved (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`).
    pub free: u64,
}

/// A client address or network of `--clients`: `10.0.0.10`, `10.9.9.0/24` or `10.9.9.x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientNet {
    /// The network address (host bits cleared).
    pub network: Ipv4Addr,
    /// The prefix length (32 for one address).
    pub prefix: u8,
}

impl ClientNet {
    /// Parses one item: an address, `a.b.c.d/len` or tcpcopy's `a.b.c.x` form (a /24).
    ///
    /// # Errors
    /// What is wrong, with the accepted forms.
    pub fn parse(text: &str) -> Result<ClientNet, String> {
        let text = text.trim();
        let bad = |why: &str| {
            format!(
                "bad --clients item '{text}': {why}; the forms are 10.0.0.10, 10.9.9.0/24 or 10.9.9.x"
            )
        };
        let (addr, prefix) = if let Some(base) = text.strip_suffix(".x") {
            (format!("{base}.0"), 24)
        } else if let Some((addr, len)) = text.split_once('/') {
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| bad("the prefix length is not 0..32"))?;
            (addr.to_string(), len)
        } else {
            (text.to_string(), 32)
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| bad("not an IPv4 address or network"))?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Ok(ClientNet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// A comma list of items.
    ///
    /// # Errors
    /// The first bad item.
    pub fn parse_list(text: &str) -> Result<Vec<ClientNet>, String> {
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(ClientNet::parse)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err("--clients is empty; give addresses or networks, e.g. 10.0.0.10,10.9.9.0/24".into())
                } else {
                    Ok(v)
                }
            })
    }

    /// The address whose route is checked: the first host of the network (the address
    /// itself for a /32 or /31).
    pub fn sample(&self) -> Ipv4Addr {
        if self.prefix >= 31 {
            self.network
        } else {
            Ipv4Addr::from(u32::from(self.network) + 1)
        }
    }
}

impl fmt::Display for ClientNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 32 {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix)
        }
    }
}

/// Why a TCP connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// RST: nothing listens there.
    Refused,
    /// No answer within the timeout.
    TimedOut(Duration),
    /// Another error (no route, host unreachable, ...), as the OS said it.
    Other(String),
}

// ---------------------------------------------------------------------------------------------
// Checks (pure)

/// The error text of a command that could not be run at all (see `command_output`).
fn tool_missing(error: &str) -> bool {
    error.starts_with("cannot run ")
}

fn missing_ip(what: &str, error: &str) -> Verdict {
    Verdict::warn(
        format!("{what}: cannot check ({error})"),
        "this check did not run",
        "apt-get install iproute2, then run the doctor again",
    )
}

/// The interface the tool captures on: exists, is up, has a carrier.
pub fn check_link(iface: &str, flag: &str, link: Result<&str, &str>) -> Verdict {
    let what = format!("interface {iface} ({flag})");
    let facts = match link {
        Ok(text) => parse_link(text.lines().next().unwrap_or("")),
        Err(e) if tool_missing(e) => return missing_ip(&what, e),
        Err(e) => {
            return Verdict::fail(
                format!("{what}: not found ({})", e.trim()),
                "nothing can be captured on it: the tool refuses to start",
                format!("pick an interface of this host (`ip -br link`) for {flag}; in a container or namespace, run where the interface is"),
            )
        }
    };
    let Some(facts) = facts else {
        return Verdict::warn(
            format!("{what}: cannot read its state from `ip -o link show dev {iface}`"),
            "unknown whether it is up",
            format!("check `ip link show {iface}`"),
        );
    };
    let mtu = facts.mtu.map(|m| format!(", mtu {m}")).unwrap_or_default();
    if !facts.is_up() {
        Verdict::fail(
            format!("{what}: exists but is down"),
            "no frames arrive on it: nothing is captured",
            format!("ip link set {iface} up"),
        )
    } else if !facts.has_carrier() && facts.state != "UNKNOWN" {
        Verdict::fail(
            format!("{what}: up but has no carrier (state {})", facts.state),
            "no frames arrive on it: nothing is captured",
            "check the cable or switch port (for a veth: bring its peer up)",
        )
    } else {
        Verdict::ok(format!("{what}: exists and is up{mtu}"))
    }
}

/// Whether the process may open capture and raw sockets (`tool` is what needs them).
pub fn check_capture_permission(tool: &str, privileges: &Privileges) -> Verdict {
    if privileges.can_capture() {
        let who = if privileges.euid == Some(0) {
            "root"
        } else {
            "CAP_NET_RAW"
        };
        Verdict::ok(format!("capture permission: {who}"))
    } else {
        Verdict::fail(
            format!(
                "capture permission: not root and no CAP_NET_RAW (uid {})",
                privileges
                    .euid
                    .map_or_else(|| "?".to_string(), |u| u.to_string())
            ),
            format!("{tool} cannot open its AF_PACKET capture socket and exits at start"),
            format!(
                "run {tool} as root, or `setcap cap_net_raw,cap_net_admin+ep $(command -v {tool})`"
            ),
        )
    }
}

/// The capture filter compiles (`compiled`: the number of BPF instructions, or libpcap's error).
pub fn check_filter(tool: &str, filter: &str, compiled: Result<usize, String>) -> Verdict {
    match compiled {
        Ok(n) => Verdict::ok(format!(
            "capture filter '{filter}' compiles ({n} BPF instructions)"
        )),
        Err(e) => Verdict::fail(
            format!("capture filter '{filter}' does not compile: {e}"),
            format!("{tool} refuses to start"),
            format!("correct -F (pcap syntax; try it with `tcpdump -d '{filter}'`)"),
        ),
    }
}

/// What the short live capture counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrafficCount {
    /// Incoming frames the filter matched.
    pub matched: u64,
    /// All incoming frames.
    pub total: u64,
}

/// The capture filter matches live traffic: `count` is what a capture of `seconds` saw, or why
/// it could not run.
pub fn check_traffic(
    iface: &str,
    filter: &str,
    seconds: u64,
    count: Result<TrafficCount, String>,
) -> Verdict {
    let count = match count {
        Ok(c) => c,
        Err(e) => {
            return Verdict::warn(
                format!("live capture on {iface} skipped: {e}"),
                "unknown whether the filter matches the clients' requests",
                "run the doctor as root (or with CAP_NET_RAW) on the online host",
            )
        }
    };
    let what = format!(
        "filter '{filter}' matched {} of {} incoming frames on {iface} in {seconds} s",
        count.matched, count.total
    );
    if count.matched > 0 {
        Verdict::ok(what)
    } else if count.total == 0 {
        Verdict::warn(
            what,
            "nothing arrived on this interface at all: no client traffic during the test, or the requests arrive on another interface (bond, VLAN, the mirror port); tcpcopy would replay nothing",
            format!("send requests to the online server while the doctor listens (--listen-s 10), or find the interface that carries them: `tcpdump -ni any -c 20 '{filter}'`"),
        )
    } else {
        Verdict::warn(
            what,
            "traffic arrives but none matches: the -x online port (or address) is not what clients use, -F is wrong, or no client request came during the test; tcpcopy would replay nothing",
            format!("see which ports clients use: `tcpdump -ni {iface} -c 20 'tcp[tcpflags] & tcp-syn != 0'`, then fix -x (or -F)"),
        )
    }
}

/// Receive offloads that merge segments (GRO, LRO, hardware GRO) and segmentation offloads
/// (TSO/GSO) on the capture interface, from `ethtool -k` output.
pub fn check_offloads(iface: &str, ethtool: Result<&str, &str>) -> Vec<Verdict> {
    let text = match ethtool {
        Ok(t) => t,
        Err(e) => {
            return vec![Verdict::warn(
                format!("offloads of {iface}: cannot read them ({})", e.trim()),
                "unknown whether captured requests are merged into super-frames (GRO/LRO)",
                "apt-get install ethtool, then run the doctor again",
            )]
        }
    };
    let features = parse_offloads(text);
    let get = |name: &str| features.iter().find(|f| f.name == name);
    let mut out = Vec::new();
    let merging: Vec<(&str, &Offload)> = [
        ("gro", "generic-receive-offload"),
        ("lro", "large-receive-offload"),
        ("rx-gro-hw", "rx-gro-hw"),
    ]
    .into_iter()
    .filter_map(|(short, name)| get(name).filter(|f| f.on).map(|f| (short, f)))
    .collect();
    if merging.is_empty() {
        out.push(Verdict::ok(format!(
            "receive offloads of {iface}: GRO/LRO off (captures keep the clients' segments)"
        )));
    } else {
        let names: Vec<&str> = merging.iter().map(|(s, _)| *s).collect();
        let changeable: Vec<&str> = merging
            .iter()
            .filter(|(_, f)| !f.fixed)
            .map(|(s, _)| *s)
            .collect();
        let fix = if changeable.is_empty() {
            format!(
                "the driver cannot turn {} off ([fixed]): capture on another interface (a mirror port) or accept merged frames",
                names.join("/")
            )
        } else {
            let args: Vec<String> = changeable.iter().map(|s| format!("{s} off")).collect();
            format!("ethtool -K {iface} {}", args.join(" "))
        };
        out.push(Verdict::warn(
            format!("receive offloads of {iface}: {} on", names.join(", ")),
            "the kernel merges the clients' segments into super-frames before capture: tcpcopy must split them again at -M bytes (a -M above the path MTU to the target means refused packets: tx-errors, lost sessions), and the target sees other segment boundaries than the online server did",
            fix,
        ));
    }
    let segmenting: Vec<&str> = [
        ("tso", "tcp-segmentation-offload"),
        ("gso", "generic-segmentation-offload"),
    ]
    .into_iter()
    .filter(|(_, name)| get(name).is_some_and(|f| f.on))
    .map(|(s, _)| s)
    .collect();
    if segmenting.is_empty() {
        out.push(Verdict::ok(format!(
            "segmentation offloads of {iface}: TSO/GSO off"
        )));
    } else {
        out.push(Verdict::ok(format!(
            "segmentation offloads of {iface}: {} on (harmless: they only shape what this host sends, which the capture skips)",
            segmenting.join(", ")
        )));
    }
    out
}

/// The online host has a route to a target (`route`: `ip -4 route get` output or its error).
pub fn check_target_route(target: Ipv4Addr, route: Result<&str, &str>) -> Verdict {
    let what = format!("route to the target {target}");
    let facts = match route {
        Ok(text) => parse_route_get(text),
        Err(e) if tool_missing(e) => return missing_ip(&what, e),
        Err(e) => {
            return Verdict::fail(
                format!("{what}: none ({})", e.trim()),
                "every replayed packet fails to send (tx-errors): nothing reaches the target",
                format!("ip route add {target}/32 via GATEWAY (a router that reaches the target)"),
            )
        }
    };
    let Some(facts) = facts else {
        return Verdict::warn(
            format!("{what}: unreadable `ip route get` output"),
            "unknown whether the target is reachable",
            format!("check `ip route get {target}`"),
        );
    };
    let dev = facts.dev.as_deref().unwrap_or("?");
    match facts.kind.as_str() {
        "unicast" => Verdict::ok(match facts.via {
            Some(via) => format!("{what}: via {via} dev {dev}"),
            None => format!("{what}: on-link, dev {dev}"),
        }),
        "local" => Verdict::warn(
            format!("{what}: it is an address of this host"),
            "the replay goes to this host itself, whose replies never go through the assistant",
            "use the target server's own address in -x",
        ),
        kind => Verdict::fail(
            format!("{what}: {kind}"),
            "every replayed packet fails to send (tx-errors): nothing reaches the target",
            format!("ip route replace {target}/32 via GATEWAY (a router that reaches the target)"),
        ),
    }
}

/// An intercept (`-s`) accepts TCP connections from the online host.
pub fn check_intercept_reachable(
    addr: SocketAddrV4,
    outcome: Result<(), ConnectFailure>,
) -> Verdict {
    let what = format!("intercept {addr}");
    match outcome {
        Ok(()) => Verdict::ok(format!("{what}: accepts connections")),
        Err(ConnectFailure::Refused) => Verdict::fail(
            format!("{what}: unreachable (connection refused)"),
            "tcpcopy learns none of the target's replies: sessions are created but never established, nothing replicates",
            format!(
                "start intercept on {} (`intercept -i IF -F 'tcp and src port TARGET_PORT'`); if it runs, it listens on another port (match tcpcopy's -p / -s ip:port and intercept's -p) or address (intercept -b), or uses --transport udp",
                addr.ip()
            ),
        ),
        Err(ConnectFailure::TimedOut(t)) => Verdict::fail(
            format!("{what}: unreachable (no answer in {} ms)", t.as_millis()),
            "tcpcopy learns none of the target's replies: nothing replicates",
            format!(
                "a firewall drops the connection, or {} is not the assistant's address: open TCP port {} on the assistant (`iptables -I INPUT -p tcp --dport {} -j ACCEPT`) and check -s",
                addr.ip(),
                addr.port(),
                addr.port()
            ),
        ),
        Err(ConnectFailure::Other(e)) => Verdict::fail(
            format!("{what}: unreachable ({e})"),
            "tcpcopy learns none of the target's replies: nothing replicates",
            format!("check the address in -s and the route to it: `ip route get {}`", addr.ip()),
        ),
    }
}

/// Hugepages for `--dpdk`: some reserved, some free, hugetlbfs mounted.
pub fn check_hugepages(pools: &[HugepagePool], hugetlbfs_mounts: usize) -> Verdict {
    let total: u64 = pools.iter().map(|p| p.total).sum();
    let free: u64 = pools.iter().map(|p| p.free).sum();
    let describe: Vec<String> = pools
        .iter()
        .filter(|p| p.total > 0)
        .map(|p| format!("{} x {} kB ({} free)", p.total, p.size_kb, p.free))
        .collect();
    if total == 0 {
        Verdict::fail(
            "hugepages: none reserved",
            "DPDK's EAL cannot start: tcpcopy --dpdk-* exits with 'no hugepages'",
            "sudo scripts/hugepages.sh reserve 512   (release later with scripts/hugepages.sh release)",
        )
    } else if free == 0 {
        Verdict::warn(
            format!("hugepages: {}, none free", describe.join(", ")),
            "another DPDK process holds them all: EAL fails to allocate its memory",
            "sudo scripts/hugepages.sh reserve N with N above the pages in use (scripts/hugepages.sh status)",
        )
    } else if hugetlbfs_mounts == 0 {
        Verdict::warn(
            format!(
                "hugepages: {} but no hugetlbfs mounted",
                describe.join(", ")
            ),
            "EAL cannot map the pages unless it runs with --dpdk-in-memory",
            "sudo scripts/hugepages.sh reserve 512 (mounts hugetlbfs), or pass --dpdk-in-memory",
        )
    } else {
        Verdict::ok(format!(
            "hugepages: {}, hugetlbfs mounted",
            describe.join(", ")
        ))
    }
}

/// On the target: the route back to a client address or network goes via the assistant.
pub fn check_client_route(
    client: &ClientNet,
    assistant: Ipv4Addr,
    route: Result<&str, &str>,
) -> Verdict {
    let sample = client.sample();
    let what = if client.prefix == 32 {
        format!("route to client {client}")
    } else {
        format!("route to clients {client} (sample {sample})")
    };
    let prefix = if client.prefix == 32 {
        format!("{}/32", client.network)
    } else {
        client.to_string()
    };
    let fix = format!("ip route replace {prefix} via {assistant}");
    let consequence = "the target's replies to these clients bypass the assistant: intercept never sees them, tcpcopy's sessions are created but never established, nothing replicates";
    let facts = match route {
        Ok(text) => parse_route_get(text),
        Err(e) if tool_missing(e) => return missing_ip(&what, e),
        Err(e) => {
            return Verdict::fail(
                format!("{what}: none ({})", e.trim()),
                "the target cannot answer these clients at all: nothing replicates",
                fix,
            )
        }
    };
    let Some(facts) = facts else {
        return Verdict::warn(
            format!("{what}: unreadable `ip route get` output"),
            "unknown where the replies go",
            format!("check `ip route get {sample}`"),
        );
    };
    let dev = facts.dev.as_deref().unwrap_or("?");
    match (facts.kind.as_str(), facts.via) {
        ("unicast", Some(via)) if via == assistant => {
            Verdict::ok(format!("{what}: via the assistant {assistant} dev {dev}"))
        }
        ("unicast", Some(via)) => Verdict::fail(
            format!("{what}: via {via}, not the assistant {assistant}"),
            consequence,
            fix,
        ),
        ("unicast", None) => Verdict::fail(
            format!("{what}: goes straight out of {dev}, not via the assistant {assistant}"),
            consequence,
            fix,
        ),
        ("local", _) => Verdict::fail(
            format!("{what}: it is an address of this host"),
            "the target answers itself: replies never leave it",
            "replay with other client addresses (tcpcopy -c) and route those via the assistant",
        ),
        (kind, _) => Verdict::fail(format!("{what}: {kind}"), consequence, fix),
    }
}

/// The effective reverse-path filter mode of an interface: the larger of `all` and its own.
pub fn effective_rp_filter(all: Option<u8>, iface: Option<u8>) -> Option<u8> {
    match (all, iface) {
        (Some(a), Some(i)) => Some(a.max(i)),
        (a, i) => a.or(i),
    }
}

fn rp_mode(v: u8) -> &'static str {
    match v {
        0 => "off",
        1 => "strict",
        _ => "loose",
    }
}

/// On the target: rp_filter on the interface of the route back to the clients.
/// `interfaces_up` counts the non-loopback interfaces that are up.
pub fn check_target_rp_filter(
    iface: &str,
    all: Option<u8>,
    own: Option<u8>,
    interfaces_up: usize,
) -> Verdict {
    let Some(mode) = effective_rp_filter(all, own) else {
        return Verdict::warn(
            format!("rp_filter on {iface}: cannot read it"),
            "unknown whether replayed packets are dropped on arrival",
            format!("sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{iface}.rp_filter"),
        );
    };
    let what = format!("rp_filter on {iface}: {mode} ({})", rp_mode(mode));
    if mode != 1 {
        return Verdict::ok(what);
    }
    if interfaces_up <= 1 {
        Verdict::ok(format!(
            "{what}: fine here: the replayed packets from the client addresses arrive on {iface}, the interface of the route back to them, so the strict check passes although the route is asymmetric (it goes via the assistant)"
        ))
    } else {
        Verdict::warn(
            format!("{what} with {interfaces_up} interfaces up"),
            format!("replayed packets that arrive on another interface than {iface} (the route back to the clients) are dropped silently by the strict check"),
            format!("sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{iface}.rp_filter=2 (loose), and the same for the interface the replay arrives on"),
        )
    }
}

/// On the target: the service under test listens on `port`.
pub fn check_service_port(port: u16, listening: bool) -> Verdict {
    if listening {
        Verdict::ok(format!("service port {port}: listening"))
    } else {
        Verdict::fail(
            format!("service port {port}: nothing listens on TCP port {port}"),
            "the target resets every replayed SYN (target-rst): nothing replicates",
            format!("start the service under test on port {port} (check with `ss -ltn 'sport = :{port}'`), or give -x the port it uses"),
        )
    }
}

/// On the assistant: IP forwarding must be off so the target's replies die there.
pub fn check_ip_forward(value: Option<u8>) -> Verdict {
    match value {
        Some(0) => Verdict::ok("net.ipv4.ip_forward = 0: the target's replies end here after capture"),
        Some(v) => Verdict::fail(
            format!("net.ipv4.ip_forward = {v}"),
            "the assistant forwards the target's SYN-ACKs to the real clients, which reset them: the target closes the replayed sessions and nothing replicates",
            "sysctl -w net.ipv4.ip_forward=0 (and set it in /etc/sysctl.conf so it stays)",
        ),
        None => Verdict::warn(
            "net.ipv4.ip_forward: cannot read it",
            "with 1 the target's replies reach the real clients, which reset them",
            "sysctl net.ipv4.ip_forward (must be 0)",
        ),
    }
}

/// On the assistant: rp_filter does not hide the replies from intercept (explained).
pub fn check_assistant_rp_filter(iface: &str, all: Option<u8>, own: Option<u8>) -> Verdict {
    match effective_rp_filter(all, own) {
        Some(mode) => Verdict::ok(format!(
            "rp_filter on {iface}: {mode} ({}): no effect on intercept: its AF_PACKET capture sees the target's replies before the IP layer, which drops them anyway (ip_forward=0)",
            rp_mode(mode)
        )),
        None => Verdict::ok(format!(
            "rp_filter on {iface}: unreadable, and irrelevant: intercept captures before the IP layer"
        )),
    }
}

/// On the assistant: intercept listens on its control port (TCP, or UDP with `--transport udp`).
pub fn check_intercept_listening(port: u16, tcp: bool, udp: bool) -> Verdict {
    match (tcp, udp) {
        (true, _) => Verdict::ok(format!("intercept port {port}: listening (TCP)")),
        (false, true) => Verdict::ok(format!(
            "intercept port {port}: bound (UDP: tcpcopy needs --transport udp too)"
        )),
        (false, false) => Verdict::fail(
            format!("intercept port {port}: nothing listens on it"),
            "tcpcopy cannot connect: it learns none of the target's replies and nothing replicates",
            format!("start intercept: `intercept -i IF -F 'tcp and src host TARGET_IP and src port TARGET_PORT' -p {port}`"),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Gathering facts (system access)

/// Runs a command and returns its standard output, or its error text when it fails.
fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(if err.is_empty() {
                format!("{program} exited with {}", out.status)
            } else {
                err
            })
        }
        Err(e) => Err(format!("cannot run {program}: {e}")),
    }
}

fn ip_link(iface: &str) -> Result<String, String> {
    command_output("ip", &["-o", "link", "show", "dev", iface])
}

fn route_get(addr: Ipv4Addr) -> Result<String, String> {
    command_output("ip", &["-4", "route", "get", &addr.to_string()])
}

fn read_u8(path: &str) -> Option<u8> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn rp_filter(iface: &str) -> (Option<u8>, Option<u8>) {
    (
        read_u8("/proc/sys/net/ipv4/conf/all/rp_filter"),
        read_u8(&format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter")),
    )
}

fn privileges() -> Privileges {
    parse_status(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

fn interfaces_up() -> usize {
    command_output("ip", &["-o", "link", "show"])
        .map(|text| {
            text.lines()
                .filter_map(parse_link)
                .filter(|l| !l.is_loopback() && l.is_up())
                .count()
        })
        .unwrap_or(1)
}

fn proc_ports(tables: &[&str], state: &str) -> Vec<u16> {
    tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|t| socket_ports(&t, state))
        .collect()
}

fn tcp_listening(port: u16) -> bool {
    proc_ports(&["/proc/net/tcp", "/proc/net/tcp6"], "0A").contains(&port)
}

fn udp_bound(port: u16) -> bool {
    proc_ports(&["/proc/net/udp", "/proc/net/udp6"], "07").contains(&port)
}

fn hugepage_pools() -> Vec<HugepagePool> {
    let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/hugepages") else {
        return Vec::new();
    };
    let mut pools: Vec<HugepagePool> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let size_kb = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let read = |f: &str| -> Option<u64> {
                std::fs::read_to_string(e.path().join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            Some(HugepagePool {
                size_kb,
                total: read("nr_hugepages")?,
                free: read("free_hugepages")?,
            })
        })
        .collect();
    pools.sort_by_key(|p| p.size_kb);
    pools
}

fn hugetlbfs_mounts() -> usize {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        .count()
}

fn connect(addr: SocketAddrV4, timeout: Duration) -> Result<(), ConnectFailure> {
    match TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                ConnectFailure::TimedOut(timeout)
            }
            _ => ConnectFailure::Other(e.to_string()),
        }),
    }
}

/// Captures on `iface` for `window` with `filter` and without, counting incoming frames.
///
/// # Errors
/// A capture socket cannot be opened (permission, interface, filter), with the cause.
pub fn count_traffic(iface: &str, filter: &str, window: Duration) -> Result<TrafficCount, String> {
    let open = |filter: Option<String>| {
        AfPacketRx::open(&AfPacketConfig {
            interface: iface.to_string(),
            filter,
            block_size: 1 << 16,
            block_count: 16,
            snaplen: 256,
            ..AfPacketConfig::default()
        })
        .map_err(|e: PortError| e.to_string())
    };
    let mut matched = open(Some(filter.to_string()))?;
    let mut all = open(None)?;
    let mut count = TrafficCount::default();
    let deadline = Instant::now() + window;
    loop {
        let a = matched
            .rx_burst(256, &mut |_| count.matched += 1)
            .map_err(|e| e.to_string())?;
        let b = all
            .rx_burst(256, &mut |_| count.total += 1)
            .map_err(|e| e.to_string())?;
        if Instant::now() >= deadline {
            // Take what is still queued in either ring (bounded: the window is over).
            for _ in 0..64 {
                let a = matched
                    .rx_burst(256, &mut |_| count.matched += 1)
                    .map_err(|e| e.to_string())?;
                let b = all
                    .rx_burst(256, &mut |_| count.total += 1)
                    .map_err(|e| e.to_string())?;
                if a == 0 && b == 0 {
                    break;
                }
            }
            break;
        }
        if a == 0 && b == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(count)
}

/// What `tcpcopy-doctor online` checks.
#[derive(Debug, Clone)]
pub struct OnlineOptions {
    /// `-i`: the capture interface (`None`: the interface of the route to the first target).
    pub interface: Option<String>,
    /// `-x` transfers.
    pub transfers: Vec<Transfer>,
    /// `-s` intercepts (with `-p` applied).
    pub intercepts: Vec<SocketAddrV4>,
    /// `-c` as given (already validated), if any.
    pub clients: Option<String>,
    /// `-F`, or the filter made from `-x`.
    pub filter: String,
    /// `--listen-s`: how long to capture live traffic (0: skip).
    pub listen: Duration,
    /// `--dpdk`: check hugepages too.
    pub dpdk: bool,
    /// Timeout of the TCP connect to each intercept.
    pub connect_timeout: Duration,
}

/// Runs the online host's checks, handing each verdict to `report` as soon as it is known.
pub fn diagnose_online(options: &OnlineOptions, report: &mut dyn FnMut(Verdict)) {
    let mut targets: Vec<Ipv4Addr> = options.transfers.iter().map(|t| t.target_ip).collect();
    targets.sort();
    targets.dedup();
    let iface = match &options.interface {
        Some(i) => i.clone(),
        None => {
            let dev = targets
                .first()
                .and_then(|t| route_get(*t).ok())
                .and_then(|text| parse_route_get(&text))
                .and_then(|r| r.dev);
            match dev {
                Some(dev) => {
                    report(Verdict::ok(format!(
                        "no -i given: checking {dev}, the interface of the route to the target (give -i for the one clients reach)"
                    )));
                    dev
                }
                None => {
                    report(Verdict::fail(
                        "no -i given and no route to the target to guess it from",
                        "unknown capture interface",
                        "give -i IFACE (the interface the clients' requests arrive on)",
                    ));
                    String::new()
                }
            }
        }
    };
    let link = if iface.is_empty() {
        None
    } else {
        let link = ip_link(&iface);
        let verdict = check_link(&iface, "-i", link.as_deref().map_err(String::as_str));
        let exists = link.is_ok();
        report(verdict);
        Some(exists)
    };
    let privileges = privileges();
    report(check_capture_permission("tcpcopy", &privileges));
    let compiled = engine::port::afpacket::compile_filter(&options.filter, 262_144)
        .map(|p| p.len())
        .map_err(|e| match e {
            PortError::BadFilter { message, .. } => message,
            other => other.to_string(),
        });
    let filter_ok = compiled.is_ok();
    report(check_filter("tcpcopy", &options.filter, compiled));
    if link == Some(true) && filter_ok && !options.listen.is_zero() {
        let count = if privileges.can_capture() {
            count_traffic(&iface, &options.filter, options.listen)
        } else {
            Err("needs root or CAP_NET_RAW".to_string())
        };
        report(check_traffic(
            &iface,
            &options.filter,
            options.listen.as_secs(),
            count,
        ));
    }
    if link == Some(true) {
        let ethtool = command_output("ethtool", &["-k", &iface]);
        for v in check_offloads(&iface, ethtool.as_deref().map_err(String::as_str)) {
            report(v);
        }
    }
    for target in &targets {
        let route = route_get(*target);
        report(check_target_route(
            *target,
            route.as_deref().map_err(String::as_str),
        ));
    }
    if let Some(clients) = &options.clients {
        report(Verdict::ok(format!(
            "-c {clients}: replayed sessions use these addresses; the target must route them via the assistant (check there: tcpcopy-doctor target --clients {clients} --assistant ASSISTANT_IP)"
        )));
    }
    for addr in &options.intercepts {
        report(check_intercept_reachable(
            *addr,
            connect(*addr, options.connect_timeout),
        ));
    }
    if options.dpdk {
        report(check_hugepages(&hugepage_pools(), hugetlbfs_mounts()));
    }
}

/// What `tcpcopy-doctor target` checks.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// `--clients`: the (replayed) client addresses and networks.
    pub clients: Vec<ClientNet>,
    /// `--assistant`: the assistant's address.
    pub assistant: Ipv4Addr,
    /// `--port`: the service port under test.
    pub port: Option<u16>,
}

/// Runs the target host's checks.
pub fn diagnose_target(options: &TargetOptions, report: &mut dyn FnMut(Verdict)) {
    let mut devices: Vec<String> = Vec::new();
    for client in &options.clients {
        let route = route_get(client.sample());
        if let Some(dev) = route
            .as_deref()
            .ok()
            .and_then(parse_route_get)
            .and_then(|r| r.dev)
        {
            if !devices.contains(&dev) {
                devices.push(dev);
            }
        }
        report(check_client_route(
            client,
            options.assistant,
            route.as_deref().map_err(String::as_str),
        ));
    }
    let up = interfaces_up();
    for dev in &devices {
        let (all, own) = rp_filter(dev);
        report(check_target_rp_filter(dev, all, own, up));
    }
    if let Some(port) = options.port {
        report(check_service_port(port, tcp_listening(port)));
    }
}

/// What `tcpcopy-doctor assistant` checks.
#[derive(Debug, Clone)]
pub struct AssistantOptions {
    /// `-i`: intercept's capture interface.
    pub interface: Option<String>,
    /// `-F`: intercept's capture filter.
    pub filter: Option<String>,
    /// `--port`: intercept's control port.
    pub port: u16,
}

/// Runs the assistant host's checks.
pub fn diagnose_assistant(options: &AssistantOptions, report: &mut dyn FnMut(Verdict)) {
    report(check_ip_forward(read_u8("/proc/sys/net/ipv4/ip_forward")));
    if let Some(iface) = &options.interface {
        let link = ip_link(iface);
        report(check_link(
            iface,
            "-i",
            link.as_deref().map_err(String::as_str),
        ));
        let (all, own) = rp_filter(iface);
        report(check_assistant_rp_filter(iface, all, own));
        report(check_capture_permission("intercept", &privileges()));
    }
    if let Some(filter) = &options.filter {
        let compiled = engine::port::afpacket::compile_filter(filter, 262_144)
            .map(|p| p.len())
            .map_err(|e| match e {
                PortError::BadFilter { message, .. } => message,
                other => other.to_string(),
            });
        report(check_filter("intercept", filter, compiled));
    }
    report(check_intercept_listening(
        options.port,
        tcp_listening(options.port),
        udp_bound(options.port),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(v: &Verdict, level: Level, words: &[&str]) {
        let line = v.to_string();
        assert_eq!(v.level, level, "{line}");
        for w in words {
            assert!(line.contains(w), "'{w}' missing from: {line}");
        }
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn verdict_lines() {
        assert_eq!(Verdict::ok("x: fine").to_string(), "OK   x: fine");
        assert_eq!(
            Verdict::fail("x", "y", "z").to_string(),
            "FAIL x | consequence: y | fix: z"
        );
        assert_eq!(
            exit_status(&[Verdict::ok("a"), Verdict::warn("b", "c", "d")]),
            0
        );
        assert_eq!(exit_status(&[Verdict::fail("b", "c", "d")]), 1);
    }

    #[test]
    fn link_states() {
        let up = "4: eth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 02:00";
        let facts = parse_link(up).unwrap();
        assert_eq!(facts.name, "eth0");
        assert_eq!(facts.mtu, Some(1500));
        has(
            &check_link("eth0", "-i", Ok(up)),
            Level::Ok,
            &["eth0", "up", "mtu 1500"],
        );
        let down = "2: ifb0: <BROADCAST,NOARP> mtu 1500 qdisc noop state DOWN mode DEFAULT";
        has(
            &check_link("ifb0", "-i", Ok(down)),
            Level::Fail,
            &["down", "ip link set ifb0 up"],
        );
        let no_carrier =
            "3: eth1: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc fq state DOWN";
        has(
            &check_link("eth1", "-i", Ok(no_carrier)),
            Level::Fail,
            &["no carrier"],
        );
        let lo = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT";
        has(&check_link("lo", "-i", Ok(lo)), Level::Ok, &[]);
        has(
            &check_link("eth9", "-i", Err("Device \"eth9\" does not exist.")),
            Level::Fail,
            &["eth9", "not found", "ip -br link"],
        );
        has(&check_link("x", "-i", Ok("garbage")), Level::Warn, &[]);
        has(
            &check_link(
                "eth0",
                "-i",
                Err("cannot run ip: No such file or directory"),
            ),
            Level::Warn,
            &["apt-get install iproute2"],
        );
        let assistant = Ipv4Addr::new(10, 0, 0, 40);
        let client = ClientNet::parse("10.0.0.10").unwrap();
        has(
            &check_client_route(&client, assistant, Err("cannot run ip: not found")),
            Level::Warn,
            &["cannot check"],
        );
        has(
            &check_target_route(assistant, Err("cannot run ip: not found")),
            Level::Warn,
            &["cannot check"],
        );
        assert!(parse_link("").is_none());
    }

    #[test]
    fn permissions() {
        let root = parse_status("Name:\tx\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n");
        assert_eq!(root.euid, Some(0));
        has(
            &check_capture_permission("tcpcopy", &root),
            Level::Ok,
            &["root"],
        );
        let capable = parse_status("Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000002000\n");
        has(
            &check_capture_permission("tcpcopy", &capable),
            Level::Ok,
            &["CAP_NET_RAW"],
        );
        let user = parse_status("Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n");
        has(
            &check_capture_permission("tcpcopy", &user),
            Level::Fail,
            &["uid 1000", "setcap cap_net_raw"],
        );
        assert_eq!(parse_status("nonsense"), Privileges::default());
    }

    #[test]
    fn filters_and_traffic() {
        has(
            &check_filter("tcpcopy", "tcp", Ok(4)),
            Level::Ok,
            &["4 BPF"],
        );
        has(
            &check_filter("tcpcopy", "tcp and", Err("syntax error".into())),
            Level::Fail,
            &["syntax error", "tcpdump -d 'tcp and'"],
        );
        let f = "tcp and ((dst port 80))";
        has(
            &check_traffic(
                "eth0",
                f,
                3,
                Ok(TrafficCount {
                    matched: 5,
                    total: 9,
                }),
            ),
            Level::Ok,
            &["matched 5 of 9"],
        );
        has(
            &check_traffic(
                "eth0",
                f,
                3,
                Ok(TrafficCount {
                    matched: 0,
                    total: 0,
                }),
            ),
            Level::Warn,
            &["nothing arrived", "--listen-s", "tcpdump -ni any"],
        );
        has(
            &check_traffic(
                "eth0",
                f,
                3,
                Ok(TrafficCount {
                    matched: 0,
                    total: 7,
                }),
            ),
            Level::Warn,
            &["none matches", "fix -x"],
        );
        has(
            &check_traffic("eth0", f, 3, Err("needs root".into())),
            Level::Warn,
            &["skipped"],
        );
    }

    const ETHTOOL_ON: &str = "Features for eth0:\nrx-checksumming: on\ntcp-segmentation-offload: on\n\ttx-tcp-segmentation: on\ngeneric-segmentation-offload: on\ngeneric-receive-offload: on\nlarge-receive-offload: off [fixed]\nrx-gro-hw: off [fixed]\n";

    #[test]
    fn offloads() {
        let parsed = parse_offloads(ETHTOOL_ON);
        assert!(parsed.contains(&Offload {
            name: "large-receive-offload".into(),
            on: false,
            fixed: true
        }));
        assert!(parsed
            .iter()
            .any(|o| o.name == "tx-tcp-segmentation" && o.on));
        let v = check_offloads("eth0", Ok(ETHTOOL_ON));
        has(
            &v[0],
            Level::Warn,
            &["gro on", "ethtool -K eth0 gro off", "MTU"],
        );
        assert!(!v[0].fix.contains("lro"), "lro is off: {}", v[0]);
        has(&v[1], Level::Ok, &["tso, gso on", "harmless"]);
        let both = "generic-receive-offload: on\nlarge-receive-offload: on\n";
        has(
            &check_offloads("eth1", Ok(both))[0],
            Level::Warn,
            &["ethtool -K eth1 gro off lro off"],
        );
        let fixed = "generic-receive-offload: on [fixed]\n";
        has(
            &check_offloads("eth1", Ok(fixed))[0],
            Level::Warn,
            &["cannot turn gro off"],
        );
        let off = "generic-receive-offload: off\nlarge-receive-offload: off [fixed]\ntcp-segmentation-offload: off\n";
        let v = check_offloads("eth0", Ok(off));
        has(&v[0], Level::Ok, &["GRO/LRO off"]);
        has(&v[1], Level::Ok, &["TSO/GSO off"]);
        has(
            &check_offloads("eth0", Err("cannot run ethtool: No such file"))[0],
            Level::Warn,
            &["apt-get install ethtool"],
        );
    }

    #[test]
    fn routes_get_parsed() {
        let via = "10.77.0.10 via 10.77.0.40 dev eth0 src 10.77.0.30 uid 0 \n    cache \n";
        assert_eq!(
            parse_route_get(via),
            Some(RouteFacts {
                kind: "unicast".into(),
                via: Some(Ipv4Addr::new(10, 77, 0, 40)),
                dev: Some("eth0".into()),
                src: Some(Ipv4Addr::new(10, 77, 0, 30)),
            })
        );
        let local =
            parse_route_get("local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \n    cache <local>")
                .unwrap();
        assert_eq!(local.kind, "local");
        assert_eq!(local.via, None);
        assert_eq!(
            parse_route_get("unreachable 10.1.1.1 uid 0").unwrap().kind,
            "unreachable"
        );
        assert!(parse_route_get("").is_none());
    }

    #[test]
    fn target_route_from_the_online_host() {
        let t = Ipv4Addr::new(10, 0, 0, 30);
        has(
            &check_target_route(t, Ok("10.0.0.30 dev eth0 src 10.0.0.20 uid 0")),
            Level::Ok,
            &["on-link, dev eth0"],
        );
        has(
            &check_target_route(t, Ok("10.0.0.30 via 10.0.0.1 dev eth1 src 10.0.0.20")),
            Level::Ok,
            &["via 10.0.0.1"],
        );
        has(
            &check_target_route(t, Err("RTNETLINK answers: Network is unreachable")),
            Level::Fail,
            &["Network is unreachable", "ip route add 10.0.0.30/32"],
        );
        has(
            &check_target_route(t, Ok("blackhole 10.0.0.30 uid 0")),
            Level::Fail,
            &["blackhole"],
        );
        has(
            &check_target_route(t, Ok("local 10.0.0.30 dev lo")),
            Level::Warn,
            &["this host"],
        );
    }

    #[test]
    fn client_routes_on_the_target() {
        let assistant = Ipv4Addr::new(10, 77, 0, 40);
        let one = ClientNet::parse("10.77.0.10").unwrap();
        has(
            &check_client_route(
                &one,
                assistant,
                Ok("10.77.0.10 via 10.77.0.40 dev eth0 src 10.77.0.30 uid 0"),
            ),
            Level::Ok,
            &["via the assistant 10.77.0.40"],
        );
        // The /32 route was deleted: the connected /24 sends replies straight to the client.
        has(
            &check_client_route(
                &one,
                assistant,
                Ok("10.77.0.10 dev eth0 src 10.77.0.30 uid 0"),
            ),
            Level::Fail,
            &[
                "10.77.0.10",
                "straight out of eth0",
                "ip route replace 10.77.0.10/32 via 10.77.0.40",
            ],
        );
        let net = ClientNet::parse("10.9.9.x").unwrap();
        assert_eq!(net.to_string(), "10.9.9.0/24");
        assert_eq!(net.sample(), Ipv4Addr::new(10, 9, 9, 1));
        has(
            &check_client_route(
                &net,
                assistant,
                Ok("10.9.9.1 via 10.77.0.1 dev eth0 src 10.77.0.30"),
            ),
            Level::Fail,
            &[
                "via 10.77.0.1, not the assistant",
                "ip route replace 10.9.9.0/24 via 10.77.0.40",
            ],
        );
        has(
            &check_client_route(
                &net,
                assistant,
                Err("RTNETLINK answers: Network is unreachable"),
            ),
            Level::Fail,
            &["none", "ip route replace 10.9.9.0/24 via 10.77.0.40"],
        );
        has(
            &check_client_route(&one, assistant, Ok("local 10.77.0.10 dev lo")),
            Level::Fail,
            &["address of this host", "-c"],
        );
    }

    #[test]
    fn client_nets_parse() {
        assert_eq!(
            ClientNet::parse("10.9.9.77/24").unwrap(),
            ClientNet {
                network: Ipv4Addr::new(10, 9, 9, 0),
                prefix: 24
            }
        );
        assert_eq!(ClientNet::parse("0.0.0.0/0").unwrap().prefix, 0);
        assert_eq!(
            ClientNet::parse("10.0.0.8/31").unwrap().sample(),
            Ipv4Addr::new(10, 0, 0, 8)
        );
        for bad in ["10.9.9", "10.9.9.0/33", "x.x", "10.9.9.0/a", ""] {
            let e = ClientNet::parse(bad).unwrap_err();
            assert!(e.contains("--clients") && e.contains("10.9.9.0/24"), "{e}");
        }
        assert_eq!(
            ClientNet::parse_list("10.0.0.10, 10.9.9.0/24")
                .unwrap()
                .len(),
            2
        );
        assert!(ClientNet::parse_list(",").is_err());
    }

    #[test]
    fn rp_filter_on_the_target() {
        assert_eq!(effective_rp_filter(Some(0), Some(1)), Some(1));
        assert_eq!(effective_rp_filter(Some(2), Some(1)), Some(2));
        assert_eq!(effective_rp_filter(None, Some(1)), Some(1));
        has(
            &check_target_rp_filter("eth0", Some(0), Some(0), 1),
            Level::Ok,
            &["0 (off)"],
        );
        has(
            &check_target_rp_filter("eth0", Some(1), Some(0), 1),
            Level::Ok,
            &["strict", "fine here"],
        );
        has(
            &check_target_rp_filter("eth0", Some(1), Some(1), 2),
            Level::Warn,
            &["2 interfaces", "rp_filter=2"],
        );
        has(
            &check_target_rp_filter("eth0", Some(2), Some(1), 3),
            Level::Ok,
            &["loose"],
        );
        has(
            &check_target_rp_filter("eth0", None, None, 1),
            Level::Warn,
            &["cannot read"],
        );
    }

    const PROC_TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 1E004D0A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 640 1 0 100 0 0 10 0\n   1: 1E004D0A:1F90 0A004D0A:D431 01 00000000:00000000 00:00000000 00000000     0        0 641 1 0 100 0 0 10 0\n   2: 00000000:8E8C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 642 1 0 100 0 0 10 0\n";

    #[test]
    fn listening_sockets() {
        assert_eq!(socket_ports(PROC_TCP, "0A"), vec![8080, 36492]);
        assert_eq!(socket_ports(PROC_TCP, "01"), vec![8080]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000000000000:8E8C 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(socket_ports(tcp6, "0A"), vec![36492]);
        assert!(socket_ports("garbage\n1 2\n", "0A").is_empty());
        has(&check_service_port(8080, true), Level::Ok, &["8080"]);
        has(
            &check_service_port(8080, false),
            Level::Fail,
            &["8080", "target-rst", "ss -ltn"],
        );
    }

    #[test]
    fn assistant_checks() {
        has(&check_ip_forward(Some(0)), Level::Ok, &["ip_forward = 0"]);
        has(
            &check_ip_forward(Some(1)),
            Level::Fail,
            &[
                "ip_forward = 1",
                "reset them",
                "sysctl -w net.ipv4.ip_forward=0",
            ],
        );
        has(&check_ip_forward(None), Level::Warn, &[]);
        has(
            &check_assistant_rp_filter("eth0", Some(1), Some(1)),
            Level::Ok,
            &["strict", "before the IP layer"],
        );
        has(
            &check_intercept_listening(36524, true, false),
            Level::Ok,
            &["TCP"],
        );
        has(
            &check_intercept_listening(36524, false, true),
            Level::Ok,
            &["--transport udp"],
        );
        has(
            &check_intercept_listening(36524, false, false),
            Level::Fail,
            &["nothing listens", "-p 36524"],
        );
    }

    #[test]
    fn intercept_reachability() {
        let addr: SocketAddrV4 = "10.0.0.40:36524".parse().unwrap();
        has(
            &check_intercept_reachable(addr, Ok(())),
            Level::Ok,
            &["10.0.0.40:36524"],
        );
        has(
            &check_intercept_reachable(addr, Err(ConnectFailure::Refused)),
            Level::Fail,
            &[
                "intercept 10.0.0.40:36524",
                "refused",
                "start intercept",
                "-p",
            ],
        );
        has(
            &check_intercept_reachable(addr, Err(ConnectFailure::TimedOut(Duration::from_secs(1)))),
            Level::Fail,
            &["1000 ms", "firewall", "--dport 36524"],
        );
        has(
            &check_intercept_reachable(addr, Err(ConnectFailure::Other("No route to host".into()))),
            Level::Fail,
            &["No route to host", "ip route get 10.0.0.40"],
        );
    }

    #[test]
    fn hugepages() {
        let none = [HugepagePool {
            size_kb: 2048,
            total: 0,
            free: 0,
        }];
        has(
            &check_hugepages(&none, 1),
            Level::Fail,
            &["scripts/hugepages.sh reserve"],
        );
        has(&check_hugepages(&[], 0), Level::Fail, &["none reserved"]);
        let used = [HugepagePool {
            size_kb: 2048,
            total: 512,
            free: 0,
        }];
        has(&check_hugepages(&used, 1), Level::Warn, &["none free"]);
        let ok = [
            HugepagePool {
                size_kb: 2048,
                total: 512,
                free: 500,
            },
            HugepagePool {
                size_kb: 1048576,
                total: 0,
                free: 0,
            },
        ];
        has(&check_hugepages(&ok, 0), Level::Warn, &["--dpdk-in-memory"]);
        has(
            &check_hugepages(&ok, 1),
            Level::Ok,
            &["512 x 2048 kB (500 free)"],
        );
    }

    /// The system side runs on this machine without panicking (results depend on the host).
    #[test]
    fn gathering_does_not_panic() {
        let _ = hugepage_pools();
        let _ = hugetlbfs_mounts();
        let _ = interfaces_up();
        let _ = privileges();
        let mut lines = Vec::new();
        diagnose_assistant(
            &AssistantOptions {
                interface: Some("lo".into()),
                filter: Some("tcp and src port 8080".into()),
                port: 1,
            },
            &mut |v| lines.push(v),
        );
        assert!(lines.iter().any(|v| v.check.contains("ip_forward")));
        assert!(
            lines.iter().any(|v| v.check.contains("compiles")),
            "{lines:?}"
        );
    }
}
