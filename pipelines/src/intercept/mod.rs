//! The intercept pipeline: capture the target's replies -> extract the IPv4+TCP header ->
//! route by the exact 4-tuple that tcpcopy registered -> batch -> control channel.
//!
//! Threads:
//!
//! * `--workers N` capture threads (`intercept-capN`). With N > 1 their AF_PACKET sockets form a
//!   `PACKET_FANOUT_HASH` group, so the kernel spreads the replies by flow and each flow stays
//!   on one thread, in order. Each thread extracts the 64/192-byte record, looks the session up
//!   in its own replica of the route table ([`RouteReplica`]: no lock, no shared write on the
//!   read path), holds SYN/RST replies that beat their route in its own delay queue (30 s), and
//!   hands `(connection, record)` to the control thread over a bounded ring (drops counted).
//! * One control thread (`intercept-control`) owns the sockets ([`ControlServer`], TCP or UDP,
//!   optionally authenticated): it reads `CLIENT_ADD`/`CLIENT_DEL`, broadcasts route changes to
//!   every replica ([`RouteFeed`]), and batches the records per tcpcopy, flushing within 2 ms.
//!
//! `--single` (spec §2.7): no routes; every reply goes to one of the connected tcpcopy
//! connections chosen by its C route key, with the 3-second generation rule and `-c`
//! protection ([`SingleSpread`]).
//!
//! The threads wake each other only when the other is parked (a flag and a `mio::Waker`).

use anyhow::Context;
use crossbeam::queue::ArrayQueue;
use engine::control::codec::PAYLOAD_RECORD_LEN;
use engine::control::replica::ReplicaConfig;
use engine::control::single::c_route_key;
use engine::control::{
    encode_record, Admission, ClientMessage, ConnId, ControlServer, Framing, MessageType,
    RecordFormat, ResponseHeader, RouteFeed, RouteReplica, RouteUpdate, Secret, ServerConfig,
    ServerEvent, ServerStats, SingleSpread, Transport,
};
use engine::flow::FlowKey;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx, FanoutMode};
use engine::port::filter::SoftFilter;
use engine::port::{LinkType, PortStats, RxPort};
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::EthernetFrame;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most capture threads.
pub const MAX_WORKERS: usize = 64;
/// Records in flight from one capture thread to the control thread.
const RING_CAPACITY: usize = 16 * 1024;
/// Frames taken from the capture ring per burst.
const BURST: usize = 256;
/// How often threads publish their counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
const CAPTURE: Token = Token(0);
const WAKE: Token = Token(1);

/// Everything intercept needs, already validated.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// `-i`: where to capture: an interface (`eth0`), every interface (`any`), or a list
    /// (`eth0,eth1`); see [`crate::ports::capture_scope`].
    pub interface: String,
    /// `-F` capture filter selecting the target's replies.
    pub filter: String,
    /// `-D ipA-ipB` (the C "docker" rewrite): a reply addressed to `ipA` is routed and
    /// reported as if addressed to `ipB`.
    pub rewrite_client: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// `-b`/`-p` listen address for tcpcopy.
    pub listen: SocketAddrV4,
    /// Record format of the control channel.
    pub record_format: RecordFormat,
    /// Framing of the control channel (TCP).
    pub framing: Framing,
    /// Idle routes are forgotten after this long.
    pub route_timeout: Duration,
    /// Period of the one-line statistics report (`None`: only at exit).
    pub stats_interval: Option<Duration>,
    /// `--workers`: capture threads (1..=64).
    pub workers: usize,
    /// `--transport`: TCP (C-compatible) or UDP.
    pub transport: Transport,
    /// `--auth-file`: the shared secret; `None`: no authentication.
    pub auth: Option<Secret>,
    /// `--single`: no routing, replies spread over the connected tcpcopys.
    pub single: bool,
    /// `-c` (with `--single`): refuse a new tcpcopy while the previous one is connected.
    pub protect: bool,
    /// `--allow`: the addresses tcpcopy may connect from (`None`: any, as the C tool).
    pub allow: Option<crate::compat::AllowList>,
    /// Capture through a DPDK device instead of `interface` (the filter then runs in user space).
    pub dpdk: Option<crate::ports::DpdkSettings>,
}

impl InterceptConfig {
    /// A configuration with the defaults of the command line for `interface` and `filter`.
    pub fn new(interface: &str, filter: &str) -> InterceptConfig {
        InterceptConfig {
            interface: interface.to_string(),
            filter: filter.to_string(),
            rewrite_client: None,
            listen: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 36524),
            record_format: RecordFormat::Header64,
            framing: Framing::Combined,
            route_timeout: Duration::from_secs(120),
            stats_interval: Some(Duration::from_secs(5)),
            workers: 1,
            transport: Transport::Tcp,
            auth: None,
            single: false,
            protect: false,
            allow: None,
            dpdk: None,
        }
    }
}

/// Counters of a whole run.
#[derive(Debug, Clone, Default)]
pub struct InterceptStats {
    /// Frames examined.
    pub captured: u64,
    /// IPv4 TCP replies extracted.
    pub replies: u64,
    /// Replies handed to a tcpcopy connection.
    pub routed: u64,
    /// Replies held because their route had not arrived (SYN/RST).
    pub delayed: u64,
    /// Held replies delivered when their route arrived.
    pub delay_delivered: u64,
    /// Replies with no route (not SYN/RST, or no tcpcopy in `--single`): dropped.
    pub no_route: u64,
    /// Replies dropped because a tcpcopy connection's buffer was full or it was gone.
    pub send_dropped: u64,
    /// Replies dropped because the ring to the control thread was full.
    pub ring_full: u64,
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
    /// `--single`: connections refused or replaced by the generation rule.
    pub single_refused: u64,
    /// Connections refused because their address is not on the `--allow` list.
    pub peers_refused: u64,
    /// CLIENT_ADDs refused: the route belongs to a tcpcopy at another address (the largest
    /// replica's count).
    pub routes_foreign: u64,
    /// CLIENT_DELs ignored: the route belongs to a tcpcopy at another address.
    pub removals_foreign: u64,
    /// CLIENT_ADDs refused: the address holds its share of the route table.
    pub routes_owner_full: u64,
    /// Routes in the table (the largest replica).
    pub routes: usize,
    /// Capture ports, summed.
    pub capture: PortStats,
    /// The control channel's own counters.
    pub control: ServerStats,
}

impl InterceptStats {
    /// The one-line report.
    pub fn line(&self) -> String {
        let mut line = String::new();
        let c = &self.control;
        let _ = write!(
            line,
            "captured {} replies {} routed {} delayed {} delay-delivered {} no-route {} send-dropped {} \
             ring-full {} ignored {} | routes {} add {} del {} foreign-add {} foreign-del {} \
             owner-full {} | connections {} lost {} peers-refused {} refused-per-address {} \
             hello-timeouts {} hellos-unanswered {} throttled {} \
             auth-ok {} auth-refused {} single-refused {} | udp-rx {} udp-tx {} udp-lost {} \
             udp-tx-dropped {} udp-rx-dropped {} messages-lost {} \
             udp-reordered {} udp-replayed {} udp-rejected {} | capture-drops {} capture-duplicates {}",
            self.captured,
            self.replies,
            self.routed,
            self.delayed,
            self.delay_delivered,
            self.no_route,
            self.send_dropped,
            self.ring_full,
            self.ignored,
            self.routes,
            self.client_add,
            self.client_del,
            self.routes_foreign,
            self.removals_foreign,
            self.routes_owner_full,
            self.connections,
            self.disconnections,
            self.peers_refused,
            c.refused_per_address,
            c.hello_timeouts,
            c.hellos_unanswered,
            c.throttled,
            c.auth_ok,
            c.auth_refused,
            self.single_refused,
            c.datagrams_received,
            c.datagrams_sent,
            c.datagrams_lost,
            c.datagrams_send_dropped,
            c.datagrams_receive_dropped,
            c.messages_lost,
            c.datagrams_reordered,
            c.datagrams_replayed,
            c.datagrams_rejected,
            self.capture.rx_dropped,
            self.capture.rx_duplicates,
        );
        line
    }

    fn add_capture(&mut self, c: &CaptureStats) {
        self.captured += c.captured;
        self.replies += c.replies;
        self.delayed += c.delayed;
        self.delay_delivered += c.delay_delivered;
        self.no_route += c.no_route;
        self.ring_full += c.ring_full;
        self.ignored += c.ignored;
        self.routes = self.routes.max(c.routes);
        self.routes_foreign = self.routes_foreign.max(c.route_stats.refused_foreign);
        self.removals_foreign = self.removals_foreign.max(c.route_stats.refused_removals);
        self.routes_owner_full = self.routes_owner_full.max(c.route_stats.refused_owner_full);
        self.capture.rx_packets += c.port.rx_packets;
        self.capture.rx_bytes += c.port.rx_bytes;
        self.capture.rx_dropped += c.port.rx_dropped;
        self.capture.rx_duplicates += c.port.rx_duplicates;
    }
}

/// Counters of one capture thread.
#[derive(Debug, Clone, Copy, Default)]
struct CaptureStats {
    captured: u64,
    replies: u64,
    delayed: u64,
    delay_delivered: u64,
    no_route: u64,
    ring_full: u64,
    ignored: u64,
    routes: usize,
    route_stats: engine::control::route::RouteStats,
    port: PortStats,
}

/// Counters of the control thread.
#[derive(Debug, Clone, Copy, Default)]
struct ControlStats {
    routed: u64,
    send_dropped: u64,
    no_route: u64,
    client_add: u64,
    client_del: u64,
    connections: u64,
    disconnections: u64,
    single_refused: u64,
    peers_refused: u64,
    server: ServerStats,
}

/// Where a record goes.
#[derive(Debug, Clone, Copy)]
enum Dest {
    /// The connection its route names.
    Conn(ConnId),
    /// `--single`: spread by this C route key.
    Single(u32),
}

/// A record on its way from a capture thread to the control thread.
#[derive(Clone, Copy)]
struct Item {
    dest: Dest,
    record: [u8; PAYLOAD_RECORD_LEN],
}

/// What the threads share.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    control_parked: AtomicBool,
    control_waker: Arc<Waker>,
    capture_stats: Vec<Mutex<CaptureStats>>,
    control_stats: Mutex<ControlStats>,
}

/// The control thread's handle on one capture thread.
#[derive(Debug)]
struct CaptureLink {
    items: Arc<ArrayQueue<Item>>,
    parked: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

/// A running intercept.
#[derive(Debug)]
pub struct Intercept {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    capture_wakers: Vec<Arc<Waker>>,
    /// The DPDK environment, dropped after the capture threads.
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Item({:?})", self.dest)
    }
}

impl Intercept {
    /// Opens the captures and the control socket and starts the threads.
    ///
    /// # Errors
    /// A port that cannot be opened or an address that cannot be bound, named with the cause.
    pub fn start(config: InterceptConfig) -> anyhow::Result<Intercept> {
        let workers = config.workers;
        anyhow::ensure!(
            (1..=MAX_WORKERS).contains(&workers),
            "--workers {workers}: use 1..={MAX_WORKERS}"
        );
        // A fanout group id unique to this process (two intercepts may share a namespace).
        let group = (std::process::id() & 0xffff) as u16;
        let mut captures: Vec<Box<dyn RxPort>> = Vec::with_capacity(workers);
        let mut keep = None;
        let mut register_thread = None;
        let soft_filter = config.dpdk.is_some().then(|| config.filter.clone());
        if let Some(settings) = &config.dpdk {
            // Fail now, naming the expression, rather than in the capture thread.
            SoftFilter::compile(&config.filter)?;
            let opened = crate::ports::open_dpdk(settings, "intercept", workers, false)?;
            captures = opened.rx;
            keep = opened.keep;
            register_thread = opened.register_thread;
        }
        for w in 0..workers {
            if config.dpdk.is_some() {
                break;
            }
            let (interface, scope) = crate::ports::capture_scope(&config.interface);
            let capture = AfPacketRx::open(&AfPacketConfig {
                interface,
                scope,
                filter: Some(config.filter.clone()),
                snaplen: 256,
                fanout: (workers > 1).then_some((group, FanoutMode::Hash)),
                ..AfPacketConfig::default()
            })
            .with_context(|| {
                format!(
                    "cannot capture on -i {} (capture thread {w})",
                    config.interface
                )
            })?;
            captures.push(Box::new(capture));
        }
        let mut server_config =
            ServerConfig::new(config.listen, config.record_format, config.framing);
        server_config.transport = config.transport;
        server_config.auth = config.auth.clone();
        let server = ControlServer::with_config(server_config).with_context(|| {
            format!(
                "cannot listen for tcpcopy on {} ({})",
                config.listen, config.transport
            )
        })?;
        let replica_config = ReplicaConfig {
            route_idle: config.route_timeout,
            max_routes: 1 << 22,
            ..ReplicaConfig::default()
        };
        let (feed, replicas) = RouteFeed::new(workers, &replica_config);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            control_parked: AtomicBool::new(false),
            control_waker: server.waker(),
            capture_stats: (0..workers)
                .map(|_| Mutex::new(CaptureStats::default()))
                .collect(),
            control_stats: Mutex::new(ControlStats::default()),
        });

        let mut links = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers + 1);
        let mut capture_wakers = Vec::with_capacity(workers);
        for (w, (capture, replica)) in captures.into_iter().zip(replicas).enumerate() {
            let poll = Poll::new().context("mio poll")?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE).context("mio waker")?);
            let items = Arc::new(ArrayQueue::new(RING_CAPACITY));
            let parked = Arc::new(AtomicBool::new(false));
            links.push(CaptureLink {
                items: items.clone(),
                parked: parked.clone(),
                waker: waker.clone(),
            });
            capture_wakers.push(waker);
            let worker = CaptureWorker {
                index: w,
                poll,
                capture,
                replica,
                items,
                parked,
                format: config.record_format,
                rewrite_client: config.rewrite_client,
                single: config.single,
                shared: shared.clone(),
                stats: CaptureStats::default(),
                soft_filter: soft_filter.clone(),
                nap_only: false,
            };
            let register = register_thread.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("intercept-cap{w}"))
                    .spawn(move || {
                        if let Some(register) = register {
                            register();
                        }
                        worker.run()
                    })
                    .context("cannot start a capture thread")?,
            );
        }
        let control = ControlLoop {
            peers: std::collections::HashMap::new(),
            allow: config.allow.clone(),
            server,
            feed,
            links,
            single: config.single.then(|| SingleSpread::new(config.protect)),
            shared: shared.clone(),
            stats: ControlStats::default(),
            stats_interval: config.stats_interval,
        };
        threads.push(
            std::thread::Builder::new()
                .name("intercept-control".into())
                .spawn(move || control.run())
                .context("cannot start the control thread")?,
        );
        Ok(Intercept {
            shared,
            threads,
            capture_wakers,
            _keep: keep,
        })
    }

    /// The counters so far (published by the threads a few times per second).
    pub fn stats(&self) -> InterceptStats {
        merged_stats(&self.shared)
    }

    /// True while every thread runs.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Asks the threads to stop; pending batches are flushed first.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.control_waker.wake();
        for w in &self.capture_wakers {
            let _ = w.wake();
        }
    }

    /// Waits for the threads and returns the final counters.
    ///
    /// # Errors
    /// The first error a thread ended with.
    pub fn join(mut self) -> anyhow::Result<InterceptStats> {
        self.stop();
        let mut first_error = None;
        for t in self.threads.drain(..) {
            let result = t
                .join()
                .map_err(|_| anyhow::anyhow!("an intercept thread panicked"))
                .and_then(|r| r);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.stats()),
        }
    }
}

fn merged_stats(shared: &Shared) -> InterceptStats {
    let mut s = InterceptStats::default();
    for c in &shared.capture_stats {
        if let Ok(c) = c.lock() {
            s.add_capture(&c);
        }
    }
    if let Ok(c) = shared.control_stats.lock() {
        s.routed = c.routed;
        s.send_dropped = c.send_dropped;
        s.no_route += c.no_route;
        s.client_add = c.client_add;
        s.client_del = c.client_del;
        s.connections = c.connections;
        s.disconnections = c.disconnections;
        s.single_refused = c.single_refused;
        s.peers_refused = c.peers_refused;
        s.control = c.server;
    }
    s
}

/// What a captured frame is to intercept.
enum Extracted {
    Reply { key: FlowKey, syn_or_rst: bool },
    Ignored,
}

fn extract(
    frame: &[u8],
    link: LinkType,
    record_format: RecordFormat,
    rewrite_client: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    record: &mut [u8],
) -> Extracted {
    let packet = match link {
        LinkType::RawIp => frame,
        LinkType::Ethernet => {
            let Ok(eth) = EthernetFrame::new_checked(frame) else {
                return Extracted::Ignored;
            };
            if eth.ethertype() != ETHERTYPE_IPV4 {
                return Extracted::Ignored;
            }
            &frame[eth.header_len()..]
        }
    };
    // The capture may be cut after the headers (snap length): the codec checks what it copies.
    if encode_record(packet, record_format, record).is_err() {
        return Extracted::Ignored;
    }
    if let Some((from, to)) = rewrite_client {
        // The record starts with the reply's IPv4 header (options not carried).
        let mut ip = engine::wire::Ipv4Packet::new_unchecked(&mut record[..20]);
        if ip.dst_addr() == from {
            ip.set_dst_addr(to);
        }
    }
    let Ok(header) = ResponseHeader::parse(&record[..record_format.record_len()]) else {
        return Extracted::Ignored;
    };
    Extracted::Reply {
        key: header.flow_key(),
        syn_or_rst: header.is_syn() || header.is_rst(),
    }
}

/// One capture thread.
struct CaptureWorker {
    index: usize,
    poll: Poll,
    capture: Box<dyn RxPort>,
    /// A pcap filter to run in user space (ports without a kernel filter: DPDK).
    soft_filter: Option<String>,
    /// The capture port cannot be waited on (DPDK): park by napping.
    nap_only: bool,
    replica: RouteReplica,
    items: Arc<ArrayQueue<Item>>,
    parked: Arc<AtomicBool>,
    format: RecordFormat,
    rewrite_client: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    single: bool,
    shared: Arc<Shared>,
    stats: CaptureStats,
}

impl CaptureWorker {
    fn run(mut self) -> anyhow::Result<()> {
        if let Some(fd) = self.capture.wait_fd() {
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), CAPTURE, Interest::READABLE)
                .context("register the capture socket")?;
        }
        self.nap_only = self.capture.wait_fd().is_none();
        let filter = self
            .soft_filter
            .as_deref()
            .map(SoftFilter::compile)
            .transpose()?;
        let mut events = Events::with_capacity(8);
        let mut item = Item {
            dest: Dest::Single(0),
            record: [0u8; PAYLOAD_RECORD_LEN],
        };
        let mut last_publish = Instant::now();
        let mut last_expire = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut pushed = self.sync(now);
            let n = {
                let Self {
                    capture,
                    replica,
                    items,
                    stats,
                    format,
                    single,
                    rewrite_client,
                    ..
                } = &mut self;
                let link = capture.link_type();
                capture
                    .rx_burst(BURST, &mut |frame| {
                        if filter.as_ref().is_some_and(|f| !f.matches(frame.data)) {
                            return;
                        }
                        stats.captured += 1;
                        match extract(frame.data, link, *format, *rewrite_client, &mut item.record)
                        {
                            Extracted::Ignored => stats.ignored += 1,
                            Extracted::Reply { key, syn_or_rst } => {
                                stats.replies += 1;
                                let dest = if *single {
                                    Some(Dest::Single(c_route_key(&key)))
                                } else {
                                    replica.route(&key, now).map(Dest::Conn)
                                };
                                match dest {
                                    Some(dest) => {
                                        item.dest = dest;
                                        if items.push(item).is_ok() {
                                            pushed = true;
                                        } else {
                                            stats.ring_full += 1;
                                        }
                                    }
                                    None if syn_or_rst => {
                                        let record = &item.record[..format.record_len()];
                                        if replica.delay(key, record, now) {
                                            stats.delayed += 1;
                                        } else {
                                            stats.no_route += 1;
                                        }
                                    }
                                    None => stats.no_route += 1,
                                }
                            }
                        }
                    })
                    .context("capture failed")?
            };
            if pushed && self.shared.control_parked.load(Ordering::SeqCst) {
                let _ = self.shared.control_waker.wake();
            }
            if now.duration_since(last_expire) >= Duration::from_secs(1) {
                last_expire = now;
                self.replica.expire(now, None);
            }
            if now.duration_since(last_publish) >= PUBLISH_EVERY {
                last_publish = now;
                self.publish();
            }
            if n < BURST {
                self.park(&mut events)?;
            }
        }
        self.publish();
        Ok(())
    }

    /// Applies route updates; records released from the delay queue go to the control
    /// thread. `true` if any did.
    fn sync(&mut self, now: Instant) -> bool {
        let Self {
            replica,
            items,
            stats,
            format,
            ..
        } = self;
        let mut pushed = false;
        let len = format.record_len();
        replica.sync(now, &mut |conn, record| {
            let mut item = Item {
                dest: Dest::Conn(conn),
                record: [0u8; PAYLOAD_RECORD_LEN],
            };
            item.record[..len].copy_from_slice(&record[..len]);
            if items.push(item).is_ok() {
                stats.delay_delivered += 1;
                pushed = true;
            } else {
                stats.ring_full += 1;
            }
        });
        pushed
    }

    /// Waits for frames or a route update: briefly when replies wait for their route.
    fn park(&mut self, events: &mut Events) -> anyhow::Result<()> {
        if self.nap_only {
            // A poll-mode device cannot be waited on: nap briefly instead of spinning.
            std::thread::sleep(Duration::from_micros(50));
            return Ok(());
        }
        self.parked.store(true, Ordering::SeqCst);
        let timeout = if self.replica.has_updates() {
            Duration::ZERO
        } else if self.replica.delay_queue().is_empty() {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(1)
        };
        let result = self.poll.poll(events, Some(timeout));
        self.parked.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e).context("waiting for the capture socket"),
        }
    }

    fn publish(&mut self) {
        self.stats.routes = self.replica.table().len();
        self.stats.route_stats = self.replica.table().stats();
        self.stats.port = self.capture.stats();
        if let Ok(mut s) = self.shared.capture_stats[self.index].lock() {
            *s = self.stats;
        }
    }
}

/// The control thread.
struct ControlLoop {
    /// The address of each admitted tcpcopy connection: the owner of the routes it adds.
    peers: std::collections::HashMap<ConnId, std::net::IpAddr>,
    /// `--allow`: the addresses tcpcopy may connect from (`None`: any).
    allow: Option<crate::compat::AllowList>,
    server: ControlServer,
    feed: RouteFeed,
    links: Vec<CaptureLink>,
    single: Option<SingleSpread>,
    shared: Arc<Shared>,
    stats: ControlStats,
    stats_interval: Option<Duration>,
}

impl ControlLoop {
    fn run(mut self) -> anyhow::Result<()> {
        let mut events: Vec<ServerEvent> = Vec::with_capacity(64);
        let mut last_report = Instant::now();
        let mut last_publish = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.drain_items();
            self.feed.retry();
            let now = Instant::now();
            self.server.flush_due(now);
            // Park only if no capture thread left anything (checked after raising the flag,
            // so a thread that pushes now sees it and wakes us).
            self.shared.control_parked.store(true, Ordering::SeqCst);
            let busy = self.links.iter().any(|l| !l.items.is_empty());
            let timeout = if busy {
                Duration::ZERO
            } else if self.feed.pending() > 0 {
                Duration::from_millis(1)
            } else {
                self.server
                    .next_flush_deadline()
                    .map(|d| d.saturating_duration_since(now))
                    .unwrap_or(Duration::from_millis(50))
                    .min(Duration::from_millis(50))
            };
            let polled = self
                .server
                .poll(Some(timeout), &mut |event| events.push(event));
            self.shared.control_parked.store(false, Ordering::SeqCst);
            polled.context("control poll failed")?;
            let mut added = false;
            for event in events.drain(..) {
                added |= self.handle(event);
            }
            if added {
                // Replies may be waiting for these routes in a parked capture thread.
                for l in &self.links {
                    if l.parked.load(Ordering::SeqCst) {
                        let _ = l.waker.wake();
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last_publish) >= PUBLISH_EVERY {
                last_publish = now;
                self.publish();
            }
            if let Some(every) = self.stats_interval {
                if now.duration_since(last_report) >= every {
                    last_report = now;
                    tracing::info!("{}", merged_stats(&self.shared).line());
                }
            }
        }
        // Last records from the capture threads, then out with every batch.
        self.drain_items();
        self.server.flush_all();
        let _ = self.server.poll(Some(Duration::ZERO), &mut |_| {});
        self.publish();
        Ok(())
    }

    fn drain_items(&mut self) {
        let len = self.server.config().format.record_len();
        for l in 0..self.links.len() {
            while let Some(item) = self.links[l].items.pop() {
                let conn = match item.dest {
                    Dest::Conn(c) => Some(c),
                    Dest::Single(route_key) => self
                        .single
                        .as_ref()
                        .and_then(|s| SingleSpread::pick_in(s.connections(), route_key)),
                };
                let Some(conn) = conn else {
                    self.stats.no_route += 1;
                    continue;
                };
                if self.server.send_record(conn, &item.record[..len]) {
                    self.stats.routed += 1;
                } else {
                    self.stats.send_dropped += 1;
                }
            }
        }
    }

    /// Handles one control event; `true` if a route was added.
    fn handle(&mut self, event: ServerEvent) -> bool {
        match event {
            ServerEvent::Message(conn, message) => self.message(conn, message),
            ServerEvent::Connected(conn, peer) => {
                if self.allow.as_ref().is_some_and(|a| !a.allows(peer.ip())) {
                    self.stats.peers_refused += 1;
                    tracing::warn!("refusing a control connection from {peer}: not on --allow");
                    self.server.disconnect(conn);
                    return false;
                }
                self.stats.connections += 1;
                self.peers.insert(conn, peer.ip());
                tracing::info!("tcpcopy connected from {peer} ({conn})");
                if let Some(single) = self.single.as_mut() {
                    match single.on_connect(conn, peer.ip(), Instant::now()) {
                        Admission::Accept => {}
                        Admission::NewGeneration { close } => {
                            if !close.is_empty() {
                                tracing::warn!(
                                    "--single: a new tcpcopy connected from {peer}; closing the {} \
                                     connections of the previous one",
                                    close.len()
                                );
                            }
                            self.stats.single_refused += close.len() as u64;
                            for c in close {
                                self.server.disconnect(c);
                            }
                        }
                        Admission::Refuse => {
                            tracing::warn!(
                                "--single: refusing {peer}: a tcpcopy at another address (or, \
                                 with -c, the previous one) is still connected, or 16 \
                                 connections are open"
                            );
                            self.stats.single_refused += 1;
                            self.server.disconnect(conn);
                        }
                    }
                }
                false
            }
            ServerEvent::Disconnected(conn) => {
                if self.peers.remove(&conn).is_none() {
                    // A connection refused by --allow: nothing of it was kept.
                    return false;
                }
                self.stats.disconnections += 1;
                match self.single.as_mut() {
                    Some(single) => single.on_disconnect(conn),
                    None => self.feed.publish(RouteUpdate::RemoveConn(conn)),
                }
                tracing::warn!("a tcpcopy connection was lost ({conn}); its routes are removed");
                false
            }
            ServerEvent::Readable(_) => false,
        }
    }

    fn message(&mut self, conn: ConnId, message: ClientMessage) -> bool {
        let Some(&owner) = self.peers.get(&conn) else {
            // From a connection that was refused: nothing it says changes anything.
            return false;
        };
        match message.kind {
            MessageType::ClientAdd => {
                self.stats.client_add += 1;
                if self.single.is_none() {
                    self.feed
                        .publish(RouteUpdate::Add(message.flow_key(), conn, owner));
                    return true;
                }
                false
            }
            MessageType::ClientDel => {
                self.stats.client_del += 1;
                if self.single.is_none() {
                    self.feed
                        .publish(RouteUpdate::Remove(message.flow_key(), owner));
                }
                false
            }
            _ => {
                tracing::debug!("unknown message type {:?} ignored", message.kind);
                false
            }
        }
    }

    fn publish(&mut self) {
        self.stats.server = self.server.stats();
        if let Ok(mut s) = self.shared.control_stats.lock() {
            *s = self.stats;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_a_reply_and_ignores_the_rest() {
        // Ethernet + IPv4 + TCP SYN-ACK 10.77.0.30:8080 > 10.77.0.10:40000.
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&[
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 30, 10, 77, 0, 10, 0x1f, 0x90,
            0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 2, 0x50, 0x12, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        let mut record = [0u8; PAYLOAD_RECORD_LEN];
        match extract(
            &frame,
            LinkType::Ethernet,
            RecordFormat::Header64,
            None,
            &mut record,
        ) {
            Extracted::Reply { key, syn_or_rst } => {
                assert!(syn_or_rst);
                assert_eq!(key.client(), "10.77.0.10:40000".parse().unwrap());
                assert_eq!(key.target(), "10.77.0.30:8080".parse().unwrap());
            }
            Extracted::Ignored => panic!("not extracted"),
        }
        // The same packet without its Ethernet header, as a capture on every interface sees it.
        match extract(
            &frame[14..],
            LinkType::RawIp,
            RecordFormat::Header64,
            None,
            &mut record,
        ) {
            Extracted::Reply { key, .. } => {
                assert_eq!(key.client(), "10.77.0.10:40000".parse().unwrap())
            }
            Extracted::Ignored => panic!("raw IP not extracted"),
        }
        // -D 10.77.0.10-10.9.9.1: routed and reported as the other client address.
        let docker = Some(("10.77.0.10".parse().unwrap(), "10.9.9.1".parse().unwrap()));
        match extract(
            &frame,
            LinkType::Ethernet,
            RecordFormat::Header64,
            docker,
            &mut record,
        ) {
            Extracted::Reply { key, .. } => {
                assert_eq!(key.client(), "10.9.9.1:40000".parse().unwrap());
                let header = ResponseHeader::parse(&record[..64]).unwrap();
                assert_eq!(header.dst_ip, std::net::Ipv4Addr::new(10, 9, 9, 1));
            }
            Extracted::Ignored => panic!("not extracted with -D"),
        }
        frame[12] = 0x86;
        assert!(matches!(
            extract(
                &frame,
                LinkType::Ethernet,
                RecordFormat::Header64,
                None,
                &mut record
            ),
            Extracted::Ignored
        ));
    }

    #[test]
    fn stats_line_names_the_new_counters() {
        let line = InterceptStats::default().line();
        for word in [
            "auth-refused",
            "udp-lost",
            "udp-tx-dropped",
            "udp-rx-dropped",
            "messages-lost",
            "udp-rejected",
            "ring-full",
            " lost ",
        ] {
            assert!(line.contains(word), "{line}");
        }
    }
}
