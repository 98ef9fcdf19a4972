//! `intercept`: runs on the assistant host, captures the target's replies and returns their
//! IPv4/TCP headers to the tcpcopy that registered each session.

use anyhow::Context;
use clap::{ArgAction, Parser};
use engine::control::{Framing, RecordFormat, Secret, Transport};
use pipelines::cli;
use pipelines::intercept::{Intercept, InterceptConfig};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "intercept",
    version,
    about = "Capture the target server's replies and return their headers to tcpcopy",
    long_about = "Runs on the assistant host, to which the target routes its replies for the \
replayed client addresses (keep net.ipv4.ip_forward=0 there so the replies die after capture).\n\n\
Example: intercept -i eth0 -F 'tcp and src port 8080'",
    disable_version_flag = true
)]
struct Args {
    /// Where to capture the target's replies: every interface (no -i, or -i any, as the C
    /// tool), one interface (-i eth0) or several (-i eth0,eth1); or use --dpdk-rx
    #[arg(short = 'i', value_name = "INTERFACE")]
    interface: Option<String>,
    /// The C "docker" rewrite: a reply addressed to ipA is routed and reported as if addressed
    /// to ipB, e.g. -D 172.17.0.2-10.0.0.5
    #[arg(short = 'D', value_name = "ipA-ipB")]
    rewrite_client: Option<String>,
    /// C --traditional (NFQUEUE) builds' pass list: refused (this intercept captures on the
    /// assistant host; nothing is queued, so nothing needs passing)
    #[arg(short = 'x', value_name = "IPS")]
    pass_list: Option<String>,
    /// C NFQUEUE builds' queue length: refused, as -x
    #[arg(short = 'q', value_name = "N")]
    queue_length: Option<String>,
    /// C tool's delay-table bucket count: accepted and ignored (replies waiting for their
    /// route sit in a bounded queue sized by itself)
    #[arg(short = 's', value_name = "N")]
    delay_buckets: Option<String>,
    /// C tool's initial batch size: accepted and ignored (batches adapt to the load)
    #[arg(short = 'n', value_name = "N")]
    batch_size: Option<String>,
    /// Not a flag of the C intercept either (it rejects -t): idle routes go after
    /// --route-timeout SECONDS
    #[arg(short = 't', value_name = "SECONDS", hide = true)]
    route_timeout_c: Option<String>,
    #[command(flatten)]
    dpdk: cli::DpdkArgs,
    #[command(flatten)]
    metrics: pipelines::metrics::MetricsArgs,
    /// Capture filter (pcap syntax) selecting the target's replies, e.g. "tcp and src port 8080"
    #[arg(short = 'F', value_name = "FILTER")]
    filter: String,
    /// TCP port to listen on for tcpcopy
    #[arg(short = 'p', value_name = "PORT", default_value_t = 36524)]
    port: u16,
    /// Address to listen on
    #[arg(short = 'b', value_name = "IP", default_value = "0.0.0.0")]
    bind: String,
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
    /// Read the settings from this YAML file (see conf/); flags given here override its keys
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the flags and the --config file, print the effective settings and the pipeline,
    /// and exit (opens no socket, needs no root)
    #[arg(long, action = ArgAction::SetTrue)]
    check: bool,
    /// Seconds after which an idle route is forgotten
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    route_timeout: u64,
    /// Seconds between statistics lines (0: only at exit)
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    stats_interval: u64,
    /// Log level: error, warn, info, debug, trace
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Records carry up to 128 payload bytes (for a tcpcopy built with a payload module)
    #[arg(long, action = ArgAction::SetTrue)]
    payload_records: bool,
    /// Plain framing (C tools built --disable-combined)
    #[arg(long, action = ArgAction::SetTrue)]
    plain_framing: bool,
    /// Capture threads (a PACKET_FANOUT group spreads the replies over them by flow)
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: usize,
    /// Control channel transport: tcp (the C tools' protocol) or udp (tcpcopy-rs only; the
    /// tcpcopy must use udp too)
    #[arg(long, value_name = "tcp|udp", default_value = "tcp")]
    transport: Transport,
    /// Require tcpcopy to prove knowledge of the secret in FILE (at least 16 bytes; trailing
    /// line breaks ignored); tcpcopy must be given the same file. Off: the C byte format.
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// No routing: spread every reply over the connected tcpcopy connections (C --single
    /// build); a tcpcopy connecting more than 3 s after the first replaces it
    #[arg(long, action = ArgAction::SetTrue)]
    single: bool,
    /// With --single: refuse a new tcpcopy while the previous one is still connected
    #[arg(short = 'c', action = ArgAction::SetTrue)]
    protect: bool,
    /// Accept control connections only from these tcpcopy addresses or networks, e.g.
    /// --allow 10.0.0.20,10.0.1.0/24 (default: any address, as the C tool)
    #[arg(long, value_name = "IPS")]
    allow: Option<String>,
}

/// The C intercept's flags of other builds: refused with the reason, or accepted with a warning.
fn c_forms(args: &Args, warnings: &mut pipelines::compat::Warnings) -> anyhow::Result<()> {
    if args.pass_list.is_some() || args.queue_length.is_some() {
        anyhow::bail!(
            "-x (pass list) and -q (queue length) belong to the C intercept's --traditional build, which runs on the target server and takes the replies from an NFQUEUE; this intercept runs on the assistant host, where the target's route sends its replies, and captures them with -i/-F (nothing is queued, so nothing needs passing): drop -x and -q, route the replies to this host (see the README's deployment section)"
        );
    }
    if args.route_timeout_c.is_some() {
        anyhow::bail!(
            "-t is not a flag of intercept (the C intercept rejects it too): idle routes are forgotten after --route-timeout SECONDS (default 120)"
        );
    }
    warnings.ignored(&[
        (
            "-s",
            args.delay_buckets.as_ref(),
            "replies that arrive before their route wait in a bounded queue sized by intercept itself",
        ),
        (
            "-n",
            args.batch_size.as_ref(),
            "batches of records adapt to the load by themselves (as in the C tool after its start)",
        ),
    ]);
    Ok(())
}

/// Every numeric flag (and so every YAML key behind one) against its documented range.
fn check_numbers(args: &Args) -> Result<(), Box<pipelines::compat::RangeError>> {
    use pipelines::compat::{check_range, MAX_SECONDS};
    check_range(
        "--route-timeout",
        args.route_timeout,
        1..=MAX_SECONDS,
        "the idle route timeout in seconds",
        "120",
    )?;
    pipelines::compat::check_stats_interval(args.stats_interval)?;
    Ok(())
}

/// `-D ipA-ipB`.
fn parse_rewrite(text: &str) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let parsed = text.split_once('-').and_then(|(a, b)| {
        Some((
            a.trim().parse::<Ipv4Addr>().ok()?,
            b.trim().parse::<Ipv4Addr>().ok()?,
        ))
    });
    parsed.ok_or_else(|| {
        anyhow::anyhow!(
            "bad -D value '{text}': the form is ipA-ipB (replies to ipA are routed as replies to ipB), e.g. -D 172.17.0.2-10.0.0.5"
        )
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("intercept: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    use pipelines::config::{effective_yaml, parse_args, InterceptFile};
    let (args, matches) = parse_args::<Args, InterceptFile>()?;
    let mut warnings = pipelines::compat::Warnings::new("intercept");
    c_forms(&args, &mut warnings)?;
    check_numbers(&args).map_err(|e| {
        pipelines::compat::name_yaml_key::<Args, pipelines::config::InterceptFile>(
            e,
            &matches,
            args.config.as_deref(),
        )
    })?;
    let rewrite_client = args
        .rewrite_client
        .as_deref()
        .map(parse_rewrite)
        .transpose()?;
    let bind: Ipv4Addr = args.bind.parse().with_context(|| {
        format!(
            "bad -b value '{}': not an IPv4 address (e.g. -b 10.0.0.40)",
            args.bind
        )
    })?;
    if args.protect && !args.single {
        anyhow::bail!("-c (protect the connected tcpcopy) only applies with --single");
    }
    if !(1..=pipelines::intercept::MAX_WORKERS).contains(&args.workers) {
        anyhow::bail!(
            "bad --workers value {}: use 1..={}",
            args.workers,
            pipelines::intercept::MAX_WORKERS
        );
    }
    let auth = args
        .auth_file
        .as_deref()
        .map(Secret::from_file)
        .transpose()
        .context("bad --auth-file")?;
    let dpdk = args.dpdk.settings()?;
    let interface = match (&args.interface, &dpdk) {
        (Some(i), None) => i.clone(),
        (None, Some(d)) => d.rx_device.clone(),
        (Some(_), Some(_)) => anyhow::bail!("give -i INTERFACE or --dpdk-rx DEVICE, not both"),
        // The C tool's default: every interface.
        (None, None) => "any".to_owned(),
    };
    let config = InterceptConfig {
        dpdk,
        interface,
        filter: args.filter.clone(),
        rewrite_client,
        listen: SocketAddrV4::new(bind, args.port),
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
        route_timeout: Duration::from_secs(args.route_timeout.max(1)),
        stats_interval: (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval)),
        workers: args.workers,
        transport: args.transport,
        auth,
        single: args.single,
        protect: args.protect,
        allow: args
            .allow
            .as_deref()
            .map(pipelines::compat::AllowList::parse)
            .transpose()?,
    };
    if args.check {
        let effective = effective_yaml::<Args, InterceptFile>(&matches)?;
        let pipeline = pipelines::config::intercept_pipeline(&config);
        print!("{}", pipelines::config::check_report(&effective, &pipeline));
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
    tracing::info!(
        "intercept {} starting: -i {} -F \"{}\" listening on {} ({}{}), {} capture thread(s){}",
        env!("CARGO_PKG_VERSION"),
        config.interface,
        config.filter,
        config.listen,
        config.transport,
        if config.auth.is_some() {
            ", authenticated"
        } else {
            ""
        },
        config.workers,
        if config.single { ", --single" } else { "" }
    );
    let mut metrics =
        pipelines::metrics::MetricsExporter::start(&args.metrics, config.stats_interval)?;
    let intercept = Intercept::start(config).context("intercept cannot start")?;
    while !stop.load(Ordering::Relaxed) && intercept.is_running() {
        std::thread::sleep(Duration::from_millis(50));
        metrics.tick(std::time::Instant::now(), || intercept.stats());
    }
    tracing::info!("stopping");
    let stats = intercept.join()?;
    metrics.finish(&stats);
    tracing::info!("final: {}", stats.line());
    Ok(())
}
