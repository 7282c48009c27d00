//! Devices with no hardware counterpart, for measuring boots.

pub mod boot_timer;
pub mod debug_port;

pub use boot_timer::BootTimer;
pub use debug_port::DebugPort;
