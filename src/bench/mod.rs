//! Boot benchmarking: repeated runs of the `ember` binary, their phases, and statistics.

pub mod boot;
pub mod memory;
pub mod plot;
pub mod stats;
pub mod yardstick;
