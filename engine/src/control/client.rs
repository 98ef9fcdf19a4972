//! The tcpcopy side of the control channel: connections to every intercept server (`-s`),
//! `-C` of them per server, the version hello, `CLIENT_ADD`/`CLIENT_DEL` fan-out and the
//! decoding of response records.
//!
//! Differences from the C tcpcopy, none visible on the wire: connects are non-blocking, lost
//! or refused connections are retried with exponential back-off (100 ms doubling to 5 s) instead
//! of the `-L` 12-second timer, writes never block (each connection has a bounded backlog;
//! messages that do not fit are dropped and counted), and an unreachable intercept at startup is
//! not fatal by itself (the caller decides, see [`ControlClient::wait_connected`] and
//! [`ControlClient::should_exit`]).
//!
//! One thread owns a [`ControlClient`]; other threads interrupt its [`poll`](ControlClient::poll)
//! with the [`waker`](ControlClient::waker).

use std::io::{self, Read};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::control::codec::{
    ClientMessage, Framing, RecordDecoder, RecordFormat, ResponseHeader, CLIENT_MESSAGE_LEN,
};
use crate::control::outbuf::OutBuf;
use crate::control::ControlError;
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
/// Default time a connect may take before it is abandoned and retried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

const WAKER: Token = Token(usize::MAX);
const READ_CHUNK: usize = 64 * 1024;

/// Settings of a [`ControlClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Intercept servers (`-s`), 1..=32.
    pub servers: Vec<SocketAddrV4>,
    /// Connections per server (`-C`), 1..=16.
    pub connections_per_server: usize,
    /// Record format expected (must match the intercepts).
    pub format: RecordFormat,
    /// Framing expected (must match the intercepts).
    pub framing: Framing,
    /// `-L`: keep running when every intercept is gone (see [`ControlClient::should_exit`]).
    pub lonely: bool,
    /// First reconnect delay; it doubles after each failed attempt.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Bound on one connection's unsent bytes.
    pub max_buffer_bytes: usize,
    /// Time a connect may take (an intercept host that drops SYNs) before it counts as failed.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// Defaults (2 connections per server, 64-byte records, combined framing, not lonely) for
    /// `servers`.
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
        }
    }
}

/// Counters of a [`ControlClient`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections currently established.
    pub connections_up: u64,
    /// Connections established in total.
    pub connects: u64,
    /// Establishments of a connection that had been up before.
    pub reconnects: u64,
    /// Connection attempts that failed (refused, unreachable, …).
    pub connect_failures: u64,
    /// Established connections lost.
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
    /// poller cannot be created.
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
        let mut client = ControlClient {
            poll,
            events: Events::with_capacity(256),
            ready: Vec::with_capacity(256),
            waker: Arc::new(waker),
            config,
            servers,
            conns,
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
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// A handle another thread can use to interrupt [`poll`](Self::poll) (e.g. after queueing
    /// route requests for this thread).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Whether at least one connection to `server` is up.
    pub fn is_connected(&self, server: SocketAddrV4) -> bool {
        self.servers
            .iter()
            .enumerate()
            .any(|(s, srv)| srv.addr == server && self.server_up(s))
    }

    /// How many servers have at least one connection up.
    pub fn connected_servers(&self) -> usize {
        (0..self.servers.len())
            .filter(|&s| self.server_up(s))
            .count()
    }

    /// Whether no connection to any server is up (also true before the first one comes up).
    pub fn all_down(&self) -> bool {
        !self.conns.iter().any(|c| matches!(c.state, State::Up(_)))
    }

    /// The C tool's exit rule: without `-L` (lonely), tcpcopy stops once every intercept
    /// connection it had is gone. Never true before the first connection came up.
    pub fn should_exit(&self) -> bool {
        !self.config.lonely && self.ever_up && self.all_down()
    }

    /// Queues `CLIENT_ADD` for `key` to every server that is up, on one of its connections
    /// chosen by the flow's hash (intercept routes the session's responses to that connection;
    /// the C tool chooses round-robin, which reorders an ADD after a DEL of the same 4-tuple).
    /// Never blocks. `true` if at least one server took it (the C tool skips the SYN
    /// otherwise).
    pub fn client_add(&mut self, key: FlowKey) -> bool {
        self.send_message(&ClientMessage::add(key))
    }

    /// Queues `CLIENT_DEL` for `key`, like [`client_add`](Self::client_add).
    pub fn client_del(&mut self, key: FlowKey) -> bool {
        self.send_message(&ClientMessage::del(key))
    }

    /// Queues any message like [`client_add`](Self::client_add).
    pub fn send_message(&mut self, message: &ClientMessage) -> bool {
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
                self.flush(i, Instant::now());
            }
        }
        any
    }

    /// Waits up to `timeout` (shortened to the next reconnect attempt) for the intercepts or
    /// the waker; completes connects (sending the hello), writes backlogs, reads and decodes
    /// records (each goes to `on_record`), and retries lost connections that are due. Returns
    /// the records delivered.
    ///
    /// # Errors
    /// Only a failure of the poller itself.
    pub fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_record: &mut dyn FnMut(&ResponseHeader),
    ) -> Result<usize, ControlError> {
        let before = self.stats.records_received;
        let now = Instant::now();
        self.reconnect_due(now);
        let timeout = match self.next_retry() {
            Some(at) => {
                let until = at.saturating_duration_since(now);
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
        let now = Instant::now();
        for r in 0..self.ready.len() {
            let (Token(i), readable, writable) = self.ready[r];
            if i >= self.conns.len() {
                continue; // the waker
            }
            match self.conns[i].state {
                State::Connecting { .. } => self.check_connect(i, now, on_record),
                State::Up(_) => {
                    if writable {
                        self.flush(i, now);
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

    /// Polls until every server has a connection up or `timeout` passes; `true` if they all
    /// came up. Records arriving meanwhile go to `on_record`.
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
        let per = self.config.connections_per_server;
        self.conns[s * per..(s + 1) * per]
            .iter()
            .any(|c| matches!(c.state, State::Up(_)))
    }

    /// The next reconnect attempt or connect deadline.
    fn next_retry(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter_map(|c| match c.state {
                State::Down { retry_at } => Some(retry_at),
                State::Connecting { deadline, .. } => Some(deadline),
                State::Up(_) => None,
            })
            .min()
    }

    fn reconnect_due(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            match self.conns[i].state {
                State::Down { retry_at } if retry_at <= now => self.start_connect(i, now),
                State::Connecting { deadline, .. } if deadline <= now => {
                    if let State::Connecting { mut stream, .. } =
                        std::mem::replace(&mut self.conns[i].state, State::Down { retry_at: now })
                    {
                        let _ = self.poll.registry().deregister(&mut stream);
                    }
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.connect_failed(i, &e, now);
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
                    Err(e) => self.connect_failed(i, &e, now),
                }
            }
            Err(e) => self.connect_failed(i, &e, now),
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
        let State::Connecting { mut stream, .. } =
            std::mem::replace(&mut self.conns[i].state, State::Down { retry_at: now })
        else {
            return;
        };
        if let Some(e) = error {
            let _ = self.poll.registry().deregister(&mut stream);
            self.connect_failed(i, &e, now);
            return;
        }
        let addr = self.servers[self.conns[i].server].addr;
        if let Err(e) = stream.set_nodelay(true) {
            debug!(server = %addr, error = %e, "cannot set TCP_NODELAY");
        }
        let conn = &mut self.conns[i];
        conn.out.clear();
        conn.out.push(&ClientMessage::hello().encode());
        conn.decoder.reset();
        conn.state = State::Up(stream);
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
        self.flush(i, now);
        self.read(i, now, on_record);
    }

    fn connect_failed(&mut self, i: usize, error: &io::Error, now: Instant) {
        let addr = self.servers[self.conns[i].server].addr;
        let max = self.config.reconnect_max;
        let conn = &mut self.conns[i];
        conn.failures += 1;
        let delay = conn.backoff;
        conn.backoff = (conn.backoff * 2).min(max);
        conn.state = State::Down {
            retry_at: now + delay,
        };
        self.stats.connect_failures += 1;
        let attempts = conn.failures;
        if attempts % 12 == 1 {
            warn!(server = %addr, connection = i, reason = %error, attempts,
                retry_in_ms = delay.as_millis() as u64, "cannot connect to intercept");
        } else {
            debug!(server = %addr, connection = i, reason = %error, attempts,
                retry_in_ms = delay.as_millis() as u64, "cannot connect to intercept");
        }
    }

    fn lose(&mut self, i: usize, reason: &dyn std::fmt::Display, now: Instant) {
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

    fn flush(&mut self, i: usize, now: Instant) {
        let conn = &mut self.conns[i];
        let State::Up(stream) = &mut conn.state else {
            return;
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
            let State::Up(stream) = &mut conn.state else {
                return;
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
            let stats = &mut self.stats;
            stats.bytes_received += n as u64;
            let result =
                conn.decoder.feed(&self.read_buf[..n], |record| {
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
                });
            if let Err(e) = result {
                self.stats.protocol_errors += 1;
                self.lose(i, &e, now);
                return;
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
        let mut client = ControlClient::new(ClientConfig::new(vec![addr])).unwrap();
        let key = FlowKey::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        assert!(!client.client_add(key));
        assert_eq!(client.stats().messages_dropped, 1);
        assert!(client.all_down());
        assert!(!client.should_exit());
        assert!(!client.is_connected(addr));
    }
}
