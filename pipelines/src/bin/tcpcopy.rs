//! `tcpcopy`: replays the TCP sessions that clients open to an online server onto a target
//! server, with the flags of the C tool (`-x -c -s -C -p -n -f -r -g -H -M -D -t -k -W -O -l -d
//! -P -h -v`).

use anyhow::Context;
use clap::{ArgAction, Parser};
use engine::control::{Framing, RecordFormat, Secret, Transport};
use engine::session::{Pacing, SessionConfig};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use pipelines::tcpcopy::copies::{PortPlan, Sampling};
use pipelines::tcpcopy::ingress::IngressOptions;
use pipelines::tcpcopy::latency::Latency;
use pipelines::tcpcopy::offline::OfflineConfig;
use pipelines::tcpcopy::transform::{capture_filter, parse_transfers, ClientAddrs};
use pipelines::tcpcopy::{Tcpcopy, TcpcopyConfig, TcpcopyStats};
use pipelines::{cli, compat};
use std::io::IsTerminal as _;
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
    /// intercept addresses: ip[:port][,...] (e.g. 10.0.0.40 or 10.0.0.40:36524,10.0.0.41);
    /// required except with --udp
    #[arg(short = 's', value_name = "SERVERS")]
    servers: Option<String>,
    /// UDP replay: send the datagrams clients send to the -x ports to the target (stateless:
    /// no sessions, no intercept, no -s); IP fragments are reassembled, and datagrams larger
    /// than -M are fragmented
    #[arg(long, action = ArgAction::SetTrue)]
    udp: bool,
    /// Where to capture the client requests: every interface (no -i, or -i any, as the C
    /// tool), one interface (-i eth0), several (-i eth0,eth1), a capture file (-i FILE, as
    /// the C --offline build: the same as --pcap FILE); or use --dpdk-rx
    #[arg(short = 'i', value_name = "INTERFACE")]
    interface: Option<String>,
    /// Capture buffer in MiB (1..=4096): the kernel ring the capture reads from (the C
    /// --pcap-capture build's -B; default 64)
    #[arg(short = 'B', value_name = "MiB")]
    capture_buffer_mib: Option<u32>,
    /// C tool's capture length (--pcap-capture builds): accepted and ignored, tcpcopy keeps
    /// whole frames (GRO-merged ones too)
    #[arg(short = 'S', value_name = "BYTES")]
    snaplen: Option<String>,
    /// C tool's "default RTT": it has no effect there either; accepted and ignored (each
    /// session's RTT is measured from the target's replies)
    #[arg(short = 'R', value_name = "MS")]
    default_rtt: Option<String>,
    /// C tool's memory-pool growth step: accepted and ignored (the session pool is sized
    /// by itself; cap memory with -m)
    #[arg(short = 'U', value_name = "KiB")]
    pool_growth: Option<String>,
    /// Capture filter (pcap syntax); default: made from -x, e.g. "tcp and ((dst port 80))"
    #[arg(short = 'F', value_name = "FILTER")]
    filter: Option<String>,
    /// Send the replayed packets out of this interface only (default: by the routing table);
    /// the C --pcap-send build's MACs in -x are accepted, the kernel resolves the next hop
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
    /// Replay only sessions whose SYN was captured (default: sessions captured mid-stream
    /// start with a fabricated handshake, and sessions the target resets are rebuilt)
    #[arg(short = 'O', action = ArgAction::SetTrue)]
    only_syn: bool,
    /// Replay every session N times (1..=1023): the original plus N-1 copies from other
    /// client ports (and other -c addresses), e.g. -n 3 for three times production
    #[arg(short = 'n', value_name = "N", default_value_t = 1)]
    copies: u16,
    /// Instance number 0..=31 of this tcpcopy when several replay to one target: each
    /// instance shifts its client ports by 2048*N so their sessions never collide, e.g. -f 1
    #[arg(short = 'f', value_name = "N", default_value_t = 0)]
    instance: u8,
    /// Replay this percentage of the sessions (1..=100), chosen by client address and port:
    /// whole sessions, the same ones on every run, e.g. -r 10
    #[arg(short = 'r', value_name = "PERCENT")]
    sample: Option<u32>,
    /// Ramp up: replay 1% of the sessions in the first second, one percent more each second,
    /// all after 100 s (overrides -r)
    #[arg(short = 'g', action = ArgAction::SetTrue)]
    ramp: bool,
    /// Replace the client address 127.0.0.1 (traffic from local clients) by this address,
    /// which the target routes to the assistant, e.g. -H 10.9.9.1
    #[arg(short = 'H', value_name = "IP")]
    localhost_as: Option<std::net::Ipv4Addr>,
    /// MTU towards the target (576..=65535): captured packets longer than this (merged by
    /// GRO/LRO on the capture interface) are split into segments that fit
    #[arg(short = 'M', value_name = "BYTES", default_value_t = 1500)]
    mtu: u16,
    /// MSS option of the SYNs fabricated for sessions captured mid-stream
    #[arg(short = 'D', value_name = "BYTES", default_value_t = 1460)]
    fake_mss: u16,
    /// Protocol module: line-auth[=VERB[:DEFAULT LINE]] learns each client's first line
    /// starting with VERB (default 'AUTH ') and sends it, or DEFAULT LINE, in front of
    /// sessions captured mid-stream, e.g. --module 'line-auth=AUTH :AUTH secret'
    #[arg(long, value_name = "SPEC")]
    module: Option<String>,
    /// Keep running when every intercept is unreachable (always so: connections are retried)
    #[arg(short = 'L', action = ArgAction::SetTrue)]
    lonely: bool,
    /// Log file (default: stderr); SIGHUP reopens it (logrotate)
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
    /// Read the settings from this YAML file (see conf/); flags given here override its keys
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the flags and the --config file, print the effective settings and the pipeline,
    /// and exit (opens no socket, needs no root)
    #[arg(long, action = ArgAction::SetTrue)]
    check: bool,
    /// The effective settings as YAML (set for --check).
    #[arg(skip)]
    effective: Option<String>,
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
    #[command(flatten)]
    metrics: pipelines::metrics::MetricsArgs,
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
    /// Replay the client packets of this pcap or pcapng file instead of capturing live (Ethernet,
    /// Linux SLL/SLL2, raw IP or loopback captures; tcpcopy exits when the replay is over)
    #[arg(
        long = "pcap",
        visible_alias = "offline",
        value_name = "FILE",
        conflicts_with_all = ["interface", "dpdk_rx", "dpdk_tx", "dpdk_vdev", "dpdk_pci"]
    )]
    pcap: Option<PathBuf>,
    /// With --pcap: replay N times faster than captured, 0.01..=1000000 (0.5: half speed)
    #[arg(short = 'a', value_name = "N", default_value_t = 1.0)]
    acceleration: f64,
    /// With --pcap: gaps longer than MS milliseconds between replayed packets are skipped
    /// (0: off; at most 86400000)
    #[arg(short = 'I', value_name = "MS", default_value_t = 0)]
    idle_gap_ms: u64,
    /// With --pcap: replay the file N times (1..=1000000), each round once the previous
    /// one's sessions ended (0: once, as the C tool)
    #[arg(short = 'T', value_name = "N", default_value_t = 1)]
    rounds: u32,
    /// With --pcap: seconds a round waits after the end of the file for open sessions to end
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, requires = "pcap")]
    offline_tail_s: f64,
    /// Write every packet sent to the target to this pcap file (raw IPv4, ns timestamps); when
    /// the writer falls behind, packets are left out of the file (dump-dropped), never delayed
    #[arg(long, value_name = "FILE")]
    dump_sent: Option<PathBuf>,
    /// Memory cap in MiB (default: none; the C tool stops at 2048): above 90% of it the workers
    /// shed idle sessions, oldest first; still above it 5 s later, tcpcopy stops (exit status 2)
    #[arg(short = 'm', value_name = "MiB")]
    memory_mib: Option<u64>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tcpcopy: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    use pipelines::config::{effective_yaml, parse_args, TcpcopyFile};
    let (mut args, matches) = parse_args::<Args, TcpcopyFile>()?;
    if args.check {
        args.effective = Some(effective_yaml::<Args, TcpcopyFile>(&matches)?);
    }
    let mut warnings = compat::Warnings::new("tcpcopy");
    c_forms(&mut args, &matches, &mut warnings)?;
    check_numbers(&args).map_err(|e| {
        pipelines::compat::name_yaml_key::<Args, pipelines::config::TcpcopyFile>(
            e,
            &matches,
            args.config.as_deref(),
        )
    })?;
    let transfers = parse_transfers(&args.transfers)?;
    let clients = args
        .clients
        .as_deref()
        .map(|c| ClientAddrs::parse(c, &transfers))
        .transpose()?;
    if args.udp {
        return run_udp(&args, transfers, clients);
    }
    let servers = args.servers.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "tcpcopy needs -s SERVERS, the intercept addresses ip[:port][,...], e.g. -s 10.0.0.40 \
             (only --udp runs without intercept)"
        )
    })?;
    let intercepts = cli::parse_servers(servers, args.port)?;
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
        (None, None) => match &args.pcap {
            Some(file) => file.display().to_string(),
            // The C tool's default: every interface.
            None => "any".to_owned(),
        },
    };
    let offline = offline_config(&args, &transfers)?;
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
        // As the C tool: -k 0 (or none) is -t + 120.
        keepalive: args
            .keepalive
            .filter(|&k| k > 0)
            .map_or(timeout + Duration::from_secs(120), Duration::from_secs),
        mid_stream: !args.only_syn,
        fake_syn_mss: args.fake_mss,
        ..SessionConfig::default()
    };
    if args.mtu < pipelines::tcpcopy::ingress::MIN_MTU {
        anyhow::bail!(
            "bad -M value {}: the MTU towards the target must be 576..=65535, e.g. -M 1500",
            args.mtu
        );
    }
    if !(64..=65495).contains(&args.fake_mss) {
        anyhow::bail!(
            "bad -D value {}: the MSS of fabricated SYNs must be 64..=65495, e.g. -D 1460",
            args.fake_mss
        );
    }
    if let Some(mib) = args.memory_mib.filter(|m| !(1..=1 << 22).contains(m)) {
        anyhow::bail!("bad -m value {mib}: the memory cap is 1..=4194304 MiB, e.g. -m 2048");
    }
    let ingress = IngressOptions {
        plan: PortPlan::new(args.copies, args.instance, args.workers)?,
        sampling: match (args.ramp, args.sample) {
            (true, _) => Sampling::ramp(),
            // As the C tool: -r 0 replays every session.
            (false, Some(0)) => Sampling::all(),
            (false, Some(percent)) => Sampling::percent(percent)?,
            (false, None) => Sampling::all(),
        },
        localhost_as: args.localhost_as,
        mtu: args.mtu,
    };
    let config = TcpcopyConfig {
        offline,
        transfers,
        clients,
        interface: interface.clone(),
        capture_buffer_mib: args.capture_buffer_mib,
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
        module: args
            .module
            .as_deref()
            .map(pipelines::tcpcopy::modules::ModuleSpec::parse)
            .transpose()?,
        ingress,
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
    if let Some(effective) = &args.effective {
        let pipeline = pipelines::config::tcpcopy_pipeline(&config);
        print!("{}", pipelines::config::check_report(effective, &pipeline));
        return Ok(());
    }
    let live = cli::go_live(
        args.daemon,
        args.log.as_deref(),
        &args.log_level,
        args.pid_file.as_deref(),
    )?;
    let stop = live.stop.clone();
    warnings.log();
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
    let mut metrics =
        pipelines::metrics::MetricsExporter::start(&args.metrics, config.stats_interval)?;
    let options = pipelines::tcpcopy::RunOptions {
        dump_sent: args.dump_sent.clone(),
    };
    let tcpcopy = Tcpcopy::start_with(config, options).context("tcpcopy cannot start")?;
    let mut checks = pipelines::tcpcopy::ops::RunChecks::new(args.memory_mib);
    let mut over_cap = None;
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
        metrics.tick(Instant::now(), || tcpcopy.stats());
        if let Some(log) = log.as_mut() {
            if last_log.elapsed() >= interval {
                last_log = Instant::now();
                log.write(&tcpcopy.stats().latency())?;
            }
        }
        if let Some(reason) = checks.tick(&tcpcopy, Instant::now()) {
            tracing::error!("{reason}");
            over_cap = Some(reason);
            break;
        }
    }
    tracing::info!("stopping");
    let stats = tcpcopy.join()?;
    if let Some(log) = log.as_mut() {
        log.write(&stats.latency())?;
    }
    report_latency(&stats);
    metrics.finish(&stats);
    tracing::info!("final: {}", stats.line());
    checks.at_exit(&stats);
    if let Some(reason) = over_cap {
        anyhow::bail!(reason);
    }
    Ok(())
}

/// The forms of the C tools' builds: `-i FILE` (the `--offline` build), flags accepted with a
/// warning (`-R`, `-U`, `-S`, MACs in `-x`, `-C 0`), `-a -I -T` only with a capture file.
fn c_forms(
    args: &mut Args,
    matches: &clap::ArgMatches,
    warnings: &mut compat::Warnings,
) -> anyhow::Result<()> {
    if let Some(value) = args.interface.clone() {
        if args.pcap.is_none() && compat::is_capture_file(&value) {
            args.pcap = Some(value.into());
            args.interface = None;
        }
    }
    let given = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine)
        )
    };
    if args.pcap.is_none() {
        for (id, flag) in [
            ("acceleration", "-a"),
            ("idle_gap_ms", "-I"),
            ("rounds", "-T"),
        ] {
            if given(id) {
                anyhow::bail!(
                    "{flag} goes with a capture file to replay: add --pcap FILE (or -i FILE, as the C --offline build)"
                );
            }
        }
    }
    warnings.ignored(&[
        (
            "-R",
            args.default_rtt.as_ref(),
            "it has no effect in the C tcpcopy either; each session's RTT is measured from the target's replies",
        ),
        (
            "-U",
            args.pool_growth.as_ref(),
            "the session pool sizes itself; cap tcpcopy's memory with -m MiB",
        ),
        (
            "-S",
            args.snaplen.as_ref(),
            "tcpcopy captures whole frames (up to 256 KiB, GRO-merged ones too)",
        ),
    ]);
    if args.transfers.contains('@') {
        warnings.warn(
            "the MAC addresses in -x (the C --pcap-send build's form) are not needed: tcpcopy sends at the IP layer (out of -o INTERFACE if given) and the kernel finds the next hop; to send to a fixed next-hop MAC, use a DPDK port with --next-hop MAC",
        );
    }
    if args.connections == 0 {
        warnings.warn("-C 0 means 1 connection to each intercept (as in the C tool)");
        args.connections = 1;
    }
    if args.rounds == 0 {
        args.rounds = 1;
    }
    Ok(())
}

/// Every numeric flag (and so every YAML key behind one) against its documented range.
fn check_numbers(args: &Args) -> Result<(), Box<pipelines::compat::RangeError>> {
    use compat::{check_range, MAX_MILLISECONDS, MAX_SECONDS};
    check_range(
        "-t",
        args.timeout,
        0..=MAX_SECONDS,
        "the session timeout in seconds",
        "600",
    )?;
    if let Some(k) = args.keepalive {
        check_range(
            "-k",
            k,
            0..=MAX_SECONDS,
            "the keep-alive timeout in seconds (0: -t + 120)",
            "720",
        )?;
    }
    check_range("-p", args.port, 1..=65535, "the intercept port", "36524")?;
    check_range(
        "-C",
        args.connections,
        1..=16,
        "the connections to each intercept",
        "2",
    )?;
    check_range(
        "-n",
        args.copies,
        0..=1023,
        "the number of copies (0 and 1: the original only)",
        "3",
    )?;
    check_range(
        "-f",
        args.instance,
        0..=31,
        "the instance number (the client port space is split in 32 slices)",
        "1",
    )?;
    if let Some(r) = args.sample {
        check_range(
            "-r",
            r,
            0..=100,
            "the percentage of sessions replayed (0: all)",
            "10",
        )?;
    }
    if let Some(b) = args.capture_buffer_mib {
        check_range("-B", b, 1..=4096, "the capture buffer in MiB", "64")?;
    }
    check_range(
        "--pace-idle-ms",
        args.pace_idle_ms,
        0..=MAX_MILLISECONDS,
        "the pacing silence in milliseconds",
        "100",
    )?;
    pipelines::compat::check_stats_interval(args.stats_interval)?;
    check_range(
        "-I",
        args.idle_gap_ms,
        0..=MAX_MILLISECONDS,
        "the idle gap in milliseconds (0: off)",
        "1000",
    )?;
    check_range(
        "-T",
        args.rounds,
        1..=1_000_000,
        "the number of rounds",
        "3",
    )?;
    Ok(())
}

/// `--udp`: stateless UDP replay (spec §6.1), no sessions and no intercept.
fn run_udp(
    args: &Args,
    transfers: Vec<pipelines::tcpcopy::transform::Transfer>,
    clients: Option<ClientAddrs>,
) -> anyhow::Result<()> {
    use pipelines::udpcopy::{self, ReassemblyConfig, ReplayConfig, Udpcopy, UdpcopyConfig};
    if args.pcap.is_some() {
        anyhow::bail!("--udp replays live captures only: drop --pcap (or -i FILE)");
    }
    // No -i: every interface, as for TCP.
    let interface = args.interface.clone().unwrap_or_else(|| "any".to_owned());
    if args.dpdk.settings()?.is_some() {
        anyhow::bail!("--udp captures on kernel interfaces only: use -i INTERFACE, not --dpdk-*");
    }
    if args.dump_sent.is_some() || args.memory_mib.is_some() {
        anyhow::bail!("--dump-sent and -m work with TCP replay only: drop them with --udp");
    }
    if args.mtu < 576 {
        anyhow::bail!(
            "bad -M value {}: the MTU towards the target must be 576..=65535, e.g. -M 1500",
            args.mtu
        );
    }
    for (given, flag) in [
        (args.sample.is_some(), "-r"),
        (args.ramp, "-g"),
        (args.localhost_as.is_some(), "-H"),
    ] {
        if given {
            anyhow::bail!("{flag} is for TCP sessions; --udp replays every datagram");
        }
    }
    let filter = args
        .filter
        .clone()
        .unwrap_or_else(|| udpcopy::capture_filter(&transfers));
    let config = UdpcopyConfig {
        replay: ReplayConfig {
            plan: PortPlan::new(args.copies, args.instance, 1)?,
            transfers,
            clients,
            mtu: usize::from(args.mtu),
            reassembly: ReassemblyConfig::default(),
        },
        interface,
        filter,
        output_interface: args.output_interface.clone(),
        stats_interval: (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval)),
        busy_poll: args.busy_poll,
    };
    if let Some(effective) = &args.effective {
        let pipeline = pipelines::config::udpcopy_pipeline(&config);
        print!("{}", pipelines::config::check_report(effective, &pipeline));
        return Ok(());
    }
    let live = cli::go_live(
        args.daemon,
        args.log.as_deref(),
        &args.log_level,
        args.pid_file.as_deref(),
    )?;
    let stop = live.stop.clone();
    let (interface, filter) = (config.interface.clone(), config.filter.clone());
    let udp = Udpcopy::start(config).context("tcpcopy --udp cannot start")?;
    tracing::info!(
        "tcpcopy {} udp replay started: -x {} -i {interface} filter \"{filter}\" -M {}",
        env!("CARGO_PKG_VERSION"),
        args.transfers,
        args.mtu
    );
    let dump = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, dump.clone())
        .context("install the SIGUSR1 handler")?;
    while !stop.load(Ordering::Relaxed) && udp.is_running() {
        std::thread::sleep(Duration::from_millis(50));
        if dump.swap(false, Ordering::Relaxed) {
            tracing::info!("{}", udp.stats().line());
        }
    }
    tracing::info!("stopping");
    let stats = udp.join()?;
    tracing::info!("final: {}", stats.line());
    Ok(())
}

/// The `--pcap` settings, checked (`None` without `--pcap`).
fn offline_config(
    args: &Args,
    transfers: &[pipelines::tcpcopy::transform::Transfer],
) -> anyhow::Result<Option<OfflineConfig>> {
    let Some(path) = &args.pcap else {
        return Ok(None);
    };
    if !(args.offline_tail_s.is_finite() && (0.0..=86_400.0).contains(&args.offline_tail_s)) {
        anyhow::bail!(
            "bad --offline-tail-s value {}: seconds from 0 to 86400, e.g. --offline-tail-s 5",
            args.offline_tail_s
        );
    }
    let config = OfflineConfig {
        path: path.clone(),
        filter: args
            .filter
            .clone()
            .unwrap_or_else(|| capture_filter(transfers)),
        acceleration: args.acceleration,
        idle_gap: (args.idle_gap_ms > 0).then(|| Duration::from_millis(args.idle_gap_ms)),
        rounds: args.rounds,
        tail: Duration::from_secs_f64(args.offline_tail_s),
        progress: std::io::stderr().is_terminal() && args.log.is_none() && !args.daemon,
    };
    config.validate()?;
    Ok(Some(config))
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
