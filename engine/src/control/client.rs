//! The tcpcopy side of the control channel: a link to every intercept server (`-s`), the
//! version hello, `CLIENT_ADD`/`CLIENT_DEL` fan-out and the decoding of response records, over
//! TCP (`-C` connections per server, byte-compatible with the C tools) or UDP (one datagram
//! session per server, see [`udp`](crate::control::udp)), optionally authenticated (see
//! [`auth`]).
//!
//! Differences from the C tcpcopy, none visible on the wire:
//!
//! * Connects are non-blocking; lost or refused connections are retried with exponential
//!   back-off ([`ClientConfig::reconnect_initial`] doubling to
//!   [`ClientConfig::reconnect_max`], 100 ms to 5 s by default) instead of the `-L` 12-second
//!   timer; an unreachable intercept at startup is not fatal by itself.
//! * Writes never block: each connection has its own bounded backlog
//!   ([`ClientConfig::max_buffer_bytes`]); messages that do not fit are dropped and counted
//!   (`messages_dropped`), so a slow or stalled intercept costs only its own backlog and the
//!   others keep being served.
//! * `CLIENT_ADD` goes to every intercept that is up, `CLIENT_DEL` too (the C tcpcopy never
//!   sends it); all messages of one session use the same connection of each server (chosen by
//!   the flow hash) so an ADD never overtakes the DEL of the same 4-tuple.
//!
//! # `-L` ("lonely")
//!
//! The C tcpcopy exits once it has lost every intercept connection unless `-L` is given; with
//! `-L` it keeps running and retries every 12 s. Here the client itself never gives up: it
//! retries forever with back-off whatever `lonely` says. [`ControlClient::should_exit`] tells
//! the caller when the C rule would have stopped (not lonely, at least one link was up once,
//! and none is up now); tcpcopy-rs runs with `lonely = true` (it never exits because the
//! intercepts went away), a caller that wants the C behaviour checks `should_exit` after each
//! poll.
//!
//! One thread owns a [`ControlClient`]; other threads interrupt its [`poll`](ControlClient::poll)
//! with the [`waker`](ControlClient::waker).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::control::auth::{
    self, random_nonce, random_u64, ClientHandshake, ClientStep, MacKey, Secret, NONCE_LEN,
};
use crate::control::codec::{
    ClientMessage, Framing, RecordDecoder, RecordFormat, ResponseHeader, CLIENT_MESSAGE_LEN,
};
use crate::control::outbuf::OutBuf;
use crate::control::rxdrops::RxDrops;
use crate::control::udp::{
    encode_single, epoch_of, Datagram, DatagramBuilder, DatagramKind, Keepalive, Ledger, Tally,
    FLAG_KEYED, HELLO_BODY_LEN, MAX_DATAGRAM,
};
use crate::control::{ControlError, Transport};
use crate::flow::FlowKey;

/// Most intercept servers (`MAX_REAL_SERVERS`).
pub const MAX_SERVERS: usize = 32;
/// Most connections per server (the C tool allows 11).
pub const MAX_CONNECTIONS_PER_SERVER: usize = 16;
/// Default connections per server (`-C`).
pub const DEFAULT_CONNECTIONS_PER_SERVER: usize = 2;
/// First reconnect delay.
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Default bound on one connection's unsent bytes.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 4 << 20;
/// Default time a connect (and the authentication handshake) may take before it is abandoned
/// and retried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default UDP keepalive (HELLO) interval.
pub const DEFAULT_UDP_KEEPALIVE: Duration = Duration::from_secs(1);
/// Default silence after which a UDP intercept counts as down.
pub const DEFAULT_UDP_DEAD_AFTER: Duration = Duration::from_secs(3);

const WAKER: Token = Token(usize::MAX);
const UDP_SOCKET: Token = Token(usize::MAX - 1);
const READ_CHUNK: usize = 64 * 1024;

/// Settings of a [`ControlClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Intercept servers (`-s`), 1..=32.
    pub servers: Vec<SocketAddrV4>,
    /// TCP connections per server (`-C`), 1..=16. UDP uses one session per server.
    pub connections_per_server: usize,
    /// Record format expected (must match the intercepts).
    pub format: RecordFormat,
    /// Framing expected on TCP (must match the intercepts; UDP has its own).
    pub framing: Framing,
    /// `-L`: keep running when every intercept is gone (see [`ControlClient::should_exit`]).
    pub lonely: bool,
    /// First reconnect delay; it doubles after each failed attempt.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Bound on one connection's unsent bytes (TCP), or on the datagrams waiting for the UDP
    /// socket.
    pub max_buffer_bytes: usize,
    /// Time a connect plus the authentication handshake may take (an intercept host that
    /// drops SYNs) before it counts as failed.
    pub connect_timeout: Duration,
    /// TCP (default) or UDP.
    pub transport: Transport,
    /// The shared secret; `None` (default): no authentication, the C tools' byte format.
    pub auth: Option<Secret>,
    /// UDP: local address of the socket (default `0.0.0.0:0`: any address, a free port).
    pub udp_local: SocketAddrV4,
    /// UDP: interval of the keepalive HELLO.
    pub udp_keepalive: Duration,
    /// UDP: an intercept that sent nothing for this long counts as down.
    pub udp_dead_after: Duration,
}

impl ClientConfig {
    /// Defaults (2 connections per server, 64-byte records, combined framing, TCP, no
    /// authentication, not lonely) for `servers`.
    pub fn new(servers: Vec<SocketAddrV4>) -> ClientConfig {
        ClientConfig {
            servers,
            connections_per_server: DEFAULT_CONNECTIONS_PER_SERVER,
            format: RecordFormat::Header64,
            framing: Framing::Combined,
            lonely: false,
            reconnect_initial: DEFAULT_RECONNECT_INITIAL,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            transport: Transport::Tcp,
            auth: None,
            udp_local: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
            udp_keepalive: DEFAULT_UDP_KEEPALIVE,
            udp_dead_after: DEFAULT_UDP_DEAD_AFTER,
        }
    }
}

/// Counters of a [`ControlClient`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections (UDP: sessions) currently established.
    pub connections_up: u64,
    /// Connections (UDP: sessions) established in total.
    pub connects: u64,
    /// Establishments of a connection (UDP: a server's session) that had been up before.
    pub reconnects: u64,
    /// Connection attempts that failed (refused, unreachable, timed out, …).
    pub connect_failures: u64,
    /// Established connections (UDP: sessions) lost.
    pub disconnects: u64,
    /// Route messages queued to a server (one per server per message).
    pub messages_sent: u64,
    /// Route messages not queued (server down, backlog full) or lost unsent with their
    /// connection; one per server per message.
    pub messages_dropped: u64,
    /// Response records decoded and delivered.
    pub records_received: u64,
    /// Bytes read from intercepts.
    pub bytes_received: u64,
    /// Framing errors (connection dropped) and undecodable records (skipped).
    pub protocol_errors: u64,
    /// Authentication failures: an intercept without the secret (wrong proof, no handshake),
    /// or one that closed the connection during the handshake (it refused our proof).
    pub auth_failures: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received and accepted.
    pub datagrams_received: u64,
    /// UDP datagrams from the intercepts lost on the way: gaps in their sequence numbers
    /// (late arrivals are taken back; a gap at the tail is seen by the next keepalive
    /// exchange), less those the intercept reported it never sent and those our own socket
    /// dropped (`datagrams_receive_dropped`).
    pub datagrams_lost: u64,
    /// UDP datagrams that arrived after a later one.
    pub datagrams_reordered: u64,
    /// UDP datagrams dropped as duplicates or replays (sequence number already seen or older
    /// than the window).
    pub datagrams_replayed: u64,
    /// UDP datagrams rejected: not this protocol, a wrong MAC (forged), an unknown session or
    /// a stale epoch.
    pub datagrams_rejected: u64,
    /// UDP datagrams not sent: the socket's queue was full or the send failed.
    pub datagrams_send_dropped: u64,
    /// UDP datagrams our socket dropped on arrival, its receive buffer full (the kernel's
    /// count for the socket, from `/proc`, refreshed every 100 ms).
    pub datagrams_receive_dropped: u64,
    /// Response records the intercepts sent (as their keepalive tallies say) that never
    /// arrived: in datagrams lost on the way or dropped by our socket.
    pub records_lost: u64,
}

#[derive(Debug)]
enum State {
    Down {
        retry_at: Instant,
    },
    Connecting {
        stream: TcpStream,
        deadline: Instant,
    },
    Handshake {
        stream: TcpStream,
        handshake: Box<ClientHandshake>,
        deadline: Instant,
    },
    Up(TcpStream),
}

#[derive(Debug)]
struct Conn {
    server: usize,
    state: State,
    out: OutBuf,
    decoder: RecordDecoder,
    backoff: Duration,
    up_since: Instant,
    ever_up: bool,
    failures: u32,
}

#[derive(Debug)]
struct Server {
    addr: SocketAddrV4,
}

/// An established UDP session with one intercept.
#[derive(Debug)]
struct UdpSession {
    epoch: u64,
    up_key: Option<MacKey>,
    down_key: Option<MacKey>,
    ledger: Ledger,
    keepalive: Keepalive,
}

/// The UDP link to one intercept.
#[derive(Debug)]
struct UdpLink {
    addr: SocketAddr,
    session_id: u64,
    nc: [u8; NONCE_LEN],
    session: Option<UdpSession>,
    next_hello: Instant,
    hello_interval: Duration,
    last_heard: Instant,
    messages: DatagramBuilder,
    ever_up: bool,
    attempts: u32,
    /// Counters of the ledgers of past sessions.
    lost: u64,
    reordered: u64,
    replayed: u64,
    records_lost: u64,
}

/// A datagram waiting for the socket: numbered for `link`'s session `epoch`, with `items`
/// messages.
#[derive(Debug)]
struct Queued {
    addr: SocketAddr,
    bytes: Vec<u8>,
    link: usize,
    epoch: u64,
    items: usize,
}

#[derive(Debug)]
struct UdpSide {
    socket: UdpSocket,
    local: SocketAddr,
    links: Vec<UdpLink>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    queue_limit: usize,
    scratch: Vec<u8>,
    hello_key: Option<MacKey>,
    rx_drops: RxDrops,
}

/// The tcpcopy end of the control channel (see the module docs).
#[derive(Debug)]
pub struct ControlClient {
    poll: Poll,
    events: Events,
    ready: Vec<(Token, bool, bool)>,
    waker: Arc<Waker>,
    config: ClientConfig,
    servers: Vec<Server>,
    conns: Vec<Conn>,
    udp: Option<UdpSide>,
    read_buf: Box<[u8]>,
    stats: ClientStats,
    ever_up: bool,
}

impl ControlClient {
    /// Starts connecting to every server (non-blocking); connections come up during
    /// [`poll`](Self::poll).
    ///
    /// # Errors
    /// [`ControlError::NoServers`], [`ControlError::TooManyServers`],
    /// [`ControlError::BadConnectionCount`] for a bad config; [`ControlError::Io`] if the
    /// poller (or, for UDP, the socket) cannot be created; [`ControlError::Bind`] if the UDP
    /// local address cannot be bound; [`ControlError::Auth`] without OS randomness.
    pub fn new(config: ClientConfig) -> Result<ControlClient, ControlError> {
        if config.servers.is_empty() {
            return Err(ControlError::NoServers);
        }
        if config.servers.len() > MAX_SERVERS {
            return Err(ControlError::TooManyServers(config.servers.len()));
        }
        let per = config.connections_per_server;
        if !(1..=MAX_CONNECTIONS_PER_SERVER).contains(&per) {
            return Err(ControlError::BadConnectionCount(per));
        }
        let poll = Poll::new().map_err(|e| ControlError::io("creating the poller", e))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| ControlError::io("creating the waker", e))?;
        let now = Instant::now();
        let initial = config.reconnect_initial.max(Duration::from_millis(1));
        let servers: Vec<Server> = config.servers.iter().map(|&addr| Server { addr }).collect();
        let (conns, udp) = match config.transport {
            Transport::Tcp => {
                let conns = (0..servers.len() * per)
                    .map(|i| Conn {
                        server: i / per,
                        state: State::Down { retry_at: now },
                        out: OutBuf::new(config.max_buffer_bytes.max(CLIENT_MESSAGE_LEN)),
                        decoder: RecordDecoder::new(config.format, config.framing),
                        backoff: initial,
                        up_since: now,
                        ever_up: false,
                        failures: 0,
                    })
                    .collect();
                (conns, None)
            }
            Transport::Udp => (Vec::new(), Some(UdpSide::open(&config, &servers, &poll)?)),
        };
        let mut client = ControlClient {
            poll,
            events: Events::with_capacity(256),
            ready: Vec::with_capacity(256),
            waker: Arc::new(waker),
            config,
            servers,
            conns,
            udp,
            read_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            stats: ClientStats::default(),
            ever_up: false,
        };
        client.reconnect_due(now);
        Ok(client)
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Counters.
    /// Connections (UDP: sessions) taken up again after one was lost, so far (cheap; the same
    /// as [`ClientStats::reconnects`]).
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects
    }

    pub fn stats(&self) -> ClientStats {
        let mut s = self.stats;
        if let Some(udp) = &self.udp {
            let mut gaps = 0u64;
            for l in &udp.links {
                let (lost, reordered, replayed, records) =
                    l.session.as_ref().map_or((0, 0, 0, 0), |s| {
                        let w = &s.ledger.window;
                        (
                            s.ledger.lost(),
                            w.reordered,
                            w.rejected,
                            s.ledger.items_lost(),
                        )
                    });
                gaps = gaps.saturating_add(l.lost).saturating_add(lost);
                s.datagrams_reordered = s
                    .datagrams_reordered
                    .saturating_add(l.reordered)
                    .saturating_add(reordered);
                s.datagrams_replayed = s
                    .datagrams_replayed
                    .saturating_add(l.replayed)
                    .saturating_add(replayed);
                s.records_lost = s
                    .records_lost
                    .saturating_add(l.records_lost)
                    .saturating_add(records);
            }
            // What our socket dropped shows as gaps too: it was not lost on the way.
            s.datagrams_receive_dropped = udp.rx_drops.total();
            s.datagrams_lost = gaps.saturating_sub(s.datagrams_receive_dropped);
        }
        s
    }

    /// The local address of the UDP socket (UDP transport only).
    pub fn udp_local_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().map(|u| u.local)
    }

    /// A handle another thread can use to interrupt [`poll`](Self::poll) (e.g. after queueing
    /// route requests for this thread).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Whether `server` is up (TCP: at least one connection; UDP: its session).
    pub fn is_connected(&self, server: SocketAddrV4) -> bool {
        self.servers
            .iter()
            .enumerate()
            .any(|(s, srv)| srv.addr == server && self.server_up(s))
    }

    /// How many servers are up.
    pub fn connected_servers(&self) -> usize {
        (0..self.servers.len())
            .filter(|&s| self.server_up(s))
            .count()
    }

    /// Whether no server is up (also true before the first one comes up).
    pub fn all_down(&self) -> bool {
        self.connected_servers() == 0
    }

    /// The C tool's exit rule: without `-L` (lonely), tcpcopy stops once every intercept
    /// connection it had is gone. Never true before the first connection came up. See the
    /// module docs.
    pub fn should_exit(&self) -> bool {
        !self.config.lonely && self.ever_up && self.all_down()
    }

    /// Queues `CLIENT_ADD` for `key` to every server that is up (TCP: on one of its
    /// connections chosen by the flow's hash, so intercept routes the session's responses to
    /// that connection; the C tool chooses round-robin, which reorders an ADD after a DEL of
    /// the same 4-tuple). Never blocks. `true` if at least one server took it (the C tool
    /// skips the SYN otherwise). UDP: the message leaves with the next [`poll`](Self::poll) or
    /// [`flush`](Self::flush), batched with others.
    pub fn client_add(&mut self, key: FlowKey) -> bool {
        self.send_message(&ClientMessage::add(key))
    }

    /// Queues `CLIENT_DEL` for `key` (a session ended), like [`client_add`](Self::client_add).
    pub fn client_del(&mut self, key: FlowKey) -> bool {
        self.send_message(&ClientMessage::del(key))
    }

    /// Queues any message like [`client_add`](Self::client_add).
    pub fn send_message(&mut self, message: &ClientMessage) -> bool {
        if self.udp.is_some() {
            return self.udp_send_message(message);
        }
        let bytes = message.encode();
        let per = self.config.connections_per_server;
        let mut any = false;
        // Every message about one session goes on the same connection (chosen by its flow
        // hash), so a CLIENT_DEL and the CLIENT_ADD of a new session on the same 4-tuple reach
        // intercept in the order they were sent; sessions still spread over the connections.
        let affinity = (message.flow_key().hash64() % per as u64) as usize;
        for s in 0..self.servers.len() {
            let chosen = (0..per)
                .map(|k| (affinity + k) % per)
                .find(|&k| matches!(self.conns[s * per + k].state, State::Up(_)));
            let Some(k) = chosen else {
                self.stats.messages_dropped += 1;
                continue;
            };
            let i = s * per + k;
            let was_idle = self.conns[i].out.pending() == 0;
            if !self.conns[i].out.push(&bytes) {
                self.stats.messages_dropped += 1;
                continue;
            }
            self.stats.messages_sent += 1;
            any = true;
            if was_idle {
                // Otherwise a writable event is due and will flush in order.
                self.flush_conn(i, Instant::now());
            }
        }
        any
    }

    /// Sends what is batched (UDP route messages) now. TCP messages are written as they are
    /// queued, so this does nothing there.
    pub fn flush(&mut self) {
        if self.udp.is_some() {
            for s in 0..self.servers.len() {
                self.udp_flush_messages(s);
            }
            self.udp_drain_queue();
        }
    }

    /// Sends batched messages, waits up to `timeout` (shortened to the next reconnect attempt
    /// or keepalive) for the intercepts or the waker; completes connects and handshakes
    /// (sending the hello), writes backlogs, reads and decodes records (each goes to
    /// `on_record`), and retries lost connections that are due. Returns the records
    /// delivered.
    ///
    /// # Errors
    /// Only a failure of the poller itself.
    pub fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_record: &mut dyn FnMut(&ResponseHeader),
    ) -> Result<usize, ControlError> {
        let before = self.stats.records_received;
        self.flush();
        let now = Instant::now();
        self.reconnect_due(now);
        let deadline = self.next_retry();
        super::wait_ready(
            &mut self.poll,
            &mut self.events,
            &mut self.ready,
            timeout,
            deadline,
        )?;
        let now = Instant::now();
        for r in 0..self.ready.len() {
            let (token, readable, writable) = self.ready[r];
            if token == UDP_SOCKET {
                if writable {
                    self.udp_drain_queue();
                }
                if readable {
                    self.udp_read(now, on_record);
                }
                continue;
            }
            let Token(i) = token;
            if i >= self.conns.len() {
                continue; // the waker
            }
            match self.conns[i].state {
                State::Connecting { .. } => self.check_connect(i, now, on_record),
                State::Handshake { .. } | State::Up(_) => {
                    if writable {
                        self.flush_conn(i, now);
                    }
                    if readable {
                        self.read(i, now, on_record);
                    }
                }
                State::Down { .. } => {}
            }
        }
        self.reconnect_due(Instant::now());
        Ok((self.stats.records_received - before) as usize)
    }

    /// Polls until every server is up or `timeout` passes; `true` if they all came up.
    /// Records arriving meanwhile go to `on_record`.
    ///
    /// # Errors
    /// As [`poll`](Self::poll).
    pub fn wait_connected(
        &mut self,
        timeout: Duration,
        on_record: &mut dyn FnMut(&ResponseHeader),
    ) -> Result<bool, ControlError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.connected_servers() == self.servers.len() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            self.poll(Some(deadline - now), on_record)?;
        }
    }

    fn server_up(&self, s: usize) -> bool {
        if let Some(udp) = &self.udp {
            return udp.links[s].session.is_some();
        }
        let per = self.config.connections_per_server;
        self.conns[s * per..(s + 1) * per]
            .iter()
            .any(|c| matches!(c.state, State::Up(_)))
    }

    /// The next reconnect attempt, connect or handshake deadline, or keepalive.
    fn next_retry(&self) -> Option<Instant> {
        let tcp = self
            .conns
            .iter()
            .filter_map(|c| match c.state {
                State::Down { retry_at } => Some(retry_at),
                State::Connecting { deadline, .. } | State::Handshake { deadline, .. } => {
                    Some(deadline)
                }
                State::Up(_) => None,
            })
            .min();
        let udp = self.udp.as_ref().and_then(|u| {
            u.links
                .iter()
                .map(|l| match &l.session {
                    Some(s) => {
                        let dead = l.last_heard + self.config.udp_dead_after;
                        s.keepalive.deadline().min(dead)
                    }
                    None => l.next_hello,
                })
                .min()
        });
        match (tcp, udp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn reconnect_due(&mut self, now: Instant) {
        if self.udp.is_some() {
            self.udp_timers(now);
            return;
        }
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                State::Down { retry_at } if retry_at <= now => self.start_connect(i, now),
                State::Connecting { deadline, .. } if deadline <= now => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.abandon(i, &e, now, false);
                }
                State::Handshake { deadline, .. } if deadline <= now => {
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        "authentication handshake timed out",
                    );
                    self.abandon(i, &e, now, true);
                }
                _ => {}
            }
        }
    }

    fn start_connect(&mut self, i: usize, now: Instant) {
        let addr = self.servers[self.conns[i].server].addr;
        debug!(server = %addr, connection = i, "connecting to intercept");
        match TcpStream::connect(SocketAddr::V4(addr)) {
            Ok(mut stream) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                match self
                    .poll
                    .registry()
                    .register(&mut stream, Token(i), interest)
                {
                    Ok(()) => {
                        let deadline = now + self.config.connect_timeout;
                        self.conns[i].state = State::Connecting { stream, deadline };
                    }
                    Err(e) => self.connect_failed(i, &e, now, false),
                }
            }
            Err(e) => self.connect_failed(i, &e, now, false),
        }
    }

    fn check_connect(
        &mut self,
        i: usize,
        now: Instant,
        on_record: &mut dyn FnMut(&ResponseHeader),
    ) {
        let State::Connecting { stream, .. } = &mut self.conns[i].state else {
            return;
        };
        let error = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // still pending
                Err(e) => Some(e),
            },
        };
        let State::Connecting { stream, deadline } =
            std::mem::replace(&mut self.conns[i].state, State::Down { retry_at: now })
        else {
            return;
        };
        if let Some(e) = error {
            self.conns[i].state = State::Connecting { stream, deadline };
            self.abandon(i, &e, now, false);
            return;
        }
        let addr = self.servers[self.conns[i].server].addr;
        if let Err(e) = stream.set_nodelay(true) {
            debug!(server = %addr, error = %e, "cannot set TCP_NODELAY");
        }
        let conn = &mut self.conns[i];
        conn.out.clear();
        conn.decoder.reset();
        match &self.config.auth {
            None => {
                conn.state = State::Up(stream);
                self.established(i, now);
                self.flush_conn(i, now);
            }
            Some(secret) => match ClientHandshake::start(secret) {
                Ok((handshake, challenge)) => {
                    conn.out.push(&challenge);
                    conn.state = State::Handshake {
                        stream,
                        handshake: Box::new(handshake),
                        deadline,
                    };
                    debug!(server = %addr, connection = i, "authenticating to intercept");
                    self.flush_conn(i, now);
                }
                Err(e) => {
                    conn.state = State::Connecting { stream, deadline };
                    self.abandon(i, &e, now, true);
                    return;
                }
            },
        }
        self.read(i, now, on_record);
    }

    /// A connection just became usable: hello queued, counters, log.
    fn established(&mut self, i: usize, now: Instant) {
        let addr = self.servers[self.conns[i].server].addr;
        let conn = &mut self.conns[i];
        conn.out.push(&ClientMessage::hello().encode());
        conn.up_since = now;
        conn.failures = 0;
        self.stats.connects += 1;
        self.stats.connections_up += 1;
        if conn.ever_up {
            self.stats.reconnects += 1;
            warn!(server = %addr, connection = i, "reconnected to intercept");
        } else {
            info!(server = %addr, connection = i, "connected to intercept");
        }
        conn.ever_up = true;
        self.ever_up = true;
    }

    /// Gives up a connection that is connecting or authenticating (not up).
    fn abandon(&mut self, i: usize, error: &dyn std::fmt::Display, now: Instant, auth: bool) {
        let old = std::mem::replace(&mut self.conns[i].state, State::Down { retry_at: now });
        match old {
            State::Connecting { mut stream, .. } | State::Handshake { mut stream, .. } => {
                let _ = self.poll.registry().deregister(&mut stream);
            }
            State::Up(mut stream) => {
                let _ = self.poll.registry().deregister(&mut stream);
            }
            State::Down { .. } => {}
        }
        self.conns[i].out.clear();
        self.connect_failed(i, error, now, auth);
    }

    fn connect_failed(
        &mut self,
        i: usize,
        error: &dyn std::fmt::Display,
        now: Instant,
        auth: bool,
    ) {
        let addr = self.servers[self.conns[i].server].addr;
        let max = self.config.reconnect_max;
        let conn = &mut self.conns[i];
        conn.failures += 1;
        let delay = conn.backoff;
        conn.backoff = (conn.backoff * 2).min(max);
        conn.state = State::Down {
            retry_at: now + delay,
        };
        if auth {
            self.stats.auth_failures += 1;
        } else {
            self.stats.connect_failures += 1;
        }
        let attempts = conn.failures;
        let what = if auth {
            "cannot authenticate to intercept"
        } else {
            "cannot connect to intercept"
        };
        if attempts % 12 == 1 {
            warn!(server = %addr, connection = i, reason = %error, attempts,
                retry_in_ms = delay.as_millis() as u64, "{what}");
        } else {
            debug!(server = %addr, connection = i, reason = %error, attempts,
                retry_in_ms = delay.as_millis() as u64, "{what}");
        }
    }

    fn lose(&mut self, i: usize, reason: &dyn std::fmt::Display, now: Instant) {
        if !matches!(self.conns[i].state, State::Up(_)) {
            // Lost during the handshake: intercept refused us (or went away).
            self.abandon(i, reason, now, true);
            return;
        }
        let addr = self.servers[self.conns[i].server].addr;
        let initial = self.config.reconnect_initial.max(Duration::from_millis(1));
        let max = self.config.reconnect_max;
        let conn = &mut self.conns[i];
        let State::Up(mut stream) =
            std::mem::replace(&mut conn.state, State::Down { retry_at: now })
        else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut stream);
        drop(stream);
        let unsent = conn.out.pending() / CLIENT_MESSAGE_LEN;
        conn.out.clear();
        conn.decoder.reset();
        if now.saturating_duration_since(conn.up_since) >= max {
            conn.backoff = initial;
        }
        let delay = conn.backoff;
        conn.backoff = (conn.backoff * 2).min(max);
        conn.state = State::Down {
            retry_at: now + delay,
        };
        self.stats.messages_dropped += unsent as u64;
        self.stats.disconnects += 1;
        self.stats.connections_up -= 1;
        warn!(server = %addr, connection = i, %reason, unsent_messages = unsent,
            retry_in_ms = delay.as_millis() as u64, "lost connection to intercept");
    }

    fn flush_conn(&mut self, i: usize, now: Instant) {
        let conn = &mut self.conns[i];
        let stream = match &mut conn.state {
            State::Up(stream) | State::Handshake { stream, .. } => stream,
            _ => return,
        };
        if conn.out.pending() == 0 {
            return;
        }
        if let Err(e) = conn.out.write_to(stream) {
            self.lose(i, &e, now);
        }
    }

    fn read(&mut self, i: usize, now: Instant, on_record: &mut dyn FnMut(&ResponseHeader)) {
        loop {
            let conn = &mut self.conns[i];
            let stream = match &mut conn.state {
                State::Up(stream) | State::Handshake { stream, .. } => stream,
                _ => return,
            };
            let n = match stream.read(&mut self.read_buf) {
                Ok(0) => {
                    self.lose(i, &"closed by intercept", now);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.lose(i, &e, now);
                    return;
                }
            };
            self.stats.bytes_received += n as u64;
            let mut start = 0;
            if let State::Handshake { handshake, .. } = &mut self.conns[i].state {
                match handshake.feed(&self.read_buf[..n]) {
                    Ok(ClientStep::NeedMore) => continue,
                    Ok(ClientStep::Done { proof, consumed }) => {
                        start = consumed;
                        let conn = &mut self.conns[i];
                        let State::Handshake { stream, .. } =
                            std::mem::replace(&mut conn.state, State::Down { retry_at: now })
                        else {
                            return;
                        };
                        conn.state = State::Up(stream);
                        conn.out.push(&proof);
                        self.established(i, now);
                        self.flush_conn(i, now);
                    }
                    Err(e) => {
                        self.abandon(i, &e, now, true);
                        return;
                    }
                }
            }
            let conn = &mut self.conns[i];
            if !matches!(conn.state, State::Up(_)) {
                return;
            }
            let stats = &mut self.stats;
            let result = conn.decoder.feed(&self.read_buf[start..n], |record| {
                deliver(stats, record, on_record)
            });
            if let Err(e) = result {
                self.stats.protocol_errors += 1;
                self.lose(i, &e, now);
                return;
            }
        }
    }

    // ---- UDP ----

    fn udp_send_message(&mut self, message: &ClientMessage) -> bool {
        let bytes = message.encode();
        let mut any = false;
        for s in 0..self.servers.len() {
            let Some(udp) = self.udp.as_mut() else {
                return false;
            };
            let link = &mut udp.links[s];
            if link.session.is_none() {
                self.stats.messages_dropped += 1;
                continue;
            }
            match link.messages.push(&bytes) {
                Ok(full) => {
                    self.stats.messages_sent += 1;
                    any = true;
                    if full {
                        self.udp_flush_messages(s);
                    }
                }
                Err(()) => self.stats.messages_dropped += 1,
            }
        }
        any
    }

    /// Sends server `s`'s batched messages as one datagram.
    fn udp_flush_messages(&mut self, s: usize) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        let link = &mut udp.links[s];
        if link.messages.is_empty() {
            return;
        }
        let count = link.messages.count();
        let numbered = link
            .session
            .as_ref()
            .and_then(|x| Some((x.ledger.next_seq()?, x.epoch)));
        let (Some(session), Some((seq, epoch))) = (link.session.as_ref(), numbered) else {
            link.messages.clear();
            self.stats.messages_dropped += count as u64;
            self.stats.messages_sent -= count as u64;
            return;
        };
        let bytes = link
            .messages
            .finish(link.session_id, epoch, seq, 0, session.up_key.as_ref())
            .to_vec();
        link.messages.clear();
        let addr = link.addr;
        if udp.send(s, epoch, addr, bytes, count, &mut self.stats) {
            // The number is used only by a datagram the socket took.
            if let Some(session) = udp.links[s].session.as_mut() {
                session.ledger.commit(count as u64);
            }
        } else {
            self.stats.messages_sent -= count as u64;
            self.stats.messages_dropped += count as u64;
        }
    }

    fn udp_drain_queue(&mut self) {
        if let Some(udp) = self.udp.as_mut() {
            udp.drain(&mut self.stats);
        }
    }

    /// Keepalives, hello retries and dead-intercept detection.
    fn udp_timers(&mut self, now: Instant) {
        let keepalive = self.config.udp_keepalive.max(Duration::from_millis(1));
        let dead_after = self.config.udp_dead_after;
        let initial = self.config.reconnect_initial.max(Duration::from_millis(1));
        if let Some(udp) = self.udp.as_mut() {
            udp.rx_drops.refresh_due(now);
        }
        for s in 0..self.servers.len() {
            let Some(udp) = self.udp.as_mut() else {
                return;
            };
            let link = &mut udp.links[s];
            if link.session.is_some()
                && now.saturating_duration_since(link.last_heard) >= dead_after
            {
                let dropped = link.messages.count() as u64;
                link.messages.clear();
                self.stats.messages_sent -= dropped;
                self.stats.messages_dropped += dropped;
                link.end_session();
                link.nc = random_nonce().unwrap_or(link.nc);
                link.hello_interval = initial;
                link.next_hello = now;
                link.attempts = 0;
                self.stats.disconnects += 1;
                self.stats.connections_up -= 1;
                warn!(server = %link.addr, silent_ms = dead_after.as_millis() as u64,
                    "lost intercept (UDP: no answer)");
            }
            if let Some(session) = link.session.as_mut() {
                if session.keepalive.due(now) {
                    udp.send_hello(s, &mut self.stats);
                }
                continue;
            }
            if now < link.next_hello {
                continue;
            }
            link.attempts += 1;
            if link.attempts > 1 {
                self.stats.connect_failures += 1;
                if link.attempts % 12 == 2 {
                    warn!(server = %link.addr, attempts = link.attempts - 1,
                        "no answer from intercept (UDP)");
                }
            }
            link.next_hello = now + link.hello_interval;
            link.hello_interval = (link.hello_interval * 2).min(keepalive);
            udp.send_hello(s, &mut self.stats);
        }
    }

    fn udp_read(&mut self, now: Instant, on_record: &mut dyn FnMut(&ResponseHeader)) {
        loop {
            let Some(udp) = self.udp.as_mut() else {
                return;
            };
            let (n, from) = match udp.socket.recv_from(&mut self.read_buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors and the like: nothing to do but carry on.
                    debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            self.stats.bytes_received += n as u64;
            let verdict = self.udp_datagram(n, now, on_record);
            if let Err(reason) = verdict {
                self.stats.datagrams_rejected += 1;
                debug!(%from, reason, "control datagram rejected");
            }
        }
    }

    /// Handles the datagram in `read_buf[..n]`.
    fn udp_datagram(
        &mut self,
        n: usize,
        now: Instant,
        on_record: &mut dyn FnMut(&ResponseHeader),
    ) -> Result<(), &'static str> {
        let authenticated = self.config.auth.is_some();
        let format = self.config.format;
        let Some(udp) = self.udp.as_mut() else {
            return Ok(());
        };
        let d =
            Datagram::parse(&self.read_buf[..n], authenticated, format).map_err(|_| "malformed")?;
        let s = udp
            .links
            .iter()
            .position(|l| l.session_id == d.header.session)
            .ok_or("unknown session")?;
        match d.header.kind {
            DatagramKind::HelloAck => {
                let (ni, nc) = d.nonces();
                if nc != Some(udp.links[s].nc) {
                    return Err("stale or forged hello-ack");
                }
                let epoch = epoch_of(&ni);
                let link = &mut udp.links[s];
                let same = link.session.as_ref().is_some_and(|x| x.epoch == epoch);
                let tally = d.tally().unwrap_or_default();
                if same {
                    let session = link.session.as_mut().ok_or("no session")?;
                    if let Some(k) = &session.down_key {
                        if !d.verify(k) {
                            return Err("bad MAC");
                        }
                    }
                    if !session
                        .ledger
                        .accept_keepalive(d.header.seq, tally)
                        .accepted()
                    {
                        return Ok(()); // counted as replayed
                    }
                    link.last_heard = now;
                    self.stats.datagrams_received += 1;
                    return Ok(());
                }
                let (up_key, down_key) = match &self.config.auth {
                    Some(secret) => {
                        let (u, dk) = secret.udp_session_keys(link.session_id, &link.nc, &ni);
                        (Some(u), Some(dk))
                    }
                    None => (None, None),
                };
                if let Some(k) = &down_key {
                    if !d.verify(k) {
                        return Err("bad MAC");
                    }
                }
                let mut ledger = Ledger::new();
                if !ledger.accept_keepalive(d.header.seq, tally).accepted() {
                    return Err("implausible sequence number");
                }
                let was_up = link.session.is_some();
                link.end_session();
                link.session = Some(UdpSession {
                    epoch,
                    up_key,
                    down_key,
                    ledger,
                    keepalive: Keepalive::new(now, self.config.udp_keepalive),
                });
                link.last_heard = now;
                link.attempts = 0;
                self.stats.datagrams_received += 1;
                self.stats.connects += 1;
                if !was_up {
                    self.stats.connections_up += 1;
                }
                let addr = link.addr;
                if link.ever_up {
                    self.stats.reconnects += 1;
                    warn!(server = %addr, "reconnected to intercept (UDP session)");
                } else {
                    info!(server = %addr, local = %udp.local, "connected to intercept (UDP session)");
                }
                link.ever_up = true;
                self.ever_up = true;
                // Confirm at once with a keyed HELLO: intercept learns our address from it.
                udp.send_hello(s, &mut self.stats);
                Ok(())
            }
            DatagramKind::Records => {
                let link = &mut udp.links[s];
                let session = link.session.as_mut().ok_or("records without a session")?;
                if d.header.epoch != session.epoch {
                    return Err("records of another session");
                }
                if let Some(k) = &session.down_key {
                    if !d.verify(k) {
                        return Err("bad MAC");
                    }
                }
                let items = u64::from(d.header.count);
                if !session.ledger.accept(d.header.seq, items).accepted() {
                    return Ok(()); // counted as replayed
                }
                link.last_heard = now;
                self.stats.datagrams_received += 1;
                let stats = &mut self.stats;
                for record in d.items() {
                    deliver(stats, record, on_record);
                }
                Ok(())
            }
            DatagramKind::Hello | DatagramKind::Messages => Err("wrong direction"),
        }
    }
}

/// Parses one record and hands it over, counting.
fn deliver(stats: &mut ClientStats, record: &[u8], on_record: &mut dyn FnMut(&ResponseHeader)) {
    match ResponseHeader::parse(record) {
        Ok(header) => {
            stats.records_received += 1;
            on_record(&header);
        }
        Err(e) => {
            stats.protocol_errors += 1;
            debug!(error = %e, "undecodable response record skipped");
        }
    }
}

impl UdpLink {
    /// Folds the current session's counters into the link's and forgets the session.
    fn end_session(&mut self) {
        if let Some(s) = self.session.take() {
            let l = &s.ledger;
            self.lost = self.lost.saturating_add(l.lost());
            self.reordered = self.reordered.saturating_add(l.window.reordered);
            self.replayed = self.replayed.saturating_add(l.window.rejected);
            self.records_lost = self.records_lost.saturating_add(l.items_lost());
        }
    }
}

impl UdpSide {
    fn open(
        config: &ClientConfig,
        servers: &[Server],
        poll: &Poll,
    ) -> Result<UdpSide, ControlError> {
        let local = SocketAddr::V4(config.udp_local);
        let mut socket = UdpSocket::bind(local).map_err(|source| ControlError::Bind {
            addr: config.udp_local,
            source,
        })?;
        poll.registry()
            .register(
                &mut socket,
                UDP_SOCKET,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| ControlError::io("registering the UDP socket", e))?;
        let local = socket
            .local_addr()
            .map_err(|e| ControlError::io("reading the UDP socket's address", e))?;
        let now = Instant::now();
        let mut links = Vec::with_capacity(servers.len());
        for srv in servers {
            links.push(UdpLink {
                addr: SocketAddr::V4(srv.addr),
                session_id: random_u64()?,
                nc: random_nonce()?,
                session: None,
                next_hello: now,
                hello_interval: config.reconnect_initial.max(Duration::from_millis(1)),
                last_heard: now,
                messages: DatagramBuilder::new(DatagramKind::Messages, config.format),
                ever_up: false,
                attempts: 0,
                lost: 0,
                reordered: 0,
                replayed: 0,
                records_lost: 0,
            });
        }
        info!(%local, "control channel over UDP");
        Ok(UdpSide {
            local,
            links,
            queue: VecDeque::new(),
            queued_bytes: 0,
            queue_limit: config.max_buffer_bytes.max(MAX_DATAGRAM),
            scratch: Vec::with_capacity(MAX_DATAGRAM),
            hello_key: config.auth.as_ref().map(auth::Secret::udp_hello_key),
            rx_drops: RxDrops::new(&socket),
            socket,
        })
    }

    /// Sends (or queues) `bytes`, numbered for `link`'s session `epoch`, to `addr`; `false`
    /// if it was dropped (its number is then free again). `items` is the count of route
    /// messages in it, for the drop accounting.
    fn send(
        &mut self,
        link: usize,
        epoch: u64,
        addr: SocketAddr,
        bytes: Vec<u8>,
        items: usize,
        stats: &mut ClientStats,
    ) -> bool {
        if self.queue.is_empty() {
            match self.socket.send_to(&bytes, addr) {
                Ok(_) => {
                    stats.datagrams_sent += 1;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    stats.datagrams_send_dropped += 1;
                    debug!(%addr, error = %e, "UDP send failed");
                    return false;
                }
            }
        }
        if self.queued_bytes + bytes.len() > self.queue_limit {
            stats.datagrams_send_dropped += 1;
            return false;
        }
        self.queued_bytes += bytes.len();
        self.queue.push_back(Queued {
            addr,
            bytes,
            link,
            epoch,
            items,
        });
        true
    }

    fn drain(&mut self, stats: &mut ClientStats) {
        while let Some(q) = self.queue.front() {
            match self.socket.send_to(&q.bytes, q.addr) {
                Ok(_) => stats.datagrams_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    stats.datagrams_send_dropped += 1;
                    stats.messages_sent -= q.items as u64;
                    stats.messages_dropped += q.items as u64;
                    // Its number was used: the next keepalive reports it skipped.
                    if let Some(session) = self.links[q.link].session.as_mut() {
                        if session.epoch == q.epoch {
                            session.ledger.abandon(q.items as u64);
                        }
                    }
                }
            }
            self.queued_bytes -= q.bytes.len();
            self.queue.pop_front();
        }
    }

    /// Sends link `s`'s HELLO: keyed (epoch, sequence, tally, session key) when its session
    /// is up, the opening one otherwise.
    fn send_hello(&mut self, s: usize, stats: &mut ClientStats) {
        let link = &mut self.links[s];
        let mut body = [0u8; HELLO_BODY_LEN];
        body[..NONCE_LEN].copy_from_slice(&link.nc);
        let mut out = std::mem::take(&mut self.scratch);
        let mut epoch = 0;
        match link.session.as_ref() {
            Some(session) => {
                let Some(seq) = session.ledger.next_seq() else {
                    stats.datagrams_send_dropped += 1;
                    self.scratch = out;
                    return;
                };
                epoch = session.epoch;
                body[NONCE_LEN..].copy_from_slice(&session.ledger.tally().encode());
                encode_single(
                    DatagramKind::Hello,
                    (link.session_id, epoch, seq, FLAG_KEYED),
                    &body,
                    session.up_key.as_ref(),
                    &mut out,
                );
            }
            None => {
                body[NONCE_LEN..].copy_from_slice(&Tally::default().encode());
                encode_single(
                    DatagramKind::Hello,
                    (link.session_id, 0, 0, 0),
                    &body,
                    self.hello_key.as_ref(),
                    &mut out,
                );
            }
        }
        let addr = link.addr;
        let bytes = out.clone();
        self.scratch = out;
        if self.send(s, epoch, addr, bytes, 0, stats) {
            if let Some(session) = self.links[s].session.as_mut() {
                session.ledger.commit(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        assert!(matches!(
            ControlClient::new(ClientConfig::new(vec![])),
            Err(ControlError::NoServers)
        ));
        let addr: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
        let mut c = ClientConfig::new(vec![addr]);
        c.connections_per_server = 0;
        assert!(matches!(
            ControlClient::new(c.clone()),
            Err(ControlError::BadConnectionCount(0))
        ));
        c.connections_per_server = 17;
        assert!(matches!(
            ControlClient::new(c),
            Err(ControlError::BadConnectionCount(17))
        ));
        let many = ClientConfig::new(vec![addr; 33]);
        assert!(matches!(
            ControlClient::new(many),
            Err(ControlError::TooManyServers(33))
        ));
    }

    #[test]
    fn nothing_is_sent_while_down() {
        // Port 9 (discard) on loopback is closed here: every attempt is refused.
        let addr: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
        for transport in [Transport::Tcp, Transport::Udp] {
            let mut config = ClientConfig::new(vec![addr]);
            config.transport = transport;
            let mut client = ControlClient::new(config).unwrap();
            let key = FlowKey::new(
                "10.0.0.1:40000".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap(),
            );
            assert!(!client.client_add(key));
            assert_eq!(client.stats().messages_dropped, 1);
            assert!(client.all_down());
            assert!(!client.should_exit());
            assert!(!client.is_connected(addr));
            assert_eq!(
                client.udp_local_addr().is_some(),
                transport == Transport::Udp
            );
        }
    }
}
