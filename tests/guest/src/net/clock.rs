//! Time for the net driver: the TSC, calibrated once against the PIT (the median of three
//! 15 ms measurements, as blk's bench does). Reading it (`rdtsc`) works in ring 3 too, so the
//! hot loops take their deadlines in TSC ticks.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{cpu, pit};

const RUNS: usize = 3;
const RUN_US: u64 = 15_000;

/// TSC ticks per second (0 until [`calibrate`]).
static HZ: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC rate, once per boot.
pub fn calibrate() {
    if HZ.load(Ordering::Relaxed) != 0 {
        return;
    }
    let mut runs = [0u64; RUNS];
    for run in &mut runs {
        *run = (0..5).find_map(|_| pit::tsc_hz(RUN_US)).unwrap_or(0);
    }
    runs.sort_unstable();
    HZ.store(runs[RUNS / 2].max(1_000_000), Ordering::Relaxed);
}

/// TSC ticks per second.
pub fn hz() -> u64 {
    HZ.load(Ordering::Relaxed).max(1_000_000)
}

/// The TSC now.
pub fn now() -> u64 {
    cpu::rdtsc()
}

/// TSC ticks in `us` microseconds.
pub fn ticks(us: u64) -> u64 {
    us * (hz() / 1_000_000)
}

/// Microseconds in `ticks` TSC ticks.
pub fn us(ticks: u64) -> u64 {
    let hz = hz();
    ticks / hz * 1_000_000 + ticks % hz * 1_000_000 / hz
}
