//! The tcpcopy ⇄ intercept control channel: byte-compatible with the C tools over TCP (spec
//! §2), with two optional extensions that change nothing on the wire unless enabled: a UDP
//! transport and authentication.
//!
//! * [`codec`]: the wire formats — 14-byte route messages, 64/192-byte response records,
//!   combined/plain framing — with stream decoders that accept any chunking.
//! * [`client`]: the tcpcopy side — links to every intercept (`-s`; over TCP `-C` connections
//!   each), the hello, `CLIENT_ADD`/`CLIENT_DEL` fan-out, response decoding, reconnect with
//!   back-off, `-L` semantics.
//! * [`server`]: the intercept side — listener (TCP) or socket (UDP), per-connection message
//!   decoding, record batching with a bounded backlog per tcpcopy, a 2 ms flush.
//! * [`udp`]: the UDP datagram format, sequence numbers, loss/reorder/replay window, the
//!   ledger that accounts for a tail loss by the next keepalive.
//! * [`rxdrops`]: what a UDP socket's full receive buffer dropped (from `/proc`).
//! * [`auth`]: shared secret, TCP challenge-response (HMAC-SHA256 both ways), UDP datagram MACs.
//! * [`route`]: intercept's route table (exact 4-tuple → connection, with idle expiry) and the
//!   delay queue for SYN/RST responses that beat their `CLIENT_ADD`.
//! * [`replica`]: route tables that many capture threads read without locks (one replica per
//!   thread, fed by the control thread).
//! * [`single`]: intercept's `--single` mode (no routes; responses spread by key).
//!
//! Nothing here blocks: all sockets are non-blocking under a `mio::Poll` owned by the side's
//! control thread; a `mio::Waker` lets other threads interrupt the wait.

pub mod auth;
pub mod client;
pub mod codec;
mod outbuf;
pub mod replica;
pub mod route;
pub mod rxdrops;
pub mod server;
pub mod single;
pub mod udp;

use std::io;
use std::net::SocketAddrV4;

pub use auth::{AuthError, Secret};
pub use client::{ClientConfig, ClientStats, ControlClient};
pub use codec::{
    encode_record, BatchEncoder, ClientMessage, CodecError, Framing, MessageDecoder, MessageFeed,
    MessageType, RecordDecoder, RecordFormat, ResponseHeader,
};
pub use replica::{ReplicaConfig, RouteFeed, RouteReplica, RouteUpdate};
pub use route::{DelayQueue, DelayStats, RouteStats, RouteTable};
pub use server::{ConnId, ControlServer, ServerConfig, ServerEvent, ServerStats};
pub use single::{Admission, SingleSpread};

/// The C tools' default control port (`SERVER_PORT`).
pub const DEFAULT_PORT: u16 = 36524;

/// The transport of the control channel; both sides must use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// TCP, byte-compatible with the C tools (the default).
    #[default]
    Tcp,
    /// UDP datagrams with sequence numbers (a tcpcopy-rs extension, see [`udp`]).
    Udp,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Transport::Tcp),
            "udp" => Ok(Transport::Udp),
            other => Err(format!("unknown transport '{other}': use tcp or udp")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

/// Why a control-channel endpoint could not be set up or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("cannot listen for tcpcopy on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddrV4,
        /// The OS error.
        source: io::Error,
    },
    /// An OS call failed.
    #[error("control channel: {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// No intercept server was given.
    #[error("no intercept server given (-s)")]
    NoServers,
    /// More intercept servers than the C tool allows.
    #[error("{0} intercept servers given; at most {max} are supported", max = client::MAX_SERVERS)]
    TooManyServers(usize),
    /// A connection count per server outside 1..=16.
    #[error("{0} connections per intercept server (-C); use 1..={max}", max = client::MAX_CONNECTIONS_PER_SERVER)]
    BadConnectionCount(usize),
    /// A caller token id that collides with the control channel's own tokens.
    #[error("token id {0} is too large (must be below 2^62)")]
    TokenOutOfRange(usize),
    /// Authentication could not be set up (no randomness).
    #[error("control channel authentication: {0}")]
    Auth(#[from] AuthError),
}

impl ControlError {
    fn io(context: &'static str, source: io::Error) -> ControlError {
        ControlError::Io { context, source }
    }
}

/// Waits for readiness on `poll` (at most `timeout`, cut short by `deadline`), then lists each
/// ready token with whether it can be read and written (errors and closes count as both, so
/// the handler meets them). What both ends of the channel do at the top of their `poll`.
fn wait_ready(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    ready: &mut Vec<(mio::Token, bool, bool)>,
    timeout: Option<std::time::Duration>,
    deadline: Option<std::time::Instant>,
) -> Result<(), ControlError> {
    let timeout = match deadline {
        Some(at) => {
            let until = at.saturating_duration_since(std::time::Instant::now());
            Some(timeout.map_or(until, |t| t.min(until)))
        }
        None => timeout,
    };
    match poll.poll(events, timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(ControlError::io("waiting for events", e)),
    }
    ready.clear();
    for event in events.iter() {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        ready.push((event.token(), readable, writable));
    }
    Ok(())
}
