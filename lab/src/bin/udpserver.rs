//! udpserver: a small UDP server for the lab's tests.
//!
//! For every datagram it appends one line to `--log FILE` (one `write` per line, before it
//! answers): `<peer_ip>:<peer_port> <len> <sha256 of the payload, hex>`, then answers the peer
//! with `ok <len>\n` (unless `--no-reply`), so replies travel as they would from a real server.
//! Prints `udpserver listening on ADDR` once bound. Runs until killed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
#[command(about = "UDP test server for the tcpcopy-rs lab: logs and answers each datagram")]
struct Args {
    /// Address to listen on (port 0 picks a free port; see the "listening on" line).
    #[arg(long, default_value = "0.0.0.0:5353")]
    listen: SocketAddr,
    /// Datagram log file (appended to).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Do not answer.
    #[arg(long)]
    no_reply: bool,
    /// Receive buffer in bytes (`SO_RCVBUFFORCE` when allowed, else `SO_RCVBUF`, which the
    /// kernel caps at net.core.rmem_max): bursts of reassembled datagrams need room.
    #[arg(long, default_value_t = 8 << 20)]
    rcvbuf: usize,
}

/// Asks for a receive buffer of `bytes`; best effort (the default buffer still works).
fn set_receive_buffer(socket: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only
        // reads it; the descriptor is the open socket borrowed for the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// The log line of one datagram.
fn line(peer: SocketAddr, payload: &[u8]) -> String {
    let digest = Sha256::digest(payload);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("{peer} {} {hex}\n", payload.len())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket = UdpSocket::bind(args.listen)
        .with_context(|| format!("cannot bind --listen {}", args.listen))?;
    set_receive_buffer(&socket, args.rcvbuf);
    let mut log: Option<File> = args
        .log
        .as_ref()
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --log {}", path.display()))
        })
        .transpose()?;
    println!("udpserver listening on {}", socket.local_addr()?);
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("recv_from"),
        };
        let text = line(peer, &buf[..len]);
        if let Some(file) = log.as_mut() {
            file.write_all(text.as_bytes()).context("writing the log")?;
        }
        if !args.no_reply {
            // A reply that cannot leave (no route, buffer full) is not the server's problem.
            let _ = socket.send_to(format!("ok {len}\n").as_bytes(), peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        let peer: SocketAddr = "10.77.0.10:40000".parse().unwrap();
        assert_eq!(
            line(peer, b"abc"),
            "10.77.0.10:40000 3 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
    }
}
