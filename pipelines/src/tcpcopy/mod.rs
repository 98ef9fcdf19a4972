//! The tcpcopy pipeline: capture -> filter -> transform (`-x`, `-c`) -> session -> transmit,
//! on one or more workers, with a control thread that registers sessions at every intercept and
//! hands each reply to the worker that owns its session.
//!
//! Threads and data:
//! - Worker `i` owns a capture socket that is member `i` of an AF_PACKET fanout group (a
//!   classic BPF program shards frames by the client port, [`engine::flow::port_shard`]), its
//!   own raw transmit socket, its session table, counters and latency histograms. Nothing on
//!   its path takes a lock; it publishes copies of its counters a few times a second.
//! - The control thread owns the intercept connections. Workers hand it CLIENT_ADD/DEL over
//!   one bounded channel each; it decodes reply records and pushes each onto the bounded
//!   channel of the worker that owns the session, found from the reply's client port alone.
//! - Workers busy-poll, and park in `poll(2)` on their capture socket after a few empty rounds
//!   (unless `busy_poll`); the control thread wakes a parked worker when it queues replies.

pub mod copies;
pub mod dispatch;
pub mod dump;
pub mod ingress;
pub mod latency;
pub mod modules;
pub mod offline;
pub mod ops;
pub mod owners;
pub mod transform;

use self::ingress::{Ingress, IngressStats};
use self::latency::Latency;
use self::transform::{ClientAddrs, Transfer};
use anyhow::Context;
use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use engine::control::{
    ClientConfig, ClientMessage, ClientStats, ControlClient, Framing, RecordFormat,
};
use engine::flow::FlowKey;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx, FanoutMode};
use engine::port::rawsock::{RawIpConfig, RawIpTx};
use engine::port::{PortStats, RxPort, TxBatch, TxPort};
use engine::session::{
    ClientPacket, ClientSegment, Output, Response, SessionConfig, SessionStats, SessionTable,
};
use engine::wire::{SeqNum, TcpFlags};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Frames taken from the capture ring per burst.
const BURST: usize = 64;
/// Empty polls before a worker parks in `poll(2)`.
const SPIN_LIMIT: u32 = 32;
/// Longest park, so stop requests and timers are seen promptly.
const MAX_PARK: Duration = Duration::from_millis(10);
/// How often workers publish their counters (histograms: every fifth time).
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Everything the tcpcopy pipeline needs, already validated.
#[derive(Debug, Clone)]
pub struct TcpcopyConfig {
    /// `-x` transfers.
    pub transfers: Vec<Transfer>,
    /// `-c` replay client addresses.
    pub clients: Option<ClientAddrs>,
    /// `-i`: where to capture: an interface (`eth0`), every interface (`any`), or a list
    /// (`eth0,eth1`); see [`crate::ports::capture_scope`].
    pub interface: String,
    /// `-B`: the capture ring's size in MiB (default: the port's, 64 MiB).
    pub capture_buffer_mib: Option<u32>,
    /// `-F` capture filter (default: made from the transfers).
    pub filter: String,
    /// Transmit interface for the raw socket (`-o`), if pinned.
    pub output_interface: Option<String>,
    /// `-s` intercepts.
    pub intercepts: Vec<SocketAddrV4>,
    /// `-C` connections per intercept.
    pub connections: usize,
    /// Record format of the control channel.
    pub record_format: RecordFormat,
    /// Framing of the control channel.
    pub framing: Framing,
    /// The session engine's tunables (`-t`, `-k`, `-W`, ...), per worker.
    pub session: SessionConfig,
    /// Period of the one-line statistics report (`None`: only at exit).
    pub stats_interval: Option<Duration>,
    /// Never park the workers (burns their cores; lowest latency).
    pub busy_poll: bool,
    /// Number of workers (capture sockets in one fanout group), at least 1.
    pub workers: usize,
    /// Cores to pin the workers to (worker `i` on `cores[i % len]`); `None`: no pinning.
    pub cores: Option<Vec<usize>>,
    /// Capture and transmit through DPDK devices instead of `interface` and the raw socket.
    pub dpdk: Option<crate::ports::DpdkSettings>,
    /// `--module`: the protocol module each worker's session table gets.
    pub module: Option<modules::ModuleSpec>,
    /// Control channel transport.
    pub transport: engine::control::Transport,
    /// Control channel shared secret (authentication on when set).
    pub auth: Option<engine::control::Secret>,
    /// Replay this capture file (`--pcap`) instead of capturing on `interface` (several workers:
    /// a dispatcher thread splits the file among them by client port).
    pub offline: Option<offline::OfflineConfig>,
    /// Copies (`-n`, `-f`), sampling (`-r`, `-g`), `-H` and `-M`.
    pub ingress: ingress::IngressOptions,
}

/// What one worker counted, published a few times a second.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Ingress.
    pub ingress: IngressStats,
    /// Sessions.
    pub sessions: SessionStats,
    /// Sessions in its table.
    pub table_len: usize,
    /// Its capture socket.
    pub capture: PortStats,
    /// Its transmit socket.
    pub transmit: PortStats,
    /// Route registrations it could not queue for the control thread.
    pub control_queue_full: u64,
    /// Replies it took from its queue.
    pub replies: u64,
    /// Sessions it shed on request of the `-m` memory cap.
    pub shed: u64,
    /// Routes it registered again because an intercept connection was taken up again.
    pub resynced: u64,
    /// Its histograms (published once a second).
    pub latency: Latency,
}

/// Counters of a whole run: the sum over workers, each worker's own, and the control thread's.
#[derive(Debug, Clone, Default)]
pub struct TcpcopyStats {
    /// Ingress (all workers).
    pub ingress: IngressStats,
    /// Sessions (all workers).
    pub sessions: SessionStats,
    /// Sessions in the tables.
    pub table_len: usize,
    /// Capture (all workers).
    pub capture: PortStats,
    /// Transmit (all workers).
    pub transmit: PortStats,
    /// Control channel.
    pub control: ClientStats,
    /// Route registrations dropped because a control queue was full.
    pub control_queue_full: u64,
    /// Replies dropped because a worker's queue was full.
    pub reply_queue_full: u64,
    /// Replies dispatched to each worker by the control thread.
    pub replies_dispatched: Vec<u64>,
    /// Each worker's own report.
    pub workers: Vec<WorkerReport>,
    /// Sessions shed for the `-m` memory cap (all workers).
    pub shed: u64,
    /// Routes of open sessions registered again after an intercept connection was taken up
    /// again (a restarted intercept knows none of them).
    pub resynced: u64,
    /// `--dump-sent` counters (zero without it).
    pub dump: dump::DumpStats,
}

fn add_ports(a: &mut PortStats, b: &PortStats) {
    a.rx_packets += b.rx_packets;
    a.rx_bytes += b.rx_bytes;
    a.rx_dropped += b.rx_dropped;
    a.rx_duplicates += b.rx_duplicates;
    a.tx_packets += b.tx_packets;
    a.tx_bytes += b.tx_bytes;
    a.tx_errors += b.tx_errors;
}

impl TcpcopyStats {
    /// Recomputes the sums from the worker reports.
    fn sum_workers(&mut self) {
        self.ingress = IngressStats::default();
        self.sessions = SessionStats::default();
        self.capture = PortStats::default();
        self.transmit = PortStats::default();
        self.table_len = 0;
        self.control_queue_full = 0;
        self.shed = 0;
        self.resynced = 0;
        for w in &self.workers {
            self.shed += w.shed;
            self.resynced += w.resynced;
            self.ingress.merge(&w.ingress);
            self.sessions.add(&w.sessions);
            add_ports(&mut self.capture, &w.capture);
            add_ports(&mut self.transmit, &w.transmit);
            self.table_len += w.table_len;
            self.control_queue_full += w.control_queue_full;
        }
    }

    /// All workers' histograms merged.
    pub fn latency(&self) -> Latency {
        let mut all = Latency::new();
        for w in &self.workers {
            all.merge(&w.latency);
        }
        all
    }

    /// One line per worker: what it captured, its sessions, the replies it was handed and
    /// handled, and its latency percentiles.
    pub fn worker_lines(&self) -> Vec<String> {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "worker {i}: captured {} sessions-created {} replies-dispatched {} replies {} \
                     replies-unmatched {} sent {} | {}",
                    w.ingress.captured,
                    w.sessions.created,
                    self.replies_dispatched.get(i).copied().unwrap_or(0),
                    w.sessions.responses + w.sessions.response_no_session,
                    w.sessions.response_no_session,
                    w.sessions.sent_segments + w.sessions.sent_acks,
                    w.latency.summary()
                )
            })
            .collect()
    }

    /// The one-line report.
    pub fn line(&self) -> String {
        let i = &self.ingress;
        let s = &self.sessions;
        let mut line = String::new();
        let _ = write!(
            line,
            "captured {} capture-drops {} capture-duplicates {} accepted {} (data {}) dropped: malformed {}: truncated {} bad-version {} bad-ihl {} \
             bad-total-len {} bad-data-offset {} bad-options {} cut-short {} | no-transfer {} not-tcp {} fragments {} \
             sampled-out {} copies {} split {} (pieces {}) localhost-rewritten {} | \
             sessions {} created {} mid-stream {} reconstructed {} module-prefixes {} module-vetoed {} established {} answered {} closed {} client-rst {} target-rst {} timed-out {} gave-up {} \
             port-reuse-reset {} port-reuse-replaced {} stale-at-target {} table-full {} no-session {} queue-full {} client-retransmits {} hole-fills {} | sent {} data {} syn {} fin {} rst {} acks {} \
             retransmits {} pace-releases {} tx-errors {} | replies {} (data {}) unmatched {} | \
             control up {} sent {} dropped {} reconnects {} queue-full {} udp-tx {} udp-rx {} udp-lost {} \
             udp-tx-dropped {} udp-rx-dropped {} records-lost {} udp-rejected {} \
             udp-replayed {} auth-failures {} | shed {} resynced {} dumped {} dump-dropped {}",
            i.captured,
            self.capture.rx_dropped,
            self.capture.rx_duplicates,
            i.accepted,
            i.accepted_data,
            i.malformed(),
            i.truncated,
            i.bad_version,
            i.bad_ihl,
            i.bad_total_len,
            i.bad_data_offset,
            i.bad_options,
            i.cut_short,
            i.no_transfer,
            i.not_tcp + i.not_ipv4,
            i.fragments,
            i.sampled_out,
            i.copies_made,
            i.split_packets,
            i.split_pieces,
            i.localhost_rewritten,
            self.table_len,
            s.created,
            s.mid_stream_created,
            s.reconstructed,
            s.module_prefixes,
            s.module_vetoed,
            s.established,
            s.answered,
            s.closed,
            s.client_resets,
            s.target_resets,
            s.timed_out,
            s.gave_up,
            s.port_reuse_resets,
            s.port_reuse_replaced,
            s.stale_target_resets,
            s.table_full,
            s.client_no_session,
            s.queue_full,
            s.client_retransmits,
            s.client_hole_fills,
            s.sent_segments + s.sent_acks,
            s.sent_data,
            s.sent_syn,
            s.sent_fin,
            s.sent_rst,
            s.sent_acks,
            s.retransmits,
            s.pace_releases,
            self.transmit.tx_errors,
            s.responses,
            s.response_data,
            s.response_no_session,
            self.control.connections_up,
            self.control.messages_sent,
            self.control.messages_dropped,
            self.control.reconnects,
            self.control_queue_full,
            self.control.datagrams_sent,
            self.control.datagrams_received,
            self.control.datagrams_lost,
            self.control.datagrams_send_dropped,
            self.control.datagrams_receive_dropped,
            self.control.records_lost,
            self.control.datagrams_rejected,
            self.control.datagrams_replayed,
            self.control.auth_failures,
            self.shed,
            self.resynced,
            self.dump.written,
            self.dump.dropped + self.dump.errors,
        );
        line
    }
}

/// A running pipeline: stop it with [`Tcpcopy::stop`], then [`Tcpcopy::join`].
#[derive(Debug)]
pub struct Tcpcopy {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    control: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    wakers: Vec<Arc<Waker>>,
    /// `--dump-sent`: the pcap file of what the workers send, finished by [`Tcpcopy::join`].
    dump: Option<dump::DumpFile>,
    /// The DPDK environment, dropped after the workers (and their ports) are gone.
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

/// Settings of a run that do not change what is replayed.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--dump-sent`: write every packet sent to the target to this pcap file (raw IPv4).
    pub dump_sent: Option<std::path::PathBuf>,
}

/// The kernel's ports: a capture socket per worker (one fanout group, sharded by client port)
/// and a raw IP socket per worker.
fn open_kernel_ports(
    config: &TcpcopyConfig,
    workers: usize,
) -> anyhow::Result<crate::ports::OpenedPorts> {
    let group = (std::process::id() & 0xffff) as u16;
    let mut rx: Vec<Box<dyn RxPort>> = Vec::with_capacity(workers);
    let mut tx: Vec<Box<dyn TxPort>> = Vec::with_capacity(workers);
    for i in 0..workers {
        let fanout = (workers > 1).then_some((
            group,
            FanoutMode::PortShard {
                workers: workers as u16,
            },
        ));
        let (interface, scope) = crate::ports::capture_scope(&config.interface);
        let defaults = AfPacketConfig::default();
        let block_count = config
            .capture_buffer_mib
            .map_or(defaults.block_count, |mib| {
                (u64::from(mib) * (1 << 20) / u64::from(defaults.block_size)).clamp(1, 65_536)
                    as u32
            });
        let capture = AfPacketRx::open(&AfPacketConfig {
            interface,
            scope,
            filter: Some(config.filter.clone()),
            fanout,
            block_count,
            ..defaults
        })
        .with_context(|| format!("cannot capture on -i {} (worker {i})", config.interface))?;
        rx.push(Box::new(capture));
        let transmit = RawIpTx::open(&RawIpConfig {
            bind_device: config.output_interface.clone(),
            ..RawIpConfig::default()
        })
        .context("cannot open the raw IP socket that sends to the target")?;
        tx.push(Box::new(transmit));
    }
    Ok(crate::ports::OpenedPorts {
        rx,
        tx,
        keep: None,
        register_thread: None,
    })
}

/// What the threads publish for the main thread (not on any packet path).
#[derive(Debug, Default)]
struct Shared {
    workers: Mutex<Vec<WorkerReport>>,
    control: Mutex<(ClientStats, u64, Vec<u64>)>,
    /// Sessions each worker is asked to shed (`-m`); the worker takes the request to zero.
    shed: Vec<AtomicU32>,
    /// Set by the control thread when an intercept connection was taken up again: each
    /// worker registers its open sessions again and clears its flag.
    resync: Vec<AtomicBool>,
    /// `--dump-sent` counters.
    dump: Option<Arc<dump::DumpCounters>>,
}

/// The control thread's view of one worker.
#[derive(Debug)]
struct WorkerLink {
    replies: Sender<Response>,
    messages: Receiver<ClientMessage>,
    waker: Arc<Waker>,
    parked: Arc<AtomicBool>,
}

impl Tcpcopy {
    /// Opens the ports and the control connections and starts the threads.
    ///
    /// # Errors
    /// A port that cannot be opened (named, with the cause), or threads that cannot start.
    pub fn start(config: TcpcopyConfig) -> anyhow::Result<Tcpcopy> {
        Tcpcopy::start_with(config, RunOptions::default())
    }

    /// [`Tcpcopy::start`] with run options (`--dump-sent`).
    ///
    /// # Errors
    /// As [`Tcpcopy::start`]; also a dump file that cannot be created (named).
    pub fn start_with(config: TcpcopyConfig, options: RunOptions) -> anyhow::Result<Tcpcopy> {
        let workers = config.workers.max(1);
        let opened = match &config.dpdk {
            Some(settings) => crate::ports::open_dpdk(settings, "tcpcopy", workers, true)?,
            None => match &config.offline {
                Some(file) => {
                    offline::open_ports(file, config.output_interface.as_deref(), workers)?
                }
                None => open_kernel_ports(&config, workers)?,
            },
        };
        let crate::ports::OpenedPorts {
            rx: captures,
            tx: transmits,
            keep,
            register_thread,
        } = opened;
        let (dump, transmits) = match &options.dump_sent {
            Some(path) => {
                let (file, taps) =
                    dump::DumpFile::create(path, transmits.len(), dump::DEFAULT_QUEUE)
                        .with_context(|| format!("cannot create --dump-sent {}", path.display()))?;
                let wrapped: Vec<Box<dyn TxPort>> = transmits
                    .into_iter()
                    .zip(taps)
                    .map(|(port, tap)| Box::new(dump::DumpTx::new(port, tap)) as Box<dyn TxPort>)
                    .collect();
                (Some(file), wrapped)
            }
            None => (None, transmits),
        };
        let mut client_config = ClientConfig::new(config.intercepts.clone());
        client_config.connections_per_server = config.connections;
        client_config.format = config.record_format;
        client_config.framing = config.framing;
        client_config.lonely = true;
        client_config.transport = config.transport;
        client_config.auth = config.auth.clone();
        let mut client =
            ControlClient::new(client_config).context("cannot set up the control channel")?;
        if config.offline.is_some() {
            // A file replay starts at once: its first sessions need intercept listening (the
            // C tool connects before it reads the file, too).
            let wait = Duration::from_secs(10);
            if !client
                .wait_connected(wait, &mut |_| {})
                .context("control channel")?
            {
                anyhow::bail!(
                    "--pcap: intercept {:?} not reachable within {wait:?}; start intercept first",
                    config.intercepts
                );
            }
        }
        let control_waker = client.waker();

        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            workers: Mutex::new(vec![WorkerReport::default(); workers]),
            control: Mutex::new((ClientStats::default(), 0, vec![0; workers])),
            shed: (0..workers).map(|_| AtomicU32::new(0)).collect(),
            resync: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            dump: dump.as_ref().map(dump::DumpFile::counters),
        });
        let mut links = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let mut wakers = vec![control_waker.clone()];
        for (id, (capture, transmit)) in captures.into_iter().zip(transmits).enumerate() {
            let (to_control, messages) = channel::bounded::<ClientMessage>(1 << 16);
            let (reply_tx, reply_rx) = channel::bounded::<Response>(1 << 16);
            let poll = Poll::new().context("mio poll")?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE).context("mio waker")?);
            let parked = Arc::new(AtomicBool::new(false));
            links.push(WorkerLink {
                replies: reply_tx,
                messages,
                waker: waker.clone(),
                parked: parked.clone(),
            });
            wakers.push(waker);
            let worker = Worker {
                id,
                poll,
                capture,
                transmit,
                batch: TxBatch::new(BURST * 2),
                ingress: Ingress::with_options(
                    config.transfers.clone(),
                    config.clients.clone(),
                    config.ingress,
                ),
                table: {
                    let mut table = SessionTable::new(config.session.clone());
                    if let Some(spec) = &config.module {
                        table.set_module(spec.build());
                    }
                    table
                },
                replies: reply_rx,
                to_control,
                control_waker: control_waker.clone(),
                parked,
                busy_poll: config.busy_poll,
                control_queue_full: 0,
                replies_taken: 0,
                shed: 0,
                resync_keys: Vec::new(),
                resynced: 0,
                frames: (0..BURST).map(|_| Vec::with_capacity(2048)).collect(),
                metas: Vec::with_capacity(BURST),
                burst_store: Vec::with_capacity(BURST),
                reply_burst: Vec::with_capacity(BURST * 4),
                latency: Latency::new(),
                stamps: Vec::with_capacity(BURST),
            };
            let core = config
                .cores
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| c[id % c.len()]);
            let worker_stop = stop.clone();
            let worker_shared = shared.clone();
            let register = register_thread.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tcpcopy-worker{id}"))
                    .spawn(move || {
                        if let Some(register) = register {
                            register();
                        }
                        if let Some(core) = core {
                            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                                tracing::warn!("worker {id}: cannot pin to core {core}");
                            }
                        }
                        worker.run(&worker_stop, &worker_shared)
                    })
                    .context("cannot start a worker thread")?,
            );
        }
        // RSS (DPDK) spreads flows by a hash that replies cannot reproduce: learn the owners.
        let dispatch = if config.dpdk.is_some() && workers > 1 {
            owners::Dispatch::Learned
        } else {
            owners::Dispatch::PortShard
        };
        let owners = owners::Owners::new(
            dispatch,
            workers,
            config.session.max_sessions.saturating_mul(workers),
        );
        let control_stop = stop.clone();
        let control_shared = shared.clone();
        let interval = config.stats_interval;
        let control = std::thread::Builder::new()
            .name("tcpcopy-control".into())
            .spawn(move || {
                control_loop(
                    client,
                    links,
                    owners,
                    &control_stop,
                    &control_shared,
                    interval,
                )
            })
            .context("cannot start the control thread")?;
        Ok(Tcpcopy {
            stop,
            shared,
            workers: handles,
            control: Some(control),
            wakers,
            dump,
            _keep: keep,
        })
    }

    /// Asks every worker to shed an eighth of its sessions, oldest idle first (the `-m`
    /// memory cap); returns how many were asked for. The workers count what they shed.
    pub fn request_shed(&self) -> usize {
        let lens: Vec<usize> = match self.shared.workers.lock() {
            Ok(w) => w.iter().map(|r| r.table_len).collect(),
            Err(_) => return 0,
        };
        let mut asked = 0;
        for (request, len) in self.shared.shed.iter().zip(lens) {
            let count = ops::MemoryCap::shed_count(len);
            request.store(u32::try_from(count).unwrap_or(u32::MAX), Ordering::Relaxed);
            asked += count;
        }
        for w in &self.wakers {
            let _ = w.wake();
        }
        asked
    }

    /// The counters so far (workers publish a few times a second).
    pub fn stats(&self) -> TcpcopyStats {
        snapshot(&self.shared)
    }

    /// True while every thread runs.
    pub fn is_running(&self) -> bool {
        self.workers.iter().all(|w| !w.is_finished())
            && self.control.as_ref().is_some_and(|c| !c.is_finished())
    }

    /// Asks the threads to stop (open sessions are reset at the target, counters flushed).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Waits for the threads and returns the final counters.
    ///
    /// # Errors
    /// The first error a thread ended with.
    pub fn join(mut self) -> anyhow::Result<TcpcopyStats> {
        self.stop();
        let mut result = Ok(());
        let handles: Vec<_> = self.workers.drain(..).chain(self.control.take()).collect();
        for handle in handles {
            let outcome = handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a tcpcopy thread panicked")));
            if let Err(e) = outcome {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        // The workers are gone and with them the dump's taps: the writer drains and flushes.
        if let Some(dump) = self.dump.take() {
            dump.finish();
        }
        result.map(|()| self.stats())
    }
}

fn snapshot(shared: &Shared) -> TcpcopyStats {
    let mut stats = TcpcopyStats::default();
    if let Ok(w) = shared.workers.lock() {
        stats.workers = w.clone();
    }
    if let Ok(c) = shared.control.lock() {
        stats.control = c.0;
        stats.reply_queue_full = c.1;
        stats.replies_dispatched = c.2.clone();
    }
    stats.sum_workers();
    if let Some(dump) = &shared.dump {
        stats.dump = dump.snapshot();
    }
    stats
}

const CAPTURE: Token = Token(0);
const WAKE: Token = Token(1);

/// One session worker: owns its capture socket, sessions and transmit socket.
struct Worker {
    id: usize,
    poll: Poll,
    capture: Box<dyn RxPort>,
    transmit: Box<dyn TxPort>,
    batch: TxBatch,
    ingress: Ingress,
    table: SessionTable,
    replies: Receiver<Response>,
    to_control: Sender<ClientMessage>,
    control_waker: Arc<Waker>,
    parked: Arc<AtomicBool>,
    busy_poll: bool,
    control_queue_full: u64,
    replies_taken: u64,
    /// Sessions shed for the `-m` memory cap.
    shed: u64,
    /// Open sessions whose routes are still to be registered again (after an intercept came
    /// back), and how many were.
    resync_keys: Vec<FlowKey>,
    resynced: u64,
    /// One buffer per frame of a capture burst, for the rewritten packets.
    frames: Vec<Vec<u8>>,
    /// The accepted frames of the current burst: key and parsed segment.
    metas: Vec<(FlowKey, ClientSegment)>,
    /// The allocation of the burst handed to the session table, kept between rounds.
    burst_store: Vec<ClientPacket<'static>>,
    /// Replies taken from the control thread's queue this round.
    reply_burst: Vec<Response>,
    latency: Latency,
    /// Capture timestamps (ns since the epoch) of this round's accepted frames.
    stamps: Vec<u64>,
}

/// The worker's [`Output`]: packets into the transmit batch, registrations to the control
/// thread, reply latencies into the histogram.
struct WorkerOutput<'a> {
    transmit: &'a mut dyn TxPort,
    batch: &'a mut TxBatch,
    to_control: &'a Sender<ClientMessage>,
    queued_control: &'a mut usize,
    control_queue_full: &'a mut u64,
    latency: &'a mut Latency,
}

impl Output for WorkerOutput<'_> {
    fn transmit(&mut self, packet: &[u8]) {
        if !self.batch.push(packet) {
            let _ = self.transmit.tx_burst(self.batch);
            let _ = self.batch.push(packet);
        }
    }

    fn register(&mut self, key: FlowKey) {
        self.send_control(ClientMessage::add(key));
    }

    fn unregister(&mut self, key: FlowKey) {
        self.send_control(ClientMessage::del(key));
    }

    fn reply_latency(&mut self, latency: Duration) {
        self.latency.record_reply(latency);
    }
}

impl WorkerOutput<'_> {
    fn send_control(&mut self, message: ClientMessage) {
        match self.to_control.try_send(message) {
            Ok(()) => *self.queued_control += 1,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                *self.control_queue_full += 1
            }
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("sessions", &self.table.len())
            .finish()
    }
}

/// Empties `v` and hands its allocation over as a vector of another lifetime (an in-place
/// collect of an empty vector reuses the buffer: no allocation per burst).
fn reuse_vec<'a, 'b>(mut v: Vec<ClientPacket<'a>>) -> Vec<ClientPacket<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    fn run(mut self, stop: &AtomicBool, shared: &Shared) -> anyhow::Result<()> {
        let has_wait_fd = self.capture.wait_fd().is_some();
        if let Some(fd) = self.capture.wait_fd() {
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), CAPTURE, Interest::READABLE)
                .context("register the capture socket")?;
        }
        let epoch = Instant::now();
        let mut events = Events::with_capacity(8);
        let mut idle = 0u32;
        let mut last_publish = epoch;
        let mut publishes = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let now = epoch.elapsed();
            let (received, replies) = self.iterate(now)?;
            if let Some(request) = shared.shed.get(self.id) {
                if request.load(Ordering::Relaxed) > 0 {
                    self.shed(now, request)?;
                }
            }
            if shared.resync.get(self.id).is_some_and(|flag| {
                // A plain load every round; the read-modify-write only when it is set.
                flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::AcqRel)
            }) {
                self.resync_keys.clear();
                self.table.open_keys(&mut self.resync_keys);
            }
            if !self.resync_keys.is_empty() {
                self.resync();
            }
            if received == 0 {
                // A capture file replay: tell it whether sessions are still open; it ends a
                // round only when none is, and says when the last round is over.
                self.capture.consumer_idle(self.table.active() == 0);
                if self.capture.finished() {
                    break;
                }
            }
            if last_publish.elapsed() >= PUBLISH_EVERY {
                last_publish = Instant::now();
                publishes += 1;
                self.publish(shared, publishes.is_multiple_of(5));
            }
            if received > 0 || replies > 0 || self.busy_poll {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < SPIN_LIMIT {
                std::hint::spin_loop();
                continue;
            }
            if !has_wait_fd {
                // A poll-mode device cannot be waited on: nap briefly instead of spinning.
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            if self.replies.is_empty() {
                let timeout = match self.table.next_deadline() {
                    Some(d) => d.saturating_sub(epoch.elapsed()).min(MAX_PARK),
                    None => MAX_PARK,
                };
                let _ = self.poll.poll(&mut events, Some(timeout));
            }
            self.parked.store(false, Ordering::SeqCst);
        }
        // A clean stop: reset what is open at the target, flush, publish.
        let now = epoch.elapsed();
        let mut queued = 0usize;
        let mut out = WorkerOutput {
            transmit: self.transmit.as_mut(),
            batch: &mut self.batch,
            to_control: &self.to_control,
            queued_control: &mut queued,
            control_queue_full: &mut self.control_queue_full,
            latency: &mut self.latency,
        };
        self.table.shutdown(now, &mut out);
        let _ = self.transmit.tx_burst(&mut self.batch);
        let _ = self.control_waker.wake();
        self.publish(shared, true);
        Ok(())
    }

    /// One round: a capture burst, the replies waiting, due timers, transmit.
    fn iterate(&mut self, now: Duration) -> anyhow::Result<(usize, usize)> {
        let mut queued_control = 0usize;
        let Worker {
            capture,
            transmit,
            batch,
            ingress,
            table,
            to_control,
            frames,
            metas,
            burst_store,
            reply_burst,
            stamps,
            latency,
            ..
        } = self;
        let mut out = WorkerOutput {
            transmit: transmit.as_mut(),
            batch,
            to_control,
            queued_control: &mut queued_control,
            control_queue_full: &mut self.control_queue_full,
            latency,
        };
        stamps.clear();
        metas.clear();
        // Ingress writes each accepted frame into its own buffer; the session table then takes
        // the whole burst at once (it prefetches the sessions' entries ahead of use).
        let link = capture.link_type();
        let received = capture
            .rx_burst(BURST, &mut |frame| {
                // One frame may make several packets (-n copies, -M splits).
                let before = metas.len();
                ingress.process_all(frame.data, frame.wire_len, link, now, frames, metas);
                if metas.len() > before && frame.timestamp_ns != 0 {
                    stamps.push(frame.timestamp_ns);
                }
            })
            .context("capture failed")?;
        if !metas.is_empty() {
            let mut burst = reuse_vec(std::mem::take(burst_store));
            burst.extend(
                metas
                    .iter()
                    .zip(frames.iter())
                    .map(|(&(key, seg), packet)| ClientPacket { key, packet, seg }),
            );
            table.on_client_burst(&burst, now, &mut out);
            *burst_store = reuse_vec(burst);
        }
        reply_burst.clear();
        while reply_burst.len() < BURST * 4 {
            let Ok(resp) = self.replies.try_recv() else {
                break;
            };
            reply_burst.push(resp);
        }
        let replies = reply_burst.len();
        if replies > 0 {
            table.on_response_burst(reply_burst, now, &mut out);
        }
        self.replies_taken += replies as u64;
        table.run_timers(now, 1024, &mut out);
        if queued_control > 0 {
            // Wake the control thread before the SYNs leave, so CLIENT_ADD has a head start.
            let _ = self.control_waker.wake();
        }
        if !self.batch.is_empty() {
            self.transmit
                .tx_burst(&mut self.batch)
                .context("transmit failed")?;
        }
        if !self.stamps.is_empty() {
            let sent_at = unix_now_ns();
            for &stamp in &self.stamps {
                self.latency
                    .record_capture_to_tx(Duration::from_nanos(sent_at.saturating_sub(stamp)));
            }
        }
        Ok((received, replies))
    }

    /// Sheds the sessions asked for by the `-m` memory cap (oldest idle first).
    fn shed(&mut self, now: Duration, request: &AtomicU32) -> anyhow::Result<()> {
        let count = request.swap(0, Ordering::Relaxed) as usize;
        let mut queued = 0usize;
        let mut out = WorkerOutput {
            transmit: self.transmit.as_mut(),
            batch: &mut self.batch,
            to_control: &self.to_control,
            queued_control: &mut queued,
            control_queue_full: &mut self.control_queue_full,
            latency: &mut self.latency,
        };
        self.shed += self.table.shed(count, now, &mut out) as u64;
        if queued > 0 {
            let _ = self.control_waker.wake();
        }
        if !self.batch.is_empty() {
            self.transmit
                .tx_burst(&mut self.batch)
                .context("transmit failed")?;
        }
        Ok(())
    }

    fn publish(&self, shared: &Shared, with_latency: bool) {
        if let Ok(mut all) = shared.workers.lock() {
            let report = &mut all[self.id];
            report.ingress = *self.ingress.stats();
            report.sessions = *self.table.stats();
            report.table_len = self.table.len();
            report.capture = self.capture.stats();
            report.transmit = self.transmit.stats();
            report.control_queue_full = self.control_queue_full;
            report.replies = self.replies_taken;
            report.shed = self.shed;
            report.resynced = self.resynced;
            if with_latency {
                report.latency = self.latency.clone();
            }
        }
    }
}

impl Worker {
    /// Registers the routes of open sessions again (after an intercept came back), as many as
    /// the queue to the control thread takes now; the rest on the next rounds.
    fn resync(&mut self) {
        let mut sent = 0;
        while let Some(&key) = self.resync_keys.last() {
            match self.to_control.try_send(ClientMessage::add(key)) {
                Ok(()) => {
                    self.resync_keys.pop();
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        if sent > 0 {
            self.resynced += sent;
            let _ = self.control_waker.wake();
        }
    }
}

/// Converts a decoded reply record into the session engine's input.
pub fn to_response(h: &engine::control::ResponseHeader) -> Response {
    Response {
        key: h.flow_key(),
        seq: SeqNum(h.seq),
        ack: SeqNum(h.ack),
        flags: TcpFlags(h.flags),
        window: h.window,
        payload_len: u32::from(h.payload_len),
        timestamps: h.timestamps(),
        window_scale: h.window_scale(),
    }
}

fn control_loop(
    mut client: ControlClient,
    workers: Vec<WorkerLink>,
    mut owners: owners::Owners,
    stop: &AtomicBool,
    shared: &Shared,
    interval: Option<Duration>,
) -> anyhow::Result<()> {
    let mut woke = vec![false; workers.len()];
    let mut dispatched = vec![0u64; workers.len()];
    let mut reply_queue_full = 0u64;
    let mut last_report = Instant::now();
    let mut last_publish = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut reconnects = client.reconnects();
    loop {
        if stop.load(Ordering::Relaxed) && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
        }
        for (i, w) in workers.iter().enumerate() {
            while let Ok(message) = w.messages.try_recv() {
                owners.note(i, &message);
                client.send_message(&message);
            }
        }
        // On stop, give the workers' final messages a moment to leave, then go.
        if let Some(since) = stopping_since {
            if since.elapsed() > Duration::from_millis(200) {
                break;
            }
        }
        client
            .poll(Some(Duration::from_millis(20)), &mut |header| {
                let resp = to_response(header);
                let owner = owners.owner(&resp.key);
                match workers[owner].replies.try_send(resp) {
                    Ok(()) => {
                        woke[owner] = true;
                        dispatched[owner] += 1;
                    }
                    Err(_) => reply_queue_full += 1,
                }
            })
            .context("control channel poll failed")?;
        if client.reconnects() > reconnects {
            // An intercept is back (it may have restarted and know no route): every worker
            // registers its open sessions again.
            reconnects = client.reconnects();
            tracing::info!("an intercept connection is back: registering the open sessions again");
            for (i, flag) in shared.resync.iter().enumerate() {
                flag.store(true, Ordering::Release);
                woke[i] = true;
            }
        }
        for (i, w) in workers.iter().enumerate() {
            if woke[i] && w.parked.load(Ordering::SeqCst) {
                let _ = w.waker.wake();
            }
            woke[i] = false;
        }
        if last_publish.elapsed() >= PUBLISH_EVERY {
            last_publish = Instant::now();
            if let Ok(mut c) = shared.control.lock() {
                *c = (client.stats(), reply_queue_full, dispatched.clone());
            }
        }
        if let Some(every) = interval {
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                tracing::info!("{}", snapshot(shared).line());
            }
        }
    }
    if let Ok(mut c) = shared.control.lock() {
        *c = (client.stats(), reply_queue_full, dispatched);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_vector_keeps_its_allocation_between_rounds() {
        let v: Vec<ClientPacket<'static>> = Vec::with_capacity(BURST);
        let ptr = v.as_ptr() as usize;
        let reused: Vec<ClientPacket<'_>> = reuse_vec(v);
        assert_eq!(reused.capacity(), BURST);
        assert_eq!(reused.as_ptr() as usize, ptr);
        let back: Vec<ClientPacket<'static>> = reuse_vec(reused);
        assert_eq!((back.capacity(), back.as_ptr() as usize), (BURST, ptr));
    }
}
