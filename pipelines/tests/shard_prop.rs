//! The owner of a session, computed by the control thread from a reply alone, is the worker
//! whose capture socket received the session's packets, for any transfers, `-c` lists, `-n`
//! copies and `-f` instances.

use engine::control::{encode_record, RecordFormat, ResponseHeader};
use engine::flow::port_shard;
use engine::wire::tcp::{emit_ipv4_tcp, TcpRepr};
use engine::wire::{SeqNum, TcpFlags};
use pipelines::tcpcopy::copies::PortPlan;
use pipelines::tcpcopy::ingress::{Ingress, IngressOptions, LinkType};
use pipelines::tcpcopy::transform::{parse_transfers, ClientAddrs};
use proptest::prelude::*;
use std::net::Ipv4Addr;

/// An Ethernet frame holding a client's TCP segment to `dst:dport`.
fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: TcpFlags) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x14, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00];
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq: SeqNum(1000),
        ack: SeqNum(0),
        flags,
        window: 1000,
        ..TcpRepr::default()
    };
    emit_ipv4_tcp(&mut f, src, dst, 1, 64, &repr, b"");
    f
}

/// The reply the target sends for `key`, as intercept encodes it.
fn reply_record(key: engine::flow::FlowKey) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: key.target_port,
        dst_port: key.client_port,
        seq: SeqNum(77),
        ack: SeqNum(1001),
        flags: TcpFlags::SYN | TcpFlags::ACK,
        window: 1000,
        ..TcpRepr::default()
    };
    let mut packet = Vec::new();
    emit_ipv4_tcp(&mut packet, key.target_ip, key.client_ip, 1, 64, &repr, b"");
    let mut record = vec![0u8; RecordFormat::Header64.record_len()];
    encode_record(&packet, RecordFormat::Header64, &mut record).expect("encode");
    record
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn reply_owner_is_the_capturing_worker(
        workers in 1usize..9,
        online_ports in proptest::collection::vec(1u16..65535, 1..4),
        target_octet in 1u8..250,
        use_clients in any::<bool>(),
        client_prefix in 1u8..200,
        src in any::<u32>(),
        sport in 1024u16..65535,
        pick in any::<usize>(),
        copies in 1u16..12,
        instance in 0u8..4,
    ) {
        let transfers_text = online_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{p}-10.0.{i}.{target_octet}:{}", 8000 + i))
            .collect::<Vec<_>>()
            .join(",");
        let transfers = parse_transfers(&transfers_text).unwrap();
        let clients = use_clients
            .then(|| ClientAddrs::parse(&format!("10.{client_prefix}.9.x"), &transfers).unwrap());
        let options = IngressOptions {
            plan: PortPlan::new(copies, instance, workers).unwrap(),
            ..IngressOptions::default()
        };
        let mut ingress = Ingress::with_options(transfers.clone(), clients, options);
        let online_port = online_ports[pick % online_ports.len()];
        let captured = frame(Ipv4Addr::from(src), sport, Ipv4Addr::new(192, 0, 2, 1), online_port, TcpFlags::SYN);
        // The kernel's fanout program gives the frame to this worker (tested against the kernel
        // in engine/tests/port_real.rs).
        let capturing_worker = port_shard(sport, workers);
        let (mut bufs, mut metas) = (Vec::new(), Vec::new());
        ingress.process_all(&captured, captured.len(), LinkType::Ethernet, std::time::Duration::ZERO, &mut bufs, &mut metas);
        prop_assert_eq!(metas.len(), usize::from(copies));
        let mut keys = std::collections::HashSet::new();
        for (key, _) in &metas {
            prop_assert!(keys.insert(*key), "copies never share a 4-tuple");
            let header = ResponseHeader::parse(&reply_record(*key)).expect("parse");
            prop_assert_eq!(header.flow_key(), *key);
            prop_assert_eq!(header.flow_key().shard(workers), capturing_worker);
        }
    }
}
