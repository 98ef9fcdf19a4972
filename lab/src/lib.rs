//! The tcpcopy-rs lab harness: four hosts (client, online, target, assistant) in network namespaces on
//! one bridge, built by `scripts/lab.sh`, with helpers to run programs, nginx and `labserver` in them.
//!
//! ```text
//!  client 10.77.0.10 --HTTP--> online 10.77.0.20:80 (nginx; tcpcopy captures here)
//!                               tcpcopy --(client address as source)--> target 10.77.0.30:8080 (nginx)
//!  target routes 10.77.0.10/32 and 10.9.9.0/24 via assistant 10.77.0.40 (intercept; ip_forward=0)
//!  control channel: tcpcopy (online) -> intercept (assistant) :36524
//! ```
//!
//! Every host has one interface, [`IFACE`] (`eth0`), permanent neighbour entries for the others,
//! rp_filter 0 and IPv6 disabled; offloads are off unless [`LabConfig::offloads`] is set. With
//! [`LabConfig::second_online`] the lab has a fifth host, [`Host::Online2`] (10.77.0.21), a second
//! online server on the same bridge (the same clients reach it; the target needs no new route).
//!
//! ```no_run
//! use lab::{Host, Lab};
//! # fn main() -> anyhow::Result<()> {
//! if !lab::require_root() { return Ok(()); }
//! let lab = Lab::up()?;
//! let online = lab.nginx(Host::Online, 80)?;
//! let report = lab.httpload(Host::Client, &["--target", "10.77.0.20:80", "--requests", "100"])?;
//! assert!(report.all_ok());
//! assert_eq!(online.count(), 100);
//! # Ok(()) }
//! ```

mod accept;
pub mod http;
mod proc;
mod report;
mod servers;

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub use accept::serve_connections;
pub use proc::{Proc, STOP_GRACE};
pub use report::{Latency, LoadReport};
pub use servers::{
    settle, static_file_bytes, wait_count, AccessEntry, Labserver, LabserverEntry, Nginx,
    NGINX_LOG_FORMAT, STATIC_FILES,
};

/// Interface name of every host's veth inside its namespace.
pub const IFACE: &str = "eth0";
/// The range the target routes via the assistant, for tcpcopy's `-c` option.
pub const CLIENT_RANGE: &str = "10.9.9.0/24";
/// The intercept control port.
pub const INTERCEPT_PORT: u16 = 36524;
/// Default bound for [`Lab::run`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Lab::nginx`] and [`Lab::labserver`] wait for their port to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the lab hosts: the four every lab has, and [`Host::Online2`] when the lab was brought
/// up with [`LabConfig::second_online`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// The real client, 10.77.0.10.
    Client,
    /// The online server, 10.77.0.20 (nginx :80; tcpcopy runs here).
    Online,
    /// A second online server, 10.77.0.21; only in a lab brought up with
    /// [`LabConfig::second_online`] (elsewhere its namespace does not exist and programs started
    /// there fail to start).
    Online2,
    /// The target server, 10.77.0.30 (nginx :8080, labserver :8081).
    Target,
    /// The assistant, 10.77.0.40 (intercept; receives the target's replies; ip_forward=0).
    Assistant,
}

impl Host {
    /// The four hosts every lab has, in address order (not [`Host::Online2`]).
    pub const ALL: [Host; 4] = [Host::Client, Host::Online, Host::Target, Host::Assistant];

    /// Lower-case name, also the namespace suffix: `client`, `online`, `online2`, `target`,
    /// `assistant`.
    pub fn name(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::Online => "online",
            Host::Online2 => "online2",
            Host::Target => "target",
            Host::Assistant => "assistant",
        }
    }

    /// The host's address.
    pub fn addr(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, self.last_octet())
    }

    /// The MAC address of the host's [`IFACE`] (`02:77:00:00:00:<last octet>`).
    pub fn mac(self) -> [u8; 6] {
        [0x02, 0x77, 0, 0, 0, self.last_octet()]
    }

    fn last_octet(self) -> u8 {
        match self {
            Host::Client => 10,
            Host::Online => 20,
            Host::Online2 => 21,
            Host::Target => 30,
            Host::Assistant => 40,
        }
    }
}

/// Options for [`Lab::up_with`].
#[derive(Debug, Clone, Default)]
pub struct LabConfig {
    /// Leave segmentation/checksum offloads on (`LAB_OFFLOADS=on`), as real NICs do.
    pub offloads: bool,
    /// Namespace prefix; default: unique per process and lab (`tl<pid>x<n>-`).
    pub prefix: Option<String>,
    /// Add a second online host, [`Host::Online2`] (10.77.0.21, `LAB_ONLINE2=on` for
    /// `scripts/lab.sh up`), wired into the bridge like the others.
    pub second_online: bool,
}

/// A running lab. `Drop` tears it down (kills every process in its namespaces, deletes them), also
/// when a test panics; its temp directory is kept (and its path printed) if the thread is panicking
/// or `LAB_KEEP=1`.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    seq: AtomicU32,
    down: bool,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns true when running as root. When not root: panics if `CI=true` (root-only tests must not
/// silently pass there), otherwise prints a skip note and returns false.
pub fn require_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (network namespaces) and CI=true: refusing to skip it");
    }
    eprintln!("note: skipping a root-only lab test (not root; CI is not \"true\")");
    false
}

/// The repository root: `$LAB_ROOT`, else the parent of this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("LAB_ROOT") {
        Some(r) if !r.is_empty() => PathBuf::from(r),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("lab crate lives inside the workspace")
            .to_path_buf(),
    }
}

/// Path of `scripts/lab.sh`.
pub fn lab_script() -> PathBuf {
    repo_root().join("scripts/lab.sh")
}

/// Finds a workspace binary (`httpload`, `labserver`, `tcpcopy`, `intercept`, ...). In order:
/// `$CARGO_BIN_EXE_<name>`; `$LAB_BIN_DIR/<name>`; the profile directory of the running executable
/// (a test binary in `target/<profile>/deps/` finds `target/<profile>/<name>`); then the newer of
/// `target/debug/<name>` and `target/release/<name>` under `$CARGO_TARGET_DIR` or the repo root.
/// Returns the first candidate that exists, else the profile-directory path (which does not exist;
/// spawning it fails with a clear message). Lab's own binaries can be built with
/// [`build_lab_bins`].
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("LAB_BIN_DIR") {
        let p = Path::new(&d).join(name);
        if p.exists() {
            return p;
        }
    }
    let profile_dir = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        Some(if dir.ends_with("deps") {
            dir.parent()?.to_path_buf()
        } else {
            dir.to_path_buf()
        })
    });
    if let Some(p) = profile_dir
        .as_ref()
        .map(|d| d.join(name))
        .filter(|p| p.exists())
    {
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let newest = ["debug", "release"]
        .iter()
        .map(|prof| target.join(prof).join(name))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    if let Some((_, p)) = newest {
        return p;
    }
    profile_dir
        .unwrap_or_else(|| target.join("debug"))
        .join(name)
}

/// Runs `cargo build -p lab --bins` once per process (release profile if the running executable is
/// in `target/release`), so `httpload` and `labserver` exist and are fresh even when the tests of
/// another package run. Skipped when `LAB_NO_BUILD=1`. Bounded: gives up after 10 minutes.
///
/// # Errors
/// If cargo fails or times out (the message has its output).
pub fn build_lab_bins() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var("LAB_NO_BUILD").is_ok_and(|v| v == "1") {
            return Ok(());
        }
        let release = std::env::current_exe()
            .map(|e| e.components().any(|c| c.as_os_str() == "release"))
            .unwrap_or(false);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .args(["build", "-q", "-p", "lab", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        run_bounded(
            &mut cmd,
            Duration::from_secs(600),
            &std::env::temp_dir(),
            "cargo-build-lab",
        )
        .map_err(|e| format!("{e:#}"))
        .and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build -p lab --bins failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        })
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Runs `cmd` to completion with stdout/stderr captured in files under `dir`, killing it after
/// `timeout`.
fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
    dir: &Path,
    tag: &str,
) -> anyhow::Result<Output> {
    static RUN_SEQ: AtomicU32 = AtomicU32::new(0);
    let n = RUN_SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("{tag}-{}-{n}.stdout", std::process::id()));
    let err_path = dir.join(format!("{tag}-{}-{n}.stderr", std::process::id()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = fs::read_to_string(&err_path).unwrap_or_default();
            let _ = fs::remove_file(&out_path);
            let _ = fs::remove_file(&err_path);
            bail!("{cmd:?} did not finish within {timeout:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    };
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    Ok(output)
}

/// Runs `scripts/lab.sh ARGS` (bounded) with `LAB_OFFLOADS` and `LAB_ONLINE2` from `config`;
/// fails with its output if it exits non-zero.
fn lab_sh(args: &[&str], config: &LabConfig) -> anyhow::Result<String> {
    let script = lab_script();
    if !script.exists() {
        bail!(
            "{} not found; set LAB_ROOT to the repository root",
            script.display()
        );
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args);
    let on_off = |on: bool| if on { "on" } else { "off" };
    cmd.env("LAB_OFFLOADS", on_off(config.offloads));
    cmd.env("LAB_ONLINE2", on_off(config.second_online));
    let out = run_bounded(
        &mut cmd,
        Duration::from_secs(60),
        &std::env::temp_dir(),
        "lab-sh",
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("lab.sh {} failed ({}):\n{text}", args.join(" "), out.status);
    }
    Ok(text)
}

const NS_SUFFIXES: [&str; 6] = ["client", "online", "online2", "target", "assistant", "br"];

/// Tears down labs left behind by test processes that died without running `Drop` (prefix
/// `tl<pid>x<n>-` whose pid is gone). Best effort.
fn sweep_stale_labs() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    let mut stale = std::collections::BTreeSet::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(prefix) = NS_SUFFIXES
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|p| p.starts_with("tl") && p.ends_with('-'))
        else {
            continue;
        };
        let Some((pid, n)) = prefix[2..prefix.len() - 1].split_once('x') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            stale.insert(prefix.to_string());
        }
    }
    for prefix in stale {
        eprintln!("lab: removing stale lab {prefix} (its test process is gone)");
        let _ = lab_sh(&["down", &prefix], &LabConfig::default());
    }
}

impl Lab {
    /// Brings up a lab with a unique prefix and offloads off.
    ///
    /// # Errors
    /// If `scripts/lab.sh up` fails (not root, missing tools, ...).
    pub fn up() -> anyhow::Result<Lab> {
        Lab::up_with(LabConfig::default())
    }

    /// Brings up a lab with options.
    ///
    /// # Errors
    /// If `scripts/lab.sh up` fails.
    pub fn up_with(config: LabConfig) -> anyhow::Result<Lab> {
        sweep_stale_labs();
        let prefix = config.prefix.clone().unwrap_or_else(|| {
            format!(
                "tl{}x{}-",
                std::process::id(),
                LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        });
        let dir = std::env::temp_dir().join(format!("tcpcopy-lab-{prefix}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing old {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lab = Lab {
            prefix,
            dir,
            seq: AtomicU32::new(0),
            down: false,
        };
        if let Err(e) = lab_sh(&["up", &lab.prefix], &config) {
            lab.down = true; // lab.sh cleans up after a failed up itself
            let _ = fs::remove_dir_all(&lab.dir);
            return Err(e);
        }
        Ok(lab)
    }

    /// The namespace prefix (e.g. `tl1234x0-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace of `host` (`<prefix><host name>`).
    pub fn ns(&self, host: Host) -> String {
        format!("{}{}", self.prefix, host.name())
    }

    /// The namespace holding the bridge (`<prefix>br`).
    pub fn bridge_ns(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The address of `host`.
    pub fn addr(&self, host: Host) -> Ipv4Addr {
        host.addr()
    }

    /// The interface of `host` inside its namespace ([`IFACE`]).
    pub fn iface(&self, _host: Host) -> &'static str {
        IFACE
    }

    /// Per-lab temp directory (logs of spawned programs, server configs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn next_tag(&self, host: Host, program: &OsStr) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let base = Path::new(program)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "prog".into());
        format!("{n:03}-{}-{base}", host.name())
    }

    fn command<S: AsRef<OsStr>>(&self, host: Host, program: &OsStr, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        cmd.args(args);
        cmd
    }

    /// Starts `program args` in `host` (`ip netns exec NS program args`), stdout and stderr going to
    /// files in [`Lab::dir`]. The returned [`Proc`] stops the program when dropped.
    ///
    /// # Errors
    /// If the program cannot be started.
    pub fn spawn<P, S>(&self, host: Host, program: P, args: &[S]) -> anyhow::Result<Proc>
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        self.spawn_env(host, program, args, &[])
    }

    /// [`Lab::spawn`] with extra environment variables (e.g. `[("RUST_LOG", "debug")]`); the
    /// program otherwise inherits the test's environment.
    ///
    /// # Errors
    /// If the program cannot be started.
    pub fn spawn_env<P, S>(
        &self,
        host: Host,
        program: P,
        args: &[S],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc>
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let tag = self.next_tag(host, program);
        let (out, err) = (
            self.dir.join(format!("{tag}.stdout")),
            self.dir.join(format!("{tag}.stderr")),
        );
        let child = self
            .command(host, program, args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("starting {program:?} in {}", self.ns(host)))?;
        Ok(Proc::new(
            format!("{}@{}", program.to_string_lossy(), host.name()),
            child,
            out,
            err,
        ))
    }

    /// Runs `program args` in `host` to completion, bounded by [`RUN_TIMEOUT`].
    ///
    /// # Errors
    /// If it cannot start or does not finish in time (it is killed then). A non-zero exit status is
    /// not an error: check `output.status`.
    pub fn run<P, S>(&self, host: Host, program: P, args: &[S]) -> anyhow::Result<Output>
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        self.run_timeout(host, program, args, RUN_TIMEOUT)
    }

    /// [`Lab::run`] with an explicit bound.
    ///
    /// # Errors
    /// As [`Lab::run`].
    pub fn run_timeout<P, S>(
        &self,
        host: Host,
        program: P,
        args: &[S],
        timeout: Duration,
    ) -> anyhow::Result<Output>
    where
        P: AsRef<OsStr>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let tag = self.next_tag(host, program);
        run_bounded(
            &mut self.command(host, program, args),
            timeout,
            &self.dir,
            &tag,
        )
    }

    /// Runs `f` on a new thread that has joined `host`'s network namespace (sockets it creates live
    /// there) and returns its result.
    ///
    /// # Errors
    /// If the namespace cannot be entered; panics in `f` are propagated as panics.
    pub fn in_ns<T, F>(&self, host: Host, f: F) -> anyhow::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let path = format!("/run/netns/{}", self.ns(host));
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: setns(2) on a valid, open namespace fd; it only changes this (fresh,
                // scoped) thread's network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns {path}"));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Waits (bounded by `timeout`) until `addr` accepts a TCP connection from inside `from`.
    ///
    /// # Errors
    /// On timeout.
    pub fn wait_port(
        &self,
        from: Host,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.in_ns(from, || {
                TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{addr} does not accept connections from {} after {timeout:?}",
                    from.name()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_server(&self, proc: &mut Proc, host: Host, addr: SocketAddrV4) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = proc.try_exit() {
                bail!(
                    "{} exited ({st}) while starting; output:\n{}",
                    proc.name(),
                    proc.log()
                );
            }
            let ok = self.in_ns(host, || {
                TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not accepting on {addr} after {START_TIMEOUT:?}; output:\n{}",
                    proc.name(),
                    proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts nginx in `host` on `host address:port`: one process (`daemon off; master_process
    /// off;`), its own config, pid, logs and temp paths under [`Nginx::dir`], `keepalive_requests
    /// 100000; keepalive_timeout 65;`, access log in [`NGINX_LOG_FORMAT`]. Any path answers `200 "ok
    /// <uri>\n"` (any method; request bodies up to 64 MiB are read and discarded), except
    /// `/static/<name>`, which serves the files of [`STATIC_FILES`] (GET only). Returns once the port
    /// accepts connections.
    ///
    /// # Errors
    /// If nginx is missing, exits, or does not listen within [`START_TIMEOUT`].
    pub fn nginx(&self, host: Host, port: u16) -> anyhow::Result<Nginx> {
        self.nginx_at(host, SocketAddrV4::new(host.addr(), port))
    }

    /// [`Lab::nginx`] listening on `addr`, an address the test gave `host` besides its own (e.g.
    /// on a VLAN interface it added). Its files are under `nginx-<host>-<port>` when `addr` is
    /// the host's own address, else under `nginx-<host>-<ip>-<port>`.
    ///
    /// # Errors
    /// As [`Lab::nginx`].
    pub fn nginx_at(&self, host: Host, addr: SocketAddrV4) -> anyhow::Result<Nginx> {
        servers::check_nginx()?;
        let port = addr.port();
        let dir = if *addr.ip() == host.addr() {
            self.dir.join(format!("nginx-{}-{port}", host.name()))
        } else {
            self.dir
                .join(format!("nginx-{}-{}-{port}", host.name(), addr.ip()))
        };
        let conf = Nginx::prepare(&dir, addr)?;
        let args = [
            OsStr::new("-p"),
            dir.as_os_str(),
            OsStr::new("-c"),
            conf.as_os_str(),
            OsStr::new("-e"),
        ];
        let error_log = dir.join("logs/error.log");
        let mut all: Vec<&OsStr> = args.to_vec();
        all.push(error_log.as_os_str());
        let mut proc = self.spawn(host, "nginx", &all)?;
        self.wait_server(&mut proc, host, addr)?;
        Ok(Nginx { proc, dir, addr })
    }

    /// Starts `labserver --listen <host address>:port --log <file>` in `host` (see
    /// [`Lab::labserver_with`]).
    ///
    /// # Errors
    /// As [`Lab::labserver_with`].
    pub fn labserver(&self, host: Host, port: u16) -> anyhow::Result<Labserver> {
        self.labserver_with(host, port, &[])
    }

    /// Starts `labserver` with extra arguments (e.g. `["--response-bytes", "1048576"]`); returns once
    /// its port accepts connections. Builds lab's binaries first ([`build_lab_bins`]).
    ///
    /// # Errors
    /// If the binary is missing, exits, or does not listen within [`START_TIMEOUT`].
    pub fn labserver_with(
        &self,
        host: Host,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Labserver> {
        build_lab_bins()?;
        let addr = SocketAddrV4::new(host.addr(), port);
        let log = self
            .dir
            .join(format!("labserver-{}-{port}.log", host.name()));
        let listen = addr.to_string();
        let mut args = vec!["--listen", &listen, "--log"];
        let log_arg = log.to_string_lossy().into_owned();
        args.push(&log_arg);
        args.extend_from_slice(extra);
        let mut proc = self.spawn(host, workspace_bin("labserver"), &args)?;
        self.wait_server(&mut proc, host, addr)?;
        Ok(Labserver { proc, log, addr })
    }

    /// Runs `httpload ARGS --json` in `host` (bounded by [`RUN_TIMEOUT`]) and parses its report. A
    /// run with failed requests is not an error: check [`LoadReport::all_ok`]. Builds lab's binaries
    /// first ([`build_lab_bins`]).
    ///
    /// # Errors
    /// If httpload cannot run, times out or prints no report (e.g. bad arguments).
    pub fn httpload(&self, host: Host, args: &[&str]) -> anyhow::Result<LoadReport> {
        build_lab_bins()?;
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(host, workspace_bin("httpload"), &all)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| {
                format!(
                    "httpload {args:?} printed no report ({}); stderr:\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("parsing httpload report {line:?}"))
    }

    /// A kernel counter of `host`'s network namespace from `/proc/net/snmp` or `/proc/net/netstat`,
    /// e.g. `("Ip", "InAddrErrors")`, `("Tcp", "OutSegs")`, `("TcpExt", "ListenDrops")`.
    ///
    /// # Errors
    /// If the namespace cannot be entered or the counter does not exist.
    pub fn net_counter(&self, host: Host, section: &str, field: &str) -> anyhow::Result<u64> {
        let text = self.in_ns(host, || {
            let mut t = fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
            t.push_str(&fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default());
            t
        })?;
        parse_counter(&text, section, field)
            .with_context(|| format!("no counter {section}:{field} in {}", self.ns(host)))
    }

    /// (rx_packets, tx_packets) of `host`'s [`IFACE`], from `/proc/net/dev` of its namespace.
    ///
    /// # Errors
    /// If the namespace cannot be entered or the interface is missing.
    pub fn iface_packets(&self, host: Host) -> anyhow::Result<(u64, u64)> {
        let text = self.in_ns(host, || fs::read_to_string("/proc/thread-self/net/dev"))??;
        parse_net_dev(&text, IFACE).with_context(|| format!("no {IFACE} in {}", self.ns(host)))
    }

    /// Processes in `host`'s network namespace (`ip netns pids`), e.g. to find a daemon that
    /// detached from the process the test started.
    ///
    /// # Errors
    /// If `ip netns pids` fails (the namespace does not exist).
    pub fn pids(&self, host: Host) -> anyhow::Result<Vec<u32>> {
        let out = run_bounded(
            Command::new("ip").args(["netns", "pids", &self.ns(host)]),
            Duration::from_secs(10),
            &self.dir,
            "netns-pids",
        )?;
        if !out.status.success() {
            bail!(
                "ip netns pids {} failed: {}",
                self.ns(host),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|p| p.parse().with_context(|| format!("bad pid {p:?}")))
            .collect()
    }

    /// Namespaces currently present whose name starts with this lab's prefix.
    pub fn namespaces(&self) -> Vec<String> {
        namespaces_with_prefix(&self.prefix)
    }

    /// Tears the lab down now (idempotent; `Drop` does the same).
    ///
    /// # Errors
    /// If `scripts/lab.sh down` fails.
    pub fn down(&mut self) -> anyhow::Result<()> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        lab_sh(&["down", &self.prefix], &LabConfig::default())?;
        let keep = std::thread::panicking() || std::env::var("LAB_KEEP").is_ok_and(|v| v == "1");
        if keep {
            eprintln!("lab {}: logs kept in {}", self.prefix, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("lab {}: teardown failed: {e:#}", self.prefix);
        }
    }
}

/// Finds `field` of `section` in `/proc/net/snmp`-style text (a header line and a value line per
/// section).
pub fn parse_counter(text: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let pos = names.split_whitespace().position(|n| n == field);
        if let Some(pos) = pos {
            return values.split_whitespace().nth(pos)?.parse().ok();
        }
    }
    None
}

/// (rx_packets, tx_packets) of `iface` in `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        Some((*f.get(1)?, *f.get(9)?))
    })
}

/// Names in `/run/netns` starting with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(Host::Target.addr(), Ipv4Addr::new(10, 77, 0, 30));
        assert_eq!(Host::Assistant.mac(), [2, 0x77, 0, 0, 0, 40]);
        assert_eq!(
            Host::ALL.map(Host::name),
            ["client", "online", "target", "assistant"]
        );
        assert_eq!(Host::Online2.addr(), Ipv4Addr::new(10, 77, 0, 21));
        assert_eq!(Host::Online2.mac(), [2, 0x77, 0, 0, 0, 21]);
        assert_eq!(Host::Online2.name(), "online2");
    }

    #[test]
    fn paths() {
        assert!(lab_script().exists());
        let p = workspace_bin("definitely-not-a-binary");
        assert!(p.ends_with("definitely-not-a-binary"));
    }

    #[test]
    fn counters() {
        let snmp = "Ip: Forwarding InAddrErrors\nIp: 2 7\nTcp: RtoMin OutSegs\nTcp: 200 42\n";
        assert_eq!(parse_counter(snmp, "Ip", "InAddrErrors"), Some(7));
        assert_eq!(parse_counter(snmp, "Tcp", "OutSegs"), Some(42));
        assert_eq!(parse_counter(snmp, "Tcp", "Nope"), None);
        let dev = "Inter-|   Receive\n face |bytes packets\n  eth0: 100 3 0 0 0 0 0 0 200 4 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev, "eth0"), Some((3, 4)));
        assert_eq!(parse_net_dev(dev, "eth1"), None);
    }

    #[test]
    fn run_bounded_times_out() {
        let dir = std::env::temp_dir();
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo hi"]),
            Duration::from_secs(10),
            &dir,
            "t",
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert!(run_bounded(
            Command::new("sleep").arg("30"),
            Duration::from_millis(100),
            &dir,
            "t"
        )
        .is_err());
    }
}
