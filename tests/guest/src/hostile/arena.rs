//! The attack area: 16 MiB at the top of the highest RAM entry below 4 GiB (with `--memory 256`,
//! 0x0f00_0000-0x0fff_ffff). Every queue, descriptor table and buffer the hostile mode gives a
//! device lies in it, and every guest-physical range it hands out is either inside it or overlaps
//! no RAM at all ([`Arena::fix`], [`Arena::ring_addr`]): so even a device that wrote where it
//! must not (a range it should have refused) could only scribble on the area, never on the
//! guest's code, stacks or page tables. Being at the top of RAM, it also lets a range start in
//! RAM and run past its end.
//!
//! Data the device writes (disk contents, frames) may look like anything, so it never lands
//! where the device later reads descriptors: buffers stay out of the ring and indirect-table
//! regions, and used rings (which the device writes) never overlap descriptor tables: queue
//! addresses are kept to their region by kind ([`Arena::ring_addr`]).
//!
//! Layout (offsets in the area): descriptor tables from `DESCS`, avail and used rings from
//! `RINGS` (device *d*, queue *q* in slot `4 * d + q` of 32 KiB in each), indirect tables at
//! `INDIRECT`, small buffers (request headers, status bytes, net headers) at `SMALL`, data
//! buffers at `DATA`.

use super::rng::Rng;
use crate::bootinfo::BootInfo;

pub const LEN: u64 = 16 << 20;
/// The area must lie above everything the other guest modules use (net's buffers end here).
const FLOOR: u64 = 0x0500_0000;
const DESCS: u64 = 0;
const RINGS: u64 = 0x10_0000;
const SLOT: u64 = 0x8000;
/// Offset of the used ring in a ring slot (after an avail ring of up to 256 entries).
const USED: u64 = 0x1000;
pub const QUEUE_SLOTS: u64 = 4;
const INDIRECT: u64 = 0x20_0000;
/// Indirect tables go in the first 64 KiB of their 2 MiB region: the device may read up to
/// 65535 entries (1 MiB) from one, all of which must be what the guest wrote (or zeros).
const INDIRECT_USED: u64 = 0x1_0000;
/// The most entries an indirect table may have (its length is a u32, its indices u16).
pub const HOARD_ENTRIES: u16 = u16::MAX;
const _: () = assert!(INDIRECT + INDIRECT_USED + 16 * HOARD_ENTRIES as u64 <= SMALL);
const SMALL: u64 = 0x40_0000;
const DATA: u64 = 0x50_0000;
/// Room kept after a queue address (the device takes at most 256 entries: 4 KiB of
/// descriptors, a 2 KiB used ring).
const RING_ROOM: u64 = 0x8000;
/// The 32-bit MMIO gap and where the I/O APIC starts (its page has attacks of its own,
/// `ioapic.rs`; the local APIC is KVM's: the guest leaves it alone).
pub const GAP: u64 = 0xc000_0000;
pub const GAP_END: u64 = 0xfec0_0000;
const MAX_RAM: usize = 8;

pub struct Arena {
    pub base: u64,
    /// The RAM entries of the memory map (start, end).
    ram: [(u64, u64); MAX_RAM],
    nram: usize,
}

impl Arena {
    /// The area, if some RAM entry below 4 GiB has 16 MiB above [`FLOOR`].
    pub fn find(boot: &BootInfo) -> Option<Arena> {
        let mut arena = Arena {
            base: 0,
            ram: [(0, 0); MAX_RAM],
            nram: 0,
        };
        for r in boot.e820().iter().filter(|r| r.kind == 1) {
            let end = r.start.saturating_add(r.size);
            if let Some(slot) = arena.ram.get_mut(arena.nram) {
                *slot = (r.start, end);
                arena.nram += 1;
            }
            let base = end.min(1 << 32).saturating_sub(LEN) & !0xfff;
            if base >= FLOOR && base >= r.start && base > arena.base {
                arena.base = base;
            }
        }
        (arena.base != 0).then_some(arena)
    }

    pub fn end(&self) -> u64 {
        self.base + LEN
    }

    /// The descriptor table, avail ring and used ring of device `dev`, queue slot `q`, each
    /// with room for 256 entries.
    pub fn rings(&self, dev: usize, q: usize) -> (u64, u64, u64) {
        let slot = (dev as u64 * QUEUE_SLOTS + q as u64 % QUEUE_SLOTS) % ((RINGS - DESCS) / SLOT);
        let ring = self.base + RINGS + slot * SLOT;
        (self.base + DESCS + slot * SLOT, ring, ring + USED)
    }

    /// Whether the guest may write `len` bytes at `addr` as ring contents (a descriptor table or
    /// avail ring it set up): inside the ring regions.
    pub fn holds_rings(&self, addr: u64, len: u64) -> bool {
        addr >= self.base + DESCS && addr.saturating_add(len) <= self.base + INDIRECT
    }

    /// A 4 KiB indirect table slot.
    pub fn indirect(&self, rng: &mut Rng) -> u64 {
        self.base + INDIRECT + rng.below(INDIRECT_USED / 4096) * 4096
    }

    /// The hoarding table (`chains::hoard`): [`HOARD_ENTRIES`] descriptors right after the
    /// indirect slots, still inside the indirect-table region.
    pub fn hoard_table(&self) -> u64 {
        self.base + INDIRECT + INDIRECT_USED
    }

    /// A small buffer (16-byte aligned, with 256 bytes of room).
    pub fn small(&self, rng: &mut Rng) -> u64 {
        self.base + SMALL + rng.below((DATA - SMALL - 256) / 16) * 16
    }

    /// Whether `[addr, addr + len)` lies in the buffer regions, where the guest may write.
    pub fn owns(&self, addr: u64, len: u64) -> bool {
        addr >= self.base + SMALL && addr.saturating_add(len) <= self.end()
    }

    /// The start of the small-buffer region (1 MiB), for the check after the attack.
    pub fn scratch(&self) -> u64 {
        self.base + SMALL
    }

    /// A data buffer with `len` bytes of room when `len` fits the data region (sector aligned).
    pub fn data(&self, rng: &mut Rng, len: u64) -> u64 {
        let room = (LEN - DATA).saturating_sub(len) / 512;
        self.base + DATA + rng.below(room + 1) * 512
    }

    /// Whether `[addr, addr + len)` overlaps RAM only inside `[lo, hi)` (a part of the area;
    /// ranges that wrap past 2^64 overlap nothing at their top).
    fn harmless(&self, addr: u64, len: u64, lo: u64, hi: u64) -> bool {
        let end = addr.saturating_add(len);
        self.ram[..self.nram].iter().all(|&(start, stop)| {
            let (a, b) = (addr.max(start), end.min(stop));
            a >= b || (a >= lo && b <= hi)
        })
    }

    /// A buffer `(addr, len)` made safe: kept if it overlaps RAM only in the buffer regions
    /// (small and data: never rings or indirect tables, whose contents the device must only
    /// ever see as the guest wrote them), else moved there at the same offset modulo their size,
    /// and cut at the area's end if still needed.
    pub fn fix(&self, addr: u64, len: u32) -> (u64, u32) {
        let (lo, hi) = (self.base + SMALL, self.end());
        if self.harmless(addr, len.into(), lo, hi) {
            return (addr, len);
        }
        let addr = lo + addr % (hi - lo);
        (addr, (hi - addr).min(len.into()) as u32)
    }

    /// A queue address as the driver writes it (`desc`: the descriptor table, else the avail or
    /// used ring) made safe: kept if it overlaps RAM only in its region (with room for the
    /// largest ring), else moved there. Descriptor tables must hold only what the guest wrote
    /// (data the device writes may look like any descriptor), so used rings, which the device
    /// writes, keep out of their region.
    pub fn ring_addr(&self, addr: u64, desc: bool) -> u64 {
        let (lo, hi) = match desc {
            true => (self.base + DESCS, self.base + RINGS),
            false => (self.base + RINGS, self.base + INDIRECT),
        };
        match self.harmless(addr, RING_ROOM, lo, hi) {
            true => addr,
            false => lo + addr % (hi - lo - RING_ROOM),
        }
    }

    /// Whether all RAM lies below 4 GiB: then a queue address with a non-zero high half is
    /// outside RAM whatever its low half.
    pub fn ram_below_4g(&self) -> bool {
        self.ram[..self.nram].iter().all(|&(_, end)| end <= 1 << 32)
    }

    /// A guest-physical address for a buffer, from every kind a hostile driver would try. The
    /// caller passes it through [`Arena::fix`] with its length.
    pub fn addr(&self, rng: &mut Rng) -> u64 {
        match rng.below(100) {
            0..35 => self.small(rng),
            35..60 => self.data(rng, 0),
            60..68 => self.base + SMALL + rng.below(LEN - SMALL),
            // Outside RAM (the MMIO gap too, virtio windows included: DMA into registers).
            68..83 => self.outside(rng),
            // The last bytes of RAM: ranges from here run past its end.
            83..93 => self.end() - 1 - rng.below(4096),
            93..96 => 0,
            _ => self.base + SMALL,
        }
    }

    /// An address outside RAM: above it below the gap, in the MMIO gap, above 4 GiB, far above,
    /// or just below 2^64.
    pub fn outside(&self, rng: &mut Rng) -> u64 {
        let addr = match rng.below(5) {
            0 => self.end() + rng.below(GAP.saturating_sub(self.end()).max(1)),
            1 => GAP + rng.below(0x10_0000),
            2 => (1 << 32) + rng.below(1 << 36),
            3 => (1 << 48) + rng.below(1 << 40),
            _ => u64::MAX - rng.below(0x1_0000),
        };
        match self.harmless(addr, 1 << 20, 0, 0) {
            true => addr,
            false => u64::MAX - 0xfff,
        }
    }

    /// A descriptor length, from every kind a hostile driver would try: empty, odd, a sector, a
    /// page, the most a frame or request may be, and up to 4 GiB.
    pub fn len(&self, rng: &mut Rng) -> u32 {
        match rng.below(20) {
            0 => 0,
            1 => 1,
            2 => rng.pick(&[6, 10, 11, 12, 13, 15, 16, 17]),
            3 => rng.pick(&[511, 512, 513, 1024, 4095, 4096, 4097]),
            4 => rng.pick(&[65_535, 65_536, 65_550, 65_562, 65_563, 70_000]),
            5 => rng.pick(&[0xffff_f000, 0xffff_ffff, 0x8000_0000, 0x7fff_ffff]),
            6 => rng.u32(),
            7..10 => 512 * (1 + rng.below(256)) as u32,
            10..13 => rng.below(16 << 20) as u32,
            _ => rng.below(4096) as u32,
        }
    }

    /// Zeroes `len` bytes at `addr`, which must be inside the area.
    pub fn zero(&self, addr: u64, len: u64) {
        if addr >= self.base && addr.saturating_add(len) <= self.end() {
            // SAFETY: inside the area, which only this mode uses.
            unsafe { crate::mem::memset(addr as *mut u8, 0, len as usize) };
        }
    }
}
