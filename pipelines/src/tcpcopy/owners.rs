//! Which worker owns a session, as the control thread sees it when a reply arrives.
//!
//! On AF_PACKET the capture is sharded by a function of the client port that user space
//! computes too ([`engine::flow::port_shard`]), so the owner of a reply is computed from its
//! client port alone. A NIC's RSS (or the af_packet PMD's kernel fanout) spreads flows by a
//! hash user space cannot reproduce from the reply; there the control thread learns each
//! session's owner from the CLIENT_ADD the worker sends through it, and forgets it at
//! CLIENT_DEL. The map is bounded: past its capacity new sessions fall back to the port
//! shard (counted).

use engine::control::{ClientMessage, MessageType};
use engine::flow::FlowKey;
use std::collections::HashMap;

/// How replies find their worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// By the client port's shard (the capture was split the same way).
    PortShard,
    /// By the owner learned from the worker's route registrations.
    Learned,
}

/// The control thread's owner map.
#[derive(Debug)]
pub struct Owners {
    mode: Dispatch,
    workers: usize,
    map: HashMap<FlowKey, u16>,
    capacity: usize,
    /// Registrations not learned because the map was full.
    pub overflow: u64,
}

impl Owners {
    /// An owner map for `workers` workers, holding at most `capacity` sessions.
    pub fn new(mode: Dispatch, workers: usize, capacity: usize) -> Owners {
        Owners {
            mode,
            workers: workers.max(1),
            map: HashMap::new(),
            capacity,
            overflow: 0,
        }
    }

    /// Notes a message worker `worker` sends through the control thread.
    pub fn note(&mut self, worker: usize, message: &ClientMessage) {
        if self.mode != Dispatch::Learned {
            return;
        }
        let key = FlowKey {
            client_ip: message.client_ip,
            client_port: message.client_port,
            target_ip: message.target_ip,
            target_port: message.target_port,
        };
        match message.kind {
            MessageType::ClientAdd => {
                if self.map.len() < self.capacity || self.map.contains_key(&key) {
                    self.map.insert(key, worker as u16);
                } else {
                    self.overflow += 1;
                }
            }
            MessageType::ClientDel if self.map.get(&key) == Some(&(worker as u16)) => {
                self.map.remove(&key);
            }
            _ => {}
        }
    }

    /// The worker that owns the session of a reply to `key`.
    #[inline]
    pub fn owner(&self, key: &FlowKey) -> usize {
        match self.mode {
            Dispatch::Learned => self
                .map
                .get(key)
                .map_or_else(|| key.shard(self.workers), |&w| usize::from(w)),
            Dispatch::PortShard => key.shard(self.workers),
        }
    }

    /// Sessions whose owner is known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no owner is learned.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new([10, 0, 0, 1].into(), port),
            SocketAddrV4::new([10, 0, 0, 2].into(), 80),
        )
    }

    #[test]
    fn learned_owners_follow_add_and_del() {
        let mut o = Owners::new(Dispatch::Learned, 4, 2);
        let k = key(1000);
        let shard = k.shard(4);
        let other = (shard + 1) % 4;
        o.note(other, &ClientMessage::add(k));
        assert_eq!(o.owner(&k), other);
        // A DEL from another worker (an older session on the same 4-tuple) changes nothing.
        o.note(shard, &ClientMessage::del(k));
        assert_eq!(o.owner(&k), other);
        o.note(other, &ClientMessage::del(k));
        assert_eq!(o.owner(&k), shard);
        assert!(o.is_empty());
        // Bounded: past the capacity the port shard decides, counted.
        for p in 1..=3 {
            o.note(3, &ClientMessage::add(key(p)));
        }
        assert_eq!((o.len(), o.overflow), (2, 1));
        assert_eq!(o.owner(&key(3)), key(3).shard(4));
    }

    #[test]
    fn port_shard_mode_learns_nothing() {
        let mut o = Owners::new(Dispatch::PortShard, 2, 10);
        o.note(1, &ClientMessage::add(key(7)));
        assert!(o.is_empty());
        assert_eq!(o.owner(&key(7)), key(7).shard(2));
    }
}
