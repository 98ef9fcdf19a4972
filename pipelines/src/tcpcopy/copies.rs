//! Copies and sampling: `-n` (replay every session several times), `-f` (keep several tcpcopy
//! instances apart), `-r` (replay a share of the sessions) and `-g` (ramp that share up).
//!
//! Copies differ from the original in their client port (and, with `-c`, in their client
//! address). The ports above 1023 are split into one class per worker (the fanout program
//! shards by client port, [`engine::flow::port_shard`]), and within its class a port has a
//! rank. Copy `i` of a session whose client port has rank `r` in class `c` takes the port of
//! rank `r + i * stride` (modulo the class size, `stride = class size / n`) in the same class:
//! - the copy belongs to the worker that captured the original, so replies reach the worker
//!   that owns the copy's session;
//! - copies of one session never collide with each other or with the original;
//! - the map is one-to-one for each copy number: copy `i` of two sessions never share a port
//!   (a nearest-port search would send neighbouring ports to the same copy port).
//!
//! `-f` instances shift every port by `instance / 32` of its class the same way.
//!
//! Sampling hashes the captured client address and port, so a session is kept or dropped
//! whole, and the same sessions are chosen on every run.

use super::transform::FlagError;
use engine::flow::port_shard;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, OnceLock};

/// Ports a shifted or copied client port may take: 1024..=65535.
const PORT_SPACE: u32 = 65536 - 1024;
/// Most copies (`-n`), as the C tool.
pub const MAX_COPIES: u16 = 1023;
/// Most `-f` instances apart (each takes 2048 ports of offset).
pub const MAX_INSTANCE: u8 = 31;

const N_FORM: &str = "a number of copies 1..=1023 (1: no extra copy), e.g. -n 3";
const F_FORM: &str =
    "an instance number 0..=31, different for each tcpcopy replaying to one target, e.g. -f 1";
const R_FORM: &str = "a percentage 1..=100 of the sessions to replay, e.g. -r 50";

/// The ports 1024..=65535 grouped by worker class, and each port's rank in its class.
#[derive(Debug)]
struct ShardTables {
    /// Ports grouped by class, ascending within a class.
    ports: Vec<u16>,
    /// Start of each class in `ports` (one more entry than classes).
    start: Vec<u32>,
    /// Rank of port `1024 + i` within its class.
    rank: Vec<u16>,
}

impl ShardTables {
    fn new(workers: usize) -> ShardTables {
        let mut classes: Vec<Vec<u16>> = vec![Vec::new(); workers];
        let mut rank = vec![0u16; PORT_SPACE as usize];
        for port in 1024..=65535u16 {
            let class = &mut classes[port_shard(port, workers)];
            rank[usize::from(port) - 1024] = class.len() as u16;
            class.push(port);
        }
        let mut start = Vec::with_capacity(workers + 1);
        let mut ports = Vec::with_capacity(PORT_SPACE as usize);
        for class in classes {
            start.push(ports.len() as u32);
            ports.extend(class);
        }
        start.push(ports.len() as u32);
        ShardTables { ports, start, rank }
    }

    /// The tables for `workers` (made once per worker count, kept for the process).
    fn get(workers: usize) -> &'static ShardTables {
        static CACHE: OnceLock<Mutex<HashMap<usize, &'static ShardTables>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(workers)
            .or_insert_with(|| Box::leak(Box::new(ShardTables::new(workers))))
    }

    fn class(&self, class: usize) -> &[u16] {
        &self.ports[self.start[class] as usize..self.start[class + 1] as usize]
    }
}

/// Where the ports of copies and shifted instances go.
#[derive(Debug, Clone, Copy)]
pub struct PortPlan {
    copies: u16,
    instance: u8,
    workers: usize,
    tables: &'static ShardTables,
}

impl PartialEq for PortPlan {
    fn eq(&self, other: &PortPlan) -> bool {
        (self.copies, self.instance, self.workers) == (other.copies, other.instance, other.workers)
    }
}

impl Eq for PortPlan {}

impl PortPlan {
    /// A plan for `copies` replays of each session (1 = only the original; 0 is taken as 1,
    /// like the C tool) by instance `instance` (`-f`) with `workers` capture workers.
    ///
    /// # Errors
    /// A [`FlagError`] naming `-n` or `-f` when a value is out of range, or when a worker's
    /// class of ports is too small for the number of copies.
    pub fn new(copies: u16, instance: u8, workers: usize) -> Result<PortPlan, FlagError> {
        let copies = copies.max(1);
        if copies > MAX_COPIES {
            return Err(FlagError {
                flag: "-n",
                value: copies.to_string(),
                reason: format!("at most {MAX_COPIES} copies"),
                form: N_FORM,
            });
        }
        if instance > MAX_INSTANCE {
            return Err(FlagError {
                flag: "-f",
                value: instance.to_string(),
                reason: format!("at most {MAX_INSTANCE} instances can be kept apart"),
                form: F_FORM,
            });
        }
        let workers = workers.max(1);
        let tables = ShardTables::get(workers);
        let smallest = (0..workers)
            .map(|c| tables.class(c).len())
            .min()
            .unwrap_or(0);
        if smallest < usize::from(copies) * 2 {
            return Err(FlagError {
                flag: "-n",
                value: copies.to_string(),
                reason: format!(
                    "with {workers} workers a worker has only {smallest} client ports for its \
                     copies; use at most {} copies or fewer workers",
                    smallest / 2
                ),
                form: N_FORM,
            });
        }
        Ok(PortPlan {
            copies,
            instance,
            workers,
            tables,
        })
    }

    /// Replays of each session (the original included).
    pub fn copies(&self) -> u16 {
        self.copies
    }

    /// True when the plan changes nothing (one copy, instance 0).
    pub fn is_identity(&self) -> bool {
        self.copies == 1 && self.instance == 0
    }

    /// The client port of copy `copy` (0 = the original) of a session captured with `port`.
    #[inline]
    pub fn port(&self, port: u16, copy: u16) -> u16 {
        if copy == 0 && self.instance == 0 {
            return port;
        }
        let class = self.tables.class(port_shard(port, self.workers));
        let len = class.len() as u32;
        let rank = if port >= 1024 {
            u32::from(self.tables.rank[usize::from(port) - 1024])
        } else {
            u32::from(port) % len
        };
        let stride = len / u32::from(self.copies);
        let shift = len / (u32::from(MAX_INSTANCE) + 1) * u32::from(self.instance);
        class[((rank + shift + u32::from(copy) * stride) % len) as usize]
    }
}

/// `-r` / `-g`: which sessions are replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    percent: u8,
    ramp: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::all()
    }
}

impl Sampling {
    /// Every session.
    pub fn all() -> Sampling {
        Sampling {
            percent: 100,
            ramp: false,
        }
    }

    /// `-r PERCENT` (1..=100).
    ///
    /// # Errors
    /// A [`FlagError`] naming `-r` for 0 or more than 100 (the C tool silently wrapped those).
    pub fn percent(percent: u32) -> Result<Sampling, FlagError> {
        if !(1..=100).contains(&percent) {
            return Err(FlagError {
                flag: "-r",
                value: percent.to_string(),
                reason: "not a percentage from 1 to 100".into(),
                form: R_FORM,
            });
        }
        Ok(Sampling {
            percent: percent as u8,
            ramp: false,
        })
    }

    /// `-g`: start at 1% and add one percent a second, reaching every session after 100 s.
    pub fn ramp() -> Sampling {
        Sampling {
            percent: 100,
            ramp: true,
        }
    }

    /// True when every session is replayed whatever the time.
    pub fn is_all(&self) -> bool {
        self.percent >= 100 && !self.ramp
    }

    /// The share in force `elapsed_s` seconds after the first captured packet.
    pub fn share_at(&self, elapsed_s: u64) -> u8 {
        if self.ramp {
            (elapsed_s.saturating_add(1)).min(100) as u8
        } else {
            self.percent
        }
    }

    /// True when the session of this captured client is replayed at this share. A session's
    /// bucket (0..100) is a fixed hash of its address and port: the same on every run.
    #[inline]
    pub fn keeps(share: u8, client: Ipv4Addr, port: u16) -> bool {
        share >= 100 || bucket(client, port) < u32::from(share)
    }
}

/// A session's sampling bucket, 0..100.
#[inline]
pub fn bucket(client: Ipv4Addr, port: u16) -> u32 {
    let mut h = u64::from(u32::from(client)) << 16 | u64::from(port);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % 100) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn copies_keep_their_worker_and_never_collide() {
        for workers in [1usize, 2, 3, 4, 8] {
            for copies in [2u16, 3, 7, 64] {
                let plan = PortPlan::new(copies, 0, workers).unwrap();
                for port in (1024u16..=65535).step_by(97).chain([1024, 65535, 0, 80]) {
                    let ports: HashSet<u16> = (0..copies).map(|c| plan.port(port, c)).collect();
                    assert_eq!(
                        ports.len(),
                        usize::from(copies),
                        "port {port} w{workers} n{copies}"
                    );
                    assert_eq!(plan.port(port, 0), port);
                    for c in 0..copies {
                        let p = plan.port(port, c);
                        assert_eq!(port_shard(p, workers), port_shard(port, workers));
                        if c > 0 {
                            assert!(p >= 1024);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_copy_number_maps_ports_one_to_one() {
        for workers in [1usize, 2, 5] {
            let plan = PortPlan::new(3, 1, workers).unwrap();
            for copy in 0..3 {
                let mut seen = HashSet::new();
                for port in 1024..=65535u16 {
                    assert!(
                        seen.insert(plan.port(port, copy)),
                        "w{workers} copy {copy} port {port}"
                    );
                }
            }
        }
    }

    #[test]
    fn instances_are_apart_and_keep_the_worker() {
        let a = PortPlan::new(1, 1, 2).unwrap();
        let b = PortPlan::new(1, 2, 2).unwrap();
        for port in [32768u16, 40000, 60999] {
            assert_ne!(a.port(port, 0), port);
            assert_ne!(a.port(port, 0), b.port(port, 0));
            assert_eq!(port_shard(a.port(port, 0), 2), port_shard(port, 2));
        }
        assert!(PortPlan::new(1, 0, 4).unwrap().is_identity());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = PortPlan::new(1024, 0, 1).unwrap_err();
        assert_eq!(e.flag, "-n");
        assert!(e.to_string().contains("1..=1023"), "{e}");
        assert_eq!(PortPlan::new(2, 32, 1).unwrap_err().flag, "-f");
        let e = PortPlan::new(1000, 0, 64).unwrap_err();
        assert!(e.to_string().contains("fewer workers"), "{e}");
        assert_eq!(Sampling::percent(0).unwrap_err().flag, "-r");
        assert_eq!(Sampling::percent(150).unwrap_err().flag, "-r");
        assert_eq!(PortPlan::new(0, 0, 1).unwrap().copies(), 1);
    }

    #[test]
    fn sampling_is_stable_and_close_to_the_share() {
        let s = Sampling::percent(50).unwrap();
        let share = s.share_at(0);
        let kept = (0..20_000u32)
            .filter(|i| {
                Sampling::keeps(
                    share,
                    Ipv4Addr::new(10, 77, 0, 10),
                    20_000 + (*i % 40_000) as u16,
                )
            })
            .count();
        assert!((9_000..11_000).contains(&kept), "{kept}");
        let ip = Ipv4Addr::new(192, 168, 1, 10);
        assert_eq!(Sampling::keeps(30, ip, 51234), bucket(ip, 51234) < 30);
        assert!(Sampling::keeps(100, ip, 1));
        let g = Sampling::ramp();
        assert_eq!(
            (g.share_at(0), g.share_at(49), g.share_at(500)),
            (1, 50, 100)
        );
        assert!(!g.is_all() && Sampling::all().is_all());
    }
}
