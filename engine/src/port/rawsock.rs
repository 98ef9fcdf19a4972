//! IP-layer transmit on a raw socket (`AF_INET`, `SOCK_RAW`, `IPPROTO_RAW`, so `IP_HDRINCL`),
//! batched with `sendmmsg(2)`.
//!
//! Each packet is a complete IPv4 packet; its destination address (bytes 16..20) becomes the
//! `sendmmsg` destination, and the kernel routes it, resolves the neighbour and adds the
//! link-layer header. With `IP_HDRINCL` the kernel always fills in the IPv4 header checksum and
//! total length (and the identification and source address when they are zero); the TCP checksum
//! must already be right.
//!
//! The send buffer is enlarged (`SO_SNDBUFFORCE` when allowed, else `SO_SNDBUF`) and every send
//! is non-blocking: a full queue is retried a few times after a short `poll`, then the packet is
//! counted in [`PortStats::tx_errors`] and dropped. The `iovec`/`mmsghdr`/`sockaddr_in` arrays
//! are allocated once, in [`RawIpTx::open`].
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use super::afpacket::PortError;
use super::{PortStats, TxBatch, TxPort};

/// How many times a send that hit a full queue (`EAGAIN`, `ENOBUFS`) or a signal (`EINTR`) is
/// retried before the packet is counted as an error.
const MAX_RETRIES: u32 = 8;
/// How long one retry waits for room, in milliseconds.
const RETRY_WAIT_MS: libc::c_int = 1;
/// Smallest IPv4 header.
const IPV4_MIN_HEADER: usize = 20;

/// Settings of a [`RawIpTx`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawIpConfig {
    /// Send only through this interface (`SO_BINDTODEVICE`); `None` lets routing decide.
    pub bind_device: Option<String>,
    /// Send buffer size in bytes (default 4 MiB). Set with `SO_SNDBUFFORCE` when the process may,
    /// else with `SO_SNDBUF` (capped by `net.core.wmem_max`).
    pub send_buffer: usize,
    /// Packets passed to one `sendmmsg` call (default 64); larger batches go in several calls.
    pub burst: usize,
}

impl Default for RawIpConfig {
    fn default() -> RawIpConfig {
        RawIpConfig {
            bind_device: None,
            send_buffer: 4 << 20,
            burst: 64,
        }
    }
}

/// A raw IPv4 socket sending [`TxBatch`]es with `sendmmsg`. See the module docs.
pub struct RawIpTx {
    fd: OwnedFd,
    /// Preallocated per-message arrays, `burst` entries each. The pointers inside `headers` and
    /// `iovecs` are rebuilt at every `tx_burst` and never dereferenced outside it.
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    bind_device: Option<String>,
    stats: PortStats,
}

// SAFETY: the raw pointers in `headers`/`iovecs` only point into the batch and the `addrs`
// array during one `tx_burst(&mut self, ..)` call; between calls they are stale and never read.
// Nothing else ties the value to a thread.
unsafe impl Send for RawIpTx {}

impl std::fmt::Debug for RawIpTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawIpTx")
            .field("fd", &self.fd.as_raw_fd())
            .field("burst", &self.headers.len())
            .field("bind_device", &self.bind_device)
            .field("stats", &self.stats)
            .finish()
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            ptr::from_ref(&value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What to do after a failed `sendmmsg`.
enum Failure {
    /// A transient condition: wait (`poll` for room or a short pause) and retry.
    Retry { wait_for_room: bool },
    /// Only the first message is at fault: count it and carry on with the next.
    SkipOne,
    /// The socket itself is broken.
    Fatal,
}

fn classify(errno: i32) -> Failure {
    match errno {
        libc::EINTR => Failure::Retry {
            wait_for_room: false,
        },
        libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => Failure::Retry {
            wait_for_room: errno == libc::EAGAIN,
        },
        libc::EBADF | libc::ENOTSOCK | libc::EFAULT => Failure::Fatal,
        // EMSGSIZE, EPERM (netfilter), EACCES, EINVAL (bad header), ENETUNREACH,
        // EHOSTUNREACH, ENETDOWN, ENXIO, ...: the packet's problem, not the socket's.
        _ => Failure::SkipOne,
    }
}

impl RawIpTx {
    /// Opens a raw IPv4 socket for sending.
    ///
    /// # Errors
    /// [`PortError::Permission`] without root or `CAP_NET_RAW`; [`PortError::InterfaceNotFound`]
    /// when `bind_device` does not exist; [`PortError::BadConfig`] for a zero `burst`.
    pub fn open(config: &RawIpConfig) -> Result<RawIpTx, PortError> {
        if config.burst == 0 || config.burst > 1024 {
            return Err(PortError::BadConfig(format!(
                "burst {} must be between 1 and 1024",
                config.burst
            )));
        }
        let device = match &config.bind_device {
            Some(name) => {
                let c = CString::new(name.as_str())
                    .map_err(|_| PortError::BadInterfaceName(name.clone()))?;
                if name.is_empty() || name.len() >= libc::IFNAMSIZ {
                    return Err(PortError::BadInterfaceName(name.clone()));
                }
                // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
                if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
                    return Err(PortError::InterfaceNotFound(name.clone()));
                }
                Some(c)
            }
            None => None,
        };

        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if raw < 0 {
            return Err(PortError::last_os(
                "socket(AF_INET, SOCK_RAW)",
                "a raw IP socket",
            ));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = fd.as_raw_fd();

        let wanted = libc::c_int::try_from(config.send_buffer).unwrap_or(libc::c_int::MAX);
        if wanted > 0 && set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, wanted).is_err() {
            // Without CAP_NET_ADMIN: ask for it anyway, the kernel caps it at wmem_max.
            let _ = set_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, wanted);
        }

        if let Some(name) = &device {
            let bytes = name.as_bytes_with_nul();
            // SAFETY: `bytes` is the NUL-terminated name, valid for its length during the call.
            let rc = unsafe {
                libc::setsockopt(
                    sock,
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    bytes.as_ptr().cast(),
                    bytes.len() as libc::socklen_t,
                )
            };
            if rc != 0 {
                let source = io::Error::last_os_error();
                let name = config.bind_device.clone().unwrap_or_default();
                return Err(match source.raw_os_error() {
                    Some(libc::ENODEV) => PortError::InterfaceNotFound(name),
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        PortError::Permission("SO_BINDTODEVICE")
                    }
                    _ => PortError::Os {
                        op: "setsockopt(SO_BINDTODEVICE)",
                        source,
                    },
                });
            }
        }

        // SAFETY: these are plain C structs for which all-zero is valid (null pointers, zero
        // lengths); they are filled in before every use.
        let (header, iovec, addr) = unsafe {
            (
                mem::zeroed::<libc::mmsghdr>(),
                mem::zeroed::<libc::iovec>(),
                mem::zeroed::<libc::sockaddr_in>(),
            )
        };
        Ok(RawIpTx {
            fd,
            headers: vec![header; config.burst],
            iovecs: vec![iovec; config.burst],
            addrs: vec![addr; config.burst],
            bind_device: config.bind_device.clone(),
            stats: PortStats::default(),
        })
    }

    /// The socket descriptor (for `poll` on `POLLOUT`).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The send buffer size the kernel granted (it reports twice the requested value).
    ///
    /// # Errors
    /// The `getsockopt` failure.
    pub fn send_buffer(&self) -> io::Result<usize> {
        let mut value: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` is writable for `len` bytes; `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(usize::try_from(value).unwrap_or(0))
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits up to [`RETRY_WAIT_MS`] for room in the send buffer, or just that long.
    fn wait(&self, for_room: bool) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let (fds, nfds) = if for_room {
            (ptr::from_mut(&mut pfd), 1)
        } else {
            (ptr::null_mut(), 0)
        };
        // SAFETY: `fds` is either a valid pollfd for one entry or null with nfds 0; the result
        // (ready, timeout or EINTR) needs no handling: the caller retries either way.
        unsafe {
            libc::poll(fds, nfds, RETRY_WAIT_MS);
        }
    }

    /// Sends `messages` prepared entries starting at index 0 of the arrays. Returns how many were
    /// sent, or an error if the socket is unusable; per-packet failures go to `tx_errors`.
    fn send_prepared(&mut self, messages: usize) -> io::Result<usize> {
        let mut next = 0;
        let mut sent = 0;
        let mut retries = 0;
        while next < messages {
            let count = libc::c_uint::try_from(messages - next).unwrap_or(libc::c_uint::MAX);
            // SAFETY: entries next..messages of `headers` were filled by `tx_burst` with
            // pointers to live iovecs, sockaddrs and batch buffers, all borrowed for this call;
            // `count` does not exceed the prepared entries.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    self.headers.as_mut_ptr().add(next),
                    count,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let done = rc as usize;
                for header in &self.headers[next..next + done] {
                    self.stats.tx_bytes += u64::from(header.msg_len);
                }
                self.stats.tx_packets += done as u64;
                sent += done;
                next += done;
                retries = 0;
                continue;
            }
            let errno = if rc == 0 {
                libc::EAGAIN
            } else {
                io::Error::last_os_error().raw_os_error().unwrap_or(0)
            };
            match classify(errno) {
                Failure::Retry { wait_for_room } if retries < MAX_RETRIES => {
                    retries += 1;
                    self.wait(wait_for_room);
                }
                Failure::Retry { .. } | Failure::SkipOne => {
                    self.stats.tx_errors += 1;
                    next += 1;
                    retries = 0;
                }
                Failure::Fatal => {
                    self.stats.tx_errors += (messages - next) as u64;
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
        Ok(sent)
    }
}

impl TxPort for RawIpTx {
    fn tx_burst(&mut self, batch: &mut TxBatch) -> io::Result<usize> {
        let burst = self.headers.len();
        let mut sent = 0;
        let mut prepared = 0;
        let mut result = Ok(());
        let total = batch.len();
        for (index, packet) in batch.packets().enumerate() {
            if packet.len() < IPV4_MIN_HEADER || packet[0] >> 4 != 4 {
                // Not an IPv4 packet: the kernel would refuse it anyway.
                self.stats.tx_errors += 1;
            } else {
                let addr = &mut self.addrs[prepared];
                addr.sin_family = libc::AF_INET as libc::sa_family_t;
                addr.sin_port = 0;
                addr.sin_addr.s_addr =
                    u32::from_ne_bytes([packet[16], packet[17], packet[18], packet[19]]);
                let iovec = &mut self.iovecs[prepared];
                iovec.iov_base = packet.as_ptr().cast_mut().cast();
                iovec.iov_len = packet.len();
                let header = &mut self.headers[prepared].msg_hdr;
                header.msg_name = ptr::from_mut(addr).cast();
                header.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                header.msg_iov = ptr::from_mut(iovec);
                header.msg_iovlen = 1;
                header.msg_control = ptr::null_mut();
                header.msg_controllen = 0;
                header.msg_flags = 0;
                self.headers[prepared].msg_len = 0;
                prepared += 1;
            }
            if prepared == burst || (index + 1 == total && prepared > 0) {
                match self.send_prepared(prepared) {
                    Ok(n) => sent += n,
                    Err(err) => {
                        // Count everything not yet handed to the kernel and give up.
                        self.stats.tx_errors += (total - index - 1) as u64;
                        result = Err(err);
                        break;
                    }
                }
                prepared = 0;
            }
        }
        batch.clear();
        result.map(|()| sent)
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn classify_errors() {
        assert!(matches!(
            classify(libc::EAGAIN),
            Failure::Retry {
                wait_for_room: true
            }
        ));
        assert!(matches!(
            classify(libc::ENOBUFS),
            Failure::Retry {
                wait_for_room: false
            }
        ));
        assert!(matches!(
            classify(libc::EINTR),
            Failure::Retry {
                wait_for_room: false
            }
        ));
        assert!(matches!(classify(libc::EMSGSIZE), Failure::SkipOne));
        assert!(matches!(classify(libc::EPERM), Failure::SkipOne));
        assert!(matches!(classify(libc::EBADF), Failure::Fatal));
    }

    #[test]
    fn bad_config_and_missing_device() {
        let config = RawIpConfig {
            burst: 0,
            ..RawIpConfig::default()
        };
        assert!(matches!(
            RawIpTx::open(&config),
            Err(PortError::BadConfig(_))
        ));
        let config = RawIpConfig {
            bind_device: Some("tcrpnone1".into()),
            ..RawIpConfig::default()
        };
        let err = RawIpTx::open(&config).unwrap_err();
        assert!(
            err.to_string().contains("interface tcrpnone1 not found"),
            "{err}"
        );
    }

    /// True as root. Otherwise a note and false, or a panic under `CI=true`: root-only tests
    /// must not pass there without running.
    fn root_or_skip(test: &str) -> bool {
        if is_root() {
            return true;
        }
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test} needs root (a raw socket) and CI=true: refusing to skip it"
        );
        eprintln!("note: not root, skipping {test}");
        false
    }

    fn getsockopt_int(fd: RawFd, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` is writable for `len` bytes; `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt {name}: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn open_needs_privilege_or_works() {
        match RawIpTx::open(&RawIpConfig::default()) {
            Ok(tx) => {
                // A raw IPv4 socket for every protocol (so IP_HDRINCL), with a send buffer.
                assert_eq!(getsockopt_int(tx.fd(), libc::SO_TYPE), libc::SOCK_RAW);
                assert_eq!(getsockopt_int(tx.fd(), libc::SO_DOMAIN), libc::AF_INET);
                assert_eq!(
                    getsockopt_int(tx.fd(), libc::SO_PROTOCOL),
                    libc::IPPROTO_RAW
                );
                assert!(tx.send_buffer().unwrap() > 0);
            }
            Err(err) => {
                assert!(!is_root(), "root could not open a raw socket: {err}");
                assert!(err.to_string().contains("CAP_NET_RAW"), "{err}");
            }
        }
    }

    /// A raw socket receiving IP protocol `protocol` addressed to this host (with its IPv4
    /// header), each receive bounded by 200 ms.
    fn raw_receiver(protocol: libc::c_int) -> OwnedFd {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        assert!(
            raw >= 0,
            "raw receive socket: {}",
            io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: `timeout` is a live timeval and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                ptr::from_ref(&timeout).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        fd
    }

    /// One received packet, or `None` when the receive timed out.
    fn receive(fd: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            assert!(
                matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)),
                "recv: {err}"
            );
            return None;
        }
        Some(buf[..n as usize].to_vec())
    }

    /// RFC 791 header checksum check: the one's-complement sum of the header is 0xffff.
    fn header_checksum_ok(header: &[u8]) -> bool {
        let mut sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    /// Non-IPv4 and short packets are counted as errors without reaching the kernel; valid ones
    /// to loopback are sent and arrive (a raw receive socket of the same protocol gets each of
    /// them once, with the header checksum the kernel filled in). Needs root: skipped with a
    /// note otherwise, and fails under `CI=true`.
    #[test]
    fn loopback_send_counts() {
        if !root_or_skip("loopback_send_counts") {
            return;
        }
        // Experimental protocol 253: nobody else listens, nothing answers.
        const PROTOCOL: u8 = 253;
        let receiver = raw_receiver(libc::c_int::from(PROTOCOL));
        let mut tx = RawIpTx::open(&RawIpConfig {
            burst: 2,
            ..RawIpConfig::default()
        })
        .expect("root opens a raw socket");
        // A marker only this run's packets carry, then the packet's index.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let marker = (u64::from(std::process::id()) << 32 | u64::from(nanos)).to_be_bytes();
        let packet = |index: u8| {
            let mut p = vec![0u8; 40];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&40u16.to_be_bytes());
            p[8] = 64;
            p[9] = PROTOCOL;
            p[12..16].copy_from_slice(&[127, 0, 0, 1]);
            p[16..20].copy_from_slice(&[127, 0, 0, 1]);
            p[20..28].copy_from_slice(&marker);
            p[28] = index;
            p
        };
        let mut batch = TxBatch::new(8);
        assert!(batch.push(&packet(0)));
        assert!(batch.push(&[0x45, 0, 0]));
        assert!(batch.push(&packet(1)));
        assert!(batch.push(&[0x60; 40]));
        assert!(batch.push(&packet(2)));
        let sent = tx.tx_burst(&mut batch).unwrap();
        assert!(batch.is_empty());
        assert_eq!(sent, 3);
        let stats = tx.stats();
        assert_eq!(stats.tx_packets, 3);
        assert_eq!(stats.tx_bytes, 120);
        assert_eq!(stats.tx_errors, 2);

        // Bounded: 25 receives of at most 200 ms each, and no more packets than that.
        let mut arrived = Vec::new();
        for _ in 0..25 {
            let Some(p) = receive(&receiver) else {
                if arrived.len() == 3 {
                    break;
                }
                continue;
            };
            if p.len() < 29 || p[20..28] != marker {
                continue; // someone else's protocol-253 packet
            }
            assert_eq!(p.len(), 40, "{p:02x?}");
            assert_eq!(
                (p[9], &p[12..16], &p[16..20]),
                (PROTOCOL, &[127, 0, 0, 1][..], &[127, 0, 0, 1][..])
            );
            assert!(header_checksum_ok(&p[..20]), "header checksum: {p:02x?}");
            arrived.push(p[28]);
        }
        arrived.sort_unstable();
        assert_eq!(arrived, [0, 1, 2], "each valid packet arrives once");
    }
}
