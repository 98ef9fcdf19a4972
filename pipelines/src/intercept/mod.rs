//! The intercept pipeline: capture the target's replies -> extract the IPv4+TCP header ->
//! route by the exact 4-tuple that tcpcopy registered -> batch -> control channel.
//!
//! One thread: a `mio` loop over the capture socket, the listening socket and the tcpcopy
//! connections, with a 2 ms flush tick. Replies that beat their route (SYN-ACK, RST) wait in
//! the delay queue for up to 30 s.

use anyhow::Context;
use engine::control::{
    encode_record, ClientMessage, ConnId, ControlServer, DelayQueue, Framing, MessageType,
    RecordFormat, ResponseHeader, RouteTable, ServerEvent,
};
use engine::flow::FlowKey;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx};
use engine::port::{PortStats, RxPort};
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::EthernetFrame;
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Everything intercept needs, already validated.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// `-i` capture interface.
    pub interface: String,
    /// `-F` capture filter selecting the target's replies.
    pub filter: String,
    /// `-b`/`-p` listen address for tcpcopy.
    pub listen: SocketAddrV4,
    /// Record format of the control channel.
    pub record_format: RecordFormat,
    /// Framing of the control channel.
    pub framing: Framing,
    /// Idle routes are forgotten after this long.
    pub route_timeout: Duration,
    /// Period of the one-line statistics report (`None`: only at exit).
    pub stats_interval: Option<Duration>,
}

/// Counters of a whole run.
#[derive(Debug, Clone, Default)]
pub struct InterceptStats {
    /// Frames examined.
    pub captured: u64,
    /// IPv4 TCP replies extracted.
    pub replies: u64,
    /// Replies sent to a tcpcopy.
    pub routed: u64,
    /// Replies held because their route had not arrived (SYN/RST).
    pub delayed: u64,
    /// Held replies delivered when their route arrived.
    pub delay_delivered: u64,
    /// Replies with no route (not SYN/RST): dropped.
    pub no_route: u64,
    /// Replies dropped because a tcpcopy connection's buffer was full.
    pub send_dropped: u64,
    /// Frames that were not IPv4 TCP, or malformed.
    pub ignored: u64,
    /// CLIENT_ADD messages.
    pub client_add: u64,
    /// CLIENT_DEL messages.
    pub client_del: u64,
    /// tcpcopy connections accepted.
    pub connections: u64,
    /// tcpcopy connections lost.
    pub disconnections: u64,
    /// Routes in the table.
    pub routes: usize,
    /// Capture port.
    pub capture: PortStats,
}

impl InterceptStats {
    /// The one-line report.
    pub fn line(&self) -> String {
        let mut line = String::new();
        let _ = write!(
            line,
            "captured {} replies {} routed {} delayed {} delay-delivered {} no-route {} send-dropped {} \
             ignored {} | routes {} add {} del {} | connections {} lost {} | capture-drops {}",
            self.captured,
            self.replies,
            self.routed,
            self.delayed,
            self.delay_delivered,
            self.no_route,
            self.send_dropped,
            self.ignored,
            self.routes,
            self.client_add,
            self.client_del,
            self.connections,
            self.disconnections,
            self.capture.rx_dropped,
        );
        line
    }
}

const CAPTURE_TOKEN: usize = 1;

/// A running intercept.
#[derive(Debug)]
pub struct Intercept {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<InterceptStats>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Intercept {
    /// Opens the capture and the listening socket and starts the loop.
    ///
    /// # Errors
    /// A port that cannot be opened or an address that cannot be bound, named with the cause.
    pub fn start(config: InterceptConfig) -> anyhow::Result<Intercept> {
        let capture = AfPacketRx::open(&AfPacketConfig {
            interface: config.interface.clone(),
            filter: Some(config.filter.clone()),
            snaplen: 256,
            ..AfPacketConfig::default()
        })
        .with_context(|| format!("cannot capture on -i {}", config.interface))?;
        let server = ControlServer::bind(config.listen, config.record_format, config.framing)
            .with_context(|| format!("cannot listen for tcpcopy on {}", config.listen))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(InterceptStats::default()));
        let thread_stop = stop.clone();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("intercept".into())
            .spawn(move || run(config, capture, server, &thread_stop, &thread_stats))
            .context("cannot start the intercept thread")?;
        Ok(Intercept {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> InterceptStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True while the loop runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Asks the loop to stop; it flushes pending batches first.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for the loop and returns the final counters.
    ///
    /// # Errors
    /// The error the loop ended with.
    pub fn join(mut self) -> anyhow::Result<InterceptStats> {
        self.stop();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the intercept thread panicked"))??;
        }
        Ok(self.stats())
    }
}

/// What a captured frame is to intercept.
enum Extracted {
    Reply { key: FlowKey, syn_or_rst: bool },
    Ignored,
}

fn extract(frame: &[u8], record_format: RecordFormat, record: &mut [u8]) -> Extracted {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Extracted::Ignored;
    };
    if eth.ethertype() != ETHERTYPE_IPV4 {
        return Extracted::Ignored;
    }
    // The capture may be cut after the headers (snap length): the codec checks what it copies.
    if encode_record(&frame[eth.header_len()..], record_format, record).is_err() {
        return Extracted::Ignored;
    }
    let Ok(header) = ResponseHeader::parse(record) else {
        return Extracted::Ignored;
    };
    Extracted::Reply {
        key: header.flow_key(),
        syn_or_rst: header.is_syn() || header.is_rst(),
    }
}

fn run(
    config: InterceptConfig,
    mut capture: AfPacketRx,
    mut server: ControlServer,
    stop: &AtomicBool,
    shared: &Mutex<InterceptStats>,
) -> anyhow::Result<()> {
    if let Some(fd) = capture.wait_fd() {
        server
            .register_fd(fd, CAPTURE_TOKEN)
            .context("register the capture socket")?;
    }
    let mut routes = RouteTable::new(config.route_timeout, 1 << 22);
    let mut delayed = DelayQueue::new(Duration::from_secs(30), 1 << 16, 4);
    let mut stats = InterceptStats::default();
    let mut record = vec![0u8; config.record_format.record_len()];
    let mut events: Vec<ServerEvent> = Vec::with_capacity(64);
    let mut last_report = Instant::now();
    let mut last_publish = Instant::now();
    let mut last_expire = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Capture first, without waiting: the ring may hold frames whose edge we consumed.
        loop {
            let now = Instant::now();
            let n = capture
                .rx_burst(256, &mut |frame| {
                    stats.captured += 1;
                    match extract(frame.data, config.record_format, &mut record) {
                        Extracted::Ignored => stats.ignored += 1,
                        Extracted::Reply { key, syn_or_rst } => {
                            stats.replies += 1;
                            if let Some(conn) = routes.get(&key, now) {
                                if server.send_record(conn, &record) {
                                    stats.routed += 1;
                                } else {
                                    stats.send_dropped += 1;
                                }
                            } else if syn_or_rst {
                                if delayed.push(key, &record, now) {
                                    stats.delayed += 1;
                                }
                            } else {
                                stats.no_route += 1;
                            }
                        }
                    }
                })
                .context("capture failed")?;
            if n < 256 {
                break;
            }
        }
        let now = Instant::now();
        server.flush_due(now);
        let timeout = server
            .next_flush_deadline()
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        server
            .poll(Some(timeout), &mut |event| events.push(event))
            .context("control poll failed")?;
        for event in events.drain(..) {
            match event {
                ServerEvent::Message(conn, message) => handle_message(
                    conn,
                    message,
                    Instant::now(),
                    &mut routes,
                    &mut delayed,
                    &mut server,
                    &mut stats,
                ),
                ServerEvent::Connected(_, peer) => {
                    stats.connections += 1;
                    tracing::info!("tcpcopy connected from {peer}");
                }
                ServerEvent::Disconnected(conn) => {
                    stats.disconnections += 1;
                    let n = routes.remove_conn(conn);
                    tracing::warn!("a tcpcopy connection was lost; {n} routes removed");
                }
                ServerEvent::Readable(_) => {}
            }
        }
        let now = Instant::now();
        if now.duration_since(last_expire) >= Duration::from_secs(1) {
            last_expire = now;
            routes.expire(now, 4096);
            delayed.expire(now);
        }
        if now.duration_since(last_publish) >= Duration::from_millis(200) {
            last_publish = now;
            stats.routes = routes.len();
            stats.capture = capture.stats();
            if let Ok(mut s) = shared.lock() {
                *s = stats.clone();
            }
        }
        if let Some(every) = config.stats_interval {
            if now.duration_since(last_report) >= every {
                last_report = now;
                tracing::info!("{}", stats.line());
            }
        }
    }
    server.flush_all();
    stats.routes = routes.len();
    stats.capture = capture.stats();
    if let Ok(mut s) = shared.lock() {
        *s = stats;
    }
    Ok(())
}

fn handle_message(
    conn: ConnId,
    message: ClientMessage,
    now: Instant,
    routes: &mut RouteTable,
    delayed: &mut DelayQueue,
    server: &mut ControlServer,
    stats: &mut InterceptStats,
) {
    match message.kind {
        MessageType::ClientAdd => {
            stats.client_add += 1;
            let key = message.flow_key();
            routes.insert(key, conn, now);
            for record in delayed.take(&key) {
                if server.send_record(conn, &record) {
                    stats.delay_delivered += 1;
                } else {
                    stats.send_dropped += 1;
                }
            }
        }
        MessageType::ClientDel => {
            stats.client_del += 1;
            routes.remove(&message.flow_key());
        }
        _ => {}
    }
}
