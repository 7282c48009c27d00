//! virtio-mmio (transport version 2) and one split virtqueue: device discovery from the
//! `virtio_mmio.device=` command-line entries, the status/feature handshake, queue setup,
//! publishing descriptor chains, and interrupt-driven completion with a PIT timeout.
//!
//! The ops are synchronous: one request is in flight at a time. Each request uses its own group
//! of [`GROUP`] descriptors (rotating through the table), so a request the device completes late
//! cannot have its descriptors rewritten under it by the next one. The benchmark (`blk/bench.rs`)
//! keeps several in flight through [`Queue::stage`], [`Queue::publish`] and [`Queue::next_used`].

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, compiler_fence, fence};

use crate::{apic, cpu, idt, pit};

// virtio-mmio registers (offsets from the slot base).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const MAGIC_VIRT: u32 = 0x7472_6976;
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;
const USED_NO_NOTIFY: u16 = 1;

/// Largest queue the driver sets up.
const MAX_QUEUE: u16 = 64;
/// Descriptors per request slot: header, data, status, one spare.
pub const GROUP: u16 = 4;
/// How long a request may take before it is reported as `timeout`.
const TIMEOUT_US: u64 = 1_000_000;
/// Most devices whose interrupts the handler acknowledges.
pub const MAX_DEVICES: usize = 8;

// Ring layout inside a queue area: descriptor table at +0, then the two rings.
const AVAIL_OFFSET: u64 = 0x400;
const USED_OFFSET: u64 = 0x800;

/// Bases of the set-up devices, for the interrupt handler (0 = unused).
static IRQ_BASES: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Interrupts taken on [`idt::VIRTIO_VECTOR`] (diagnostics only).
pub static IRQS: AtomicU32 = AtomicU32::new(0);

/// Stores `val` at guest-physical `addr`.
///
/// # Safety
/// `addr` must be identity-mapped memory the guest owns (queue areas, buffers) or a register.
pub unsafe fn put<T>(addr: u64, val: T) {
    // SAFETY: per the caller; volatile because the device reads it.
    unsafe { core::ptr::write_volatile(addr as *mut T, val) }
}

/// Loads a `T` from guest-physical `addr`.
///
/// # Safety
/// As for [`put`].
pub unsafe fn get<T>(addr: u64) -> T {
    // SAFETY: per the caller; volatile because the device writes it.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// One `virtio_mmio.device=` slot.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
    pub irq: u32,
}

impl Mmio {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: a register of a virtio-mmio slot the VMM announced, below 4 GiB (checked when
        // parsing), so identity mapped.
        unsafe { cpu::read32(self.base + reg) }
    }

    fn write(&self, reg: u64, val: u32) {
        // SAFETY: as in `read`.
        unsafe { cpu::write32(self.base + reg, val) }
    }

    /// `DeviceID` when the slot has the virtio magic, else `None`.
    pub fn device_id(&self) -> Option<u32> {
        (self.read(MAGIC) == MAGIC_VIRT).then(|| self.read(DEVICE_ID))
    }

    /// 32-bit config-space field at `offset`.
    pub fn config32(&self, offset: u64) -> u32 {
        self.read(CONFIG + offset)
    }

    /// 64-bit config-space field, read as two halves until `ConfigGeneration` is stable.
    pub fn config64(&self, offset: u64) -> u64 {
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let lo = self.config32(offset) as u64;
            let hi = self.config32(offset + 4) as u64;
            if self.read(CONFIG_GENERATION) == generation {
                return hi << 32 | lo;
            }
        }
    }

    fn write64(&self, reg: u64, val: u64) {
        self.write(reg, val as u32);
        self.write(reg + 4, (val >> 32) as u32);
    }

    fn fail(&self, why: &'static str) -> &'static str {
        self.write(STATUS, self.read(STATUS) | STATUS_FAILED);
        why
    }

    /// Resets the device and negotiates `VERSION_1` plus the offered bits of `known`; returns
    /// the accepted features.
    pub fn negotiate(&self, known: u64) -> Result<u64, &'static str> {
        if self.read(VERSION) != 2 {
            return Err("version is not 2");
        }
        self.write(STATUS, 0);
        if self.read(STATUS) != 0 {
            return Err("status not 0 after reset");
        }
        self.write(STATUS, STATUS_ACKNOWLEDGE);
        self.write(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= (self.read(DEVICE_FEATURES) as u64) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            return Err(self.fail("VERSION_1 not offered"));
        }
        let accepted = offered & (known | F_VERSION_1);
        for sel in 0..2 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        self.write(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if self.read(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(self.fail("FEATURES_OK not accepted"));
        }
        Ok(accepted)
    }
}

/// Queue 0 of a device, set up in the queue area at `area` (desc table, then the avail ring at
/// +0x400 and the used ring at +0x800).
pub struct Queue {
    mmio: Mmio,
    area: u64,
    size: u16,
    event_idx: bool,
    avail_idx: u16,
    /// Heads put in the avail ring after `avail_idx` but not yet published.
    staged: u16,
    last_used: u16,
}

/// How a request ended.
#[derive(Clone, Copy)]
pub enum Completion {
    /// The device put the chain in the used ring and interrupted.
    Used,
    /// The chain reached the used ring, but no interrupt came within the timeout.
    NoInterrupt,
    Timeout,
}

impl Queue {
    /// Sets up queue 0 after [`Mmio::negotiate`], sets `DRIVER_OK` and routes the IRQ to
    /// [`idt::VIRTIO_VECTOR`] on the CPU with APIC id `dest`. `slot` < [`MAX_DEVICES`].
    ///
    /// # Safety
    /// `area` must be 4 KiB of RAM the guest owns, for this queue only.
    pub unsafe fn new(
        mmio: Mmio,
        features: u64,
        area: u64,
        slot: usize,
        dest: u8,
    ) -> Result<Queue, &'static str> {
        if mmio.irq >= 24 {
            return Err(mmio.fail("IRQ beyond the I/O APIC's 24 pins"));
        }
        mmio.write(QUEUE_SEL, 0);
        if mmio.read(QUEUE_READY) != 0 {
            return Err(mmio.fail("queue 0 already ready after reset"));
        }
        let max = mmio.read(QUEUE_NUM_MAX).min(MAX_QUEUE as u32) as u16;
        if max < GROUP {
            return Err(mmio.fail("QueueNumMax below 4"));
        }
        let size = 1 << (15 - max.leading_zeros()); // a power of two, as split rings need
        // SAFETY: the caller gives us the 4 KiB at `area`.
        unsafe { crate::mem::memset(area as *mut u8, 0, 0x1000) };
        mmio.write(QUEUE_NUM, size as u32);
        mmio.write64(QUEUE_DESC, area);
        mmio.write64(QUEUE_DRIVER, area + AVAIL_OFFSET);
        mmio.write64(QUEUE_DEVICE, area + USED_OFFSET);
        mmio.write(QUEUE_READY, 1);
        IRQ_BASES[slot].store(mmio.base, Ordering::SeqCst);
        apic::route_irq(mmio.irq as u8, idt::VIRTIO_VECTOR, dest);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        mmio.write(STATUS, ok);
        if mmio.read(STATUS) != ok {
            return Err(mmio.fail("status did not stick after DRIVER_OK"));
        }
        Ok(Queue {
            mmio,
            area,
            size,
            event_idx: features & F_EVENT_IDX != 0,
            avail_idx: 0,
            staged: 0,
            last_used: 0,
        })
    }

    /// First descriptor of the next request's group.
    pub fn head(&self) -> u16 {
        self.avail_idx.wrapping_mul(GROUP) % self.size
    }

    /// Writes descriptor `index` of the descriptor table or indirect table at `table`.
    ///
    /// # Safety
    /// `table` must be a queue's table ([`Queue::table`]) or an indirect table the caller owns,
    /// with room for `index`.
    pub unsafe fn set_desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = table + 16 * index as u64;
        // SAFETY: per the caller.
        unsafe {
            put(d, addr);
            put(d + 8, len);
            put(d + 12, flags);
            put(d + 14, next);
        }
    }

    /// The descriptor table (for [`Queue::set_desc`]).
    pub fn table(&self) -> u64 {
        self.area
    }

    /// Number of descriptors in the table (and entries in each ring).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Puts the chain at `head` in the avail ring without publishing it (see [`Queue::publish`]).
    /// The caller keeps at most [`Queue::size`] chains outstanding.
    pub fn stage(&mut self, head: u16) {
        let slot = self.avail_idx.wrapping_add(self.staged) % self.size;
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(self.area + AVAIL_OFFSET + 4 + 2 * slot as u64, head) };
        self.staged += 1;
    }

    /// Publishes the staged chains (one store of the avail index) and notifies the device if it
    /// asked for it (`avail_event` with `EVENT_IDX`, else the used ring's `NO_NOTIFY` flag).
    pub fn publish(&mut self) {
        let avail = self.area + AVAIL_OFFSET;
        let used = self.area + USED_OFFSET;
        let old = self.avail_idx;
        let new = old.wrapping_add(self.staged);
        compiler_fence(Ordering::Release); // x86 keeps stores in order
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(avail + 2, new) };
        self.avail_idx = new;
        self.staged = 0;
        fence(Ordering::SeqCst); // the idx store must be visible before we read avail_event
        // SAFETY: the used ring lives in our queue area.
        let notify = unsafe {
            if self.event_idx {
                let event: u16 = get(used + 4 + 8 * self.size as u64);
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                get::<u16>(used) & USED_NO_NOTIFY == 0
            }
        };
        if notify {
            self.mmio.write(QUEUE_NOTIFY, 0);
        }
    }

    /// The descriptor id of the next used element, if the device has added one (re-arms
    /// `used_event` for the element after it).
    pub fn next_used(&mut self) -> Option<u32> {
        fence(Ordering::SeqCst);
        (self.used_idx() != self.last_used).then(|| self.pop_used())
    }

    /// Makes the chain at `head` available, notifies the device if it wants it, and waits for
    /// that chain in the used ring (completions of older, timed-out chains are skipped).
    pub fn submit(&mut self, head: u16) -> Completion {
        // Interrupts are off until `wait_halting` halts: none can be counted before this load.
        let irqs = IRQS.load(Ordering::SeqCst);
        let used_event = self.area + AVAIL_OFFSET + 4 + 2 * self.size as u64;
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(used_event, self.last_used) };
        self.stage(head);
        self.publish();
        let mut used_seen = false;
        apic::start_tick(idt::TICK_VECTOR);
        let interrupted = pit::wait_halting(TIMEOUT_US, || {
            fence(Ordering::SeqCst);
            while !used_seen && self.used_idx() != self.last_used {
                used_seen = self.pop_used() == head as u32;
            }
            used_seen && IRQS.load(Ordering::SeqCst) != irqs
        });
        apic::stop_tick();
        match (used_seen, interrupted) {
            (true, true) => Completion::Used,
            (true, false) => Completion::NoInterrupt,
            (false, _) => Completion::Timeout,
        }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring lives in our queue area.
        unsafe { get(self.area + USED_OFFSET + 2) }
    }

    /// Takes the next used element and returns its descriptor id; re-arms `used_event` for the
    /// element after it.
    fn pop_used(&mut self) -> u32 {
        let elem = self.area + USED_OFFSET + 4 + 8 * (self.last_used % self.size) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: the rings live in our queue area.
        unsafe {
            put(
                self.area + AVAIL_OFFSET + 4 + 2 * self.size as u64,
                self.last_used,
            );
            get(elem)
        }
    }
}

/// Interrupt handler of [`idt::VIRTIO_VECTOR`] (all virtio devices share it): acknowledges every
/// set-up device's pending interrupt causes, then the LAPIC.
pub extern "C" fn on_irq() {
    IRQS.fetch_add(1, Ordering::Relaxed);
    for base in &IRQ_BASES {
        let base = base.load(Ordering::Relaxed);
        if base != 0 {
            let mmio = Mmio { base, irq: 0 };
            let pending = mmio.read(INTERRUPT_STATUS);
            if pending != 0 {
                mmio.write(INTERRUPT_ACK, pending);
            }
        }
    }
    apic::eoi();
}
