//! `intercept`: runs on the assistant host, captures the target's replies and returns their
//! IPv4/TCP headers to the tcpcopy that registered each session.

use anyhow::Context;
use clap::{ArgAction, Parser};
use engine::control::{Framing, RecordFormat};
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
    /// Interface to capture the target's replies on (e.g. eth0)
    #[arg(short = 'i', value_name = "INTERFACE")]
    interface: String,
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
}

fn main() {
    if let Err(e) = run() {
        eprintln!("intercept: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let bind: Ipv4Addr = args.bind.parse().with_context(|| {
        format!(
            "bad -b value '{}': not an IPv4 address (e.g. -b 10.0.0.40)",
            args.bind
        )
    })?;
    let config = InterceptConfig {
        interface: args.interface.clone(),
        filter: args.filter.clone(),
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
    tracing::info!(
        "intercept {} starting: -i {} -F \"{}\" listening on {}",
        env!("CARGO_PKG_VERSION"),
        config.interface,
        config.filter,
        config.listen
    );
    let intercept = Intercept::start(config).context("intercept cannot start")?;
    while !stop.load(Ordering::Relaxed) && intercept.is_running() {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping");
    let stats = intercept.join()?;
    tracing::info!("final: {}", stats.line());
    Ok(())
}
