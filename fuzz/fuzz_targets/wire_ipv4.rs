//! `Ipv4Packet::new_checked` on any bytes: the getters never panic once it accepted the buffer,
//! refusals are the IPv4 errors, and the incremental (RFC 1624) rewrites keep a filled checksum
//! valid and equal to a full recomputation.
#![no_main]

use engine::wire::{Ipv4Packet, WireError};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let ip = match Ipv4Packet::new_checked(data) {
        Ok(ip) => ip,
        Err(e) => {
            assert!(matches!(
                e,
                WireError::Truncated
                    | WireError::BadVersion
                    | WireError::BadHeaderLen
                    | WireError::BadTotalLen
            ));
            return;
        }
    };
    let _ = (
        ip.version(),
        ip.dscp_ecn(),
        ip.ident(),
        ip.dont_frag(),
        ip.more_frags(),
    );
    let _ = (
        ip.frag_offset(),
        ip.is_fragment(),
        ip.ttl(),
        ip.protocol(),
        ip.checksum(),
    );
    let _ = (ip.src_addr(), ip.dst_addr(), ip.verify_checksum());
    let header_len = ip.header_len();
    let total = usize::from(ip.total_len());
    assert!((20..=60).contains(&header_len) && header_len <= total && total <= data.len());
    assert_eq!(ip.options().len(), header_len - 20);
    assert_eq!(ip.payload().len(), total - header_len);

    let mut copy = data.to_vec();
    let mut ip = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
    ip.fill_checksum();
    assert!(ip.verify_checksum());
    ip.rewrite_src_addr(Ipv4Addr::new(10, 1, 2, 3));
    ip.rewrite_dst_addr(Ipv4Addr::new(192, 168, 77, 30));
    ip.rewrite_ttl(ip.ttl().wrapping_add(17));
    assert!(ip.verify_checksum());
    let _ = (ip.options_mut().len(), ip.payload_mut().len());
});
