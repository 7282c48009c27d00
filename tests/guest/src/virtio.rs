//! virtio-mmio (transport version 2): device discovery from the `virtio_mmio.device=`
//! command-line entries, the status/feature handshake, `DRIVER_OK` with the IRQ routed to
//! [`idt::VIRTIO_VECTOR`], and the interrupt handler all devices share. The split virtqueue is in
//! `virtio/queue.rs`.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::{apic, cpu, idt};

mod queue;

pub use queue::{Completion, Queue};

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

/// Most block devices the blk driver sets up.
pub const MAX_DEVICES: usize = 8;
/// Most devices (of any type) whose interrupts the handler acknowledges.
const IRQ_SLOTS: usize = 16;

/// Bases of the devices that reached `DRIVER_OK`, for the interrupt handler (0 = unused).
static IRQ_BASES: [AtomicU64; IRQ_SLOTS] = [const { AtomicU64::new(0) }; IRQ_SLOTS];
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

    /// `N` config-space bytes from `offset`, read one byte at a time (as Linux reads a MAC
    /// address) until `ConfigGeneration` is stable.
    pub fn config_bytes<const N: usize>(&self, offset: u64) -> [u8; N] {
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let mut bytes = [0; N];
            for (i, b) in bytes.iter_mut().enumerate() {
                // SAFETY: a config-space byte of the slot (see `read`).
                *b = unsafe { get::<u8>(self.base + CONFIG + offset + i as u64) };
            }
            if self.read(CONFIG_GENERATION) == generation {
                return bytes;
            }
        }
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
        self.negotiate_with(|offered| offered & known)
    }

    /// Like [`Mmio::negotiate`], with `choose` picking the accepted bits out of the offered ones
    /// (it may drop a bit whose prerequisite was not offered); `VERSION_1` is always accepted.
    pub fn negotiate_with(&self, choose: impl Fn(u64) -> u64) -> Result<u64, &'static str> {
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
        let accepted = offered & (choose(offered) | F_VERSION_1);
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

    /// After the queues are set up: registers the device with the interrupt handler, routes its
    /// IRQ to [`idt::VIRTIO_VECTOR`] on the CPU with APIC id `dest` and sets `DRIVER_OK`.
    pub fn driver_ok(&self, dest: u8) -> Result<(), &'static str> {
        if self.irq >= 24 {
            return Err(self.fail("IRQ beyond the I/O APIC's 24 pins"));
        }
        let slot = IRQ_BASES.iter().find(|b| {
            let base = b.load(Ordering::SeqCst);
            base == self.base || base == 0
        });
        let Some(slot) = slot else {
            return Err(self.fail("too many virtio devices"));
        };
        slot.store(self.base, Ordering::SeqCst);
        apic::route_irq(self.irq as u8, idt::VIRTIO_VECTOR, dest);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write(STATUS, ok);
        if self.read(STATUS) != ok {
            return Err(self.fail("status did not stick after DRIVER_OK"));
        }
        Ok(())
    }
}

/// Interrupt handler of [`idt::VIRTIO_VECTOR`] (all virtio devices share it): acknowledges every
/// set-up device's pending interrupt causes, then the LAPIC.
pub extern "C" fn on_irq() {
    IRQS.fetch_add(1, Ordering::Relaxed);
    ack_all();
    apic::eoi();
}

/// Acknowledges every set-up device's pending interrupt causes, so that their (level) lines
/// drop and the next cause makes a new edge at the edge-triggered I/O APIC pin. A driver that
/// sleeps with interrupts taken while it had them off calls this before looking at its rings.
pub fn ack_all() {
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
}
