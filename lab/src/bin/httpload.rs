//! httpload: a bounded HTTP/1.1 load client for the lab (std threads and sockets).
//!
//! Request `i` (0-based) goes to `lab::http::load_path(path_prefix, tag, i)`, e.g. `/p/000123` or
//! `/p/TAG-000123`. `--mode close` opens one connection per request (`Connection: close`) from
//! `--concurrency` workers; `--mode keepalive` spreads the requests over `--connections` persistent
//! connections (connection `j` sends requests `j, j+C, j+2C, ...` in order); with `--pipeline N`
//! a keep-alive connection writes N of its requests (in `--pipeline-writes` writes) before it reads
//! their responses in order. `--rcvbuf` and `--read-delay-ms` make a slow, small-window reader.
//! Prints
//! `requests=N ok=K failed=F elapsed_ms=... rps=...` (or, with `--json`, one JSON report line) and
//! exits 0 only if every request got a 2xx answer with a complete body.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use lab::http::{self, load_path};
use lab::{Latency, LoadReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One connection per request, `Connection: close`.
    Close,
    /// `--connections` persistent connections share the requests.
    Keepalive,
}

#[derive(Debug, Parser)]
#[command(about = "Bounded HTTP/1.1 load client for the tcpcopy-rs lab")]
struct Args {
    /// Server address IP:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// Number of requests.
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Connection handling.
    #[arg(long, value_enum, default_value_t = Mode::Close)]
    mode: Mode,
    /// Persistent connections (keepalive mode).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Parallel workers (close mode).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Path prefix; request i gets PREFIX[TAG-]NNNNNN.
    #[arg(long, default_value = "/p/")]
    path_prefix: String,
    /// Send every request to this fixed path instead (e.g. /static/1m); --path-prefix and --tag are
    /// then ignored.
    #[arg(long)]
    path: Option<String>,
    /// Tag inserted in every path so two runs never collide.
    #[arg(long)]
    tag: Option<String>,
    /// POST a deterministic pseudo-random body of this many bytes instead of GET.
    #[arg(long)]
    post_bytes: Option<usize>,
    /// Seed of the POST body (see lab::http::body_bytes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send the POST body with chunked transfer coding instead of Content-Length.
    #[arg(long)]
    chunked: bool,
    /// Chunk size for --chunked.
    #[arg(long, default_value_t = 16384)]
    chunk_bytes: usize,
    /// Limit on requests per second across all workers.
    #[arg(long)]
    rate: Option<f64>,
    /// Bound on the whole run, seconds; requests not started by then fail.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Bound on each connect, read and write, seconds.
    #[arg(long, default_value_t = 10.0)]
    io_timeout_s: f64,
    /// Host header (default: the target address).
    #[arg(long)]
    host: Option<String>,
    /// Print one JSON report line instead of the summary line (the summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// Keep-alive mode: write this many requests before reading the first response, then read
    /// their responses in order (HTTP pipelining); 1: one request at a time.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pipeline: usize,
    /// Split each pipelined batch over this many writes, all made before the first response is
    /// read (1..=--pipeline); 1: the whole batch in one write.
    #[arg(long, value_name = "W", default_value_t = 1)]
    pipeline_writes: usize,
    /// SO_RCVBUF of every connection, set right after connect (the window scale stays as
    /// negotiated; the advertised window shrinks to about this size).
    #[arg(long, value_name = "BYTES")]
    rcvbuf: Option<u32>,
    /// Sleep this many milliseconds after every piece of response body read (a slow reader).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    read_delay_ms: u64,
    /// Sleep this many milliseconds once per response, after the first piece of its body (a
    /// client that stops reading: with a small --rcvbuf its window closes).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    read_pause_ms: u64,
}

/// Per-worker tallies, merged at the end.
#[derive(Debug, Default)]
struct Tally {
    attempted: u64,
    ok: u64,
    connections: u64,
    retries: u64,
    bytes_sent: u64,
    body_bytes: u64,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    samples: Vec<String>,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn error(&mut self, kind: &'static str, msg: String) {
        *self.errors.entry(kind).or_default() += 1;
        if self.samples.len() < 5 {
            self.samples.push(msg);
        }
    }

    fn merge(&mut self, o: Tally) {
        self.attempted += o.attempted;
        self.ok += o.ok;
        self.connections += o.connections;
        self.retries += o.retries;
        self.bytes_sent += o.bytes_sent;
        self.body_bytes += o.body_bytes;
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for s in o.samples {
            if self.samples.len() < 5 {
                self.samples.push(s);
            }
        }
        self.latencies_us.extend(o.latencies_us);
    }
}

/// What every worker shares.
struct Shared {
    args: Args,
    body: Vec<u8>,
    start: Instant,
    deadline: Instant,
    io_timeout: Duration,
    next: AtomicU64,
    host_header: String,
    read_delay: Duration,
    read_pause: Duration,
}

#[derive(Debug)]
enum Failure {
    /// Nothing of the response arrived on a reused connection: the server may have closed it.
    StaleConnection(io::Error),
    Other(&'static str, String),
}

fn classify(e: &io::Error, phase: &str) -> &'static str {
    use io::ErrorKind::*;
    match (phase, e.kind()) {
        ("connect", TimedOut | WouldBlock) => "connect_timeout",
        ("connect", ConnectionRefused) => "connect_refused",
        ("connect", _) => "connect_error",
        (_, TimedOut | WouldBlock) => "read_timeout",
        (_, UnexpectedEof) => "eof",
        (_, ConnectionReset | ConnectionAborted | BrokenPipe) => "reset",
        (_, InvalidData) => "invalid",
        _ => "io",
    }
}

struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    used: u64,
}

impl Shared {
    fn remaining(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn io_bound(&self) -> Option<Duration> {
        self.remaining().map(|r| r.min(self.io_timeout))
    }

    fn connect(&self, tally: &mut Tally) -> Result<Conn, Failure> {
        let bound = self
            .io_bound()
            .ok_or(Failure::Other("not_started", "deadline passed".into()))?;
        tally.connections += 1;
        let stream = TcpStream::connect_timeout(&self.args.target, bound).map_err(|e| {
            Failure::Other(
                classify(&e, "connect"),
                format!("connect {}: {e}", self.args.target),
            )
        })?;
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = self.args.rcvbuf {
            set_rcvbuf(&stream, bytes)
                .map_err(|e| Failure::Other("io", format!("SO_RCVBUF: {e}")))?;
        }
        let reader = BufReader::with_capacity(
            64 * 1024,
            stream
                .try_clone()
                .map_err(|e| Failure::Other("io", format!("clone: {e}")))?,
        );
        Ok(Conn {
            stream,
            reader,
            used: 0,
        })
    }

    fn path(&self, i: u64) -> String {
        match &self.args.path {
            Some(p) => p.clone(),
            None => load_path(&self.args.path_prefix, self.args.tag.as_deref(), i),
        }
    }

    /// Wait for the rate limiter's slot of request `i`; false if the deadline comes first.
    fn pace(&self, i: u64) -> bool {
        if let Some(rate) = self.args.rate.filter(|r| *r > 0.0) {
            let due = self.start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                if due >= self.deadline {
                    return false;
                }
                std::thread::sleep(due - now);
            }
        }
        self.remaining().is_some()
    }

    fn request_bytes(&self, path: &str, close: bool) -> Vec<u8> {
        let method = if self.args.post_bytes.is_some() {
            "POST"
        } else {
            "GET"
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lab-httpload\r\nConnection: {}\r\n",
            self.host_header,
            if close { "close" } else { "keep-alive" }
        );
        if self.args.post_bytes.is_some() {
            head.push_str("Content-Type: application/octet-stream\r\n");
            if self.args.chunked {
                head.push_str("Transfer-Encoding: chunked\r\n");
            } else {
                head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
            }
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if self.args.post_bytes.is_some() {
            if self.args.chunked {
                for chunk in self.body.chunks(self.args.chunk_bytes.max(1)) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            } else {
                out.extend_from_slice(&self.body);
            }
        }
        out
    }

    /// One request/response exchange on `conn`. Returns whether the connection can be reused.
    fn exchange(&self, conn: &mut Conn, req: &[u8], tally: &mut Tally) -> Result<bool, Failure> {
        let bound = self
            .io_bound()
            .ok_or(Failure::Other("not_started", "deadline passed".into()))?;
        let _ = conn.stream.set_write_timeout(Some(bound));
        let _ = conn.stream.set_read_timeout(Some(bound));
        let reused = conn.used > 0;
        conn.used += 1;
        if let Err(e) = conn.stream.write_all(req) {
            if reused && classify(&e, "write") == "reset" {
                return Err(Failure::StaleConnection(e));
            }
            return Err(Failure::Other(classify(&e, "write"), format!("write: {e}")));
        }
        tally.bytes_sent += req.len() as u64;
        let (mut body, mut pieces) = (0u64, 0u64);
        match http::read_response(&mut conn.reader, &mut |b| {
            self.slow_down(pieces);
            pieces += 1;
            body += b.len() as u64;
        }) {
            Ok(Some(resp)) => {
                *tally.status.entry(resp.status).or_default() += 1;
                tally.body_bytes += resp.body_len;
                if !(200..300).contains(&resp.status) {
                    return Err(Failure::Other("status", format!("status {}", resp.status)));
                }
                Ok(resp.keep_alive)
            }
            Ok(None) if reused => Err(Failure::StaleConnection(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the response",
            ))),
            Ok(None) => Err(Failure::Other("eof", "closed before the response".into())),
            Err(e) if reused && body == 0 && classify(&e, "read") == "reset" => {
                Err(Failure::StaleConnection(e))
            }
            Err(e) => Err(Failure::Other(classify(&e, "read"), format!("read: {e}"))),
        }
    }

    /// The pauses of a slow reader before it takes piece `piece` (0-based) of a response body:
    /// `--read-delay-ms` before every piece, plus `--read-pause-ms` after the first one.
    fn slow_down(&self, piece: u64) {
        let mut pause = self.read_delay;
        if piece == 1 {
            pause += self.read_pause;
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }

    /// Pipelined exchange: writes all of `reqs` (in `--pipeline-writes` writes), then reads their
    /// responses in order. Returns how many were answered with a 2xx and, on success, whether the
    /// connection can be reused.
    fn exchange_batch(
        &self,
        conn: &mut Conn,
        reqs: &[Vec<u8>],
        tally: &mut Tally,
    ) -> (u64, Result<bool, Failure>) {
        let Some(bound) = self.io_bound() else {
            return (
                0,
                Err(Failure::Other("not_started", "deadline passed".into())),
            );
        };
        let _ = conn.stream.set_write_timeout(Some(bound));
        let _ = conn.stream.set_read_timeout(Some(bound));
        let reused = conn.used > 0;
        conn.used += reqs.len() as u64;
        let writes = self.args.pipeline_writes.clamp(1, reqs.len().max(1));
        let per_write = reqs.len().div_ceil(writes);
        for group in reqs.chunks(per_write.max(1)) {
            let bytes = group.concat();
            if let Err(e) = conn.stream.write_all(&bytes) {
                if reused && classify(&e, "write") == "reset" {
                    return (0, Err(Failure::StaleConnection(e)));
                }
                return (
                    0,
                    Err(Failure::Other(classify(&e, "write"), format!("write: {e}"))),
                );
            }
            tally.bytes_sent += bytes.len() as u64;
        }
        for k in 0..reqs.len() {
            let answered = k as u64;
            let (mut body, mut pieces) = (0u64, 0u64);
            match http::read_response(&mut conn.reader, &mut |b| {
                self.slow_down(pieces);
                pieces += 1;
                body += b.len() as u64;
            }) {
                Ok(Some(resp)) => {
                    *tally.status.entry(resp.status).or_default() += 1;
                    tally.body_bytes += resp.body_len;
                    if !(200..300).contains(&resp.status) {
                        let msg = format!("status {}", resp.status);
                        return (answered, Err(Failure::Other("status", msg)));
                    }
                    if k + 1 == reqs.len() {
                        return (answered + 1, Ok(resp.keep_alive));
                    }
                    if !resp.keep_alive {
                        let msg = "server closed with pipelined requests unanswered".into();
                        return (answered + 1, Err(Failure::Other("eof", msg)));
                    }
                }
                Ok(None) if reused && k == 0 => {
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the response");
                    return (0, Err(Failure::StaleConnection(e)));
                }
                Ok(None) => {
                    return (
                        answered,
                        Err(Failure::Other("eof", "closed before the response".into())),
                    )
                }
                Err(e) if reused && body == 0 && k == 0 && classify(&e, "read") == "reset" => {
                    return (0, Err(Failure::StaleConnection(e)))
                }
                Err(e) => {
                    let kind = classify(&e, "read");
                    return (answered, Err(Failure::Other(kind, format!("read: {e}"))));
                }
            }
        }
        (reqs.len() as u64, Ok(true))
    }

    /// Sends the requests `batch` pipelined on `conn` (a keep-alive connection, opened if none).
    /// Retries the whole batch once on a fresh connection if a reused one turns out closed.
    fn request_batch(&self, batch: &[u64], conn: &mut Option<Conn>, tally: &mut Tally) {
        let paths: Vec<String> = batch.iter().map(|&i| self.path(i)).collect();
        let reqs: Vec<Vec<u8>> = paths.iter().map(|p| self.request_bytes(p, false)).collect();
        tally.attempted += batch.len() as u64;
        let started = Instant::now();
        let mut retried = false;
        let (answered, result) = loop {
            if conn.is_none() {
                match self.connect(tally) {
                    Ok(c) => *conn = Some(c),
                    Err(f) => break (0, Err(f)),
                }
            }
            let c = conn.as_mut().expect("connected above");
            match self.exchange_batch(c, &reqs, tally) {
                (0, Err(Failure::StaleConnection(_))) if !retried => {
                    retried = true;
                    tally.retries += 1;
                    *conn = None;
                }
                other => break other,
            }
        };
        tally.ok += answered;
        let us = started.elapsed().as_micros() as u64;
        tally
            .latencies_us
            .extend(std::iter::repeat_n(us, answered as usize));
        match result {
            Ok(true) => {}
            Ok(false) => {
                if let Some(c) = conn.take() {
                    finish_close(c, self.io_timeout);
                }
            }
            Err(f) => {
                *conn = None;
                let (kind, msg) = match f {
                    Failure::StaleConnection(e) => (classify(&e, "read"), e.to_string()),
                    Failure::Other(kind, msg) => (kind, msg),
                };
                for path in &paths[answered as usize..] {
                    tally.error(kind, format!("{path}: {msg}"));
                }
            }
        }
    }

    /// Sends request `i`, on `conn` if given (keep-alive), else on a fresh connection that is closed
    /// afterwards. Retries once on a fresh connection if a reused one turns out closed.
    fn request(&self, i: u64, conn: &mut Option<Conn>, keepalive: bool, tally: &mut Tally) {
        let path = self.path(i);
        let req = self.request_bytes(&path, !keepalive);
        tally.attempted += 1;
        let started = Instant::now();
        let mut retried = false;
        let result = loop {
            if conn.is_none() {
                match self.connect(tally) {
                    Ok(c) => *conn = Some(c),
                    Err(f) => break Err(f),
                }
            }
            let c = conn.as_mut().expect("connected above");
            match self.exchange(c, &req, tally) {
                Err(Failure::StaleConnection(_)) if !retried => {
                    retried = true;
                    tally.retries += 1;
                    *conn = None;
                }
                other => break other,
            }
        };
        match result {
            Ok(reusable) => {
                tally.ok += 1;
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros() as u64);
                if !keepalive || !reusable {
                    if let Some(c) = conn.take() {
                        finish_close(c, self.io_timeout);
                    }
                }
            }
            Err(f) => {
                *conn = None;
                match f {
                    Failure::StaleConnection(e) => {
                        tally.error(classify(&e, "read"), format!("{path}: {e}"))
                    }
                    Failure::Other(kind, msg) => tally.error(kind, format!("{path}: {msg}")),
                }
            }
        }
    }
}

/// Sets SO_RCVBUF on a connected socket.
fn set_rcvbuf(stream: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = i32::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "--rcvbuf above 2^31"))?;
    // SAFETY: `value` lives across the call and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
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

/// After a `Connection: close` exchange, wait (briefly, bounded) for the server's FIN so the server
/// closes first, as with ordinary clients; then drop the socket.
fn finish_close(mut c: Conn, io_timeout: Duration) {
    use std::io::BufRead;
    let _ = c
        .stream
        .set_read_timeout(Some(io_timeout.min(Duration::from_secs(1))));
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match c.reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => {
                let n = buf.len();
                c.reader.consume(n);
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run(args: Args) -> LoadReport {
    let body = args
        .post_bytes
        .map(|n| http::body_bytes(n, args.seed))
        .unwrap_or_default();
    let start = Instant::now();
    let shared = Arc::new(Shared {
        host_header: args.host.clone().unwrap_or_else(|| args.target.to_string()),
        io_timeout: Duration::from_secs_f64(args.io_timeout_s.max(0.001)),
        deadline: start + Duration::from_secs_f64(args.timeout_s.max(0.001)),
        start,
        body,
        next: AtomicU64::new(0),
        read_delay: Duration::from_millis(args.read_delay_ms),
        read_pause: Duration::from_millis(args.read_pause_ms),
        args,
    });
    let n = shared.args.requests;
    let workers: Vec<_> = match shared.args.mode {
        Mode::Close => (0..shared.args.concurrency.max(1) as u64)
            .map(|_| {
                let s = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let mut t = Tally::default();
                    loop {
                        let i = s.next.fetch_add(1, Ordering::Relaxed);
                        if i >= n || !s.pace(i) {
                            break;
                        }
                        s.request(i, &mut None, false, &mut t);
                    }
                    t
                })
            })
            .collect(),
        Mode::Keepalive => {
            let c = (shared.args.connections.max(1) as u64).min(n.max(1));
            (0..c)
                .map(|j| {
                    let s = Arc::clone(&shared);
                    std::thread::spawn(move || {
                        let mut t = Tally::default();
                        let mut conn = None;
                        let mut i = j;
                        let depth = s.args.pipeline.max(1);
                        if depth == 1 {
                            while i < n && s.pace(i) {
                                s.request(i, &mut conn, true, &mut t);
                                i += c;
                            }
                            return t;
                        }
                        let mut batch = Vec::with_capacity(depth);
                        loop {
                            batch.clear();
                            while batch.len() < depth && i < n && s.pace(i) {
                                batch.push(i);
                                i += c;
                            }
                            if batch.is_empty() {
                                break;
                            }
                            s.request_batch(&batch, &mut conn, &mut t);
                        }
                        t
                    })
                })
                .collect()
        }
    };
    let mut total = Tally::default();
    for w in workers {
        match w.join() {
            Ok(t) => total.merge(t),
            Err(_) => total.error("panic", "a worker panicked".into()),
        }
    }
    let elapsed = start.elapsed();
    let not_started = n.saturating_sub(total.attempted);
    if not_started > 0 {
        *total.errors.entry("not_started").or_default() += not_started;
    }
    total.latencies_us.sort_unstable();
    let l = &total.latencies_us;
    let a = &shared.args;
    LoadReport {
        target: a.target.to_string(),
        mode: format!("{:?}", a.mode).to_lowercase(),
        requests: n,
        ok: total.ok,
        failed: n - total.ok,
        not_started,
        elapsed_ms: elapsed.as_millis() as u64,
        rps: total.ok as f64 / elapsed.as_secs_f64().max(1e-9),
        connections_opened: total.connections,
        retries: total.retries,
        bytes_sent: total.bytes_sent,
        body_bytes_received: total.body_bytes,
        status: total
            .status
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        errors: total
            .errors
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        error_samples: total.samples,
        latency_us: Latency {
            p50: percentile(l, 0.50),
            p90: percentile(l, 0.90),
            p99: percentile(l, 0.99),
            max: l.last().copied().unwrap_or(0),
        },
        first_path: shared.path(0),
        last_path: shared.path(n.saturating_sub(1)),
        body_len: shared.body.len() as u64,
        body_sha256: if a.post_bytes.is_some() {
            http::sha256_hex(&shared.body)
        } else {
            String::new()
        },
    }
}

fn main() {
    let args = Args::parse();
    if let Some(tag) = &args.tag {
        if tag.contains(|c: char| c.is_whitespace() || c.is_control()) {
            eprintln!("httpload: --tag must not contain whitespace");
            std::process::exit(2);
        }
    }
    if args.path_prefix.contains(|c: char| c.is_whitespace()) || !args.path_prefix.starts_with('/')
    {
        eprintln!("httpload: --path-prefix must start with '/' and contain no whitespace");
        std::process::exit(2);
    }
    if args.pipeline == 0 {
        eprintln!("httpload: --pipeline N must be at least 1");
        std::process::exit(2);
    }
    if args.pipeline > 1 && args.mode != Mode::Keepalive {
        eprintln!("httpload: --pipeline N above 1 needs --mode keepalive");
        std::process::exit(2);
    }
    if args.pipeline_writes == 0 || args.pipeline_writes > args.pipeline {
        eprintln!("httpload: --pipeline-writes W must be in 1..=--pipeline");
        std::process::exit(2);
    }
    let json = args.json;
    let report = run(args);
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
        eprintln!("{}", report.summary_line());
    } else {
        if !report.body_sha256.is_empty() {
            println!(
                "post_body sha256={} len={}",
                report.body_sha256, report.body_len
            );
        }
        if !report.errors.is_empty() {
            println!("errors: {:?}", report.errors);
            for s in &report.error_samples {
                println!("  e.g. {s}");
            }
        }
        println!("{}", report.summary_line());
    }
    std::process::exit(if report.all_ok() { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "httpload",
            "--target",
            "10.77.0.20:80",
            "--mode",
            "keepalive",
            "--post-bytes",
            "10",
        ])
        .unwrap();
        assert_eq!(a.mode, Mode::Keepalive);
        assert!(Args::try_parse_from(["httpload", "--target", "nope"]).is_err());
        let p = Args::try_parse_from([
            "httpload",
            "--target",
            "10.77.0.20:80",
            "--pipeline",
            "8",
            "--pipeline-writes",
            "4",
            "--rcvbuf",
            "4096",
            "--read-pause-ms",
            "100",
        ])
        .unwrap();
        assert_eq!(
            (p.pipeline, p.pipeline_writes, p.rcvbuf),
            (8, 4, Some(4096))
        );
        assert!(
            Args::try_parse_from(["httpload", "--target", "1.2.3.4:5", "--pipeline", "x"]).is_err()
        );
    }
}
