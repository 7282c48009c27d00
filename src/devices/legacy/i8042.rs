//! The i8042 keyboard controller with a PS/2 keyboard behind it, as far as Linux's i8042 and
//! atkbd drivers need: the controller's status, command and data ports, its command byte (CTR),
//! self and interface tests, and a keyboard that answers the atkbd probe. The keyboard has no
//! keys except [`I8042::trigger_ctrl_alt_del`], which is how the VMM asks a guest to shut down
//! (as Firecracker's `SendCtrlAltDel` does). There is no mouse (AUX) port. Command 0xFE on port
//! 0x64 pulses the reset line (`reboot=k`).
//!
//! Keyboard bytes raise IRQ 1 (edge) through `irq` while the CTR enables the keyboard interrupt;
//! controller replies do not (Linux polls for them).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
const STATUS_NOT_INHIBITED: u8 = 1 << 4;

/// CTR bits.
const CTR_KBD_INT: u8 = 1 << 0;
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;
/// After "POST": keyboard interrupt on, system flag, translation to set 1, no AUX.
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
/// AUX interface test: "clock line stuck low", so drivers conclude there is no mouse port.
const AUX_ABSENT: u8 = 0x01;
/// Output port: reset line high (not in reset), A20 enabled.
const OUTPUT_PORT: u8 = 0x03;

/// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_REPEAT: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// MF2 keyboard ID; the second byte as the controller's translation reports it, or raw.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];
const KBD_SCAN_SET_2: u8 = 0x02;

/// Ctrl, Alt, Delete pressed, then released, in scan code set 2 (what the keyboard sends)...
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// ...and in set 1 (what Linux reads when the controller translates).
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Most keyboard bytes waiting for the guest: each guest write queues at most three, and one
/// Ctrl-Alt-Del eleven; past this the guest is not reading and more bytes are dropped.
const MAX_QUEUED: usize = 32;

/// The i8042 on ports 0x60-0x64.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
    irq: EventFd,
    ctr: u8,
    /// The byte the guest reads next from port 0x60, if any.
    output: Option<u8>,
    /// Controller replies, ahead of keyboard bytes.
    replies: VecDeque<u8>,
    /// Bytes from the keyboard: answers to keyboard commands, and scancodes.
    keyboard: VecDeque<u8>,
    /// A controller command waiting for its parameter on port 0x60.
    pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter.
    pending_kbd_command: Option<u8>,
    last_was_command: bool,
    dropped: u64,
    /// The guest has written the command byte: a driver set the controller up.
    configured: bool,
}

impl I8042 {
    /// Number of ports, from the data port (0x60) to the command port (0x64).
    pub const PORT_RANGE: u64 = 5;
    /// The keyboard's interrupt line (ISA IRQ 1, GSI 1 on the I/O APIC).
    pub const KBD_IRQ: u32 = 1;

    /// An i8042 that calls `on_reset` when the guest resets the machine and signals `irq`
    /// (to be registered as an irqfd on GSI [`I8042::KBD_IRQ`]) for keyboard bytes.
    pub fn new(on_reset: impl Fn() + Send + 'static, irq: EventFd) -> Self {
        I8042 {
            on_reset: Box::new(on_reset),
            irq,
            ctr: CTR_INITIAL,
            output: None,
            replies: VecDeque::new(),
            keyboard: VecDeque::new(),
            pending_command: None,
            pending_kbd_command: None,
            last_was_command: false,
            dropped: 0,
            configured: false,
        }
    }

    /// Presses and releases Ctrl+Alt+Delete. Linux's VT keyboard handler turns this into
    /// `ctrl_alt_del()`: SIGINT to init, or an immediate restart if init did not ask for the
    /// signal. Bytes wait while the guest has the keyboard disabled.
    pub fn trigger_ctrl_alt_del(&mut self) {
        let codes = if self.ctr & CTR_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.queue_keyboard(codes);
        self.refill();
    }

    /// True once a guest driver has set the controller up with the keyboard enabled: a
    /// Ctrl-Alt-Del has someone to read it.
    pub fn guest_listens(&self) -> bool {
        self.configured && self.ctr & CTR_KBD_DISABLED == 0
    }

    /// Keyboard bytes dropped because the guest did not read them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_NOT_INHIBITED;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.take().unwrap_or(0);
        self.refill();
        byte
    }

    /// Moves the next waiting byte into the output buffer, raising IRQ 1 for keyboard bytes.
    fn refill(&mut self) {
        if self.output.is_some() {
            return;
        }
        if let Some(reply) = self.replies.pop_front() {
            self.output = Some(reply);
            return;
        }
        if self.ctr & CTR_KBD_DISABLED != 0 {
            return;
        }
        if let Some(byte) = self.keyboard.pop_front() {
            self.output = Some(byte);
            if self.ctr & CTR_KBD_INT != 0 {
                if let Err(e) = self.irq.write(1) {
                    log::warn!("i8042: cannot raise IRQ 1: {e}");
                }
            }
        }
    }

    fn reply(&mut self, byte: u8) {
        if self.replies.len() < MAX_QUEUED {
            self.replies.push_back(byte);
        } else {
            self.dropped += 1;
        }
        self.refill();
    }

    fn queue_keyboard(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.keyboard.len() < MAX_QUEUED {
                self.keyboard.push_back(byte);
            } else {
                self.dropped += 1;
            }
        }
    }

    fn write_command(&mut self, command: u8) {
        self.last_was_command = true;
        self.pending_command = None;
        match command {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_TEST_AUX => self.reply(AUX_ABSENT),
            CMD_SELF_TEST => self.reply(SELF_TEST_PASSED),
            CMD_TEST_KBD => self.reply(INTERFACE_TEST_PASSED),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => {
                self.ctr &= !CTR_KBD_DISABLED;
                self.refill();
            }
            CMD_READ_OUTPUT_PORT => self.reply(OUTPUT_PORT),
            CMD_PULSE_RESET => (self.on_reset)(),
            // Other pulses (0xff is Linux's "null command"), LED and vendor commands: nothing.
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_was_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = byte;
                self.configured = true;
                self.refill();
            }
            // The byte comes back as if the keyboard had sent it.
            Some(CMD_WRITE_KBD_OUTPUT) => {
                self.queue_keyboard(&[byte]);
                self.refill();
            }
            // No AUX port: its loopback comes back as a keyboard byte, which tells Linux the
            // loop failed; data meant for a mouse goes nowhere.
            Some(CMD_WRITE_AUX_OUTPUT) => self.reply(byte),
            Some(CMD_WRITE_OUTPUT_PORT | CMD_WRITE_AUX) | Some(_) => {}
            None => self.keyboard_command(byte),
        }
    }

    /// A byte sent to the keyboard: a command, or the parameter of the previous one.
    fn keyboard_command(&mut self, byte: u8) {
        // Writing to the keyboard enables its interface, as on real controllers.
        self.ctr &= !CTR_KBD_DISABLED;
        if let Some(pending) = self.pending_kbd_command.take() {
            if pending == KBD_SCAN_SET && byte == 0 {
                // "Get scan code set" (0xf0 0x00) reports set 2; other parameters just ACK.
                self.queue_keyboard(&[KBD_ACK, KBD_SCAN_SET_2]);
            } else {
                self.queue_keyboard(&[KBD_ACK]);
            }
            self.refill();
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_SET_REPEAT | KBD_SCAN_SET => {
                self.pending_kbd_command = Some(byte);
                self.queue_keyboard(&[KBD_ACK]);
            }
            KBD_ECHO => self.queue_keyboard(&[KBD_ECHO]),
            KBD_GET_ID => {
                let id = if self.ctr & CTR_TRANSLATE != 0 {
                    KBD_ID_TRANSLATED
                } else {
                    KBD_ID
                };
                self.queue_keyboard(&[KBD_ACK, id[0], id[1]]);
            }
            KBD_RESET => {
                self.keyboard.clear();
                self.queue_keyboard(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            // Enable, disable, set defaults and the rest: acknowledged.
            _ => self.queue_keyboard(&[KBD_ACK]),
        }
        self.refill();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let [byte] = data else {
            return;
        };
        *byte = match offset {
            0 => self.read_data(),
            4 => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else {
            return;
        };
        match offset {
            0 => self.write_data(*byte),
            4 => self.write_command(*byte),
            _ => {}
        }
    }
}

/// The i8042's state: the command byte the guest's driver set (keyboard interrupt, translation)
/// and whether it set one. Bytes queued for the guest are not kept: a snapshot is taken of a
/// quiet keyboard, and a restored guest that missed a key press loses nothing it asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// The command byte.
    pub ctr: u8,
    /// Whether the guest wrote it.
    pub configured: bool,
}

impl I8042 {
    /// The controller's state.
    pub fn save(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            configured: self.configured,
        }
    }

    /// Applies `state` (any command byte is one a guest could have written).
    pub fn restore(&mut self, state: &I8042State) -> Result<(), crate::devices::StateError> {
        self.ctr = state.ctr;
        self.configured = state.configured;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const DATA: u64 = 0;
    const COMMAND: u64 = 4;

    fn device() -> (I8042, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(|| {}, irq.try_clone().unwrap());
        (dev, irq)
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut byte = [0];
        dev.read(COMMAND, &mut byte);
        byte[0]
    }

    /// Reads every byte the controller has for the guest, as Linux's i8042_flush does.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut bytes = Vec::new();
        while status(dev) & STATUS_OUTPUT_FULL != 0 {
            let mut byte = [0];
            dev.read(DATA, &mut byte);
            bytes.push(byte[0]);
            assert!(bytes.len() < 100, "the output buffer never empties");
        }
        bytes
    }

    fn command(dev: &mut I8042, cmd: u8, params: &[u8]) -> Vec<u8> {
        dev.write(COMMAND, &[cmd]);
        for p in params {
            dev.write(DATA, &[*p]);
        }
        drain(dev)
    }

    #[test]
    fn the_command_byte_a_driver_set_survives_a_save_and_restore() {
        let (mut dev, _irq) = device();
        assert!(!dev.guest_listens(), "no driver yet");
        command(&mut dev, 0x60, &[0x44]);
        assert!(dev.guest_listens());
        let state = dev.save();
        let (mut fresh, _irq2) = device();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.save(), state);
        assert!(fresh.guest_listens());
        assert_eq!(
            command(&mut fresh, 0x20, &[]),
            vec![0x44],
            "the command byte reads back"
        );
        command(&mut fresh, 0x60, &[0x54]);
        assert!(!fresh.guest_listens(), "keyboard disabled");
    }

    fn interrupts(irq: &EventFd) -> u64 {
        irq.read().unwrap_or(0)
    }

    #[test]
    fn reset_command_on_port_0x64_calls_back_once() {
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            irq,
        );
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfd]);
        dev.write(4, &[0xfe, 0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn controller_tests_and_ctr_round_trip() {
        let (mut dev, irq) = device();
        assert_eq!(drain(&mut dev), Vec::<u8>::new());
        assert_eq!(command(&mut dev, CMD_SELF_TEST, &[]), vec![0x55]);
        assert_eq!(command(&mut dev, CMD_TEST_KBD, &[]), vec![0x00]);
        assert_eq!(command(&mut dev, CMD_READ_CTR, &[]), vec![CTR_INITIAL]);
        assert_eq!(command(&mut dev, CMD_WRITE_CTR, &[0x61]), Vec::<u8>::new());
        assert_eq!(command(&mut dev, CMD_READ_CTR, &[]), vec![0x61]);
        // No AUX: its loopback is not answered as AUX data, its interface test fails.
        assert_eq!(command(&mut dev, CMD_WRITE_AUX_OUTPUT, &[0x5a]), vec![0x5a]);
        assert_eq!(command(&mut dev, CMD_TEST_AUX, &[]), vec![AUX_ABSENT]);
        assert_eq!(interrupts(&irq), 0, "controller replies are polled");
    }

    #[test]
    fn keyboard_answers_the_atkbd_probe_with_interrupts() {
        let (mut dev, irq) = device();
        // Raw keyboard (no translation), interrupt on, keyboard enabled.
        command(&mut dev, CMD_WRITE_CTR, &[CTR_KBD_INT | CTR_SYSTEM_FLAG]);
        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(interrupts(&irq), 1);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, 0xab, 0x83]);
        assert_eq!(interrupts(&irq), 2, "one edge per further byte");
        dev.write(DATA, &[KBD_SET_LEDS]);
        dev.write(DATA, &[0]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_ACK]);
        dev.write(DATA, &[KBD_SCAN_SET]);
        dev.write(DATA, &[0]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_ACK, KBD_SCAN_SET_2]);
        dev.write(DATA, &[KBD_SET_REPEAT]);
        dev.write(DATA, &[0x20]);
        dev.write(DATA, &[0xf4]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_ACK, KBD_ACK]);
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_SELF_TEST_PASSED]);
    }

    #[test]
    fn ctrl_alt_del_is_translated_when_the_ctr_says_so() {
        let (mut dev, irq) = device();
        dev.trigger_ctrl_alt_del();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1);
        assert!(interrupts(&irq) > 0);
        command(&mut dev, CMD_WRITE_CTR, &[CTR_KBD_INT]);
        dev.trigger_ctrl_alt_del();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn keyboard_bytes_wait_while_the_keyboard_is_disabled() {
        let (mut dev, irq) = device();
        command(&mut dev, CMD_DISABLE_KBD, &[]);
        dev.trigger_ctrl_alt_del();
        assert_eq!(drain(&mut dev), Vec::<u8>::new());
        assert_eq!(interrupts(&irq), 0);
        assert_eq!(command(&mut dev, CMD_ENABLE_KBD, &[]), CTRL_ALT_DEL_SET1);
        assert!(interrupts(&irq) > 0);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_queue() {
        let (mut dev, _irq) = device();
        command(&mut dev, CMD_DISABLE_KBD, &[]);
        for _ in 0..1000 {
            dev.trigger_ctrl_alt_del();
            dev.write(COMMAND, &[CMD_SELF_TEST]);
        }
        assert!(dev.keyboard.len() <= MAX_QUEUED && dev.replies.len() <= MAX_QUEUED);
        assert!(dev.dropped() > 0);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut dev, _irq) = device();
        dev.write(2, &[CMD_SELF_TEST]);
        dev.write(COMMAND, &[CMD_SELF_TEST, 0]);
        let mut wide = [0xff; 2];
        dev.read(COMMAND, &mut wide);
        assert_eq!(wide, [0, 0]);
        assert_eq!(drain(&mut dev), Vec::<u8>::new());
    }
}
