//! greetserver: a server-first line protocol for the lab's replay tests (a thread per connection).
//!
//! On accept it sends a greeting line of `--greet-bytes` bytes: `220 greet <n> xxx...\r\n`, `n`
//! the connection number (8 digits, so every greeting has the same length). Then it serves lines:
//! - `GET <id>` (`id`: 1 to 64 of `A-Z a-z 0-9 . _ -`): appends `<peer_ip>:<peer_port> <id>` to
//!   `--log FILE` (before answering), then answers `OK <id> <len>\r\n` and `len` payload bytes
//!   (`lab::http::body_bytes(len, 5)`, `len` = `--payload-bytes`);
//! - `QUIT`: answers `221 bye\r\n` and closes the connection (the server closes first);
//! - with `--require-auth TOKEN`, `AUTH TOKEN` must come first (answered `235 ok\r\n`): a
//!   `GET` before it is answered `530 auth required\r\n` and not logged; a wrong token is
//!   answered `535 bad token\r\n`;
//! - anything else (unknown, malformed, over 1024 bytes, not UTF-8): `500 bad command\r\n`,
//!   counted; the connection is closed after 10 of them.
//!
//! Prints `greetserver listening on ADDR` once bound. Lines end with `\n` (a `\r` before it is
//! dropped).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;

/// Longest request line accepted (bytes, without the line end).
const MAX_LINE: usize = 1024;
/// Bad lines after which a connection is closed.
const MAX_BAD_LINES: u32 = 10;
/// Seed of the payload bytes.
const PAYLOAD_SEED: u64 = 5;

#[derive(Debug, Parser)]
#[command(about = "Server-first line-protocol test server for the tcpcopy-rs lab")]
struct Args {
    /// Address to listen on (port 0 picks a free port; see the "listening on" line).
    #[arg(long, default_value = "0.0.0.0:2525")]
    listen: SocketAddr,
    /// Request log file (appended to): one `<peer_ip>:<peer_port> <id>` line per GET.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Length of the greeting line including `\r\n` (at least 24).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    greet_bytes: usize,
    /// Payload bytes after every `OK <id> <len>` line.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    payload_bytes: usize,
    /// Most connections served at once; further ones wait in the listen backlog.
    #[arg(long, default_value_t = 512)]
    max_threads: usize,
    /// Close a connection idle for this many seconds.
    #[arg(long, default_value_t = 65)]
    idle_timeout_s: u64,
    /// Require `AUTH TOKEN` before any GET on a connection.
    #[arg(long, value_name = "TOKEN")]
    require_auth: Option<String>,
}

struct Server {
    log: Option<Mutex<File>>,
    greet_bytes: usize,
    payload: Vec<u8>,
    idle: Duration,
    connections: AtomicU64,
    bad_lines: AtomicU64,
    require_auth: Option<String>,
}

/// The greeting of connection `n`, exactly `len` bytes (at least the unpadded line).
fn greeting(n: u64, len: usize) -> Vec<u8> {
    let mut line = format!("220 greet {:08} ", n % 100_000_000).into_bytes();
    let pad = len.saturating_sub(line.len() + 2);
    line.extend(std::iter::repeat_n(b'x', pad));
    line.extend_from_slice(b"\r\n");
    line
}

/// One request line, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Get(&'a str),
    Auth(&'a str),
    Quit,
    Bad,
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_command(line: &[u8]) -> Command<'_> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Command::Bad;
    };
    match text.split_once(' ') {
        Some(("GET", id)) if valid_id(id) => Command::Get(id),
        Some(("AUTH", token)) if valid_id(token) => Command::Auth(token),
        None if text == "QUIT" => Command::Quit,
        _ => Command::Bad,
    }
}

/// Reads one line (without `\r\n`) into `line`. `Ok(false)` at a clean end of stream; an
/// over-long line is consumed to its end and returned cut at `MAX_LINE + 1` bytes.
fn read_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let mut seen = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if !seen {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed inside a line",
            ));
        }
        seen = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = (MAX_LINE + 1).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(true);
        }
    }
}

/// Serves one connection until the client closes or quits, or errs.
fn serve(server: &Server, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(server.idle))?;
    stream.set_write_timeout(Some(server.idle))?;
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let n = server.connections.fetch_add(1, Ordering::Relaxed);
    out.write_all(&greeting(n, server.greet_bytes))?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut line = Vec::with_capacity(128);
    let mut bad = 0;
    let mut authenticated = server.require_auth.is_none();
    while read_line(&mut reader, &mut line)? {
        let command = if line.len() > MAX_LINE {
            Command::Bad
        } else {
            parse_command(&line)
        };
        match command {
            Command::Auth(token) => {
                if server.require_auth.as_deref() == Some(token) {
                    authenticated = true;
                    out.write_all(b"235 ok\r\n")?;
                } else {
                    out.write_all(b"535 bad token\r\n")?;
                }
            }
            Command::Get(_) if !authenticated => {
                out.write_all(b"530 auth required\r\n")?;
            }
            Command::Get(id) => {
                if let Some(log) = &server.log {
                    let entry = format!("{}:{} {id}\n", peer.ip(), peer.port());
                    let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
                    f.write_all(entry.as_bytes())?;
                    f.flush()?;
                }
                let mut msg = format!("OK {id} {}\r\n", server.payload.len()).into_bytes();
                msg.extend_from_slice(&server.payload);
                out.write_all(&msg)?;
            }
            Command::Quit => {
                out.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            Command::Bad => {
                server.bad_lines.fetch_add(1, Ordering::Relaxed);
                out.write_all(b"500 bad command\r\n")?;
                bad += 1;
                if bad >= MAX_BAD_LINES {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if args.greet_bytes < 24 {
        eprintln!("greetserver: --greet-bytes BYTES must be at least 24");
        std::process::exit(2);
    }
    let log = args.log.as_ref().map(|p| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap_or_else(|e| {
                eprintln!("greetserver: cannot open log {}: {e}", p.display());
                std::process::exit(2);
            })
    });
    let listener = TcpListener::bind(args.listen).unwrap_or_else(|e| {
        eprintln!("greetserver: cannot listen on {}: {e}", args.listen);
        std::process::exit(2);
    });
    let local = listener.local_addr().expect("bound socket has an address");
    println!("greetserver listening on {local}");
    let _ = io::stdout().flush();
    let server = Arc::new(Server {
        log: log.map(Mutex::new),
        greet_bytes: args.greet_bytes,
        payload: lab::http::body_bytes(args.payload_bytes, PAYLOAD_SEED),
        idle: Duration::from_secs(args.idle_timeout_s.max(1)),
        connections: AtomicU64::new(0),
        bad_lines: AtomicU64::new(0),
        require_auth: args.require_auth.clone(),
    });
    lab::serve_connections(
        listener,
        "greetserver",
        args.max_threads,
        move |stream, peer| serve(&server, stream, peer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_have_the_asked_length() {
        let g = greeting(7, 64);
        assert_eq!(g.len(), 64);
        assert!(g.starts_with(b"220 greet 00000007 x"));
        assert!(g.ends_with(b"x\r\n"));
        assert_eq!(greeting(123_456_789, 24).len(), 24);
        assert_eq!(greeting(1, 10).len(), 21);
    }

    #[test]
    fn commands() {
        assert_eq!(parse_command(b"GET c001-r2"), Command::Get("c001-r2"));
        assert_eq!(parse_command(b"QUIT"), Command::Quit);
        for bad in [
            &b"GET"[..],
            b"GET ",
            b"GET a b",
            b"GET a/b",
            b"get a",
            b"QUIT now",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(parse_command(bad), Command::Bad, "{bad:?}");
        }
        let long = format!("GET {}", "a".repeat(65));
        assert_eq!(parse_command(long.as_bytes()), Command::Bad);
    }

    #[test]
    fn lines_are_bounded() {
        let mut input = vec![b'a'; 5000];
        input.extend_from_slice(b"\r\nGET x\r\nQUIT");
        let mut r = BufReader::with_capacity(64, &input[..]);
        let mut line = Vec::new();
        assert!(read_line(&mut r, &mut line).unwrap());
        assert_eq!(line.len(), MAX_LINE + 1);
        assert!(read_line(&mut r, &mut line).unwrap());
        assert_eq!(line, b"GET x");
        assert!(read_line(&mut r, &mut line).is_err());
        assert!(!read_line(&mut r, &mut line).unwrap());
    }
}
