//! Devices with no hardware counterpart: for measuring boots, and the VM generation ID.

pub mod boot_timer;
pub mod debug_port;
pub mod vmgenid;

pub use boot_timer::BootTimer;
pub use debug_port::DebugPort;
pub use vmgenid::VmGenId;
