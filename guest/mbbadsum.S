# mbbadsum -- a Multiboot header whose checksum is wrong, and nothing else
# worth running.  Multiboot 0.6.96 §3.1.2: magic + flags + checksum must be 0
# mod 2^32; here it is 1.  A loader must refuse the image:
#   vmsup: error: ...: multiboot header at offset 0x0: bad checksum ...
# If it ever ran, it would write 1 to the exit port.

        .equ    MB_MAGIC, 0x1BADB002
        .equ    MB_FLAGS, 0x00010000            # a.out kludge, so the fields below would be used

        .code32
        .text
        .globl  _start
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS) + 1      # off by one
        .long   mb_header                       # header_addr
        .long   mb_header                       # load_addr
        .long   0                               # load_end_addr: the whole file
        .long   0                               # bss_end_addr: no bss
        .long   _start                          # entry_addr
_start:
        movb    $1, %al
        outb    %al, $0xF4
        hlt
