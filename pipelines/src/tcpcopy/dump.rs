//! `--dump-sent FILE`: every packet tcpcopy hands to its transmit ports, written to one pcap
//! file (LINKTYPE_RAW: each record is an IPv4 packet; nanosecond timestamps).
//!
//! Each worker's transmit port is wrapped in a [`DumpTx`] that copies every burst, as one
//! message, into the worker's own bounded queue ([`DumpTap`]) and then sends it as before. One
//! writer thread ([`DumpFile`]) drains all queues, orders the bursts of one round by time and
//! writes them. The worker never waits: when its queue is full the burst is dropped from the
//! dump (counted in [`DumpStats::dropped`]) and still sent. Burst buffers go back to the
//! worker through a second queue, so a steady run allocates nothing. The file is flushed
//! about once a second and when the last worker's port is dropped (a stop).
//!
//! A packet is dumped when it is handed to the port: one the port then fails to send (counted
//! in its `tx_errors`) is in the dump too.

use crossbeam::channel::{self, Receiver, Select, Sender, TrySendError};
use engine::port::{PortStats, TxBatch, TxPort};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bursts each worker may have queued for the writer before it drops from the dump.
pub const DEFAULT_QUEUE: usize = 4096;
/// Snap length of the dump (larger than any packet a transmit batch holds).
const SNAPLEN: u32 = 65535;
/// How often the writer flushes the file while packets flow.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What the dump counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Packets written to the file.
    pub written: u64,
    /// Packets left out because a worker's queue was full (the writer fell behind).
    pub dropped: u64,
    /// Packets lost to write errors of the file (after the first, the dump stops writing).
    pub errors: u64,
}

/// The counters, shared by the taps and the writer.
#[derive(Debug, Default)]
pub struct DumpCounters {
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

impl DumpCounters {
    /// The counts so far.
    pub fn snapshot(&self) -> DumpStats {
        DumpStats {
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// One transmitted burst: the packets back to back in `data`, their lengths in `lens`.
#[derive(Debug, Default)]
struct Burst {
    timestamp: Duration,
    data: Vec<u8>,
    lens: Vec<u32>,
}

impl Burst {
    fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0usize;
        self.lens.iter().map(move |&len| {
            let packet = &self.data[at..at + len as usize];
            at += len as usize;
            packet
        })
    }
}

/// A worker's end of the dump: copies bursts into its bounded queue, never waiting.
#[derive(Debug)]
pub struct DumpTap {
    bursts: Sender<Burst>,
    free: Receiver<Burst>,
    counters: Arc<DumpCounters>,
}

/// The writer's end of one tap.
#[derive(Debug)]
struct TapEnd {
    bursts: Receiver<Burst>,
    free: Sender<Burst>,
}

fn tap(queue: usize, counters: &Arc<DumpCounters>) -> (DumpTap, TapEnd) {
    let queue = queue.max(1);
    let (burst_tx, burst_rx) = channel::bounded(queue);
    let (free_tx, free_rx) = channel::bounded(queue);
    (
        DumpTap {
            bursts: burst_tx,
            free: free_rx,
            counters: counters.clone(),
        },
        TapEnd {
            bursts: burst_rx,
            free: free_tx,
        },
    )
}

impl DumpTap {
    /// Queues a copy of `batch`'s packets stamped `timestamp` (since the Unix epoch); when the
    /// queue is full they are counted as dropped instead.
    pub fn copy(&self, batch: &TxBatch, timestamp: Duration) {
        if batch.is_empty() {
            return;
        }
        let mut burst = self.free.try_recv().unwrap_or_default();
        burst.timestamp = timestamp;
        burst.data.clear();
        burst.lens.clear();
        for packet in batch.packets() {
            burst.data.extend_from_slice(packet);
            burst.lens.push(packet.len() as u32);
        }
        if let Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) =
            self.bursts.try_send(burst)
        {
            self.counters
                .dropped
                .fetch_add(b.lens.len() as u64, Ordering::Relaxed);
        }
    }
}

/// A transmit port that dumps what it sends: [`DumpTap::copy`], then the inner port.
pub struct DumpTx {
    inner: Box<dyn TxPort>,
    tap: DumpTap,
}

impl std::fmt::Debug for DumpTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpTx").field("tap", &self.tap).finish()
    }
}

impl DumpTx {
    /// Wraps `inner`, dumping through `tap`.
    pub fn new(inner: Box<dyn TxPort>, tap: DumpTap) -> DumpTx {
        DumpTx { inner, tap }
    }
}

impl TxPort for DumpTx {
    fn tx_burst(&mut self, batch: &mut TxBatch) -> io::Result<usize> {
        if !batch.is_empty() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.tap.copy(batch, now);
        }
        self.inner.tx_burst(batch)
    }

    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
}

/// The file behind the pcap writer, shared so the writer thread can flush it.
#[derive(Debug, Clone)]
struct Sink(Arc<Mutex<BufWriter<File>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("dump writer poisoned"))?
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("dump writer poisoned"))?
            .flush()
    }
}

/// The dump file and its writer thread. The thread ends once every tap is dropped (the
/// workers ended) and everything queued is written; [`DumpFile::finish`] waits for it
/// (dropping a `DumpFile` does not wait: the thread finishes by itself).
#[derive(Debug)]
pub struct DumpFile {
    path: PathBuf,
    counters: Arc<DumpCounters>,
    thread: Option<JoinHandle<()>>,
}

impl DumpFile {
    /// Creates `path` (truncating it), writes the pcap header and starts the writer thread
    /// with `taps` taps (one per worker) of `queue` bursts each.
    ///
    /// # Errors
    /// The file cannot be created or written, or the thread cannot start.
    pub fn create(path: &Path, taps: usize, queue: usize) -> io::Result<(DumpFile, Vec<DumpTap>)> {
        let file = File::create(path)?;
        let mut sink = Sink(Arc::new(Mutex::new(BufWriter::with_capacity(
            1 << 16,
            file,
        ))));
        let header = PcapHeader {
            snaplen: SNAPLEN,
            datalink: DataLink::RAW,
            ts_resolution: TsResolution::NanoSecond,
            endianness: Endianness::native(),
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(sink.clone(), header).map_err(io::Error::other)?;
        sink.flush()?;
        let counters = Arc::new(DumpCounters::default());
        let (taps, ends): (Vec<_>, Vec<_>) = (0..taps).map(|_| tap(queue, &counters)).unzip();
        let thread_counters = counters.clone();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("tcpcopy-dump".into())
            .spawn(move || {
                if let Err(e) = write_loop(ends, writer, sink, &thread_counters) {
                    tracing::error!("--dump-sent {shown}: cannot write: {e}; the dump stops here");
                }
            })?;
        Ok((
            DumpFile {
                path: path.to_path_buf(),
                counters,
                thread: Some(thread),
            },
            taps,
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared counters (for live statistics).
    pub fn counters(&self) -> Arc<DumpCounters> {
        self.counters.clone()
    }

    /// Waits for the writer to write what is queued and flush (drop the taps first, or this
    /// waits for ever), and returns the final counts.
    pub fn finish(mut self) -> DumpStats {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.counters.snapshot()
    }
}

/// Drains the taps until all are closed and empty: each round takes whatever is queued,
/// writes it in time order and hands the buffers back. After a write error, keeps draining
/// (so the workers' queues never stay full) and counts what it cannot write.
fn write_loop(
    mut ends: Vec<TapEnd>,
    mut writer: PcapWriter<Sink>,
    mut sink: Sink,
    counters: &DumpCounters,
) -> io::Result<()> {
    let mut round: Vec<(usize, Burst)> = Vec::new();
    let mut failed: Option<io::Error> = None;
    let mut last_flush = Instant::now();
    let mut dirty = false;
    while !ends.is_empty() {
        {
            let mut select = Select::new();
            for end in &ends {
                select.recv(&end.bursts);
            }
            // Ready: a burst, or a tap closed. Timeout: time to flush.
            let _ = select.ready_timeout(FLUSH_EVERY / 4);
        }
        let mut closed = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            loop {
                match end.bursts.try_recv() {
                    Ok(burst) => round.push((i, burst)),
                    Err(channel::TryRecvError::Empty) => break,
                    Err(channel::TryRecvError::Disconnected) => {
                        closed.push(i);
                        break;
                    }
                }
            }
        }
        round.sort_by_key(|(_, b)| b.timestamp);
        for (i, burst) in round.drain(..) {
            let count = burst.lens.len() as u64;
            if failed.is_none() {
                match write_burst(&mut writer, &burst) {
                    Ok(()) => {
                        counters.written.fetch_add(count, Ordering::Relaxed);
                        dirty = true;
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if failed.is_some() {
                counters.errors.fetch_add(count, Ordering::Relaxed);
            }
            let _ = ends[i].free.try_send(burst);
        }
        if !closed.is_empty() {
            // Indices of this round are used above; remove from the back.
            for &i in closed.iter().rev() {
                ends.remove(i);
            }
        }
        if dirty && failed.is_none() && (ends.is_empty() || last_flush.elapsed() >= FLUSH_EVERY) {
            if let Err(e) = sink.flush() {
                failed = Some(e);
            }
            dirty = false;
            last_flush = Instant::now();
        }
    }
    if failed.is_none() {
        sink.flush()?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn write_burst(writer: &mut PcapWriter<Sink>, burst: &Burst) -> io::Result<()> {
    for packet in burst.packets() {
        writer
            .write_packet(&PcapPacket::new(
                burst.timestamp,
                packet.len() as u32,
                packet,
            ))
            .map_err(io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::port::memory::MemoryTx;
    use pcap_file::pcap::PcapReader;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tcpcopy-dump-{}-{name}.pcap", std::process::id()))
    }

    /// (data link, resolution, packets) of a pcap file.
    fn read(path: &Path) -> (DataLink, TsResolution, Vec<(Duration, Vec<u8>)>) {
        let mut reader = PcapReader::new(File::open(path).unwrap()).unwrap();
        let header = reader.header();
        let mut packets = Vec::new();
        while let Some(p) = reader.next_packet() {
            let p = p.unwrap();
            packets.push((p.timestamp, p.data.into_owned()));
        }
        (header.datalink, header.ts_resolution, packets)
    }

    fn packet(i: u8, len: usize) -> Vec<u8> {
        let mut p = vec![i; len];
        p[0] = 0x45;
        p
    }

    #[test]
    fn two_workers_write_one_file_and_still_send() {
        let path = temp("two");
        let (dump, taps) = DumpFile::create(&path, 2, 16).unwrap();
        let mut ports: Vec<DumpTx> = taps
            .into_iter()
            .map(|t| DumpTx::new(Box::new(MemoryTx::new()), t))
            .collect();
        let mut batch = TxBatch::new(8);
        let mut expected = Vec::new();
        for round in 0..5u8 {
            for (w, port) in ports.iter_mut().enumerate() {
                for k in 0..3u8 {
                    let p = packet(round * 10 + w as u8 * 3 + k, 40 + usize::from(k) * 100);
                    assert!(batch.push(&p));
                    expected.push(p);
                }
                assert_eq!(port.tx_burst(&mut batch).unwrap(), 3);
                assert!(batch.is_empty());
            }
        }
        for port in &ports {
            assert_eq!(
                port.stats().tx_packets,
                15,
                "the inner port sent everything"
            );
        }
        drop(ports);
        let stats = dump.finish();
        assert_eq!(
            stats,
            DumpStats {
                written: 30,
                dropped: 0,
                errors: 0
            }
        );
        let (link, resolution, packets) = read(&path);
        assert_eq!(
            (link, resolution),
            (DataLink::RAW, TsResolution::NanoSecond)
        );
        let mut got: Vec<Vec<u8>> = packets.iter().map(|(_, p)| p.clone()).collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        assert!(
            packets.windows(2).all(|w| w[0].0 <= w[1].0) || packets.len() < 2,
            "records in time order within a round"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_full_queue_drops_from_the_dump_without_waiting() {
        let counters = Arc::new(DumpCounters::default());
        let (tap, end) = tap(2, &counters);
        let mut batch = TxBatch::new(4);
        for i in 0..5u8 {
            batch.push(&packet(i, 20));
            batch.push(&packet(i, 30));
            tap.copy(&batch, Duration::from_secs(u64::from(i)));
            batch.clear();
        }
        // Two bursts queued, three dropped (two packets each), nothing blocked.
        assert_eq!(counters.snapshot().dropped, 6);
        let path = temp("full");
        let file = File::create(&path).unwrap();
        let sink = Sink(Arc::new(Mutex::new(BufWriter::new(file))));
        let header = PcapHeader {
            datalink: DataLink::RAW,
            ts_resolution: TsResolution::NanoSecond,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(sink.clone(), header).unwrap();
        drop(tap);
        write_loop(vec![end], writer, sink, &counters).unwrap();
        assert_eq!(counters.snapshot().written, 4);
        let (_, _, packets) = read(&path);
        assert_eq!(
            packets
                .iter()
                .map(|(t, p)| (t.as_secs(), p[1], p.len()))
                .collect::<Vec<_>>(),
            vec![(0, 0, 20), (0, 0, 30), (1, 1, 20), (1, 1, 30)]
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn buffers_are_recycled() {
        let counters = Arc::new(DumpCounters::default());
        let (tap, end) = tap(4, &counters);
        let mut batch = TxBatch::new(2);
        batch.push(&packet(1, 100));
        tap.copy(&batch, Duration::ZERO);
        let burst = end.bursts.try_recv().unwrap();
        let ptr = burst.data.as_ptr();
        end.free.try_send(burst).unwrap();
        tap.copy(&batch, Duration::ZERO);
        let again = end.bursts.try_recv().unwrap();
        assert_eq!(again.data.as_ptr(), ptr, "the returned buffer is reused");
        assert_eq!(
            again.packets().collect::<Vec<_>>(),
            vec![&packet(1, 100)[..]]
        );
    }
}
