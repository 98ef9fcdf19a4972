//! intercept's `--single` mode (spec §2.7), sans-IO: no routes; every response goes to one of
//! the connected tcpcopy connections, chosen by the C route key of its session, so one tcpcopy
//! gets everything without registering anything.
//!
//! Admission follows the C intercept: the first connection starts a 3-second *generation*; a
//! connection that arrives later is taken for a new tcpcopy: the previous connections are
//! closed and the list starts again with the newcomer, unless `-c` ("protect") was given and a
//! previous connection is still open, in which case the newcomer is refused. At most
//! [`MAX_SINGLE_CONNECTIONS`] connections are kept. So all `-C` connections of a tcpcopy must
//! be made within 3 s of its first.
//!
//! A newcomer from another address than the connected tcpcopy's is refused while that tcpcopy
//! has a connection open (counted in [`SingleStats::refused_foreign`]): in the C intercept any
//! peer that reaches the port takes over every response. A tcpcopy at the same address (one
//! that restarted) replaces the old connections as in the C tool.
//!
//! One difference, invisible on the wire: the C intercept keeps a closed connection in its
//! list (its share of responses is lost until the next generation); here it leaves the list
//! and the others take its share.

use std::time::{Duration, Instant};

use crate::control::route::Owner;
use crate::control::server::ConnId;
use crate::flow::FlowKey;

/// Most connections kept (`MAX_SINGLE_CONN_NUM`).
pub const MAX_SINGLE_CONNECTIONS: usize = 16;
/// Length of a generation.
pub const GENERATION: Duration = Duration::from_secs(3);

/// The C intercept's lossy 32-bit route key (spec §2.6) of a session, as computed on x86: the
/// network-order fields read as little-endian integers,
/// `(port << 16) + ip + port + target_ip + (target_port << 24) + (target_port << 8) + target_port`
/// (mod 2^32), with client = the response's destination.
pub fn c_route_key(key: &FlowKey) -> u32 {
    let ip = u32::from_le_bytes(key.client_ip.octets());
    let port = u32::from(u16::from_le_bytes(key.client_port.to_be_bytes()));
    let target_ip = u32::from_le_bytes(key.target_ip.octets());
    let target_port = u32::from(u16::from_le_bytes(key.target_port.to_be_bytes()));
    (port << 16)
        .wrapping_add(ip)
        .wrapping_add(port)
        .wrapping_add(target_ip)
        .wrapping_add(target_port << 24)
        .wrapping_add(target_port << 8)
        .wrapping_add(target_port)
}

/// What to do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Keep it: it joins the current generation.
    Accept,
    /// Keep it as the first of a new generation; close these (the previous tcpcopy's).
    NewGeneration {
        /// Connections to close.
        close: Vec<ConnId>,
    },
    /// Close it: protected (`-c`) and the previous tcpcopy is still connected, or the list is
    /// full.
    Refuse,
}

/// Counters of a [`SingleSpread`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleStats {
    /// Connections admitted.
    pub admitted: u64,
    /// Generations started.
    pub generations: u64,
    /// Connections closed because a new generation began.
    pub replaced: u64,
    /// Connections refused (protect, another address's tcpcopy is connected, or the list was
    /// full).
    pub refused: u64,
    /// Of those, refused because another address's tcpcopy is connected.
    pub refused_foreign: u64,
}

/// The connection list of `--single` mode.
#[derive(Debug, Clone)]
pub struct SingleSpread {
    conns: Vec<ConnId>,
    /// The address of the connected tcpcopy.
    owner: Option<Owner>,
    generation_start: Option<Instant>,
    protect: bool,
    stats: SingleStats,
}

impl SingleSpread {
    /// An empty list; `protect` is intercept's `-c`.
    pub fn new(protect: bool) -> SingleSpread {
        SingleSpread {
            conns: Vec::with_capacity(MAX_SINGLE_CONNECTIONS),
            owner: None,
            generation_start: None,
            protect,
            stats: SingleStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> SingleStats {
        self.stats
    }

    /// The connections responses are spread over.
    pub fn connections(&self) -> &[ConnId] {
        &self.conns
    }

    /// Decides about a connection that just came up at `now`. The caller closes what the
    /// answer says (and calls [`on_disconnect`](Self::on_disconnect) for those only if it
    /// wants; they are already out of the list).
    pub fn on_connect(&mut self, conn: ConnId, owner: Owner, now: Instant) -> Admission {
        if !self.conns.is_empty() && self.owner.is_some_and(|o| o != owner) {
            self.stats.refused += 1;
            self.stats.refused_foreign += 1;
            return Admission::Refuse;
        }
        self.owner = Some(owner);
        let in_generation = self
            .generation_start
            .is_some_and(|start| now.saturating_duration_since(start) <= GENERATION);
        if in_generation || self.generation_start.is_none() {
            if self.conns.len() >= MAX_SINGLE_CONNECTIONS {
                self.stats.refused += 1;
                return Admission::Refuse;
            }
            if self.generation_start.is_none() {
                self.generation_start = Some(now);
                self.stats.generations += 1;
            }
            self.conns.push(conn);
            self.stats.admitted += 1;
            return Admission::Accept;
        }
        if self.protect && !self.conns.is_empty() {
            self.stats.refused += 1;
            return Admission::Refuse;
        }
        let close = std::mem::take(&mut self.conns);
        self.stats.replaced += close.len() as u64;
        self.generation_start = Some(now);
        self.stats.generations += 1;
        self.conns.push(conn);
        self.stats.admitted += 1;
        Admission::NewGeneration { close }
    }

    /// A connection went away.
    pub fn on_disconnect(&mut self, conn: ConnId) {
        self.conns.retain(|&c| c != conn);
    }

    /// The connection for a response of session `key`: `conns[(key & 0xff) % n]` with the C
    /// route key, as the C intercept does; `None` when no tcpcopy is connected.
    pub fn pick(&self, key: &FlowKey) -> Option<ConnId> {
        Self::pick_in(&self.conns, c_route_key(key))
    }

    /// [`pick`](Self::pick) with a precomputed route key, over any list.
    pub fn pick_in(conns: &[ConnId], route_key: u32) -> Option<ConnId> {
        if conns.is_empty() {
            return None;
        }
        Some(conns[(route_key & 0xff) as usize % conns.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    const A: Owner = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 20));

    fn c(n: u32) -> ConnId {
        ConnId::from_parts(n, 0)
    }

    #[test]
    fn route_key_matches_the_spec_example() {
        // Spec §2.6: client 10.0.0.1:40000, target 10.0.0.2:8080 -> 0x632CEFCF on x86.
        let k = FlowKey::new(
            SocketAddrV4::new([10, 0, 0, 1].into(), 40000),
            SocketAddrV4::new([10, 0, 0, 2].into(), 8080),
        );
        assert_eq!(c_route_key(&k), 0x632C_EFCF);
    }

    #[test]
    fn connections_of_one_generation_share_the_responses() {
        let t0 = Instant::now();
        let mut s = SingleSpread::new(false);
        let any = FlowKey::new(
            SocketAddrV4::new([10, 0, 0, 1].into(), 1),
            SocketAddrV4::new([10, 0, 0, 2].into(), 2),
        );
        assert_eq!(s.pick(&any), None);
        assert_eq!(s.on_connect(c(1), A, t0), Admission::Accept);
        assert_eq!(
            s.on_connect(c(2), A, t0 + Duration::from_secs(2)),
            Admission::Accept
        );
        assert_eq!(s.on_connect(c(3), A, t0 + GENERATION), Admission::Accept);
        assert_eq!(s.connections(), &[c(1), c(2), c(3)]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..300u16 {
            // The C key takes the low byte of the byte-swapped port: vary the high byte.
            let k = FlowKey::new(
                SocketAddrV4::new([10, 0, 0, 1].into(), i.wrapping_mul(251)),
                SocketAddrV4::new([10, 0, 0, 2].into(), 8080),
            );
            let picked = s.pick(&k).unwrap();
            assert_eq!(
                picked,
                s.connections()[(c_route_key(&k) & 0xff) as usize % 3]
            );
            seen.insert(picked);
        }
        assert_eq!(seen.len(), 3);
        s.on_disconnect(c(2));
        assert_eq!(s.connections(), &[c(1), c(3)]);
    }

    #[test]
    fn a_late_connection_starts_a_new_generation() {
        let t0 = Instant::now();
        let mut s = SingleSpread::new(false);
        s.on_connect(c(1), A, t0);
        s.on_connect(c(2), A, t0);
        let late = t0 + Duration::from_millis(3001);
        assert_eq!(
            s.on_connect(c(3), A, late),
            Admission::NewGeneration {
                close: vec![c(1), c(2)]
            }
        );
        assert_eq!(s.connections(), &[c(3)]);
        // The new generation counts from its own start.
        assert_eq!(
            s.on_connect(c(4), A, late + Duration::from_secs(1)),
            Admission::Accept
        );
        let st = s.stats();
        assert_eq!(
            (st.admitted, st.generations, st.replaced, st.refused),
            (4, 2, 2, 0)
        );
    }

    #[test]
    fn protect_refuses_a_newcomer_while_the_old_tcpcopy_is_connected() {
        let t0 = Instant::now();
        let mut s = SingleSpread::new(true);
        s.on_connect(c(1), A, t0);
        let late = t0 + Duration::from_secs(10);
        assert_eq!(s.on_connect(c(2), A, late), Admission::Refuse);
        assert_eq!(s.connections(), &[c(1)]);
        // Once the old one is gone, a newcomer starts a new generation.
        s.on_disconnect(c(1));
        assert_eq!(
            s.on_connect(c(3), A, late),
            Admission::NewGeneration { close: vec![] }
        );
        assert_eq!(s.stats().refused, 1);
    }

    #[test]
    fn a_newcomer_from_another_address_cannot_take_the_responses() {
        let t0 = Instant::now();
        let other: Owner = "10.77.0.66".parse().unwrap();
        let mut s = SingleSpread::new(false);
        s.on_connect(c(1), A, t0);
        // Within the generation window and after it: refused while A is connected.
        assert_eq!(s.on_connect(c(2), other, t0), Admission::Refuse);
        let late = t0 + Duration::from_secs(10);
        assert_eq!(s.on_connect(c(3), other, late), Admission::Refuse);
        assert_eq!(s.connections(), &[c(1)]);
        // A restarted tcpcopy at A's address replaces the old connections.
        assert_eq!(
            s.on_connect(c(4), A, late),
            Admission::NewGeneration { close: vec![c(1)] }
        );
        // Once A is gone, another address may start.
        s.on_disconnect(c(4));
        assert_eq!(
            s.on_connect(c(5), other, late + Duration::from_secs(4)),
            Admission::NewGeneration { close: vec![] },
            "the first connection of a new tcpcopy"
        );
        assert_eq!((s.stats().refused, s.stats().refused_foreign), (2, 2));
    }

    #[test]
    fn at_most_sixteen() {
        let t0 = Instant::now();
        let mut s = SingleSpread::new(false);
        for i in 0..16 {
            assert_eq!(s.on_connect(c(i), A, t0), Admission::Accept);
        }
        assert_eq!(s.on_connect(c(16), A, t0), Admission::Refuse);
        assert_eq!(s.connections().len(), 16);
    }
}
