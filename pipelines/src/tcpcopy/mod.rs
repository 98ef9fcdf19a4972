//! The tcpcopy pipeline: capture -> filter -> transform (`-x`, `-c`) -> session -> transmit,
//! with a control thread that registers sessions at every intercept and hands their replies
//! back to the worker that owns the session.
//!
//! Threads: one worker (it owns the capture port, the session table and the transmit port) and
//! one control thread (it owns the connections to the intercepts). They talk over bounded
//! crossbeam channels; each wakes the other with a `mio::Waker` only when the other is parked.

pub mod ingress;
pub mod transform;

use self::ingress::{Ingress, IngressStats, LinkType};
use self::transform::{ClientAddrs, Transfer};
use anyhow::Context;
use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use engine::control::{
    ClientConfig, ClientMessage, ClientStats, ControlClient, Framing, RecordFormat,
};
use engine::flow::FlowKey;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx};
use engine::port::rawsock::{RawIpConfig, RawIpTx};
use engine::port::{PortStats, RxPort, TxBatch, TxPort};
use engine::session::{Output, Response, SessionConfig, SessionStats, SessionTable};
use engine::wire::{SeqNum, TcpFlags};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames taken from the capture ring per burst.
const BURST: usize = 64;
/// Empty polls before a worker parks in `poll(2)`.
const SPIN_LIMIT: u32 = 32;
/// Longest park, so stop requests and timers are seen promptly.
const MAX_PARK: Duration = Duration::from_millis(10);

/// Everything the tcpcopy pipeline needs, already validated.
#[derive(Debug, Clone)]
pub struct TcpcopyConfig {
    /// `-x` transfers.
    pub transfers: Vec<Transfer>,
    /// `-c` replay client addresses.
    pub clients: Option<ClientAddrs>,
    /// `-i` capture interface.
    pub interface: String,
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
    /// The session engine's tunables (`-t`, `-k`, `-W`, ...).
    pub session: SessionConfig,
    /// Period of the one-line statistics report (`None`: only at exit).
    pub stats_interval: Option<Duration>,
    /// Never park the worker (burns a core; lowest latency).
    pub busy_poll: bool,
}

/// Counters of a whole run, printed periodically and at exit.
#[derive(Debug, Clone, Default)]
pub struct TcpcopyStats {
    /// Ingress.
    pub ingress: IngressStats,
    /// Sessions.
    pub sessions: SessionStats,
    /// Sessions in the table.
    pub table_len: usize,
    /// Capture port.
    pub capture: PortStats,
    /// Transmit port.
    pub transmit: PortStats,
    /// Control channel.
    pub control: ClientStats,
    /// Route registrations dropped because the control queue was full.
    pub control_queue_full: u64,
    /// Replies dropped because the worker's queue was full.
    pub reply_queue_full: u64,
    /// Replies that could not be decoded.
    pub reply_malformed: u64,
}

impl TcpcopyStats {
    /// The one-line report.
    pub fn line(&self) -> String {
        let i = &self.ingress;
        let s = &self.sessions;
        let mut line = String::new();
        let _ = write!(
            line,
            "captured {} capture-drops {} accepted {} (data {}) dropped: malformed {}: truncated {} bad-version {} bad-ihl {} \
             bad-total-len {} bad-data-offset {} bad-options {} cut-short {} | no-transfer {} not-tcp {} fragments {} | \
             sessions {} created {} established {} closed {} client-rst {} target-rst {} timed-out {} gave-up {} \
             port-reuse-reset {} port-reuse-replaced {} table-full {} no-session {} queue-full {} client-retransmits {} | sent {} data {} syn {} fin {} rst {} acks {} \
             retransmits {} pace-releases {} tx-errors {} | replies {} (data {}) unmatched {} | \
             control up {} sent {} dropped {} reconnects {} queue-full {}",
            i.captured,
            self.capture.rx_dropped,
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
            self.table_len,
            s.created,
            s.established,
            s.closed,
            s.client_resets,
            s.target_resets,
            s.timed_out,
            s.gave_up,
            s.port_reuse_resets,
            s.port_reuse_replaced,
            s.table_full,
            s.client_no_session,
            s.queue_full,
            s.client_retransmits,
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
        );
        line
    }
}

/// A running pipeline: stop it with [`Tcpcopy::stop`], then [`Tcpcopy::join`].
#[derive(Debug)]
pub struct Tcpcopy {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<TcpcopyStats>>,
    worker: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    control: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    wakers: Vec<Arc<Waker>>,
}

/// The control thread's view of one worker.
#[derive(Debug)]
struct WorkerLink {
    replies: Sender<Response>,
    waker: Arc<Waker>,
    parked: Arc<AtomicBool>,
}

impl Tcpcopy {
    /// Opens the ports and the control connections and starts the threads.
    ///
    /// # Errors
    /// A port that cannot be opened (named, with the cause), or threads that cannot start.
    pub fn start(config: TcpcopyConfig) -> anyhow::Result<Tcpcopy> {
        let capture = AfPacketRx::open(&AfPacketConfig {
            interface: config.interface.clone(),
            filter: Some(config.filter.clone()),
            ..AfPacketConfig::default()
        })
        .with_context(|| format!("cannot capture on -i {}", config.interface))?;
        let transmit = RawIpTx::open(&RawIpConfig {
            bind_device: config.output_interface.clone(),
            ..RawIpConfig::default()
        })
        .context("cannot open the raw IP socket that sends to the target")?;
        let mut client_config = ClientConfig::new(config.intercepts.clone());
        client_config.connections_per_server = config.connections;
        client_config.format = config.record_format;
        client_config.framing = config.framing;
        client_config.lonely = true;
        let client =
            ControlClient::new(client_config).context("cannot set up the control channel")?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(TcpcopyStats::default()));
        let (to_control, from_workers) = channel::bounded::<ClientMessage>(1 << 16);
        let (reply_tx, reply_rx) = channel::bounded::<Response>(1 << 16);
        let poll = Poll::new().context("mio poll")?;
        let worker_waker = Arc::new(Waker::new(poll.registry(), WAKE).context("mio waker")?);
        let parked = Arc::new(AtomicBool::new(false));
        let control_waker = client.waker();
        let link = WorkerLink {
            replies: reply_tx,
            waker: worker_waker.clone(),
            parked: parked.clone(),
        };

        let worker = Worker {
            poll,
            capture: Box::new(capture),
            transmit: Box::new(transmit),
            batch: TxBatch::new(BURST * 2),
            ingress: Ingress::new(config.transfers.clone(), config.clients.clone()),
            table: SessionTable::new(config.session.clone()),
            replies: reply_rx,
            to_control,
            control_waker: control_waker.clone(),
            parked,
            busy_poll: config.busy_poll,
            control_queue_full: 0,
            packet: Vec::with_capacity(engine::port::MAX_PACKET),
        };
        let worker_stop = stop.clone();
        let worker_stats = stats.clone();
        let worker = std::thread::Builder::new()
            .name("tcpcopy-worker0".into())
            .spawn(move || worker.run(&worker_stop, &worker_stats))
            .context("cannot start the worker thread")?;
        let control_stop = stop.clone();
        let control_stats = stats.clone();
        let interval = config.stats_interval;
        let control = std::thread::Builder::new()
            .name("tcpcopy-control".into())
            .spawn(move || {
                control_loop(
                    client,
                    from_workers,
                    vec![link],
                    &control_stop,
                    &control_stats,
                    interval,
                )
            })
            .context("cannot start the control thread")?;
        Ok(Tcpcopy {
            stop,
            stats,
            worker: Some(worker),
            control: Some(control),
            wakers: vec![worker_waker, control_waker],
        })
    }

    /// The counters so far (updated by the threads a few times per second).
    pub fn stats(&self) -> TcpcopyStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True while both threads run.
    pub fn is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
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
        for handle in [self.worker.take(), self.control.take()]
            .into_iter()
            .flatten()
        {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
                Err(_) => {
                    if result.is_ok() {
                        result = Err(anyhow::anyhow!("a tcpcopy thread panicked"));
                    }
                }
            }
        }
        result.map(|()| self.stats())
    }
}

const CAPTURE: Token = Token(0);
const WAKE: Token = Token(1);

/// The session worker: owns capture, sessions and transmit.
struct Worker {
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
    packet: Vec<u8>,
}

/// The worker's [`Output`]: packets into the transmit batch, registrations to the control thread.
struct WorkerOutput<'a> {
    transmit: &'a mut dyn TxPort,
    batch: &'a mut TxBatch,
    to_control: &'a Sender<ClientMessage>,
    queued_control: &'a mut usize,
    control_queue_full: &'a mut u64,
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
            .field("sessions", &self.table.len())
            .finish()
    }
}

impl Worker {
    fn run(mut self, stop: &AtomicBool, stats: &Mutex<TcpcopyStats>) -> anyhow::Result<()> {
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
        while !stop.load(Ordering::Relaxed) {
            let now = epoch.elapsed();
            let (received, replies) = self.iterate(now)?;
            if last_publish.elapsed() >= Duration::from_millis(200) {
                last_publish = Instant::now();
                self.publish(stats);
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
        };
        self.table.shutdown(now, &mut out);
        let _ = self.transmit.tx_burst(&mut self.batch);
        let _ = self.control_waker.wake();
        self.publish(stats);
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
            packet,
            ..
        } = self;
        let mut out = WorkerOutput {
            transmit: transmit.as_mut(),
            batch,
            to_control,
            queued_control: &mut queued_control,
            control_queue_full: &mut self.control_queue_full,
        };
        let received = capture
            .rx_burst(BURST, &mut |frame| {
                if let Some((key, seg)) =
                    ingress.process(frame.data, frame.wire_len, LinkType::Ethernet, packet)
                {
                    table.on_client_packet(key, packet, &seg, now, &mut out);
                }
            })
            .context("capture failed")?;
        let mut replies = 0;
        while replies < BURST * 4 {
            let Ok(resp) = self.replies.try_recv() else {
                break;
            };
            table.on_response(&resp, now, &mut out);
            replies += 1;
        }
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
        Ok((received, replies))
    }

    fn publish(&self, stats: &Mutex<TcpcopyStats>) {
        if let Ok(mut s) = stats.lock() {
            s.ingress = *self.ingress.stats();
            s.sessions = *self.table.stats();
            s.table_len = self.table.len();
            s.capture = self.capture.stats();
            s.transmit = self.transmit.stats();
            s.control_queue_full = self.control_queue_full;
        }
    }
}

/// Converts a decoded reply record into the session engine's input.
fn to_response(h: &engine::control::ResponseHeader) -> Response {
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
    from_workers: Receiver<ClientMessage>,
    workers: Vec<WorkerLink>,
    stop: &AtomicBool,
    stats: &Mutex<TcpcopyStats>,
    interval: Option<Duration>,
) -> anyhow::Result<()> {
    let mut woke = vec![false; workers.len()];
    let mut reply_queue_full = 0u64;
    let mut last_report = Instant::now();
    let mut last_publish = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
        }
        while let Ok(message) = from_workers.try_recv() {
            client.send_message(&message);
        }
        // On stop, give the worker's final messages a moment to leave, then go.
        if let Some(since) = stopping_since {
            if since.elapsed() > Duration::from_millis(200) {
                break;
            }
        }
        client
            .poll(Some(Duration::from_millis(20)), &mut |header| {
                let resp = to_response(header);
                let owner = resp.key.shard(workers.len());
                match workers[owner].replies.try_send(resp) {
                    Ok(()) => woke[owner] = true,
                    Err(_) => reply_queue_full += 1,
                }
            })
            .context("control channel poll failed")?;
        for (i, w) in workers.iter().enumerate() {
            if woke[i] && w.parked.load(Ordering::SeqCst) {
                let _ = w.waker.wake();
            }
            woke[i] = false;
        }
        if last_publish.elapsed() >= Duration::from_millis(200) {
            last_publish = Instant::now();
            if let Ok(mut s) = stats.lock() {
                s.control = client.stats();
                s.reply_queue_full = reply_queue_full;
            }
        }
        if let Some(every) = interval {
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                if let Ok(s) = stats.lock() {
                    tracing::info!("{}", s.line());
                }
            }
        }
    }
    if let Ok(mut s) = stats.lock() {
        s.control = client.stats();
        s.reply_queue_full = reply_queue_full;
    }
    Ok(())
}
