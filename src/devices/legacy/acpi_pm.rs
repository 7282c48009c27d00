//! The hardware-reduced ACPI sleep registers (ACPI 6.x, 4.8.3.7-8): the FADT's
//! `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG`, one byte each, on two I/O ports. Writing
//! `SLP_EN` with the `_S5` sleep type powers the machine off; every other sleep state is
//! ignored (ember has no suspend), so the guest keeps running and sees no wake status.

use crate::devices::bus::BusDevice;

/// The sleep type `_S5` in the DSDT announces, which the guest writes into `SLP_TYPx`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_TYPx`: bits 2-4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// `SLP_EN`: bit 5 of the sleep control register; the transition happens on this write.
const SLP_EN: u8 = 1 << 5;

/// Offset of the sleep control register from the device's first port.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;

/// The sleep control and status registers on ports `base` and `base + 1`.
pub struct AcpiPm {
    on_poweroff: Box<dyn Fn() + Send>,
}

impl AcpiPm {
    /// Number of ports: control, then status.
    pub const PORT_RANGE: u64 = 2;

    /// Registers that call `on_poweroff` when the guest enters S5.
    pub fn new(on_poweroff: impl Fn() + Send + 'static) -> Self {
        AcpiPm {
            on_poweroff: Box::new(on_poweroff),
        }
    }
}

impl BusDevice for AcpiPm {
    /// Both registers read 0: no wake status (the guest never sleeps), nothing pending.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only byte writes to the control register mean anything; the status register's
        // write-1-to-clear WAK_STS has nothing to clear.
        let (SLEEP_CONTROL_OFFSET, [value]) = (offset, data) else {
            return;
        };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN == 0 {
            return;
        }
        if sleep_type == S5_SLEEP_TYPE {
            (self.on_poweroff)();
        } else {
            log::debug!("acpi: ignoring a request for sleep type {sleep_type}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counted() -> (AcpiPm, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let counter = count.clone();
        let dev = AcpiPm::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        (dev, count)
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off() {
        let (mut dev, poweroffs) = counted();
        // What Linux's acpi_hw_extended_sleep() writes for S5: type 5 in bits 2-4, SLP_EN.
        dev.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | (1 << 5)]);
        assert_eq!(poweroffs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn other_writes_do_not_power_off() {
        let (mut dev, poweroffs) = counted();
        dev.write(SLEEP_CONTROL_OFFSET, &[5 << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | (1 << 5)]); // S3
        dev.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | (1 << 5), 0]); // not a byte access
        dev.write(SLEEP_STATUS_OFFSET, &[(5 << 2) | (1 << 5)]); // the status register
        dev.write(SLEEP_STATUS_OFFSET, &[0x80]); // clearing WAK_STS
        assert_eq!(poweroffs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn registers_read_zero() {
        let (mut dev, _) = counted();
        for offset in [SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET] {
            let mut byte = [0xff];
            dev.read(offset, &mut byte);
            assert_eq!(byte, [0]);
        }
    }
}
