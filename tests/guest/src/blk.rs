//! The virtio-blk driver behind `guest.blk=` (docs/test-guest.md): finds the block devices among
//! the `virtio_mmio.device=` entries, sets each one up, and runs the operations in command-line
//! order, one synchronous request each, reporting `blkN.OP=...`.
//!
//! Memory (RAM the guest owns above its image): device *n*'s queue area at
//! `0x200000 + n * 0x10000` (rings, indirect table, request header, status byte, discard segment,
//! id buffer), and one data buffer (`data.rs`) shared by all requests. `N:bench` (`blk/bench.rs`)
//! uses its own slots from 16 MiB up.

use crate::bootinfo::BootInfo;
use crate::cmdline::{self, BlkOp};
use crate::data::{DATA, DATA_MAX, fill, fnv1a64, zero};
use crate::serial::{Dec, Hex, Hex16, Put};
use crate::virtio::{
    self, Completion, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, F_EVENT_IDX, F_INDIRECT_DESC,
    MAX_DEVICES, Mmio, Queue, get, put,
};
use crate::{cpu, report};

mod bad;
mod bench;

const AREAS: u64 = 0x20_0000;
const AREA_SIZE: u64 = 0x1_0000;
// Offsets in a device's area, after the queue's 4 KiB.
const INDIRECT: u64 = 0x1000;
const HEADER: u64 = 0x1100;
const STATUS: u64 = 0x1110;
const SEGMENT: u64 = 0x1120;
const ID: u64 = 0x1140;
const ID_LEN: u32 = 20;
const SECTOR: u64 = 512;

const DEVICE_ID_BLOCK: u32 = 2;
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const KNOWN: u64 = F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_INDIRECT_DESC
    | F_EVENT_IDX;
// Config space offsets.
const CFG_CAPACITY: u64 = 0x00;
const CFG_SIZE_MAX: u64 = 0x08;
const CFG_SEG_MAX: u64 = 0x0c;
const CFG_BLK_SIZE: u64 = 0x14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// One descriptor of a request: buffer, length, `DESC_WRITE` or 0.
#[derive(Clone, Copy)]
struct Seg(u64, u32, u16);

/// How the segments are put in the ring.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Direct,
    /// One descriptor pointing at a table of the segments, of this length in bytes.
    Indirect(u32),
    /// Only the header descriptor, with `NEXT` pointing at itself.
    Loop,
}

/// What a request's status byte said.
#[derive(Clone, Copy)]
enum Status {
    Byte(u8),
    /// Completed, but the pre-filled 0xff was not overwritten.
    None,
    Timeout,
}

impl Put for Status {
    fn put(&self) {
        match *self {
            Status::Byte(b) => Dec(b.into()).put(),
            Status::None => "none".put(),
            Status::Timeout => "timeout".put(),
        }
    }
}

/// `SECTOR:COUNT:` of a report line.
struct Range(u64, u64);

impl Put for Range {
    fn put(&self) {
        Dec(self.0).put();
        ":".put();
        Dec(self.1).put();
        ":".put();
    }
}

/// A set-up block device.
struct Blk {
    n: usize,
    mmio: Mmio,
    dest: u8,
    queue: Queue,
    area: u64,
    features: u64,
    capacity: u64,
    blk_size: u32,
    seg_max: u32,
    size_max: u32,
}

impl Blk {
    fn new(n: usize, mmio: Mmio, dest: u8) -> Result<Blk, &'static str> {
        let features = mmio.negotiate(KNOWN)?;
        let area = AREAS + n as u64 * AREA_SIZE;
        // SAFETY: device n's area is RAM (checked by `run`) that nothing else uses.
        let queue = unsafe { Queue::new(mmio, features, area, dest)? };
        let optional = |feature, offset| match features & feature {
            0 => 0,
            _ => mmio.config32(offset),
        };
        Ok(Blk {
            n,
            mmio,
            dest,
            queue,
            area,
            features,
            capacity: mmio.config64(CFG_CAPACITY),
            blk_size: optional(F_BLK_SIZE, CFG_BLK_SIZE),
            seg_max: optional(F_SEG_MAX, CFG_SEG_MAX),
            size_max: optional(F_SIZE_MAX, CFG_SIZE_MAX),
        })
    }

    fn header(&self) -> Seg {
        Seg(self.area + HEADER, 16, 0)
    }

    fn status(&self) -> Seg {
        Seg(self.area + STATUS, 1, DESC_WRITE)
    }

    /// Sends one request of type `kind` for `sector` made of `segs` and waits for it.
    fn send(&mut self, kind: u32, sector: u64, segs: &[Seg], layout: Layout) -> Status {
        // SAFETY: header and status live in this device's area.
        unsafe {
            put(self.area + HEADER, kind);
            put(self.area + HEADER + 4, 0u32);
            put(self.area + HEADER + 8, sector);
            put(self.area + STATUS, 0xffu8);
        }
        let head = self.queue.head();
        let table = self.queue.table();
        // SAFETY: the descriptors are in this device's queue (`head` starts a free group of
        // `GROUP`, at most 3 segments are passed) or in its indirect table (room for 4).
        unsafe {
            let (table, first) = match layout {
                Layout::Direct => (table, head),
                Layout::Indirect(len) => {
                    let indirect = self.area + INDIRECT;
                    Queue::set_desc(table, head, indirect, len, DESC_INDIRECT, 0);
                    (indirect, 0)
                }
                Layout::Loop => {
                    let Seg(addr, len, flags) = self.header();
                    Queue::set_desc(table, head, addr, len, flags | DESC_NEXT, head);
                    (table, head)
                }
            };
            if layout != Layout::Loop {
                for (i, &Seg(addr, len, flags)) in segs.iter().enumerate() {
                    let i = first + i as u16;
                    let last = i + 1 == first + segs.len() as u16;
                    let next = if last { 0 } else { DESC_NEXT };
                    Queue::set_desc(table, i, addr, len, flags | next, i + 1);
                }
            }
        }
        match self.queue.submit(head) {
            Completion::Timeout => Status::Timeout,
            Completion::NoInterrupt => {
                report!(
                    "guest: blk",
                    Dec(self.n as u64),
                    " used ring moved without an interrupt"
                );
                Status::Timeout
            }
            // SAFETY: the status byte lives in this device's area.
            Completion::Used => match unsafe { get::<u8>(self.area + STATUS) } {
                0xff => Status::None,
                b => Status::Byte(b),
            },
        }
    }

    /// A read or write of `count` sectors through the data buffer.
    fn transfer(&mut self, kind: u32, sector: u64, count: u64, layout: Layout) -> Status {
        let data = Seg(
            DATA,
            (count * SECTOR) as u32,
            if kind == T_IN { DESC_WRITE } else { 0 },
        );
        let segs = [self.header(), data, self.status()];
        self.send(kind, sector, &segs, layout)
    }

    /// Runs one operation and reports it.
    fn run(&mut self, op: BlkOp, boot: &BootInfo) {
        let n = Dec(self.n as u64);
        let layout = |indirect| match indirect {
            true => Layout::Indirect(3 * 16),
            false => Layout::Direct,
        };
        match op {
            BlkOp::Info => report!(
                "blk",
                n,
                ".info=capacity=",
                Dec(self.capacity),
                " features=",
                Hex(self.features),
                " ro=",
                Dec((self.features & F_RO != 0).into()),
                " blk_size=",
                Dec(self.blk_size.into()),
                " seg_max=",
                Dec(self.seg_max.into()),
                " size_max=",
                Dec(self.size_max.into())
            ),
            BlkOp::Id => {
                // SAFETY: the id buffer lives in this device's area.
                unsafe { crate::mem::memset((self.area + ID) as *mut u8, 0, ID_LEN as usize) };
                let segs = [
                    self.header(),
                    Seg(self.area + ID, ID_LEN, DESC_WRITE),
                    self.status(),
                ];
                let status = self.send(T_GET_ID, 0, &segs, Layout::Direct);
                let mut id = [0u8; ID_LEN as usize];
                let mut len = 0;
                for i in 0..ID_LEN as u64 {
                    // SAFETY: as above.
                    let b = unsafe { get::<u8>(self.area + ID + i) };
                    if b != 0 {
                        id[len] = b;
                        len += 1;
                    }
                }
                report!("blk", n, ".id=", status, ":", &id[..len]);
            }
            BlkOp::Read {
                sector,
                count,
                indirect,
            } => {
                zero(count * SECTOR);
                let status = self.transfer(T_IN, sector, count, layout(indirect));
                let name = if indirect { ".iread=" } else { ".read=" };
                let hash = Hex16(fnv1a64(count * SECTOR));
                report!("blk", n, name, Range(sector, count), status, ":", hash);
            }
            BlkOp::Write {
                sector,
                count,
                seed,
                indirect,
            } => {
                fill(count * SECTOR, seed);
                let status = self.transfer(T_OUT, sector, count, layout(indirect));
                let name = if indirect { ".iwrite=" } else { ".write=" };
                report!("blk", n, name, Range(sector, count), status);
            }
            BlkOp::Flush => {
                let status = self.send(T_FLUSH, 0, &[self.header(), self.status()], Layout::Direct);
                report!("blk", n, ".flush=", status);
            }
            BlkOp::Discard { sector, count } | BlkOp::Zeroes { sector, count } => {
                let (kind, name) = match op {
                    BlkOp::Discard { .. } => (T_DISCARD, ".discard="),
                    _ => (T_WRITE_ZEROES, ".zeroes="),
                };
                // SAFETY: the segment lives in this device's area.
                unsafe {
                    put(self.area + SEGMENT, sector);
                    put(self.area + SEGMENT + 8, count as u32);
                    put(self.area + SEGMENT + 12, 0u32);
                }
                let segs = [
                    self.header(),
                    Seg(self.area + SEGMENT, 16, 0),
                    self.status(),
                ];
                let status = self.send(kind, 0, &segs, Layout::Direct);
                report!("blk", n, name, Range(sector, count), status);
            }
            BlkOp::Bad(kind) => {
                let status = self.bad(kind);
                report!("blk", n, ".bad=", kind.name(), ":", status);
            }
            BlkOp::Reinit => match Blk::new(self.n, self.mmio, self.dest) {
                Ok(fresh) => {
                    *self = fresh;
                    report!("blk", n, ".reinit=ok");
                }
                Err(why) => report!("blk", n, ".reinit=", why),
            },
            BlkOp::Bench {
                mode,
                bytes,
                count,
                qd,
            } => self.bench(boot, mode, bytes, qd, count),
            BlkOp::Ticks { sectors } => {
                let mut tick: u64 = 0;
                loop {
                    tick += 1;
                    fill(SECTOR, tick as u8);
                    let status = self.transfer(T_OUT, tick % sectors, 1, Layout::Direct);
                    if !matches!(status, Status::Byte(0)) {
                        report!("blk", n, ".ticks=", Dec(tick), ":", status);
                        cpu::halt_forever();
                    }
                    report!("tick=", Dec(tick));
                }
            }
            BlkOp::ReadOnLine { sector, count } => {
                // The echo mode's serial interrupt, which counts the lines it echoes.
                crate::apic::route_irq(
                    crate::actions::SERIAL_IOAPIC_PIN,
                    crate::idt::SERIAL_VECTOR,
                    self.dest,
                );
                crate::serial::enable_rx_interrupt();
                report!("blk", n, ".read-on-line=ready");
                let lines = &crate::actions::LINES;
                let mut served = lines.load(core::sync::atomic::Ordering::Relaxed);
                loop {
                    cpu::disable_interrupts();
                    if lines.load(core::sync::atomic::Ordering::Relaxed) == served {
                        cpu::wait_for_interrupt();
                        continue;
                    }
                    served += 1;
                    zero(count * SECTOR);
                    let status = self.transfer(T_IN, sector, count, Layout::Direct);
                    let hash = Hex16(fnv1a64(count * SECTOR));
                    report!("blk", n, ".read=", Range(sector, count), status, ":", hash);
                }
            }
            BlkOp::FlushedHalt => {
                report!("blk", n, ".flushed-halt=ready");
                cpu::halt_forever();
            }
        }
    }
}

/// Too many sectors for the data buffer?
fn too_big(op: &BlkOp) -> bool {
    match *op {
        BlkOp::Read { count, .. }
        | BlkOp::Write { count, .. }
        | BlkOp::ReadOnLine { count, .. } => count > DATA_MAX / SECTOR,
        _ => false,
    }
}

/// Runs the `guest.blk` operations, if any; `dest` is the APIC id that takes the interrupts.
pub fn run(boot: &BootInfo, dest: u8) {
    let cmdline = boot.cmdline();
    let mut any = false;
    cmdline::for_each_blk_op(cmdline, |_| any = true);
    if !any {
        return;
    }
    if !boot.covers(AREAS, DATA + DATA_MAX) {
        report!(
            "guest: no RAM at ",
            Hex(AREAS),
            "-",
            Hex(DATA + DATA_MAX),
            " for guest.blk"
        );
        return;
    }
    let mut devices: [Option<Result<Blk, &'static str>>; MAX_DEVICES] =
        [const { None }; MAX_DEVICES];
    let mut found = 0;
    cmdline::for_each_virtio_mmio(cmdline, |entry| match entry {
        Ok((base, irq)) if base < 0xffff_f000 && base % 4 == 0 => {
            let mmio = Mmio { base, irq };
            if mmio.device_id() != Some(DEVICE_ID_BLOCK) || found == MAX_DEVICES {
                return;
            }
            let blk = Blk::new(found, mmio, dest);
            if let Err(why) = blk {
                report!(
                    "guest: blk",
                    Dec(found as u64),
                    " at ",
                    Hex(base),
                    ": ",
                    why
                );
            }
            devices[found] = Some(blk);
            found += 1;
        }
        Ok((base, _)) => report!("guest: virtio_mmio.device at ", Hex(base), " ignored"),
        Err(bad) => report!("guest: bad virtio_mmio.device entry ", bad),
    });
    cmdline::for_each_blk_op(cmdline, |item| match item {
        Ok((n, op)) if too_big(&op) => report!("guest: blk", Dec(n as u64), " transfer too big"),
        Ok((n, op)) => match devices.get_mut(n) {
            Some(Some(Ok(blk))) => blk.run(op, boot),
            _ => report!(
                "guest: blk",
                Dec(n as u64),
                " missing or unusable, op skipped"
            ),
        },
        Err(bad) => report!("guest: bad ", bad.param, " item ", bad.item),
    });
    let irqs = virtio::IRQS.load(core::sync::atomic::Ordering::Relaxed);
    report!("guest: blk irqs=", Dec(irqs.into()));
}
