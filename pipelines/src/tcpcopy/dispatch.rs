//! One input that cannot be split by the kernel (a capture file) shared by several workers: a
//! dispatcher thread reads it and hands each frame to the worker that owns its session over a
//! bounded channel, by the shard of the client port ([`engine::flow::port_shard`], the same
//! function the control thread uses to hand replies to workers, and which `-n` copies and `-f`
//! preserve). The source's timing stays in the source: frames are handed on when it releases
//! them. A full channel makes the dispatcher wait (the file is not dropped from, it slows).
//!
//! A finite source ends rounds only when its consumers are idle: the dispatcher tells it so
//! when every worker reports no active session and every channel is empty; when the source is
//! finished, the dispatcher closes the channels and each worker, having drained its own,
//! finishes too.

use engine::flow::port_shard;
use engine::port::{Frame, PortStats, RxPort};
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::ipv4::{PROTO_TCP, PROTO_UDP};
use engine::wire::{EthernetFrame, Ipv4Packet, TcpPacket, UdpPacket};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender, TryRecvError};

/// Frames a worker's channel holds.
const CHANNEL_FRAMES: usize = 4096;
/// Frames the dispatcher asks its source for at once.
const BURST: usize = 64;

/// A frame handed to a worker.
#[derive(Debug)]
struct Handed {
    data: Vec<u8>,
    wire_len: usize,
    timestamp_ns: u64,
}

/// What the dispatcher shares with one worker's port.
#[derive(Debug, Default)]
struct Link {
    /// The worker has no active session (its last word).
    idle: AtomicBool,
    /// Frames handed to this worker.
    handed: AtomicU64,
}

/// A worker's end: an [`RxPort`] over its channel.
#[derive(Debug)]
pub struct ChannelRx {
    frames: Receiver<Handed>,
    link: Arc<Link>,
    finished: bool,
    stats: PortStats,
}

impl RxPort for ChannelRx {
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            match self.frames.try_recv() {
                Ok(f) => {
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += f.data.len() as u64;
                    sink(Frame {
                        data: &f.data,
                        wire_len: f.wire_len,
                        timestamp_ns: f.timestamp_ns,
                    });
                    n += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.finished = true;
                    break;
                }
            }
        }
        Ok(n)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn consumer_idle(&mut self, idle: bool) {
        self.link.idle.store(idle, Ordering::Relaxed);
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

/// The dispatcher thread; dropping it detaches the thread, which ends with its source or when
/// every worker has gone.
#[derive(Debug)]
pub struct Dispatcher {
    handle: Option<std::thread::JoinHandle<()>>,
    links: Vec<Arc<Link>>,
}

impl Dispatcher {
    /// Frames handed to each worker so far.
    pub fn handed(&self) -> Vec<u64> {
        self.links
            .iter()
            .map(|l| l.handed.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits for the dispatcher thread to end.
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The client port of an Ethernet (optionally VLAN-tagged) IPv4/TCP or UDP frame.
fn client_port(frame: &[u8]) -> Option<u16> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[eth.header_len()..]).ok()?;
    match ip.protocol() {
        PROTO_TCP => TcpPacket::new_checked(ip.payload())
            .ok()
            .map(|t| t.src_port()),
        PROTO_UDP => UdpPacket::new_checked(ip.payload())
            .ok()
            .map(|u| u.src_port()),
        _ => None,
    }
}

/// Splits `source` among `workers` ports (see the module docs).
///
/// # Errors
/// The dispatcher thread cannot start.
pub fn split(
    mut source: Box<dyn RxPort>,
    workers: usize,
) -> io::Result<(Vec<Box<dyn RxPort>>, Dispatcher)> {
    let workers = workers.max(1);
    let mut senders: Vec<Sender<Handed>> = Vec::with_capacity(workers);
    let mut ports: Vec<Box<dyn RxPort>> = Vec::with_capacity(workers);
    let mut links = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = channel::bounded(CHANNEL_FRAMES);
        let link = Arc::new(Link::default());
        senders.push(tx);
        links.push(link.clone());
        ports.push(Box::new(ChannelRx {
            frames: rx,
            link,
            finished: false,
            stats: PortStats::default(),
        }));
    }
    let thread_links = links.clone();
    let handle = std::thread::Builder::new()
        .name("tcpcopy-dispatch".into())
        .spawn(move || run(source.as_mut(), &senders, &thread_links))?;
    Ok((
        ports,
        Dispatcher {
            handle: Some(handle),
            links,
        },
    ))
}

fn run(source: &mut dyn RxPort, senders: &[Sender<Handed>], links: &[Arc<Link>]) {
    let workers = senders.len();
    let mut batch: Vec<(usize, Handed)> = Vec::with_capacity(BURST);
    loop {
        let idle = senders.iter().all(|s| s.is_empty())
            && links.iter().all(|l| l.idle.load(Ordering::Relaxed));
        source.consumer_idle(idle);
        if source.finished() {
            return; // The senders drop: each worker drains its channel and finishes.
        }
        batch.clear();
        let got = source.rx_burst(BURST, &mut |frame| {
            let owner = client_port(frame.data).map_or(0, |p| port_shard(p, workers));
            batch.push((
                owner,
                Handed {
                    data: frame.data.to_vec(),
                    wire_len: frame.wire_len,
                    timestamp_ns: frame.timestamp_ns,
                },
            ));
        });
        let Ok(got) = got else {
            return;
        };
        for (owner, frame) in batch.drain(..) {
            // The worker is busy (not idle) until it has taken this frame.
            links[owner].idle.store(false, Ordering::Relaxed);
            if send(&senders[owner], frame).is_err() {
                return; // That worker is gone: the pipeline is stopping.
            }
            links[owner].handed.fetch_add(1, Ordering::Relaxed);
        }
        if got == 0 {
            wait(source);
        }
    }
}

/// Sends, waiting while the channel is full (bounded waits, so a stop is seen).
fn send(to: &Sender<Handed>, mut frame: Handed) -> Result<(), ()> {
    loop {
        match to.send_timeout(frame, Duration::from_millis(100)) {
            Ok(()) => return Ok(()),
            Err(channel::SendTimeoutError::Timeout(f)) => frame = f,
            Err(channel::SendTimeoutError::Disconnected(_)) => return Err(()),
        }
    }
}

/// Nothing was due: a short nap (a file source releases frames by their time; 200 µs keeps
/// the release precise well below a millisecond without spinning a core).
fn wait(_source: &dyn RxPort) {
    std::thread::sleep(Duration::from_micros(200));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src_port: u16) -> Vec<u8> {
        use engine::wire::tcp::{emit_ipv4_tcp, TcpRepr};
        let mut f = vec![0x02, 0, 0, 0, 0, 0x14, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00];
        let repr = TcpRepr {
            src_port,
            dst_port: 80,
            ..TcpRepr::default()
        };
        let (src, dst) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        emit_ipv4_tcp(&mut f, src, dst, 1, 64, &repr, b"");
        f
    }

    /// A finite source: its frames, then finished once its consumers said they are idle.
    struct Finite {
        frames: Vec<Vec<u8>>,
        next: usize,
        idle_after_end: bool,
        finished: Arc<AtomicBool>,
    }

    impl RxPort for Finite {
        fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
            let end = (self.next + max).min(self.frames.len());
            for f in &self.frames[self.next..end] {
                sink(Frame {
                    data: f,
                    wire_len: f.len(),
                    timestamp_ns: 0,
                });
            }
            let n = end - self.next;
            self.next = end;
            Ok(n)
        }
        fn wait_fd(&self) -> Option<RawFd> {
            None
        }
        fn stats(&self) -> PortStats {
            PortStats::default()
        }
        fn consumer_idle(&mut self, idle: bool) {
            if idle && self.next == self.frames.len() {
                self.idle_after_end = true;
            }
        }
        fn finished(&self) -> bool {
            let done = self.idle_after_end;
            self.finished.store(done, Ordering::Relaxed);
            done
        }
    }

    #[test]
    fn frames_reach_the_worker_of_their_client_port_and_rounds_wait_for_idle_workers() {
        assert_eq!(client_port(&frame(40_000)), Some(40_000));
        assert_eq!(client_port(&[0u8; 10]), None);
        let ports: Vec<u16> = (0..3000u32)
            .map(|i| (1024 + i * 7919 % 60_000) as u16)
            .collect();
        let done = Arc::new(AtomicBool::new(false));
        let source = Finite {
            frames: ports.iter().map(|&p| frame(p)).collect(),
            next: 0,
            idle_after_end: false,
            finished: done.clone(),
        };
        let (mut rxs, dispatcher) = split(Box::new(source), 3).unwrap();
        let mut seen = vec![Vec::new(); 3];
        // Worker 1 stays busy for a while: the source must not finish before it is idle.
        for round in 0..20_000 {
            for (w, rx) in rxs.iter_mut().enumerate() {
                rx.rx_burst(64, &mut |f| seen[w].push(client_port(f.data).unwrap()))
                    .unwrap();
                rx.consumer_idle(w != 1 || round > 100);
            }
            if round == 100 {
                assert!(
                    !done.load(Ordering::Relaxed),
                    "finished while a worker was busy"
                );
            }
            if rxs.iter().all(|r| r.finished()) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(
            rxs.iter().all(|r| r.finished()),
            "the workers finish after the source"
        );
        assert_eq!(seen.iter().map(Vec::len).sum::<usize>(), 3000);
        for (w, ports) in seen.iter().enumerate() {
            assert!(ports.iter().all(|&p| port_shard(p, 3) == w), "worker {w}");
        }
        assert_eq!(
            dispatcher.handed(),
            seen.iter().map(|s| s.len() as u64).collect::<Vec<_>>()
        );
        dispatcher.join();
    }
}
