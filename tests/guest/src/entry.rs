//! Entry points and the early CPU state they build: the 32-bit PVH entry, the 64-bit Linux
//! boot-protocol entry (`e_entry`), the Xen PVH ELF note, the guest's own GDT, identity page tables
//! and BSP stack, and the 16-bit AP trampoline that takes an AP from real mode to `ap_entry64`.
//!
//! Both boot entries end in `common64` with the same state: long mode on our page tables (first
//! 4 GiB identity mapped with 2 MiB pages, all user-accessible so that ring 3 code, see user.rs,
//! can reach RAM and MMIO), our GDT, flat data segments, the BSP stack, `.bss` zeroed, interrupts
//! off. Nothing of the VMM's (GDT at 0x500, page tables at 0x9000, stack at 0x8ff0) is used after
//! the first few instructions, so the guest may reuse low memory once the boot information is
//! copied out.

use core::arch::global_asm;

/// Value of `rust_main`'s first argument for the 64-bit Linux boot protocol (RSI = zero page).
pub const BOOT_LINUX64: u32 = 0;
/// Value of `rust_main`'s first argument for PVH (EBX = `hvm_start_info`).
pub const BOOT_PVH: u32 = 1;

/// Guest-physical page the AP trampoline is copied to; the SIPI vector is its page number.
pub const TRAMPOLINE_PHYS: u64 = 0x3000;
/// Most APs that get a stack; further APs halt in `ap_entry64` without being counted.
pub const MAX_APS: u32 = 31;
const AP_STACK_SHIFT: u32 = 12; // 4 KiB per AP: ap_main only records its APIC id
const BSP_STACK_SIZE: u32 = 32 * 1024;

// Segment selectors of the GDT below.
const CODE64: u32 = 0x08;
const DATA: u32 = 0x10;
const CODE32: u32 = 0x18;
/// Ring-3 selectors (RPL 3) of the GDT below, and its TSS descriptor's (filled in by user.rs).
pub const USER_CODE64: u16 = 0x33;
pub const USER_DATA: u16 = 0x2b;
pub const TSS_SELECTOR: u16 = 0x38;

// CR0.PE | CR0.PG; CR4.PAE; EFER.LME. The guest uses no x87/SSE (see .cargo/config.toml).
const CR0_SET: u32 = 0x8000_0001;
const CR4_SET: u32 = 0x0000_0020;
const EFER_MSR: u32 = 0xc000_0080;
const EFER_LME: u32 = 0x100;

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// The AP trampoline's code, to be copied to [`TRAMPOLINE_PHYS`] before any SIPI.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit one contiguous blob of the image's `.text`, which is mapped and
    // never written.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let len = (&raw const ap_trampoline_end).offset_from(start) as usize;
        core::slice::from_raw_parts(start, len)
    }
}

global_asm!(
    r#"
    .pushsection .note.xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_entry
    .popsection

    /* GDT: accessed bits preset so the CPU never writes to it, except the TSS descriptor, which
       user.rs fills in (and `ltr` marks busy). The user segments take Linux's selectors
       (0x23/0x2b/0x33), the conventional layout (PVM hosts do not insist on it). */
    .pushsection .data.gdt, "aw"
    .balign 16
    gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: flat data */
    .quad 0x00cf9b000000ffff    /* 0x18: flat 32-bit code (AP trampoline) */
    .quad 0x00cffb000000ffff    /* 0x20: user 32-bit code (unused, keeps Linux's layout) */
    .quad 0x00cff3000000ffff    /* 0x28: user data */
    .quad 0x00affb000000ffff    /* 0x30: user 64-bit code */
    .global gdt_tss
    gdt_tss:
    .quad 0, 0                  /* 0x38: 64-bit TSS, 16 bytes */
    gdt_end:
    .balign 8
    gdt_ptr:                    /* 32-bit lgdt reads the first 6 bytes, 64-bit lgdt all 10 */
    .word gdt_end - gdt - 1
    .quad gdt
    .popsection

    .pushsection .boot_bss, "aw", @nobits
    .balign 4096
    pml4: .skip 4096
    pdpt: .skip 4096
    pd:   .skip 4 * 4096        /* 4 x 512 x 2 MiB = 4 GiB */
    .balign 16
    bsp_stack: .skip {bsp_stack_size}
    bsp_stack_top:
    .balign 4096
    ap_stacks: .skip {max_aps} << {ap_stack_shift}
    .popsection

    .pushsection .text.entry, "ax"

    /* PVH: 32-bit protected mode, paging off, EBX = hvm_start_info. */
    .code32
    .global pvh_entry
    pvh_entry:
    cli
    cld
    jmp minimal_check           /* minimal.rs: guest.minimal, or back to pvh_full */
    .global pvh_full
    pvh_full:
    mov %ebx, %esi
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    /* PML4 and PDPT: zero, then one entry and four entries. */
    mov $pml4, %edi
    mov $2048, %ecx
    rep stosl
    movl $pdpt + 7, pml4
    movl $pd + 0x0007, pdpt
    movl $pd + 0x1007, pdpt + 8
    movl $pd + 0x2007, pdpt + 16
    movl $pd + 0x3007, pdpt + 24
    /* 2048 PDEs: present | writable | user | 2 MiB page (user: ring 3 reaches RAM and MMIO). */
    mov $pd, %edi
    mov $0x87, %eax
    1:
    movl %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    cmp $pd + 4 * 4096, %edi
    jne 1b
    lgdt gdt_ptr
    mov %cr4, %eax
    or ${cr4_set}, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov ${efer}, %ecx
    rdmsr
    or ${efer_lme}, %eax
    wrmsr
    mov %cr0, %eax
    or ${cr0_set}, %eax
    mov %eax, %cr0
    ljmp ${code64}, $2f
    .code64
    2:
    mov %esi, %esi          /* zero-extend: upper halves are undefined after the mode switch */
    mov ${boot_pvh}, %edi
    jmp common64

    /* 64-bit Linux boot protocol: long mode on the VMM's tables, RSI = zero page. */
    .global entry64
    entry64:
    cli
    cld
    mov %rsi, %r12
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq
    mov $pml4, %edi
    mov $1024, %ecx
    rep stosq
    movq $pdpt + 7, pml4
    movq $pd + 0x0007, pdpt
    movq $pd + 0x1007, pdpt + 8
    movq $pd + 0x2007, pdpt + 16
    movq $pd + 0x3007, pdpt + 24
    mov $pd, %edi
    mov $0x87, %eax
    1:
    stosq
    add $0x200000, %rax
    cmp $pd + 4 * 4096, %edi
    jne 1b
    lgdt gdt_ptr
    mov $pml4, %eax
    mov %rax, %cr3
    mov %cr4, %rax
    or ${cr4_set}, %eax
    mov %rax, %cr4
    mov %cr0, %rax
    or ${cr0_set}, %eax
    mov %rax, %cr0
    pushq ${code64}
    pushq $2f
    lretq                   /* reload CS from our GDT */
    2:
    mov %r12, %rsi
    mov ${boot_linux64}, %edi

    /* EDI = boot protocol, RSI = boot information. */
    common64:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $bsp_stack_top, %esp
    xor %ebp, %ebp
    call {rust_main}
    3:
    cli
    hlt
    jmp 3b

    /* APs land here from the trampoline, in long mode on our page tables. */
    ap_entry64:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xaddl %eax, {next_slot}(%rip)
    cmp ${max_aps}, %eax
    jae 3b                  /* no stack left for this AP: park it */
    mov %eax, %edi
    inc %eax
    shl ${ap_stack_shift}, %eax
    add $ap_stacks, %eax
    mov %rax, %rsp
    xor %ebp, %ebp
    call {ap_main}
    jmp 3b

    /* AP trampoline, copied to TRAMPOLINE_PHYS: the SIPI starts it in real mode with CS =
       TRAMPOLINE_PHYS >> 4 and IP = 0, so everything before the far jump uses offsets from its
       start. */
    .code16
    .global ap_trampoline_start
    ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_ptr - ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl ${code32}, ${tramp} + tramp32 - ap_trampoline_start
    .code32
    tramp32:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %cr4, %eax
    or ${cr4_set}, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov ${efer}, %ecx
    rdmsr
    or ${efer_lme}, %eax
    wrmsr
    mov %cr0, %eax
    or ${cr0_set}, %eax
    mov %eax, %cr0
    ljmp ${code64}, $ap_entry64
    .balign 8
    tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .global ap_trampoline_end
    ap_trampoline_end:

    .code64
    .popsection
    "#,
    code64 = const CODE64,
    data = const DATA,
    code32 = const CODE32,
    cr0_set = const CR0_SET,
    cr4_set = const CR4_SET,
    efer = const EFER_MSR,
    efer_lme = const EFER_LME,
    boot_pvh = const BOOT_PVH,
    boot_linux64 = const BOOT_LINUX64,
    bsp_stack_size = const BSP_STACK_SIZE,
    max_aps = const MAX_APS,
    ap_stack_shift = const AP_STACK_SHIFT,
    tramp = const TRAMPOLINE_PHYS,
    rust_main = sym crate::rust_main,
    ap_main = sym crate::smp::ap_main,
    next_slot = sym crate::smp::AP_NEXT_SLOT,
    options(att_syntax)
);
