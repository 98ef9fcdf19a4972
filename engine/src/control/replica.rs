//! Route tables that several capture threads read without locks: every capture thread owns a
//! *replica* (a [`RouteTable`] and a [`DelayQueue`]) that only it touches, and the control
//! thread — the only one that learns routes, from `CLIENT_ADD`/`CLIENT_DEL` and lost
//! connections — broadcasts each change to every replica over its own bounded
//! single-producer/single-consumer ring ([`RouteFeed`]).
//!
//! Why replicas rather than one shared map:
//!
//! * The read path (one lookup per captured response, millions per second) is a lookup in a
//!   private hash map: no lock, no atomic read-modify-write, no shared cache line, no epoch or
//!   hazard-pointer bookkeeping. The write path (at most two updates per replayed session) costs
//!   one ring push per replica; a replica applies its updates in batches before each capture
//!   burst.
//! * An RCU scheme (an immutable map swapped atomically) would copy the whole map per batch
//!   of updates, O(routes) for each publication, or need a persistent map with slower reads.
//! * A table sharded by flow between the capture threads would need the kernel's fanout hash
//!   of each response, which user space cannot compute for `PACKET_FANOUT_HASH`.
//! * The SYN-ACKs that beat their route wait in the replica of the thread that captured them;
//!   the route update that reaches that replica releases them, in order, on that thread.
//!
//! The cost is memory (one copy of the routes per capture thread; about 64 bytes per route) and
//! a short delay before a route is visible everywhere (until each thread's next burst; a
//! response arriving before it waits in the delay queue, as in the C intercept). Updates that
//! do not fit a full ring wait in an order-preserving backlog on the control thread (bounded;
//! overflow is counted and leaves that replica stale until the route expires).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;

use crate::control::route::{DelayQueue, Owner, RouteTable};
use crate::control::server::ConnId;
use crate::flow::FlowKey;

/// One change of the routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteUpdate {
    /// `CLIENT_ADD` from a connection of `Owner`'s: route `key` to the connection (and release
    /// what waits for it), unless the route belongs to another owner (see [`RouteTable`]).
    Add(FlowKey, ConnId, Owner),
    /// `CLIENT_DEL` from `Owner`: forget the route of `key` if it is the owner's.
    Remove(FlowKey, Owner),
    /// The connection is gone: forget its routes.
    RemoveConn(ConnId),
}

/// Settings of each replica.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaConfig {
    /// Routes idle this long are forgotten.
    pub route_idle: Duration,
    /// Most routes per replica.
    pub max_routes: usize,
    /// How long a record waits for its route.
    pub delay_timeout: Duration,
    /// Most keys waiting in a replica's delay queue.
    pub delay_max_keys: usize,
    /// Most records waiting per key.
    pub delay_max_per_key: usize,
    /// Capacity of each replica's ring.
    pub ring_capacity: usize,
    /// Most updates held back per replica when its ring is full.
    pub max_backlog: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            route_idle: crate::control::route::DEFAULT_ROUTE_IDLE,
            max_routes: crate::control::route::DEFAULT_MAX_ROUTES,
            delay_timeout: crate::control::route::DEFAULT_DELAY_TIMEOUT,
            delay_max_keys: crate::control::route::DEFAULT_DELAY_MAX_KEYS,
            delay_max_per_key: crate::control::route::DEFAULT_DELAY_MAX_RECORDS,
            ring_capacity: 1 << 16,
            max_backlog: 1 << 20,
        }
    }
}

/// Counters of a [`RouteFeed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Updates published (each goes to every replica).
    pub published: u64,
    /// Update deliveries that had to wait in the backlog (a ring was full).
    pub deferred: u64,
    /// Update deliveries lost because a backlog was full too.
    pub dropped: u64,
}

/// The control thread's end: broadcasts updates to every replica, in order.
#[derive(Debug)]
pub struct RouteFeed {
    rings: Vec<Arc<ArrayQueue<RouteUpdate>>>,
    backlog: Vec<VecDeque<RouteUpdate>>,
    max_backlog: usize,
    stats: FeedStats,
}

/// Counters of a [`RouteReplica`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Updates applied.
    pub applied: u64,
    /// Delayed records released by an `Add`.
    pub released: u64,
}

/// A capture thread's end: its own routes and delay queue, kept up to date by
/// [`sync`](Self::sync).
#[derive(Debug)]
pub struct RouteReplica {
    ring: Arc<ArrayQueue<RouteUpdate>>,
    table: RouteTable,
    delay: DelayQueue,
    stats: ReplicaStats,
}

impl RouteFeed {
    /// A feed and its `replicas` replicas (hand one to each capture thread).
    pub fn new(replicas: usize, config: &ReplicaConfig) -> (RouteFeed, Vec<RouteReplica>) {
        let rings: Vec<_> = (0..replicas)
            .map(|_| Arc::new(ArrayQueue::new(config.ring_capacity.max(1))))
            .collect();
        let reps = rings
            .iter()
            .map(|ring| RouteReplica {
                ring: Arc::clone(ring),
                table: RouteTable::new(config.route_idle, config.max_routes),
                delay: DelayQueue::new(
                    config.delay_timeout,
                    config.delay_max_keys,
                    config.delay_max_per_key,
                ),
                stats: ReplicaStats::default(),
            })
            .collect();
        let feed = RouteFeed {
            backlog: vec![VecDeque::new(); replicas],
            rings,
            max_backlog: config.max_backlog,
            stats: FeedStats::default(),
        };
        (feed, reps)
    }

    /// Counters.
    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    /// Updates waiting in backlogs (call [`retry`](Self::retry) until 0).
    pub fn pending(&self) -> usize {
        self.backlog.iter().map(VecDeque::len).sum()
    }

    /// Sends `update` to every replica (after anything already waiting for that replica).
    pub fn publish(&mut self, update: RouteUpdate) {
        self.stats.published += 1;
        for (ring, backlog) in self.rings.iter().zip(&mut self.backlog) {
            if backlog.is_empty() && ring.push(update).is_ok() {
                continue;
            }
            if backlog.len() >= self.max_backlog {
                self.stats.dropped += 1;
                continue;
            }
            self.stats.deferred += 1;
            backlog.push_back(update);
        }
    }

    /// Moves backlogged updates into rings that have room; `true` when nothing waits.
    pub fn retry(&mut self) -> bool {
        for (ring, backlog) in self.rings.iter().zip(&mut self.backlog) {
            while let Some(&u) = backlog.front() {
                if ring.push(u).is_err() {
                    break;
                }
                backlog.pop_front();
            }
        }
        self.pending() == 0
    }
}

impl RouteReplica {
    /// Counters.
    pub fn stats(&self) -> ReplicaStats {
        self.stats
    }

    /// The routes.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// The delay queue.
    pub fn delay_queue(&self) -> &DelayQueue {
        &self.delay
    }

    /// Whether updates are waiting in the ring.
    pub fn has_updates(&self) -> bool {
        !self.ring.is_empty()
    }

    /// Applies every waiting update; an `Add` hands the records that waited for its key to
    /// `on_release(conn, record)`, oldest first. Returns the updates applied.
    pub fn sync(&mut self, now: Instant, on_release: &mut dyn FnMut(ConnId, &[u8])) -> usize {
        let mut n = 0;
        while let Some(update) = self.ring.pop() {
            n += 1;
            match update {
                RouteUpdate::Add(key, conn, owner) => {
                    if !self.table.insert(key, conn, owner, now).routed() {
                        continue;
                    }
                    if !self.delay.is_empty() {
                        for record in self.delay.take(&key) {
                            self.stats.released += 1;
                            on_release(conn, &record);
                        }
                    }
                }
                RouteUpdate::Remove(key, owner) => {
                    self.table.remove(&key, owner);
                }
                RouteUpdate::RemoveConn(conn) => {
                    self.table.remove_conn(conn);
                }
            }
        }
        self.stats.applied += n as u64;
        n
    }

    /// The connection of `key`'s session (a captured response), marking it used.
    pub fn route(&mut self, key: &FlowKey, now: Instant) -> Option<ConnId> {
        self.table.get(key, now)
    }

    /// Holds `record` until `key`'s route arrives; `false` if a bound refused it.
    pub fn delay(&mut self, key: FlowKey, record: &[u8], now: Instant) -> bool {
        self.delay.push(key, record, now)
    }

    /// Forgets idle routes (looking at most at `budget` of them; `None`: the table's
    /// [`RouteTable::expire_budget`]) and expired delayed records.
    pub fn expire(&mut self, now: Instant, budget: Option<usize>) {
        let budget = budget.unwrap_or_else(|| self.table.expire_budget());
        self.table.expire(now, budget);
        self.delay.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 20));
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
    fn updates_reach_every_replica_in_order() {
        let t0 = Instant::now();
        let (mut feed, mut reps) = RouteFeed::new(3, &ReplicaConfig::default());
        feed.publish(RouteUpdate::Add(key(1), conn(1), OWNER));
        feed.publish(RouteUpdate::Add(key(2), conn(2), OWNER));
        feed.publish(RouteUpdate::Remove(key(1), OWNER));
        feed.publish(RouteUpdate::Add(key(3), conn(2), OWNER));
        feed.publish(RouteUpdate::RemoveConn(conn(2)));
        feed.publish(RouteUpdate::Add(key(1), conn(3), OWNER));
        for r in &mut reps {
            assert!(r.has_updates());
            assert_eq!(r.sync(t0, &mut |_, _| panic!("nothing delayed")), 6);
            assert_eq!(r.route(&key(1), t0), Some(conn(3)));
            assert_eq!(r.route(&key(2), t0), None);
            assert_eq!(r.route(&key(3), t0), None);
        }
        assert_eq!(feed.stats().published, 6);
    }

    #[test]
    fn delayed_records_are_released_by_their_route() {
        let t0 = Instant::now();
        let (mut feed, mut reps) = RouteFeed::new(2, &ReplicaConfig::default());
        // The SYN-ACK beat its route on replica 0.
        assert_eq!(reps[0].route(&key(1), t0), None);
        assert!(reps[0].delay(key(1), &[1; 64], t0));
        assert!(reps[0].delay(key(1), &[2; 64], t0));
        feed.publish(RouteUpdate::Add(key(1), conn(7), OWNER));
        let mut released = Vec::new();
        reps[0].sync(t0, &mut |c, r| released.push((c, r[0])));
        assert_eq!(released, vec![(conn(7), 1), (conn(7), 2)]);
        reps[1].sync(t0, &mut |_, _| panic!("replica 1 held nothing"));
        assert_eq!(reps[0].stats().released, 2);
        assert!(reps[0].delay_queue().is_empty());
    }

    #[test]
    fn full_rings_keep_order_through_the_backlog() {
        let t0 = Instant::now();
        let config = ReplicaConfig {
            ring_capacity: 4,
            max_backlog: 8,
            ..ReplicaConfig::default()
        };
        let (mut feed, mut reps) = RouteFeed::new(1, &config);
        for p in 0..12 {
            feed.publish(RouteUpdate::Add(key(p), conn(1), OWNER));
        }
        feed.publish(RouteUpdate::Remove(key(11), OWNER));
        assert_eq!(feed.stats().deferred, 8);
        assert_eq!(feed.stats().dropped, 1); // the Remove did not fit
        let mut total = 0;
        while total < 12 {
            total += reps[0].sync(t0, &mut |_, _| {});
            feed.retry();
        }
        assert!(feed.retry());
        assert_eq!(reps[0].table().len(), 12);
    }

    #[test]
    fn readers_on_other_threads_see_every_route() {
        // The control thread publishes while two capture threads look up; once the feed is
        // drained every replica holds every route, and removals win over earlier adds.
        let (mut feed, reps) = RouteFeed::new(2, &ReplicaConfig::default());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = reps
            .into_iter()
            .map(|mut r| {
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let mut hits = 0u64;
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                        let now = Instant::now();
                        r.sync(now, &mut |_, _| {});
                        for p in (0..20_000u16).step_by(97) {
                            hits += u64::from(r.route(&key(p), now).is_some());
                        }
                        if finished && !r.has_updates() {
                            break;
                        }
                    }
                    let _ = hits;
                    r
                })
            })
            .collect();
        for p in 0..20_000u16 {
            feed.publish(RouteUpdate::Add(key(p), conn(u32::from(p % 4)), OWNER));
            if p % 2 == 0 {
                feed.publish(RouteUpdate::Remove(key(p), OWNER));
            }
            feed.retry();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !feed.retry() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in readers {
            let mut r = t.join().unwrap();
            let now = Instant::now();
            r.sync(now, &mut |_, _| {});
            assert_eq!(r.table().len(), 10_000);
            for p in 0..20_000u16 {
                let expect = (p % 2 == 1).then(|| conn(u32::from(p % 4)));
                assert_eq!(r.route(&key(p), now), expect, "port {p}");
            }
        }
    }
}
