//! Time for the net driver: the TSC, whose rate kvm-clock states (`crate::clock`). Reading it
//! (`rdtsc`) works in ring 3 too, so the hot loops take their deadlines in TSC ticks.

use crate::{clock, cpu};

/// Learns the TSC rate, once per boot.
pub fn calibrate() {
    clock::tsc_hz();
}

/// TSC ticks per second.
pub fn hz() -> u64 {
    clock::tsc_hz()
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
