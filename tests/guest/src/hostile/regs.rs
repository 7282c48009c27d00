//! MMIO register attacks: random reads and writes of 1, 2, 4 and 8 bytes, aligned or not, on
//! the virtio-mmio windows (known registers, config space, anything in the 4 KiB), the boot
//! timer page and the rest of the MMIO gap below the I/O APIC. Runs in ring 3.
//!
//! One rule keeps the guest alive: a write that could set a queue address (QueueDesc,
//! QueueDriver, QueueDevice) gets a low half from [`Arena::ring_addr`]; with no RAM above 4 GiB
//! any high half is then harmless.

use core::arch::asm;

use super::arena::{Arena, GAP, GAP_END};
use super::rng::Rng;

pub const WINDOW: u64 = 0x1000;
/// Virtio-mmio register offsets, and the queue address registers' span.
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const STATUS: u64 = 0x070;
const QUEUE_ADDRS: (u64, u64) = (0x080, 0x0a8);
const REGISTERS: [u64; 26] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0fc, 0x100,
];
/// Values worth writing: small numbers (queue indices, selectors), every status bit pattern a
/// driver sets, all ones.
const VALUES: [u64; 16] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    11,
    15,
    0x40,
    0x80,
    0xff,
    256,
    0x8000,
    0xffff,
    u64::MAX,
];

/// Loads `width` bytes at `addr` (any alignment).
///
/// # Safety
/// `addr` must be below 4 GiB (identity mapped) and not RAM the guest uses.
pub unsafe fn load(addr: u64, width: u8) -> u64 {
    let val: u64;
    // SAFETY: per the caller; `mov` takes any alignment.
    unsafe {
        match width {
            1 => {
                asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) val, options(nostack))
            }
            2 => {
                asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) val, options(nostack))
            }
            4 => {
                asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) val, options(nostack))
            }
            _ => {
                asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) val, options(nostack))
            }
        }
    }
    val
}

/// Stores the low `width` bytes of `val` at `addr` (any alignment).
///
/// # Safety
/// As for [`load`], and the store must not make a device write guest memory outside the area.
pub unsafe fn store(addr: u64, width: u8, val: u64) {
    // SAFETY: per the caller; `mov` takes any alignment.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) val, options(nostack))
            }
            2 => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) val, options(nostack))
            }
            4 => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) val, options(nostack))
            }
            _ => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) val, options(nostack))
            }
        }
    }
}

/// A 32-bit register write to a virtio window; queue addresses made safe.
pub fn write32(arena: &Arena, base: u64, offset: u64, val: u32) {
    let val = match offset {
        0x080 | 0x090 | 0x0a0 => arena.ring_addr(val.into(), offset == 0x080) as u32,
        _ => val,
    };
    // SAFETY: a register of a virtio window (below 4 GiB); queue addresses are made safe.
    unsafe { store(base + offset, 4, val.into()) }
}

pub fn read32(base: u64, offset: u64) -> u32 {
    // SAFETY: a register of a virtio window, below 4 GiB.
    unsafe { load(base + offset, 4) as u32 }
}

/// One random access to the window at `base`.
pub fn window(rng: &mut Rng, arena: &Arena, base: u64) {
    let offset = match rng.below(20) {
        0..12 => rng.pick(&REGISTERS),
        12..15 => 0x100 + rng.below(0x100),
        15..17 => rng.pick(&REGISTERS) + 1 + rng.below(3),
        _ => rng.below(WINDOW),
    };
    let width = match rng.one_in(2) {
        true => 4,
        false => rng.width(),
    };
    access(rng, arena, base, offset.min(WINDOW - 1), width);
}

/// One random access to the boot timer page (writes of 123 at offset 0 included).
pub fn boot_timer(rng: &mut Rng, arena: &Arena) {
    if rng.one_in(4) {
        // SAFETY: the boot timer's register, in the MMIO gap.
        unsafe { store(GAP, rng.width(), 123) };
        return;
    }
    let offset = match rng.one_in(2) {
        true => 0,
        false => rng.below(WINDOW),
    };
    let width = rng.width();
    access(rng, arena, GAP, offset, width);
}

/// One random access anywhere in the MMIO gap below the I/O APIC (virtio windows included).
pub fn gap(rng: &mut Rng, arena: &Arena) {
    let addr = match rng.one_in(2) {
        true => GAP + rng.below(0x10_0000),
        false => GAP + rng.below(GAP_END - GAP - 8),
    };
    let base = addr & !(WINDOW - 1);
    let width = rng.width();
    access(rng, arena, base, addr - base, width);
}

/// A read or a write of `width` bytes at `base + offset` (in the MMIO gap, below the I/O APIC).
fn access(rng: &mut Rng, arena: &Arena, base: u64, offset: u64, width: u8) {
    let addr = base + offset;
    if rng.one_in(2) {
        // SAFETY: in the MMIO gap, below the I/O APIC.
        unsafe { load(addr, width) };
        return;
    }
    let val = match rng.one_in(2) {
        true => rng.pick(&VALUES),
        false => rng.next(),
    };
    let (lo, hi) = QUEUE_ADDRS;
    if offset < hi && offset + u64::from(width) > lo {
        // Might set part of a queue address: only as an aligned 32-bit write, made safe.
        write32(arena, base, offset & !3, val as u32);
    } else {
        // SAFETY: in the MMIO gap, below the I/O APIC; no queue address register.
        unsafe { store(addr, width, val) }
    }
}
