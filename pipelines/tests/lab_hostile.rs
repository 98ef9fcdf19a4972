//! A hostile peer on the network: it reaches intercept's control port from the client's host
//! and speaks the C byte format (no authentication, as the C tools). It must not be able to
//! take, delete or receive another tcpcopy's routes (README: "Who may steer intercept").
//!
//! Run as root (`scripts/test.sh` does); under `CI=true` a non-root run fails loudly.

use engine::control::ClientMessage;
use engine::flow::FlowKey;
use lab::{Host, Lab};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::*;

const CLIENT: &str = "10.77.0.10";
const TARGET: &str = "10.77.0.30:8080";
const INTERCEPT_ADDR: &str = "10.77.0.40:36524";

/// What the hostile peer saw.
#[derive(Debug, Default)]
struct Attack {
    /// Messages written (CLIENT_ADD and CLIENT_DEL).
    messages: u64,
    /// Bytes intercept sent it (reply records it should never get).
    received: u64,
    /// Whether intercept closed the connection.
    closed: bool,
}

/// From the client's host: connects to intercept, says hello, then for `duration` sends a
/// CLIENT_ADD for every ephemeral port of the real client's sessions to the target, then a
/// CLIENT_DEL for each, round after round, reading whatever comes back.
fn attack(lab: &Lab, duration: Duration) -> Attack {
    lab.in_ns(Host::Client, move || {
        let mut out = Attack::default();
        let mut s =
            TcpStream::connect_timeout(&INTERCEPT_ADDR.parse().unwrap(), Duration::from_secs(5))
                .expect("the hostile peer reaches intercept's port");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(&ClientMessage::hello().encode());
        s.set_nonblocking(true).unwrap();
        let target: SocketAddrV4 = TARGET.parse().unwrap();
        let client: std::net::Ipv4Addr = CLIENT.parse().unwrap();
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        'rounds: while start.elapsed() < duration {
            for add in [true, false] {
                let mut batch = Vec::with_capacity(14 * 1024);
                for port in 32768u16..61000 {
                    let key = FlowKey::new(SocketAddrV4::new(client, port), target);
                    let m = if add {
                        ClientMessage::add(key)
                    } else {
                        ClientMessage::del(key)
                    };
                    batch.extend_from_slice(&m.encode());
                    out.messages += 1;
                    if batch.len() >= 14 * 1024 {
                        if !write_all_nonblocking(&mut s, &batch, &mut out, &mut buf) {
                            break 'rounds;
                        }
                        batch.clear();
                    }
                }
                if !write_all_nonblocking(&mut s, &batch, &mut out, &mut buf) {
                    break 'rounds;
                }
            }
        }
        // Anything still on its way to the peer.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && !out.closed {
            drain(&mut s, &mut out, &mut buf);
            std::thread::sleep(Duration::from_millis(20));
        }
        out
    })
    .expect("enter the client's namespace")
}

/// Writes `bytes`, reading what comes back meanwhile; false once intercept closed the
/// connection.
fn write_all_nonblocking(
    s: &mut TcpStream,
    bytes: &[u8],
    out: &mut Attack,
    buf: &mut [u8],
) -> bool {
    let mut at = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while at < bytes.len() {
        match s.write(&bytes[at..]) {
            Ok(0) => {
                out.closed = true;
                return false;
            }
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return true; // intercept stopped reading: give up this batch
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => {
                out.closed = true;
                return false;
            }
        }
        drain(s, out, buf);
        if out.closed {
            return false;
        }
    }
    true
}

fn drain(s: &mut TcpStream, out: &mut Attack, buf: &mut [u8]) {
    loop {
        match s.read(buf) {
            Ok(0) => {
                out.closed = true;
                return;
            }
            Ok(n) => out.received += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                out.closed = true;
                return;
            }
        }
    }
}

/// The value of `name` in intercept's last statistics line.
fn intercept_counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" routes ") && l.contains(" connections "))
        .unwrap_or_else(|| panic!("no intercept statistics line:\n{log}"));
    counter(line, name)
}

/// Keep-alive sessions of the real client are replayed while the hostile peer registers
/// every ephemeral port of that client, then deletes them all, in a loop: every request still
/// reaches the target exactly once, the peer never receives a reply header, and intercept
/// counts what it refused.
#[test]
fn hostile_peer_cannot_take_or_delete_routes() {
    if !lab::require_root() {
        return;
    }
    lab::build_lab_bins().expect("build the lab's binaries");
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let replay = Replay::start(&lab, &[]);
    let mut load = lab
        .spawn(
            Host::Client,
            lab::workspace_bin("httpload"),
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "keepalive",
                "--connections",
                "5",
                "--requests",
                "1500",
                "--rate",
                "200",
                "--path-prefix",
                "/h/",
                "--timeout-s",
                "60",
            ],
        )
        .expect("start the load");
    // The sessions are up (their routes exist) before the attack starts.
    assert!(
        target.wait_count(20, Duration::from_secs(20)) >= 20,
        "replay did not start\n{}",
        replay.logs()
    );
    let attack = attack(&lab, Duration::from_secs(5));
    load.wait_exit(Duration::from_secs(60))
        .expect("the load finishes");
    assert_eq!(online.wait_count(1500, Duration::from_secs(30)), 1500);
    let seen = target.settle(Duration::from_secs(2), Duration::from_secs(60));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for path in target.paths() {
        *counts.entry(path).or_default() += 1;
    }
    let missing = online
        .paths()
        .iter()
        .filter(|p| !counts.contains_key(*p))
        .count();
    let doubled = counts.values().filter(|&&n| n > 1).count();
    let logs = replay.logs();
    let mut replay = replay;
    let tcpcopy_final = final_line(&mut replay.tcpcopy);
    replay.intercept.stop();
    let intercept_log = replay.intercept.log();
    assert!(
        seen == 1500 && missing == 0 && doubled == 0,
        "target saw {seen}, {missing} missing, {doubled} doubled under attack {attack:?}\n{tcpcopy_final}\n{logs}"
    );
    assert!(attack.messages > 50_000, "{attack:?}");
    assert_eq!(
        attack.received, 0,
        "the hostile peer received reply records: {attack:?}"
    );
    let foreign_add = intercept_counter(&intercept_log, "foreign-add");
    let foreign_del = intercept_counter(&intercept_log, "foreign-del");
    assert!(
        foreign_add >= 5 && foreign_del >= 5,
        "intercept did not refuse the peer's messages on the live routes (foreign-add {foreign_add}, foreign-del {foreign_del})\n{intercept_log}"
    );
    assert_eq!(
        intercept_counter(&intercept_log, "no-route"),
        0,
        "replies lost their route\n{intercept_log}"
    );
    // The flood is read at its rate (the connection is throttled), so the replies of the real
    // sessions are not held up behind it: without the limit tcpcopy retransmitted about a
    // thousand segments whose acknowledgement came late (1,062 in one run); with it, none.
    assert!(
        intercept_counter(&intercept_log, "throttled") >= 1,
        "{intercept_log}"
    );
    let retransmits = counter(&tcpcopy_final, "retransmits");
    assert!(
        retransmits <= 100,
        "replies were held up behind the flood: {retransmits} retransmits\n{tcpcopy_final}"
    );
    eprintln!(
        "hostile peer: {} messages, {} bytes received; intercept foreign-add {foreign_add} foreign-del {foreign_del}; tcpcopy: {tcpcopy_final}\nintercept: {}",
        attack.messages,
        attack.received,
        intercept_log.lines().rev().find(|l| l.contains("final:")).unwrap_or("")
    );
}

/// With `--allow` naming the online host, the hostile peer's connection is refused at once,
/// and replay goes on.
#[test]
fn allow_list_refuses_other_addresses() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::up().expect("lab up");
    let online = lab.nginx(Host::Online, 80).expect("online nginx");
    let target = lab.nginx(Host::Target, 8080).expect("target nginx");
    let mut intercept = start_intercept(&lab, &["--stats-interval", "1", "--allow", "10.77.0.20"]);
    let mut tcpcopy = start_tcpcopy(&lab, &[]);
    let attack = attack(&lab, Duration::from_secs(2));
    assert!(
        attack.closed,
        "the refused peer's connection stays open: {attack:?}"
    );
    assert_eq!(attack.received, 0);
    let report = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.20:80",
                "--mode",
                "close",
                "--requests",
                "300",
                "--path-prefix",
                "/a/",
            ],
        )
        .expect("httpload");
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(online.wait_count(300, Duration::from_secs(30)), 300);
    let seen = target.settle(Duration::from_secs(2), Duration::from_secs(60));
    let tcpcopy_final = final_line(&mut tcpcopy);
    intercept.stop();
    let log = intercept.log();
    assert_eq!(seen, 300, "{tcpcopy_final}\n{log}");
    assert!(
        intercept_counter(&log, "peers-refused") >= 1,
        "no refusal counted\n{log}"
    );
    assert!(
        log.contains("not on --allow"),
        "the refusal is not logged\n{log}"
    );
}
