//! The virtio devices under attack and their handshakes: a proper one (reset, features, queues
//! in the attack area, `DRIVER_OK`), so requests reach the device's deep paths, and a broken one
//! (random registers in random order with random values). Runs in ring 3.

use super::arena::Arena;
use super::regs::{self, QUEUE_NOTIFY, STATUS};
use super::rng::Rng;

pub const MAX_DEVS: usize = 8;
/// Queues the guest drives per device (net: receive and transmit).
pub const MAX_QUEUES: usize = 2;
pub const ID_NET: u32 = 1;
pub const ID_BLK: u32 = 2;

const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_ACK: u64 = 0x064;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;

/// A queue as the guest set it up.
#[derive(Clone, Copy)]
pub struct Vq {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Entries (a power of two), or 0 when the guest cannot write the rings (not set up, a size
    /// the device refuses, or rings outside the attack area).
    pub size: u16,
    /// The guest's avail index.
    pub idx: u16,
}

impl Vq {
    const NONE: Vq = Vq {
        desc: 0,
        avail: 0,
        used: 0,
        size: 0,
        idx: 0,
    };
}

/// A virtio-mmio device of the command line.
#[derive(Clone, Copy)]
pub struct Dev {
    pub n: usize,
    pub base: u64,
    pub id: u32,
    /// Features accepted at the last proper handshake.
    pub features: u64,
    /// Capacity in sectors (blk), read at set-up.
    pub capacity: u64,
    /// The MAC address (net), read at set-up.
    pub mac: [u8; 6],
    pub queues: [Vq; MAX_QUEUES],
}

impl Dev {
    pub fn new(n: usize, base: u64) -> Dev {
        let mut dev = Dev {
            n,
            base,
            id: regs::read32(base, 0x008),
            features: 0,
            capacity: 0,
            mac: [0; 6],
            queues: [Vq::NONE; MAX_QUEUES],
        };
        if dev.id == ID_BLK {
            dev.capacity = u64::from(dev.read(CONFIG)) | u64::from(dev.read(CONFIG + 4)) << 32;
        }
        for (i, b) in dev.mac.iter_mut().enumerate() {
            // SAFETY: a config-space byte of a virtio window (below 4 GiB).
            *b = unsafe { regs::load(base + CONFIG + i as u64, 1) } as u8;
        }
        dev
    }

    /// Queues worth driving (blk has one).
    pub fn nqueues(&self) -> usize {
        match self.id {
            ID_BLK => 1,
            _ => MAX_QUEUES,
        }
    }

    fn read(&self, offset: u64) -> u32 {
        regs::read32(self.base, offset)
    }

    fn write(&self, arena: &Arena, offset: u64, val: u32) {
        regs::write32(arena, self.base, offset, val);
    }

    /// Writes QueueNotify with `val` (the queue index, for a real notification).
    pub fn notify(&self, arena: &Arena, val: u32) {
        self.write(arena, QUEUE_NOTIFY, val);
    }

    /// Status 0: the device forgets its queues (the guest keeps its own view until the next
    /// handshake, and may go on publishing into the dead rings).
    pub fn reset(&self, arena: &Arena) {
        self.write(arena, STATUS, 0);
    }

    /// Returns the number of register accesses made.
    pub fn handshake(&mut self, rng: &mut Rng, arena: &Arena) -> u64 {
        self.write(arena, STATUS, 0);
        self.write(arena, STATUS, ACKNOWLEDGE);
        self.write(arena, STATUS, ACKNOWLEDGE | DRIVER);
        let mut offered = 0;
        for sel in 0..2 {
            self.write(arena, DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(DEVICE_FEATURES)) << (32 * sel);
        }
        // A random subset of the offer, or all of it; now and then bits the device did not
        // offer, or no VERSION_1, which it must refuse.
        let some = if rng.one_in(3) { u64::MAX } else { rng.next() };
        let mut accept = offered & some | F_VERSION_1;
        if rng.one_in(16) {
            accept ^= 1 << rng.below(64);
        }
        for sel in 0..2 {
            self.write(arena, DRIVER_FEATURES_SEL, sel);
            self.write(arena, DRIVER_FEATURES, (accept >> (32 * sel)) as u32);
        }
        let status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        self.write(arena, STATUS, status);
        self.read(STATUS);
        self.features = accept;
        let mut ops = 12;
        for q in 0..self.nqueues() {
            ops += self.setup_queue(rng, arena, q);
        }
        self.write(arena, STATUS, status | DRIVER_OK);
        ops + 1
    }

    /// Sets up queue `q`: usually the largest size the device offers (or a smaller power of
    /// two) with rings in its slot of the attack area; sometimes a size the device must refuse,
    /// or rings elsewhere (overlapping another queue's, in the MMIO gap, outside RAM).
    fn setup_queue(&mut self, rng: &mut Rng, arena: &Arena, q: usize) -> u64 {
        self.write(arena, QUEUE_SEL, q as u32);
        let max = self.read(QUEUE_NUM_MAX).min(256);
        let size = match rng.below(16) {
            0 => rng.pick(&[0, 3, 255, 257, 512, 0x8000, 0xffff, 0x1_0000]),
            1..4 if max > 1 => 1 << rng.below(u64::from(31 - max.leading_zeros()) + 1),
            _ => max,
        };
        let (mut desc, mut avail, mut used) = arena.rings(self.n, q);
        match rng.below(16) {
            0 => desc = arena.ring_addr(rng.next(), true),
            1 => avail = arena.ring_addr(rng.next(), false),
            2 => used = arena.ring_addr(rng.next(), false),
            3 => used = avail, // the device writes where it reads heads
            4 => (_, avail, used) = arena.rings(self.n ^ 1, q), // another device's
            5 => desc += 1 + rng.below(15), // misaligned
            _ => {}
        }
        let ok = size.is_power_of_two()
            && size <= max
            && arena.holds_rings(desc, 16 * u64::from(size))
            && arena.holds_rings(avail, 6 + 2 * u64::from(size));
        if ok {
            arena.zero(desc, 16 * u64::from(size));
            arena.zero(avail, 6 + 2 * u64::from(size));
            arena.zero(used, 6 + 8 * u64::from(size));
        }
        self.queues[q] = Vq {
            desc,
            avail,
            used,
            size: if ok { size as u16 } else { 0 },
            idx: 0,
        };
        self.write(arena, QUEUE_NUM, size);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            self.write(arena, reg, addr as u32);
            self.write(arena, reg + 4, (addr >> 32) as u32);
        }
        self.write(arena, QUEUE_READY, 1);
        10
    }

    /// A handshake without surprises (the check after the attack): `want` of the offered
    /// features and `VERSION_1`, every queue of the largest size offered (at most 256) in its
    /// slot of the attack area, zeroed. Returns whether the device took it.
    pub fn setup(&mut self, arena: &Arena, want: u64) -> bool {
        self.write(arena, STATUS, 0);
        self.write(arena, STATUS, ACKNOWLEDGE);
        self.write(arena, STATUS, ACKNOWLEDGE | DRIVER);
        let mut offered = 0;
        for sel in 0..2 {
            self.write(arena, DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(DEVICE_FEATURES)) << (32 * sel);
        }
        let accept = offered & want | F_VERSION_1;
        for sel in 0..2 {
            self.write(arena, DRIVER_FEATURES_SEL, sel);
            self.write(arena, DRIVER_FEATURES, (accept >> (32 * sel)) as u32);
        }
        let status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        self.write(arena, STATUS, status);
        if self.read(STATUS) & FEATURES_OK == 0 {
            return false;
        }
        self.features = accept;
        for q in 0..self.nqueues() {
            self.write(arena, QUEUE_SEL, q as u32);
            let size = self.read(QUEUE_NUM_MAX).min(256);
            if !size.is_power_of_two() {
                return false;
            }
            let (desc, avail, used) = arena.rings(self.n, q);
            arena.zero(desc, 16 * u64::from(size));
            arena.zero(avail, 6 + 2 * u64::from(size));
            arena.zero(used, 6 + 8 * u64::from(size));
            self.queues[q] = Vq {
                desc,
                avail,
                used,
                size: size as u16,
                idx: 0,
            };
            self.write(arena, QUEUE_NUM, size);
            for (reg, addr) in [
                (QUEUE_DESC, desc),
                (QUEUE_DRIVER, avail),
                (QUEUE_DEVICE, used),
            ] {
                self.write(arena, reg, addr as u32);
                self.write(arena, reg + 4, (addr >> 32) as u32);
            }
            self.write(arena, QUEUE_READY, 1);
        }
        self.write(arena, STATUS, status | DRIVER_OK);
        self.read(STATUS) & NEEDS_RESET == 0
    }

    /// A broken handshake: `steps` random register writes among those a driver makes, each
    /// with a random value, in random order.
    pub fn scramble(&mut self, rng: &mut Rng, arena: &Arena, steps: u64) -> u64 {
        const REGS: [u64; 15] = [
            STATUS,
            STATUS,
            STATUS,
            DEVICE_FEATURES_SEL,
            DRIVER_FEATURES,
            DRIVER_FEATURES_SEL,
            QUEUE_SEL,
            QUEUE_NUM,
            QUEUE_READY,
            QUEUE_DESC,
            QUEUE_DRIVER,
            QUEUE_DEVICE,
            QUEUE_DESC + 4,
            INTERRUPT_ACK,
            QUEUE_NOTIFY,
        ];
        const STATUSES: [u32; 10] = [0, 1, 3, 7, 11, 15, 0x40, 0x80, 0x8f, 0xff];
        for _ in 0..steps {
            let reg = rng.pick(&REGS);
            let val = match (reg, rng.below(4)) {
                (STATUS, 0..3) => rng.pick(&STATUSES),
                (_, 0..2) => rng.below(4) as u32,
                _ => rng.u32(),
            };
            self.write(arena, reg, val);
            if rng.one_in(4) {
                self.read(rng.pick(&[STATUS, QUEUE_READY, QUEUE_NUM_MAX, DEVICE_FEATURES]));
            }
        }
        // The guest keeps its view of the rings and may go on publishing into them, whatever
        // the device now thinks.
        steps
    }
}
