//! Legacy PC devices: the 8250 UART and the i8042 reset line (wrapping vm-superio), and the
//! I/O APIC of KVM's split irqchip.

pub mod i8042;
pub mod ioapic;
pub mod serial;

pub use i8042::{I8042, I8042State};
pub use ioapic::{IoApic, IoApicState};
pub use serial::{SerialCounters, SerialDevice, SerialState};
