//! Forwarding rate of the ports: rx -> tx of every IPv4 packet, on DPDK (`DpdkRx -> DpdkTx` over
//! a `net_af_packet` vdev) or on the kernel (`AfPacketRx -> RawIpTx`), plus a frame generator
//! to feed them. Prints packets per second.
//!
//! ```text
//! port_rate gen      IFACE DST_MAC SRC_IP DST_IP SECONDS   blast 64-byte UDP frames (AF_PACKET, qdisc bypass)
//! port_rate afpacket IFACE SECONDS                         AfPacketRx(IFACE, "ip") -> RawIpTx(bound to IFACE)
//! port_rate dpdk     IFACE NEXT_HOP_MAC SECONDS [LCORE]    EAL + net_af_packet0,iface=IFACE; DpdkRx -> DpdkTx
//! ```
//! The forwarders send each packet back out of the same interface unchanged (the kernel path
//! routes by destination address, the DPDK path to NEXT_HOP_MAC). `scripts/port-rate.sh` builds
//! the namespaces and runs both; the `dpdk` mode needs `--features dpdk`, root and hugepages.
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use engine::port::afpacket::{AfPacketConfig, AfPacketRx};
use engine::port::rawsock::{RawIpConfig, RawIpTx};
use engine::port::{RxPort, TxBatch, TxPort};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("gen") if args.len() == 6 => generate(&args[1..]),
        Some("afpacket") if args.len() == 3 => afpacket(&args[1], args[2].parse().unwrap_or(5)),
        Some("dpdk") if args.len() >= 4 => dpdk(&args[1..]),
        _ => Err(
            "usage: port_rate gen IFACE DST_MAC SRC_IP DST_IP SECONDS | afpacket IFACE \
                  SECONDS | dpdk IFACE NEXT_HOP_MAC SECONDS [LCORE]"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()?;
    parts
        .try_into()
        .map_err(|_| format!("bad MAC {text}").into())
}

fn report(what: &str, packets: u64, bytes: u64, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "{what}: {packets} packets in {secs:.2} s = {:.3} Mpps ({:.1} Mbit/s of IP)",
        packets as f64 / secs / 1e6,
        bytes as f64 * 8.0 / secs / 1e6
    );
}

/// Forwards until `seconds` have passed since the first packet; returns (packets, bytes, time).
fn forward(rx: &mut dyn RxPort, tx: &mut dyn TxPort, seconds: u64) -> Result<(u64, u64, Duration)> {
    let mut batch = TxBatch::new(64);
    let mut start: Option<Instant> = None;
    let mut idle_since = Instant::now();
    let limit = Duration::from_secs(seconds);
    loop {
        let n = rx.rx_burst(64, &mut |frame| {
            let d = frame.data;
            if d.len() > 34 && d[12..14] == [0x08, 0x00] {
                batch.push(&d[14..]);
            }
        })?;
        if !batch.is_empty() {
            tx.tx_burst(&mut batch)?;
        }
        if n > 0 {
            idle_since = Instant::now();
            start.get_or_insert_with(Instant::now);
        }
        match start {
            Some(s) if s.elapsed() >= limit => break,
            // Traffic stopped for a while after it started: the generator is done.
            Some(_) if idle_since.elapsed() > Duration::from_secs(2) => break,
            None if idle_since.elapsed() > Duration::from_secs(30) => {
                return Err("no traffic within 30 s".into())
            }
            _ => {}
        }
    }
    let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    let stats = tx.stats();
    Ok((stats.tx_packets, stats.tx_bytes, elapsed))
}

fn afpacket(iface: &str, seconds: u64) -> Result<()> {
    let mut rx = AfPacketRx::open(&AfPacketConfig {
        interface: iface.to_owned(),
        filter: Some("ip".to_owned()),
        ..AfPacketConfig::default()
    })?;
    let mut tx = RawIpTx::open(&RawIpConfig {
        bind_device: Some(iface.to_owned()),
        ..RawIpConfig::default()
    })?;
    let (packets, bytes, elapsed) = forward(&mut rx, &mut tx, seconds)?;
    report("afpacket->rawip forwarded", packets, bytes, elapsed);
    println!("rx {:?}\ntx {:?}", rx.stats(), tx.stats());
    Ok(())
}

#[cfg(feature = "dpdk")]
fn dpdk(args: &[String]) -> Result<()> {
    use engine::port::dpdk::{DpdkPort, Eal, EalConfig, MacAddr, NextHop, PortConfig, QueueId};
    let iface = &args[0];
    let next_hop: MacAddr = args[1].parse()?;
    let seconds: u64 = args[2].parse()?;
    let eal = Eal::init(&EalConfig {
        lcores: args.get(3).cloned(),
        vdevs: vec![format!("net_af_packet0,iface={iface}")],
        no_pci: true,
        ..EalConfig::default()
    })?;
    let port = DpdkPort::open(
        &eal,
        &PortConfig {
            device: "net_af_packet0".to_owned(),
            next_hop: NextHop::Mac(next_hop),
            ..PortConfig::default()
        },
    )?;
    let mut rx = port.rx_queue(QueueId(0))?;
    let mut tx = port.tx_queue(QueueId(0))?;
    let (packets, bytes, elapsed) = forward(&mut rx, &mut tx, seconds)?;
    report("dpdk->dpdk forwarded", packets, bytes, elapsed);
    println!(
        "rx {:?}\ntx {:?}\ndevice {:?}",
        rx.stats(),
        tx.stats(),
        port.device_stats()?
    );
    Ok(())
}

#[cfg(not(feature = "dpdk"))]
fn dpdk(_: &[String]) -> Result<()> {
    Err(
        "built without DPDK: cargo run --release -p engine --features dpdk --example port_rate"
            .into(),
    )
}

/// Sends 64-byte UDP frames as fast as one AF_PACKET socket with qdisc bypass can.
#[allow(unsafe_code)]
fn generate(args: &[String]) -> Result<()> {
    let iface = &args[0];
    let dst_mac = parse_mac(&args[1])?;
    let src: Ipv4Addr = args[2].parse()?;
    let dst: Ipv4Addr = args[3].parse()?;
    let seconds: u64 = args[4].parse()?;
    let name = std::ffi::CString::new(iface.as_str())?;
    // SAFETY: valid C string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
    if ifindex == 0 {
        return Err(format!("no interface {iface}").into());
    }
    let src_mac =
        parse_mac(std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))?.trim())?;
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live c_int for the call. Failure only makes the generator slower.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            std::ptr::from_ref(&one).cast(),
            4,
        )
    };
    const BATCH: usize = 64;
    let mut frames = vec![[0u8; 60]; BATCH];
    for (i, f) in frames.iter_mut().enumerate() {
        f[..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&46u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let mut sum: u32 = ip[..20]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        ip[20..22].copy_from_slice(&(10_000 + i as u16).to_be_bytes());
        ip[22..24].copy_from_slice(&9u16.to_be_bytes());
        ip[24..26].copy_from_slice(&26u16.to_be_bytes());
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut iov: Vec<libc::iovec> = frames
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; every pointer set below stays valid for the loop.
    let mut headers: Vec<libc::mmsghdr> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (h, v) in headers.iter_mut().zip(iov.iter_mut()) {
        h.msg_hdr.msg_name = std::ptr::from_mut(&mut addr).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let limit = Duration::from_secs(seconds);
    let mut sent: u64 = 0;
    while start.elapsed() < limit {
        // SAFETY: `headers` holds BATCH valid messages pointing at live frames and `addr`.
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    report("generated", sent, sent * 46, start.elapsed());
    // SAFETY: we own the descriptor.
    unsafe { libc::close(fd) };
    Ok(())
}
