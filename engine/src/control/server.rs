//! The intercept side of the control channel: listens for tcpcopy connections, decodes their
//! hello and route messages, and sends response records back in batches.
//!
//! Unlike the C intercept (blocking writes: one slow tcpcopy stalls everything) every
//! connection has its own bounded backlog; records that do not fit are dropped and counted, so
//! a slow tcpcopy only loses its own responses.
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

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::control::codec::{
    BatchEncoder, ClientMessage, CodecError, Framing, MessageDecoder, RecordFormat,
    INTERNAL_VERSION,
};
use crate::control::outbuf::OutBuf;
use crate::control::ControlError;

/// How long a partly filled batch may wait before it is written (`CHECK_INTERVAL`).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(2);
/// Default bound on one connection's unsent bytes.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 4 << 20;
/// Default bound on simultaneous tcpcopy connections (`MAX_FD_NUM`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// Connection tokens are `CONN_BASE + slot`; caller tokens must stay below.
const CONN_BASE: usize = 1 << (usize::BITS - 2);
const READ_CHUNK: usize = 16 * 1024;

/// A tcpcopy connection. The id of a closed connection is never reused (a generation count
/// guards the slot), so a stale route cannot reach a newer connection.
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
    /// A tcpcopy connected from this address.
    Connected(ConnId, SocketAddr),
    /// A message after the hello: `CLIENT_ADD`, `CLIENT_DEL` or an unknown type (log and
    /// ignore it).
    Message(ConnId, ClientMessage),
    /// The connection is gone (EOF, error, protocol error); drop its routes.
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
    /// Framing sent (must match the tcpcopy).
    pub framing: Framing,
    /// Bound on one connection's unsent bytes.
    pub max_buffer_bytes: usize,
    /// Longest time a partly filled batch waits.
    pub flush_interval: Duration,
    /// Most simultaneous connections; more are accepted and closed at once.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Defaults for everything but the address and the format.
    pub fn new(addr: SocketAddrV4, format: RecordFormat, framing: Framing) -> ServerConfig {
        ServerConfig {
            addr,
            format,
            framing,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Counters of a [`ControlServer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections currently open.
    pub connections_up: u64,
    /// Connections accepted in total.
    pub connections_accepted: u64,
    /// Connections closed at once because of `max_connections`.
    pub connections_refused: u64,
    /// Connections lost or closed.
    pub disconnects: u64,
    /// Hellos received.
    pub hellos: u64,
    /// Hellos with a version other than 6 (accepted with a warning, like the C intercept).
    pub version_mismatches: u64,
    /// Connections closed because the first message was not a hello.
    pub peers_too_old: u64,
    /// Messages received after the hello.
    pub messages_received: u64,
    /// Records accepted into a batch.
    pub records_queued: u64,
    /// Records dropped because their connection's backlog was full.
    pub records_dropped: u64,
    /// Records for a connection that no longer exists.
    pub records_no_connection: u64,
    /// Records of the wrong size.
    pub records_bad_length: u64,
    /// Batches moved to a connection's output.
    pub batches: u64,
    /// Bytes written to sockets.
    pub bytes_sent: u64,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    decoder: MessageDecoder,
    batch: BatchEncoder,
    batch_started: Instant,
    out: OutBuf,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

/// The intercept end of the control channel (see the module docs).
#[derive(Debug)]
pub struct ControlServer {
    poll: Poll,
    events: Events,
    ready: Vec<(Token, bool, bool)>,
    waker: Arc<Waker>,
    listener: TcpListener,
    local_addr: SocketAddrV4,
    config: ServerConfig,
    slots: Vec<Slot>,
    free: Vec<u32>,
    read_buf: Box<[u8]>,
    lost: Vec<ConnId>,
    clock: Instant,
    stats: ServerStats,
}

impl ControlServer {
    /// Listens on `addr` (SO_REUSEADDR) with default settings.
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
        let mut listener = TcpListener::bind(SocketAddr::V4(config.addr)).map_err(bind_err)?;
        let local_addr = match listener.local_addr().map_err(bind_err)? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => config.addr,
        };
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| ControlError::io("registering the listener", e))?;
        info!(addr = %local_addr, "control channel listening");
        Ok(ControlServer {
            poll,
            events: Events::with_capacity(256),
            ready: Vec::with_capacity(256),
            waker: Arc::new(waker),
            listener,
            local_addr,
            config,
            slots: Vec::new(),
            free: Vec::new(),
            read_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            lost: Vec::new(),
            clock: Instant::now(),
            stats: ServerStats::default(),
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
        self.stats
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

    /// Connections open.
    pub fn connection_count(&self) -> usize {
        self.slots.iter().filter(|s| s.conn.is_some()).count()
    }

    /// Whether `conn` is open.
    pub fn is_connected(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some()
    }

    /// The peer address of `conn`.
    pub fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conn(conn).map(|c| c.peer)
    }

    /// Unsent bytes of `conn` (its backlog, not counting the open batch).
    pub fn backlog(&self, conn: ConnId) -> usize {
        self.conn(conn).map_or(0, |c| c.out.pending())
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
        let now = Instant::now();
        let timeout = match self.next_flush_deadline() {
            Some(deadline) => {
                let until = deadline.saturating_duration_since(now);
                Some(timeout.map_or(until, |t| t.min(until)))
            }
            None => timeout,
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::io("waiting for events", e)),
        }
        self.ready.clear();
        for event in self.events.iter() {
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            self.ready.push((event.token(), readable, writable));
        }
        for i in 0..self.ready.len() {
            let (token, readable, writable) = self.ready[i];
            match token {
                LISTENER => self.accept(on_event),
                WAKER => {}
                Token(t) if t >= CONN_BASE => {
                    let slot = (t - CONN_BASE) as u32;
                    if writable {
                        self.write_conn(slot, on_event);
                    }
                    if readable {
                        self.read_conn(slot, on_event);
                    }
                }
                Token(t) => on_event(ServerEvent::Readable(t)),
            }
        }
        self.flush_due(Instant::now());
        for id in self.lost.drain(..) {
            on_event(ServerEvent::Disconnected(id));
        }
        Ok(())
    }

    /// Adds one record (exactly `format.record_len()` bytes) to `conn`'s batch; a full batch
    /// is written at once, a partial one by [`flush_due`](Self::flush_due). `false` if the
    /// record was dropped (connection gone, backlog full, wrong size; all counted).
    pub fn send_record(&mut self, conn: ConnId, record: &[u8]) -> bool {
        if record.len() != self.config.format.record_len() {
            self.stats.records_bad_length += 1;
            return false;
        }
        let clock = self.clock;
        let slot = match self.slots.get_mut(conn.slot as usize) {
            Some(s) if s.generation == conn.generation && s.conn.is_some() => s,
            _ => {
                self.stats.records_no_connection += 1;
                return false;
            }
        };
        let Some(c) = slot.conn.as_mut() else {
            return false;
        };
        if !c.out.fits(c.batch.bytes().len() + c.batch.push_cost()) {
            self.stats.records_dropped += 1;
            return false;
        }
        if c.batch.is_empty() {
            c.batch_started = clock;
        }
        match c.batch.push(record) {
            Ok(full) => {
                self.stats.records_queued += 1;
                if full {
                    self.flush_batch(conn.slot);
                }
                true
            }
            Err(_) => {
                self.stats.records_bad_length += 1;
                false
            }
        }
    }

    /// Writes every batch that has waited for the flush interval at `now`. Call it at least
    /// every interval (see [`next_flush_deadline`](Self::next_flush_deadline)); `poll` calls it
    /// too.
    pub fn flush_due(&mut self, now: Instant) {
        self.clock = now;
        let interval = self.config.flush_interval;
        for slot in 0..self.slots.len() {
            let due = self.slots[slot].conn.as_ref().is_some_and(|c| {
                !c.batch.is_empty() && now.saturating_duration_since(c.batch_started) >= interval
            });
            if due {
                self.flush_batch(slot as u32);
            }
        }
    }

    /// Writes every open batch now (e.g. when the capture socket is drained).
    pub fn flush_all(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot]
                .conn
                .as_ref()
                .is_some_and(|c| !c.batch.is_empty())
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
            .filter(|c| !c.batch.is_empty())
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

    fn accept(&mut self, on_event: &mut dyn FnMut(ServerEvent)) {
        loop {
            match self.listener.accept() {
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
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let token = Token(CONN_BASE + slot as usize);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(%peer, error = %e, "cannot register a control connection");
            self.free.push(slot);
            return;
        }
        self.slots[slot as usize].conn = Some(Conn {
            stream,
            peer,
            decoder: MessageDecoder::new(),
            batch: BatchEncoder::new(self.config.format, self.config.framing),
            batch_started: self.clock,
            out: OutBuf::new(self.config.max_buffer_bytes),
        });
        self.stats.connections_accepted += 1;
        self.stats.connections_up += 1;
        let id = self.id_of(slot);
        info!(%peer, conn = %id, "tcpcopy connected");
        on_event(ServerEvent::Connected(id, peer));
    }

    fn read_conn(&mut self, slot: u32, on_event: &mut dyn FnMut(ServerEvent)) {
        let id = self.id_of(slot);
        loop {
            let Some(c) = self.slots[slot as usize].conn.as_mut() else {
                return;
            };
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
            let peer = c.peer;
            let result = c.decoder.feed(&self.read_buf[..n], |m| {
                on_event(ServerEvent::Message(id, m))
            });
            match result {
                Ok(info) => {
                    self.stats.messages_received += info.messages as u64;
                    if let Some(version) = info.hello_version {
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

    fn write_conn(&mut self, slot: u32, _on_event: &mut dyn FnMut(ServerEvent)) {
        let Some(c) = self.slots[slot as usize].conn.as_mut() else {
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
        let Some(c) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if c.batch.is_empty() {
            return;
        }
        // Room was checked when each record was added.
        let pushed = c.out.push(c.batch.bytes());
        let records = c.batch.count();
        c.batch.clear();
        if !pushed {
            self.stats.records_dropped += records as u64;
            self.stats.records_queued = self.stats.records_queued.saturating_sub(records as u64);
            return;
        }
        self.stats.batches += 1;
        match c.out.write_to(&mut c.stream) {
            Ok(n) => self.stats.bytes_sent += n as u64,
            Err(e) => self.close(slot, &e.to_string()),
        }
    }

    fn close(&mut self, slot: u32, reason: &str) {
        let id = self.id_of(slot);
        let entry = &mut self.slots[slot as usize];
        let Some(mut c) = entry.conn.take() else {
            return;
        };
        entry.generation = entry.generation.wrapping_add(1);
        let _ = self.poll.registry().deregister(&mut c.stream);
        let unsent = c.out.pending() + c.batch.bytes().len();
        warn!(peer = %c.peer, conn = %id, reason, unsent_bytes = unsent, "tcpcopy connection lost");
        self.free.push(slot);
        self.stats.disconnects += 1;
        self.stats.connections_up -= 1;
        self.lost.push(id);
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
}
