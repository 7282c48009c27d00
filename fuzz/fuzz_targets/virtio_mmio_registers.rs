//! Fuzzes the virtio-mmio transport as a hostile guest drives it: the input is a sequence of
//! register reads and writes of any width at any offset of the device's window (through the MMIO
//! bus, as vCPU exits reach it), driver status sequences, queue setup with sizes and ring
//! addresses from the input, notifications (written to QueueNotify, which passes them to the
//! event loop, or, like KVM's ioeventfds, through the queue's eventfd), interrupt acks, resets,
//! and writes to guest memory between them (rings, descriptors, request headers). A real virtio-blk device on a small in-memory image sits
//! behind the transport, so every queue the guest manages to set up gets served.
//!
//! A bug is a panic, a hang (libFuzzer's timeout), or a register that breaks the transport's
//! contract: the identification registers change, a read returns bytes past its register, an
//! unhandled or misaligned access returns anything but zeroes, InterruptStatus holds an unknown
//! bit, a reset leaves status or interrupts set, or the device's config space reads wrong.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ember::devices::bus::Bus;
use ember::devices::virtio::block::{Block, DiskFile};
use ember::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use ember::guest_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Small guest memory, so that addresses from the input often land in it.
const MEM_SIZE: usize = 0x10000;
/// Where the transport sits on the MMIO bus (ember's first virtio slot).
const BASE: u64 = 0xc000_1000;
const IMAGE_SECTORS: u64 = 64;
/// Most operations per input: bounds the work of one run.
const MAX_OPS: usize = 512;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The disk image, on tmpfs when there is one: an in-memory disk.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = std::path::Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-fuzz-mmio-{}.img", std::process::id()));
        std::fs::write(&path, vec![0xa5; (IMAGE_SECTORS * 512) as usize]).unwrap();
        path
    })
}

/// The input, consumed front to back; exhausted input reads as zeroes.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    /// A guest address: mostly inside the small guest memory, sometimes anywhere.
    fn addr(&mut self) -> u64 {
        match self.u8() {
            0..=239 => u64::from(self.u16()),
            240..=251 => u64::from(self.u32()),
            _ => u64::from_le_bytes(self.bytes()),
        }
    }
}

struct Vm {
    mem: GuestMemoryMmap,
    bus: Bus,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    notify: Vec<EventFd>,
    irq: EventFd,
    config: Vec<u8>,
    /// Queue 0 as the last `init` set it up: descriptor table, available ring, size.
    rings: Option<(u64, u64, u16)>,
}

impl Vm {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bus.write(BASE + offset, data);
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn read(&mut self, offset: u64, width: usize) -> Vec<u8> {
        let mut data = vec![0xee; width];
        let handled = self.bus.read(BASE + offset, &mut data);
        let fits = offset
            .checked_add(width as u64)
            .is_some_and(|e| e <= MMIO_WINDOW_SIZE);
        assert_eq!(
            handled, fits,
            "bus routing of a {width}-byte read at {offset:#x}"
        );
        if !handled {
            assert!(
                data.iter().all(|&b| b == 0xff),
                "unhandled read not all ones: {data:x?}"
            );
        }
        data
    }

    fn read32(&mut self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read(offset, 4).try_into().unwrap())
    }

    /// Checks what any read at `offset` of `width` bytes returned.
    fn check_read(&mut self, offset: u64, data: &[u8]) {
        if offset + data.len() as u64 > MMIO_WINDOW_SIZE {
            return;
        }
        if offset >= 0x100 {
            // Config space: the device's bytes, then zeroes.
            let start = (offset - 0x100) as usize;
            for (i, &b) in data.iter().enumerate() {
                let want = self.config.get(start + i).copied().unwrap_or(0);
                assert_eq!(b, want, "config byte {:#x}", start + i);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            assert!(
                data.iter().all(|&b| b == 0),
                "{}-byte read at {offset:#x}: {data:x?}",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes(data.try_into().unwrap());
        match offset {
            0x000 => assert_eq!(value, 0x7472_6976, "MagicValue"),
            0x004 => assert_eq!(value, 2, "Version"),
            0x008 => assert_eq!(value, 2, "DeviceID"),
            0x00c => assert_eq!(value, 0x5242_4d45, "VendorID"),
            0x034 => assert!(value == 0 || value == 256, "QueueNumMax {value}"),
            0x044 => assert!(value <= 1, "QueueReady {value}"),
            0x060 => assert_eq!(value & !3, 0, "InterruptStatus {value:#x}"),
            0x0fc => assert_eq!(value, 0, "ConfigGeneration"),
            0x010 | 0x070 => {}
            _ => assert_eq!(value, 0, "write-only or reserved register {offset:#x}"),
        }
    }

    fn reset(&mut self) {
        self.write32(0x070, 0);
        assert_eq!(self.read32(0x070), 0, "status after reset");
        assert_eq!(self.read32(0x060), 0, "InterruptStatus after reset");
        assert_eq!(self.read32(0x044), 0, "QueueReady after reset");
    }

    /// A notification: QueueNotify seen by the transport, or (as KVM's ioeventfd catches a
    /// write of a queue index) the queue's eventfd, served by the event loop.
    fn notify(&mut self, value: u32, via_event_loop: bool) {
        match self.notify.get(value as usize) {
            Some(evt) if via_event_loop => {
                evt.write(1).unwrap();
            }
            _ => self.write32(QUEUE_NOTIFY_OFFSET, value),
        }
        self.run_event_loop();
    }

    fn run_event_loop(&mut self) {
        // Everything pending, without waiting: notifications, plus the kicks the transport gives
        // itself on DRIVER_OK and reset.
        for _ in 0..4 {
            if self.events.run_with_timeout(0).unwrap() == 0 {
                break;
            }
        }
    }

    /// The whole driver initialisation (virtio 1.2, 3.1.1) with values from the input.
    fn init(&mut self, input: &mut Input) {
        let features = u64::from(input.u32()) | (u64::from(input.u32()) << 32);
        // Mostly what a driver would accept: VERSION_1 plus some of the offered bits.
        let features = if input.u8() & 1 == 0 {
            (features & 0x3000_6264) | VIRTIO_F_VERSION_1
        } else {
            features
        };
        self.write32(0x070, STATUS_ACKNOWLEDGE);
        self.write32(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for (sel, half) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
            self.write32(0x024, sel);
            self.write32(0x020, half);
        }
        self.write32(
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        let status = self.read32(0x070);
        self.write32(0x030, 0);
        let size = match input.u8() {
            0 => input.u16(),
            n => 1u16 << (n % 9),
        };
        self.write32(0x038, u32::from(size));
        let mut addrs = [0u64; 3];
        for (addr, offset) in addrs.iter_mut().zip([0x080, 0x090, 0x0a0]) {
            *addr = input.addr();
            self.write32(offset, *addr as u32);
            self.write32(offset + 4, (*addr >> 32) as u32);
        }
        // The registers are write-only: remember what was written, for `publish`.
        self.rings = Some((addrs[0], addrs[1], size));
        self.write32(0x044, 1);
        self.write32(0x070, status | STATUS_DRIVER_OK);
        self.run_event_loop();
    }

    /// Makes a chain of descriptors from the input available on queue 0, as a driver does:
    /// descriptors into the table, the head into the available ring, then the index.
    fn publish(&mut self, input: &mut Input) {
        let Some((desc, avail, size)) = self.rings else {
            return;
        };
        if size == 0 {
            return;
        }
        let count = u16::from(input.u8() % 4) + 1;
        let first = input.u16() % size;
        for i in 0..count {
            let index = (first + i) % size;
            let addr = input.addr();
            let len = match input.u8() {
                0..=199 => u32::from(input.u16()) % 0x1100,
                _ => input.u32(),
            };
            let mut flags = u16::from(input.u8() % 8);
            let mut next = (index + 1) % size;
            if i + 1 < count {
                flags |= 1;
            } else {
                flags &= !1;
            }
            if input.u8() == 0xff {
                next = input.u16();
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            let _ = self
                .mem
                .write_slice(&raw, GuestAddress(desc.wrapping_add(16 * u64::from(index))));
        }
        let Ok(idx) = self
            .mem
            .read_obj::<u16>(GuestAddress(avail.wrapping_add(2)))
        else {
            return;
        };
        let slot = avail.wrapping_add(4 + 2 * u64::from(idx % size));
        let _ = self.mem.write_obj(first, GuestAddress(slot));
        let _ = self
            .mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail.wrapping_add(2)));
        // A request header or segment for it, at the head's buffer.
        if input.u8() & 1 == 1 {
            let header: [u8; 16] = input.bytes();
            if let Ok(head) = self
                .mem
                .read_obj::<u64>(GuestAddress(desc.wrapping_add(16 * u64::from(first))))
            {
                let _ = self.mem.write_obj(header, GuestAddress(head));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = DiskFile::open(image(), input.u8() & 1 == 1, false).unwrap();
    let block = Block::new(disk, "fuzz");
    let config = ember::devices::virtio::VirtioDevice::config_space(&block).to_vec();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let notify = vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()];
    let transport = MmioTransport::new(
        Box::new(block),
        mem.clone(),
        irq.try_clone().unwrap(),
        notify.iter().map(|e| e.try_clone().unwrap()).collect(),
    )
    .unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let mut bus = Bus::new();
    bus.insert(BASE, MMIO_WINDOW_SIZE, transport.clone())
        .unwrap();
    let mut events = EventManager::new().unwrap();
    events.add_subscriber(transport as Arc<Mutex<dyn MutEventSubscriber + Send>>);
    let mut vm = Vm {
        mem,
        bus,
        events,
        notify,
        irq,
        config,
        rings: None,
    };

    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 14 {
            // An aligned 32-bit register write, the common case.
            0 | 1 => {
                let offset = u64::from(input.u8() % 0x40) * 4;
                let value = input.u32();
                vm.write32(offset, value);
            }
            // A read of any width anywhere in (or just past) the window.
            2 | 3 => {
                let offset = u64::from(input.u16() % 0x1010);
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let data = vm.read(offset, width);
                vm.check_read(offset, &data);
            }
            // A write of any width anywhere.
            4 => {
                let offset = u64::from(input.u16() % 0x1010);
                let len = usize::from(input.u8() % 8) + 1;
                let bytes: [u8; 8] = input.bytes();
                vm.write(offset, &bytes[..len]);
            }
            // The guest writes its memory: rings, descriptors, headers.
            5 | 6 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                let _ = vm.mem.write_slice(&bytes, GuestAddress(addr));
            }
            7 => {
                let value = u32::from(input.u8() % 3);
                let via_event_loop = input.u8() & 1 == 1;
                vm.notify(value, via_event_loop);
            }
            // Status values a driver walks through, or anything.
            8 => {
                let value = match input.u8() % 8 {
                    0 => STATUS_ACKNOWLEDGE,
                    1 => STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                    2 => STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                    3 => STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                    4 => vm.read32(0x070) | u32::from(input.u8()),
                    _ => input.u32(),
                };
                vm.write32(0x070, value);
                vm.run_event_loop();
            }
            9 => vm.init(&mut input),
            10 => vm.reset(),
            // A driver queueing a request and notifying.
            12 | 13 => {
                vm.publish(&mut input);
                if input.u8() & 1 == 1 {
                    vm.notify(0, input.u8() & 1 == 1);
                }
            }
            _ => {
                let _ = vm.irq.read();
                let bits = vm.read32(0x060);
                vm.write32(0x064, bits & u32::from(input.u8()));
            }
        }
    }
    // Tear down the way a VM does: reset, then nothing may still be pending.
    vm.reset();
});
