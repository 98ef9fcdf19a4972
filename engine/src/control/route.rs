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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
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
    /// Inserts that re-pointed an existing route (its owner's address reconnected).
    pub updated: u64,
    /// Routes removed by `remove` or `remove_conn`.
    pub removed: u64,
    /// Routes forgotten after the idle timeout.
    pub expired: u64,
    /// Inserts refused because the table was full.
    pub overflows: u64,
    /// Inserts refused because the route belongs to a tcpcopy at another address.
    pub refused_foreign: u64,
    /// Removals refused because the route belongs to a tcpcopy at another address.
    pub refused_removals: u64,
    /// Inserts refused because the address holds its share of the table already.
    pub refused_owner_full: u64,
    /// Lookups that found a route.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
}

/// Who a route belongs to: the address of the tcpcopy whose connection added it.
pub type Owner = IpAddr;

/// What [`RouteTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// A new route.
    Added,
    /// The route existed for the same owner (a reconnected or restarted tcpcopy at the same
    /// address, or its next `CLIENT_ADD`): now through this connection.
    Repointed,
    /// The route belongs to a live connection of another address: left as it is.
    Foreign,
    /// The owner holds its share of the table ([`RouteTable::max_per_owner`]).
    OwnerFull,
    /// The table is full.
    Full,
}

impl Insert {
    /// True when the route now leads to the connection.
    pub fn routed(self) -> bool {
        matches!(self, Insert::Added | Insert::Repointed)
    }
}

#[derive(Debug, Clone, Copy)]
struct Route {
    conn: ConnId,
    owner: Owner,
    last_used: Instant,
    stamp: u64,
}

/// FlowKey → tcpcopy connection, with idle expiry and ownership.
///
/// Ownership: a route belongs to the address of the tcpcopy that added it. Another address's
/// `CLIENT_ADD` for a live route is refused and its `CLIENT_DEL` ignored (both counted), so a
/// peer that can reach intercept's port cannot take or delete another tcpcopy's routes; the
/// same address may re-point its routes (a tcpcopy that reconnected or restarted). One address
/// holds at most [`max_per_owner`](Self::max_per_owner) routes (half the table by default).
///
/// A lost connection costs O(1): its id goes on a list of dead connections and its routes
/// (counted per connection) stop counting at once; each is dropped when a lookup, an insert or
/// the expiry next meets it. Connection ids are never reused, so a dead route cannot reach a
/// newer connection.
#[derive(Debug)]
pub struct RouteTable {
    map: HashMap<FlowKey, Route>,
    /// Expiry order: (key, stamp of the route it was queued for, time queued with).
    queue: VecDeque<(FlowKey, u64, Instant)>,
    idle: Duration,
    max_routes: usize,
    max_per_owner: usize,
    next_stamp: u64,
    /// Routes per connection (live and dead connections), and the connection's owner (a
    /// connection has one peer address).
    per_conn: HashMap<ConnId, (usize, Owner)>,
    /// Routes per owner (live routes only).
    per_owner: HashMap<Owner, usize>,
    /// Lost connections whose routes are still in `map`.
    dead: HashSet<ConnId>,
    /// Routes of dead connections still in `map`.
    dead_routes: usize,
    stats: RouteStats,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new(DEFAULT_ROUTE_IDLE, DEFAULT_MAX_ROUTES)
    }
}

impl RouteTable {
    /// A table forgetting routes unused for `idle_timeout`, holding at most `max_routes`, of
    /// which one owner may hold half.
    pub fn new(idle_timeout: Duration, max_routes: usize) -> RouteTable {
        let max_routes = max_routes.max(1);
        RouteTable {
            map: HashMap::new(),
            queue: VecDeque::new(),
            idle: idle_timeout,
            max_routes,
            max_per_owner: max_routes.div_ceil(2),
            next_stamp: 0,
            per_conn: HashMap::new(),
            per_owner: HashMap::new(),
            dead: HashSet::new(),
            dead_routes: 0,
            stats: RouteStats::default(),
        }
    }

    /// Sets the share of the table one owner may hold (at least 1).
    pub fn set_max_per_owner(&mut self, routes: usize) {
        self.max_per_owner = routes.max(1);
    }

    /// The share of the table one owner may hold.
    pub fn max_per_owner(&self) -> usize {
        self.max_per_owner
    }

    /// Live routes held.
    pub fn len(&self) -> usize {
        self.map.len() - self.dead_routes
    }

    /// Whether no live route is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters.
    pub fn stats(&self) -> RouteStats {
        self.stats
    }

    /// Routes `key` to `conn` of `owner` (a `CLIENT_ADD`); see the type's docs for who may
    /// re-point a route.
    pub fn insert(&mut self, key: FlowKey, conn: ConnId, owner: Owner, now: Instant) -> Insert {
        if let Some(route) = self.map.get(&key).copied() {
            if self.dead.contains(&route.conn) {
                self.drop_route(&key);
            } else if route.owner != owner {
                self.stats.refused_foreign += 1;
                return Insert::Foreign;
            } else {
                if route.conn != conn {
                    self.uncount_conn(route.conn);
                    self.count_conn(conn, owner);
                }
                if let Some(route) = self.map.get_mut(&key) {
                    route.conn = conn;
                    route.last_used = now;
                }
                self.stats.updated += 1;
                return Insert::Repointed;
            }
        }
        if self.len() >= self.max_routes || self.map.len() >= 2 * self.max_routes {
            self.stats.overflows += 1;
            return Insert::Full;
        }
        if self.per_owner.get(&owner).copied().unwrap_or(0) >= self.max_per_owner {
            self.stats.refused_owner_full += 1;
            return Insert::OwnerFull;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.map.insert(
            key,
            Route {
                conn,
                owner,
                last_used: now,
                stamp,
            },
        );
        self.count_conn(conn, owner);
        *self.per_owner.entry(owner).or_default() += 1;
        self.queue.push_back((key, stamp, now));
        self.stats.added += 1;
        self.compact_queue();
        Insert::Added
    }

    /// The connection for `key` (a captured response), marking the route used at `now`.
    pub fn get(&mut self, key: &FlowKey, now: Instant) -> Option<ConnId> {
        let conn = match self.map.get_mut(key) {
            Some(route) if !self.dead.contains(&route.conn) => {
                route.last_used = now;
                Some(route.conn)
            }
            Some(_) => {
                self.drop_route(key);
                None
            }
            None => None,
        };
        match conn {
            Some(_) => self.stats.hits += 1,
            None => self.stats.misses += 1,
        }
        conn
    }

    /// The connection for `key`, without touching the route or the counters.
    pub fn peek(&self, key: &FlowKey) -> Option<ConnId> {
        self.map
            .get(key)
            .filter(|r| !self.dead.contains(&r.conn))
            .map(|r| r.conn)
    }

    /// The owner of `key`'s route.
    pub fn owner(&self, key: &FlowKey) -> Option<Owner> {
        self.map
            .get(key)
            .filter(|r| !self.dead.contains(&r.conn))
            .map(|r| r.owner)
    }

    /// Removes the route of `key` for `owner` (a `CLIENT_DEL`); another owner's route stays
    /// (counted in `refused_removals`).
    pub fn remove(&mut self, key: &FlowKey, owner: Owner) -> Option<ConnId> {
        let route = self.map.get(key).copied()?;
        if self.dead.contains(&route.conn) {
            self.drop_route(key);
            return None;
        }
        if route.owner != owner {
            self.stats.refused_removals += 1;
            return None;
        }
        self.drop_route(key);
        self.stats.removed += 1;
        Some(route.conn)
    }

    /// Forgets every route through `conn` (the connection was lost) in O(1); returns how many.
    pub fn remove_conn(&mut self, conn: ConnId) -> usize {
        let Some(&(n, owner)) = self.per_conn.get(&conn) else {
            return 0;
        };
        if !self.dead.insert(conn) {
            return 0;
        }
        self.dead_routes += n;
        self.stats.removed += n as u64;
        // The owner's share frees at once: the routes no longer count.
        if let Some(held) = self.per_owner.get_mut(&owner) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                self.per_owner.remove(&owner);
            }
        }
        n
    }

    /// Forgets routes idle for the timeout at `now`, and routes of lost connections, looking at
    /// no more than `budget` queue entries; returns how many idle routes were forgotten. Call
    /// it regularly, with a budget that grows with the table (see [`expire_budget`]).
    ///
    /// [`expire_budget`]: Self::expire_budget
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
                .map(|r| (r.last_used, r.conn));
            match live {
                None => {
                    self.queue.pop_front();
                }
                Some((_, conn)) if self.dead.contains(&conn) => {
                    self.queue.pop_front();
                    self.drop_route(&key);
                }
                Some((last_used, _)) if now.saturating_duration_since(last_used) >= self.idle => {
                    self.queue.pop_front();
                    self.drop_route(&key);
                    expired += 1;
                }
                Some((last_used, _)) if last_used > queued => {
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

    /// A budget for [`expire`](Self::expire) called once a second that keeps up with any
    /// rate of new routes: 4,096 entries, plus the whole queue over an eighth of the idle time.
    pub fn expire_budget(&self) -> usize {
        let idle_s = self.idle.as_secs().max(1) as usize;
        4096 + self.queue.len() * 8 / idle_s
    }

    /// Removes `key`'s route from the map and every count (live or dead).
    fn drop_route(&mut self, key: &FlowKey) {
        let Some(route) = self.map.remove(key) else {
            return;
        };
        let dead = self.dead.contains(&route.conn);
        if dead {
            self.dead_routes -= 1;
        } else if let Some(n) = self.per_owner.get_mut(&route.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&route.owner);
            }
        }
        self.uncount_conn(route.conn);
    }

    /// Counts a route of `conn` (whose peer is `owner`).
    fn count_conn(&mut self, conn: ConnId, owner: Owner) {
        self.per_conn.entry(conn).or_insert((0, owner)).0 += 1;
    }

    /// Counts a route of `conn` out; a dead connection leaves the dead list with its last
    /// route.
    fn uncount_conn(&mut self, conn: ConnId) {
        if let Some((n, _)) = self.per_conn.get_mut(&conn) {
            *n -= 1;
            if *n == 0 {
                self.per_conn.remove(&conn);
                self.dead.remove(&conn);
            }
        }
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

    /// The owner of most routes in these tests; `B` is another tcpcopy's address.
    const A: Owner = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 20));
    const B: Owner = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 66));
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
        assert!(t.insert(key(1), conn(1), A, t0).routed());
        assert!(t.insert(key(2), conn(2), A, t0).routed());
        assert_eq!(t.get(&key(1), t0), Some(conn(1)));
        assert_eq!(t.get(&key(3), t0), None);
        assert!(t.insert(key(1), conn(3), A, t0).routed());
        assert_eq!(t.peek(&key(1)), Some(conn(3)));
        assert_eq!(t.remove(&key(2), A), Some(conn(2)));
        assert_eq!(t.remove(&key(2), A), None);
        assert_eq!(t.len(), 1);
        let s = t.stats();
        assert_eq!(
            (s.added, s.updated, s.removed, s.hits, s.misses),
            (2, 1, 1, 1, 1)
        );
    }

    #[test]
    fn a_route_belongs_to_the_address_that_added_it() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        assert_eq!(t.insert(key(1), conn(1), A, t0), Insert::Added);
        // Another address can neither take it nor delete it.
        assert_eq!(t.insert(key(1), conn(9), B, t0), Insert::Foreign);
        assert_eq!(t.remove(&key(1), B), None);
        assert_eq!(t.get(&key(1), t0), Some(conn(1)));
        assert_eq!(t.owner(&key(1)), Some(A));
        // The same address (a reconnected tcpcopy) re-points it, and may delete it.
        assert_eq!(t.insert(key(1), conn(2), A, t0), Insert::Repointed);
        assert_eq!(t.get(&key(1), t0), Some(conn(2)));
        assert_eq!(t.remove(&key(1), A), Some(conn(2)));
        // Once the owner is gone, the key is free for anyone.
        assert_eq!(t.insert(key(2), conn(1), A, t0), Insert::Added);
        assert_eq!(t.remove_conn(conn(1)), 1);
        assert_eq!(t.insert(key(2), conn(9), B, t0), Insert::Added);
        let s = t.stats();
        assert_eq!((s.refused_foreign, s.refused_removals), (1, 1));
    }

    #[test]
    fn one_owner_holds_at_most_its_share() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(120), 10);
        assert_eq!(t.max_per_owner(), 5);
        for p in 0..5 {
            assert_eq!(t.insert(key(p), conn(1), B, t0), Insert::Added);
        }
        assert_eq!(t.insert(key(5), conn(2), B, t0), Insert::OwnerFull);
        // Others still get routes.
        for p in 10..15 {
            assert_eq!(t.insert(key(p), conn(3), A, t0), Insert::Added);
        }
        assert_eq!(t.insert(key(20), conn(3), A, t0), Insert::Full);
        assert_eq!(t.stats().refused_owner_full, 1);
        // B's connection goes: its share frees at once.
        t.remove_conn(conn(1));
        assert_eq!(t.len(), 5);
        assert_eq!(t.insert(key(5), conn(2), B, t0), Insert::Added);
    }

    #[test]
    fn a_lost_connection_costs_o1_and_its_routes_go_lazily() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(1), 100_000);
        for p in 0..50_000u16 {
            t.insert(key(p), conn(u32::from(p % 2)), A, t0);
        }
        assert_eq!(t.remove_conn(conn(0)), 25_000);
        assert_eq!(t.remove_conn(conn(0)), 0, "once");
        assert_eq!(t.len(), 25_000);
        assert_eq!(t.peek(&key(0)), None);
        assert_eq!(t.get(&key(0), t0), None, "a dead route is dropped when met");
        assert_eq!(t.get(&key(1), t0), Some(conn(1)));
        // The expiry sweeps the dead routes as it meets them, without counting them expired.
        let budget = t.expire_budget();
        assert!(budget >= 4096 + 50_000 * 8, "{budget}");
        assert_eq!(t.expire(t0 + Duration::from_secs(2), budget), 25_000);
        assert_eq!((t.map.len(), t.dead_routes, t.dead.len()), (0, 0, 0));
        assert!(t.per_conn.is_empty() && t.per_owner.is_empty());
    }

    #[test]
    fn routes_bounded() {
        let t0 = Instant::now();
        let mut t = RouteTable::new(Duration::from_secs(120), 2);
        t.set_max_per_owner(2);
        assert!(t.insert(key(1), conn(1), A, t0).routed());
        assert!(t.insert(key(2), conn(1), A, t0).routed());
        assert!(!t.insert(key(3), conn(1), A, t0).routed());
        assert!(t.insert(key(2), conn(2), A, t0).routed());
        assert_eq!(t.stats().overflows, 1);
    }

    #[test]
    fn remove_conn_drops_its_routes() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        for p in 0..10 {
            t.insert(key(p), conn(u32::from(p % 2)), A, t0);
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
        t.insert(key(1), conn(1), A, t0);
        t.insert(key(2), conn(1), A, t0 + Duration::from_secs(10));
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
            t.insert(key(p), conn(1), A, t0);
        }
        t.remove(&key(0), A);
        // Re-added key: its old queue entry must not expire the new route early.
        t.insert(key(0), conn(2), A, t0 + Duration::from_secs(5));
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
            t.insert(key(p), conn(1), A, t0);
            t.remove(&key(p), A);
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
