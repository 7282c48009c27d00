//! Thin wrappers over the privileged instructions the guest uses: port I/O, 32-bit MMIO through
//! the identity map, and the ways of stopping a CPU.
//!
//! Every physical address below 4 GiB is identity mapped (see `entry.rs`), so a physical address
//! is also a valid pointer.

use core::arch::asm;

/// `outb`: writes `val` to I/O port `port`.
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the guest owns every device.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// `inb`: reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags))
    }
    val
}

/// 32-bit load from guest-physical `addr` (must be below 4 GiB to be mapped).
///
/// # Safety
/// `addr` must be 4-byte aligned and either RAM the guest does not otherwise use or a device
/// register whose read side effects the caller wants.
pub unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees the address; volatile because it may be a device register.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// 32-bit store to guest-physical `addr` (must be below 4 GiB to be mapped).
///
/// # Safety
/// As for [`read32`]; the store must not overwrite anything the guest still uses.
pub unsafe fn write32(addr: u64, val: u32) {
    // SAFETY: the caller guarantees the address; volatile because it may be a device register.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// Stops this CPU for good: interrupts off, then `hlt` (a NMI or SMI would just halt again).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Waits for the next interrupt with interrupts enabled. `sti` delays interrupt recognition by one
/// instruction, so no interrupt can slip in between the two and be missed until the next one.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT handles every vector that can be delivered (see idt.rs).
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}

/// Masks interrupts (`cli`).
pub fn disable_interrupts() {
    // SAFETY: only changes IF.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Resets the machine through the i8042 keyboard controller (pulses the CPU reset line).
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    halt_forever()
}

/// Loads an empty IDT and raises `#UD`: the CPU cannot deliver it, nor the `#GP` and `#DF` that
/// follow, so it shuts down (a triple fault), which KVM reports as `KVM_EXIT_SHUTDOWN`.
/// (`ud2` rather than `int3`: KVM's emulator, which runs this code under PVM, cannot emulate a
/// protected-mode `int3`, whereas `ud2` just makes it inject `#UD`.)
pub fn triple_fault() -> ! {
    let empty: [u16; 5] = [0; 5]; // limit 0, base 0
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &empty, options(nostack)) }
    halt_forever()
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the TSC into EDX:EAX.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// Writes model-specific register `msr`.
///
/// # Safety
///
/// `msr` must exist and `value` be one it accepts without breaking what the guest relies on.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    let (lo, hi) = (value as u32, (value >> 32) as u32);
    // SAFETY: the caller vouches for the register and the value.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nostack)) };
}
