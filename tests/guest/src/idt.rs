//! The interrupt descriptor table: the 32 exception vectors report `guest: panic` and halt (#UD
//! first checks whether it is ring 3 coming back, see user.rs), one vector serves the serial IRQ
//! (echo mode), one the virtio-mmio IRQs, one the LAPIC timer tick, one the ACPI GED's IRQ (a
//! new VM generation ID), one is the LAPIC's spurious
//! vector. Every other vector is not present, so raising it ends up as a reported `#GP`/`#NP`.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::report;
use crate::serial::{Dec, Hex};

/// Vector the I/O APIC delivers COM1's IRQ 4 on.
pub const SERIAL_VECTOR: u8 = 0x30;
/// Vector of every virtio-mmio device's IRQ (the handler polls all of them).
pub const VIRTIO_VECTOR: u8 = 0x31;
/// Vector of the LAPIC timer tick that wakes `hlt` loops waiting with a timeout.
pub const TICK_VECTOR: u8 = 0x32;
/// Vector of the ACPI generic event device's interrupt (a new VM generation ID).
pub const GED_VECTOR: u8 = 0x33;
/// The local APIC's spurious-interrupt vector (needs no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const CODE64: u16 = 0x08;
const INTERRUPT_GATE: u64 = 0x8e; // present, DPL 0, 64-bit interrupt gate (clears IF)

/// 256 gates of 16 bytes; written once by the BSP before any other CPU runs.
static mut IDT: [u64; 512] = [0; 512];

unsafe extern "C" {
    /// Entry stubs of vectors 0..32 (below; user.rs's #UD gate falls back to its entry).
    pub static exception_stubs: [u64; 32];
    fn irq_serial_stub();
    fn irq_virtio_stub();
    fn irq_tick_stub();
    fn irq_ged_stub();
    fn irq_spurious_stub();
}

global_asm!(
    r#"
    .pushsection .text.idt, "ax"
    /* Each stub pushes its vector; the common path passes it and the CPU's frame (which starts
       with an error code for some vectors) to Rust, which never returns. */
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    exception_stub_\v:
    push $\v
    jmp exception_common
    .endr
    exception_common:
    pop %rdi
    mov %rsp, %rsi
    and $-16, %rsp
    cld
    call {exception}
    ud2

    /* Device IRQs: save the caller-saved registers the Rust handler may clobber. With the 40-byte
       frame the CPU pushed on a 16-byte boundary, nine pushes re-align the stack for the call. */
    .macro irq_stub name, handler
    \name:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    cld
    call \handler
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
    .endm
    irq_stub irq_serial_stub, {serial_irq}
    irq_stub irq_virtio_stub, {virtio_irq}
    irq_stub irq_tick_stub, {tick_irq}
    irq_stub irq_ged_stub, {ged_irq}

    irq_spurious_stub:
    iretq
    .popsection

    .pushsection .rodata.idt, "a"
    .balign 8
    exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
    .endr
    .popsection
    "#,
    exception = sym exception,
    serial_irq = sym crate::actions::on_serial_irq,
    virtio_irq = sym crate::virtio::on_irq,
    tick_irq = sym on_tick,
    ged_irq = sym crate::identity::on_ged_irq,
    options(att_syntax)
);

fn set_gate(vector: u8, handler: u64) {
    let low = (handler & 0xffff)
        | (CODE64 as u64) << 16
        | INTERRUPT_GATE << 40
        | (handler >> 16 & 0xffff) << 48;
    let high = handler >> 32;
    let idt = &raw mut IDT;
    // SAFETY: only the BSP writes the IDT, before it enables interrupts or starts APs.
    unsafe {
        (*idt)[2 * vector as usize] = low;
        (*idt)[2 * vector as usize + 1] = high;
    }
}

/// Fills the IDT; the BSP calls it once, first thing.
pub fn init() {
    // SAFETY: `exception_stubs` is an initialized table in `.rodata`.
    let stubs = unsafe { &exception_stubs };
    for (vector, &stub) in stubs.iter().enumerate() {
        set_gate(vector as u8, stub);
    }
    set_gate(SERIAL_VECTOR, irq_serial_stub as *const () as u64);
    set_gate(VIRTIO_VECTOR, irq_virtio_stub as *const () as u64);
    set_gate(TICK_VECTOR, irq_tick_stub as *const () as u64);
    set_gate(GED_VECTOR, irq_ged_stub as *const () as u64);
    set_gate(SPURIOUS_VECTOR, irq_spurious_stub as *const () as u64);
    // #UD is also how ring 3 comes back (user.rs).
    set_gate(6, crate::user::user_ud_entry as *const () as u64);
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: (core::mem::size_of::<[u64; 512]>() - 1) as u16,
        base: &raw const IDT as u64,
    };
    // SAFETY: the IDT is static and its gates point at the stubs above.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

/// LAPIC timer ticks taken so far (`guest.action=timer` reports them).
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// LAPIC timer tick: wakes the CPU from `hlt`, and is counted.
extern "C" fn on_tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    crate::apic::eoi();
}

/// Common exception path: report and halt. `frame` points at the CPU-pushed frame.
extern "C" fn exception(vector: u64, frame: *const u64) -> ! {
    let has_error_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    // SAFETY: the CPU pushed [error code,] RIP, CS, RFLAGS, RSP, SS at `frame`.
    let rip = unsafe { frame.add(has_error_code as usize).read() };
    report!("guest: panic vector=", Dec(vector), " rip=", Hex(rip));
    crate::cpu::halt_forever()
}
