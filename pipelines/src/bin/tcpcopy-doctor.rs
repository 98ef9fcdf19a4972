//! `tcpcopy-doctor`: checks a host's setup for its part in a replay (online, target, assistant)
//! and prints one line per check: `OK`, `WARN` or `FAIL`, what was checked, and for a problem
//! its likely consequence and the command that fixes it. Exit status 0 without a FAIL, 1 with
//! one, 2 for bad flags.

use clap::{Parser, Subcommand};
use pipelines::doctor::{self, AssistantOptions, ClientNet, OnlineOptions, TargetOptions, Verdict};
use pipelines::tcpcopy::transform::{capture_filter, parse_transfers, ClientAddrs};
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "tcpcopy-doctor",
    version,
    about = "Check a host's setup for tcpcopy (online), the target, or intercept (assistant)",
    long_about = "Runs the checks for one host's role and prints one line per check: OK, WARN or \
FAIL, what was checked, and for a problem its likely consequence and the exact fix. Exit status: \
0 without a FAIL, 1 with one.\n\nExamples:\n  tcpcopy-doctor online -x 80-10.0.0.30:8080 -s 10.0.0.40 -i eth0\n  \
tcpcopy-doctor target --clients 10.0.0.10,10.9.9.0/24 --assistant 10.0.0.40 --port 8080\n  \
tcpcopy-doctor assistant -i eth0 -F 'tcp and src port 8080'"
)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// The online host, where tcpcopy captures the clients' requests
    Online {
        /// tcpcopy's -x: [onlineIP:]onlinePort-targetIP:targetPort[,...]
        #[arg(short = 'x', value_name = "TRANSFERS")]
        transfers: String,
        /// tcpcopy's -s: intercept addresses ip[:port][,...]
        #[arg(short = 's', value_name = "SERVERS")]
        servers: String,
        /// Capture interface (default: the interface of the route to the target)
        #[arg(short = 'i', value_name = "INTERFACE")]
        interface: Option<String>,
        /// tcpcopy's -c: replay client addresses (e.g. 10.9.9.x)
        #[arg(short = 'c', value_name = "CLIENTS")]
        clients: Option<String>,
        /// tcpcopy's -F (default: made from -x)
        #[arg(short = 'F', value_name = "FILTER")]
        filter: Option<String>,
        /// tcpcopy's -p: intercept port for -s entries without one
        #[arg(short = 'p', value_name = "PORT", default_value_t = 36524)]
        port: u16,
        /// Seconds to capture live traffic with the filter (0: skip)
        #[arg(long, value_name = "SECONDS", default_value_t = 3)]
        listen_s: u64,
        /// tcpcopy runs on DPDK ports: check hugepages too
        #[arg(long)]
        dpdk: bool,
        /// Milliseconds to wait for each intercept's TCP connection
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        connect_timeout_ms: u64,
    },
    /// The target host, which runs the service under test
    Target {
        /// Client addresses and networks whose replies must go via the assistant:
        /// 10.0.0.10, 10.9.9.0/24 or 10.9.9.x, comma-separated
        #[arg(long, value_name = "LIST")]
        clients: String,
        /// The assistant's address (the gateway of those routes)
        #[arg(long, value_name = "IP")]
        assistant: Ipv4Addr,
        /// The service port under test (checked to be listening)
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
    },
    /// The assistant host, where intercept captures the target's replies
    Assistant {
        /// intercept's -i
        #[arg(short = 'i', value_name = "INTERFACE")]
        interface: Option<String>,
        /// intercept's -F
        #[arg(short = 'F', value_name = "FILTER")]
        filter: Option<String>,
        /// intercept's control port (-p)
        #[arg(long, value_name = "PORT", default_value_t = 36524)]
        port: u16,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tcpcopy-doctor: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> anyhow::Result<i32> {
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut report = |v: Verdict| {
        println!("{v}");
        let _ = std::io::stdout().flush();
        verdicts.push(v);
    };
    match args.role {
        Role::Online {
            transfers,
            servers,
            interface,
            clients,
            filter,
            port,
            listen_s,
            dpdk,
            connect_timeout_ms,
        } => {
            let parsed = parse_transfers(&transfers)?;
            if let Some(c) = &clients {
                ClientAddrs::parse(c, &parsed)?;
            }
            let intercepts = pipelines::cli::parse_servers(&servers, port)?;
            if listen_s > 3600 {
                anyhow::bail!("bad --listen-s value {listen_s}: use 0..3600 seconds");
            }
            let options = OnlineOptions {
                interface,
                filter: filter.unwrap_or_else(|| capture_filter(&parsed)),
                transfers: parsed,
                intercepts,
                clients,
                listen: Duration::from_secs(listen_s),
                dpdk,
                connect_timeout: Duration::from_millis(connect_timeout_ms.clamp(10, 60_000)),
            };
            if !options.listen.is_zero() {
                eprintln!(
                    "tcpcopy-doctor: capturing {listen_s} s of live traffic with '{}' ...",
                    options.filter
                );
            }
            doctor::diagnose_online(&options, &mut report);
        }
        Role::Target {
            clients,
            assistant,
            port,
        } => {
            let clients = ClientNet::parse_list(&clients).map_err(anyhow::Error::msg)?;
            doctor::diagnose_target(
                &TargetOptions {
                    clients,
                    assistant,
                    port,
                },
                &mut report,
            );
        }
        Role::Assistant {
            interface,
            filter,
            port,
        } => doctor::diagnose_assistant(
            &AssistantOptions {
                interface,
                filter,
                port,
            },
            &mut report,
        ),
    }
    Ok(doctor::exit_status(&verdicts))
}
