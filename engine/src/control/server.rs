//! The intercept side of the control channel: accepts tcpcopys over TCP (byte-compatible with
//! the C tools) or UDP (see [`udp`](crate::control::udp)), optionally authenticated (see
//! [`auth`](crate::control::auth)), decodes their hello and route messages, and sends response
//! records back in batches.
//!
//! Unlike the C intercept (blocking writes: one slow tcpcopy stalls everything) every TCP
//! connection has its own bounded backlog; records that do not fit are dropped and counted, so
//! a slow tcpcopy only loses its own responses. Over UDP nothing ever waits: a slow tcpcopy
//! loses datagrams at its own socket, and counts them.
//!
//! A UDP tcpcopy is a *peer*, identified by its session id and known by the address of its
//! latest (authenticated) datagram; it gets a [`ConnId`] like a TCP connection, is reported
//! `Connected` once its session is confirmed, and `Disconnected` when it has been silent for
//! [`ServerConfig::udp_peer_timeout`]. With authentication a TCP connection is reported
//! `Connected` only after tcpcopy proved the secret; a refused one is never reported and is
//! counted in `auth_refused`.
//!
//! One thread owns a [`ControlServer`]. Its [`poll`](ControlServer::poll) also waits on file
//! descriptors the pipeline registers (the capture socket), reporting them as
//! [`ServerEvent::Readable`]. Typical loop:
//!
//! ```no_run
//! # use engine::control::{ControlServer, RecordFormat, Framing, ServerEvent};
//! # fn main() -> Result<(), engine::control::ControlError> {
//! let mut server = ControlServer::bind(
//!     "0.0.0.0:36524".parse().unwrap(), RecordFormat::Header64, Framing::Combined)?;
//! let mut events = Vec::new();
//! loop {
//!     server.poll(Some(std::time::Duration::from_millis(500)), &mut |e| events.push(e))?;
//!     for event in events.drain(..) {
//!         // route messages, drain the capture socket, then server.send_record(conn, &record)
//!     }
//!     server.flush_due(std::time::Instant::now());
//! }
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::control::auth::{random_nonce, MacKey, Secret, ServerHandshake, ServerStep, NONCE_LEN};
use crate::control::codec::{
    BatchEncoder, ClientMessage, CodecError, Framing, MessageDecoder, RecordFormat,
    CLIENT_MESSAGE_LEN, INTERNAL_VERSION,
};
use crate::control::outbuf::OutBuf;
use crate::control::rxdrops::RxDrops;
use crate::control::udp::{
    encode_single, epoch_of, Datagram, DatagramBuilder, DatagramKind, Ledger, UdpError,
    HELLO_ACK_BODY_LEN, MAX_DATAGRAM,
};
use crate::control::{ControlError, Transport};

/// How long a partly filled batch may wait before it is written (`CHECK_INTERVAL`).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(2);
/// Default bound on one connection's unsent bytes.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 4 << 20;
/// Default bound on simultaneous tcpcopy connections (`MAX_FD_NUM`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default time a TCP peer has to complete the authentication handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default silence after which a UDP tcpcopy is forgotten (its routes go).
pub const DEFAULT_UDP_PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on connections (UDP: peers) from one address.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 64;
/// Default time a TCP peer has, from its connect, to send the hello (after authentication).
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default opening HELLOs of new UDP sessions answered per second (and burst).
pub const DEFAULT_NEW_UDP_SESSIONS_PER_SECOND: u32 = 512;
/// Default route messages read per second from one TCP connection (and burst): a tcpcopy
/// replaying 100,000 new sessions a second sends about that many per connection.
pub const DEFAULT_MAX_MESSAGES_PER_SECOND: u32 = 500_000;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// Connection tokens are `CONN_BASE + slot`; caller tokens must stay below.
const CONN_BASE: usize = 1 << (usize::BITS - 2);
const READ_CHUNK: usize = 16 * 1024;
const EXPIRY_CHECK: Duration = Duration::from_millis(100);
const AUTH_MISMATCH: &str = "authentication on one side only";
const AUTH_BAD_HELLO: &str = "bad MAC on an opening HELLO (another secret)";

/// A tcpcopy connection (or UDP peer). The id of a closed connection is never reused (a
/// generation count guards the slot), so a stale route cannot reach a newer connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    slot: u32,
    generation: u32,
}

impl ConnId {
    /// An id from its slot and generation (for tests and tables keyed by id).
    pub const fn from_parts(slot: u32, generation: u32) -> ConnId {
        ConnId { slot, generation }
    }

    /// The slot index (reused after the connection closes).
    pub const fn slot(self) -> u32 {
        self.slot
    }

    /// The generation of the slot.
    pub const fn generation(self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn{}.{}", self.slot, self.generation)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What [`ControlServer::poll`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// A tcpcopy connected (and, with authentication, proved the secret) from this address.
    Connected(ConnId, SocketAddr),
    /// A message after the hello: `CLIENT_ADD`, `CLIENT_DEL` or an unknown type (log and
    /// ignore it).
    Message(ConnId, ClientMessage),
    /// The connection is gone (EOF, error, protocol error, UDP silence); drop its routes.
    Disconnected(ConnId),
    /// A descriptor registered with [`ControlServer::register_fd`] is readable. Readiness is
    /// edge-triggered: read it until `EAGAIN`, or no further event comes.
    Readable(usize),
}

/// Settings of a [`ControlServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address (`-b`:`-p`, default `0.0.0.0:36524`).
    pub addr: SocketAddrV4,
    /// Record format sent (must match the tcpcopy).
    pub format: RecordFormat,
    /// Framing sent over TCP (must match the tcpcopy).
    pub framing: Framing,
    /// Bound on one TCP connection's unsent bytes, or on the datagrams waiting for the UDP
    /// socket.
    pub max_buffer_bytes: usize,
    /// Longest time a partly filled batch waits.
    pub flush_interval: Duration,
    /// Most simultaneous connections (UDP: peers); more are refused (counted).
    pub max_connections: usize,
    /// TCP (default) or UDP.
    pub transport: Transport,
    /// The shared secret; `None` (default): no authentication, the C tools' byte format.
    pub auth: Option<Secret>,
    /// Time a TCP peer has to complete the authentication handshake.
    pub handshake_timeout: Duration,
    /// UDP: a tcpcopy silent this long is forgotten (reported `Disconnected`).
    pub udp_peer_timeout: Duration,
    /// Most connections (UDP: peers) from one address; more are refused (counted).
    pub max_per_address: usize,
    /// Time a TCP peer has, from its connect, to send its hello; then it is closed.
    pub hello_timeout: Duration,
    /// UDP: opening HELLOs of new sessions answered per second (a token bucket with as big a
    /// burst); more are dropped (counted), so spoofed HELLOs neither fill the peer slots
    /// faster than that nor turn intercept into a reflector. Unconfirmed peers may hold at
    /// most a quarter of `max_connections`.
    pub new_udp_sessions_per_second: u32,
    /// Route messages read per second from one TCP connection (a token bucket with as big a
    /// burst): a connection over it is not read until it has tokens again, so TCP flow control
    /// slows the sender and one peer's flood cannot monopolise the control thread and the
    /// route replicas. 0: no limit.
    pub max_messages_per_second: u32,
}

impl ServerConfig {
    /// Defaults (TCP, no authentication) for everything but the address and the format.
    pub fn new(addr: SocketAddrV4, format: RecordFormat, framing: Framing) -> ServerConfig {
        ServerConfig {
            addr,
            format,
            framing,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            transport: Transport::Tcp,
            auth: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            udp_peer_timeout: DEFAULT_UDP_PEER_TIMEOUT,
            max_per_address: DEFAULT_MAX_PER_ADDRESS,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            new_udp_sessions_per_second: DEFAULT_NEW_UDP_SESSIONS_PER_SECOND,
            max_messages_per_second: DEFAULT_MAX_MESSAGES_PER_SECOND,
        }
    }
}

/// Counters of a [`ControlServer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections (UDP: confirmed peers) currently open.
    pub connections_up: u64,
    /// Connections accepted (UDP: peers confirmed) in total.
    pub connections_accepted: u64,
    /// Connections closed at once (UDP: peers not admitted) because of `max_connections`.
    pub connections_refused: u64,
    /// Connections lost or closed (UDP: peers forgotten).
    pub disconnects: u64,
    /// Connections (UDP: new peers) refused because their address has `max_per_address`.
    pub refused_per_address: u64,
    /// TCP connections closed because no hello came within `hello_timeout`.
    pub hello_timeouts: u64,
    /// UDP opening HELLOs of new sessions left unanswered: over the rate, or too many
    /// unconfirmed peers.
    pub hellos_unanswered: u64,
    /// Times a TCP connection was left unread for a while: it sent route messages faster than
    /// `max_messages_per_second`.
    pub throttled: u64,
    /// Hellos received (TCP: the version message; UDP: HELLO datagrams accepted).
    pub hellos: u64,
    /// Hellos with a version other than 6 (accepted with a warning, like the C intercept).
    pub version_mismatches: u64,
    /// Connections closed because the first message was not a hello.
    pub peers_too_old: u64,
    /// Messages received after the hello.
    pub messages_received: u64,
    /// Records accepted into a batch (less those whose batch the backlog or the UDP socket
    /// then refused: those count in `records_dropped`).
    pub records_queued: u64,
    /// Records dropped because their connection's backlog was full (UDP: the socket refused
    /// their datagram).
    pub records_dropped: u64,
    /// Records for a connection that no longer exists (or is not confirmed).
    pub records_no_connection: u64,
    /// Records of the wrong size.
    pub records_bad_length: u64,
    /// Batches moved to a connection's output (UDP: datagrams of records).
    pub batches: u64,
    /// Bytes written to sockets.
    pub bytes_sent: u64,
    /// Peers that proved the secret.
    pub auth_ok: u64,
    /// Peers refused by authentication: TCP: no handshake (e.g. a C tcpcopy), a wrong secret,
    /// a handshake not finished in time; UDP: opening HELLOs without a MAC or with a MAC of
    /// another secret (also counted in `datagrams_rejected`, with every other datagram whose
    /// MAC does not verify).
    pub auth_refused: u64,
    /// UDP datagrams received and accepted.
    pub datagrams_received: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams from tcpcopys lost on the way: gaps in their sequence numbers (late
    /// arrivals are taken back; a gap at the tail is seen by the next keepalive), less those
    /// the tcpcopy reported it never sent and those our own socket dropped
    /// (`datagrams_receive_dropped`).
    pub datagrams_lost: u64,
    /// UDP datagrams that arrived after a later one.
    pub datagrams_reordered: u64,
    /// UDP datagrams dropped as duplicates or replays.
    pub datagrams_replayed: u64,
    /// UDP datagrams rejected: malformed, wrong MAC (forged or another secret), unknown
    /// session or epoch, wrong direction.
    pub datagrams_rejected: u64,
    /// UDP datagrams not sent: the socket's queue was full or the send failed.
    pub datagrams_send_dropped: u64,
    /// UDP datagrams our socket dropped on arrival, its receive buffer full (the kernel's
    /// count for the socket, from `/proc`, refreshed every 100 ms).
    pub datagrams_receive_dropped: u64,
    /// Route messages the tcpcopys sent (as their keepalive tallies say) that never arrived:
    /// in datagrams lost on the way or dropped by our socket.
    pub messages_lost: u64,
}

/// Keys and sequence state of one UDP session of a peer.
#[derive(Debug)]
struct PeerSession {
    nc: [u8; NONCE_LEN],
    ni: [u8; NONCE_LEN],
    epoch: u64,
    up_key: Option<MacKey>,
    down_key: Option<MacKey>,
    ledger: Ledger,
}

#[derive(Debug)]
struct UdpPeer {
    session_id: u64,
    current: Option<PeerSession>,
    pending: Option<PeerSession>,
    batch: DatagramBuilder,
    last_heard: Instant,
}

#[derive(Debug)]
struct TcpConn {
    stream: TcpStream,
    decoder: MessageDecoder,
    batch: BatchEncoder,
    out: OutBuf,
    handshake: Option<(Box<ServerHandshake>, Instant)>,
    /// The hello must come by then (cleared when it does).
    hello_by: Option<Instant>,
    /// Message tokens left ([`ServerConfig::max_messages_per_second`]), counted at `tokens_at`.
    tokens: f64,
    tokens_at: Instant,
}

#[derive(Debug)]
enum Link {
    Tcp(TcpConn),
    Udp(Box<UdpPeer>),
}

#[derive(Debug)]
struct Conn {
    peer: SocketAddr,
    /// The address counted against [`ServerConfig::max_per_address`] (the first `peer`; a
    /// UDP peer's `peer` may move).
    address: std::net::IpAddr,
    batch_started: Instant,
    /// Reported `Connected` (so `Disconnected` is owed when it goes).
    announced: bool,
    link: Link,
}

impl Conn {
    fn batch_is_empty(&self) -> bool {
        match &self.link {
            Link::Tcp(t) => t.batch.is_empty(),
            Link::Udp(u) => u.batch.is_empty(),
        }
    }
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

#[derive(Debug)]
enum Endpoint {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// The intercept end of the control channel (see the module docs).
#[derive(Debug)]
pub struct ControlServer {
    poll: Poll,
    events: Events,
    ready: Vec<(Token, bool, bool)>,
    waker: Arc<Waker>,
    endpoint: Endpoint,
    local_addr: SocketAddrV4,
    config: ServerConfig,
    slots: Vec<Slot>,
    free: Vec<u32>,
    read_buf: Box<[u8]>,
    lost: Vec<ConnId>,
    clock: Instant,
    stats: ServerStats,
    /// UDP: peers by session id.
    peers: HashMap<u64, u32>,
    /// UDP: datagrams waiting for the socket, bounded by `max_buffer_bytes`.
    send_queue: VecDeque<Queued>,
    queued_bytes: usize,
    hello_key: Option<MacKey>,
    scratch: Vec<u8>,
    last_expiry: Instant,
    /// Ledger counters of UDP sessions that ended.
    past_lost: u64,
    past_reordered: u64,
    past_replayed: u64,
    past_messages_lost: u64,
    /// UDP: what the socket's full receive buffer dropped.
    rx_drops: Option<RxDrops>,
    /// Connections (UDP: peers) per address.
    per_address: HashMap<std::net::IpAddr, usize>,
    /// UDP peers not confirmed yet (no keyed HELLO or message of their session).
    udp_unconfirmed: usize,
    /// UDP: tokens for answering opening HELLOs of new sessions, and when they were counted.
    hello_tokens: f64,
    hello_tokens_at: Instant,
    /// TCP connections left unread for lack of message tokens (read again when they refill).
    throttled: Vec<u32>,
}

/// A datagram waiting for the socket: numbered for the session `(session_id, epoch)`, with
/// `items` records.
#[derive(Debug)]
struct Queued {
    to: SocketAddr,
    bytes: Vec<u8>,
    session_id: u64,
    epoch: u64,
    items: usize,
}

impl ControlServer {
    /// Listens on `addr` (SO_REUSEADDR) with default settings (TCP).
    ///
    /// # Errors
    /// [`ControlError::Bind`] naming the address and the cause (e.g. address in use).
    pub fn bind(
        addr: SocketAddrV4,
        format: RecordFormat,
        framing: Framing,
    ) -> Result<ControlServer, ControlError> {
        ControlServer::with_config(ServerConfig::new(addr, format, framing))
    }

    /// Listens as `config` says.
    ///
    /// # Errors
    /// [`ControlError::Bind`] if the address cannot be listened on, [`ControlError::Io`] if
    /// the poller cannot be created.
    pub fn with_config(config: ServerConfig) -> Result<ControlServer, ControlError> {
        let poll = Poll::new().map_err(|e| ControlError::io("creating the poller", e))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| ControlError::io("creating the waker", e))?;
        let bind_err = |source| ControlError::Bind {
            addr: config.addr,
            source,
        };
        let (mut endpoint, local) = match config.transport {
            Transport::Tcp => {
                let l = TcpListener::bind(SocketAddr::V4(config.addr)).map_err(bind_err)?;
                let a = l.local_addr().map_err(bind_err)?;
                (Endpoint::Tcp(l), a)
            }
            Transport::Udp => {
                let s = UdpSocket::bind(SocketAddr::V4(config.addr)).map_err(bind_err)?;
                let a = s.local_addr().map_err(bind_err)?;
                (Endpoint::Udp(s), a)
            }
        };
        let rx_drops = match &endpoint {
            Endpoint::Udp(socket) => Some(RxDrops::new(socket)),
            Endpoint::Tcp(_) => None,
        };
        let local_addr = match local {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => config.addr,
        };
        let registered = match &mut endpoint {
            Endpoint::Tcp(l) => poll.registry().register(l, LISTENER, Interest::READABLE),
            Endpoint::Udp(s) => {
                poll.registry()
                    .register(s, LISTENER, Interest::READABLE | Interest::WRITABLE)
            }
        };
        registered.map_err(|e| ControlError::io("registering the listener", e))?;
        info!(addr = %local_addr, transport = %config.transport,
            authenticated = config.auth.is_some(), "control channel listening");
        let now = Instant::now();
        let config_rate = config.new_udp_sessions_per_second;
        Ok(ControlServer {
            poll,
            events: Events::with_capacity(256),
            ready: Vec::with_capacity(256),
            waker: Arc::new(waker),
            endpoint,
            local_addr,
            hello_key: config.auth.as_ref().map(Secret::udp_hello_key),
            config,
            slots: Vec::new(),
            free: Vec::new(),
            read_buf: vec![0; READ_CHUNK.max(MAX_DATAGRAM * 2)].into_boxed_slice(),
            lost: Vec::new(),
            clock: now,
            stats: ServerStats::default(),
            peers: HashMap::new(),
            send_queue: VecDeque::new(),
            queued_bytes: 0,
            scratch: Vec::with_capacity(MAX_DATAGRAM),
            last_expiry: now,
            past_lost: 0,
            past_reordered: 0,
            past_replayed: 0,
            past_messages_lost: 0,
            rx_drops,
            per_address: HashMap::new(),
            udp_unconfirmed: 0,
            hello_tokens: f64::from(config_rate),
            hello_tokens_at: now,
            throttled: Vec::new(),
        })
    }

    /// The address listened on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        let mut s = self.stats;
        let mut gaps = self.past_lost;
        s.datagrams_reordered = self.past_reordered;
        s.datagrams_replayed = self.past_replayed;
        s.messages_lost = self.past_messages_lost;
        for slot in &self.slots {
            if let Some(Conn {
                link: Link::Udp(p), ..
            }) = &slot.conn
            {
                for sess in p.current.iter().chain(p.pending.iter()) {
                    let l = &sess.ledger;
                    gaps = gaps.saturating_add(l.lost());
                    s.datagrams_reordered =
                        s.datagrams_reordered.saturating_add(l.window.reordered);
                    s.datagrams_replayed = s.datagrams_replayed.saturating_add(l.window.rejected);
                    s.messages_lost = s.messages_lost.saturating_add(l.items_lost());
                }
            }
        }
        // What our socket dropped shows as gaps too: it was not lost on the way.
        s.datagrams_receive_dropped = self.rx_drops.as_ref().map_or(0, RxDrops::total);
        s.datagrams_lost = gaps.saturating_sub(s.datagrams_receive_dropped);
        s
    }

    /// A handle another thread can use to interrupt [`poll`](Self::poll).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Also waits for `fd` to become readable, reported as `ServerEvent::Readable(token_id)`.
    /// Edge-triggered: after each event read `fd` until `EAGAIN`. The caller keeps `fd` open
    /// until [`deregister_fd`](Self::deregister_fd).
    ///
    /// # Errors
    /// [`ControlError::TokenOutOfRange`] for a token id of 2^62 or more; the OS error
    /// otherwise.
    pub fn register_fd(&mut self, fd: RawFd, token_id: usize) -> Result<(), ControlError> {
        if token_id >= CONN_BASE {
            return Err(ControlError::TokenOutOfRange(token_id));
        }
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(token_id), Interest::READABLE)
            .map_err(|e| ControlError::io("registering a descriptor", e))
    }

    /// Stops waiting on `fd`.
    ///
    /// # Errors
    /// The OS error.
    pub fn deregister_fd(&mut self, fd: RawFd) -> Result<(), ControlError> {
        self.poll
            .registry()
            .deregister(&mut SourceFd(&fd))
            .map_err(|e| ControlError::io("deregistering a descriptor", e))
    }

    /// Connections (UDP: peers) open, confirmed or not.
    pub fn connection_count(&self) -> usize {
        self.slots.iter().filter(|s| s.conn.is_some()).count()
    }

    /// Whether `conn` is open.
    pub fn is_connected(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some()
    }

    /// The peer address of `conn` (UDP: of its latest authenticated datagram).
    pub fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conn(conn).map(|c| c.peer)
    }

    /// Unsent bytes of `conn` (its backlog, not counting the open batch; UDP: the socket's
    /// shared queue).
    pub fn backlog(&self, conn: ConnId) -> usize {
        self.conn(conn).map_or(0, |c| match &c.link {
            Link::Tcp(t) => t.out.pending(),
            Link::Udp(_) => self.queued_bytes,
        })
    }

    /// Waits up to `timeout` (shortened to the next batch deadline), accepts connections,
    /// reads messages, writes backlogs, and reports what happened through `on_event`; then
    /// writes batches that are due. Connections lost outside `poll` (write errors in
    /// [`send_record`](Self::send_record)) are reported at the start of the next call.
    ///
    /// # Errors
    /// Only a failure of the poller itself.
    pub fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(ServerEvent),
    ) -> Result<(), ControlError> {
        for id in self.lost.drain(..) {
            on_event(ServerEvent::Disconnected(id));
        }
        let mut deadline = self.next_flush_deadline();
        if !self.throttled.is_empty() {
            // Throttled connections are read again as their tokens come back.
            let soon = Instant::now() + Duration::from_millis(5);
            deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
        }
        super::wait_ready(
            &mut self.poll,
            &mut self.events,
            &mut self.ready,
            timeout,
            deadline,
        )?;
        for i in 0..self.ready.len() {
            let (token, readable, writable) = self.ready[i];
            match token {
                LISTENER => match self.endpoint {
                    Endpoint::Tcp(_) => self.accept(on_event),
                    Endpoint::Udp(_) => {
                        if writable {
                            self.drain_queue();
                        }
                        if readable {
                            self.udp_read(on_event);
                        }
                    }
                },
                WAKER => {}
                Token(t) if t >= CONN_BASE => {
                    let slot = (t - CONN_BASE) as u32;
                    if writable {
                        self.write_conn(slot);
                    }
                    if readable {
                        self.read_conn(slot, on_event);
                    }
                }
                Token(t) => on_event(ServerEvent::Readable(t)),
            }
        }
        for slot in std::mem::take(&mut self.throttled) {
            self.read_conn(slot, on_event);
        }
        self.flush_due(Instant::now());
        for id in self.lost.drain(..) {
            on_event(ServerEvent::Disconnected(id));
        }
        Ok(())
    }

    /// Adds one record (exactly `format.record_len()` bytes) to `conn`'s batch; a full batch
    /// is written at once, a partial one by [`flush_due`](Self::flush_due). `false` if the
    /// record was dropped (connection gone or not confirmed, backlog full, wrong size; all
    /// counted).
    pub fn send_record(&mut self, conn: ConnId, record: &[u8]) -> bool {
        if record.len() != self.config.format.record_len() {
            self.stats.records_bad_length += 1;
            return false;
        }
        let clock = self.clock;
        let slot = match self.slots.get_mut(conn.slot as usize) {
            Some(s)
                if s.generation == conn.generation
                    && s.conn.as_ref().is_some_and(|c| c.announced) =>
            {
                s
            }
            _ => {
                self.stats.records_no_connection += 1;
                return false;
            }
        };
        let Some(c) = slot.conn.as_mut() else {
            return false;
        };
        if c.batch_is_empty() {
            c.batch_started = clock;
        }
        let pushed = match &mut c.link {
            Link::Tcp(t) => {
                if !t.out.fits(t.batch.bytes().len() + t.batch.push_cost()) {
                    self.stats.records_dropped += 1;
                    return false;
                }
                t.batch.push(record).map_err(|_| ())
            }
            Link::Udp(u) => u.batch.push(record),
        };
        match pushed {
            Ok(full) => {
                self.stats.records_queued += 1;
                if full {
                    self.flush_batch(conn.slot);
                }
                true
            }
            Err(()) => {
                self.stats.records_bad_length += 1;
                false
            }
        }
    }

    /// Writes every batch that has waited for the flush interval at `now`, and (UDP) forgets
    /// silent peers, (TCP) refuses handshakes that took too long. Call it at least every
    /// interval (see [`next_flush_deadline`](Self::next_flush_deadline)); `poll` calls it too.
    pub fn flush_due(&mut self, now: Instant) {
        self.clock = now;
        let interval = self.config.flush_interval;
        for slot in 0..self.slots.len() {
            let due = self.slots[slot].conn.as_ref().is_some_and(|c| {
                !c.batch_is_empty() && now.saturating_duration_since(c.batch_started) >= interval
            });
            if due {
                self.flush_batch(slot as u32);
            }
        }
        if now.saturating_duration_since(self.last_expiry) >= EXPIRY_CHECK {
            self.last_expiry = now;
            self.expire(now);
            if let Some(d) = self.rx_drops.as_mut() {
                d.refresh();
            }
        }
    }

    /// Writes every open batch now (e.g. when the capture socket is drained).
    pub fn flush_all(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot]
                .conn
                .as_ref()
                .is_some_and(|c| !c.batch_is_empty())
            {
                self.flush_batch(slot as u32);
            }
        }
    }

    /// When the oldest open batch becomes due, if any.
    pub fn next_flush_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .filter(|c| !c.batch_is_empty())
            .map(|c| c.batch_started + self.config.flush_interval)
            .min()
    }

    /// Closes `conn` (reported as `Disconnected` by the next `poll`).
    pub fn disconnect(&mut self, conn: ConnId) {
        if self.is_connected(conn) {
            self.close(conn.slot, "closed by intercept");
        }
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.conn.as_ref()
    }

    fn id_of(&self, slot: u32) -> ConnId {
        ConnId {
            slot,
            generation: self.slots[slot as usize].generation,
        }
    }

    /// Counts a new connection (UDP: peer) from `peer` against its address's share; false
    /// (counted) when the address has its share already.
    fn admit_address(&mut self, peer: SocketAddr) -> bool {
        let held = self.per_address.entry(peer.ip()).or_default();
        if *held >= self.config.max_per_address {
            self.stats.refused_per_address += 1;
            return false;
        }
        *held += 1;
        true
    }

    /// Gives `address` its share back.
    fn release_address(&mut self, address: std::net::IpAddr) {
        if let Some(held) = self.per_address.get_mut(&address) {
            *held -= 1;
            if *held == 0 {
                self.per_address.remove(&address);
            }
        }
    }

    /// Takes a token for answering an opening HELLO of a new UDP session at `now`.
    fn take_hello_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.config.new_udp_sessions_per_second.max(1));
        let elapsed = now
            .saturating_duration_since(self.hello_tokens_at)
            .as_secs_f64();
        self.hello_tokens = (self.hello_tokens + elapsed * rate).min(rate);
        self.hello_tokens_at = now;
        if self.hello_tokens >= 1.0 {
            self.hello_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn alloc_slot(&mut self) -> u32 {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn announce(&mut self, slot: u32, on_event: &mut dyn FnMut(ServerEvent)) {
        let id = self.id_of(slot);
        let Some(c) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if c.announced {
            return;
        }
        c.announced = true;
        if matches!(c.link, Link::Udp(_)) {
            self.udp_unconfirmed = self.udp_unconfirmed.saturating_sub(1);
        }
        let peer = c.peer;
        self.stats.connections_accepted += 1;
        self.stats.connections_up += 1;
        info!(%peer, conn = %id, "tcpcopy connected");
        on_event(ServerEvent::Connected(id, peer));
    }

    fn accept(&mut self, on_event: &mut dyn FnMut(ServerEvent)) {
        loop {
            let Endpoint::Tcp(listener) = &self.endpoint else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.add_conn(stream, peer, on_event),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; retry on the
                    // next readiness.
                    warn!(addr = %self.local_addr, error = %e, "cannot accept a control connection");
                    break;
                }
            }
        }
    }

    fn add_conn(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        on_event: &mut dyn FnMut(ServerEvent),
    ) {
        if self.connection_count() >= self.config.max_connections {
            self.stats.connections_refused += 1;
            warn!(%peer, max = self.config.max_connections, "too many control connections, refusing");
            return;
        }
        if !self.admit_address(peer) {
            warn!(%peer, max = self.config.max_per_address,
                "too many control connections from one address, refusing");
            return;
        }
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let handshake = match &self.config.auth {
            None => None,
            Some(secret) => match ServerHandshake::start(secret) {
                Ok(h) => Some((Box::new(h), self.clock + self.config.handshake_timeout)),
                Err(e) => {
                    warn!(%peer, error = %e, "cannot authenticate a control connection");
                    self.release_address(peer.ip());
                    return;
                }
            },
        };
        let slot = self.alloc_slot();
        let token = Token(CONN_BASE + slot as usize);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(%peer, error = %e, "cannot register a control connection");
            self.free.push(slot);
            self.release_address(peer.ip());
            return;
        }
        let authenticating = handshake.is_some();
        self.slots[slot as usize].conn = Some(Conn {
            peer,
            address: peer.ip(),
            batch_started: self.clock,
            announced: false,
            link: Link::Tcp(TcpConn {
                stream,
                decoder: MessageDecoder::new(),
                batch: BatchEncoder::new(self.config.format, self.config.framing),
                out: OutBuf::new(self.config.max_buffer_bytes),
                handshake,
                hello_by: Some(self.clock + self.config.hello_timeout),
                tokens: f64::from(self.config.max_messages_per_second),
                tokens_at: self.clock,
            }),
        });
        if authenticating {
            debug!(%peer, "tcpcopy connecting; waiting for its authentication");
        } else {
            self.announce(slot, on_event);
        }
    }

    fn read_conn(&mut self, slot: u32, on_event: &mut dyn FnMut(ServerEvent)) {
        let id = self.id_of(slot);
        loop {
            let Some(Conn {
                link: Link::Tcp(c),
                peer,
                ..
            }) = self.slots[slot as usize].conn.as_mut()
            else {
                return;
            };
            let peer = *peer;
            let rate = self.config.max_messages_per_second;
            if rate > 0 {
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(c.tokens_at).as_secs_f64();
                c.tokens = (c.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
                c.tokens_at = now;
                if c.tokens < 1.0 {
                    // Left unread: TCP flow control slows the sender; read again soon.
                    if !self.throttled.contains(&slot) {
                        self.throttled.push(slot);
                        self.stats.throttled += 1;
                    }
                    return;
                }
            }
            let n = match c.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    self.close(slot, "closed by peer");
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(slot, &e.to_string());
                    return;
                }
            };
            let mut start = 0;
            if let Some((handshake, _)) = c.handshake.as_mut() {
                let (respond, done) = match handshake.feed(&self.read_buf[..n]) {
                    Ok(ServerStep::NeedMore { respond }) => (respond, None),
                    Ok(ServerStep::Done { respond, consumed }) => (respond, Some(consumed)),
                    Err(e) => {
                        warn!(%peer, reason = %e, "tcpcopy refused: authentication failed");
                        self.close(slot, &e.to_string());
                        return;
                    }
                };
                if let Some(r) = respond {
                    c.out.push(&r);
                    if let Err(e) = c.out.write_to(&mut c.stream) {
                        self.close(slot, &e.to_string());
                        return;
                    }
                }
                let Some(consumed) = done else {
                    continue;
                };
                c.handshake = None;
                start = consumed;
                self.stats.auth_ok += 1;
                self.announce(slot, on_event);
            }
            let Some(Conn {
                link: Link::Tcp(c), ..
            }) = self.slots[slot as usize].conn.as_mut()
            else {
                return;
            };
            let result = c.decoder.feed(&self.read_buf[start..n], |m| {
                on_event(ServerEvent::Message(id, m))
            });
            if let Ok(info) = &result {
                c.tokens -= info.messages as f64;
            }
            match result {
                Ok(info) => {
                    self.stats.messages_received += info.messages as u64;
                    if let Some(version) = info.hello_version {
                        if let Some(Conn {
                            link: Link::Tcp(c), ..
                        }) = self.slots[slot as usize].conn.as_mut()
                        {
                            c.hello_by = None;
                        }
                        self.stats.hellos += 1;
                        if version != INTERNAL_VERSION {
                            self.stats.version_mismatches += 1;
                            warn!(%peer, version, expected = INTERNAL_VERSION,
                                "tcpcopy speaks another protocol version; carrying on");
                        } else {
                            debug!(%peer, "hello received");
                        }
                    }
                }
                Err(e) => {
                    if matches!(e, CodecError::PeerTooOld { .. }) {
                        self.stats.peers_too_old += 1;
                    }
                    self.close(slot, &e.to_string());
                    return;
                }
            }
        }
    }

    fn write_conn(&mut self, slot: u32) {
        let Some(Conn {
            link: Link::Tcp(c), ..
        }) = self.slots[slot as usize].conn.as_mut()
        else {
            return;
        };
        if c.out.pending() == 0 {
            return;
        }
        match c.out.write_to(&mut c.stream) {
            Ok(n) => self.stats.bytes_sent += n as u64,
            Err(e) => self.close(slot, &e.to_string()),
        }
    }

    /// Moves `slot`'s open batch to its output and writes what the socket takes.
    fn flush_batch(&mut self, slot: u32) {
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        let peer = conn.peer;
        match &mut conn.link {
            Link::Tcp(c) => {
                if c.batch.is_empty() {
                    return;
                }
                // Room was checked when each record was added.
                let pushed = c.out.push(c.batch.bytes());
                let records = c.batch.count();
                c.batch.clear();
                if !pushed {
                    self.stats.records_dropped += records as u64;
                    self.stats.records_queued =
                        self.stats.records_queued.saturating_sub(records as u64);
                    return;
                }
                self.stats.batches += 1;
                match c.out.write_to(&mut c.stream) {
                    Ok(n) => self.stats.bytes_sent += n as u64,
                    Err(e) => self.close(slot, &e.to_string()),
                }
            }
            Link::Udp(p) => {
                if p.batch.is_empty() {
                    return;
                }
                let records = p.batch.count();
                let numbered = p
                    .current
                    .as_ref()
                    .and_then(|x| Some((x, x.ledger.next_seq()?)));
                let Some((session, seq)) = numbered else {
                    p.batch.clear();
                    self.stats.records_no_connection += records as u64;
                    return;
                };
                let (session_id, epoch) = (p.session_id, session.epoch);
                let bytes = p
                    .batch
                    .finish(session_id, epoch, seq, 0, session.down_key.as_ref())
                    .to_vec();
                p.batch.clear();
                self.stats.batches += 1;
                if self.udp_send(peer, bytes, session_id, epoch, records) {
                    // The number is used only by a datagram the socket took.
                    if let Some(s) = self.udp_session(session_id, epoch) {
                        s.ledger.commit(records as u64);
                    }
                } else {
                    self.stats.records_dropped += records as u64;
                    self.stats.records_queued =
                        self.stats.records_queued.saturating_sub(records as u64);
                }
            }
        }
    }

    fn close(&mut self, slot: u32, reason: &str) {
        let id = self.id_of(slot);
        let entry = &mut self.slots[slot as usize];
        let Some(c) = entry.conn.take() else {
            return;
        };
        entry.generation = entry.generation.wrapping_add(1);
        let unsent = match c.link {
            Link::Tcp(mut t) => {
                let _ = self.poll.registry().deregister(&mut t.stream);
                if t.handshake.is_some() {
                    // Gone before proving the secret: refused (wrong secret, no handshake,
                    // too slow, or it hung up on our proof).
                    self.stats.auth_refused += 1;
                }
                t.out.pending() + t.batch.bytes().len()
            }
            Link::Udp(p) => {
                self.peers.remove(&p.session_id);
                if !c.announced {
                    self.udp_unconfirmed = self.udp_unconfirmed.saturating_sub(1);
                }
                for s in p.current.iter().chain(p.pending.iter()) {
                    self.fold(s);
                }
                p.batch.count() * self.config.format.record_len()
            }
        };
        self.free.push(slot);
        self.release_address(c.address);
        if c.announced {
            warn!(peer = %c.peer, conn = %id, reason, unsent_bytes = unsent, "tcpcopy connection lost");
            self.stats.disconnects += 1;
            self.stats.connections_up -= 1;
            self.lost.push(id);
        } else {
            debug!(peer = %c.peer, conn = %id, reason, "unconfirmed tcpcopy connection closed");
        }
    }

    /// Refuses TCP handshakes past their deadline and forgets silent UDP peers.
    fn expire(&mut self, now: Instant) {
        let timeout = self.config.udp_peer_timeout;
        for slot in 0..self.slots.len() {
            let Some(c) = self.slots[slot].conn.as_ref() else {
                continue;
            };
            match &c.link {
                Link::Tcp(t) => {
                    if t.handshake.as_ref().is_some_and(|(_, d)| now >= *d) {
                        warn!(peer = %c.peer, "tcpcopy refused: no authentication in time");
                        self.close(slot as u32, "authentication timed out");
                    } else if t.hello_by.is_some_and(|d| now >= d) {
                        warn!(peer = %c.peer, "control connection closed: no hello in time");
                        self.stats.hello_timeouts += 1;
                        self.close(slot as u32, "no hello in time");
                    }
                }
                Link::Udp(p) => {
                    if now.saturating_duration_since(p.last_heard) >= timeout {
                        self.close(slot as u32, "silent (UDP)");
                    }
                }
            }
        }
    }

    // ---- UDP ----

    /// Sends (or queues) a datagram numbered for the session `(session_id, epoch)` with
    /// `items` records; `false` if dropped (counted; its number is then free again).
    fn udp_send(
        &mut self,
        to: SocketAddr,
        bytes: Vec<u8>,
        session_id: u64,
        epoch: u64,
        items: usize,
    ) -> bool {
        let Endpoint::Udp(socket) = &self.endpoint else {
            return false;
        };
        if self.send_queue.is_empty() {
            match socket.send_to(&bytes, to) {
                Ok(n) => {
                    self.stats.datagrams_sent += 1;
                    self.stats.bytes_sent += n as u64;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.stats.datagrams_send_dropped += 1;
                    debug!(%to, error = %e, "UDP send failed");
                    return false;
                }
            }
        }
        if self.queued_bytes + bytes.len() > self.config.max_buffer_bytes.max(MAX_DATAGRAM) {
            self.stats.datagrams_send_dropped += 1;
            return false;
        }
        self.queued_bytes += bytes.len();
        self.send_queue.push_back(Queued {
            to,
            bytes,
            session_id,
            epoch,
            items,
        });
        true
    }

    fn drain_queue(&mut self) {
        loop {
            let Endpoint::Udp(socket) = &self.endpoint else {
                return;
            };
            let Some(q) = self.send_queue.front() else {
                return;
            };
            match socket.send_to(&q.bytes, q.to) {
                Ok(n) => {
                    self.stats.datagrams_sent += 1;
                    self.stats.bytes_sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.stats.datagrams_send_dropped += 1;
                    let (session_id, epoch, items) = (q.session_id, q.epoch, q.items as u64);
                    self.stats.records_dropped += items;
                    self.stats.records_queued = self.stats.records_queued.saturating_sub(items);
                    // Its number was used: the next keepalive reports it skipped.
                    if let Some(s) = self.udp_session(session_id, epoch) {
                        s.ledger.abandon(items);
                    }
                }
            }
            if let Some(q) = self.send_queue.pop_front() {
                self.queued_bytes -= q.bytes.len();
            }
        }
    }

    /// The session `epoch` (current or pending) of the peer `session_id`.
    fn udp_session(&mut self, session_id: u64, epoch: u64) -> Option<&mut PeerSession> {
        let &slot = self.peers.get(&session_id)?;
        let Some(Conn {
            link: Link::Udp(p), ..
        }) = self.slots.get_mut(slot as usize)?.conn.as_mut()
        else {
            return None;
        };
        p.current
            .iter_mut()
            .chain(p.pending.iter_mut())
            .find(|s| s.epoch == epoch)
    }

    /// Keeps the counters of a session that ends.
    fn fold(&mut self, s: &PeerSession) {
        let l = &s.ledger;
        self.past_lost = self.past_lost.saturating_add(l.lost());
        self.past_reordered = self.past_reordered.saturating_add(l.window.reordered);
        self.past_replayed = self.past_replayed.saturating_add(l.window.rejected);
        self.past_messages_lost = self.past_messages_lost.saturating_add(l.items_lost());
    }

    fn udp_read(&mut self, on_event: &mut dyn FnMut(ServerEvent)) {
        // The buffer leaves `self` while datagrams are handled (they borrow it).
        let mut buf = std::mem::take(&mut self.read_buf);
        while let Endpoint::Udp(socket) = &self.endpoint {
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            if let Err(reason) = self.udp_datagram(&buf[..n], from, on_event) {
                self.stats.datagrams_rejected += 1;
                if reason == AUTH_MISMATCH || reason == AUTH_BAD_HELLO {
                    // A tcpcopy without the secret (or without authentication) knocking.
                    self.stats.auth_refused += 1;
                }
                debug!(%from, reason, "control datagram rejected");
            }
        }
        self.read_buf = buf;
    }

    /// Sends a HELLO_ACK for `slot`'s session `pending` (else current) to `to`.
    fn send_hello_ack(&mut self, slot: u32, pending: bool, to: SocketAddr) {
        let Some(Conn {
            link: Link::Udp(p), ..
        }) = self.slots[slot as usize].conn.as_mut()
        else {
            return;
        };
        let session_id = p.session_id;
        let s = if pending {
            p.pending.as_mut()
        } else {
            p.current.as_mut()
        };
        let Some(s) = s else {
            return;
        };
        let Some(seq) = s.ledger.next_seq() else {
            self.stats.datagrams_send_dropped += 1;
            return;
        };
        // The tally tells tcpcopy what it should have received before this datagram.
        let mut body = [0u8; HELLO_ACK_BODY_LEN];
        body[..NONCE_LEN].copy_from_slice(&s.ni);
        body[NONCE_LEN..2 * NONCE_LEN].copy_from_slice(&s.nc);
        body[2 * NONCE_LEN..].copy_from_slice(&s.ledger.tally().encode());
        let epoch = s.epoch;
        let mut out = std::mem::take(&mut self.scratch);
        encode_single(
            DatagramKind::HelloAck,
            (session_id, epoch, seq, 0),
            &body,
            s.down_key.as_ref(),
            &mut out,
        );
        let bytes = out.clone();
        self.scratch = out;
        if self.udp_send(to, bytes, session_id, epoch, 0) {
            if let Some(s) = self.udp_session(session_id, epoch) {
                s.ledger.commit(0);
            }
        }
    }

    fn new_session(&self, session_id: u64, nc: [u8; NONCE_LEN]) -> Option<PeerSession> {
        let ni = random_nonce().ok()?;
        let (up_key, down_key) = match &self.config.auth {
            Some(secret) => {
                let (u, d) = secret.udp_session_keys(session_id, &nc, &ni);
                (Some(u), Some(d))
            }
            None => (None, None),
        };
        Some(PeerSession {
            nc,
            ni,
            epoch: epoch_of(&ni),
            up_key,
            down_key,
            ledger: Ledger::new(),
        })
    }

    /// Handles the datagram `bytes` from `from`.
    fn udp_datagram(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        on_event: &mut dyn FnMut(ServerEvent),
    ) -> Result<(), &'static str> {
        let authenticated = self.config.auth.is_some();
        let d = Datagram::parse(bytes, authenticated, self.config.format).map_err(|e| match e {
            UdpError::MacPresence { .. } => AUTH_MISMATCH,
            _ => "malformed",
        })?;
        let header = d.header;
        let now = self.clock.max(Instant::now());
        match header.kind {
            DatagramKind::Hello if !header.is_keyed() => {
                if let Some(k) = &self.hello_key {
                    if !d.verify(k) {
                        return Err(AUTH_BAD_HELLO);
                    }
                }
                let (nc, _) = d.nonces();
                let slot = match self.peers.get(&header.session) {
                    Some(&slot) => slot,
                    None => {
                        if self.connection_count() >= self.config.max_connections {
                            self.stats.connections_refused += 1;
                            return Err("too many peers");
                        }
                        if self.udp_unconfirmed >= (self.config.max_connections / 4).max(1)
                            || !self.take_hello_token(now)
                        {
                            self.stats.hellos_unanswered += 1;
                            return Err("opening HELLOs over their rate");
                        }
                        if !self.admit_address(from) {
                            return Err("too many peers from one address");
                        }
                        self.udp_unconfirmed += 1;
                        let slot = self.alloc_slot();
                        self.slots[slot as usize].conn = Some(Conn {
                            peer: from,
                            address: from.ip(),
                            batch_started: self.clock,
                            announced: false,
                            link: Link::Udp(Box::new(UdpPeer {
                                session_id: header.session,
                                current: None,
                                pending: None,
                                batch: DatagramBuilder::new(
                                    DatagramKind::Records,
                                    self.config.format,
                                ),
                                last_heard: now,
                            })),
                        });
                        self.peers.insert(header.session, slot);
                        slot
                    }
                };
                let fresh = {
                    let Some(Conn {
                        link: Link::Udp(p), ..
                    }) = self.slots[slot as usize].conn.as_ref()
                    else {
                        return Err("not a UDP peer");
                    };
                    if p.current.as_ref().is_some_and(|s| s.nc == nc) {
                        Some(false)
                    } else if p.pending.as_ref().is_some_and(|s| s.nc == nc) {
                        Some(true)
                    } else {
                        None
                    }
                };
                self.stats.hellos += 1;
                self.stats.datagrams_received += 1;
                match fresh {
                    Some(pending) => self.send_hello_ack(slot, pending, from),
                    None => {
                        let session = self
                            .new_session(header.session, nc)
                            .ok_or("no randomness")?;
                        if let Some(Conn {
                            link: Link::Udp(p), ..
                        }) = self.slots[slot as usize].conn.as_mut()
                        {
                            if let Some(old) = p.pending.replace(session) {
                                self.fold(&old);
                            }
                        }
                        self.send_hello_ack(slot, true, from);
                    }
                }
                Ok(())
            }
            DatagramKind::Hello | DatagramKind::Messages => {
                let &slot = self.peers.get(&header.session).ok_or("unknown session")?;
                let Some(Conn {
                    link: Link::Udp(p),
                    peer,
                    ..
                }) = self.slots[slot as usize].conn.as_mut()
                else {
                    return Err("not a UDP peer");
                };
                let pending = if p.current.as_ref().is_some_and(|s| s.epoch == header.epoch) {
                    false
                } else if p.pending.as_ref().is_some_and(|s| s.epoch == header.epoch) {
                    true
                } else {
                    return Err("unknown epoch");
                };
                let s = if pending {
                    p.pending.as_mut()
                } else {
                    p.current.as_mut()
                }
                .ok_or("no session")?;
                if let Some(k) = &s.up_key {
                    if !d.verify(k) {
                        return Err("bad MAC");
                    }
                }
                let verdict = if header.kind == DatagramKind::Hello {
                    s.ledger
                        .accept_keepalive(header.seq, d.tally().unwrap_or_default())
                } else {
                    s.ledger.accept(header.seq, u64::from(header.count))
                };
                if !verdict.accepted() {
                    return Ok(()); // a duplicate or a replay, counted by the window
                }
                let mut ended = None;
                if pending {
                    // The tcpcopy took up the new session: it replaces the old one.
                    let new = p.pending.take();
                    ended = std::mem::replace(&mut p.current, new);
                }
                p.last_heard = now;
                *peer = from;
                if let Some(old) = ended {
                    self.fold(&old);
                }
                self.stats.datagrams_received += 1;
                if header.kind == DatagramKind::Hello {
                    self.stats.hellos += 1;
                }
                let is_hello = header.kind == DatagramKind::Hello;
                let first = !self.slots[slot as usize]
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.announced);
                if first {
                    if self.config.auth.is_some() {
                        self.stats.auth_ok += 1;
                    }
                    self.announce(slot, on_event);
                }
                if is_hello {
                    self.send_hello_ack(slot, false, from);
                } else {
                    let id = self.id_of(slot);
                    let mut count = 0u64;
                    for item in d.items() {
                        let mut m = [0u8; CLIENT_MESSAGE_LEN];
                        m.copy_from_slice(item);
                        on_event(ServerEvent::Message(id, ClientMessage::decode(&m)));
                        count += 1;
                    }
                    self.stats.messages_received += count;
                }
                Ok(())
            }
            DatagramKind::HelloAck | DatagramKind::Records => Err("wrong direction"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream as StdStream;

    fn local() -> SocketAddrV4 {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn bind_error_names_the_address() {
        let server =
            ControlServer::bind(local(), RecordFormat::Header64, Framing::Combined).unwrap();
        let addr = server.local_addr();
        let err = ControlServer::bind(addr, RecordFormat::Header64, Framing::Combined).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.to_lowercase().contains("in use"), "{text}");
    }

    #[test]
    fn token_range_is_checked() {
        let mut server =
            ControlServer::bind(local(), RecordFormat::Header64, Framing::Combined).unwrap();
        assert!(matches!(
            server.register_fd(0, usize::MAX),
            Err(ControlError::TokenOutOfRange(_))
        ));
    }

    #[test]
    fn conn_ids_are_not_reused() {
        let mut server =
            ControlServer::bind(local(), RecordFormat::Header64, Framing::Combined).unwrap();
        let addr = server.local_addr();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let mut peer = StdStream::connect(addr).unwrap();
            peer.write_all(&ClientMessage::hello().encode()).unwrap();
            let mut connected = None;
            for _ in 0..200 {
                server
                    .poll(Some(Duration::from_millis(20)), &mut |e| {
                        if let ServerEvent::Connected(id, _) = e {
                            connected = Some(id);
                        }
                    })
                    .unwrap();
                if connected.is_some() {
                    break;
                }
            }
            let id = connected.expect("connected");
            ids.push(id);
            drop(peer);
            let mut gone = false;
            for _ in 0..200 {
                server
                    .poll(Some(Duration::from_millis(20)), &mut |e| {
                        if e == ServerEvent::Disconnected(id) {
                            gone = true;
                        }
                    })
                    .unwrap();
                if gone {
                    break;
                }
            }
            assert!(gone);
            assert!(!server.send_record(id, &[0u8; 64]));
        }
        assert_eq!(ids[0].slot(), ids[1].slot());
        assert_ne!(ids[0], ids[1]);
        assert_eq!(server.stats().records_no_connection, 2);
        assert_eq!(server.stats().hellos, 2);
    }

    /// Polls `server` until `done` says so (at most about 4 s).
    fn poll_until(server: &mut ControlServer, mut done: impl FnMut(&ControlServer) -> bool) {
        for _ in 0..200 {
            server
                .poll(Some(Duration::from_millis(20)), &mut |_| {})
                .unwrap();
            if done(server) {
                return;
            }
        }
    }

    #[test]
    fn one_address_gets_its_share_of_connections() {
        let mut config = ServerConfig::new(local(), RecordFormat::Header64, Framing::Combined);
        config.max_per_address = 3;
        let mut server = ControlServer::with_config(config).unwrap();
        let addr = server.local_addr();
        let peers: Vec<StdStream> = (0..5)
            .map(|_| {
                let mut p = StdStream::connect(addr).unwrap();
                p.write_all(&ClientMessage::hello().encode()).unwrap();
                p
            })
            .collect();
        poll_until(&mut server, |s| {
            s.stats().connections_accepted + s.stats().refused_per_address >= 5
        });
        assert_eq!(server.stats().connections_accepted, 3);
        assert_eq!(server.stats().refused_per_address, 2);
        // A connection that goes gives its address its share back.
        drop(peers);
        poll_until(&mut server, |s| s.connection_count() == 0);
        let mut again = StdStream::connect(addr).unwrap();
        again.write_all(&ClientMessage::hello().encode()).unwrap();
        poll_until(&mut server, |s| s.stats().connections_accepted == 4);
        assert_eq!(server.stats().connections_accepted, 4);
    }

    #[test]
    fn a_flooding_connection_is_read_at_its_rate_and_loses_nothing() {
        use crate::flow::FlowKey;
        let mut config = ServerConfig::new(local(), RecordFormat::Header64, Framing::Combined);
        config.max_messages_per_second = 10_000;
        let mut server = ControlServer::with_config(config).unwrap();
        let addr = server.local_addr();
        let writer = std::thread::spawn(move || {
            let mut peer = StdStream::connect(addr).unwrap();
            let mut bytes = ClientMessage::hello().encode().to_vec();
            for port in 0..30_000u32 {
                let key = FlowKey::new(
                    std::net::SocketAddrV4::new([10, 0, (port >> 16) as u8, 1].into(), port as u16),
                    "10.0.0.2:8080".parse().unwrap(),
                );
                bytes.extend_from_slice(&ClientMessage::add(key).encode());
            }
            peer.write_all(&bytes).unwrap();
            peer
        });
        let start = Instant::now();
        let mut received = 0u64;
        while start.elapsed() < Duration::from_millis(500) {
            server
                .poll(Some(Duration::from_millis(10)), &mut |e| {
                    if matches!(e, ServerEvent::Message(..)) {
                        received += 1;
                    }
                })
                .unwrap();
        }
        // Half a second at 10,000 a second, a full burst and two read chunks at most.
        assert!(
            received <= 5_000 + 10_000 + 2 * 1_200,
            "{received} read in 0.5 s"
        );
        assert!(server.stats().throttled >= 1);
        // Nothing is lost: the rest is read as tokens come back (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(20);
        while received < 30_000 && Instant::now() < deadline {
            server
                .poll(Some(Duration::from_millis(10)), &mut |e| {
                    if matches!(e, ServerEvent::Message(..)) {
                        received += 1;
                    }
                })
                .unwrap();
        }
        assert_eq!(received, 30_000);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_connection_that_never_says_hello_is_closed() {
        let mut config = ServerConfig::new(local(), RecordFormat::Header64, Framing::Combined);
        config.hello_timeout = Duration::from_millis(200);
        let mut server = ControlServer::with_config(config).unwrap();
        let mut silent = StdStream::connect(server.local_addr()).unwrap();
        poll_until(&mut server, |s| s.stats().hello_timeouts == 1);
        assert_eq!(server.stats().hello_timeouts, 1);
        assert_eq!(server.connection_count(), 0);
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 8];
        assert!(matches!(silent.read(&mut b), Ok(0) | Err(_)), "closed");
    }

    #[test]
    fn opening_hellos_of_new_udp_sessions_are_answered_at_a_bounded_rate() {
        use crate::control::udp::{encode_single, DatagramKind, HELLO_BODY_LEN};
        let mut config = ServerConfig::new(local(), RecordFormat::Header64, Framing::Combined);
        config.transport = Transport::Udp;
        config.new_udp_sessions_per_second = 5;
        let mut server = ControlServer::with_config(config).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut out = Vec::new();
        for session in 1..=50u64 {
            let mut body = [0u8; HELLO_BODY_LEN];
            body[..8].copy_from_slice(&session.to_be_bytes());
            encode_single(
                DatagramKind::Hello,
                (session, 0, 0, 0),
                &body,
                None,
                &mut out,
            );
            socket.send_to(&out, server.local_addr()).unwrap();
        }
        poll_until(&mut server, |s| {
            s.stats().hellos + s.stats().hellos_unanswered >= 50
        });
        let stats = server.stats();
        assert_eq!(stats.hellos + stats.hellos_unanswered, 50, "{stats:?}");
        // The burst (5) and what a few ms of refill add; never most of them.
        assert!(stats.hellos <= 8, "{stats:?}");
        let mut answers = 0;
        let mut buf = [0u8; 2048];
        while socket.recv_from(&mut buf).is_ok() {
            answers += 1;
        }
        assert_eq!(answers, stats.hellos, "one answer per admitted HELLO");
    }

    #[test]
    fn udp_server_binds_and_reports_its_port() {
        let mut config = ServerConfig::new(local(), RecordFormat::Header64, Framing::Combined);
        config.transport = Transport::Udp;
        let server = ControlServer::with_config(config.clone()).unwrap();
        assert_ne!(server.local_addr().port(), 0);
        config.addr = server.local_addr();
        let err = ControlServer::with_config(config).unwrap_err();
        assert!(err.to_string().contains(&server.local_addr().to_string()));
    }
}
