//! `guest.minimal`: the smallest boot there is, for boot-time benchmarks. When the command line
//! starts with that word, the PVH entry does nothing else: it writes the boot timer (the byte
//! 123 to 0xC000_0000, Firecracker's convention), prints `guest: minimal boot` on COM1 with one
//! `rep outsb`, writes 0 to the isa-debug-exit port 0xF4 (which ends QEMU) and resets through
//! the i8042 (which ends ember). It runs in 32-bit protected mode with paging off, before any
//! page table or stack exists: a dozen instructions, so that what a benchmark measures is the
//! VMM, not the guest (ring-0 code is emulated on PVM hosts, about a microsecond an
//! instruction).

use core::arch::global_asm;

global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .code32
    /* From pvh_entry: EBX = hvm_start_info; back to pvh_full unless the command line starts
       with the word "guest.minimal". */
    .global minimal_check
    minimal_check:
    mov 24(%ebx), %esi          /* hvm_start_info.cmdline_paddr, low half */
    test %esi, %esi
    jz pvh_full
    cmpl ${w0}, (%esi)
    jne pvh_full
    cmpl ${w1}, 4(%esi)
    jne pvh_full
    cmpl ${w2}, 8(%esi)
    jne pvh_full
    cmpb ${last}, 12(%esi)
    jne pvh_full
    movb 13(%esi), %al          /* the word ends there: a space or the terminating NUL */
    cmp $0x20, %al
    je 1f
    test %al, %al
    jne pvh_full
    1:
    movb ${boot_timer_value}, {boot_timer_addr}
    mov $minimal_marker, %esi
    mov $minimal_marker_end - minimal_marker, %ecx
    mov ${com1}, %dx
    rep outsb
    mov ${debug_exit}, %dx
    xor %eax, %eax
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
    2:
    hlt
    jmp 2b
    minimal_marker:
    .ascii "guest: minimal boot\n"
    minimal_marker_end:
    .code64
    .popsection
    "#,
    w0 = const u32::from_le_bytes(*b"gues"),
    w1 = const u32::from_le_bytes(*b"t.mi"),
    w2 = const u32::from_le_bytes(*b"nima"),
    last = const b'l',
    boot_timer_value = const 123,
    boot_timer_addr = const 0xc000_0000u32,
    com1 = const 0x3f8,
    debug_exit = const 0xf4,
    options(att_syntax)
);
