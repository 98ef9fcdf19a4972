//! `EthernetFrame::new_checked` on any bytes: no getter or setter panics once it accepted the
//! buffer, and a refusal is `Truncated`.
#![no_main]

use engine::wire::{EthernetFrame, WireError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = match EthernetFrame::new_checked(data) {
        Ok(frame) => frame,
        Err(e) => {
            assert_eq!(e, WireError::Truncated);
            assert!(data.len() < 22);
            return;
        }
    };
    let _ = (frame.dst_addr(), frame.src_addr(), frame.ethertype());
    let _ = (frame.vlan_id(), frame.inner_vlan_id());
    let header_len = frame.header_len();
    assert!(header_len <= data.len());
    assert_eq!(header_len, 14 + 4 * frame.tag_count());
    assert_eq!(frame.payload().len(), data.len() - header_len);
    let mut copy = data.to_vec();
    let mut frame = EthernetFrame::new_checked(&mut copy[..]).unwrap();
    frame.set_dst_addr([0xff; 6]);
    frame.set_src_addr([0x02, 0, 0, 0, 0, 1]);
    let _ = frame.payload_mut().len();
});
