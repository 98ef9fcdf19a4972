//! Intrusive doubly-linked lists over table entries, by index: each entry has one [`Link`]
//! (kept in an array beside the sessions, so walking neighbours touches 8-byte links, not
//! sessions) and is in at most one list at a time. Each list is circular around a sentinel
//! head; sentinel ids have the top bit set.
//!
//! The table uses them for the timer wheel's buckets, the list of expired timers, the FIFO
//! lists of idle and closed sessions, and (through `next` only) the free list of entries.

/// No entry.
pub(crate) const NIL: u32 = u32::MAX;
/// Marks a list head (sentinel) id.
const SENTINEL: u32 = 1 << 31;

/// One entry's neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) prev: u32,
    pub(crate) next: u32,
}

impl Link {
    /// Not in a list.
    pub(crate) const UNLINKED: Link = Link {
        prev: NIL,
        next: NIL,
    };
}

/// The links of every entry plus the list heads.
#[derive(Debug)]
pub(crate) struct Lists {
    /// One link per entry, indexed like the entries.
    pub(crate) entries: Vec<Link>,
    heads: Vec<Link>,
}

impl Lists {
    /// Room for `capacity` entries (allocated now, filled as entries are added) and `lists`
    /// empty lists.
    pub(crate) fn new(capacity: usize, lists: usize) -> Lists {
        let heads = (0..lists as u32)
            .map(|i| Link {
                prev: SENTINEL | i,
                next: SENTINEL | i,
            })
            .collect();
        Lists {
            entries: Vec::with_capacity(capacity),
            heads,
        }
    }

    /// The list a link id names, when it is a list head.
    #[inline]
    pub(crate) fn as_list(id: u32) -> Option<usize> {
        if id != NIL && id & SENTINEL != 0 {
            Some((id & !SENTINEL) as usize)
        } else {
            None
        }
    }

    #[inline]
    fn link_mut(&mut self, id: u32) -> &mut Link {
        if id & SENTINEL != 0 {
            &mut self.heads[(id & !SENTINEL) as usize]
        } else {
            &mut self.entries[id as usize]
        }
    }

    /// True when `entry` is in some list.
    #[inline]
    pub(crate) fn is_linked(&self, entry: u32) -> bool {
        self.entries[entry as usize].next != NIL
    }

    /// True when `list` has no entry.
    #[inline]
    pub(crate) fn is_empty(&self, list: usize) -> bool {
        self.heads[list].next & SENTINEL != 0
    }

    /// The first entry of `list`.
    #[inline]
    pub(crate) fn front(&self, list: usize) -> Option<u32> {
        let next = self.heads[list].next;
        (next & SENTINEL == 0).then_some(next)
    }

    /// Appends an unlinked `entry` to `list`.
    #[inline]
    pub(crate) fn push_back(&mut self, list: usize, entry: u32) {
        debug_assert!(!self.is_linked(entry));
        let head = SENTINEL | list as u32;
        let tail = self.heads[list].prev;
        self.entries[entry as usize] = Link {
            prev: tail,
            next: head,
        };
        self.link_mut(tail).next = entry;
        self.heads[list].prev = entry;
    }

    /// Takes `entry` out of its list; returns its former neighbours.
    #[inline]
    pub(crate) fn unlink(&mut self, entry: u32) -> Link {
        let link = self.entries[entry as usize];
        debug_assert!(link.next != NIL);
        self.link_mut(link.prev).next = link.next;
        self.link_mut(link.next).prev = link.prev;
        self.entries[entry as usize] = Link::UNLINKED;
        link
    }

    /// The entries of `list`, front to back.
    #[cfg(test)]
    pub(crate) fn iter(&self, list: usize) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.heads[list].next;
        std::iter::from_fn(move || {
            if at & SENTINEL != 0 {
                return None;
            }
            let entry = at;
            at = self.entries[entry as usize].next;
            Some(entry)
        })
    }

    /// Empties every list (the entries' links are left as they are).
    pub(crate) fn clear_heads(&mut self) {
        for (i, head) in self.heads.iter_mut().enumerate() {
            *head = Link {
                prev: SENTINEL | i as u32,
                next: SENTINEL | i as u32,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(lists: &Lists, list: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = lists.heads[list].next;
        while Lists::as_list(at).is_none() {
            out.push(at);
            at = lists.entries[at as usize].next;
        }
        out
    }

    #[test]
    fn push_unlink_front() {
        let mut lists = Lists::new(8, 2);
        lists.entries.resize(5, Link::UNLINKED);
        for e in 0..4 {
            lists.push_back(0, e);
        }
        lists.push_back(1, 4);
        assert_eq!(collect(&lists, 0), vec![0, 1, 2, 3]);
        let old = lists.unlink(2);
        assert_eq!(old, Link { prev: 1, next: 3 });
        lists.unlink(0);
        assert_eq!(collect(&lists, 0), vec![1, 3]);
        assert_eq!(lists.front(0), Some(1));
        let old = lists.unlink(4);
        assert_eq!(Lists::as_list(old.prev), Some(1));
        assert!(lists.is_empty(1));
        assert!(!lists.is_linked(4));
        lists.push_back(1, 2);
        assert_eq!(collect(&lists, 1), vec![2]);
    }
}
