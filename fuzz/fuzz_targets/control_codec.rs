//! The control channel's record and message codec (engine/src/control/codec.rs) on any bytes:
//! `ResponseHeader::parse` of a record (both sizes), `encode_record` of a captured packet and
//! its parse (the fields carried must come back), `ClientMessage` decode/encode, and a batch of
//! the record through `BatchEncoder` and `RecordDecoder`.
//!
//! Input: one mode byte (bit 0: 192-byte records, bit 1: plain framing), then the bytes.
#![no_main]

use engine::control::codec::{CLIENT_MESSAGE_LEN, MAX_PAYLOAD_LEN};
use engine::control::{
    encode_record, BatchEncoder, ClientMessage, CodecError, Framing, RecordDecoder, RecordFormat,
    ResponseHeader,
};
use libfuzzer_sys::fuzz_target;
use tcpcopy_fuzz::Input;

fn exercise(h: &ResponseHeader) {
    let _ = (
        h.flow_key(),
        h.is_syn(),
        h.is_fin(),
        h.is_rst(),
        h.has_ack(),
    );
    let _ = (h.timestamps(), h.window_scale(), h.mss(), format!("{h:?}"));
    assert!(h.options().len() <= 24);
    assert!(h.payload().len() <= MAX_PAYLOAD_LEN);
    assert!(h.payload().len() <= usize::from(h.payload_len));
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.byte();
    let bytes = input.rest();
    let format = if mode & 1 != 0 {
        RecordFormat::Payload192
    } else {
        RecordFormat::Header64
    };
    let framing = if mode & 2 != 0 {
        Framing::Plain
    } else {
        Framing::Combined
    };

    // The bytes as a record, as they are and cut or padded to each size.
    match ResponseHeader::parse(bytes) {
        Ok(h) => exercise(&h),
        Err(e) => assert!(!matches!(e, CodecError::Failed)),
    }
    for len in [64, 192] {
        let mut record = bytes[..bytes.len().min(len)].to_vec();
        record.resize(len, 0);
        if let Ok(h) = ResponseHeader::parse(&record) {
            exercise(&h);
        }
    }

    // The bytes as a captured IPv4 packet made into a record.
    let mut record = vec![0u8; format.record_len()];
    if encode_record(bytes, format, &mut record).is_ok() {
        let h = ResponseHeader::parse(&record).expect("an encoded record parses");
        exercise(&h);
        let ihl = usize::from(bytes[0] & 0x0f) * 4;
        let t = &bytes[ihl..];
        assert_eq!(h.src_port, u16::from_be_bytes([t[0], t[1]]));
        assert_eq!(h.dst_port, u16::from_be_bytes([t[2], t[3]]));
        assert_eq!(h.seq, u32::from_be_bytes([t[4], t[5], t[6], t[7]]));
        assert_eq!(h.flags, t[13]);
        assert_eq!(usize::from(h.ip_header_len), ihl);
        assert_eq!(h.options(), &t[20..usize::from(h.tcp_header_len).min(44)]);

        // One batch of it through the stream codec, one byte at a time.
        let mut encoder = BatchEncoder::new(format, framing);
        encoder.push(&record).expect("one record fits");
        let mut stream = Vec::new();
        assert_eq!(encoder.finish_into(&mut stream), 1);
        let mut decoder = RecordDecoder::new(format, framing);
        let mut got = Vec::new();
        for b in stream.chunks(1) {
            decoder
                .feed(b, |r| got.push(r.to_vec()))
                .expect("a valid batch");
        }
        assert_eq!(got, vec![record.clone()]);
        assert!(decoder.is_idle());
    }

    // Every 14-byte window as a message: decode and encode give the bytes back.
    for window in bytes.chunks_exact(CLIENT_MESSAGE_LEN) {
        let b: [u8; CLIENT_MESSAGE_LEN] = window.try_into().unwrap();
        let m = ClientMessage::decode(&b);
        assert_eq!(m.encode(), b);
        let _ = (m.flow_key(), m.has_hello_address());
    }
});
