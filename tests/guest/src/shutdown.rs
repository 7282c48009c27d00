//! Clean shutdown: powering off through the hardware-reduced ACPI sleep control register, and
//! waiting for Ctrl-Alt-Del on the i8042 keyboard (`guest.action=poweroff`, `ctrl-alt-del`).
//!
//! The keyboard is polled (status port 0x64, data port 0x60) with its interrupt off in the
//! controller's command byte; the bytes are scan code set 1, which the controller translates to.

use crate::cpu;
use crate::report;
use crate::serial::Hex;

/// ember's sleep control register (the FADT's SLEEP_CONTROL_REG, src/arch/x86_64/layout.rs).
const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// SLP_TYPx = 5 (the DSDT's `_S5`) in bits 2-4, SLP_EN (bit 5).
const S5_AND_SLP_EN: u8 = (5 << 2) | (1 << 5);

const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const STATUS_OUTPUT_FULL: u8 = 1;
const CMD_WRITE_CTR: u8 = 0x60;
/// Keyboard enabled, its interrupt off, system flag, translation to set 1.
const CTR_POLLED_TRANSLATED: u8 = 0x44;

/// Ctrl, Alt and Delete pressed, in set 1 (Delete is an extended key).
const CTRL_ALT_DEL: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

/// Writes S5 to the sleep control register; the VMM ends the VM there.
pub fn poweroff() -> ! {
    report!("poweroff=acpi-s5");
    cpu::outb(SLEEP_CONTROL_PORT, S5_AND_SLP_EN);
    report!("poweroff=still-running");
    cpu::halt_forever()
}

/// Enables the keyboard, reports `ctrl-alt-del=ready`, reads scancodes until Ctrl, Alt and
/// Delete have been pressed in that order, reports `ctrl-alt-del=seen` and powers off.
pub fn wait_then_poweroff() -> ! {
    // Flush whatever is there (at most a controller's buffer), then set the command byte.
    for _ in 0..16 {
        if cpu::inb(I8042_STATUS) & STATUS_OUTPUT_FULL == 0 {
            break;
        }
        cpu::inb(I8042_DATA);
    }
    cpu::outb(I8042_STATUS, CMD_WRITE_CTR);
    cpu::outb(I8042_DATA, CTR_POLLED_TRANSLATED);
    report!("ctrl-alt-del=ready");
    let mut matched = 0;
    while matched < CTRL_ALT_DEL.len() {
        if cpu::inb(I8042_STATUS) & STATUS_OUTPUT_FULL == 0 {
            core::hint::spin_loop();
            continue;
        }
        let code = cpu::inb(I8042_DATA);
        matched = if code == CTRL_ALT_DEL[matched] {
            matched + 1
        } else if code == CTRL_ALT_DEL[0] {
            1
        } else {
            report!("ctrl-alt-del.other=", Hex(code.into()));
            0
        };
    }
    report!("ctrl-alt-del=seen");
    poweroff()
}
