//! The control channel's TCP byte streams as the two ends consume them, sans-IO, in chunks the
//! fuzzer chooses, the way `ControlServer::read_conn` and `ControlClient`'s reader call them:
//!
//! * intercept side: [`ServerHandshake`] (authentication on) then [`MessageDecoder`] on the
//!   bytes after the handshake, every message decoded;
//! * tcpcopy side: [`ClientHandshake`] (authentication on) then [`RecordDecoder`] (combined or
//!   plain, 64- or 192-byte records), every record through `ResponseHeader::parse`.
//!
//! Input: a mode byte (bits 0-1: 0 server, 1 server+auth, 2 client, 3 client+auth; bit 2:
//! 192-byte records; bit 3: plain framing; bit 4: a valid handshake is put in front so the
//! fuzzer reaches the authenticated stream), a chunk size byte (0: one chunk), the stream.
#![no_main]

use engine::control::auth::{
    encode_challenge, encode_proof, encode_response, ClientHandshake, ClientStep, ServerHandshake,
    ServerStep, NONCE_LEN,
};
use engine::control::{
    CodecError, Framing, MessageDecoder, RecordDecoder, RecordFormat, ResponseHeader, Secret,
};
use libfuzzer_sys::fuzz_target;
use tcpcopy_fuzz::Input;

const NC: [u8; NONCE_LEN] = [0x11; NONCE_LEN];
const NI: [u8; NONCE_LEN] = [0x22; NONCE_LEN];

fn secret() -> Secret {
    Secret::new(b"fuzzing-secret-0123456789").unwrap()
}

fn server(stream: &[u8], chunk: usize, auth: bool) {
    let secret = secret();
    let mut handshake = auth.then(|| ServerHandshake::with_nonce(&secret, NI));
    let mut responded = 0;
    let mut decoder = MessageDecoder::new();
    let mut messages = 0;
    for bytes in stream.chunks(chunk) {
        let mut start = 0;
        if let Some(h) = handshake.as_mut() {
            let (respond, done) = match h.feed(bytes) {
                Ok(ServerStep::NeedMore { respond }) => (respond, None),
                Ok(ServerStep::Done { respond, consumed }) => (respond, Some(consumed)),
                Err(_) => return,
            };
            responded += usize::from(respond.is_some());
            let Some(consumed) = done else {
                continue;
            };
            assert!(consumed <= bytes.len());
            handshake = None;
            start = consumed;
        }
        match decoder.feed(&bytes[start..], |m| {
            messages += 1;
            let _ = (m.flow_key(), m.kind, m.encode());
        }) {
            Ok(info) => {
                assert!(info.messages <= bytes.len() / 14 + 1);
                let _ = info.unexpected_version();
            }
            Err(e) => {
                assert!(matches!(
                    e,
                    CodecError::PeerTooOld { .. } | CodecError::Failed
                ));
                // A failed decoder refuses everything after.
                assert_eq!(decoder.feed(b"x", |_| {}), Err(CodecError::Failed));
                return;
            }
        }
    }
    assert!(responded <= 1);
    assert!(messages <= stream.len() / 14);
}

fn client(stream: &[u8], chunk: usize, auth: bool, format: RecordFormat, framing: Framing) {
    let secret = secret();
    let mut handshake = auth.then(|| ClientHandshake::with_nonce(&secret, NC).0);
    let mut decoder = RecordDecoder::new(format, framing);
    let mut records = 0;
    for bytes in stream.chunks(chunk) {
        let mut start = 0;
        if let Some(h) = handshake.as_mut() {
            match h.feed(bytes) {
                Ok(ClientStep::NeedMore) => continue,
                Ok(ClientStep::Done { consumed, .. }) => {
                    assert!(consumed <= bytes.len());
                    handshake = None;
                    start = consumed;
                }
                Err(_) => return,
            }
        }
        let result = decoder.feed(&bytes[start..], |record| {
            assert_eq!(record.len(), format.record_len());
            records += 1;
            if let Ok(h) = ResponseHeader::parse(record) {
                let _ = (
                    h.flow_key(),
                    h.timestamps(),
                    h.window_scale(),
                    h.mss(),
                    h.payload(),
                );
            }
        });
        if let Err(e) = result {
            assert!(matches!(
                e,
                CodecError::BadBatchCount { .. } | CodecError::Failed
            ));
            assert!(decoder.feed(b"x", |_| {}).is_err());
            return;
        }
    }
    assert!(records <= stream.len() / format.record_len());
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let chunk = match input.byte() {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let body = input.rest();
    let auth = mode & 1 != 0;
    let is_client = mode & 2 != 0;
    let format = if mode & 4 != 0 {
        RecordFormat::Payload192
    } else {
        RecordFormat::Header64
    };
    let framing = if mode & 8 != 0 {
        Framing::Plain
    } else {
        Framing::Combined
    };
    let mut stream = Vec::with_capacity(body.len() + 64);
    if auth && mode & 16 != 0 {
        let secret = secret();
        if is_client {
            stream.extend_from_slice(&encode_response(&secret, &NC, &NI));
        } else {
            stream.extend_from_slice(&encode_challenge(&NC));
            stream.extend_from_slice(&encode_proof(&secret, &NC, &NI));
        }
    }
    stream.extend_from_slice(body);
    if is_client {
        client(&stream, chunk, auth, format, framing);
    } else {
        server(&stream, chunk, auth);
    }
});
