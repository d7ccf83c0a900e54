"""A user-space 8259A PIC pair (master at 0x20, slave at 0xA0), for --deterministic runs.

Intel 8259A datasheet: ICW1 (bit 4 set, on the command port) starts initialisation, ICW2 (data
port) gives the vector base, ICW3 the cascade wiring, ICW4 (if ICW1 bit 0) the mode; then a data
write is OCW1 (the interrupt mask), a command write OCW2 (bits 5-7: EOI kinds) or OCW3 (bit 3:
read IRR/ISR select). Edge-triggered only, fully nested priority (IRQ 0 highest); the slave
cascades on the master's IRQ 2. No in-kernel irqchip: vmworker/deterministic.py asks `pending()`
at exits and injects with KVM_INTERRUPT.
"""

from __future__ import annotations

from .saved_state import SavedFields

CASCADE_IRQ = 2


class Pic8259(SavedFields):
    """One 8259A: `raise_irq(n)` latches an edge, `next_irq()` the one to deliver, `acknowledge(n)`."""

    # what a snapshot of a --deterministic VM keeps (on the port bus, it is saved with the devices)
    SAVED = ("irr", "isr", "imr", "vector_base", "read_isr", "_icw_step", "_icw4")

    def __init__(self, name: str = "pic") -> None:
        self.name = name
        self.irr = 0  # requested
        self.isr = 0  # in service
        self.imr = 0xFF  # masked (all, until the guest programs it)
        self.vector_base = 0x08
        self.read_isr = False
        self._icw_step = 0  # 0: operational; 2..4: the next ICW the data port expects
        self._icw4 = False

    # Port interface (offset 0: command, 1: data)
    def read(self, offset: int, size: int) -> bytes:
        value = self.imr if offset == 1 else (self.isr if self.read_isr else self.irr)
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == 0:
            if value & 0x10:  # ICW1
                self._icw_step, self._icw4 = 2, bool(value & 0x01)
                self.imr = self.isr = self.irr = 0
                self.read_isr = False
            elif value & 0x08:  # OCW3
                if value & 0x02:
                    self.read_isr = bool(value & 0x01)
            else:  # OCW2
                eoi = (value >> 5) & 0x7
                if eoi == 0x1 and self.isr:  # non-specific EOI: the highest-priority bit in service
                    self.isr &= self.isr - 1
                elif eoi == 0x3:  # specific EOI
                    self.isr &= ~(1 << (value & 0x7))
            return
        if self._icw_step == 2:
            self.vector_base = value & 0xF8
            self._icw_step = 3
        elif self._icw_step == 3:
            self._icw_step = 4 if self._icw4 else 0
        elif self._icw_step == 4:
            self._icw_step = 0
        else:
            self.imr = value

    # Interrupt logic
    def raise_irq(self, irq: int) -> None:
        self.irr |= 1 << irq

    def next_irq(self) -> int | None:
        """The unmasked requested IRQ of highest priority above every one in service, or None."""
        ready = self.irr & ~self.imr & 0xFF
        for irq in range(8):
            if self.isr & (1 << irq):
                return None  # fully nested: nothing of lower or equal priority interrupts it
            if ready & (1 << irq):
                return irq
        return None

    def acknowledge(self, irq: int) -> int:
        self.irr &= ~(1 << irq)
        self.isr |= 1 << irq
        return self.vector_base + irq


class PicPair:
    """Master and slave as the PC wires them; `pending_vector()` / `acknowledge()` for injection."""

    def __init__(self) -> None:
        self.master, self.slave = Pic8259("pic-master"), Pic8259("pic-slave")

    def raise_irq(self, irq: int) -> None:
        if irq < 8:
            self.master.raise_irq(irq)
        else:
            self.slave.raise_irq(irq - 8)
            self.master.raise_irq(CASCADE_IRQ)

    def take_vector(self) -> int | None:
        """The vector to inject now (and mark in service), or None."""
        irq = self.master.next_irq()
        if irq is None:
            return None
        if irq == CASCADE_IRQ:
            slave_irq = self.slave.next_irq()
            if slave_irq is None:
                self.master.irr &= ~(1 << CASCADE_IRQ)
                return None
            self.master.acknowledge(irq)
            return self.slave.acknowledge(slave_irq)
        return self.master.acknowledge(irq)

    def has_pending(self) -> bool:
        return self.master.next_irq() is not None
