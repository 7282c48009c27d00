//! Fuzzes the legacy devices on ember's port bus as a guest reaches them: COM1 (the 8250 UART,
//! 0x3f8-0x3ff), the i8042 (0x60-0x64) and the debug port (0x80), plus the boot timer and the
//! I/O APIC (0xfec0_0000) on the MMIO bus. The input is a sequence of port reads and writes of
//! any width at any port (mostly near the devices), interleaved with host console input queued
//! into the UART and a console output that may refuse bytes, as a full pipe does, and with
//! I/O APIC accesses (IOREGSEL, IOWIN, any width at any offset of its window and past its end)
//! whose route tables go to an installer that refuses them, as KVM may, while the input says so.
//!
//! A bug is a panic, a hang, or a device that breaks its contract: unhandled or straddling
//! accesses reaching a device or reading other than all ones; the UART losing, reordering or
//! inventing bytes between the host and the guest (its receive FIFO is modelled, loopback mode
//! included), guest output reaching the console other than as written, or counters that
//! disagree with it; the i8042 resetting the machine on anything but a one-byte 0xFE command;
//! the debug port keeping more than its bound or anything but progress codes; the I/O APIC
//! reading other than its registers (modelled: ID, version, arbitration, 24 redirection entries
//! with read-only bits 12 and 14, the 8-bit select), asking for routes when none changed, or not
//! asking when one did, installing a table other than the entries' (a route only for unmasked
//! pins with delivery mode fixed, lowest priority, NMI or INIT: an MSI to 0xfee0_0000 with the
//! destination in bits 12-19, logical mode in bit 2, data = vector and mode), keeping a refused
//! table, or counting other than each refused access and route table as a guest error.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ember::devices::bus::Bus;
use ember::devices::legacy::ioapic::{IOAPIC_PINS, MsiMessage, PinRoutes, RouteInstaller};
use ember::devices::legacy::{I8042, IoApic, SerialDevice};
use ember::devices::pseudo::debug_port::{DebugCodes, KERNEL_CODES, USERSPACE_CODES};
use ember::devices::pseudo::{BootTimer, DebugPort};
use ember::timing::{Phase, Timeline};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const COM1: u64 = 0x3f8;
const I8042_BASE: u64 = 0x60;
const DEBUG_PORT: u64 = 0x80;
const BOOT_TIMER: u64 = 0xc000_0000;
const IOAPIC: u64 = 0xfec0_0000;
/// The I/O APIC ID ember is given (it keeps bits 0-3: the ID register reads 0x0200_0000).
const IOAPIC_ID: u8 = 0x12;
const PINS: usize = IOAPIC_PINS as usize;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_READ_ONLY: u64 = (1 << 12) | (1 << 14);
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

/// The routes the I/O APIC asked for, as KVM would see them.
struct Routes {
    /// The table last installed (KVM's), all `None` at first.
    current: PinRoutes,
    calls: u64,
    offered: Option<PinRoutes>,
    /// Refuse every table (as KVM does on ENOMEM, or a bad entry).
    refuse: bool,
}

/// The installer ember's I/O APIC is given: checks and keeps every table.
struct Installer(Arc<Mutex<Routes>>);

impl RouteInstaller for Installer {
    fn install(&mut self, routes: &PinRoutes) -> io::Result<()> {
        let mut r = self.0.lock().unwrap();
        for (pin, route) in routes.iter().enumerate() {
            let Some(msi) = route else { continue };
            assert_eq!(
                msi.address & !0x000f_f004,
                0xfee0_0000,
                "pin {pin}: MSI address {:#x}",
                msi.address
            );
            assert!(
                msi.data < 0x800 && matches!(msi.data >> 8, 0 | 1 | 4 | 5),
                "pin {pin}: MSI data {:#x}",
                msi.data
            );
        }
        assert_ne!(*routes, r.current, "routes installed again, unchanged");
        r.calls += 1;
        r.offered = Some(*routes);
        if r.refuse {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        r.current = *routes;
        Ok(())
    }
}

/// What the guest should see of the I/O APIC, kept beside the device.
struct IoApicModel {
    id: u32,
    select: u32,
    entries: [u64; PINS],
    errors: u64,
}

impl IoApicModel {
    fn new() -> Self {
        IoApicModel {
            id: (u32::from(IOAPIC_ID) << 24) & 0x0f00_0000,
            select: 0,
            entries: [ENTRY_MASKED; PINS],
            errors: 0,
        }
    }

    /// The redirection entry (pin, high half) `select` names, if any.
    fn entry(&self) -> Option<(usize, bool)> {
        let index = usize::try_from(self.select.checked_sub(0x10)?).ok()?;
        (index < 2 * PINS).then_some((index / 2, index % 2 == 1))
    }

    fn read_register(&self) -> u32 {
        match (self.select, self.entry()) {
            (0 | 2, _) => self.id,
            (1, _) => 0x0017_0011,
            (_, Some((pin, high))) => (self.entries[pin] >> if high { 32 } else { 0 }) as u32,
            _ => 0,
        }
    }

    /// A write of `value` through IOWIN; true if it reached a redirection entry.
    fn write_register(&mut self, value: u32) -> bool {
        match (self.select, self.entry()) {
            (0, _) => self.id = value & 0x0f00_0000,
            (1 | 2, _) => {}
            (_, Some((pin, high))) => {
                let entry = &mut self.entries[pin];
                *entry = match high {
                    true => (*entry & 0xffff_ffff) | u64::from(value) << 32,
                    false => (*entry & !0xffff_ffff) | u64::from(value),
                } & !ENTRY_READ_ONLY;
                return true;
            }
            _ => self.errors += 1,
        }
        false
    }

    /// Each pin's route: an MSI for unmasked entries with a mode an MSI carries.
    fn routes(&self) -> PinRoutes {
        std::array::from_fn(|pin| {
            let entry = self.entries[pin];
            let mode = (entry >> 8) & 7;
            if entry & ENTRY_MASKED != 0 || !matches!(mode, 0 | 1 | 4 | 5) {
                return None;
            }
            let logical = if entry & (1 << 11) != 0 { 1 << 2 } else { 0 };
            Some(MsiMessage {
                address: 0xfee0_0000 | (entry >> 56) << 12 | logical,
                data: (entry & 0xff | mode << 8) as u32,
            })
        })
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
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// One I/O APIC access or two (select, then the window) from the input, checked against the
/// model and the routes it should have installed.
fn ioapic_op(
    input: &mut Input,
    mmio: &Bus,
    ioapic: &Mutex<IoApic>,
    model: &mut IoApicModel,
    routes: &Mutex<Routes>,
) {
    let kind = input.u8();
    if kind >= 0xf0 {
        let mut r = routes.lock().unwrap();
        r.refuse = !r.refuse;
        return;
    }
    let (before, calls) = {
        let r = routes.lock().unwrap();
        (r.current, r.calls)
    };
    let mut rewired = false;
    // (offset, width, value to write or None to read)
    let mut accesses: Vec<(u64, usize, Option<u64>)> = Vec::new();
    match kind {
        // A register, written or read as a driver does: select, then the window.
        0x00..=0x7f => {
            let reg = match input.u8() {
                // Mostly a redirection entry, sometimes any 32-bit select.
                n @ 0..=0x2f => 0x10 + u32::from(n),
                0x30..=0x3f => u32::from(input.u8()),
                _ => input.u32(),
            };
            accesses.push((IOREGSEL, 4, Some(reg.into())));
            let value = match kind & 1 {
                0 => Some(u64::from(input.u32())),
                _ => None,
            };
            accesses.push((IOWIN, 4, value));
        }
        // One 4-byte access at IOREGSEL or IOWIN.
        0x80..=0xbf => {
            let offset = if kind & 1 == 0 { IOREGSEL } else { IOWIN };
            let value = (kind & 2 == 0).then(|| u64::from(input.u32()));
            accesses.push((offset, 4, value));
        }
        // Any width at any offset, the last bytes of the window and past it included.
        _ => {
            let offset = match kind & 3 {
                0 => u64::from(input.u8() % 0x20),
                1 => IoApic::WINDOW - 8 + u64::from(input.u8() % 12),
                _ => u64::from(input.u16()) % IoApic::WINDOW,
            };
            let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
            let value =
                (kind & 4 == 0).then(|| u64::from_le_bytes(std::array::from_fn(|_| input.u8())));
            accesses.push((offset, width, value));
        }
    }
    for (offset, width, value) in accesses {
        let fits = offset + width as u64 <= IoApic::WINDOW;
        match value {
            Some(value) => {
                let bytes = &value.to_le_bytes()[..width];
                let handled = mmio.write(IOAPIC + offset, bytes);
                assert_eq!(handled, fits, "{width}-byte I/O APIC write at {offset:#x}");
                if !handled {
                    continue;
                }
                let value = value as u32;
                match (width, offset) {
                    (4, IOREGSEL) => model.select = value & 0xff,
                    (4, IOWIN) => rewired |= model.write_register(value),
                    _ => model.errors += 1,
                }
            }
            None => {
                let mut bytes = vec![0x5a; width];
                let handled = mmio.read(IOAPIC + offset, &mut bytes);
                assert_eq!(handled, fits, "{width}-byte I/O APIC read at {offset:#x}");
                if !handled {
                    assert!(
                        bytes.iter().all(|&b| b == 0xff),
                        "unhandled read {bytes:x?}"
                    );
                    continue;
                }
                let want = match (width, offset) {
                    (4, IOREGSEL) => model.select,
                    (4, IOWIN) => model.read_register(),
                    (4, _) => 0,
                    _ => {
                        model.errors += 1;
                        0
                    }
                };
                let want = &want.to_le_bytes()[..width.min(4)];
                let got = &bytes[..width.min(4)];
                assert_eq!(
                    got, want,
                    "{width}-byte I/O APIC read at {offset:#x}, select {:#x}",
                    model.select
                );
                assert!(
                    bytes[width.min(4)..].iter().all(|&b| b == 0),
                    "wide read {bytes:x?}"
                );
            }
        }
    }
    let expected = model.routes();
    let r = routes.lock().unwrap();
    if rewired && expected != before {
        assert_eq!(r.calls, calls + 1, "routes changed: one table for KVM");
        assert_eq!(r.offered, Some(expected), "the table offered");
        if r.refuse {
            model.errors += 1;
            assert_eq!(r.current, before);
        }
    } else {
        assert_eq!(r.calls, calls, "no route changed, yet a table for KVM");
    }
    assert_eq!(
        ioapic.lock().unwrap().errors(),
        model.errors,
        "I/O APIC guest errors"
    );
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
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let i8042 = Arc::new(Mutex::new(I8042::new(
        move || {
            seen.fetch_add(1, Ordering::SeqCst);
        },
        kbd_irq,
    )));
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
    let routes = Arc::new(Mutex::new(Routes {
        current: [None; PINS],
        calls: 0,
        offered: None,
        refuse: false,
    }));
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        IOAPIC_ID,
        Box::new(Installer(routes.clone())),
    )));
    mmio.insert(IOAPIC, IoApic::WINDOW, ioapic.clone()).unwrap();
    let mut model = UartModel::default();
    let mut ioapic_model = IoApicModel::new();

    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        let op = input.u8();
        if op >= 0xc0 {
            ioapic_op(&mut input, &mmio, &ioapic, &mut ioapic_model, &routes);
            continue;
        }
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
