"""Where things sit in guest-physical memory and I/O port space. Every fixed address of the VMM is
named here, once (the trace tools read the port numbers from here too).

    0x0000_0000  real-mode IVT / BIOS data area: left zeroed (no BIOS)
    0x0000_1000  BOOT_GDT      GDT the VMM writes for protected and long mode
    0x0000_2000  BOOT_PML4     long-mode page tables: PML4, one PDPT, four PDs
    0x0000_3000  BOOT_PDPT       (identity map of the first 4 GiB in 2 MiB pages)
    0x0000_4000  BOOT_PD         .. 0x7fff
    0x0000_8000  MULTIBOOT_INFO  multiboot kernels: the info structure, memory map, loader name and
                                 command line the VMM writes for them (.. 0x9fff)
    0x0000_8000  LINUX_BOOT_PARAMS  Linux boot protocol kernels, in the same pages (a VM boots one
    0x0000_9000  LINUX_CMDLINE      kind of kernel): the zero page and the command line (.. 0x9fff)
    0x0001_0000  DEFAULT_LOAD_ADDR  flat guests (the seed guest is linked here)
    0x000B_8000  VGA_TEXT_BUFFER  the colour text screen, plain RAM (sampled, never trapped)
    ...          RAM up to the VM's --mem size (at most MEM_CAP)
    0xC000_0000  MMIO hole: never RAM, so device windows cannot collide with it
    0xD000_0000  MMIO_TEST_GPA  MMIO test device (vmworker.devices.mmio_test)

Ports (I/O space) of the standard devices, and the ISA IRQ lines they raise, are at the end.
"""

PAGE_SIZE = 4096

# Flat binaries land where kvmsample's guest is linked (its demo loads at 0, a known bug).
DEFAULT_LOAD_ADDR = 0x10000

# Low pages for VMM-built tables; below DEFAULT_LOAD_ADDR so guests are never overwritten.
BOOT_GDT = 0x1000
BOOT_PML4 = 0x2000
BOOT_PDPT = 0x3000
BOOT_PD = 0x4000  # four consecutive PDs: 4 x 512 x 2 MiB = 4 GiB
BOOT_TABLES_END = 0x8000

# What the VMM hands a multiboot kernel (Multiboot 0.6.96 §3.3: the info structure, and what its
# pointers point to, may sit anywhere the OS can read). Right after the boot tables and below
# DEFAULT_LOAD_ADDR, so it never meets a flat guest, nor a kernel loaded at 1 MiB as they usually
# are; an image that would overlap it is refused (MULTIBOOT_AREA_END). The memory map reports all of
# low RAM as available: the kernel may reuse these pages once it has read them, as with GRUB.
MULTIBOOT_INFO = 0x8000  # struct multiboot_info, 88 bytes
MULTIBOOT_MMAP = 0x8100  # memory map entries, 24 bytes each (3 used)
MULTIBOOT_LOADER_NAME = 0x8200  # "vmsup\0"
MULTIBOOT_CMDLINE = 0x8400  # --cmdline, NUL-terminated, up to MULTIBOOT_AREA_END
MULTIBOOT_AREA_END = 0xA000
MULTIBOOT_CMDLINE_MAX = MULTIBOOT_AREA_END - MULTIBOOT_CMDLINE - 1  # bytes, without the NUL

# What the VMM hands a Linux boot protocol kernel (vmworker.bzimage), in the pages multiboot kernels
# get their information in: a VM boots one kind of kernel or the other. The zero page (struct
# boot_params, 4 KiB: Documentation/arch/x86/zero-page.rst) sits right after the page tables, as
# boot.rst's 64-bit protocol wants it identity-mapped but not inside the tables; the command line
# fills the next page. Both below 1 MiB, where the kernel is loaded.
LINUX_BOOT_PARAMS = 0x8000
LINUX_CMDLINE = 0x9000
LINUX_AREA_END = 0xA000
LINUX_CMDLINE_MAX = LINUX_AREA_END - LINUX_CMDLINE - 1  # bytes, without the NUL
# boot.rst: a protected-mode kernel (bzImage, LOADED_HIGH) is loaded at 1 MiB.
LINUX_KERNEL_ADDR = 0x100000

# Firmware tables describing the CPUs to a kernel (vmworker.mptable, vmworker.acpi), written for
# multiboot and bzImage kernels only. In the BIOS ROM area, where both specifications tell an OS to
# search: MP spec 1.4 §4 ("the BIOS ROM address space between 0F0000h and 0FFFFFh") and ACPI 6.5
# §5.2.5.1 (the RSDP "in the BIOS read-only memory space between 0E0000h and 0FFFFFh", 16-byte
# aligned). Both memory maps report 640 KiB-1 MiB reserved, so kernels leave them alone.
MP_FLOATING_POINTER = 0xF0000  # 16 bytes
MP_CONFIG_TABLE = 0xF0010  # up to ACPI_RSDP: room for 1600 processor entries
ACPI_RSDP = 0xF8000
ACPI_RSDT = 0xF8020
ACPI_MADT = 0xF8080  # after the RSDT (36 + 4 bytes); up to FIRMWARE_TABLES_END
FIRMWARE_TABLES_END = 0x100000
# The local APICs' and the I/O APIC's MMIO windows, where KVM's in-kernel irqchip answers (the PC's
# defaults: Intel SDM Vol. 3A §11.4.1, 82093AA I/O APIC datasheet).
LAPIC_BASE = 0xFEE0_0000
IOAPIC_BASE = 0xFEC0_0000

# The PC's low-memory map as a multiboot memory map describes it: conventional RAM below 640 KiB,
# the VGA/ROM hole up to 1 MiB (reserved: the VGA text buffer lives at 0xB8000), RAM from 1 MiB.
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0x100000

# KVM_SET_TSS_ADDR needs three pages the guest never uses (Intel VMX real-mode emulation);
# put them at the very top of the 32-bit space, inside the MMIO hole, as QEMU/kvmtool do.
TSS_ADDR = 0xFFFB_D000
TSS_AREA_SIZE = 3 * PAGE_SIZE  # KVM_SET_TSS_ADDR (api.rst): "a three-page region"

# RAM stays below the PCI-style MMIO hole at 3 GiB, like a PC's low memory.
MEM_CAP = 0xC000_0000
MEM_MIN = 1 << 20  # room for the boot tables, the load address and a stack
DEFAULT_MEM = 16 << 20

# Per-vCPU stacks: protected/long mode get the top of RAM, one 4 KiB slot each.
STACK_SLOT = 0x1000
# Real mode: SP counts down from the top of the load segment, 1 KiB apart per vCPU.
REAL_MODE_STACK_SLOT = 0x400

# Colour text mode's buffer (mode 3, IBM VGA Technical Reference); monochrome adapters use
# 0xB0000, which vmsup does not model.
VGA_TEXT_BUFFER = 0xB8000

# A free spot above guest RAM, which is capped at MEM_CAP: inside the 3-4 GiB hole where PCs put
# device memory, so even a 32-bit guest without paging can reach it.
MMIO_TEST_GPA = 0xD000_0000

# I/O ports of the standard devices (vmworker.devices.standard), each the first port of its range.
# The kvmsample seed guest writes its counter here (`out %ax, $0x10`).
SEED_PORT = 0x10
# --deterministic only (vmworker/deterministic.py): the PC's 8259 pair and 8254 PIT in user space.
PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
PIT_PORT = 0x40  # counters 0-2 at 0x40-0x42, control word at 0x43
# The i8042 data (0x60) and status/command (0x64) ports of the PC/AT keyboard controller.
I8042_PORT = 0x60
# The PC/AT's CMOS RTC (MC146818A): index 0x70, data 0x71.
RTC_PORT = 0x70
# POST codes (and Linux's io_delay writes): the PC/AT's DMA page register at 0x80.
POST_PORT = 0x80
# The Bochs/QEMU debug console port.
DEBUGCON_PORT = 0xE9
# QEMU isa-debug-exit's default iobase, so guests written for QEMU tests work unchanged.
EXIT_PORT = 0xF4
# The VGA CRT controller's index/data pair in colour mode (Miscellaneous Output bit 0 = 1, as
# firmware leaves it).
VGA_CRTC_PORT = 0x3D4
# PCI configuration mechanism #1: CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC (PCI 3.0 §3.2.2.3.2).
PCI_CONFIG_PORT = 0xCF8
# COM1, where every PC guest and firmware looks for the first serial port.
COM1_PORT = 0x3F8

# ISA IRQ lines (the PC/AT's 8259 wiring, kept by the in-kernel PIC/IOAPIC): the keyboard is IRQ 1.
I8042_IRQ = 1
