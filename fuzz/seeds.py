#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (real captures from
the unit tests, golden control-channel bytes, small pcap/pcapng files, the conf/*.yaml
examples). scripts/fuzz.sh runs it before a first run; the committed corpora under
fuzz/corpus/<target>/ were grown from these and minimized with `cargo fuzz cmin`."""

import os
import struct
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(ROOT, "seeds")


def hx(s):
    return bytes.fromhex("".join(s.split()))


# Captures from engine/src/wire/{ethernet,tcp}.rs tests (Linux 6.x, veth, tcpdump -x).
SYN = hx("""02bb 0000 0002 02aa 0000 0001 0800 4500 003c 5477 4000 4006 d1aa 0a4c 0001 0a4c
    0002 b530 1fa3 e973 4483 0000 0000 a002 faf0 cdd1 0000 0204 05b4 0402 080a f535
    729f 0000 0000 0103 030a""")
SYN_ACK = hx("""02aa 0000 0001 02bb 0000 0002 0800 4500 003c 0000 4000 4006 2622 0a4c 0002 0a4c
    0001 1fa3 b530 0086 e85e e973 4484 a012 fe88 0cfe 0000 0204 05b4 0402 080a 29a7
    aa9e f535 729f 0103 030a""")
GET = hx("""02bb 0000 0002 02aa 0000 0001 0800 4500 0082 5479 4000 4006 d162 0a4c 0001 0a4c
    0002 b530 1fa3 e973 4484 0086 e85f 8018 003f b64e 0000 0101 080a f535 72a0 29a7
    aa9e 4745 5420 2f20 4854 5450 2f31 2e31 0d0a 486f 7374 3a20 3130 2e37 362e 302e
    323a 3830 3939 0d0a 5573 6572 2d41 6765 6e74 3a20 6375 726c 2f37 2e38 382e 310d
    0a41 6363 6570 743a 202a 2f2a 0d0a 0d0a""")
FIN = hx("""02bb 0000 0002 02aa 0000 0001 0800 4500 0034 547c 4000 4006 d1ad 0a4c 0001 0a4c
    0002 b530 1fa3 e973 44d2 0086 ea7d 8011 003f 37a4 0000 0101 080a f535 72a2 29a7
    aaa1""")
SACK = hx("""02bb 0000 0002 02aa 0000 0001 0800 4500 0048 1dfa 4000 4006 081c 0a4c 0001 0a4c
    0002 b316 1fa3 9068 afed cc64 6376 d010 004e ec0c 0000 0101 080a d5c0 08de e96d
    fc32 0101 0512 cc64 d496 cc64 da3e cc64 691e cc64 ceee""")
FRAMES = [SYN, SYN_ACK, GET, FIN, SACK]


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def tag(frame, tpid, tci):
    return frame[:12] + struct.pack("!HH", tpid, tci) + frame[12:]


def ipv4(payload, proto=17, ident=1, mf=False, offset=0, options=b"",
         src=bytes([10, 77, 0, 10]), dst=bytes([10, 77, 0, 20])):
    ihl = 20 + len(options)
    total = ihl + len(payload)
    flags = (0x2000 if mf else 0) | (offset >> 3)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, total, ident, flags, 64, proto, 0, src, dst)
    h += options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def udp(sport, dport, payload):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def u16(n):
    return struct.pack("!H", n)


def main():
    # ---- wire views ----
    for i, f in enumerate(FRAMES):
        write("wire_ethernet", "frame%d" % i, f)
        write("wire_ipv4", "ip%d" % i, f[14:])
        ihl = (f[14] & 15) * 4
        write("wire_tcp", "tcp%d" % i, f[14 + ihl:])
    write("wire_ethernet", "vlan", tag(SYN, 0x8100, 42))
    write("wire_ethernet", "qinq", tag(tag(SYN, 0x8100, 7), 0x88A8, 100))
    write("wire_ipv4", "options", ipv4(b"x" * 12, options=bytes([0x94, 4, 0, 0, 0x83, 7, 4, 1, 2, 3, 4, 0])))
    write("wire_ipv4", "fragment", ipv4(b"y" * 16, mf=True, offset=64))
    write("wire_udp", "dns", udp(40000, 53, b"\x12\x34\x01\x00\x00\x01" + b"\0" * 6))
    write("wire_udp", "padded", udp(1, 2, b"abc") + b"\0" * 5)

    # ---- control codec ----
    syn_ack_ip = SYN_ACK[14:]
    get_ip = GET[14:]
    write("control_codec", "syn_ack_64", b"\x00" + syn_ack_ip)
    write("control_codec", "get_192", b"\x01" + get_ip)
    write("control_codec", "get_plain_192", b"\x03" + get_ip)
    rec = syn_ack_ip + b"\0" * (64 - len(syn_ack_ip))
    write("control_codec", "record_64", b"\x00" + rec)
    hello = bytes([0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0])
    add = bytes([10, 0, 0, 1, 0x9c, 0x40, 0, 1, 10, 0, 0, 2, 0x1f, 0x90])
    delete = add[:7] + b"\x02" + add[8:]
    write("control_codec", "messages", b"\x00" + hello + add + delete)

    # ---- control streams: mode, chunk size, stream ----
    write("control_stream", "server_plain", b"\x00\x00" + hello + add + delete)
    write("control_stream", "server_plain_chunked", b"\x00\x05" + hello + add * 3)
    write("control_stream", "server_auth_prefixed", b"\x11\x07" + hello + add)
    write("control_stream", "server_auth_raw", b"\x01\x00" + b"TCRA\x01\0\0\0" + b"\x11" * 16 + b"\0" * 32 + hello)
    write("control_stream", "server_old_peer", b"\x00\x00" + add + hello)
    batch = u16(2) + rec + rec
    write("control_stream", "client_combined", b"\x02\x00" + batch + u16(1) + rec)
    write("control_stream", "client_combined_chunked", b"\x02\x0b" + batch)
    write("control_stream", "client_plain", b"\x0a\x00" + rec * 3)
    rec192 = get_ip[:20] + get_ip[20:52] + get_ip[52:]
    rec192 = rec192 + b"\0" * (192 - len(rec192))
    write("control_stream", "client_payload", b"\x06\x00" + u16(1) + rec192)
    write("control_stream", "client_auth_prefixed", b"\x13\x00" + batch)
    write("control_stream", "client_bad_count", b"\x02\x00" + u16(17) + rec)

    # ---- control datagrams: mode, then u16-length-prefixed datagrams ----
    def dgram(kind, flags, count, session, epoch, seq, body, mac=False):
        d = b"TU\x01" + bytes([kind, flags | (1 if mac else 0), count]) + b"\0\0"
        d += struct.pack("!QQQ", session, epoch, seq) + body
        if mac:
            d += b"\0" * 16
        return u16(len(d)) + d

    nc = b"\x11" * 16
    ni = b"\x22" * 16
    for auth in (0, 1):
        m = bool(auth)
        mode = bytes([auth | (4 if auth else 0)])
        seq = dgram(1, 0, 1, 7, 0, 0, nc, m)
        seq += dgram(2, 0, 1, 7, 0x2222222222222222, 1, ni + nc, m)
        seq += dgram(1, 2, 1, 7, 0x2222222222222222, 1, nc, m)
        seq += dgram(3, 0, 2, 7, 0x2222222222222222, 2, add + delete, m)
        seq += dgram(3, 0, 1, 7, 0x2222222222222222, 2, add, m)
        seq += dgram(4, 0, 1, 7, 0x2222222222222222, 5, rec, m)
        write("control_datagram", "session_auth%d" % auth, mode + seq)
    write("control_datagram", "records_192", b"\x02" + dgram(4, 4, 1, 9, 3, 1, rec192))

    # ---- pcap / pcapng files (the last byte also picks the filter) ----
    def pcap(link, records, magic=0xA1B2C3D4, endian="<", snap=65535):
        out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snap, link)
        for ts, data in records:
            out += struct.pack(endian + "IIII", ts, 500, len(data), len(data)) + data
        return out

    recs = [(1, f) for f in FRAMES]
    write("pcap_reader", "ethernet_le", pcap(1, recs))
    write("pcap_reader", "ethernet_be_ns", pcap(1, recs, magic=0xA1B23C4D, endian=">"))
    sll = b"\0\0\0\x01\0\x06" + b"\x02\xaa\0\0\0\x01\0\0" + b"\x08\x00"
    write("pcap_reader", "sll", pcap(113, [(2, sll + f[14:]) for f in FRAMES]))
    sll2 = b"\x08\x00\0\0" + b"\0\0\0\x02" + b"\0\x01\0\x06" + b"\x02\xaa\0\0\0\x01\0\0"
    write("pcap_reader", "sll2", pcap(276, [(2, sll2 + f[14:]) for f in FRAMES]))
    write("pcap_reader", "raw", pcap(101, [(3, f[14:]) for f in FRAMES]))
    write("pcap_reader", "null", pcap(0, [(3, b"\x02\0\0\0" + f[14:]) for f in FRAMES]))
    write("pcap_reader", "loop", pcap(108, [(3, b"\0\0\0\x02" + f[14:]) for f in FRAMES]))

    def block(btype, body):
        pad = (-len(body)) % 4
        length = 12 + len(body) + pad
        return struct.pack("<II", btype, length) + body + b"\0" * pad + struct.pack("<I", length)

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    opt_tsresol = struct.pack("<HH", 9, 1) + b"\x09\0\0\0" + struct.pack("<HH", 0, 0)
    idb = block(1, struct.pack("<HHI", 1, 0, 0) + opt_tsresol)
    idb_sll = block(1, struct.pack("<HHI", 113, 0, 0))
    ng = shb + idb + idb_sll
    for i, f in enumerate(FRAMES):
        ng += block(6, struct.pack("<IIIII", 0, 0, 1000 * i, len(f), len(f)) + f)
    ng += block(3, struct.pack("<I", len(SYN)) + SYN)
    ng += block(6, struct.pack("<IIIII", 1, 0, 9, len(sll) + 60, len(sll) + 60) + sll + SYN[14:])
    write("pcap_reader", "pcapng", ng)
    write("pcap_reader", "pcapng_two_sections", ng + ng + b"\x01")

    # ---- config files ----
    conf = os.path.join(ROOT, "..", "conf")
    for name in sorted(os.listdir(conf)):
        if name.endswith(".yaml"):
            with open(os.path.join(conf, name), "rb") as f:
                write("config_yaml", name, f.read())
    write("config_yaml", "small", b"session:\n  timeout: 30\ntransfers: 80-10.0.0.30:8080\n")

    # ---- metrics HTTP: chunk size, request ----
    for name, req in [("metrics", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                      ("json_query", b"GET /stats.json?x=1 HTTP/1.0\r\n\r\n"),
                      ("head", b"HEAD /metrics HTTP/1.1\n\n"),
                      ("post", b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")]:
        write("metrics_http", name, b"\x07" + req)

    # ---- UDP reassembly: ops ----
    payload = udp(40000, 5353, bytes(range(256)) * 4)
    whole = ipv4(payload, ident=5, dst=bytes([10, 77, 0, 20]))

    def frag_op(ident, offset, more, data, ihl_words=5):
        return bytes([1, ident, ihl_words - 5]) + u16(offset // 8) + bytes([1 if more else 0]) + u16(len(data)) + data

    ops = b""
    pieces = [(0, payload[:512], True), (512, payload[512:1024], True), (1024, payload[1024:], False)]
    for off, data, more in reversed(pieces):
        ops += frag_op(5, off, more, data)
    write("udp_reassembly", "three_reversed", ops)
    ops = frag_op(6, 0, True, payload[:512], 6) + frag_op(6, 512, False, payload[512:], 5)
    ops += bytes([3 * 4 + 3]) + frag_op(7, 8, False, b"z" * 8)
    write("udp_reassembly", "mixed_ihl_and_expiry", ops)
    write("udp_reassembly", "raw_whole", b"\x00" + u16(len(whole)) + whole)
    # A 60-byte first header and a 20-byte last one: over 64 KiB together (the datagram that
    # used to wrap its Total Length; see udpcopy's a_datagram_over_64k_... test). Filler ops.
    over = bytes([2, 77, 10]) + u16(0) + b"\x01" + u16(65472)
    over += bytes([2, 77, 0]) + u16(65472 // 8) + b"\x00" + u16(40)
    write("udp_reassembly", "over_64k_mixed_headers", over)
    overlap = frag_op(8, 0, True, payload[:64]) + frag_op(8, 32, True, payload[32:96])
    write("udp_reassembly", "overlap", overlap)

    # ---- tcpcopy ingress: options, then (u16 length, frame, wire excess) ----
    def frames_of(fs, excess=0):
        return b"".join(u16(len(f)) + f + bytes([excess]) for f in fs)

    write("tcpcopy_ingress", "plain", b"\x00" + frames_of(FRAMES))
    write("tcpcopy_ingress", "copies_c_h", b"\x33" + frames_of([SYN, GET]))
    write("tcpcopy_ingress", "mtu576_sampled", b"\x8c" + frames_of([GET * 1]))
    write("tcpcopy_ingress", "raw_ip", b"\x40" + frames_of([f[14:] for f in FRAMES]))
    write("tcpcopy_ingress", "vlan_cut", b"\x00" + frames_of([tag(GET, 0x8100, 5)], 40))

    # ---- session table: ops ----
    def frame_op(f):
        return b"\x00" + u16(len(f)) + f

    def reply_op(flags, seq=0x0086E85E, delta=0, window=65000, length=0, extra=3):
        return b"\x01\x00" + struct.pack("!Ib", seq, delta) + bytes([flags]) + u16(window) + u16(length) + bytes([extra])

    ops = frame_op(SYN) + reply_op(0x12) + frame_op(GET) + b"\x07" + reply_op(0x18, seq=0x0086E85F, length=200)
    ops += frame_op(FIN) + reply_op(0x11, seq=0x0086E927) + b"\xff"
    write("session_table", "handshake_get_fin", ops)
    ops = frame_op(GET) + b"\x13" + reply_op(0x10, delta=-3) + b"\x02" + SYN_ACK[14:] + b"\0" * 4 + b"\xfb"
    write("session_table", "mid_stream", ops)
    ops = frame_op(SYN) + b"\x7f" * 4 + reply_op(0x04)
    write("session_table", "timeouts_reset", ops)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        OUT = sys.argv[1]
    main()
