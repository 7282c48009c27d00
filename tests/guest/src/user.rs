//! Ring 3: [`run`] calls a function in user mode and returns its result. On PVM hosts (nested KVM
//! without VT-x) every ring-0 instruction of this guest goes through KVM's instruction emulator
//! (about 1-2 M per second), but ring-3 code runs natively, so a hot loop that needs no privileged
//! instruction (the block benchmark's request loop) belongs in ring 3.
//!
//! Way in: `iretq` to a trampoline on the user stack with CS/SS = the GDT's DPL-3 segments and IF
//! set. Way out: the trampoline's `ud2`; the #UD gate recognises it (ring 3, that address), drops
//! the frame and restores the kernel state saved on the way in. Interrupts and exceptions taken in
//! ring 3 land on the kernel stack just below [`run`]'s frame (the TSS's RSP0) and go through the
//! usual IDT stubs: an IRQ `iretq`s back to ring 3, an exception prints `guest: panic vector=<n>
//! rip=<hex>` and halts.
//!
//! Why an exception rather than `syscall` or `int`: on PVM hosts, exceptions raised in ring 3 are
//! delivered through the guest's IDT like on hardware, whereas `int 0x80` (DPL-3 gate) arrives as
//! `#UD` (KVM's emulator has no protected-mode `int`), and `syscall` jumps to LSTAR with CS = 0x08
//! but apparently leaves the vCPU at CPL 3 (the next `in` or DS load raises #GP). `ud2` behaves
//! the same on hardware KVM.
//!
//! Ring-3 code may use RAM and MMIO (every page is user-accessible, see entry.rs) and `rdtsc`
//! (CR4.TSD clear), but no privileged instruction: no port I/O (no I/O bitmap, IOPL 0), so no
//! `report!`, no `cli`/`sti`/`hlt`. Only the BSP uses ring 3, and [`run`] is not reentrant.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::entry::{TSS_SELECTOR, USER_CODE64, USER_DATA};

const CR4_TSD: u64 = 1 << 2;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
/// RFLAGS in ring 3: IF and the always-one bit 1. Interrupts stay on in user mode, so a stray IRQ
/// is handled and ring 3 resumes; callers keep devices quiet rather than pay for the (emulated)
/// handlers.
const USER_RFLAGS: u64 = 0x202;
const USER_STACK_SIZE: usize = 16 * 1024;
/// Kernel data selector, reloaded into DS/ES/SS on the way back (the way in clears DS/ES, the
/// event delivery from ring 3 loads a null SS).
const KERNEL_DATA: u16 = 0x10;
/// 64-bit available-TSS descriptor type, present, DPL 0.
const TSS_TYPE: u64 = 0x89;
const UD_VECTOR: usize = 6;

/// The 64-bit TSS: only RSP0 (written by `user_enter` on every entry) and the I/O map base (the
/// TSS's size: no bitmap, so port I/O from ring 3 faults) are used.
#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp0: u64,
    _rsp12: [u64; 2],
    _reserved1: u64,
    _ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

const TSS_SIZE: u64 = core::mem::size_of::<Tss>() as u64;

static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp0: 0,
    _rsp12: [0; 2],
    _reserved1: 0,
    _ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: TSS_SIZE as u16,
};
/// Kernel RSP inside `user_enter` (below its saved registers), restored on the way back.
static mut KERNEL_RSP: u64 = 0;
/// TSS loaded and CR4 checked on this boot (`.bss` is zeroed on each entry).
static READY: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    /// The TSS slot of entry.rs's GDT (16 bytes at [`TSS_SELECTOR`]).
    static mut gdt_tss: [u64; 2];
    /// Runs `f(arg)` in ring 3; returns its result with interrupts off.
    fn user_enter(f: extern "C" fn(u64) -> u64, arg: u64) -> u64;
    /// The #UD handler (idt.rs installs it): ring 3's way back, else the usual exception path.
    pub fn user_ud_entry();
}

global_asm!(
    r#"
    .pushsection .boot_bss, "aw", @nobits
    .balign 16
    user_stack: .skip {stack_size}
    user_stack_top:
    .popsection

    .pushsection .text.user, "ax"
    /* RDI = f, RSI = arg (C ABI). The callee-saved registers wait on the kernel stack; RSP0
       points just below them. */
    user_enter:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, {kernel_rsp}(%rip)
    mov %rsp, {tss}+4(%rip)
    xor %eax, %eax          /* DS/ES with DPL 0 are not for ring 3 */
    mov %eax, %ds
    mov %eax, %es
    lea user_stack_top(%rip), %rax
    pushq ${user_data}
    push %rax
    pushq ${rflags}
    pushq ${user_code}
    lea user_start(%rip), %rax
    push %rax
    iretq

    /* Ring 3, on the user stack (16-byte aligned, as the call needs). */
    user_start:
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax
    mov %rax, %rdi
    user_exit:
    ud2                     /* back to ring 0 through the #UD gate, RDI = result */

    /* The #UD gate (interrupt gate: IF off). Frame: RIP, CS, RFLAGS, RSP, SS. From user_exit in
       ring 3 it sits at RSP0 and is dropped; any other #UD takes the usual exception path. */
    .global user_ud_entry
    user_ud_entry:
    testb $3, 8(%rsp)
    jz 1f
    push %rax
    lea user_exit(%rip), %rax
    cmp %rax, 8(%rsp)
    pop %rax
    jne 1f
    mov ${kernel_data}, %eax
    mov %eax, %ss
    mov {kernel_rsp}(%rip), %rsp
    mov %eax, %ds
    mov %eax, %es
    mov %rdi, %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    1:
    jmp *{stubs}+{ud_vector}*8(%rip)
    .popsection
    "#,
    stack_size = const USER_STACK_SIZE,
    kernel_rsp = sym KERNEL_RSP,
    tss = sym TSS,
    user_data = const USER_DATA,
    user_code = const USER_CODE64,
    rflags = const USER_RFLAGS,
    kernel_data = const KERNEL_DATA,
    stubs = sym crate::idt::exception_stubs,
    ud_vector = const UD_VECTOR,
    options(att_syntax)
);

/// Loads the TSS and makes sure CR4 lets ring 3 run `rdtsc` and ring 0 touch user pages (no
/// TSD, SMEP, SMAP).
fn init() {
    let base = &raw const TSS as u64;
    let limit = TSS_SIZE - 1;
    let slot = &raw mut gdt_tss;
    // SAFETY: the BSP, before any ring-3 entry, rewrites its own GDT's TSS slot (a reset leaves
    // it marked busy, which `ltr` would refuse) and loads it; CR4 keeps its other bits.
    unsafe {
        (*slot)[0] = limit
            | (base & 0xff_ffff) << 16
            | TSS_TYPE << 40
            | (limit >> 16 & 0xf) << 48
            | (base >> 24 & 0xff) << 56;
        (*slot)[1] = base >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
        let clear = CR4_TSD | CR4_SMEP | CR4_SMAP;
        if cr4 & clear != 0 {
            asm!("mov cr4, {}", in(reg) cr4 & !clear, options(nostack, preserves_flags));
        }
    }
}

/// Runs `f(arg)` in ring 3 on the user stack and returns its result. Call it on the BSP with
/// interrupts off; it returns with interrupts off (they are on while `f` runs).
pub fn run(f: extern "C" fn(u64) -> u64, arg: u64) -> u64 {
    if !READY.load(Ordering::Relaxed) {
        init();
        READY.store(true, Ordering::Relaxed);
    }
    // SAFETY: the TSS and the #UD gate are set up; `user_enter` follows the C ABI and comes back
    // through `user_ud_entry` with the callee-saved registers and the kernel stack restored.
    unsafe { user_enter(f, arg) }
}

/// `n` iterations of a two-instruction loop; returns the TSC ticks they took.
extern "C" fn spin(n: u64) -> u64 {
    let start = crate::cpu::rdtsc();
    // SAFETY: only counts a register down.
    unsafe { asm!("2:", "dec {0}", "jnz 2b", inout(reg) n.max(1) => _, options(nomem, nostack)) }
    crate::cpu::rdtsc() - start
}

/// TSC ticks of the same `n`-iteration loop in ring 0 and in ring 3: on PVM hosts the first is
/// emulated, the second native.
pub fn spin_ticks(n: u64) -> (u64, u64) {
    (spin(n), run(spin, n))
}
