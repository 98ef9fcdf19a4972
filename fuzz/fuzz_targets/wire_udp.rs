//! `UdpPacket::new_checked` on any bytes: the getters never panic once it accepted the buffer,
//! refusals are `Truncated` or `BadUdpLen`, and a filled checksum verifies.
#![no_main]

use engine::wire::{UdpPacket, WireError};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fuzz_target!(|data: &[u8]| {
    let udp = match UdpPacket::new_checked(data) {
        Ok(udp) => udp,
        Err(e) => {
            assert!(matches!(e, WireError::Truncated | WireError::BadUdpLen));
            return;
        }
    };
    let _ = (
        udp.src_port(),
        udp.dst_port(),
        udp.checksum(),
        udp.verify_checksum(SRC, DST),
    );
    let len = usize::from(udp.len());
    assert!((8..=data.len()).contains(&len));
    assert_eq!(udp.payload().len(), len - 8);
    let mut copy = data.to_vec();
    let mut udp = UdpPacket::new_checked(&mut copy[..]).unwrap();
    udp.fill_checksum(SRC, DST);
    assert!(udp.verify_checksum(SRC, DST));
    let _ = udp.payload_mut().len();
});
