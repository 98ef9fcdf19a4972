//! Servers the harness starts in lab hosts: nginx and `labserver`, with readers for their logs.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::http;
use crate::proc::{read_lossy, Proc};

/// Static files every lab nginx serves under `/static/`: (name, size in bytes). The content of
/// `/static/NAME` is [`static_file_bytes`]`(NAME)`.
pub const STATIC_FILES: &[(&str, usize)] = &[
    ("1k", 1024),
    ("4k", 4096),
    ("64k", 64 * 1024),
    ("256k", 256 * 1024),
    ("1m", 1024 * 1024),
    ("4m", 4 * 1024 * 1024),
];

/// The nginx access-log format: `$remote_addr:$remote_port $request_method $request_uri $status
/// $request_length $connection $connection_requests` (parsed by [`AccessEntry::parse`]).
pub const NGINX_LOG_FORMAT: &str =
    "$remote_addr:$remote_port $request_method $request_uri $status \
                                    $request_length $connection $connection_requests";

/// Content of the static file `name` (one of [`STATIC_FILES`]); `None` for an unknown name.
pub fn static_file_bytes(name: &str) -> Option<Vec<u8>> {
    STATIC_FILES
        .iter()
        .position(|(n, _)| *n == name)
        .map(|i| http::body_bytes(STATIC_FILES[i].1, 1000 + i as u64))
}

/// One line of a lab nginx access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// Client address and port as nginx saw them.
    pub peer: SocketAddrV4,
    /// Request method.
    pub method: String,
    /// Request URI (path and query as sent).
    pub uri: String,
    /// Response status.
    pub status: u16,
    /// Request length in bytes (line, headers and body).
    pub request_length: u64,
    /// nginx's connection serial number.
    pub connection: u64,
    /// Number of this request on its connection (1 for the first).
    pub connection_requests: u64,
}

impl AccessEntry {
    /// Parses a line written with [`NGINX_LOG_FORMAT`]; `None` if it does not match.
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [peer, method, uri, status, len, conn, reqs] = f[..] else {
            return None;
        };
        Some(AccessEntry {
            peer: peer.parse().ok()?,
            method: method.to_string(),
            uri: uri.to_string(),
            status: status.parse().ok()?,
            request_length: len.parse().ok()?,
            connection: conn.parse().ok()?,
            connection_requests: reqs.parse().ok()?,
        })
    }
}

/// One line of a `labserver` request log: `<peer_ip>:<peer_port> <method> <path> <body_len> <sha256>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabserverEntry {
    /// Client address and port as the server saw them.
    pub peer: SocketAddrV4,
    /// Request method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Request body length.
    pub body_len: u64,
    /// Lower-case hex SHA-256 of the request body.
    pub sha256: String,
}

impl LabserverEntry {
    /// Parses one log line; `None` if it does not match.
    pub fn parse(line: &str) -> Option<LabserverEntry> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [peer, method, path, len, sha] = f[..] else {
            return None;
        };
        Some(LabserverEntry {
            peer: peer.parse().ok()?,
            method: method.to_string(),
            path: path.to_string(),
            body_len: len.parse().ok()?,
            sha256: sha.to_string(),
        })
    }
}

fn lines_of(path: &Path) -> Vec<String> {
    read_lossy(path)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Polls `count` until it stays unchanged for `quiet` (or `max` passes); returns the last value.
pub fn settle(mut count: impl FnMut() -> usize, quiet: Duration, max: Duration) -> usize {
    let deadline = Instant::now() + max;
    let mut last = count();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50).min(quiet));
        let now = count();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// Polls `count` until it reaches `want` (or `max` passes); returns the last value.
pub fn wait_count(mut count: impl FnMut() -> usize, want: usize, max: Duration) -> usize {
    let deadline = Instant::now() + max;
    loop {
        let n = count();
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx running in a lab host with its own config, logs and static files (see [`crate::Lab::nginx`]).
/// Dropping it stops nginx.
#[derive(Debug)]
pub struct Nginx {
    pub(crate) proc: Proc,
    pub(crate) dir: PathBuf,
    pub(crate) addr: SocketAddrV4,
}

impl Nginx {
    /// Writes the configuration and static files for an nginx on `addr` into `dir`; returns the
    /// config file path.
    pub(crate) fn prepare(dir: &Path, addr: SocketAddrV4) -> anyhow::Result<PathBuf> {
        for sub in ["logs", "tmp", "www/static"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("mkdir {}", dir.display()))?;
        }
        for (name, _) in STATIC_FILES {
            let bytes = static_file_bytes(name).expect("listed file");
            fs::write(dir.join("www/static").join(name), bytes)?;
        }
        let d = dir.display();
        let mut temp_paths = String::new();
        let built = nginx_build_flags();
        for module in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            if module != "client_body" && built.contains(&format!("--without-http_{module}_module"))
            {
                continue;
            }
            let _ = writeln!(temp_paths, "    {module}_temp_path {d}/tmp/{module};");
        }
        let conf = format!(
            r#"# written by the lab harness
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/logs/error.log notice;
events {{
    worker_connections 8192;
}}
http {{
    default_type text/plain;
    log_format lab '{NGINX_LOG_FORMAT}';
    access_log {d}/logs/access.log lab;
    keepalive_requests 100000;
    keepalive_timeout 65;
    client_max_body_size 64m;
    tcp_nodelay on;
{temp_paths}    server {{
        listen {addr} backlog=4096;
        server_name _;
        location /static/ {{
            root {d}/www;
        }}
        location / {{
            return 200 "ok $uri\n";
        }}
    }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, conf)?;
        Ok(path)
    }

    /// The address nginx listens on (`host address:port`).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Directory with `nginx.conf`, `logs/`, `tmp/` and `www/static/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the access log.
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.join("logs/access.log")
    }

    /// Non-empty lines of the access log so far.
    pub fn access_log_lines(&self) -> Vec<String> {
        lines_of(&self.access_log_path())
    }

    /// Parsed access-log entries (lines that do not parse are skipped).
    pub fn entries(&self) -> Vec<AccessEntry> {
        self.access_log_lines()
            .iter()
            .filter_map(|l| AccessEntry::parse(l))
            .collect()
    }

    /// Request URIs in log order.
    pub fn paths(&self) -> Vec<String> {
        self.entries().into_iter().map(|e| e.uri).collect()
    }

    /// Number of access-log lines.
    pub fn count(&self) -> usize {
        self.access_log_lines().len()
    }

    /// Waits until the request count stops changing for `quiet` (bounded by `max`); returns it.
    pub fn settle(&self, quiet: Duration, max: Duration) -> usize {
        settle(|| self.count(), quiet, max)
    }

    /// Waits until at least `want` requests are logged (bounded by `max`); returns the count.
    pub fn wait_count(&self, want: usize, max: Duration) -> usize {
        wait_count(|| self.count(), want, max)
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        read_lossy(&self.dir.join("logs/error.log"))
    }

    /// The nginx process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// `labserver` running in a lab host (see [`crate::Lab::labserver`]). Dropping it stops the server.
#[derive(Debug)]
pub struct Labserver {
    pub(crate) proc: Proc,
    pub(crate) log: PathBuf,
    pub(crate) addr: SocketAddrV4,
}

impl Labserver {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Path of its request log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Non-empty request-log lines so far.
    pub fn lines(&self) -> Vec<String> {
        lines_of(&self.log)
    }

    /// Parsed request-log entries.
    pub fn entries(&self) -> Vec<LabserverEntry> {
        self.lines()
            .iter()
            .filter_map(|l| LabserverEntry::parse(l))
            .collect()
    }

    /// Number of logged requests.
    pub fn count(&self) -> usize {
        self.lines().len()
    }

    /// Waits until the request count stops changing for `quiet` (bounded by `max`); returns it.
    pub fn settle(&self, quiet: Duration, max: Duration) -> usize {
        settle(|| self.count(), quiet, max)
    }

    /// Waits until at least `want` requests are logged (bounded by `max`); returns the count.
    pub fn wait_count(&self, want: usize, max: Duration) -> usize {
        wait_count(|| self.count(), want, max)
    }

    /// The server process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

fn nginx_build_flags() -> String {
    std::process::Command::new("nginx")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default()
}

/// Fails unless `nginx` is on PATH.
pub(crate) fn check_nginx() -> anyhow::Result<()> {
    if nginx_build_flags().contains("nginx version") {
        Ok(())
    } else {
        bail!("nginx not found on PATH; install it with scripts/setup.sh (apt-get install nginx-light)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_access_and_labserver_lines() {
        let e = AccessEntry::parse("10.77.0.10:40000 GET /p/000001 200 87 5 2").unwrap();
        assert_eq!(e.peer, "10.77.0.10:40000".parse().unwrap());
        assert_eq!(
            (
                e.status,
                e.request_length,
                e.connection,
                e.connection_requests
            ),
            (200, 87, 5, 2)
        );
        assert!(AccessEntry::parse("garbage").is_none());
        assert!(AccessEntry::parse("10.77.0.10:1 GET /x 200 1 1").is_none());

        let l = LabserverEntry::parse("10.77.0.20:5555 POST /up 3 abc").unwrap();
        assert_eq!(
            (l.method.as_str(), l.path.as_str(), l.body_len),
            ("POST", "/up", 3)
        );
        assert!(LabserverEntry::parse("10.77.0.20:5555 POST /up x abc").is_none());
    }

    #[test]
    fn static_files_are_deterministic_and_sized() {
        for (name, size) in STATIC_FILES {
            assert_eq!(static_file_bytes(name).unwrap().len(), *size);
        }
        assert_ne!(
            static_file_bytes("1k").unwrap(),
            static_file_bytes("4k").unwrap()[..1024]
        );
        assert!(static_file_bytes("2k").is_none());
    }

    #[test]
    fn settle_and_wait_count_are_bounded() {
        let mut n = 0;
        assert_eq!(
            settle(
                || {
                    n += 1;
                    n.min(3)
                },
                Duration::from_millis(100),
                Duration::from_secs(5)
            ),
            3
        );
        assert_eq!(wait_count(|| 1, 5, Duration::from_millis(50)), 1);
    }

    /// `nginx -t` accepts the generated configuration. nginx is a requirement of the lab (the
    /// project's scripts install it): without it this test fails, naming the fix.
    #[test]
    fn nginx_config_is_valid() {
        if let Err(e) = check_nginx() {
            panic!("{e:#}: run scripts/setup.sh (as root) to install nginx");
        }
        let dir = std::env::temp_dir().join(format!("lab-nginx-conf-{}", std::process::id()));
        let conf = Nginx::prepare(&dir, "127.0.0.1:1".parse().unwrap()).unwrap();
        let out = std::process::Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
