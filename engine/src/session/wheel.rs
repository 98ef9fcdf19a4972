//! A hierarchical timer wheel with millisecond ticks (the design of tokio's timer): 6 levels of
//! 64 buckets; level `n` buckets span `64^n` ms, so the wheel reaches 2^36 ms ahead. Insert and
//! remove are O(1) (intrusive [`Lists`]), finding the next expiry is O(levels) with one occupancy
//! bitmap per level, and an entry moves down a level at most 5 times before it expires
//! (cascading). Memory is fixed: two list heads per bucket, nothing per insertion, so churn
//! (timers that move all the time) cannot make it grow.
//!
//! Expired entries are moved, in deadline order, to the [`READY`] list, which the owner drains
//! within its own budget.

use super::lists::Lists;

/// Levels of the wheel.
const LEVELS: usize = 6;
/// Buckets per level.
const SLOTS: usize = 64;
/// Bits of one level.
const BITS: u32 = 6;
/// Furthest deadline the wheel can hold, in ms from now.
const MAX_SPAN: u64 = (1 << (BITS as u64 * LEVELS as u64)) - 1;
/// Lists the wheel uses: one per bucket, then [`READY`].
pub(crate) const WHEEL_LISTS: usize = LEVELS * SLOTS + 1;
/// The list of expired entries.
pub(crate) const READY: usize = LEVELS * SLOTS;

/// The wheel's clock and occupancy; the buckets are lists `0..LEVELS*SLOTS` of a [`Lists`].
#[derive(Debug)]
pub(crate) struct Wheel {
    /// The time (ms) up to which buckets have been processed.
    elapsed: u64,
    occupied: [u64; LEVELS],
}

fn level_for(elapsed: u64, when: u64) -> usize {
    let mut masked = (elapsed ^ when) | (SLOTS as u64 - 1);
    if masked >= MAX_SPAN {
        masked = MAX_SPAN - 1;
    }
    let significant = 63 - masked.leading_zeros();
    (significant / BITS) as usize
}

fn slot_range(level: usize) -> u64 {
    1 << (BITS as usize * level)
}

impl Wheel {
    /// An empty wheel whose clock starts at `now` (ms).
    pub(crate) fn new(now: u64) -> Wheel {
        Wheel {
            elapsed: now,
            occupied: [0; LEVELS],
        }
    }

    /// Files `entry` (unlinked) to expire at `when` (ms); at once (into [`READY`]) when that
    /// has passed.
    pub(crate) fn insert(&mut self, lists: &mut Lists, entry: u32, when: u64) {
        if when <= self.elapsed {
            lists.push_back(READY, entry);
            return;
        }
        let when = when.min(self.elapsed + MAX_SPAN);
        let level = level_for(self.elapsed, when);
        let slot = ((when >> (BITS as usize * level)) as usize) % SLOTS;
        lists.push_back(level * SLOTS + slot, entry);
        self.occupied[level] |= 1 << slot;
    }

    /// Takes `entry` out of the wheel (a bucket or [`READY`]).
    pub(crate) fn remove(&mut self, lists: &mut Lists, entry: u32) {
        let old = lists.unlink(entry);
        if let Some(list) = Lists::as_list(old.prev) {
            if list < READY && lists.is_empty(list) {
                self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
            }
        }
    }

    /// The earliest non-empty bucket: (level, slot, the time it starts).
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let range = slot_range(level);
            let level_range = range * SLOTS as u64;
            let now_slot = self.elapsed / range;
            let rotated = occupied.rotate_right((now_slot % SLOTS as u64) as u32);
            let slot = ((rotated.trailing_zeros() as u64 + now_slot) % SLOTS as u64) as usize;
            let level_start = self.elapsed & !(level_range - 1);
            let mut deadline = level_start + slot as u64 * range;
            if deadline <= self.elapsed && level > 0 {
                // Only the top level wraps: its earlier slots are the next rotation.
                deadline += level_range;
            }
            return Some((level, slot, deadline));
        }
        None
    }

    /// Runs the clock to `now`: every entry whose deadline is at or before `now` ends up in
    /// [`READY`], in deadline order. `deadline_of` gives an entry's deadline (ms) for
    /// cascading it to a lower level.
    pub(crate) fn advance(
        &mut self,
        lists: &mut Lists,
        now: u64,
        mut deadline_of: impl FnMut(u32) -> u64,
    ) {
        while let Some((level, slot, start)) = self.next_expiration() {
            if start > now {
                break;
            }
            self.elapsed = self.elapsed.max(start);
            let list = level * SLOTS + slot;
            self.occupied[level] &= !(1 << slot);
            while let Some(entry) = lists.front(list) {
                lists.unlink(entry);
                if level == 0 {
                    lists.push_back(READY, entry);
                } else {
                    let when = deadline_of(entry);
                    self.insert(lists, entry, when);
                }
            }
        }
        self.elapsed = self.elapsed.max(now);
    }

    /// The earliest time an entry may be due: now when [`READY`] is not empty, else the start
    /// of the first non-empty bucket (a lower bound for entries of upper levels).
    pub(crate) fn next_deadline(&self, lists: &Lists) -> Option<u64> {
        if !lists.is_empty(READY) {
            return Some(self.elapsed);
        }
        self.next_expiration().map(|(_, _, start)| start)
    }

    /// Forgets every entry (the caller clears the lists).
    pub(crate) fn clear(&mut self) {
        self.occupied = [0; LEVELS];
    }
}

#[cfg(test)]
mod tests {
    use super::super::lists::Link;
    use super::*;
    use proptest::prelude::*;

    /// Runs the wheel over `deadlines` (ms from 0) with `step`-ms advances and returns the time
    /// at which each entry came out of it.
    fn fire_times(deadlines: &[u64], step: u64, removed: &[bool]) -> Vec<Option<u64>> {
        let mut lists = Lists::new(deadlines.len(), WHEEL_LISTS);
        lists.entries.resize(deadlines.len(), Link::UNLINKED);
        let mut wheel = Wheel::new(0);
        for (i, &d) in deadlines.iter().enumerate() {
            wheel.insert(&mut lists, i as u32, d);
        }
        for (i, &r) in removed.iter().enumerate() {
            if r {
                wheel.remove(&mut lists, i as u32);
            }
        }
        let mut fired = vec![None; deadlines.len()];
        let end = deadlines.iter().max().copied().unwrap_or(0) + step + 1;
        let mut now = 0;
        while now <= end {
            wheel.advance(&mut lists, now, |e| deadlines[e as usize]);
            while let Some(e) = lists.front(READY) {
                lists.unlink(e);
                assert!(fired[e as usize].is_none());
                fired[e as usize] = Some(now);
            }
            now += step;
        }
        fired
    }

    #[test]
    fn fires_at_the_deadline_across_levels() {
        let deadlines = [
            0, 1, 63, 64, 65, 4095, 4096, 4097, 262_143, 300_000, 720_000,
        ];
        let fired = fire_times(&deadlines, 1, &[false; 11]);
        for (d, f) in deadlines.iter().zip(&fired) {
            assert_eq!(Some(*d), *f, "deadline {d}");
        }
    }

    #[test]
    fn removed_entries_never_fire_and_clear_occupancy() {
        let deadlines = [5, 5, 70, 5000];
        let fired = fire_times(&deadlines, 1, &[true, false, true, true]);
        assert_eq!(fired, vec![None, Some(5), None, None]);
        let mut lists = Lists::new(1, WHEEL_LISTS);
        lists.entries.resize(1, Link::UNLINKED);
        let mut wheel = Wheel::new(0);
        wheel.insert(&mut lists, 0, 5000);
        assert!(wheel.next_deadline(&lists).is_some());
        wheel.remove(&mut lists, 0);
        assert_eq!(wheel.next_deadline(&lists), None);
    }

    proptest! {
        #[test]
        fn never_early_never_late_by_more_than_a_step(
            deadlines in proptest::collection::vec(0u64..2_000_000, 1..60),
            step in 1u64..5000,
        ) {
            let fired = fire_times(&deadlines, step, &vec![false; deadlines.len()]);
            for (d, f) in deadlines.iter().zip(&fired) {
                let f = f.expect("every entry fires");
                prop_assert!(f >= *d && f < d + step, "deadline {} fired at {}", d, f);
            }
        }
    }
}
