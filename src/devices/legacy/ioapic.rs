//! The I/O APIC, emulated in the VMM: with KVM's split irqchip the local APICs stay in the
//! kernel and the I/O APIC (and no 8259 PIC or PIT) is the VMM's. Tearing down a VM with
//! KVM's full irqchip waits out SRCU grace periods (6-25 ms on nested hosts); the split one
//! costs nothing.
//!
//! The I/O APIC only translates: pin N's redirection entry becomes an MSI route for GSI N, which
//! the VMM hands to KVM, so a device's irqfd on GSI N reaches the vCPU without leaving the kernel.
//! The VMM sees the guest program the table, never an interrupt.
//!
//! Every route is delivered edge-triggered. The lines ember wires (COM1 and the virtio-mmio
//! slots) are ISA edge lines in the MP and ACPI tables; a guest that programs a pin as level
//! still gets its interrupts, and the remote-IRR bit simply never sets.

use std::io;

use super::super::GuestErrors;
use crate::devices::bus::BusDevice;

mod persist;
pub use persist::IoApicState;

/// Pins, and so GSIs, of the I/O APIC.
pub use crate::arch::x86_64::layout::IOAPIC_PINS;
const PINS: usize = IOAPIC_PINS as usize;

/// Index register (8 bits used) and data window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION_TABLE: u32 = 0x10;
const REG_REDIRECTION_END: u32 = REG_REDIRECTION_TABLE + 2 * IOAPIC_PINS as u32;

/// Version 0x11 (the 82093AA's, with no EOI register), highest entry index in bits 16-23.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
const ID_MASK: u32 = 0x0f00_0000;

const ENTRY_VECTOR: u64 = 0xff;
const ENTRY_DELIVERY_MODE_SHIFT: u64 = 8;
const ENTRY_DEST_MODE_LOGICAL: u64 = 1 << 11;
/// Delivery status (bit 12) and remote IRR (bit 14) are read-only.
const ENTRY_READ_ONLY: u64 = (1 << 12) | (1 << 14);
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DEST_SHIFT: u64 = 56;

const DELIVERY_FIXED: u64 = 0;
const DELIVERY_LOWEST_PRIORITY: u64 = 1;
const DELIVERY_NMI: u64 = 4;
const DELIVERY_INIT: u64 = 5;

/// MSI address: the local APICs' window, destination ID in bits 12-19, logical mode in bit 2.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u64 = 12;
const MSI_ADDRESS_DEST_LOGICAL: u64 = 1 << 2;

/// Where an interrupt goes: the address and data of an MSI write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// MSI address (the local APIC window plus destination).
    pub address: u64,
    /// MSI data (vector and delivery mode).
    pub data: u32,
}

/// Each pin's route: `None` while it is masked or programmed with no deliverable mode.
pub type PinRoutes = [Option<MsiMessage>; PINS];

/// Installs the routes of all pins at once; entry N is GSI N's (the VMM's KVM routing table).
pub trait RouteInstaller: Send {
    /// Replaces every pin's route.
    fn install(&mut self, routes: &PinRoutes) -> io::Result<()>;
}

/// The I/O APIC's registers, and the routes they currently install.
pub struct IoApic {
    id: u32,
    select: u32,
    entries: [u64; PINS],
    installed: PinRoutes,
    installer: Box<dyn RouteInstaller>,
    errors: GuestErrors,
}

impl IoApic {
    /// Size of its MMIO window.
    pub const WINDOW: u64 = 0x1000;

    /// An I/O APIC with I/O APIC ID `id` and every pin masked; routes go to `installer`.
    pub fn new(id: u8, installer: Box<dyn RouteInstaller>) -> Self {
        IoApic {
            id: (u32::from(id) << 24) & ID_MASK,
            select: 0,
            entries: [ENTRY_MASKED; PINS],
            installed: [None; PINS],
            installer,
            errors: GuestErrors::default(),
        }
    }

    /// Guest accesses refused (bad sizes, offsets, registers) or routes KVM refused.
    pub fn errors(&self) -> u64 {
        self.errors.count()
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            REG_REDIRECTION_TABLE..REG_REDIRECTION_END => {
                let (pin, high) = Self::entry_half(self.select);
                let entry = self.entries[pin];
                let half = if high { entry >> 32 } else { entry };
                (half & 0xffff_ffff) as u32
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & ID_MASK,
            REG_REDIRECTION_TABLE..REG_REDIRECTION_END => {
                let (pin, high) = Self::entry_half(self.select);
                let (shift, keep) = if high {
                    (32, 0x0000_0000_ffff_ffff)
                } else {
                    (0, 0xffff_ffff_0000_0000 | ENTRY_READ_ONLY)
                };
                let written = (u64::from(value) << shift) & !ENTRY_READ_ONLY;
                self.entries[pin] = (self.entries[pin] & keep) | written;
                self.update_routes();
            }
            REG_VERSION | REG_ARBITRATION => {}
            other => self
                .errors
                .record(|| format!("I/O APIC: write to register {other:#x}, which does not exist")),
        }
    }

    /// The pin of redirection register `select`, and whether it is the entry's high half.
    fn entry_half(select: u32) -> (usize, bool) {
        let index = (select - REG_REDIRECTION_TABLE) as usize;
        (index / 2, index % 2 == 1)
    }

    /// Hands KVM the routes if the guest's write changed any: Linux rewrites masked entries
    /// often, and each change replaces KVM's whole routing table.
    fn update_routes(&mut self) {
        let routes: PinRoutes = std::array::from_fn(|pin| route(self.entries[pin]));
        if routes == self.installed {
            return;
        }
        match self.installer.install(&routes) {
            Ok(()) => self.installed = routes,
            Err(e) => self
                .errors
                .record(|| format!("I/O APIC: KVM refused the interrupt routes: {e}")),
        }
    }
}

/// The MSI a redirection entry sends, if it is unmasked and its delivery mode is one an MSI can
/// carry (not ExtINT, which needs an 8259 ember does not have, nor the reserved modes).
fn route(entry: u64) -> Option<MsiMessage> {
    if entry & ENTRY_MASKED != 0 {
        return None;
    }
    let mode = (entry >> ENTRY_DELIVERY_MODE_SHIFT) & 0x7;
    if !matches!(
        mode,
        DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY | DELIVERY_NMI | DELIVERY_INIT
    ) {
        return None;
    }
    let dest = entry >> ENTRY_DEST_SHIFT;
    let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
    if entry & ENTRY_DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDRESS_DEST_LOGICAL;
    }
    let data = (entry & ENTRY_VECTOR) | (mode << ENTRY_DELIVERY_MODE_SHIFT);
    Some(MsiMessage {
        address,
        data: u32::try_from(data).unwrap_or_default(), // 11 bits
    })
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            self.errors
                .record(|| format!("I/O APIC: {}-byte read at offset {offset:#x}", data.len()));
            data.fill(0);
            return;
        };
        let value = match offset {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        };
        *bytes = value.to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.errors
                .record(|| format!("I/O APIC: {}-byte write at offset {offset:#x}", data.len()));
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => self
                .errors
                .record(|| format!("I/O APIC: write at offset {offset:#x}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Keeps every table it is given; refuses all of them when `fail` is set.
    #[derive(Clone, Default)]
    pub(super) struct Recorder {
        pub(super) tables: Arc<Mutex<Vec<PinRoutes>>>,
        pub(super) fail: bool,
    }

    impl RouteInstaller for Recorder {
        fn install(&mut self, routes: &PinRoutes) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.tables.lock().unwrap().push(*routes);
            Ok(())
        }
    }

    pub(super) fn ioapic() -> (IoApic, Arc<Mutex<Vec<PinRoutes>>>) {
        let recorder = Recorder::default();
        let tables = recorder.tables.clone();
        (IoApic::new(1, Box::new(recorder)), tables)
    }

    pub(super) fn write_reg(ioapic: &mut IoApic, reg: u32, value: u32) {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &mut IoApic, reg: u32) -> u32 {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        let mut data = [0u8; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identification_registers() {
        let (mut ioapic, _) = ioapic();
        assert_eq!(read_reg(&mut ioapic, REG_ID), 1 << 24);
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        write_reg(&mut ioapic, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0x0f00_0000);
        write_reg(&mut ioapic, REG_VERSION, 0);
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
    }

    #[test]
    fn pins_start_masked_with_no_route() {
        let (mut ioapic, tables) = ioapic();
        for pin in 0..u32::from(IOAPIC_PINS) {
            assert_eq!(
                read_reg(&mut ioapic, REG_REDIRECTION_TABLE + 2 * pin),
                1 << 16
            );
        }
        // Rewriting a masked entry changes no route, so KVM is not asked.
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE + 8, 0x1_0030);
        assert!(tables.lock().unwrap().is_empty());
    }

    #[test]
    fn unmasking_a_pin_installs_its_msi_route_and_masking_removes_it() {
        let (mut ioapic, tables) = ioapic();
        // Linux's order: high half (destination APIC 2), then the low half unmasked.
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE + 9, 2 << 24);
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE + 8, 0x0000_0031);
        {
            let tables = tables.lock().unwrap();
            assert_eq!(tables.len(), 1);
            let expected = MsiMessage {
                address: 0xfee0_2000,
                data: 0x31,
            };
            assert_eq!(tables[0][4], Some(expected));
            assert_eq!(tables[0].iter().flatten().count(), 1);
        }
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION_TABLE + 9), 2 << 24);
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE + 8, 0x0001_0031);
        let tables = tables.lock().unwrap();
        assert_eq!(tables.len(), 2);
        assert!(tables[1].iter().all(Option::is_none));
    }

    #[test]
    fn logical_lowest_priority_and_level_entries() {
        // Logical destination 0x0f, lowest priority, level, active low, vector 0x41: level
        // becomes edge (see the module comment), the rest carries over.
        let entry = (0x0f << 56) | (1 << 15) | (1 << 13) | (1 << 11) | (1 << 8) | 0x41;
        let expected = MsiMessage {
            address: 0xfee0_f004,
            data: 0x141,
        };
        assert_eq!(route(entry), Some(expected));
    }

    #[test]
    fn extint_and_reserved_modes_get_no_route() {
        for mode in [2, 3, 6, 7] {
            assert_eq!(route((mode << 8) | 0x30), None, "mode {mode}");
        }
        assert!(route(4 << 8).is_some());
    }

    #[test]
    fn read_only_bits_stay_clear() {
        let (mut ioapic, _) = ioapic();
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION_TABLE), 0xffff_afff);
    }

    #[test]
    fn hostile_accesses_are_counted_and_change_nothing() {
        let (mut ioapic, tables) = ioapic();
        let mut wide = [0xaau8; 8];
        ioapic.read(IOWIN, &mut wide);
        assert_eq!(wide, [0; 8]);
        let mut byte = [0xaau8; 1];
        ioapic.read(IOREGSEL, &mut byte);
        assert_eq!(byte, [0]);
        ioapic.write(IOWIN, &[0x30]);
        ioapic.write(0x20, &0u32.to_le_bytes());
        write_reg(&mut ioapic, 0x7f, 0);
        // The select register keeps 8 bits: 0x110 selects register 0x10.
        write_reg(&mut ioapic, 0x110, 0x30);
        assert_eq!(read_reg(&mut ioapic, REG_REDIRECTION_TABLE), 0x30);
        assert_eq!(read_reg(&mut ioapic, 0xff), 0);
        assert_eq!(ioapic.errors(), 5);
        assert_eq!(tables.lock().unwrap().len(), 1);
    }

    #[test]
    fn refused_routes_are_counted_and_retried_on_the_next_change() {
        let recorder = Recorder {
            fail: true,
            ..Default::default()
        };
        let mut ioapic = IoApic::new(0, Box::new(recorder));
        write_reg(&mut ioapic, REG_REDIRECTION_TABLE, 0x30);
        assert_eq!(ioapic.errors(), 1);
        assert_eq!(ioapic.installed, [None; PINS]);
    }
}
