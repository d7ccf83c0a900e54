"""The gdb stub's framing and register layout, without a VM: checksums, escaping, the packet
reader's splitting of a byte stream, and the target description against the `g` layout."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vmworker.gdb import packets as P
from vmworker.gdb import regs as R
from vmworker.gdb.target_xml import TARGET_XML


def test_frame_has_the_modulo_256_checksum_of_its_body():
    assert P.frame(b"OK") == b"$OK#9a"
    assert P.frame(b"") == b"$#00"


def test_frame_escapes_every_byte_the_protocol_reserves_and_never_sends_a_bare_star():
    framed = P.frame(b"a$b#c}d*e")
    body = framed[1:framed.index(b"#", 1)]
    assert b"$" not in body and b"*" not in body
    assert P.unescape(body) == b"a$b#c}d*e"
    assert framed.endswith(b"%02x" % P.checksum(body))


def test_reader_splits_packets_acks_and_interrupts_arriving_in_pieces():
    reader = P.PacketReader()
    stream = b"+$g#67\x03$m10000,4#" + b"%02x" % P.checksum(b"m10000,4")
    events = []
    for i in range(len(stream)):  # one byte at a time: the worst fragmentation TCP can give
        events += reader.feed(stream[i:i + 1])
    assert events == [("ack", b"+"), ("packet", b"g"), ("interrupt", None), ("packet", b"m10000,4")]


def test_reader_reports_a_bad_checksum_instead_of_the_packet():
    assert P.PacketReader().feed(b"$g#00") == [("bad", b"g")]
    assert P.PacketReader().feed(b"$g#zz") == [("bad", b"g")]


def test_reader_drops_an_endless_packet_instead_of_growing_without_bound():
    reader = P.PacketReader()
    events = reader.feed(b"$" + b"A" * (P.MAX_PACKET + 100))
    assert [kind for kind, _ in events] == ["bad"]
    assert reader.feed(b"$g#67") == [("packet", b"g")]


def test_target_description_lists_every_register_in_g_packet_order():
    root = ET.fromstring(TARGET_XML.split(b"\n", 2)[2])  # past the XML declaration and DOCTYPE
    assert root.find("architecture").text == "i386:x86-64"
    regs = root.findall("./feature/reg")
    assert [r.get("name") for r in regs] == [r.name for r in R.REGISTERS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(R.REGISTERS)))
    assert sum(int(r.get("bitsize")) for r in regs) // 8 == R.G_PACKET_BYTES


def test_amd64_core_registers_come_first_in_gdbs_order():
    core = [r.name for r in R.REGISTERS if r.feature == R.CORE]
    assert core[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *[f"r{i}" for i in range(8, 16)],
                         "rip", "eflags"]
    assert len(core) == 40  # gdb's amd64 core: 24 general/segment registers + 16 x87


def test_pc_is_linear_and_a_write_moves_ip_within_the_code_segment():
    from vmworker import kvm_abi as abi
    regs, sregs = abi.kvm_regs(rip=0x4), abi.kvm_sregs()
    sregs.cs.base = 0x10000
    assert R.value_of(R.PC, regs, sregs) == 0x10004
    assert R.set_value(R.PC, (0x10010).to_bytes(8, "little"), regs, sregs) == "regs"
    assert regs.rip == 0x10
