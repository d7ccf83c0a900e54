"""Register-level tests of the emulated devices, driven through a real Bus (pure Python, no KVM)."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest

from vmworker.devices.bus import Bus, BusConflictError, StopVm
from vmworker.devices.console import CAPTURE_LIMIT, MAX_PENDING_LINE, Console
from vmworker.devices.debug_console import DebugConsole
from vmworker.devices.exit_device import ExitDevice
from vmworker.devices.i8042 import I8042
from vmworker.devices.mmio_test import MmioTestDevice
from vmworker.devices.seed_port import SeedPort
from vmworker.devices.serial_input import BUFFER_LIMIT, CHUNK_SIZE, SerialInput
from vmworker.devices.standard import StandardDevices
from vmworker.devices.uart8250 import Uart8250
from vmworker.layout import COM1_PORT, DEBUGCON_PORT, EXIT_PORT, I8042_IRQ, I8042_PORT, MMIO_TEST_GPA, SEED_PORT

COM1 = COM1_PORT
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = (COM1 + i for i in range(8))
KBD_DATA, KBD_CMD = I8042_PORT, I8042_PORT + 4


def inb(bus: Bus, port: int) -> int:
    return bus.read(port, 1)[0]


def outb(bus: Bus, port: int, value: int) -> None:
    bus.write(port, bytes((value,)))


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.001)


def machine(input_bytes: bytes | None = b"", line_buffered: bool = False):
    out = io.BytesIO()
    console = Console(out, line_buffered=line_buffered)
    serial = SerialInput.empty() if input_bytes is None else SerialInput.from_bytes(input_bytes)
    devices = StandardDevices(console, serial)
    return devices.port_bus, devices.mmio_bus, devices.by_name(), console, out


# --- Console ---------------------------------------------------------------------------------


def test_line_buffered_console_emits_only_whole_lines():
    out = io.BytesIO()
    console = Console(out, line_buffered=True)
    console.write(b"hel")
    console.write(b"lo\nwor")
    assert out.getvalue() == b"hello\n"
    console.write(b"ld\n")
    assert out.getvalue() == b"hello\nworld\n"


def test_line_buffered_console_flush_emits_partial_tail():
    out = io.BytesIO()
    console = Console(out, line_buffered=True)
    console.write(b"no newline")
    assert out.getvalue() == b""
    console.flush()
    assert out.getvalue() == b"no newline"


def test_line_buffered_console_keeps_vmm_log_lines_out_of_guest_lines():
    out = io.BytesIO()
    console = Console(out, line_buffered=True)
    for ch in b"guest line one\n":
        console.write(bytes((ch,)))
        if ch == ord(" "):
            out.write(b"[vmm] exit\n")  # the VMM logging between two guest bytes
    assert out.getvalue().splitlines() == [b"[vmm] exit", b"[vmm] exit", b"guest line one"]


def test_line_buffered_console_emits_an_endless_line_once_it_is_long():
    out = io.BytesIO()
    console = Console(out, line_buffered=True)
    console.write(b"x" * (MAX_PENDING_LINE + 1))
    assert out.getvalue() == b"x" * (MAX_PENDING_LINE + 1)


def test_unbuffered_console_writes_through():
    out = io.BytesIO()
    console = Console(out, line_buffered=False)
    console.write(b"ab")
    assert out.getvalue() == b"ab"


def test_console_capture_keeps_only_the_last_64_kib():
    console = Console(None, line_buffered=False)
    for i in range(3 * CAPTURE_LIMIT // 1000 + 1):
        console.write(b"%05d" % i + b"." * 995)
    captured = console.captured()
    assert len(captured) == CAPTURE_LIMIT
    assert captured.endswith(b"%05d" % (3 * CAPTURE_LIMIT // 1000) + b"." * 995)


# --- SerialInput -----------------------------------------------------------------------------


def test_serial_input_from_a_pipe_delivers_every_byte_then_reaches_eof():
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    try:
        serial = SerialInput.from_stream(reader)
        assert not serial.at_eof()
        os.write(w, b"hello ")
        os.write(w, b"guest")
        os.close(w)
        got = bytearray()
        deadline = time.monotonic() + 5
        while not serial.at_eof():
            assert time.monotonic() < deadline, "no EOF before the deadline"
            byte = serial.poll()
            if byte is None:
                serial.wait(0.05)
            else:
                got.append(byte)
        assert bytes(got) == b"hello guest"
        assert serial.poll() is None
    finally:
        reader.close()


def test_serial_input_poll_never_blocks_while_the_pipe_is_silent():
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    try:
        serial = SerialInput.from_stream(reader)
        start = time.monotonic()
        assert serial.poll() is None
        assert not serial.has_data()
        assert not serial.at_eof()
        assert time.monotonic() - start < 0.5
    finally:
        os.close(w)
        reader.close()


def test_serial_input_bounds_its_buffer_and_loses_nothing():
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    payload = bytes(i & 0xFF for i in range(4 * BUFFER_LIMIT))
    writer = threading.Thread(target=lambda: (os.write(w, payload), os.close(w)))
    serial = SerialInput.from_stream(reader)
    writer.start()
    try:
        # Nobody reads: the reader thread must stop near the limit, not swallow the whole pipe.
        wait_until(lambda: serial.buffered() > BUFFER_LIMIT)
        time.sleep(0.05)  # give a misbehaving reader the chance to overshoot
        assert serial.buffered() <= BUFFER_LIMIT + CHUNK_SIZE
        got = bytearray()
        deadline = time.monotonic() + 10
        while not serial.at_eof():
            assert time.monotonic() < deadline
            byte = serial.poll()
            if byte is None:
                serial.wait(0.05)
            else:
                got.append(byte)
        assert bytes(got) == payload
    finally:
        writer.join()
        reader.close()


class _FailingStream:
    def read1(self, n: int) -> bytes:
        raise OSError(5, "Input/output error")


def test_serial_input_read_error_counts_as_eof():
    serial = SerialInput.from_stream(_FailingStream())
    assert serial.wait(5)
    assert serial.at_eof()
    assert isinstance(serial.error, OSError)


def test_serial_input_empty_is_at_eof_from_the_start():
    serial = SerialInput.empty()
    assert serial.at_eof() and not serial.has_data() and serial.poll() is None


# --- UART 8250 -------------------------------------------------------------------------------


def test_uart_thr_writes_reach_the_console():
    pio, _, devices, console, out = machine()
    for ch in b"hi\n":
        outb(pio, THR, ch)
    assert out.getvalue() == b"hi\n"
    assert console.captured() == b"hi\n"
    assert devices["com1"].bytes_out == 3


def test_uart_line_buffered_output_waits_for_the_newline():
    pio, _, _, console, out = machine(line_buffered=True)
    for ch in b"boot":
        outb(pio, THR, ch)
    assert out.getvalue() == b""
    outb(pio, THR, ord("\n"))
    assert out.getvalue() == b"boot\n"


def test_uart_dlab_switches_offsets_0_and_1_to_the_divisor():
    pio, _, devices, _, out = machine(b"x")
    uart = devices["com1"]
    outb(pio, IER, 0x03)
    outb(pio, LCR, 0x83)  # DLAB on, 8N1
    outb(pio, THR, 0x0C)  # DLL: 9600 baud
    outb(pio, IER, 0x00)  # DLM
    assert inb(pio, THR) == 0x0C
    assert inb(pio, IER) == 0x00
    assert uart.divisor == 12
    assert out.getvalue() == b""  # the divisor write did not transmit
    outb(pio, LCR, 0x03)  # DLAB off
    assert inb(pio, IER) == 0x03  # IER was kept aside
    assert inb(pio, THR) == ord("x")  # offset 0 is RBR again
    assert uart.bytes_in == 1


def test_uart_lsr_reports_data_ready_and_an_always_empty_transmitter():
    pio, _, _, _, _ = machine(b"a")
    assert inb(pio, LSR) == 0x61  # DR | THRE | TEMT
    assert inb(pio, THR) == ord("a")
    assert inb(pio, LSR) == 0x60
    assert inb(pio, THR) == 0  # RBR with nothing received


def test_uart_msr_drops_dcd_only_after_the_last_input_byte_is_read():
    pio, _, _, _, _ = machine(b"ab")
    assert inb(pio, MSR) == 0xB0  # DCD | DSR | CTS
    assert inb(pio, THR) == ord("a")
    assert inb(pio, MSR) == 0xB0
    assert inb(pio, THR) == ord("b")
    assert inb(pio, MSR) == 0x38  # DCD gone, DDCD reports the change once
    assert inb(pio, MSR) == 0x30


def test_uart_msr_has_no_carrier_when_input_is_empty_from_the_start():
    pio, _, _, _, _ = machine(None)
    assert inb(pio, MSR) == 0x30


def test_uart_iir_identifies_data_and_thre_by_priority():
    pio, _, _, _, _ = machine(b"z")
    assert inb(pio, IIR) == 0x01  # nothing enabled, nothing pending
    outb(pio, IER, 0x03)  # RDA + THRE
    assert inb(pio, IIR) == 0x04  # received data outranks THRE
    inb(pio, THR)
    assert inb(pio, IIR) == 0x02  # THRE pending since it was enabled
    assert inb(pio, IIR) == 0x01  # reading IIR cleared it
    outb(pio, THR, ord("."))
    assert inb(pio, IIR) == 0x02
    outb(pio, IIR, 0x07)  # FCR: enable (and reset) FIFOs
    assert inb(pio, IIR) == 0xC1


def test_uart_scratch_lcr_and_mcr_hold_what_was_written():
    pio, _, _, _, _ = machine()
    outb(pio, SCR, 0x5A)
    outb(pio, LCR, 0x1B)
    outb(pio, MCR, 0xFF)
    assert inb(pio, SCR) == 0x5A
    assert inb(pio, LCR) == 0x1B
    assert inb(pio, MCR) == 0x1F  # bits 7:5 do not exist


def test_uart_reads_input_through_a_real_pipe_and_hangs_up_at_eof():
    r, w = os.pipe()
    reader = os.fdopen(r, "rb")
    try:
        console = Console(io.BytesIO(), line_buffered=False)
        uart = Uart8250(console, SerialInput.from_stream(reader))
        bus = Bus("pio")
        bus.attach(COM1, 8, uart)
        assert inb(bus, MSR) & 0x80
        os.write(w, b"ok")
        os.close(w)
        got = bytearray()
        deadline = time.monotonic() + 5
        while inb(bus, MSR) & 0x80:
            assert time.monotonic() < deadline
            if inb(bus, LSR) & 0x01:
                got.append(inb(bus, THR))
        assert bytes(got) == b"ok"
    finally:
        reader.close()


# --- i8042 -----------------------------------------------------------------------------------


def test_i8042_self_test_replies_0x55_through_the_output_buffer():
    pio, _, _, _, _ = machine()
    assert inb(pio, KBD_CMD) & 0x01 == 0
    outb(pio, KBD_CMD, 0xAA)
    status = inb(pio, KBD_CMD)
    assert status & 0x01  # OBF
    assert status & 0x04  # system flag
    assert status & 0x08  # last write was a command
    assert status & 0x02 == 0  # IBF never set
    assert inb(pio, KBD_DATA) == 0x55
    assert inb(pio, KBD_CMD) & 0x01 == 0
    assert inb(pio, KBD_DATA) == 0x00  # empty buffer


def test_i8042_port_test_and_command_byte_round_trip():
    pio, _, devices, _, _ = machine()
    outb(pio, KBD_CMD, 0xAB)
    assert inb(pio, KBD_DATA) == 0x00
    outb(pio, KBD_CMD, 0x60)
    outb(pio, KBD_DATA, 0x20)
    assert inb(pio, KBD_CMD) & 0x08 == 0  # last write was data
    assert inb(pio, KBD_CMD) & 0x04 == 0  # system flag follows command byte bit 2
    outb(pio, KBD_CMD, 0xAD)
    outb(pio, KBD_CMD, 0x20)
    assert inb(pio, KBD_DATA) == 0x30  # keyboard-disabled bit set by 0xAD
    outb(pio, KBD_CMD, 0xAE)
    outb(pio, KBD_CMD, 0x20)
    assert inb(pio, KBD_DATA) == 0x20
    assert devices["i8042"].unknown_commands == 0


def test_i8042_unused_ports_read_all_ones():
    pio, _, _, _, _ = machine()
    assert [inb(pio, I8042_PORT + i) for i in (1, 2, 3)] == [0xFF, 0xFF, 0xFF]


def test_i8042_pulse_reset_0xfe_raises_stop_vm():
    pio, _, _, _, _ = machine()
    with pytest.raises(StopVm) as info:
        outb(pio, KBD_CMD, 0xFE)
    assert info.value.reason == "reset"
    assert info.value.detail == "i8042 reset (0xFE)"


def test_i8042_output_port_write_with_bit_0_clear_resets():
    pio, _, _, _, _ = machine()
    outb(pio, KBD_CMD, 0xD1)
    outb(pio, KBD_DATA, 0x03)  # reset line kept high: nothing happens
    outb(pio, KBD_CMD, 0xD1)
    with pytest.raises(StopVm) as info:
        outb(pio, KBD_DATA, 0x02)
    assert info.value.reason == "reset"


def test_i8042_push_output_queues_bytes_in_order():
    i8042 = I8042()
    for b in (0x1E, 0x9E):
        i8042.push_output(b)
    assert i8042.read(0, 1) == b"\x1e"
    assert i8042.read(0, 1) == b"\x9e"


# --- exit, debugcon, seed port ---------------------------------------------------------------


@pytest.mark.parametrize("size, code", [(1, 0x2A), (2, 0x1234), (4, 0xDEADBEEF)])
def test_exit_device_code_is_exactly_the_value_written(size, code):
    pio, _, _, _, _ = machine()
    with pytest.raises(StopVm) as info:
        pio.write(EXIT_PORT, code.to_bytes(size, "little"))
    assert info.value.reason == "guest-exit"
    assert info.value.code == code


def test_exit_device_reads_all_ones():
    assert ExitDevice().read(0, 2) == b"\xff\xff"


def test_debugcon_writes_reach_the_console_and_reads_identify_the_port():
    pio, _, devices, _, out = machine()
    for ch in b"dbg":
        outb(pio, DEBUGCON_PORT, ch)
    assert out.getvalue() == b"dbg"
    assert inb(pio, DEBUGCON_PORT) == 0xE9
    assert isinstance(devices["debugcon"], DebugConsole)


def test_seed_port_keeps_the_last_value_and_reads_it_back():
    pio, _, devices, _, out = machine()
    for n in range(5):
        pio.write(SEED_PORT, n.to_bytes(2, "little"))
    seed = devices["seed"]
    assert isinstance(seed, SeedPort)
    assert seed.last_value == 4
    assert pio.read(SEED_PORT, 2) == b"\x04\x00"
    assert out.getvalue() == b""


# --- MMIO test device ------------------------------------------------------------------------


def test_mmio_id_reads_vmsu():
    _, mmio, _, _, _ = machine()
    assert mmio.read(MMIO_TEST_GPA, 4) == b"vmsu"
    assert int.from_bytes(mmio.read(MMIO_TEST_GPA, 4), "little") == 0x75736D76


def test_mmio_scratch_returns_what_was_written_per_byte():
    _, mmio, devices, _, _ = machine()
    dev = devices["mmio-test"]
    assert mmio.read(MMIO_TEST_GPA + 8, 8) == bytes(8)
    mmio.write(MMIO_TEST_GPA + 8, (0x1122334455667788).to_bytes(8, "little"))
    mmio.write(MMIO_TEST_GPA + 0xA, b"\xaa\xbb")
    assert mmio.read(MMIO_TEST_GPA + 8, 8) == (0x11223344BBAA7788).to_bytes(8, "little")
    assert mmio.read(MMIO_TEST_GPA + 0xC, 4) == (0x11223344).to_bytes(4, "little")
    assert (dev.reads, dev.writes) == (3, 2)


def test_mmio_other_offsets_read_the_pattern_and_ignore_writes():
    _, mmio, _, _, _ = machine()
    mmio.write(MMIO_TEST_GPA + 0x100, b"\x00\x00\x00\x00")
    assert mmio.read(MMIO_TEST_GPA + 0x100, 4) == bytes([0x00, 0x01, 0x02, 0x03])
    assert mmio.read(MMIO_TEST_GPA + 0x1FE, 4) == bytes([0xFE, 0xFF, 0x00, 0x01])
    assert mmio.read(MMIO_TEST_GPA + 4, 4) == bytes([4, 5, 6, 7])


# --- bus -------------------------------------------------------------------------------------


def test_unclaimed_accesses_read_all_ones_and_are_counted():
    pio, mmio, _, _, _ = machine()
    assert pio.read(0x84, 1) == b"\xff"
    assert pio.read(0x3F8 + 8, 2) == b"\xff\xff"
    pio.write(0x84, b"\x01")
    assert pio.statistics() == {"unclaimed_reads": 2, "unclaimed_writes": 1}
    assert mmio.read(MMIO_TEST_GPA + 0x1000, 8) == b"\xff" * 8
    assert mmio.unclaimed_reads == 1


def test_overlapping_attach_is_rejected():
    pio, _, _, _, _ = machine()
    with pytest.raises(BusConflictError):
        pio.attach(COM1 + 7, 1, SeedPort())
    with pytest.raises(BusConflictError):
        pio.attach(COM1 - 1, 2, SeedPort())
    pio.attach(COM1 + 8, 1, SeedPort())  # adjacent is fine


def test_standard_devices_are_named_and_placed():
    pio, mmio, devices, _, _ = machine()
    assert set(devices) == {"seed", "debugcon", "com1", "i8042", "exit", "mmio-test", "vga", "rtc", "post", "pci"}
    placed = {dev.name: (base, end - base) for base, end, dev in pio.devices() + mmio.devices()}
    assert placed == {
        "seed": (0x10, 1),
        "debugcon": (0xE9, 1),
        "vga": (0x3D4, 2),
        "com1": (0x3F8, 8),
        "i8042": (0x60, 5),
        "exit": (0xF4, 1),
        "rtc": (0x70, 2),
        "post": (0x80, 1),
        "pci": (0xCF8, 8),
        "mmio-test": (0xD0000000, 0x1000),
    }
    assert isinstance(devices["mmio-test"], MmioTestDevice)
    assert isinstance(devices["com1"], Uart8250)
    assert isinstance(devices["i8042"], I8042)


def test_standard_devices_are_attributes_wired_to_their_irq_line():
    """The i8042's IRQ goes to the line layout names (ISA IRQ 1) once the set is connected to a VM."""
    devices = StandardDevices(Console(io.BytesIO(), line_buffered=False), SerialInput.empty())
    assert devices.by_name() == {"seed": devices.seed, "debugcon": devices.debugcon, "com1": devices.com1,
                                 "i8042": devices.i8042, "exit": devices.exit, "vga": devices.vga,
                                 "rtc": devices.rtc, "post": devices.post, "pci": devices.pci,
                                 "mmio-test": devices.mmio_test}

    class IrqLines:  # the one call StandardDevices makes on a Vm: KVM_IRQ_LINE
        def __init__(self) -> None:
            self.levels: list[tuple[int, int]] = []

        def irq_line(self, irq: int, level: int) -> None:
            self.levels.append((irq, level))

    lines = IrqLines()
    devices.connect_irqs(lines)
    outb(devices.port_bus, I8042_PORT + 4, 0x60)  # write command byte: keyboard interrupt on
    outb(devices.port_bus, I8042_PORT, 0x01)
    assert devices.i8042.inject_scancodes(b"\x1e", timeout=5)
    assert lines.levels == [(I8042_IRQ, 1), (I8042_IRQ, 0)]


def test_vmtrace_console_reads_the_ports_the_devices_sit_on():
    from tracetool.commands import console

    assert (console.UART_BASE, console.DEBUGCON_PORT) == (COM1_PORT, DEBUGCON_PORT)
    assert console.LCR_RESET == Uart8250(Console(io.BytesIO(), False), SerialInput.empty()).lcr
