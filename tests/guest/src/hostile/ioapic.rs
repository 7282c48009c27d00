//! I/O APIC attacks (ember emulates it: KVM's split irqchip): random IOREGSEL values (any 32
//! bits, registers that do not exist included), IOWIN reads and writes, accesses of 1, 2 and 8
//! bytes and at odd offsets anywhere in its page, and redirection entries programmed with random
//! vectors, destinations, trigger modes and polarities, which ember turns into MSI routes.
//!
//! Like the port I/O, a round is drawn in ring 3 (a [`Plan`]) and carried out in ring 0, with
//! interrupts off, after each burst. What keeps the guest alive whatever it unmasks:
//!
//! - an unmasked entry only ever gets delivery mode fixed or lowest priority: every 4-byte
//!   write but IOREGSEL's with bit 16 (mask) clear has bits 9-10 clear, whatever register the
//!   select left. Masked entries may carry any bits (NMI, INIT, SMI, ExtINT modes included);
//! - writes of 1, 2 or 8 bytes, or of 4 at an odd offset, which a device might decode in any
//!   way (byte lanes, zero extension), come first in the round, while every entry has mode
//!   fixed or lowest priority, and have bits 1-2 of every byte clear, so no byte can set another
//!   mode wherever it lands; only then, with aligned 4-byte writes alone, may masked entries get
//!   any mode;
//! - each round ends with every pin masked again (mode fixed) and checked: a pin that does not
//!   read back as written stops the guest with `guest: hostile ioapic pin=<n> reads <hex>`;
//! - a device interrupt that comes through while a pin was unmasked stays pending in the local
//!   APIC, whose task priority the hostile mode keeps at 0xf0 (`hostile.rs`): no vector is ever
//!   delivered, not even once ring 3 runs with interrupts on, so a vector the IDT has no gate
//!   for cannot fault.

use super::arena::GAP_END;
use super::regs::{load, store};
use super::rng::Rng;
use crate::cpu;
use crate::report;
use crate::serial::{Dec, Hex};

/// The I/O APIC's page starts where the MMIO-gap attacks end.
const BASE: u64 = GAP_END;
const PAGE: u64 = 0x1000;
const IOREGSEL: u16 = 0x00;
const IOWIN: u16 = 0x10;
const PINS: u32 = 24;
/// COM1's line control and interrupt enable registers.
const COM1_LCR: u16 = 0x3fb;
const COM1_IER: u16 = 0x3f9;
const REDIRECTION: u32 = 0x10;
/// Redirection entry (low half) bits: masked; the delivery mode's bits that make it anything
/// but fixed (0) or lowest priority (1); delivery status and remote IRR (read-only).
const MASKED: u32 = 1 << 16;
const MODE_HIGH_BITS: u32 = 0b110 << 8;
const READ_ONLY: u32 = (1 << 12) | (1 << 14);
/// The low-half bits every I/O APIC keeps as written: vector, mode, destination mode,
/// polarity, trigger mode, mask.
const KEPT: u32 = 0x0001_afff;
/// Bits 1-2 of every byte: clear in the data of every access that is not an aligned 4-byte one.
const ODD_CLEAR: u64 = 0x0606_0606_0606_0606;
/// Accesses per plan: the odd part, then the 4-byte part (the masking at the end is extra).
const ODD_OPS: usize = 48;
const PLAN: usize = 112;
/// The most accesses one step draws.
const STEP: usize = 4;
/// Values worth writing through IOWIN.
const VALUES: [u32; 8] = [
    0,
    MASKED,
    0xffff_ffff,
    0x0f00_0000,
    0xff00_0000,
    0x0000_00ff,
    0x0000_a030,
    0x0001_0000 | 0x700,
];

#[derive(Clone, Copy)]
struct Op {
    offset: u16,
    /// Width in bytes (1, 2, 4, 8).
    width: u8,
    write: bool,
    /// An `out` of the low byte of `val` to port `offset` rather than an MMIO access.
    port: bool,
    val: u64,
}

/// I/O APIC accesses drawn in ring 3, carried out in ring 0.
pub struct Plan {
    ops: [Op; PLAN],
    len: usize,
    /// Bits of the low halves written when masking every pin at the end of the round.
    remask: u32,
}

impl Plan {
    pub const fn new() -> Plan {
        let nop = Op {
            offset: IOREGSEL,
            width: 4,
            write: false,
            port: false,
            val: 0,
        };
        Plan {
            ops: [nop; PLAN],
            len: 0,
            remask: MASKED,
        }
    }

    /// Draws a round (ring 3).
    pub fn fill(&mut self, rng: &mut Rng) {
        self.len = 0;
        while self.len + STEP <= ODD_OPS {
            self.step(rng, true);
        }
        while self.len + STEP <= PLAN {
            self.step(rng, false);
        }
        self.remask = safe(rng.u32() | MASKED);
    }

    /// Appends an MMIO access at `offset` in the page.
    fn push(&mut self, offset: u16, width: u8, write: bool, val: u64) {
        self.append(Op {
            offset,
            width,
            write,
            port: false,
            val,
        });
    }

    fn append(&mut self, op: Op) {
        if let Some(slot) = self.ops.get_mut(self.len) {
            *slot = op;
            self.len += 1;
        }
    }

    /// A 4-byte write at IOREGSEL or IOWIN; `exotic`: a masked entry may get any mode.
    fn write32(&mut self, offset: u16, val: u32, exotic: bool) {
        let val = match exotic && val & MASKED != 0 {
            true => val,
            false => safe(val),
        };
        self.push(offset, 4, true, val.into());
    }

    /// One attack of at most [`STEP`] accesses; `odd`: in the odd part of the round.
    fn step(&mut self, rng: &mut Rng, odd: bool) {
        let exotic = !odd;
        match rng.below(100) {
            // A redirection entry programmed as a driver would (high half first, or not).
            0..25 => {
                // Often a pin with a device behind it: COM1's (4), the first virtio slots'.
                let pin = match rng.one_in(2) {
                    true => rng.pick(&[4, 4, 5, 6]),
                    false => rng.below(PINS.into()) as u32,
                };
                let reg = REDIRECTION + 2 * pin;
                // Destination: often this CPU (APIC ID 0) or all of them (0xff, physical).
                let high = match rng.below(4) {
                    0 => rng.u32(),
                    1 => u32::from(rng.u8()) << 24,
                    _ => u32::from(rng.pick(&[0x00u8, 0xff, 0x01, 0x0f])) << 24,
                };
                let low = match rng.below(3) {
                    0 => rng.u32() | MASKED,
                    _ => rng.u32() & !MASKED,
                };
                let low_first = rng.one_in(4);
                for high_half in [!low_first, low_first] {
                    let (reg, val) = match high_half {
                        true => (reg + 1, high),
                        false => (reg, low),
                    };
                    self.push(IOREGSEL, 4, true, reg.into());
                    self.write32(IOWIN, val, exotic);
                }
            }
            // IOREGSEL: a register, one that does not exist, any 32 bits.
            25..40 => {
                let sel = match rng.below(6) {
                    0 => rng.below(3) as u32,
                    1 => REDIRECTION + rng.below(2 * u64::from(PINS)) as u32,
                    2 => 3 + rng.below(13) as u32,
                    3 => 0x40 + rng.below(0xc0) as u32,
                    4 => (REDIRECTION + rng.below(2 * u64::from(PINS)) as u32) | rng.u32() << 8,
                    _ => rng.u32(),
                };
                self.push(IOREGSEL, 4, true, sel.into());
                if rng.one_in(2) {
                    self.push(IOWIN, 4, false, 0);
                }
            }
            // IOWIN, on whatever the last select left.
            40..53 => {
                let val = match rng.one_in(2) {
                    true => rng.pick(&VALUES),
                    false => rng.u32(),
                };
                self.write32(IOWIN, val, exotic);
                if rng.one_in(2) {
                    self.push(IOWIN, 4, false, 0);
                }
            }
            53..63 => {
                let offset = rng.pick(&[IOREGSEL, IOWIN]);
                self.push(offset, 4, false, 0);
            }
            // Reads of any width, anywhere in the page.
            63..73 => {
                let width = rng.width();
                let offset = self.offset(rng, width);
                self.push(offset, width, false, 0);
            }
            // Aligned 4-byte writes at offsets with no register (0x20 and 0x40: later versions'
            // IRQ assertion and EOI registers).
            73..78 => {
                let offset = match rng.one_in(2) {
                    true => rng.pick(&[0x04, 0x08, 0x0c, 0x14, 0x18, 0x1c, 0x20, 0x40]),
                    false => rng.below(PAGE / 4) as u16 * 4,
                };
                self.write32(offset, rng.u32(), exotic);
            }
            // COM1 raises IRQ 4 (enabling its transmitter interrupt asserts it at once): through
            // pin 4 if this round unmasked it.
            78..83 => {
                for (port, val) in [(COM1_LCR, 0x03), (COM1_IER, 0x02), (COM1_IER, 0)] {
                    self.append(Op {
                        offset: port,
                        width: 1,
                        write: true,
                        port: true,
                        val,
                    });
                }
            }
            // Writes of 1, 2 or 8 bytes, or of 4 at an odd offset (only in the odd part).
            _ if odd => {
                let width = rng.pick(&[1, 2, 8, 4]);
                let mut offset = self.offset(rng, width);
                if width == 4 && offset.is_multiple_of(4) {
                    offset = offset.saturating_sub(4) + 1 + rng.below(3) as u16;
                }
                self.push(offset, width, true, rng.next() & !ODD_CLEAR);
            }
            _ => {
                let width = rng.pick(&[1, 2, 8]);
                let offset = self.offset(rng, width);
                self.push(offset, width, false, 0);
            }
        }
    }

    /// An offset for `width` bytes in the page: mostly at or in a register.
    fn offset(&self, rng: &mut Rng, width: u8) -> u16 {
        let offset = match rng.below(4) {
            0 | 1 => rng.pick(&[IOREGSEL, IOWIN]) + rng.below(4) as u16,
            2 => rng.below(0x20) as u16,
            _ => rng.below(PAGE) as u16,
        };
        offset.min((PAGE - u64::from(width)) as u16)
    }

    /// Carries the plan out (ring 0, interrupts off), then masks every pin (mode fixed) and
    /// checks they read back so. Returns the accesses made.
    pub fn run(&mut self) -> u64 {
        for op in &self.ops[..self.len] {
            if op.port {
                cpu::outb(op.offset, op.val as u8);
                continue;
            }
            let addr = BASE + u64::from(op.offset);
            // SAFETY: the I/O APIC's page (below 4 GiB, no RAM); the values keep every unmasked
            // entry's delivery mode fixed or lowest priority (see the module comment).
            unsafe {
                match op.write {
                    true => store(addr, op.width, op.val),
                    false => {
                        load(addr, op.width);
                    }
                }
            }
        }
        let done = core::mem::replace(&mut self.len, 0) as u64;
        done + mask_all(self.remask)
    }
}

/// `val` with a delivery mode of fixed or lowest priority, should it land in a low half.
fn safe(val: u32) -> u32 {
    val & !MODE_HIGH_BITS
}

/// Masks every pin with low half `low` (masked, mode fixed or lowest priority) and reads each
/// back (ring 0). A pin that does not keep it stops the guest. Returns the accesses made.
pub fn mask_all(low: u32) -> u64 {
    let low = safe(low | MASKED) & !READ_ONLY;
    let at = |offset: u16| BASE + u64::from(offset);
    for pin in 0..PINS {
        let reg = REDIRECTION + 2 * pin;
        // SAFETY: IOREGSEL and IOWIN, 4-byte accesses; the entry is masked.
        let back = unsafe {
            store(at(IOREGSEL), 4, reg.into());
            store(at(IOWIN), 4, low.into());
            store(at(IOREGSEL), 4, reg.into());
            load(at(IOWIN), 4) as u32
        };
        if back & KEPT != low & KEPT {
            report!(
                "guest: hostile ioapic pin=",
                Dec(pin.into()),
                " reads ",
                Hex(back.into()),
                " after writing ",
                Hex(low.into())
            );
            cpu::halt_forever();
        }
    }
    4 * u64::from(PINS)
}
