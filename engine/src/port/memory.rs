//! In-memory ports for tests and benchmarks: [`MemoryRx`] hands out frames pushed into it,
//! [`MemoryTx`] records (or just counts) what is sent to it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use super::{Frame, PortStats, RxPort, TxBatch, TxPort};

/// A receive port fed from memory. Frames come out in push order.
///
/// Two modes: a queue ([`MemoryRx::new`], then [`MemoryRx::push`]) whose frames are handed out
/// once, or a replay ([`MemoryRx::repeat`]) that cycles through a fixed set of frames without
/// allocating, for benchmarks.
#[derive(Debug, Default)]
pub struct MemoryRx {
    /// Frames with their capture time in ns.
    frames: VecDeque<(Vec<u8>, u64)>,
    /// In replay mode: frames still to hand out; the queue is cycled instead of drained.
    replay_left: Option<u64>,
    stats: PortStats,
}

impl MemoryRx {
    /// An empty queue.
    pub fn new() -> MemoryRx {
        MemoryRx::default()
    }

    /// A replay of `frames` in a cycle until `total` frames have been handed out (timestamps 0).
    /// An empty `frames` yields nothing.
    pub fn repeat(frames: Vec<Vec<u8>>, total: u64) -> MemoryRx {
        let frames: VecDeque<_> = frames.into_iter().map(|f| (f, 0)).collect();
        let total = if frames.is_empty() { 0 } else { total };
        MemoryRx {
            frames,
            replay_left: Some(total),
            stats: PortStats::default(),
        }
    }

    /// Queues a copy of `frame` with timestamp 0.
    pub fn push(&mut self, frame: &[u8]) {
        self.push_with_time(frame, 0);
    }

    /// Queues a copy of `frame` captured at `timestamp_ns` (ns since the Unix epoch).
    pub fn push_with_time(&mut self, frame: &[u8], timestamp_ns: u64) {
        self.frames.push_back((frame.to_vec(), timestamp_ns));
    }

    /// Frames still to hand out.
    pub fn len(&self) -> usize {
        match self.replay_left {
            Some(left) => usize::try_from(left).unwrap_or(usize::MAX),
            None => self.frames.len(),
        }
    }

    /// True when no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RxPort for MemoryRx {
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut count = 0;
        while count < max {
            match &mut self.replay_left {
                Some(0) => break,
                Some(left) => {
                    *left -= 1;
                    // Non-empty: `repeat` zeroes the total for an empty set.
                    let Some(entry) = self.frames.pop_front() else {
                        break;
                    };
                    let (data, timestamp_ns) = (&entry.0, entry.1);
                    sink(Frame {
                        data,
                        wire_len: data.len(),
                        timestamp_ns,
                    });
                    self.stats.rx_bytes += data.len() as u64;
                    self.frames.push_back(entry);
                }
                None => {
                    let Some((data, timestamp_ns)) = self.frames.pop_front() else {
                        break;
                    };
                    sink(Frame {
                        data: &data,
                        wire_len: data.len(),
                        timestamp_ns,
                    });
                    self.stats.rx_bytes += data.len() as u64;
                }
            }
            self.stats.rx_packets += 1;
            count += 1;
        }
        Ok(count)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

/// A transmit port that records every packet sent (or only counts them in discard mode).
///
/// With a capacity limit it behaves like a queue that fills up: packets beyond the limit that
/// have not been [`taken`](MemoryTx::take) are counted in `tx_errors` and dropped.
#[derive(Debug, Default)]
pub struct MemoryTx {
    sent: Vec<Vec<u8>>,
    discard: bool,
    limit: Option<usize>,
    stats: PortStats,
}

impl MemoryTx {
    /// A port that records every packet, without limit.
    pub fn new() -> MemoryTx {
        MemoryTx::default()
    }

    /// A port that only counts packets and keeps none (for benchmarks).
    pub fn discarding() -> MemoryTx {
        MemoryTx {
            discard: true,
            ..MemoryTx::default()
        }
    }

    /// A recording port that holds at most `limit` packets; further sends fail until
    /// [`MemoryTx::take`] makes room.
    pub fn with_limit(limit: usize) -> MemoryTx {
        MemoryTx {
            limit: Some(limit),
            ..MemoryTx::default()
        }
    }

    /// Changes the capacity limit (`None`: unlimited).
    pub fn set_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    /// The packets recorded so far.
    pub fn sent(&self) -> &[Vec<u8>] {
        &self.sent
    }

    /// Takes the packets recorded so far, leaving room for more.
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.sent)
    }
}

impl TxPort for MemoryTx {
    fn tx_burst(&mut self, batch: &mut TxBatch) -> io::Result<usize> {
        let mut sent = 0;
        for packet in batch.packets() {
            if !self.discard {
                if self.limit.is_some_and(|limit| self.sent.len() >= limit) {
                    self.stats.tx_errors += 1;
                    continue;
                }
                self.sent.push(packet.to_vec());
            }
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += packet.len() as u64;
            sent += 1;
        }
        batch.clear();
        Ok(sent)
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(rx: &mut MemoryRx, max: usize) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let n = rx
            .rx_burst(max, &mut |f: Frame<'_>| {
                out.push((f.data.to_vec(), f.timestamp_ns))
            })
            .unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn rx_in_order_and_respects_max() {
        let mut rx = MemoryRx::new();
        assert!(rx.wait_fd().is_none());
        rx.push(&[1]);
        rx.push_with_time(&[2, 2], 7);
        rx.push(&[3, 3, 3]);
        assert_eq!(rx.len(), 3);
        assert_eq!(collect(&mut rx, 2), vec![(vec![1], 0), (vec![2, 2], 7)]);
        assert_eq!(collect(&mut rx, 0), vec![]);
        assert_eq!(collect(&mut rx, 5), vec![(vec![3, 3, 3], 0)]);
        assert!(rx.is_empty());
        assert_eq!(collect(&mut rx, 5), vec![]);
        let stats = rx.stats();
        assert_eq!((stats.rx_packets, stats.rx_bytes), (3, 6));
    }

    #[test]
    fn rx_frame_fields() {
        let mut rx = MemoryRx::new();
        rx.push_with_time(&[9; 60], 123);
        let mut seen = None;
        rx.rx_burst(1, &mut |f: Frame<'_>| {
            seen = Some((f.wire_len, f.data.len(), f.timestamp_ns))
        })
        .unwrap();
        assert_eq!(seen, Some((60, 60, 123)));
    }

    #[test]
    fn rx_repeat_cycles() {
        let mut rx = MemoryRx::repeat(vec![vec![1], vec![2]], 5);
        assert_eq!(rx.len(), 5);
        let got: Vec<u8> = collect(&mut rx, 10)
            .into_iter()
            .map(|(d, _)| d[0])
            .collect();
        assert_eq!(got, vec![1, 2, 1, 2, 1]);
        assert!(rx.is_empty());
        assert_eq!(rx.stats().rx_packets, 5);
        let mut empty = MemoryRx::repeat(Vec::new(), 5);
        assert!(empty.is_empty());
        assert_eq!(collect(&mut empty, 10), vec![]);
    }

    #[test]
    fn tx_records_and_takes() {
        let mut tx = MemoryTx::new();
        let mut batch = TxBatch::new(4);
        batch.push(&[1, 2]);
        batch.push(&[3]);
        assert_eq!(tx.tx_burst(&mut batch).unwrap(), 2);
        assert!(batch.is_empty());
        assert_eq!(tx.sent(), &[vec![1, 2], vec![3]]);
        assert_eq!(tx.take(), vec![vec![1, 2], vec![3]]);
        assert!(tx.sent().is_empty());
        let stats = tx.stats();
        assert_eq!(
            (stats.tx_packets, stats.tx_bytes, stats.tx_errors),
            (2, 3, 0)
        );
    }

    #[test]
    fn tx_discard_counts_only() {
        let mut tx = MemoryTx::discarding();
        let mut batch = TxBatch::new(4);
        for _ in 0..3 {
            batch.push(&[0; 10]);
        }
        assert_eq!(tx.tx_burst(&mut batch).unwrap(), 3);
        assert!(tx.sent().is_empty());
        assert_eq!(tx.stats().tx_bytes, 30);
    }

    #[test]
    fn tx_limit_simulates_full_queue() {
        let mut tx = MemoryTx::with_limit(2);
        let mut batch = TxBatch::new(4);
        for i in 0..3 {
            batch.push(&[i]);
        }
        assert_eq!(tx.tx_burst(&mut batch).unwrap(), 2);
        assert!(batch.is_empty());
        assert_eq!(tx.stats().tx_errors, 1);
        assert_eq!(tx.take().len(), 2);
        batch.push(&[9]);
        assert_eq!(tx.tx_burst(&mut batch).unwrap(), 1);
        tx.set_limit(None);
        assert_eq!(
            tx.stats(),
            PortStats {
                tx_packets: 3,
                tx_bytes: 3,
                tx_errors: 1,
                ..PortStats::default()
            }
        );
    }
}
