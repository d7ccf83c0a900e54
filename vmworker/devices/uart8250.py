"""An 8250/16550-style UART: the guest's serial console (COM1)."""

from __future__ import annotations

import threading

from .console import Console
from .serial_input import SerialInput
from .saved_state import SavedFields

# Register offsets from the base (16550 datasheet, register summary table).
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR_FCR = 2  # read: IIR, write: FCR
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
NUM_REGS = 8

LCR_DLAB = 0x80
LCR_RESET = 0x03  # 8N1, what firmware leaves behind
IER_RDA = 0x01  # received-data-available interrupt enable
IER_THRE = 0x02  # transmitter-holding-register-empty interrupt enable
IIR_NONE = 0x01  # bit 0 set = no interrupt pending
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0  # bits 7:6 read 11 while FCR bit 0 enabled the FIFOs (16550A)
FCR_ENABLE = 0x01
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_DDCD = 0x08  # delta DCD since the last MSR read
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_DCD = 0x80


class Uart8250(SavedFields):
    """A 16550-compatible UART whose transmitter writes to a `Console` and receiver reads a `SerialInput`.

    Transmit never blocks: every THR byte goes straight to the console, so LSR.THRE and
    LSR.TEMT always read 1. LSR.DR is 1 while input has a byte; reading RBR with no byte gives 0.

    End of input is a modem hang-up: MSR.DCD (carrier detect) reads 1 while more input may
    come and drops to 0 once the input stream ended and the guest read its last byte; MSR.DDCD
    reports that change once. CTS and DSR are always asserted, RI never.

    IIR identifies RDA (IER bit 0 and DR) and THRE (IER bit 1; pending after each THR write or
    when the enable bit is set, cleared by reading IIR) so a polling driver sees what a real chip
    would say, but no IRQ line is raised yet: guests must poll. Not emulated: loopback (MCR bit 4
    is stored but transmit still goes to the console), line-status and modem-status interrupts,
    character timeouts, FIFO-reset bits (the host input buffer is not the chip's FIFO; dropping
    it would lose typed input). The divisor is stored but the line has no speed.

    Accesses wider than a byte act like an ISA bus splitting them into byte cycles at
    consecutive offsets; offsets past the 8 registers read 0xFF.
    """

    SAVED = ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm", "_thre_pending")  # guest-visible state a snapshot keeps

    def __init__(self, console: Console, serial_input: SerialInput, name: str = "com1") -> None:
        self.name = name
        self._console = console
        self._input = serial_input
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = LCR_RESET
        self.mcr = 0
        self.fcr = 0
        self.scr = 0
        self.dll = 0x01  # divisor 1 = 115200 baud
        self.dlm = 0
        self._thre_pending = False
        self._last_dcd = not serial_input.at_eof()
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def divisor(self) -> int:
        return self.dlm << 8 | self.dll

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self._read_reg(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_reg(offset + i, value)

    def statistics(self) -> dict[str, int]:
        return {"bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                return self.dll
            byte = self._input.poll()
            if byte is None:
                return 0
            self.bytes_in += 1
            return byte
        if reg == IER:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            return self._iir()
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._input.has_data() else 0)
        if reg == MSR:
            dcd = not self._input.at_eof()
            delta = MSR_DDCD if dcd != self._last_dcd else 0
            self._last_dcd = dcd  # delta bits clear on read (16550 MSR description)
            return MSR_CTS | MSR_DSR | (MSR_DCD if dcd else 0) | delta
        if reg == SCR:
            return self.scr
        return 0xFF

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                self.dll = value
                return
            self._console.write(bytes((value,)))
            self.bytes_out += 1
            self._thre_pending = True  # THR emptied again at once
        elif reg == IER:
            if dlab:
                self.dlm = value
                return
            # Enabling ETBEI while THR is empty raises a THRE interrupt (16550 datasheet, IIR table).
            if value & IER_THRE and not self.ier & IER_THRE:
                self._thre_pending = True
            self.ier = value & 0x0F  # bits 7:4 are always 0
        elif reg == IIR_FCR:
            self.fcr = value
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F  # bits 7:5 are always 0
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes are factory-test only on real parts; ignored.

    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & FCR_ENABLE else 0
        # Priority order from the 16550 IIR table: RDA above THRE.
        if self.ier & IER_RDA and self._input.has_data():
            return fifo | IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            self._thre_pending = False  # reading IIR with THRE as the source clears it
            return fifo | IIR_THRE
        return fifo | IIR_NONE
