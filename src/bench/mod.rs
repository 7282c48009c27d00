//! Benchmarking: repeated boots of the `ember` binary and their phases, snapshot restores and
//! creation, and statistics.

pub mod boot;
pub mod memory;
pub mod plot;
pub mod restore;
pub mod stats;
pub mod yardstick;
