//! labserver: a small HTTP/1.1 server for the lab's tests (a thread per connection, keep-alive).
//!
//! For every request it appends one line to `--log FILE` (written before the response is sent):
//! `<peer_ip>:<peer_port> <method> <path> <body_len> <sha256 of body hex>`, then answers 200 with the
//! body `ok <path> <body_len>\n`, or with `--response-bytes N` a deterministic body of N bytes
//! (`lab::http::body_bytes(N, 7)`). Request bodies may use Content-Length or chunked coding;
//! `Expect: 100-continue` is honoured. Prints `labserver listening on ADDR` once bound.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use lab::http;
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
#[command(about = "HTTP/1.1 test server for the tcpcopy-rs lab")]
struct Args {
    /// Address to listen on (port 0 picks a free port; see the "listening on" line).
    #[arg(long, default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// Request log file (appended to).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Answer every request with a body of this many bytes instead of "ok PATH BODY_LEN".
    #[arg(long)]
    response_bytes: Option<usize>,
    /// Most connections served at once; further ones wait in the listen backlog.
    #[arg(long, default_value_t = 512)]
    max_threads: usize,
    /// Close a connection idle (or stalled mid-request) for this many seconds.
    #[arg(long, default_value_t = 65)]
    idle_timeout_s: u64,
}

struct Server {
    log: Option<Mutex<File>>,
    response: Option<Vec<u8>>,
    idle: Duration,
}

/// Serves one connection until the client closes, asks to close, or errs.
fn serve(server: &Server, stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(server.idle))?;
    stream.set_write_timeout(Some(server.idle))?;
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let Some(head) = http::read_head(&mut reader)? else {
            return Ok(());
        };
        let line = match http::parse_request_line(&head.start_line) {
            Ok(l) => l,
            Err(e) => {
                let _ = out.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return Err(e);
            }
        };
        let framing = match http::request_framing(&head) {
            Ok(f) => f,
            Err(e) => {
                let _ = out.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return Err(e);
            }
        };
        if framing != http::BodyFraming::None && head.has_token("expect", "100-continue") {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut hasher = Sha256::new();
        let body_len = http::read_body(&mut reader, framing, &mut |b| hasher.update(b))?;
        let sha = http::hex(&hasher.finalize());
        if let Some(log) = &server.log {
            let entry = format!(
                "{}:{} {} {} {} {}\n",
                peer.ip(),
                peer.port(),
                line.method,
                line.target,
                body_len,
                sha
            );
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(entry.as_bytes())?;
            f.flush()?;
        }
        let keep = http::keeps_alive(line.minor, &head);
        let small;
        let body: &[u8] = match &server.response {
            Some(b) => b,
            None => {
                small = format!("ok {} {}\n", line.target, body_len);
                small.as_bytes()
            }
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: labserver\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            body.len(),
            if keep { "keep-alive" } else { "close" }
        );
        if body.len() <= 16 * 1024 {
            let mut msg = head.into_bytes();
            msg.extend_from_slice(body);
            out.write_all(&msg)?;
        } else {
            out.write_all(head.as_bytes())?;
            out.write_all(body)?;
        }
        if !keep {
            let _ = out.flush();
            return Ok(());
        }
    }
}

fn main() {
    let args = Args::parse();
    let log = args.log.as_ref().map(|p| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap_or_else(|e| {
                eprintln!("labserver: cannot open log {}: {e}", p.display());
                std::process::exit(2);
            })
    });
    let listener = TcpListener::bind(args.listen).unwrap_or_else(|e| {
        eprintln!("labserver: cannot listen on {}: {e}", args.listen);
        std::process::exit(2);
    });
    let local = listener.local_addr().expect("bound socket has an address");
    println!("labserver listening on {local}");
    let _ = io::stdout().flush();
    let server = Arc::new(Server {
        log: log.map(Mutex::new),
        response: args.response_bytes.map(|n| http::body_bytes(n, 7)),
        idle: Duration::from_secs(args.idle_timeout_s.max(1)),
    });
    let active = Arc::new(AtomicUsize::new(0));
    let max = args.max_threads.max(1);
    loop {
        while active.load(Ordering::Acquire) >= max {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("labserver: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        active.fetch_add(1, Ordering::AcqRel);
        let (server, conn_active) = (Arc::clone(&server), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{peer}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve(&server, stream, peer) {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) {
                        eprintln!("labserver: {peer}: {e}");
                    }
                }
                conn_active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            eprintln!("labserver: cannot start a thread: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
