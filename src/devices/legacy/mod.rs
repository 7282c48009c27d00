//! Legacy PC devices: the 8250 UART (wrapping vm-superio), the i8042 keyboard controller, the
//! hardware-reduced ACPI sleep registers, and the I/O APIC of KVM's split irqchip.

pub mod acpi_pm;
pub mod i8042;
pub mod ioapic;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use i8042::{I8042, I8042State};
pub use ioapic::{IoApic, IoApicState};
pub use serial::{SerialCounters, SerialDevice, SerialState};
