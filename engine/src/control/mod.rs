//! The tcpcopy ⇄ intercept control channel, byte-compatible with the C tools (spec §2).
//!
//! * [`codec`]: the wire formats — 14-byte route messages, 64/192-byte response records,
//!   combined/plain framing — with stream decoders that accept any chunking.
//! * [`client`]: the tcpcopy side — connections to every intercept (`-s`, `-C`), the hello,
//!   `CLIENT_ADD`/`CLIENT_DEL` fan-out, response decoding, reconnect with back-off.
//! * [`server`]: the intercept side — listener, per-connection message decoding, record
//!   batching with a bounded backlog per tcpcopy.
//! * [`route`]: intercept's route table (exact 4-tuple → connection, with idle expiry) and the
//!   delay queue for SYN/RST responses that beat their `CLIENT_ADD`.
//!
//! Nothing here blocks: all sockets are non-blocking under a `mio::Poll` owned by the side's
//! control thread; a `mio::Waker` lets other threads interrupt the wait.

pub mod client;
pub mod codec;
mod outbuf;
pub mod route;
pub mod server;

use std::io;
use std::net::SocketAddrV4;

pub use client::{ClientConfig, ClientStats, ControlClient};
pub use codec::{
    encode_record, BatchEncoder, ClientMessage, CodecError, Framing, MessageDecoder, MessageFeed,
    MessageType, RecordDecoder, RecordFormat, ResponseHeader,
};
pub use route::{DelayQueue, DelayStats, RouteStats, RouteTable};
pub use server::{ConnId, ControlServer, ServerConfig, ServerEvent, ServerStats};

/// The C tools' default control port (`SERVER_PORT`).
pub const DEFAULT_PORT: u16 = 36524;

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
}

impl ControlError {
    fn io(context: &'static str, source: io::Error) -> ControlError {
        ControlError::Io { context, source }
    }
}
