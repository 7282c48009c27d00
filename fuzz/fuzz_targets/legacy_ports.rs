//! Fuzzes the legacy devices on ember's port bus as a guest reaches them: COM1 (the 8250 UART,
//! 0x3f8-0x3ff), the i8042 (0x60-0x64) and the debug port (0x80), plus the boot timer on the
//! MMIO bus. The input is a sequence of port reads and writes of any width at any port (mostly
//! near the devices), interleaved with host console input queued into the UART and a console
//! output that may refuse bytes, as a full pipe does.
//!
//! A bug is a panic, a hang, or a device that breaks its contract: unhandled or straddling
//! accesses reaching a device or reading other than all ones; the UART losing, reordering or
//! inventing bytes between the host and the guest (its receive FIFO is modelled, loopback mode
//! included), guest output reaching the console other than as written, or counters that
//! disagree with it; the i8042 resetting the machine on anything but a one-byte 0xFE command;
//! the debug port keeping more than its bound or anything but progress codes.

#![no_main]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ember::devices::bus::Bus;
use ember::devices::legacy::{I8042, SerialDevice};
use ember::devices::pseudo::debug_port::{DebugCodes, KERNEL_CODES, USERSPACE_CODES};
use ember::devices::pseudo::{BootTimer, DebugPort};
use ember::timing::{Phase, Timeline};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const COM1: u64 = 0x3f8;
const I8042_BASE: u64 = 0x60;
const DEBUG_PORT: u64 = 0x80;
const BOOT_TIMER: u64 = 0xc000_0000;
const FIFO_SIZE: usize = 64;
const MAX_OPS: usize = 1024;

/// The console's output: keeps what it took, refuses everything while `full` is set.
#[derive(Clone, Default)]
struct Console {
    taken: Arc<Mutex<Vec<u8>>>,
    full: Arc<Mutex<bool>>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if *self.full.lock().unwrap() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.taken.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the guest should see of the UART, kept beside the device.
#[derive(Default)]
struct UartModel {
    lcr: u8,
    mcr: u8,
    fifo: VecDeque<u8>,
    output: Vec<u8>,
    lost: u64,
    resets: u32,
    codes: usize,
}

impl UartModel {
    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }
    fn loopback(&self) -> bool {
        self.mcr & 0x10 != 0
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let rx_space = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let console = Console::default();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq.try_clone().unwrap(),
        rx_space.try_clone().unwrap(),
        Box::new(console.clone()),
    )));
    let counters = serial.lock().unwrap().counters();
    let resets = Arc::new(AtomicU32::new(0));
    let seen = resets.clone();
    let i8042 = Arc::new(Mutex::new(I8042::new(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    })));
    let codes = DebugCodes::default();
    let timeline = Arc::new(Timeline::default());
    let mut pio = Bus::new();
    pio.insert(COM1, SerialDevice::PORT_RANGE, serial.clone())
        .unwrap();
    pio.insert(I8042_BASE, I8042::PORT_RANGE, i8042).unwrap();
    pio.insert(
        DEBUG_PORT,
        1,
        Arc::new(Mutex::new(DebugPort::new(codes.clone()))),
    )
    .unwrap();
    let mut mmio = Bus::new();
    mmio.insert(
        BOOT_TIMER,
        BootTimer::WINDOW,
        Arc::new(Mutex::new(BootTimer::new(timeline.clone()))),
    )
    .unwrap();
    let mut model = UartModel::default();

    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        let op = input.u8();
        // A port: mostly a device's, sometimes just past one, sometimes anywhere.
        let port = match input.u8() {
            0..=99 => COM1 + u64::from(input.u8() % 9),
            100..=159 => I8042_BASE + u64::from(input.u8() % 6),
            160..=179 => DEBUG_PORT + u64::from(input.u8() % 2),
            _ => u64::from(input.u16()),
        };
        let width = match input.u8() % 8 {
            0 => 2,
            1 => 4,
            _ => 1,
        };
        match op % 8 {
            // Guest writes.
            0..=3 => {
                let bytes = [input.u8(), input.u8(), input.u8(), input.u8()];
                let bytes = &bytes[..width];
                let handled = pio.write(port, bytes);
                let device_end = match port {
                    COM1..=0x3ff => Some(COM1 + 8),
                    0x60..=0x64 => Some(0x65),
                    DEBUG_PORT => Some(DEBUG_PORT + 1),
                    _ => None,
                };
                let fits = device_end.is_some_and(|end| port + width as u64 <= end);
                assert_eq!(handled, fits, "{width}-byte write at port {port:#x}");
                if !handled || width != 1 {
                    continue;
                }
                let value = bytes[0];
                match port {
                    0x3f8 if !model.dlab() => {
                        if model.loopback() {
                            if model.fifo.len() < FIFO_SIZE {
                                model.fifo.push_back(value);
                            }
                        } else if *console.full.lock().unwrap() {
                            model.lost += 1;
                        } else {
                            model.output.push(value);
                        }
                    }
                    0x3fb => model.lcr = value,
                    0x3fc => model.mcr = value,
                    0x64 if value == 0xfe => model.resets += 1,
                    DEBUG_PORT
                        if KERNEL_CODES.contains(&value) || USERSPACE_CODES.contains(&value) =>
                    {
                        model.codes = (model.codes + 1).min(256);
                    }
                    _ => {}
                }
            }
            // Guest reads.
            4 | 5 => {
                let mut bytes = vec![0x5a; width];
                let handled = pio.read(port, &mut bytes);
                if !handled {
                    assert!(
                        bytes.iter().all(|&b| b == 0xff),
                        "unhandled read {bytes:x?}"
                    );
                    continue;
                }
                if port == COM1 && width == 1 && !model.dlab() {
                    let want = model.fifo.pop_front().unwrap_or(0);
                    assert_eq!(bytes[0], want, "byte the guest read from the UART");
                } else if (COM1..COM1 + 8).contains(&port) && width != 1 {
                    assert!(
                        bytes.iter().all(|&b| b == 0xff),
                        "wide UART read {bytes:x?}"
                    );
                } else if port == 0x3fd && width == 1 {
                    // LSR: data ready exactly when the FIFO holds bytes.
                    assert_eq!(
                        bytes[0] & 1 == 1,
                        !model.fifo.is_empty(),
                        "LSR {:#x}",
                        bytes[0]
                    );
                } else if (I8042_BASE..I8042_BASE + 5).contains(&port) && width != 1 {
                    assert!(bytes.iter().all(|&b| b == 0), "wide i8042 read {bytes:x?}");
                }
            }
            // Host input for the guest, as the event loop queues it.
            6 => {
                let n = usize::from(input.u8() % 80);
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                let mut serial = serial.lock().unwrap();
                let room = serial.rx_capacity();
                assert_eq!(room, FIFO_SIZE - model.fifo.len(), "FIFO room");
                let taken = serial.enqueue_input(&bytes);
                let expected = if model.loopback() { 0 } else { n.min(room) };
                assert_eq!(taken, expected, "bytes queued of {n} with {room} free");
                model.fifo.extend(&bytes[..taken]);
            }
            // The console fills up or drains; the event loop drains the eventfds; the boot timer.
            _ => match input.u8() % 4 {
                0 => {
                    let mut full = console.full.lock().unwrap();
                    *full = !*full;
                }
                1 => {
                    let _ = irq.read();
                    let _ = rx_space.read();
                }
                _ => {
                    let offset = u64::from(input.u16() % 0x1002);
                    let bytes = [input.u8(), 0, 0, 0];
                    mmio.write(BOOT_TIMER + offset, &bytes[..width]);
                    let mut back = [0x5au8; 4];
                    if mmio.read(BOOT_TIMER + offset, &mut back[..width]) {
                        assert!(back[..width].iter().all(|&b| b == 0), "boot timer read");
                    }
                }
            },
        }
        assert_eq!(
            *console.taken.lock().unwrap(),
            model.output,
            "console output"
        );
        assert_eq!(
            counters.tx_bytes.load(Ordering::Relaxed),
            model.output.len() as u64
        );
        assert_eq!(counters.tx_lost_bytes.load(Ordering::Relaxed), model.lost);
        assert_eq!(resets.load(Ordering::SeqCst), model.resets, "i8042 resets");
        assert_eq!(codes.lock().unwrap().len(), model.codes, "debug codes kept");
    }
    let _ = timeline.get(Phase::BootTimer);
});
