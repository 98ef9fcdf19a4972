//! intercept's routing state, sans-IO (time is passed in):
//!
//! * [`RouteTable`]: exact map from a session's [`FlowKey`] to the tcpcopy connection its
//!   `CLIENT_ADD` arrived on, with idle expiry (the C table is a lossy 32-bit hash that never
//!   expires, spec §2.6; this one keys the full 4-tuple and forgets idle routes).
//! * [`DelayQueue`]: response records (SYN or RST) captured before their route is known, held
//!   per key for a while (30 s) and handed over when the `CLIENT_ADD` arrives.
//!
//! Both are bounded and count what they shed. For `--dnat` the caller zeroes the target IP of
//! keys on both sides (messages and responses) before using them here.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::control::server::ConnId;
use crate::flow::FlowKey;

/// Default idle time after which a route is forgotten.
pub const DEFAULT_ROUTE_IDLE: Duration = Duration::from_secs(120);
/// Default bound on routes held.
pub const DEFAULT_MAX_ROUTES: usize = 1 << 20;
/// How long delayed records wait for their route (`OUTPUT_INTERVAL`).
pub const DEFAULT_DELAY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on keys in the delay queue (intercept `-s` default).
pub const DEFAULT_DELAY_MAX_KEYS: usize = 65_536;
/// Default bound on records held per key in the delay queue.
pub const DEFAULT_DELAY_MAX_RECORDS: usize = 4;

/// Counters of a [`RouteTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// New routes inserted.
    pub added: u64,
    /// Inserts that re-pointed an existing route.
    pub updated: u64,
    /// Routes removed by `remove` or `remove_conn`.
    pub removed: u64,
    /// Routes forgotten after the idle timeout.
    pub expired: u64,
    /// Inserts refused because the table was full.
    pub overflows: u64,
    /// Lookups that found a route.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
}

#[derive(Debug, Clone, Copy)]
struct Route {
    conn: ConnId,
    last_used: Instant,
    stamp: u64,
}

/// FlowKey → tcpcopy connection, with idle expiry.
#[derive(Debug)]
pub struct RouteTable {
    map: HashMap<FlowKey, Route>,
    /// Expiry order: (key, stamp of the route it was queued for, time queued with).
    queue: VecDeque<(FlowKey, u64, Instant)>,
    idle: Duration,
    max_routes: usize,
    next_stamp: u64,
    stats: RouteStats,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new(DEFAULT_ROUTE_IDLE, DEFAULT_MAX_ROUTES)
    }
}

impl RouteTable {
    /// A table forgetting routes unused for `idle_timeout`, holding at most `max_routes`.
    pub fn new(idle_timeout: Duration, max_routes: usize) -> RouteTable {
        RouteTable {
            map: HashMap::new(),
            queue: VecDeque::new(),
            idle: idle_timeout,
            max_routes: max_routes.max(1),
            next_stamp: 0,
            stats: RouteStats::default(),
        }
    }

    /// Routes held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no route is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> RouteStats {
        self.stats
    }

    /// Routes `key` to `conn` (a `CLIENT_ADD`); an existing route is re-pointed. `false` if
    /// the table is full (counted in `overflows`).
    pub fn insert(&mut self, key: FlowKey, conn: ConnId, now: Instant) -> bool {
        if let Some(route) = self.map.get_mut(&key) {
            route.conn = conn;
            route.last_used = now;
            self.stats.updated += 1;
            return true;
        }
        if self.map.len() >= self.max_routes {
            self.stats.overflows += 1;
            return false;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.map.insert(
            key,
            Route {
                conn,
                last_used: now,
                stamp,
            },
        );
        self.queue.push_back((key, stamp, now));
        self.stats.added += 1;
        self.compact_queue();
        true
    }

    /// The connection for `key` (a captured response), marking the route used at `now`.
    pub fn get(&mut self, key: &FlowKey, now: Instant) -> Option<ConnId> {
        match self.map.get_mut(key) {
            Some(route) => {
                route.last_used = now;
                self.stats.hits += 1;
                Some(route.conn)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// The connection for `key`, without touching the route or the counters.
    pub fn peek(&self, key: &FlowKey) -> Option<ConnId> {
        self.map.get(key).map(|r| r.conn)
    }

    /// Removes the route of `key` (a `CLIENT_DEL`).
    pub fn remove(&mut self, key: &FlowKey) -> Option<ConnId> {
        let removed = self.map.remove(key).map(|r| r.conn);
        if removed.is_some() {
            self.stats.removed += 1;
        }
        removed
    }

    /// Removes every route through `conn` (the connection was lost); returns how many.
    pub fn remove_conn(&mut self, conn: ConnId) -> usize {
        let before = self.map.len();
        self.map.retain(|_, r| r.conn != conn);
        let n = before - self.map.len();
        self.stats.removed += n as u64;
        self.compact_queue();
        n
    }

    /// Forgets routes idle for the timeout at `now`, looking at no more than `budget` queue
    /// entries; returns how many routes were forgotten. Call it regularly.
    pub fn expire(&mut self, now: Instant, budget: usize) -> usize {
        let mut expired = 0;
        for _ in 0..budget {
            let Some(&(key, stamp, queued)) = self.queue.front() else {
                break;
            };
            let live = self
                .map
                .get(&key)
                .filter(|r| r.stamp == stamp)
                .map(|r| r.last_used);
            match live {
                None => {
                    self.queue.pop_front();
                }
                Some(last_used) if now.saturating_duration_since(last_used) >= self.idle => {
                    self.queue.pop_front();
                    self.map.remove(&key);
                    expired += 1;
                }
                Some(last_used) if last_used > queued => {
                    // Used since it was queued: requeue with its last use.
                    self.queue.pop_front();
                    self.queue.push_back((key, stamp, last_used));
                }
                Some(_) => break,
            }
        }
        self.stats.expired += expired as u64;
        expired
    }

    /// Drops queue entries of removed routes once they outnumber the live ones.
    fn compact_queue(&mut self) {
        if self.queue.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.queue
                .retain(|(k, s, _)| map.get(k).is_some_and(|r| r.stamp == *s));
        }
    }
}

/// Counters of a [`DelayQueue`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayStats {
    /// Records queued.
    pub queued: u64,
    /// Records handed over by `take`.
    pub delivered: u64,
    /// Records dropped because their key waited past the timeout.
    pub expired: u64,
    /// Records refused because the queue (keys) or the key (records) was full.
    pub overflow: u64,
}

#[derive(Debug)]
struct Delayed {
    stamp: u64,
    records: Vec<Box<[u8]>>,
}

/// Records waiting for their route, per key, for a bounded time and in bounded number.
#[derive(Debug)]
pub struct DelayQueue {
    map: HashMap<FlowKey, Delayed>,
    /// Creation order: (key, stamp, created).
    order: VecDeque<(FlowKey, u64, Instant)>,
    timeout: Duration,
    max_keys: usize,
    max_per_key: usize,
    next_stamp: u64,
    records: usize,
    stats: DelayStats,
}

impl Default for DelayQueue {
    fn default() -> Self {
        DelayQueue::new(
            DEFAULT_DELAY_TIMEOUT,
            DEFAULT_DELAY_MAX_KEYS,
            DEFAULT_DELAY_MAX_RECORDS,
        )
    }
}

impl DelayQueue {
    /// A queue holding records up to `timeout` after their key's first record, for at most
    /// `max_keys` keys and `max_per_key` records per key.
    pub fn new(timeout: Duration, max_keys: usize, max_per_key: usize) -> DelayQueue {
        DelayQueue {
            map: HashMap::new(),
            order: VecDeque::new(),
            timeout,
            max_keys,
            max_per_key,
            next_stamp: 0,
            records: 0,
            stats: DelayStats::default(),
        }
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records waiting, over all keys.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Counters.
    pub fn stats(&self) -> DelayStats {
        self.stats
    }

    /// Holds a copy of `record` for `key`; `false` if a bound refused it (counted in
    /// `overflow`).
    pub fn push(&mut self, key: FlowKey, record: &[u8], now: Instant) -> bool {
        if let Some(entry) = self.map.get_mut(&key) {
            if entry.records.len() >= self.max_per_key {
                self.stats.overflow += 1;
                return false;
            }
            entry.records.push(record.into());
        } else {
            if self.map.len() >= self.max_keys || self.max_per_key == 0 {
                self.stats.overflow += 1;
                return false;
            }
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            self.map.insert(
                key,
                Delayed {
                    stamp,
                    records: vec![record.into()],
                },
            );
            self.order.push_back((key, stamp, now));
            if self.order.len() > 2 * self.map.len() + 1024 {
                let map = &self.map;
                self.order
                    .retain(|(k, s, _)| map.get(k).is_some_and(|d| d.stamp == *s));
            }
        }
        self.records += 1;
        self.stats.queued += 1;
        true
    }

    /// Takes every record waiting for `key`, oldest first (the `CLIENT_ADD` arrived).
    pub fn take(&mut self, key: &FlowKey) -> Vec<Box<[u8]>> {
        match self.map.remove(key) {
            Some(entry) => {
                self.records -= entry.records.len();
                self.stats.delivered += entry.records.len() as u64;
                entry.records
            }
            None => Vec::new(),
        }
    }

    /// Drops keys (and their records) older than the timeout at `now`; returns the records
    /// dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(&(key, stamp, created)) = self.order.front() {
            if now.saturating_duration_since(created) < self.timeout {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|d| d.stamp == stamp) {
                if let Some(entry) = self.map.remove(&key) {
                    dropped += entry.records.len();
                }
            }
        }
        self.records -= dropped;
        self.stats.expired += dropped as u64;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new([10, 0, 0, 1].into(), port),
            SocketAddrV4::new([10, 0, 0, 2].into(), 8080),
        )
    }

    fn conn(n: u32) -> ConnId {
        ConnId::from_parts(n, 0)
    }

    #[test]
    fn routes_insert_get_remove() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(120), 10);
        assert!(t.insert(key(1), conn(1), t0));
        assert!(t.insert(key(2), conn(2), t0));
        assert_eq!(t.get(&key(1), t0), Some(conn(1)));
        assert_eq!(t.get(&key(3), t0), None);
        assert!(t.insert(key(1), conn(3), t0));
        assert_eq!(t.peek(&key(1)), Some(conn(3)));
        assert_eq!(t.remove(&key(2)), Some(conn(2)));
        assert_eq!(t.remove(&key(2)), None);
        assert_eq!(t.len(), 1);
        let s = t.stats();
        assert_eq!(
            (s.added, s.updated, s.removed, s.hits, s.misses),
            (2, 1, 1, 1, 1)
        );
    }

    #[test]
    fn routes_bounded() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(120), 2);
        assert!(t.insert(key(1), conn(1), t0));
        assert!(t.insert(key(2), conn(1), t0));
        assert!(!t.insert(key(3), conn(1), t0));
        assert!(t.insert(key(2), conn(2), t0));
        assert_eq!(t.stats().overflows, 1);
    }

    #[test]
    fn remove_conn_drops_its_routes() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        for p in 0..10 {
            t.insert(key(p), conn(u32::from(p % 2)), t0);
        }
        assert_eq!(t.remove_conn(conn(0)), 5);
        assert_eq!(t.len(), 5);
        assert!((0..10).all(|p| t.peek(&key(p)) != Some(conn(0))));
    }

    #[test]
    fn idle_routes_expire_and_used_ones_stay() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(120);
        let mut t = RouteTable::new(idle, 100);
        t.insert(key(1), conn(1), t0);
        t.insert(key(2), conn(1), t0 + Duration::from_secs(10));
        assert_eq!(t.expire(t0 + Duration::from_secs(100), 100), 0);
        // key 1 is used at t0+100 s.
        assert!(t.get(&key(1), t0 + Duration::from_secs(100)).is_some());
        assert_eq!(t.expire(t0 + Duration::from_secs(125), 100), 0);
        assert_eq!(t.expire(t0 + Duration::from_secs(130), 100), 1);
        assert!(t.peek(&key(2)).is_none());
        assert!(t.peek(&key(1)).is_some());
        assert_eq!(t.expire(t0 + Duration::from_secs(220), 100), 1);
        assert!(t.is_empty());
        assert_eq!(t.stats().expired, 2);
    }

    #[test]
    fn expire_respects_budget_and_removed_keys() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(1), 100);
        for p in 0..10 {
            t.insert(key(p), conn(1), t0);
        }
        t.remove(&key(0));
        // Re-added key: its old queue entry must not expire the new route early.
        t.insert(key(0), conn(2), t0 + Duration::from_secs(5));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(t.expire(later, 3), 2);
        assert_eq!(t.expire(later, 100), 7);
        assert_eq!(t.peek(&key(0)), Some(conn(2)));
        assert_eq!(t.expire(t0 + Duration::from_secs(6), 100), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn queue_stays_bounded_under_churn() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        for p in 0..10_000u16 {
            t.insert(key(p), conn(1), t0);
            t.remove(&key(p));
        }
        assert!(t.queue.len() <= 1024 + 2);
    }

    #[test]
    fn delay_queue_take_and_expire() {
        let t0 = Instant::now();
        let mut d = DelayQueue::new(Duration::from_secs(30), 2, 2);
        assert!(d.push(key(1), &[1; 64], t0));
        assert!(d.push(key(1), &[2; 64], t0));
        assert!(!d.push(key(1), &[3; 64], t0));
        assert!(d.push(key(2), &[4; 64], t0 + Duration::from_secs(10)));
        assert!(!d.push(key(3), &[5; 64], t0));
        assert_eq!(d.records(), 3);
        let got = d.take(&key(1));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][0], 1);
        assert_eq!(got[1][0], 2);
        assert!(d.take(&key(1)).is_empty());
        assert_eq!(d.expire(t0 + Duration::from_secs(30)), 0);
        assert_eq!(d.expire(t0 + Duration::from_secs(40)), 1);
        assert!(d.is_empty());
        assert_eq!(d.records(), 0);
        let s = d.stats();
        assert_eq!((s.queued, s.delivered, s.expired, s.overflow), (3, 2, 1, 2));
    }

    #[test]
    fn delay_queue_retaken_key_gets_fresh_timer() {
        let t0 = Instant::now();
        let mut d = DelayQueue::default();
        d.push(key(1), &[1; 64], t0);
        d.take(&key(1));
        d.push(key(1), &[2; 64], t0 + Duration::from_secs(20));
        assert_eq!(d.expire(t0 + Duration::from_secs(35)), 0);
        assert_eq!(d.take(&key(1)).len(), 1);
    }
}
