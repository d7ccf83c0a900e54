# echo -- serial input to upper-case serial output, exit code = line count.
#
# Mode: real (16-bit), CS=DS=0x1000, linked with -Ttext 0.
# Loop: poll LSR (0x3FD); if DR (bit 0) is set, read RBR (0x3F8), map a-z to
# A-Z (other bytes unchanged) and write it to THR after LSR.THRE (bit 5) is
# set.  If DR is clear, read MSR (0x3FE): DCD (bit 7) = 1 means the input is
# still open (poll again); DCD = 0 means input hit EOF and every byte has been
# read (vmsup's "hang-up"), so write the number of '\n' bytes seen (mod 256)
# to the exit device at port 0xF4.
# Example: input "abc\nxyz\n" -> output "ABC\nXYZ\n", guest exit code 2.
# Input with no bytes at all -> no output, guest exit code 0.

        .code16
        .text
        .globl _start

        .equ    COM1_RBR, 0x3F8
        .equ    COM1_THR, 0x3F8
        .equ    COM1_LSR, 0x3FD
        .equ    COM1_MSR, 0x3FE
        .equ    LSR_DR, 0x01
        .equ    LSR_THRE, 0x20
        .equ    MSR_DCD, 0x80
        .equ    EXIT_PORT, 0xF4

_start:
        xorb    %bl, %bl                # '\n' count (wraps mod 256)
poll:
        movw    $COM1_LSR, %dx
        inb     %dx, %al
        testb   $LSR_DR, %al
        jnz     have_byte
        movw    $COM1_MSR, %dx
        inb     %dx, %al
        testb   $MSR_DCD, %al
        jnz     poll                    # carrier still up: wait for input
        movb    %bl, %al                # EOF: exit code = line count
        outb    %al, $EXIT_PORT
halt:
        hlt
        jmp     halt

have_byte:
        movw    $COM1_RBR, %dx
        inb     %dx, %al
        cmpb    $'\n', %al
        jne     1f
        incb    %bl
1:      cmpb    $'a', %al
        jb      2f
        cmpb    $'z', %al
        ja      2f
        subb    $'a'-'A', %al
2:      movb    %al, %ah
        movw    $COM1_LSR, %dx
3:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      3b
        movw    $COM1_THR, %dx
        movb    %ah, %al
        outb    %al, %dx
        jmp     poll
