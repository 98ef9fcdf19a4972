//! The control channel's UDP datagrams (engine/src/control/udp.rs) as both ends handle them:
//! `Datagram::parse` (authenticated or not, either record size), MAC check, the nonces of a
//! HELLO/HELLO_ACK, the items (route messages decoded, records through
//! `ResponseHeader::parse`), and each session's `SeqWindow` over a sequence of datagrams.
//!
//! Input: a mode byte (bit 0: authentication on; bit 1: 192-byte records; bit 2: the harness
//! re-tags each datagram with the right key so the fuzzer gets past the MAC), then datagrams,
//! each a big-endian u16 length and that many bytes.
#![no_main]

use engine::control::auth::{MacKey, NONCE_LEN, UDP_MAC_LEN};
use engine::control::codec::CLIENT_MESSAGE_LEN;
use engine::control::udp::{Datagram, DatagramKind, SeqWindow, MAX_DATAGRAM, UDP_HEADER_LEN};
use engine::control::{ClientMessage, RecordFormat, ResponseHeader, Secret};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use tcpcopy_fuzz::Input;

const NC: [u8; NONCE_LEN] = [0x11; NONCE_LEN];
const NI: [u8; NONCE_LEN] = [0x22; NONCE_LEN];

/// The key a datagram of this kind and session is tagged with.
fn key_for(secret: &Secret, kind: u8, flags: u8, session: u64) -> MacKey {
    let keyed = flags & 0x02 != 0;
    if kind == DatagramKind::Hello.to_u8() && !keyed {
        return secret.udp_hello_key();
    }
    let (up, down) = secret.udp_session_keys(session, &NC, &NI);
    if kind == DatagramKind::HelloAck.to_u8() || kind == DatagramKind::Records.to_u8() {
        down
    } else {
        up
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let authenticated = mode & 1 != 0;
    let format = if mode & 2 != 0 {
        RecordFormat::Payload192
    } else {
        RecordFormat::Header64
    };
    let retag = authenticated && mode & 4 != 0;
    let secret = Secret::new(b"fuzzing-secret-0123456789").unwrap();
    let mut windows: HashMap<u64, SeqWindow> = HashMap::new();
    while !input.is_empty() {
        let mut bytes = input.long_chunk().to_vec();
        bytes.truncate(2 * MAX_DATAGRAM);
        if retag && bytes.len() >= UDP_HEADER_LEN + UDP_MAC_LEN {
            let session = u64::from_be_bytes(bytes[8..16].try_into().unwrap());
            let key = key_for(&secret, bytes[3], bytes[4], session);
            let split = bytes.len() - UDP_MAC_LEN;
            let tag = key.tag16(&bytes[..split]);
            bytes[split..].copy_from_slice(&tag);
        }
        let Ok(d) = Datagram::parse(&bytes, authenticated, format) else {
            continue;
        };
        let header = d.header;
        // The header fields read back (bytes 6..8, reserved, are not checked on receipt).
        let encoded = header.encode();
        assert_eq!(encoded[..6], bytes[..6]);
        assert_eq!(encoded[8..], bytes[8..UDP_HEADER_LEN]);
        let key = key_for(&secret, header.kind.to_u8(), header.flags, header.session);
        let verified = d.verify(&key);
        if retag {
            assert!(verified, "a re-tagged datagram verifies");
        }
        if !verified {
            continue;
        }
        let _ = (format!("{d:?}"), d.body().len(), header.is_keyed());
        let (first, second) = d.nonces();
        match header.kind {
            DatagramKind::Hello => assert_eq!(first[..], d.body()[..NONCE_LEN]),
            DatagramKind::HelloAck => assert_eq!(
                second.map(|s| s.to_vec()),
                Some(d.body()[NONCE_LEN..].to_vec())
            ),
            _ => {}
        }
        let window = windows.entry(header.session).or_default();
        let before = window.highest();
        let verdict = window.accept(header.seq);
        assert!(window.highest() >= before);
        if !verdict.accepted() {
            continue;
        }
        let mut items = 0;
        for item in d.items() {
            items += 1;
            match header.kind {
                DatagramKind::Messages => {
                    let m: [u8; CLIENT_MESSAGE_LEN] = item.try_into().unwrap();
                    assert_eq!(ClientMessage::decode(&m).encode(), m);
                }
                DatagramKind::Records => {
                    assert_eq!(item.len(), format.record_len());
                    if let Ok(h) = ResponseHeader::parse(item) {
                        let _ = (h.flow_key(), h.timestamps(), h.mss(), h.window_scale());
                    }
                }
                DatagramKind::Hello | DatagramKind::HelloAck => {}
            }
        }
        if matches!(header.kind, DatagramKind::Messages | DatagramKind::Records) {
            assert_eq!(items, usize::from(header.count));
        }
    }
});
