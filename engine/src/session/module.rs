//! Protocol modules: hooks through which a module that knows an application protocol takes
//! part in the replay (spec §6.2, the C tool's `tc_module_s`).
//!
//! The C tool's typical module (mysql) remembers each client's authentication exchange and
//! replays it in front of a session captured mid-stream, whose own authentication happened
//! before the capture started: without it the target would refuse every request of the
//! session. [`SessionModule`] gives a module what that needs: it sees the client payloads of
//! the sessions the table replays (to learn), it may veto a session captured mid-stream, and
//! it may put bytes in front of one (sent right after the fabricated handshake, before the
//! captured data). [`LineAuth`] is a working example for line protocols.
//!
//! A module belongs to one table (one worker): it must be `Send`, and what it learns is that
//! worker's (sessions are spread over workers by client port).

use crate::flow::FlowKey;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What a protocol module can do in a session table. Every method has a default that does
/// nothing, so a module implements only what it needs.
pub trait SessionModule: Send + std::fmt::Debug {
    /// The module's name (for logs).
    fn name(&self) -> &str;

    /// A client payload of a session the table replays: `offset` is its position in the
    /// client's byte stream (0 = the first byte after the SYN), `from_syn` false for sessions
    /// captured mid-stream (offsets then count from the first captured byte). Called for every
    /// new payload segment (not for retransmissions).
    fn client_payload(&mut self, key: &FlowKey, offset: u32, from_syn: bool, payload: &[u8]) {
        let _ = (key, offset, from_syn, payload);
    }

    /// A session is about to start mid-stream with `payload` (its first captured data):
    /// false drops the segment instead (the C tool's `check_padding`).
    fn accept_mid_stream(&mut self, key: &FlowKey, payload: &[u8]) -> bool {
        let _ = (key, payload);
        true
    }

    /// Bytes to send in front of a session captured mid-stream, right after the fabricated
    /// handshake and before its captured data (the C tool's `prepare_renew`); `None` for
    /// none. The fabricated SYN moves back by their length, so the captured data keeps its
    /// sequence numbers.
    fn mid_stream_prefix(&mut self, key: &FlowKey) -> Option<Vec<u8>> {
        let _ = key;
        None
    }
}

/// Most client addresses whose authentication line [`LineAuth`] remembers.
const LINE_AUTH_CLIENTS: usize = 65_536;
/// Longest authentication line it keeps.
const LINE_AUTH_MAX_LINE: usize = 512;

/// An example module for line-based protocols that authenticate first (`AUTH <token>\r\n`,
/// SMTP `AUTH PLAIN ...`, a Redis `AUTH ...`): it remembers the first line of each session
/// seen from its SYN when it starts with the configured verb, per client address, and sends
/// that client's line (or the configured default) in front of every session of the client
/// captured mid-stream, so that the target accepts its requests.
#[derive(Debug)]
pub struct LineAuth {
    verb: Vec<u8>,
    default_line: Option<Vec<u8>>,
    learned: HashMap<Ipv4Addr, Vec<u8>>,
    /// Mid-stream sessions given a line.
    pub injected: u64,
    /// Mid-stream sessions that had no line to give.
    pub missing: u64,
}

impl LineAuth {
    /// A module that learns lines starting with `verb` (e.g. `AUTH `) and, when it knows
    /// none for a client, sends `default_line` (without the line end: `\r\n` is added).
    pub fn new(verb: &str, default_line: Option<&str>) -> LineAuth {
        LineAuth {
            verb: verb.as_bytes().to_vec(),
            default_line: default_line.map(|l| format!("{l}\r\n").into_bytes()),
            learned: HashMap::new(),
            injected: 0,
            missing: 0,
        }
    }

    /// Parses a module argument of the form `verb[:default line]`, e.g. `AUTH :AUTH lab-secret`
    /// (learn lines starting with `AUTH `; send `AUTH lab-secret` when none was learned).
    pub fn from_arg(arg: &str) -> LineAuth {
        match arg.split_once(':') {
            Some((verb, line)) => LineAuth::new(verb, Some(line)),
            None => LineAuth::new(arg, None),
        }
    }

    /// Client addresses with a learned line.
    pub fn learned(&self) -> usize {
        self.learned.len()
    }
}

impl SessionModule for LineAuth {
    fn name(&self) -> &str {
        "line-auth"
    }

    fn client_payload(&mut self, key: &FlowKey, offset: u32, from_syn: bool, payload: &[u8]) {
        if !from_syn || offset != 0 || !payload.starts_with(&self.verb) {
            return;
        }
        let Some(end) = payload.windows(2).position(|w| w == b"\r\n") else {
            return;
        };
        let line = &payload[..end + 2];
        if line.len() > LINE_AUTH_MAX_LINE {
            return;
        }
        if self.learned.len() >= LINE_AUTH_CLIENTS && !self.learned.contains_key(&key.client_ip) {
            return;
        }
        self.learned.insert(key.client_ip, line.to_vec());
    }

    fn mid_stream_prefix(&mut self, key: &FlowKey) -> Option<Vec<u8>> {
        let line = self
            .learned
            .get(&key.client_ip)
            .or(self.default_line.as_ref())
            .cloned();
        match line {
            Some(_) => self.injected += 1,
            None => self.missing += 1,
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn key(ip: [u8; 4], port: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new(ip.into(), port),
            SocketAddrV4::new([10, 0, 0, 30].into(), 2526),
        )
    }

    #[test]
    fn line_auth_learns_per_client_and_falls_back_to_the_default() {
        let mut m = LineAuth::from_arg("AUTH :AUTH fallback");
        let a = key([10, 0, 0, 1], 1000);
        // Only the first line of a session seen from its SYN is learned.
        m.client_payload(&a, 5, true, b"AUTH late\r\n");
        m.client_payload(&a, 0, false, b"AUTH midstream\r\n");
        m.client_payload(&a, 0, true, b"GET 1\r\n");
        assert_eq!(m.learned(), 0);
        m.client_payload(&a, 0, true, b"AUTH s3cret\r\nGET 1\r\n");
        assert_eq!(
            m.mid_stream_prefix(&key([10, 0, 0, 1], 2000)).unwrap(),
            b"AUTH s3cret\r\n"
        );
        assert_eq!(
            m.mid_stream_prefix(&key([10, 0, 0, 2], 2000)).unwrap(),
            b"AUTH fallback\r\n"
        );
        let mut bare = LineAuth::from_arg("AUTH ");
        assert!(bare.mid_stream_prefix(&a).is_none());
        assert_eq!((m.injected, bare.missing), (2, 1));
        // A line without its end, or a huge one, is not learned.
        m.client_payload(&key([10, 0, 0, 3], 1), 0, true, b"AUTH cut");
        let huge = format!("AUTH {}\r\n", "x".repeat(600));
        m.client_payload(&key([10, 0, 0, 4], 1), 0, true, huge.as_bytes());
        assert_eq!(m.learned(), 1);
    }
}
