//! `tcpcopy`: replays the TCP sessions that clients open to an online server onto a target
//! server, with the flags of the C tool (`-x -c -s -C -p -t -k -W -O -l -d -P -h -v`).

use anyhow::Context;
use clap::{ArgAction, Parser};
use engine::control::{Framing, RecordFormat, Secret, Transport};
use engine::session::{Pacing, SessionConfig};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use pipelines::cli;
use pipelines::tcpcopy::latency::Latency;
use pipelines::tcpcopy::transform::{capture_filter, parse_transfers, ClientAddrs};
use pipelines::tcpcopy::{Tcpcopy, TcpcopyConfig, TcpcopyStats};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::{Instant, SystemTime};

#[derive(Debug, Parser)]
#[command(
    name = "tcpcopy",
    version,
    about = "Replicate live TCP sessions from an online server to a target server",
    long_about = "Captures the requests clients send to an online server, rewrites them for a target \
server and plays the client's part of every session. The target must route its replies for the \
client addresses to the assistant host, where `intercept` returns their headers to tcpcopy.\n\n\
Example: tcpcopy -i eth0 -x 80-10.0.0.30:8080 -s 10.0.0.40",
    disable_version_flag = true
)]
struct Args {
    /// Transfers: [onlineIP:]onlinePort-targetIP:targetPort[,...] (e.g. 80-10.0.0.30:8080)
    #[arg(short = 'x', value_name = "TRANSFERS")]
    transfers: String,
    /// intercept addresses: ip[:port][,...] (e.g. 10.0.0.40 or 10.0.0.40:36524,10.0.0.41)
    #[arg(short = 's', value_name = "SERVERS")]
    servers: String,
    /// Interface to capture client requests on (e.g. eth0); or use --dpdk-rx
    #[arg(short = 'i', value_name = "INTERFACE")]
    interface: Option<String>,
    /// Capture filter (pcap syntax); default: made from -x, e.g. "tcp and ((dst port 80))"
    #[arg(short = 'F', value_name = "FILTER")]
    filter: Option<String>,
    /// Send the replayed packets out of this interface only (default: by the routing table)
    #[arg(short = 'o', value_name = "INTERFACE")]
    output_interface: Option<String>,
    /// Replay client addresses: IPs or a.b.c.x ranges (e.g. 10.9.9.x); the target must route them to the assistant
    #[arg(short = 'c', value_name = "CLIENTS")]
    clients: Option<String>,
    /// Default intercept port for -s entries without one
    #[arg(short = 'p', value_name = "PORT", default_value_t = 36524)]
    port: u16,
    /// Connections to each intercept (1..=16)
    #[arg(short = 'C', value_name = "N", default_value_t = 2)]
    connections: usize,
    /// Session timeout in seconds: a session whose target stays silent this long is reset
    #[arg(short = 't', value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
    /// Keep-alive timeout in seconds for idle sessions that exchanged data (default: -t + 120)
    #[arg(short = 'k', value_name = "SECONDS")]
    keepalive: Option<u64>,
    /// Do not wait for the target's response before sending the next request
    #[arg(short = 'W', action = ArgAction::SetTrue)]
    no_wait: bool,
    /// Replay only sessions whose SYN was captured (the only mode of this version)
    #[arg(short = 'O', action = ArgAction::SetTrue)]
    only_syn: bool,
    /// Keep running when every intercept is unreachable (always so: connections are retried)
    #[arg(short = 'L', action = ArgAction::SetTrue)]
    lonely: bool,
    /// Log file (default: stderr)
    #[arg(short = 'l', value_name = "FILE")]
    log: Option<PathBuf>,
    /// Run as a daemon
    #[arg(short = 'd', action = ArgAction::SetTrue)]
    daemon: bool,
    /// Write the process id to this file
    #[arg(short = 'P', value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Print the version and exit
    #[arg(short = 'v', action = ArgAction::Version)]
    version: Option<bool>,
    /// Silence (ms) after which a request held for a shorter target response is released
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pace_idle_ms: u64,
    /// Seconds between statistics lines (0: only at exit)
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    stats_interval: u64,
    /// Never park the workers when idle (lowest latency, burns their cores)
    #[arg(long, action = ArgAction::SetTrue)]
    busy_poll: bool,
    /// Worker threads; each captures its share of the sessions (by client port) and replays them
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: usize,
    /// Pin the workers to these cores, e.g. 2,3 (worker i on the i-th listed core)
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    #[command(flatten)]
    dpdk: cli::DpdkArgs,
    /// Write the latency histograms as an HdrHistogram interval log (one interval per --stats-interval)
    #[arg(long, value_name = "FILE")]
    histogram_log: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Control records carry up to 128 payload bytes (intercept built --with-resp-payload)
    #[arg(long, action = ArgAction::SetTrue)]
    payload_records: bool,
    /// Plain control framing (C tools built --disable-combined)
    #[arg(long, action = ArgAction::SetTrue)]
    plain_framing: bool,
    /// Control channel transport: tcp (the C tools' format) or udp (datagrams with sequence
    /// numbers: loss is counted, nothing blocks)
    #[arg(long, value_name = "tcp|udp", default_value = "tcp")]
    transport: Transport,
    /// Authenticate the control channel with the shared secret in FILE (at least 16 bytes;
    /// intercept needs the same --auth-file)
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tcpcopy: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let transfers = parse_transfers(&args.transfers)?;
    let clients = args
        .clients
        .as_deref()
        .map(|c| ClientAddrs::parse(c, &transfers))
        .transpose()?;
    let intercepts = cli::parse_servers(&args.servers, args.port)?;
    if !(1..=16).contains(&args.connections) {
        anyhow::bail!(
            "bad -C value {}: use 1..16 connections per intercept",
            args.connections
        );
    }
    if !(1..=64).contains(&args.workers) {
        anyhow::bail!(
            "bad --workers value {}: use 1..64 worker threads",
            args.workers
        );
    }
    let cores = args
        .cores
        .as_deref()
        .map(|list| {
            list.split(',')
                .map(|c| {
                    c.trim().parse::<usize>().map_err(|_| {
                        anyhow::anyhow!("bad --cores value '{list}': '{c}' is not a core number; the form is a comma list, e.g. 2,3")
                    })
                })
                .collect::<anyhow::Result<Vec<usize>>>()
        })
        .transpose()?;
    let dpdk = args.dpdk.settings()?;
    let interface = match (&args.interface, &dpdk) {
        (Some(i), None) => i.clone(),
        (None, Some(d)) => d.rx_device.clone(),
        (Some(_), Some(_)) => anyhow::bail!("give -i INTERFACE or --dpdk-rx DEVICE, not both"),
        (None, None) => anyhow::bail!(
            "tell tcpcopy where to capture: -i INTERFACE (e.g. -i eth0) or --dpdk-rx DEVICE"
        ),
    };
    let filter = args
        .filter
        .clone()
        .unwrap_or_else(|| capture_filter(&transfers));
    let timeout = Duration::from_secs(args.timeout);
    let session = SessionConfig {
        pacing: if args.no_wait {
            Pacing::NoWait
        } else {
            Pacing::WaitForResponse
        },
        pace_idle: Duration::from_millis(args.pace_idle_ms.max(1)),
        timeout,
        keepalive: args
            .keepalive
            .map_or(timeout + Duration::from_secs(120), Duration::from_secs),
        ..SessionConfig::default()
    };
    let config = TcpcopyConfig {
        transfers,
        clients,
        interface: interface.clone(),
        filter,
        output_interface: args.output_interface.clone(),
        intercepts,
        connections: args.connections,
        record_format: if args.payload_records {
            RecordFormat::Payload192
        } else {
            RecordFormat::Header64
        },
        framing: if args.plain_framing {
            Framing::Plain
        } else {
            Framing::Combined
        },
        session,
        stats_interval: (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval)),
        busy_poll: args.busy_poll,
        workers: args.workers,
        cores,
        dpdk,
        transport: args.transport,
        auth: args
            .auth_file
            .as_deref()
            .map(|path| {
                Secret::from_file(path)
                    .with_context(|| format!("bad --auth-file {}", path.display()))
            })
            .transpose()?,
    };
    if args.daemon {
        cli::daemonize()?;
    }
    cli::init_logging(args.log.as_deref(), &args.log_level)?;
    let _pid = args
        .pid_file
        .as_deref()
        .map(cli::PidFile::create)
        .transpose()?;
    let stop = cli::stop_flag(!args.daemon)?;
    let _ = (args.only_syn, args.lonely);
    tracing::info!(
        "tcpcopy {} starting: -x {} -i {} filter \"{}\" intercepts {:?}",
        env!("CARGO_PKG_VERSION"),
        args.transfers,
        config.interface,
        config.filter,
        config.intercepts
    );
    let interval = config.stats_interval.unwrap_or(Duration::from_secs(5));
    let tcpcopy = Tcpcopy::start(config).context("tcpcopy cannot start")?;
    let dump = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, dump.clone())
        .context("install the SIGUSR1 handler")?;
    let mut log = args
        .histogram_log
        .as_deref()
        .map(HistogramLog::create)
        .transpose()?;
    let mut last_log = Instant::now();
    while !stop.load(Ordering::Relaxed) && tcpcopy.is_running() {
        std::thread::sleep(Duration::from_millis(50));
        if dump.swap(false, Ordering::Relaxed) {
            report_latency(&tcpcopy.stats());
        }
        if let Some(log) = log.as_mut() {
            if last_log.elapsed() >= interval {
                last_log = Instant::now();
                log.write(&tcpcopy.stats().latency())?;
            }
        }
    }
    tracing::info!("stopping");
    let stats = tcpcopy.join()?;
    if let Some(log) = log.as_mut() {
        log.write(&stats.latency())?;
    }
    report_latency(&stats);
    tracing::info!("final: {}", stats.line());
    Ok(())
}

/// Logs each worker's counters and histograms, then the merged histograms.
fn report_latency(stats: &TcpcopyStats) {
    for line in stats.worker_lines() {
        tracing::info!("{line}");
    }
    tracing::info!("all workers: {}", stats.latency().summary());
}

/// An HdrHistogram interval log: each write appends the counts since the previous write.
struct HistogramLog {
    file: std::fs::File,
    start: Instant,
    last: Latency,
    last_at: Duration,
}

impl HistogramLog {
    fn create(path: &std::path::Path) -> anyhow::Result<HistogramLog> {
        let mut file = std::fs::File::create(path).with_context(|| {
            format!(
                "cannot create the histogram log --histogram-log {}",
                path.display()
            )
        })?;
        let mut serializer = V2Serializer::new();
        IntervalLogWriterBuilder::new()
            .with_base_time(SystemTime::now())
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut file, &mut serializer)
            .map_err(|e| anyhow::anyhow!("cannot write the histogram log header: {e:?}"))?;
        Ok(HistogramLog {
            file,
            start: Instant::now(),
            last: Latency::new(),
            last_at: Duration::ZERO,
        })
    }

    fn write(&mut self, now: &Latency) -> anyhow::Result<()> {
        let at = self.start.elapsed();
        let mut serializer = V2Serializer::new();
        let mut writer = IntervalLogWriterBuilder::new()
            .with_max_value_divisor(1.0)
            .begin_log_with(&mut self.file, &mut serializer)
            .map_err(|e| anyhow::anyhow!("histogram log: {e:?}"))?;
        for (tag, current, last) in [
            (
                "capture_to_tx_us",
                &now.capture_to_tx,
                &self.last.capture_to_tx,
            ),
            ("reply_us", &now.reply, &self.last.reply),
        ] {
            let mut delta = current.clone();
            delta
                .subtract(last)
                .map_err(|e| anyhow::anyhow!("histogram log: {e:?}"))?;
            writer
                .write_histogram(&delta, self.last_at, at - self.last_at, Tag::new(tag))
                .map_err(|e| anyhow::anyhow!("histogram log: {e:?}"))?;
        }
        self.last = now.clone();
        self.last_at = at;
        Ok(())
    }
}
