//! Delays measured with the i8254 PIT, channel 2 (the one whose output is readable in port 0x61
//! bit 5). Waiting on the PIT costs one port read per poll instead of a long calibrated loop,
//! which matters when the guest's instructions are emulated.

use crate::cpu::{self, inb, outb};

const PIT_HZ: u64 = 1_193_182;
const CHANNEL2: u16 = 0x42;
const COMMAND: u16 = 0x43;
const PORT_B: u16 = 0x61;
/// Channel 2, low then high byte, mode 0 (interrupt on terminal count), binary.
const CMD_CH2_ONESHOT: u8 = 0xb0;
/// Channel 2, latch the count (then read low, high byte).
const CMD_CH2_LATCH: u8 = 0x80;
const PORT_B_GATE2: u8 = 0x01;
const PORT_B_SPEAKER: u8 = 0x02;
const PORT_B_OUT2: u8 = 0x20;
/// Longest single countdown, in microseconds (65535 ticks is ~54.9 ms).
const MAX_CHUNK_US: u64 = 50_000;

/// Starts a one-shot countdown of `us` microseconds (at most [`MAX_CHUNK_US`]).
fn start(us: u64) {
    let ticks = (us * PIT_HZ / 1_000_000).clamp(1, 0xffff) as u16;
    outb(PORT_B, (inb(PORT_B) & !PORT_B_SPEAKER) | PORT_B_GATE2);
    outb(COMMAND, CMD_CH2_ONESHOT);
    let [lo, hi] = ticks.to_le_bytes();
    outb(CHANNEL2, lo);
    outb(CHANNEL2, hi); // counting starts here; OUT2 rises at zero
}

fn expired() -> bool {
    inb(PORT_B) & PORT_B_OUT2 != 0
}

/// Waits until `done()` holds or `us` microseconds have passed; returns `done()`'s last value.
pub fn wait_until(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let mut left = us;
    while left > 0 {
        let chunk = left.min(MAX_CHUNK_US);
        start(chunk);
        while !expired() {
            if done() {
                return true;
            }
        }
        left -= chunk;
    }
    done()
}

/// Like [`wait_until`], but halts between polls: `done()` is checked with interrupts off, then
/// `sti; hlt` waits for the next interrupt, so the caller needs an interrupt source that fires
/// while the PIT counts (channel 2 raises none), e.g. the LAPIC tick. Returns with interrupts off.
pub fn wait_halting(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let mut left = us;
    while left > 0 {
        let chunk = left.min(MAX_CHUNK_US);
        start(chunk);
        loop {
            cpu::disable_interrupts();
            if done() {
                return true;
            }
            if expired() {
                break;
            }
            cpu::wait_for_interrupt();
        }
        left -= chunk;
    }
    cpu::disable_interrupts();
    done()
}

/// Channel 2's count, with the TSC just before and just after reading it.
fn sample() -> (u64, u16, u64) {
    let before = cpu::rdtsc();
    outb(COMMAND, CMD_CH2_LATCH);
    let lo = inb(CHANNEL2);
    let hi = inb(CHANNEL2);
    (before, u16::from_le_bytes([lo, hi]), cpu::rdtsc())
}

/// The quickest of three [`sample`]s, as (TSC at its middle, count).
fn best_sample() -> (u64, u16) {
    let (mut best, mut took) = ((0, 0), u64::MAX);
    for _ in 0..3 {
        let (before, count, after) = sample();
        if after - before < took {
            (best, took) = ((before + (after - before) / 2, count), after - before);
        }
    }
    best
}

/// TSC ticks per second over about `us` microseconds (at most 40 ms) of channel 2: the TSC and
/// the count are sampled together at both ends, so a vCPU descheduled in between costs nothing.
/// `None` if the count wrapped (the vCPU was away for more than the countdown's slack).
pub fn tsc_hz(us: u64) -> Option<u64> {
    let span = (us.min(40_000) * PIT_HZ / 1_000_000).max(1);
    start(MAX_CHUNK_US);
    let (t0, c0) = best_sample();
    while c0.wrapping_sub(sample().1) < span as u16 {}
    let (t1, c1) = best_sample();
    let ticks = c0.checked_sub(c1)? as u64;
    (ticks >= span).then(|| (t1 - t0) * PIT_HZ / ticks)
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    wait_until(us, || false);
}
