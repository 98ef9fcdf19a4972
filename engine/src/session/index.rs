//! The open-addressing index of a session table: a power-of-two array of `u32` slots, linear
//! probing, deletion by backward shift (no tombstones, so probe lengths never degrade under
//! churn). Sized for a load factor of at most 1/2 at full capacity.
//!
//! A slot holds `entry + 1` in its low bits (0 = empty) and, in the bits above, a tag taken from
//! the key's hash, so a probe past a slot of another key rarely touches that key's entry. Keys
//! live in the entries, not here: lookups take a closure that yields an entry's key.

use super::prefetch::prefetch;
use crate::flow::FlowKey;

/// The index.
#[derive(Debug)]
pub(crate) struct FlowIndex {
    slots: Vec<u32>,
    mask: usize,
    /// Bits of a slot that hold `entry + 1`.
    entry_bits: u32,
    /// The tag bits of a slot.
    tag_mask: u32,
    len: usize,
}

impl FlowIndex {
    /// An index for up to `max_entries` entries (below 2^31).
    pub(crate) fn new(max_entries: usize) -> FlowIndex {
        assert!(max_entries < (1 << 31), "too many sessions for one table");
        let slots = (max_entries.max(8) * 2).next_power_of_two();
        let entry_bits = 32 - (max_entries as u32).leading_zeros();
        FlowIndex {
            slots: vec![0; slots],
            mask: slots - 1,
            entry_bits,
            tag_mask: u32::MAX.checked_shl(entry_bits).unwrap_or(0),
            len: 0,
        }
    }

    /// Entries indexed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of the slot array.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<u32>()
    }

    /// Slots (for the load factor).
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn tag(&self, hash: u64) -> u32 {
        if self.entry_bits >= 32 {
            0
        } else {
            ((hash >> 32) as u32) << self.entry_bits
        }
    }

    #[inline]
    fn entry_of(&self, slot: u32) -> u32 {
        if self.entry_bits >= 32 {
            slot - 1
        } else {
            (slot & ((1 << self.entry_bits) - 1)) - 1
        }
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        hash as usize & self.mask
    }

    /// The slot position and entry of `key`.
    #[inline]
    pub(crate) fn find(
        &self,
        hash: u64,
        key: &FlowKey,
        key_of: impl Fn(u32) -> FlowKey,
    ) -> Option<(usize, u32)> {
        let tag = self.tag(hash);
        let mut pos = self.home(hash);
        loop {
            let slot = self.slots[pos];
            if slot == 0 {
                return None;
            }
            if (slot ^ tag) & self.tag_mask == 0 {
                let entry = self.entry_of(slot);
                if key_of(entry) == *key {
                    return Some((pos, entry));
                }
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// The first entry on `key`'s probe path whose tag matches: most likely `key`'s own
    /// (confirm with [`FlowIndex::find`]). For prefetching.
    #[inline]
    pub(crate) fn candidate(&self, hash: u64) -> Option<u32> {
        let tag = self.tag(hash);
        let mut pos = self.home(hash);
        for _ in 0..4 {
            let slot = self.slots[pos];
            if slot == 0 {
                return None;
            }
            if (slot ^ tag) & self.tag_mask == 0 {
                return Some(self.entry_of(slot));
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    /// Hints the CPU to load `hash`'s home slot.
    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        prefetch(&self.slots[self.home(hash)]);
    }

    /// Adds `entry` under `hash` (the key must not be indexed yet).
    #[inline]
    pub(crate) fn insert(&mut self, hash: u64, entry: u32) {
        debug_assert!(self.len < self.slots.len() - 1);
        let mut pos = self.home(hash);
        while self.slots[pos] != 0 {
            pos = (pos + 1) & self.mask;
        }
        self.slots[pos] = self.tag(hash) | (entry + 1);
        self.len += 1;
    }

    /// Removes the slot at `pos` (from [`FlowIndex::find`]) and shifts the entries behind it
    /// back so no probe path has a hole. `hash_of` gives an entry's hash.
    pub(crate) fn remove_at(&mut self, pos: usize, hash_of: impl Fn(u32) -> u64) {
        let mut hole = pos;
        let mut at = pos;
        loop {
            at = (at + 1) & self.mask;
            let slot = self.slots[at];
            if slot == 0 {
                break;
            }
            let home = self.home(hash_of(self.entry_of(slot)));
            // The entry at `at` may fill the hole unless its home lies in (hole, at].
            if (at.wrapping_sub(home) & self.mask) >= (at.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = slot;
                hole = at;
            }
        }
        self.slots[hole] = 0;
        self.len -= 1;
    }

    /// Empties the index.
    pub(crate) fn clear(&mut self) {
        self.slots.fill(0);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn key(n: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8), 1000 + n),
            SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80),
        )
    }

    /// An index over a slab of keys with a free list, as the table uses it; `hash` may be
    /// degraded to force collisions.
    struct Model {
        index: FlowIndex,
        keys: Vec<Option<FlowKey>>,
        free: Vec<u32>,
        hash: fn(&FlowKey) -> u64,
    }

    impl Model {
        fn new(max: usize, hash: fn(&FlowKey) -> u64) -> Model {
            Model {
                index: FlowIndex::new(max),
                keys: Vec::new(),
                free: Vec::new(),
                hash,
            }
        }
        fn find(&self, k: &FlowKey) -> Option<(usize, u32)> {
            let keys = &self.keys;
            self.index
                .find((self.hash)(k), k, |e| keys[e as usize].expect("live entry"))
        }
        fn insert(&mut self, k: FlowKey) -> u32 {
            let entry = match self.free.pop() {
                Some(e) => e,
                None => {
                    self.keys.push(None);
                    self.keys.len() as u32 - 1
                }
            };
            self.keys[entry as usize] = Some(k);
            self.index.insert((self.hash)(&k), entry);
            entry
        }
        fn remove(&mut self, k: &FlowKey) -> Option<u32> {
            let (pos, entry) = self.find(k)?;
            let keys = &self.keys;
            let hash = self.hash;
            self.index
                .remove_at(pos, |e| hash(&keys[e as usize].expect("live entry")));
            self.keys[entry as usize] = None;
            self.free.push(entry);
            Some(entry)
        }
    }

    fn full_hash(k: &FlowKey) -> u64 {
        k.hash64()
    }

    /// Few distinct home slots and tags: long clusters that wrap around the array.
    fn bad_hash(k: &FlowKey) -> u64 {
        let h = k.hash64();
        (h & 0x3) | 0xFFFF_FFF0 | ((h >> 40) & 1) << 32
    }

    #[test]
    fn insert_lookup_remove_with_backward_shift() {
        let mut m = Model::new(8, bad_hash);
        let keys: Vec<FlowKey> = (0..8).map(key).collect();
        for k in &keys {
            m.insert(*k);
        }
        assert_eq!(m.index.len(), 8);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(m.find(k).map(|(_, e)| e), Some(i as u32));
        }
        // Remove from the middle of clusters: everything else stays reachable.
        for k in keys.iter().step_by(3) {
            assert!(m.remove(k).is_some());
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(m.find(k).is_some(), i % 3 != 0, "key {i}");
        }
        assert_eq!(m.index.len(), 5);
        // No tombstones: after removing everything every slot is empty again.
        for k in &keys {
            m.remove(k);
        }
        assert!(m.index.slots.iter().all(|&s| s == 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
        Lookup(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..64).prop_map(Op::Insert),
            (0u16..64).prop_map(Op::Remove),
            (0u16..64).prop_map(Op::Lookup),
        ]
    }

    fn run(ops: &[Op], hash: fn(&FlowKey) -> u64) -> Result<(), TestCaseError> {
        let mut m = Model::new(40, hash);
        let mut model: HashMap<FlowKey, u32> = HashMap::new();
        for op in ops {
            match *op {
                Op::Insert(n) => {
                    let k = key(n);
                    if !model.contains_key(&k) && model.len() < 40 {
                        let e = m.insert(k);
                        model.insert(k, e);
                    }
                }
                Op::Remove(n) => {
                    let k = key(n);
                    prop_assert_eq!(m.remove(&k), model.remove(&k));
                }
                Op::Lookup(n) => {
                    let k = key(n);
                    prop_assert_eq!(m.find(&k).map(|(_, e)| e), model.get(&k).copied());
                }
            }
            prop_assert_eq!(m.index.len(), model.len());
        }
        for (k, e) in &model {
            prop_assert_eq!(m.find(k).map(|(_, e)| e), Some(*e));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec(op(), 1..400)) {
            run(&ops, full_hash)?;
        }

        #[test]
        fn behaves_like_a_hashmap_under_collisions(
            ops in proptest::collection::vec(op(), 1..400)
        ) {
            run(&ops, bad_hash)?;
        }
    }
}
