//! Time from the TSC, whose rate kvm-clock states exactly: the guest registers a pvclock page
//! with one MSR write and reads the TSC-to-nanoseconds scale KVM keeps in it. No timer device and
//! no calibration loop (ember has no PIT), and `rdtsc` costs no exit.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;

/// kvm-clock's "new" system-time MSR: the physical address of a pvclock page, bit 0 enabling it.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// KVM's `pvclock_vcpu_time_info`: nanoseconds = ((tsc - tsc_timestamp) << or >> tsc_shift) *
/// tsc_to_system_mul >> 32.
#[repr(C, align(64))]
struct PvclockInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// The page KVM writes; only read through volatile reads.
static mut PVCLOCK: PvclockInfo = PvclockInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// TSC ticks per second (0 until [`tsc_hz`] first runs).
static HZ: AtomicU64 = AtomicU64::new(0);

/// The TSC's rate in Hz, from kvm-clock (asked of KVM once per boot).
pub fn tsc_hz() -> u64 {
    let hz = HZ.load(Ordering::Relaxed);
    if hz != 0 {
        return hz;
    }
    let page = &raw mut PVCLOCK;
    // SAFETY: the MSR is kvm-clock's (KVM advertises it on every host ember runs on), and the
    // address is this static's: identity-mapped, so its virtual address is its physical one.
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, page as u64 | 1) };
    let (mul, shift) = loop {
        // SAFETY: `page` is a valid static; KVM updates it under the odd/even version protocol,
        // so a read between two equal even versions is consistent.
        let (before, mul, shift, after) = unsafe {
            let before = (&raw const (*page).version).read_volatile();
            let mul = (&raw const (*page).tsc_to_system_mul).read_volatile();
            let shift = (&raw const (*page).tsc_shift).read_volatile();
            (
                before,
                mul,
                shift,
                (&raw const (*page).version).read_volatile(),
            )
        };
        if before == after && before % 2 == 0 && mul != 0 {
            break (mul, shift);
        }
    };
    // Hz = 1e9 * 2^32 / (mul * 2^shift).
    let scaled = 1_000_000_000u128 << 32;
    let hz = if shift >= 0 {
        scaled / ((mul as u128) << shift)
    } else {
        (scaled << -shift) / mul as u128
    };
    let hz = (hz as u64).max(1_000_000);
    HZ.store(hz, Ordering::Relaxed);
    hz
}

/// The TSC value `us` microseconds from now.
fn deadline(us: u64) -> u64 {
    let ticks = (us as u128 * tsc_hz() as u128 / 1_000_000) as u64;
    cpu::rdtsc().saturating_add(ticks)
}

/// Waits until `done()` holds or `us` microseconds have passed; returns `done()`'s last value.
pub fn wait_until(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let end = deadline(us);
    while cpu::rdtsc() < end {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Like [`wait_until`], but halts between polls: `done()` is checked with interrupts off, then
/// `sti; hlt` waits for the next interrupt, so the caller needs an interrupt source that fires
/// while it waits, e.g. the LAPIC tick. Returns with interrupts off.
pub fn wait_halting(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let end = deadline(us);
    loop {
        cpu::disable_interrupts();
        if done() {
            return true;
        }
        if cpu::rdtsc() >= end {
            return false;
        }
        cpu::wait_for_interrupt();
    }
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    wait_until(us, || false);
}
