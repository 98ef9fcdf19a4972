//! Authentication of the TCP control channel over loopback: the right secret gets through in
//! both directions; a wrong secret, a peer without authentication (a C tcpcopy's bare hello)
//! and a silent peer are refused and counted; a tcpcopy facing an intercept without the secret
//! (or a C intercept) refuses it. The UDP side is in `control_udp.rs`.
//!
//! Every wait is a bounded loop (at most ~10 s), not a timed assertion.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use engine::control::auth::{encode_challenge, encode_proof, CHALLENGE_LEN, RESPONSE_LEN};
use engine::control::{
    ClientConfig, ClientMessage, ControlClient, ControlServer, Framing, RecordFormat, Secret,
    ServerConfig, ServerEvent,
};
use engine::flow::FlowKey;

const BOUND: Duration = Duration::from_secs(10);
const TICK: Option<Duration> = Some(Duration::from_millis(2));

fn secret() -> Secret {
    Secret::new(b"lab secret, 32 bytes long......").unwrap()
}

fn wrong() -> Secret {
    Secret::new(b"not the lab secret, but as long").unwrap()
}

fn server(auth: Option<Secret>) -> ControlServer {
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        RecordFormat::Header64,
        Framing::Combined,
    );
    config.auth = auth;
    config.handshake_timeout = Duration::from_millis(300);
    ControlServer::with_config(config).unwrap()
}

fn client(addr: SocketAddrV4, auth: Option<Secret>) -> ControlClient {
    let mut config = ClientConfig::new(vec![addr]);
    config.connections_per_server = 1;
    config.auth = auth;
    config.reconnect_initial = Duration::from_millis(5);
    config.reconnect_max = Duration::from_millis(20);
    config.lonely = true;
    ControlClient::new(config).unwrap()
}

fn pump(
    clients: &mut [&mut ControlClient],
    server: &mut ControlServer,
    events: &mut Vec<ServerEvent>,
    mut done: impl FnMut(&[&mut ControlClient], &ControlServer, &[ServerEvent]) -> bool,
) -> bool {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if done(clients, server, events) {
            return true;
        }
        for c in clients.iter_mut() {
            c.poll(TICK, &mut |_| {}).unwrap();
        }
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    done(clients, server, events)
}

#[test]
fn right_secret_connects_and_the_stream_is_unchanged_after_it() {
    let mut server = server(Some(secret()));
    let addr = server.local_addr();
    let mut c = client(addr, Some(secret()));
    let mut events = Vec::new();
    assert!(pump(&mut [&mut c], &mut server, &mut events, |c, _, e| {
        c[0].is_connected(addr) && e.iter().any(|e| matches!(e, ServerEvent::Connected(..)))
    }));
    let k = FlowKey::new(
        "10.0.0.1:40000".parse().unwrap(),
        "10.0.0.2:8080".parse().unwrap(),
    );
    assert!(c.client_add(k));
    assert!(pump(&mut [&mut c], &mut server, &mut events, |_, _, e| {
        e.iter()
            .any(|e| matches!(e, ServerEvent::Message(_, m) if *m == ClientMessage::add(k)))
    }));
    let s = server.stats();
    assert_eq!((s.auth_ok, s.auth_refused, s.hellos), (1, 0, 1));
    assert_eq!(c.stats().auth_failures, 0);
}

#[test]
fn wrong_secret_is_refused_and_counted_on_both_sides() {
    let mut server = server(Some(secret()));
    let addr = server.local_addr();
    let mut c = client(addr, Some(wrong()));
    let mut events = Vec::new();
    // The client sees intercept's proof fail and hangs up; it retries (back-off) and fails
    // again; intercept counts every attempt that did not finish the handshake.
    assert!(pump(&mut [&mut c], &mut server, &mut events, |c, s, _| {
        c[0].stats().auth_failures >= 3 && s.stats().auth_refused >= 3
    }));
    assert!(
        events.is_empty(),
        "refused peers are never reported: {events:?}"
    );
    assert_eq!(server.stats().connections_accepted, 0);
    assert!(c.all_down());
    assert_eq!(c.stats().connects, 0);
}

#[test]
fn made_up_proof_is_refused() {
    // A peer that ignores intercept's answer and sends a proof computed with another secret.
    let mut server = server(Some(secret()));
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(BOUND)).unwrap();
    let nc = [7u8; 16];
    raw.write_all(&encode_challenge(&nc)).unwrap();
    let mut events = Vec::new();
    let mut response = [0u8; RESPONSE_LEN];
    let deadline = Instant::now() + BOUND;
    let mut got = 0;
    raw.set_nonblocking(true).unwrap();
    while got < RESPONSE_LEN && Instant::now() < deadline {
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
        if let Ok(n) = raw.read(&mut response[got..]) {
            got += n;
        }
    }
    assert_eq!(got, RESPONSE_LEN);
    assert_eq!(&response[..4], b"TCRB");
    let mut ni = [0u8; 16];
    ni.copy_from_slice(&response[8..24]);
    raw.write_all(&encode_proof(&wrong(), &nc, &ni)).unwrap();
    raw.write_all(&ClientMessage::hello().encode()).unwrap();
    let deadline = Instant::now() + BOUND;
    while server.stats().auth_refused == 0 && Instant::now() < deadline {
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    assert_eq!(server.stats().auth_refused, 1);
    assert!(events.is_empty());
    // The right proof on a new connection is accepted.
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    raw.write_all(&encode_challenge(&nc)).unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut got = 0;
    let deadline = Instant::now() + BOUND;
    while got < RESPONSE_LEN && Instant::now() < deadline {
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
        if let Ok(n) = raw.read(&mut response[got..]) {
            got += n;
        }
    }
    ni.copy_from_slice(&response[8..24]);
    raw.write_all(&encode_proof(&secret(), &nc, &ni)).unwrap();
    raw.write_all(&ClientMessage::hello().encode()).unwrap();
    let deadline = Instant::now() + BOUND;
    while server.stats().hellos == 0 && Instant::now() < deadline {
        server.poll(TICK, &mut |e| events.push(e)).unwrap();
    }
    assert_eq!(server.stats().auth_ok, 1);
    assert_eq!(server.stats().hellos, 1);
    assert!(matches!(events[0], ServerEvent::Connected(..)));
}

#[test]
fn c_tcpcopy_and_silent_peers_are_refused() {
    let mut server = server(Some(secret()));
    let addr = server.local_addr();
    // A C tcpcopy: its first bytes are the 14-byte version hello.
    let mut c_tool = TcpStream::connect(addr).unwrap();
    c_tool
        .write_all(&[0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0])
        .unwrap();
    // A peer that connects and says nothing: refused when the handshake time is up.
    let _silent = TcpStream::connect(addr).unwrap();
    // A tcpcopy-rs without authentication.
    let mut plain = client(addr, None);
    let mut events = Vec::new();
    assert!(pump(
        &mut [&mut plain],
        &mut server,
        &mut events,
        |_, s, _| { s.stats().auth_refused >= 3 }
    ));
    c_tool.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c_tool.read(&mut buf).unwrap(), 0, "intercept hangs up");
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(server.stats().connections_accepted, 0);
}

#[test]
fn tcpcopy_refuses_an_intercept_without_the_secret() {
    // An intercept with a different secret.
    let mut other = server(Some(wrong()));
    let mut c = client(other.local_addr(), Some(secret()));
    let mut events = Vec::new();
    assert!(pump(&mut [&mut c], &mut other, &mut events, |c, _, _| {
        c[0].stats().auth_failures >= 2
    }));
    assert_eq!(c.stats().connects, 0);

    // A C intercept (reads the 24-byte challenge as a too-old hello and closes).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = match listener.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut c = client(addr, Some(secret()));
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        let mut first = [0u8; CHALLENGE_LEN];
        s.read_exact(&mut first).unwrap();
        first
    });
    let deadline = Instant::now() + BOUND;
    while c.stats().auth_failures == 0 && Instant::now() < deadline {
        c.poll(TICK, &mut |_| {}).unwrap();
    }
    let first = t.join().unwrap();
    assert_eq!(&first[..5], b"TCRA\x01");
    assert!(c.stats().auth_failures >= 1);
    assert_eq!(c.stats().connects, 0);
}
