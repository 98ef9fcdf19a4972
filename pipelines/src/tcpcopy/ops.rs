//! Run-time checks of the tcpcopy binary's main loop, kept free of clocks and I/O so they can
//! be tested: the `-m` memory cap ([`MemoryCap`]) and the "SYNs go out, no SYN-ACK comes
//! back" warning ([`SynAckWatch`]).

use std::time::{Duration, Instant};

/// Share of the cap above which workers are asked to shed sessions.
pub const SHED_AT_PERCENT: u64 = 90;
/// How long RSS may stay above the cap, while shedding, before tcpcopy stops.
pub const OVER_CAP_GRACE: Duration = Duration::from_secs(5);
/// Share of each worker's table shed per check above [`SHED_AT_PERCENT`] (1/8).
pub const SHED_DIVISOR: usize = 8;

/// The process' resident set size in bytes (`VmRSS` of `/proc/self/status`).
///
/// # Errors
/// The file cannot be read or holds no `VmRSS` line.
pub fn rss_bytes() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_vm_rss(&status).ok_or_else(|| std::io::Error::other("no VmRSS in /proc/self/status"))
}

/// The `VmRSS:  1234 kB` line of a `/proc/PID/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// What the main loop should do about memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryVerdict {
    /// Below 90 % of the cap.
    Fine,
    /// Above 90 %: ask the workers to shed idle sessions.
    Shed,
    /// Above the cap for [`OVER_CAP_GRACE`] although the workers shed: stop.
    Stop,
}

/// The `-m MiB` cap on the resident set size. Unlike the C tool, which stops as soon as its
/// *peak* RSS passes the cap, this one sheds idle sessions first and stops only when the
/// current RSS stays above the cap.
#[derive(Debug, Clone)]
pub struct MemoryCap {
    cap_bytes: u64,
    over_since: Option<Instant>,
}

impl MemoryCap {
    /// A cap of `mib` MiB.
    pub fn new(mib: u64) -> MemoryCap {
        MemoryCap {
            cap_bytes: mib.saturating_mul(1 << 20),
            over_since: None,
        }
    }

    /// The cap in bytes.
    pub fn cap_bytes(&self) -> u64 {
        self.cap_bytes
    }

    /// Judges one RSS reading taken at `now`.
    pub fn check(&mut self, rss: u64, now: Instant) -> MemoryVerdict {
        if rss > self.cap_bytes {
            let since = *self.over_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= OVER_CAP_GRACE {
                return MemoryVerdict::Stop;
            }
            return MemoryVerdict::Shed;
        }
        self.over_since = None;
        if rss > self.cap_bytes / 100 * SHED_AT_PERCENT {
            MemoryVerdict::Shed
        } else {
            MemoryVerdict::Fine
        }
    }

    /// Sessions a worker holding `table_len` should shed on a [`MemoryVerdict::Shed`]: an
    /// eighth of its table, at least one when it has any.
    pub fn shed_count(table_len: usize) -> usize {
        if table_len == 0 {
            0
        } else {
            (table_len / SHED_DIVISOR).max(1)
        }
    }
}

/// What the warning says about the likely causes.
pub const NO_SYN_ACK_HINT: &str = "SYNs go out to the target but no SYN-ACK comes back through \
intercept. Likely causes: the target has no route for the client addresses via the assistant \
(ip route add CLIENT via ASSISTANT on the target); intercept does not capture on the right \
interface, or its -F filter misses the target's replies; rp_filter on the target drops the \
packets (sysctl net.ipv4.conf.all.rp_filter=0); ip_forward=1 on the assistant forwards the \
replies to the real client instead of keeping them (must be 0); the target does not listen on \
the -x port. Run `tcpcopy-doctor target ...` on the target to check";

/// Samples kept: one a second, so the oldest is four seconds old.
const SAMPLES: usize = 5;
/// Least time between two warnings.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Watches `sent_syn` against `established`: when SYNs left between four seconds and one second
/// ago (so each had at least a second to be answered) and not one session was established in
/// the last four seconds, it is time to warn (at most once a minute).
#[derive(Debug, Clone, Default)]
pub struct SynAckWatch {
    /// (sent SYNs, established sessions), oldest first, one a second.
    samples: std::collections::VecDeque<(u64, u64)>,
    last_sample: Option<Instant>,
    last_warning: Option<Instant>,
}

impl SynAckWatch {
    /// A watch with no history.
    pub fn new() -> SynAckWatch {
        SynAckWatch::default()
    }

    /// Takes the counters at `now` (ignored unless a second passed since the last sample);
    /// true when the warning is due.
    pub fn observe(&mut self, now: Instant, sent_syn: u64, established: u64) -> bool {
        if self
            .last_sample
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return false;
        }
        self.last_sample = Some(now);
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((sent_syn, established));
        if self.samples.len() < SAMPLES {
            return false;
        }
        let (syn_then, established_then) = self.samples[0];
        let (syn_recent, _) = self.samples[SAMPLES - 2];
        let stuck = syn_recent > syn_then && established == established_then;
        if !stuck
            || self
                .last_warning
                .is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY)
        {
            return false;
        }
        self.last_warning = Some(now);
        true
    }
}

/// Least time between two "shedding" warnings.
const SHED_WARN_EVERY: Duration = Duration::from_secs(10);

/// The checks the tcpcopy binary runs about once a second while it replays: the `-m` cap
/// (shedding, then a stop) and the no-SYN-ACK warning.
#[derive(Debug)]
pub struct RunChecks {
    memory: Option<(u64, MemoryCap)>,
    watch: SynAckWatch,
    last: Option<Instant>,
    last_shed_warning: Option<Instant>,
    rss_unreadable: bool,
}

impl RunChecks {
    /// Checks with a cap of `memory_mib` MiB (`None`: no cap).
    pub fn new(memory_mib: Option<u64>) -> RunChecks {
        RunChecks {
            memory: memory_mib.map(|mib| (mib, MemoryCap::new(mib))),
            watch: SynAckWatch::new(),
            last: None,
            last_shed_warning: None,
            rss_unreadable: false,
        }
    }

    /// Runs the checks if a second passed since the last run: logs the warnings, asks the
    /// workers to shed. Returns why tcpcopy must stop (the memory cap), if it must.
    pub fn tick(&mut self, tcpcopy: &super::Tcpcopy, now: Instant) -> Option<String> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        let stats = tcpcopy.stats();
        let sessions = &stats.sessions;
        if self
            .watch
            .observe(now, sessions.sent_syn, sessions.established)
        {
            tracing::warn!(
                "no SYN-ACK from the target for the last seconds ({} SYNs sent, {} sessions \
                 established so far): {NO_SYN_ACK_HINT}",
                sessions.sent_syn,
                sessions.established
            );
        }
        let (mib, cap) = self.memory.as_mut()?;
        let rss = match rss_bytes() {
            Ok(rss) => rss,
            Err(e) => {
                if !self.rss_unreadable {
                    self.rss_unreadable = true;
                    tracing::warn!("-m {mib}: cannot read the RSS ({e}); the cap is not enforced");
                }
                return None;
            }
        };
        match cap.check(rss, now) {
            MemoryVerdict::Fine => None,
            MemoryVerdict::Shed => {
                let asked = tcpcopy.request_shed();
                if self
                    .last_shed_warning
                    .is_none_or(|at| now.saturating_duration_since(at) >= SHED_WARN_EVERY)
                {
                    self.last_shed_warning = Some(now);
                    tracing::warn!(
                        "RSS {} MiB is above {SHED_AT_PERCENT}% of the memory cap -m {mib} MiB: \
                         shedding idle sessions (asked for {asked} now, {} shed so far)",
                        rss >> 20,
                        stats.shed
                    );
                }
                None
            }
            MemoryVerdict::Stop => Some(format!(
                "memory cap -m {mib} MiB reached: RSS {} MiB for {} s although {} sessions were \
                 shed, stopping",
                rss >> 20,
                OVER_CAP_GRACE.as_secs(),
                stats.shed
            )),
        }
    }

    /// At exit: warns when SYNs went out but no session was ever established.
    pub fn at_exit(&self, stats: &super::TcpcopyStats) {
        let sessions = &stats.sessions;
        if sessions.sent_syn > 0 && sessions.established == 0 {
            tracing::warn!(
                "{} SYNs were sent and no session was established: {NO_SYN_ACK_HINT}",
                sessions.sent_syn
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\ttcpcopy\nVmPeak:\t  99999 kB\nVmRSS:\t   10240 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(10 << 20));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: lots kB\n"), None);
        assert!(rss_bytes().unwrap() > 0);
    }

    #[test]
    fn the_cap_sheds_above_90_percent_and_stops_after_the_grace() {
        let mib = 1u64 << 20;
        let mut cap = MemoryCap::new(100);
        let t0 = Instant::now();
        assert_eq!(cap.check(50 * mib, t0), MemoryVerdict::Fine);
        assert_eq!(cap.check(91 * mib, t0), MemoryVerdict::Shed);
        assert_eq!(cap.check(101 * mib, t0), MemoryVerdict::Shed);
        assert_eq!(
            cap.check(101 * mib, t0 + Duration::from_secs(4)),
            MemoryVerdict::Shed
        );
        // Back under the cap: the grace starts again.
        assert_eq!(
            cap.check(95 * mib, t0 + Duration::from_secs(5)),
            MemoryVerdict::Shed
        );
        assert_eq!(
            cap.check(101 * mib, t0 + Duration::from_secs(6)),
            MemoryVerdict::Shed
        );
        assert_eq!(
            cap.check(101 * mib, t0 + Duration::from_secs(11)),
            MemoryVerdict::Stop
        );
        assert_eq!(MemoryCap::shed_count(0), 0);
        assert_eq!(MemoryCap::shed_count(3), 1);
        assert_eq!(MemoryCap::shed_count(800), 100);
        assert_eq!(MemoryCap::new(u64::MAX).cap_bytes(), u64::MAX);
    }

    #[test]
    fn warns_when_syns_go_unanswered_once_a_minute() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut watch = SynAckWatch::new();
        // Four samples are not history enough.
        for i in 0..4 {
            assert!(!watch.observe(s(i), i * 10, 0));
        }
        assert!(
            watch.observe(s(4), 40, 0),
            "SYNs for 4 s, nothing established"
        );
        // Several calls within a second are one sample.
        assert!(!watch.observe(s(4) + Duration::from_millis(500), 40, 0));
        for i in 5..60 {
            assert!(
                !watch.observe(s(i), i * 10, 0),
                "at most once a minute ({i})"
            );
        }
        assert!(watch.observe(s(64), 640, 0));
    }

    #[test]
    fn no_warning_while_sessions_get_established_or_nothing_is_sent() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut watch = SynAckWatch::new();
        for i in 0..30 {
            assert!(!watch.observe(s(i), i * 10, i * 10), "healthy ({i})");
        }
        let mut idle = SynAckWatch::new();
        for i in 0..30 {
            assert!(!idle.observe(s(i), 5, 0), "no new SYNs ({i})");
        }
        // A SYN sent in the last second has not had its chance yet.
        let mut late = SynAckWatch::new();
        for i in 0..4 {
            assert!(!late.observe(s(i), 0, 0));
        }
        assert!(!late.observe(s(4), 1, 0));
        // It is answered a moment later: no warning either.
        assert!(!late.observe(s(5), 1, 1));
    }
}
