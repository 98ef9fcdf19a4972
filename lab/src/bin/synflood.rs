//! synflood: a bounded flood of spoofed TCP SYNs for the lab's fault tests.
//!
//! Sends `--count` SYNs to `--target IP:PORT` through a raw IPv4 socket (`IPPROTO_RAW`, i.e.
//! `IP_HDRINCL`), in batches of `--batch` with sendmmsg(2). Every SYN has a random source address
//! from `--sources CIDR` (default 10.128.0.0/9, which nothing in the lab routes: the replies die
//! where they are made), a random source port (1024..=65535), a random sequence number and an MSS
//! option; the TCP checksum is computed here (the kernel fills the IP one). The run stops after
//! `--count` packets or `--max-seconds`, whichever comes first, and prints one line:
//! `sent N send-errors N elapsed_ms N rate_pps N`.
//!
//! Safety: the destination must be a lab namespace address (10.77.0.0/16) or loopback
//! (127.0.0.0/8); anything else is refused before a socket is opened.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

/// IPv4 header (20) + TCP header (20) + MSS option (4).
const PACKET_LEN: usize = 44;

#[derive(Debug, Parser)]
#[command(
    about = "Bounded spoofed-SYN flood for the tcpcopy-rs lab (10.77.0.0/16 and loopback only)"
)]
struct Args {
    /// Destination IP:PORT; must be in 10.77.0.0/16 or 127.0.0.0/8.
    #[arg(long)]
    target: SocketAddrV4,
    /// Number of SYNs to send.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Stop after this many seconds even if --count is not reached.
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    /// Source addresses are drawn at random from this range (CIDR).
    #[arg(long, default_value = "10.128.0.0/9")]
    sources: String,
    /// Packets per sendmmsg(2) call (1..=1024).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the random sources, ports and sequence numbers (default: from the clock and pid).
    #[arg(long)]
    seed: Option<u64>,
}

/// Whether `ip` is an address the flood may be sent to: a lab namespace or loopback.
fn allowed_destination(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    (o[0] == 10 && o[1] == 77) || o[0] == 127
}

/// Parses `a.b.c.d/len` into (network, mask).
fn parse_cidr(s: &str) -> anyhow::Result<(u32, u32)> {
    let (addr, len) = s
        .split_once('/')
        .with_context(|| format!("--sources {s:?}: the form is a.b.c.d/len"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("--sources {s:?}: {addr:?} is not an IPv4 address"))?;
    let len: u32 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .with_context(|| format!("--sources {s:?}: the prefix length must be 0..=32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((u32::from(addr) & mask, mask))
}

/// xorshift64*: fast, good enough for addresses and ports.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The ones'-complement sum of `data` as 16-bit big-endian words, added to `sum`.
fn sum_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a SYN from `src:sport` to `dst:dport` with sequence number `seq` into `p`, both
/// checksums correct.
fn build_syn(
    p: &mut [u8; PACKET_LEN],
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    id: u16,
) {
    // IPv4 header.
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    p[8] = 64;
    p[9] = libc::IPPROTO_TCP as u8;
    p[10..12].copy_from_slice(&[0, 0]);
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    let ip_check = fold(sum_words(0, &p[..20]));
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    // TCP header with an MSS option.
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&[0; 4]);
    t[12] = 6 << 4; // data offset: 24 bytes
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t[16..18].copy_from_slice(&[0, 0]);
    t[18..20].copy_from_slice(&[0, 0]);
    t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let tcp_len = (PACKET_LEN - 20) as u32;
    let pseudo = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + tcp_len;
    let tcp_check = fold(sum_words(pseudo, &p[20..]));
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
}

fn open_raw_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("socket(AF_INET, SOCK_RAW, IPPROTO_RAW) (needs root or CAP_NET_RAW)");
    }
    // SAFETY: `fd` is a socket we just opened and own; nothing else closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `packets` to `dest` with one sendmmsg(2) call; returns how many the kernel took.
/// `iovecs` and `headers` are scratch vectors (their capacity is reused): the pointers in them
/// are made afresh for this call from the borrows it holds.
fn send_batch(
    socket: &OwnedFd,
    packets: &mut [[u8; PACKET_LEN]],
    dest: &libc::sockaddr_in,
    iovecs: &mut Vec<libc::iovec>,
    headers: &mut Vec<libc::mmsghdr>,
) -> std::io::Result<usize> {
    iovecs.clear();
    iovecs.extend(packets.iter_mut().map(|p| libc::iovec {
        iov_base: p.as_mut_ptr().cast(),
        iov_len: PACKET_LEN,
    }));
    headers.clear();
    for iov in iovecs.iter_mut() {
        // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid value (null
        // pointers, zero lengths); the fields that matter are set next.
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        // The kernel only reads the address; the field is `*mut` in the C declaration.
        h.msg_hdr.msg_name = std::ptr::from_ref(dest).cast_mut().cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        headers.push(h);
    }
    // SAFETY: every header is initialised, its msg_name points at `dest` (a sockaddr_in of the
    // given length) and its one iovec at a PACKET_LEN-byte buffer of `packets`; all of these are
    // borrowed for the duration of the call, so they stay valid and unmoved while the kernel
    // reads them.
    let rc = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc as usize)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dst_ip = *args.target.ip();
    if !allowed_destination(dst_ip) {
        bail!(
            "refusing to flood {dst_ip}: synflood only sends to lab addresses (10.77.0.0/16) or \
             loopback (127.0.0.0/8)"
        );
    }
    let (net, mask) = parse_cidr(&args.sources)?;
    if !(1..=1024).contains(&args.batch) {
        bail!("--batch {}: must be 1..=1024", args.batch);
    }
    if !(args.max_seconds > 0.0 && args.max_seconds.is_finite()) {
        bail!(
            "--max-seconds {}: must be a positive number",
            args.max_seconds
        );
    }
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    });
    let mut rng = Rng(seed | 1);
    let socket = open_raw_socket()?;
    let dst = u32::from(dst_ip);
    let dport = args.target.port();

    let batch = args.batch;
    let mut packets = vec![[0u8; PACKET_LEN]; batch];
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0, // raw sockets ignore the port
        sin_addr: libc::in_addr {
            s_addr: dst.to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(batch);
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(batch);

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.max_seconds);
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut filled = 0usize; // packets of the batch built and not yet sent, from `first`
    let mut first = 0usize;
    while sent < args.count && Instant::now() < deadline {
        if filled == 0 {
            let n = (args.count - sent).min(batch as u64) as usize;
            for p in &mut packets[..n] {
                let r = rng.next();
                let src = net | ((r as u32) & !mask);
                let sport = 1024 + ((r >> 32) as u16 % (65535 - 1024 + 1));
                let seq = (rng.next() >> 16) as u32;
                let id = (r >> 48) as u16;
                build_syn(p, src, dst, sport, dport, seq, id);
            }
            filled = n;
            first = 0;
        }
        match send_batch(
            &socket,
            &mut packets[first..first + filled],
            &dest,
            &mut iovecs,
            &mut headers,
        ) {
            Ok(n) => {
                sent += n as u64;
                first += n;
                filled -= n;
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                ) =>
            {
                errors += 1;
                std::thread::yield_now();
            }
            Err(e) => return Err(e).context("sendmmsg"),
        }
    }
    let elapsed = start.elapsed();
    let rate = sent as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "sent {sent} send-errors {errors} elapsed_ms {} rate_pps {:.0} target {} sources {}",
        elapsed.as_millis(),
        rate,
        args.target,
        args.sources
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert!(allowed_destination(Ipv4Addr::new(10, 77, 0, 20)));
        assert!(allowed_destination(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!allowed_destination(Ipv4Addr::new(10, 78, 0, 20)));
        assert!(!allowed_destination(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(!allowed_destination(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.128.0.0/9").unwrap(),
            (0x0a80_0000, 0xff80_0000)
        );
        assert_eq!(parse_cidr("10.1.2.3/32").unwrap(), (0x0a01_0203, u32::MAX));
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), (0, 0));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
    }

    /// The checksums verify: summing a header with its checksum in place gives 0xffff.
    #[test]
    fn checksums_verify() {
        let mut p = [0u8; PACKET_LEN];
        let (src, dst) = (0x0a81_0203, 0x0a4d_0014);
        build_syn(&mut p, src, dst, 40000, 80, 0xdead_beef, 7);
        assert_eq!(fold(sum_words(0, &p[..20])), 0);
        let pseudo = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + 24;
        assert_eq!(fold(sum_words(pseudo, &p[20..])), 0);
        assert_eq!(p[33], 0x02);
        assert_eq!(&p[16..20], &[10, 77, 0, 20]);
    }
}
