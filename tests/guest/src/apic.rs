//! The local APIC (xAPIC MMIO at 0xfee00000) and the I/O APIC (0xfec00000): enough to send
//! INIT/SIPI, acknowledge or hold back interrupts, and route one I/O APIC pin to the BSP.

use crate::cpu::{read32, write32};

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_DIVIDE_16: u32 = 0x3;
/// Tick period in timer counts: 16 ms at KVM's 1 GHz APIC bus after the divide by 16. Only a
/// wake-up for `hlt` loops that measure time with the PIT, so the exact rate does not matter.
const TICK_COUNT: u32 = 1_000_000;
/// Bounds the wait for a previous IPI to be accepted (KVM accepts them at once).
const ICR_SPINS: u32 = 1000;

const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WIN: u64 = 0x10;
const IOAPIC_REDTBL: u32 = 0x10;
/// Redirection entry bit 16: masked.
const REDIR_MASKED: u32 = 1 << 16;

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: an xAPIC register, mapped by the identity map; reads have no side effects.
    unsafe { read32(LAPIC + reg) }
}

fn lapic_write(reg: u64, val: u32) {
    // SAFETY: an xAPIC register, mapped by the identity map.
    unsafe { write32(LAPIC + reg, val) }
}

/// This CPU's APIC id.
pub fn id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// Software-enables this CPU's local APIC, with `spurious` as the spurious-interrupt vector.
pub fn enable(spurious: u8) {
    lapic_write(LAPIC_SVR, SVR_ENABLE | spurious as u32);
}

/// Sets this CPU's task priority: its local APIC holds back (leaves pending) every interrupt
/// whose priority class (vector >> 4) is not above `priority >> 4`, so 0xf0 holds back all of
/// them (NMI, INIT and SMI aside, which have no vector).
pub fn set_task_priority(priority: u8) {
    lapic_write(LAPIC_TPR, priority.into());
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// Starts the LAPIC timer in periodic mode on `vector`: a regular wake-up from `hlt`.
pub fn start_tick(vector: u8) {
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | vector as u32);
    lapic_write(LAPIC_TIMER_INITIAL, TICK_COUNT); // writing the count starts the timer
}

/// Stops and masks the LAPIC timer.
pub fn stop_tick() {
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
}

fn send_ipi(dest: u8, icr_low: u32) {
    let mut spins = 0;
    while lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 && spins < ICR_SPINS {
        spins += 1;
    }
    lapic_write(LAPIC_ICR_HIGH, (dest as u32) << 24);
    lapic_write(LAPIC_ICR_LOW, icr_low); // writing the low half sends it
}

/// Sends INIT (level assert) to the CPU with APIC id `dest`.
pub fn send_init(dest: u8) {
    send_ipi(dest, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a STARTUP IPI: `dest` starts in real mode at `page << 12`.
pub fn send_startup(dest: u8, page: u8) {
    send_ipi(dest, ICR_STARTUP | ICR_LEVEL_ASSERT | page as u32);
}

fn ioapic_write(reg: u32, val: u32) {
    // SAFETY: IOREGSEL/IOWIN of the I/O APIC, mapped by the identity map; only the BSP uses them.
    unsafe {
        write32(IOAPIC + IOAPIC_REGSEL, reg);
        write32(IOAPIC + IOAPIC_WIN, val);
    }
}

/// Routes I/O APIC `pin` to `vector` on the CPU with APIC id `dest`: fixed delivery, physical
/// destination, active high, edge triggered, unmasked.
pub fn route_irq(pin: u8, vector: u8, dest: u8) {
    let reg = IOAPIC_REDTBL + 2 * pin as u32;
    ioapic_write(reg, REDIR_MASKED); // keep it masked while the halves disagree
    ioapic_write(reg + 1, (dest as u32) << 24);
    ioapic_write(reg, vector as u32);
}
