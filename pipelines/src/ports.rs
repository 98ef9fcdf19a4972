//! Opening the packet ports a pipeline runs on: the kernel's (AF_PACKET capture, raw IP
//! transmit) or DPDK's (a poll-mode device for capture and one for transmit, behind the
//! `dpdk` cargo feature). The control channel stays on the kernel stack either way.

use std::any::Any;
use std::net::Ipv4Addr;

/// DPDK settings of a pipeline, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DpdkSettings {
    /// The device to capture on: a PCI address bound to vfio-pci (`0000:01:00.0`) or a
    /// virtual device named in `vdevs` (`net_af_packet0`).
    pub rx_device: String,
    /// The device to transmit on (mirror-port deployments: the test-network NIC); default:
    /// `rx_device`.
    pub tx_device: Option<String>,
    /// Virtual devices to create, e.g. `net_af_packet0,iface=eth0`.
    pub vdevs: Vec<String>,
    /// PCI devices DPDK may use (an allow-list); none: `--no-pci` when only vdevs are given.
    pub pci: Vec<String>,
    /// Use `--in-memory` (hugepages need not be mounted) instead of a hugetlbfs mount.
    pub in_memory: bool,
    /// EAL `--lcores`.
    pub lcores: Option<String>,
    /// The next hop of transmitted frames: a MAC (`02:00:00:00:00:1e`) or an IPv4 address
    /// resolved by ARP on the transmit device.
    pub next_hop: Option<String>,
}

/// A pipeline's capture and transmit ports.
pub struct OpenedPorts {
    /// One capture port per worker.
    pub rx: Vec<Box<dyn engine::port::RxPort>>,
    /// One transmit port per worker (empty for intercept).
    pub tx: Vec<Box<dyn engine::port::TxPort>>,
    /// What must outlive the ports (the DPDK environment); dropped after them.
    pub keep: Option<Box<dyn Any + Send>>,
    /// Called once on each worker thread before it touches its ports (DPDK thread setup).
    pub register_thread: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for OpenedPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedPorts")
            .field("rx", &self.rx.len())
            .field("tx", &self.tx.len())
            .finish()
    }
}

/// What a `-i` value captures on, as the C tools read it: nothing, `any` or an empty value
/// means every interface; `a,b` each listed interface; one name that interface alone
/// (Ethernet frames, as before). Returns the capture scope and the interface for
/// [`engine::port::afpacket::AfPacketConfig::interface`].
pub fn capture_scope(interface: &str) -> (String, engine::port::afpacket::Scope) {
    use engine::port::afpacket::Scope;
    let names: Vec<String> = interface
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "any") {
        return ("any".to_owned(), Scope::AllInterfaces);
    }
    if names.len() == 1 {
        return (names[0].clone(), Scope::Interface);
    }
    (names.join(","), Scope::Interfaces(names))
}

/// Parses `--next-hop`.
///
/// # Errors
/// Neither a MAC address nor an IPv4 address; the message shows both forms.
pub fn parse_next_hop(text: &str) -> anyhow::Result<NextHopSpec> {
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(NextHopSpec::Ip(ip));
    }
    let bytes: Vec<&str> = text.split(':').collect();
    if bytes.len() == 6 {
        let mut mac = [0u8; 6];
        let mut ok = true;
        for (i, b) in bytes.iter().enumerate() {
            match u8::from_str_radix(b, 16) {
                Ok(v) if b.len() == 2 => mac[i] = v,
                _ => ok = false,
            }
        }
        if ok {
            return Ok(NextHopSpec::Mac(mac));
        }
    }
    anyhow::bail!(
        "bad --next-hop value '{text}': give the next hop's MAC (e.g. 02:77:00:00:00:1e) or its IPv4 address to resolve by ARP (e.g. 10.77.0.30)"
    )
}

/// The next hop of transmitted frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHopSpec {
    /// This MAC.
    Mac([u8; 6]),
    /// Resolve this address by ARP.
    Ip(Ipv4Addr),
}

/// Opens DPDK ports: `workers` capture queues on the rx device (RSS with a symmetric key on a
/// NIC; `qpairs` on an af_packet vdev, whose PMD spreads flows with a kernel fanout group) and,
/// when `transmit`, as many transmit queues on the tx device. The flows' spread is not a
/// function of the client port: tcpcopy learns each session's owner (see
/// `tcpcopy::owners`).
///
/// # Errors
/// DPDK's own errors, which name the cause and the fix (no hugepages, a missing device), or
/// this build lacking DPDK support.
#[cfg(feature = "dpdk")]
pub fn open_dpdk(
    settings: &DpdkSettings,
    program: &str,
    workers: usize,
    transmit: bool,
) -> anyhow::Result<OpenedPorts> {
    use anyhow::Context;
    use engine::port::dpdk::{
        DpdkPort, Eal, EalConfig, MacAddr, MemoryMode, NextHop, PortConfig, QueueId,
    };
    if !(1..=64).contains(&workers) {
        anyhow::bail!("bad --workers value {workers}: use 1..64 (one DPDK queue pair each)");
    }
    let queues = workers as u16;
    // The af_packet PMD's default ring (512 frames) overflows on the first burst of a busy
    // link, and it does not count what it drops: give it 16k frames unless told otherwise.
    // Several workers need as many queue pairs (the PMD spreads flows over them with a kernel
    // fanout group; a NIC with RSS and a symmetric key).
    let vdevs: Vec<String> = settings
        .vdevs
        .iter()
        .map(|v| {
            let mut v = v.clone();
            if v.starts_with("net_af_packet") {
                if !v.contains("framecnt=") {
                    v.push_str(",blocksz=4096,framesz=2048,framecnt=16384");
                }
                if queues > 1 && !v.contains("qpairs=") {
                    v.push_str(&format!(",qpairs={queues}"));
                }
            }
            v
        })
        .collect();
    let eal = Eal::init(&EalConfig {
        program: program.to_owned(),
        lcores: settings.lcores.clone(),
        vdevs,
        pci_allow: settings.pci.clone(),
        no_pci: settings.pci.is_empty(),
        memory: if settings.in_memory {
            MemoryMode::InMemory
        } else {
            MemoryMode::Hugepages {
                file_prefix: Some(format!("{program}-{}", std::process::id())),
            }
        },
        ..EalConfig::default()
    })?;
    let next_hop = match settings
        .next_hop
        .as_deref()
        .map(parse_next_hop)
        .transpose()?
    {
        Some(NextHopSpec::Mac(mac)) => NextHop::Mac(MacAddr(mac)),
        Some(NextHopSpec::Ip(ip)) => NextHop::Arp {
            ip,
            source: None,
            timeout_ms: 3000,
        },
        None => NextHop::None,
    };
    let tx_device = settings
        .tx_device
        .clone()
        .unwrap_or_else(|| settings.rx_device.clone());
    if transmit && matches!(next_hop, NextHop::None) {
        anyhow::bail!(
            "DPDK transmit needs the next hop's address: --next-hop MAC (e.g. 02:77:00:00:00:1e) or --next-hop IP (resolved by ARP)"
        );
    }
    let shared = tx_device == settings.rx_device;
    let rx_port = DpdkPort::open(
        &eal,
        &PortConfig {
            device: settings.rx_device.clone(),
            rx_queues: queues,
            tx_queues: if transmit && shared { queues } else { 1 },
            next_hop: if transmit && shared {
                next_hop
            } else {
                NextHop::None
            },
            ..PortConfig::default()
        },
    )?;
    let mut rx: Vec<Box<dyn engine::port::RxPort>> = Vec::with_capacity(workers);
    for q in 0..queues {
        rx.push(Box::new(
            rx_port
                .rx_queue(QueueId(q))
                .with_context(|| format!("capture queue {q}"))?,
        ));
    }
    let mut tx: Vec<Box<dyn engine::port::TxPort>> = Vec::new();
    let mut ports = vec![rx_port.clone()];
    if transmit {
        let tx_port = if shared {
            rx_port
        } else {
            let port = DpdkPort::open(
                &eal,
                &PortConfig {
                    device: tx_device,
                    tx_queues: queues,
                    next_hop,
                    promiscuous: false,
                    ..PortConfig::default()
                },
            )?;
            ports.push(port.clone());
            port
        };
        for q in 0..queues {
            tx.push(Box::new(
                tx_port
                    .tx_queue(QueueId(q))
                    .with_context(|| format!("transmit queue {q}"))?,
            ));
        }
    }
    let thread_eal = eal.clone();
    let register: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(move || {
        if let Err(e) = thread_eal.register_thread() {
            tracing::warn!("DPDK: cannot register the worker thread as an lcore: {e}");
        }
    });
    Ok(OpenedPorts {
        rx,
        tx,
        keep: Some(Box::new((ports, eal))),
        register_thread: Some(register),
    })
}

/// Without the `dpdk` feature: a clear error.
///
/// # Errors
/// Always.
#[cfg(not(feature = "dpdk"))]
pub fn open_dpdk(
    _: &DpdkSettings,
    program: &str,
    _: usize,
    _: bool,
) -> anyhow::Result<OpenedPorts> {
    anyhow::bail!(
        "this {program} was built without DPDK support: install libdpdk-dev and build with `cargo build --release --features dpdk`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_scope_reads_the_c_forms() {
        use engine::port::afpacket::Scope;
        for all in ["", "any", " ", "eth0,any", ","] {
            assert_eq!(
                capture_scope(all),
                ("any".into(), Scope::AllInterfaces),
                "{all:?}"
            );
        }
        assert_eq!(capture_scope("eth0"), ("eth0".into(), Scope::Interface));
        assert_eq!(
            capture_scope("eth0, br0,"),
            (
                "eth0,br0".into(),
                Scope::Interfaces(vec!["eth0".into(), "br0".into()])
            )
        );
    }

    #[test]
    fn next_hop_forms() {
        assert_eq!(
            parse_next_hop("10.77.0.30").unwrap(),
            NextHopSpec::Ip(Ipv4Addr::new(10, 77, 0, 30))
        );
        assert_eq!(
            parse_next_hop("02:77:00:00:00:1e").unwrap(),
            NextHopSpec::Mac([2, 0x77, 0, 0, 0, 0x1e])
        );
        let e = parse_next_hop("02:77:00:00:1e").unwrap_err().to_string();
        assert!(e.contains("bad --next-hop value '02:77:00:00:1e'"), "{e}");
        assert!(parse_next_hop("zz:77:00:00:00:1e").is_err());
    }
}
