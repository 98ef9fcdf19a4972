//! labserver: a small HTTP/1.1 server for the lab's tests (a thread per connection, keep-alive).
//!
//! For every request it appends one line to `--log FILE` (written before the response is sent):
//! `<peer_ip>:<peer_port> <method> <path> <body_len> <sha256 of body hex>`, then answers 200 with the
//! body `ok <path> <body_len>\n`, or with `--response-bytes N` a deterministic body of N bytes
//! (`lab::http::body_bytes(N, 7)`). Request bodies may use Content-Length or chunked coding;
//! `Expect: 100-continue` is honoured. Prints `labserver listening on ADDR` once bound.
//!
//! Slow, small-window receivers for window-stall tests: `--rcvbuf BYTES` sets SO_RCVBUF on the
//! listening socket before listen(2) (accepted connections inherit it, and the SYN-ACK's window
//! scale is chosen from it), `--read-delay-ms MS` sleeps after every piece of request body read,
//! `--read-pause-ms MS` once before reading a request's body (its window closes meanwhile).
//! `--response-delay-ms MS` answers every request that much later (a slower server).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
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
    /// SO_RCVBUF of the listening socket, set before listen(2): every connection starts with
    /// this receive buffer (the kernel doubles the value) and a small window (IPv4 only).
    #[arg(long, value_name = "BYTES")]
    rcvbuf: Option<u32>,
    /// Sleep this many milliseconds after every piece of request body read (a slow reader).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    read_delay_ms: u64,
    /// Sleep this many milliseconds once before reading each request body (a busy server: with
    /// a small --rcvbuf the client meets a zero window).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    read_pause_ms: u64,
    /// Sleep this many milliseconds before answering each request (a slower server).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    response_delay_ms: u64,
}

struct Server {
    log: Option<Mutex<File>>,
    response: Option<Vec<u8>>,
    idle: Duration,
    read_delay: Duration,
    read_pause: Duration,
    response_delay: Duration,
}

/// Sets an integer socket option.
fn set_int_option(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` lives across the call and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket on `addr`; with `rcvbuf`, SO_RCVBUF is set before bind and listen.
fn listen(addr: SocketAddr, rcvbuf: Option<u32>) -> io::Result<TcpListener> {
    let Some(bytes) = rcvbuf else {
        return TcpListener::bind(addr);
    };
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--rcvbuf needs an IPv4 --listen address (e.g. 10.77.0.30:8080)",
        ));
    };
    let bytes = i32::try_from(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "--rcvbuf BYTES must be below 2^31",
        )
    })?;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in that lives across the call; the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
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
        if framing != http::BodyFraming::None && !server.read_pause.is_zero() {
            std::thread::sleep(server.read_pause);
        }
        let mut hasher = Sha256::new();
        let body_len = http::read_body(&mut reader, framing, &mut |b| {
            hasher.update(b);
            if !server.read_delay.is_zero() {
                std::thread::sleep(server.read_delay);
            }
        })?;
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
        if !server.response_delay.is_zero() {
            std::thread::sleep(server.response_delay);
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
    let listener = listen(args.listen, args.rcvbuf).unwrap_or_else(|e| {
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
        read_delay: Duration::from_millis(args.read_delay_ms),
        read_pause: Duration::from_millis(args.read_pause_ms),
        response_delay: Duration::from_millis(args.response_delay_ms),
    });
    lab::serve_connections(
        listener,
        "labserver",
        args.max_threads,
        move |stream, peer| serve(&server, stream, peer),
    )
}
