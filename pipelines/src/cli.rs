//! What both binaries share: logging, the pid file, daemon mode and signals.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Environment variable that marks the re-executed daemon child.
const DAEMON_CHILD: &str = "TCPCOPY_RS_DAEMON_CHILD";

/// True once [`init_logging`] logs to a file: SIGHUP then reopens it (see [`stop_flag`]).
static LOG_TO_FILE: AtomicBool = AtomicBool::new(false);

/// The `-l` log file, reopened by its path at the first line after SIGHUP, so logrotate can
/// rename it and signal (`postrotate kill -HUP PID`) without `copytruncate`.
#[derive(Debug)]
pub struct ReopenableLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    reopen: Arc<AtomicBool>,
}

impl ReopenableLog {
    /// Opens (creates, appends to) `path`; raising `reopen` makes the next line reopen it.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, reopen: Arc<AtomicBool>) -> std::io::Result<ReopenableLog> {
        Ok(ReopenableLog {
            path: path.to_path_buf(),
            file: Mutex::new(Self::open_file(path)?),
            reopen,
        })
    }

    fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// The file for one line, reopened first if asked. A file that cannot be reopened is
    /// kept (and says so).
    fn file(&self) -> MutexGuard<'_, std::fs::File> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if self.reopen.swap(false, Ordering::Relaxed) {
            match Self::open_file(&self.path) {
                Ok(new) => *file = new,
                Err(e) => {
                    let _ = writeln!(
                        file,
                        "cannot reopen the log file -l {} after SIGHUP: {e}; still writing here",
                        self.path.display()
                    );
                }
            }
        }
        file
    }
}

/// One log line's writer: the log file, locked.
#[derive(Debug)]
pub struct LogWriter<'a>(MutexGuard<'a, std::fs::File>);

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ReopenableLog {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> LogWriter<'a> {
        LogWriter(self.file())
    }
}

/// Sets up `tracing`: to the `-l` file (appended; SIGHUP reopens it, for logrotate) or
/// stderr, at `level` (`RUST_LOG` overrides).
///
/// # Errors
/// The log file cannot be opened (named, with the cause), or the SIGHUP handler cannot be
/// installed.
pub fn init_logging(log_file: Option<&Path>, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log_file {
        Some(path) => {
            let reopen = Arc::new(AtomicBool::new(false));
            let file = ReopenableLog::open(path, reopen.clone())
                .with_context(|| format!("cannot open the log file -l {}", path.display()))?;
            signal_hook::flag::register(signal_hook::consts::SIGHUP, reopen)
                .context("install the SIGHUP handler (log reopen)")?;
            LOG_TO_FILE.store(true, Ordering::Relaxed);
            builder.with_ansi(false).with_writer(file).init();
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    Ok(())
}

/// `-d`: detaches from the terminal. The parent re-executes this program as a child in a new
/// session with its standard streams on /dev/null, then exits 0; the child returns and runs.
/// (Re-executing instead of `fork` keeps this safe in a program that has threads.)
///
/// # Errors
/// The child cannot be started.
pub fn daemonize() -> anyhow::Result<()> {
    if std::env::var_os(DAEMON_CHILD).is_some() {
        nix::unistd::setsid().context("setsid")?;
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find this program to daemonize")?;
    let child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start the daemon")?;
    println!("{}", child.id());
    std::process::exit(0);
}

/// Writes our pid to `path` (`-P`); removed by [`PidFile`]'s drop.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes the pid file.
    ///
    /// # Errors
    /// The file cannot be written (named, with the cause).
    pub fn create(path: &Path) -> anyhow::Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file -P {}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A flag raised by SIGINT or SIGTERM, and by SIGHUP when `hangup_stops` (not daemonized)
/// unless [`init_logging`] logs to a file: then SIGHUP reopens the file instead. A daemon
/// without a log file ignores SIGHUP (as the C tools do).
///
/// # Errors
/// The handlers cannot be installed.
pub fn stop_flag(hangup_stops: bool) -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut signals = vec![signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    if !LOG_TO_FILE.load(Ordering::Relaxed) {
        if hangup_stops {
            signals.push(signal_hook::consts::SIGHUP);
        } else {
            // Handled (so not fatal) and ignored.
            signal_hook::flag::register(
                signal_hook::consts::SIGHUP,
                Arc::new(AtomicBool::new(false)),
            )
            .context("install signal handlers")?;
        }
    }
    for signal in signals {
        signal_hook::flag::register(signal, flag.clone()).context("install signal handlers")?;
    }
    Ok(flag)
}

/// What a tool holds while it runs: its pid file (removed when dropped) and the stop flag.
#[derive(Debug)]
pub struct Live {
    /// The `-P` pid file, if any.
    pub pid_file: Option<PidFile>,
    /// Raised by SIGINT/SIGTERM (see [`stop_flag`]).
    pub stop: Arc<AtomicBool>,
}

/// Goes live once the settings are valid, as every tool does: detaches with `-d`, opens the
/// log (`-l`, `--log-level`), writes the pid file (`-P`) and installs the stop signals.
///
/// # Errors
/// Any of those steps failing, named.
pub fn go_live(
    daemon: bool,
    log: Option<&Path>,
    level: &str,
    pid_file: Option<&Path>,
) -> anyhow::Result<Live> {
    if daemon {
        daemonize()?;
    }
    init_logging(log, level)?;
    let pid_file = pid_file.map(PidFile::create).transpose()?;
    let stop = stop_flag(!daemon)?;
    Ok(Live { pid_file, stop })
}

/// Parses `-s`: `ip[:port],...`, the port defaulting to `default_port`.
///
/// # Errors
/// A message that names the item and shows the form.
pub fn parse_servers(text: &str, default_port: u16) -> anyhow::Result<Vec<std::net::SocketAddrV4>> {
    let mut servers = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (ip, port) = match item.split_once(':') {
            Some((ip, port)) => {
                let port: u16 = port.parse().ok().filter(|p| *p != 0).with_context(|| {
                    format!("bad -s value '{item}': port '{port}' is not 1..65535; the form is ip[:port][,...], e.g. 10.77.0.40:36524")
                })?;
                (ip, port)
            }
            None => (item, default_port),
        };
        let ip: std::net::Ipv4Addr = ip.parse().with_context(|| {
            format!("bad -s value '{item}': '{ip}' is not an IPv4 address; the form is ip[:port][,...], e.g. 10.77.0.40:36524")
        })?;
        servers.push(std::net::SocketAddrV4::new(ip, port));
    }
    if servers.is_empty() {
        anyhow::bail!("-s needs at least one intercept address, e.g. -s 10.77.0.40");
    }
    if servers.len() > 32 {
        anyhow::bail!(
            "-s lists {} intercepts; at most 32 are supported",
            servers.len()
        );
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers() {
        let s = parse_servers("10.0.0.1,10.0.0.2:4000", 36524).unwrap();
        assert_eq!(s[0].to_string(), "10.0.0.1:36524");
        assert_eq!(s[1].to_string(), "10.0.0.2:4000");
        let e = parse_servers("10.0.0:1", 1).unwrap_err().to_string();
        assert!(e.contains("'10.0.0' is not an IPv4 address"), "{e}");
        assert!(parse_servers("10.0.0.1:0", 1).is_err());
        assert!(parse_servers("", 1).is_err());
    }

    #[test]
    fn the_log_file_is_reopened_when_asked() {
        use tracing_subscriber::fmt::MakeWriter;
        let dir = std::env::temp_dir().join(format!("tcpcopy-cli-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, rotated) = (dir.join("tcpcopy.log"), dir.join("tcpcopy.log.1"));
        let reopen = Arc::new(AtomicBool::new(false));
        let log = ReopenableLog::open(&path, reopen.clone()).unwrap();
        log.make_writer().write_all(b"one\n").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        log.make_writer().write_all(b"two\n").unwrap();
        reopen.store(true, Ordering::Relaxed);
        log.make_writer().write_all(b"three\n").unwrap();
        log.make_writer().write_all(b"four\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\nfour\n");
        assert!(!reopen.load(Ordering::Relaxed));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The DPDK flags both binaries share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DpdkArgs {
    /// Capture through this DPDK device instead of -i: a PCI address bound to vfio-pci
    /// (0000:01:00.0) or a virtual device given with --dpdk-vdev (net_af_packet0)
    #[arg(long, value_name = "DEVICE")]
    pub dpdk_rx: Option<String>,
    /// Transmit through this DPDK device (mirror-port deployments; default: the --dpdk-rx device)
    #[arg(long, value_name = "DEVICE")]
    pub dpdk_tx: Option<String>,
    /// Create a DPDK virtual device, e.g. net_af_packet0,iface=eth0 (repeatable)
    #[arg(long, value_name = "ARGS")]
    pub dpdk_vdev: Vec<String>,
    /// Allow this PCI device for DPDK, e.g. 0000:01:00.0 (repeatable)
    #[arg(long, value_name = "ADDRESS")]
    pub dpdk_pci: Vec<String>,
    /// Use DPDK's --in-memory mode (hugepages reserved but not mounted)
    #[arg(long, action = clap::ArgAction::SetTrue)]
    pub dpdk_in_memory: bool,
    /// DPDK EAL --lcores
    #[arg(long, value_name = "LIST")]
    pub dpdk_lcores: Option<String>,
    /// Next hop of transmitted frames on DPDK: its MAC (02:77:00:00:00:1e) or IPv4 address (ARP)
    #[arg(long, value_name = "MAC|IP")]
    pub next_hop: Option<String>,
}

impl DpdkArgs {
    /// The settings, when DPDK was asked for.
    ///
    /// # Errors
    /// DPDK flags given without `--dpdk-rx`.
    pub fn settings(&self) -> anyhow::Result<Option<crate::ports::DpdkSettings>> {
        let Some(rx) = self.dpdk_rx.clone() else {
            if self.dpdk_tx.is_some() || !self.dpdk_vdev.is_empty() || !self.dpdk_pci.is_empty() {
                anyhow::bail!("DPDK flags need --dpdk-rx DEVICE (e.g. --dpdk-vdev net_af_packet0,iface=eth0 --dpdk-rx net_af_packet0)");
            }
            return Ok(None);
        };
        if let Some(hop) = &self.next_hop {
            crate::ports::parse_next_hop(hop)?;
        }
        Ok(Some(crate::ports::DpdkSettings {
            rx_device: rx,
            tx_device: self.dpdk_tx.clone(),
            vdevs: self.dpdk_vdev.clone(),
            pci: self.dpdk_pci.clone(),
            in_memory: self.dpdk_in_memory,
            lcores: self.dpdk_lcores.clone(),
            next_hop: self.next_hop.clone(),
        }))
    }
}
