//! virtio devices over the virtio-mmio transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns the register state and the queues; a device
//! implements [`VirtioDevice`]: what it offers, its config space, and what to do when a queue is
//! notified. Queue work runs on the event loop (notifications arrive as ioeventfds), interrupts
//! leave through an irqfd; vCPU threads only touch registers.

pub mod block;
pub mod drain;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod state;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::EventSet;

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::state::VirtioDeviceState;
use crate::devices::StateError;

/// Feature bit: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// InterruptStatus bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// A device behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// The device-specific config space (read-only to the driver).
    fn config_space(&self) -> &[u8];
    /// The driver accepted `features` and set DRIVER_OK.
    fn activate(&mut self, features: u64);
    /// Serves queue `index`; returns true if the used ring moved.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self);
    /// Queues (one bit each) whose last drain ran out of its budget with work left, cleared by
    /// reading: the transport serves them again on a later turn of the event loop, which in
    /// between sees its other events (the stop event among them).
    fn take_backlog(&mut self) -> u32 {
        0
    }
    /// A descriptor the event loop watches for the device besides its queues (a TAP, say), and
    /// the readiness the device waits for right now (empty: none).
    fn backend(&self) -> Option<(RawFd, EventSet)> {
        None
    }
    /// The backend is ready for `events`; returns one bit per queue whose used ring moved.
    /// `events` may hold `ERROR` or `HANG_UP`, which epoll reports whether asked for or not,
    /// and again on every wait: a device that gets them must stop asking ([`Self::backend`]
    /// `None`), or the event loop spins.
    fn process_backend(
        &mut self,
        _events: EventSet,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> u32 {
        0
    }
    /// Puts the device on another disk image (`PATCH /drives` after boot); only virtio-blk can.
    /// The caller tells the driver the configuration changed.
    fn replace_disk(&mut self, _disk: block::DiskFile) -> Result<(), String> {
        Err("this device has no disk".into())
    }
    /// Lets another VMM take the device's backend (a migration's hand-over; the VM is paused):
    /// a disk is flushed and unlocked. Undone by [`VirtioDevice::reclaim_backend`].
    fn release_backend(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Takes the backend back after [`VirtioDevice::release_backend`] (the migration failed).
    fn reclaim_backend(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Before a save, on the event loop: gives back to the guest's rings whatever the device
    /// took from them and still holds, so nothing is in flight.
    fn prepare_save(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) {}
    /// The device's own state.
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::None
    }
    /// Applies a saved state to this freshly built device, checking all of it first.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::None => Ok(()),
            other => Err(StateError::mismatch(
                "virtio device",
                format!("state of {} for a stateless device", other.kind()),
            )),
        }
    }
    /// The descriptor of the device's timer (a rate limiter's wake-up), watched for input for
    /// the device's whole life; `None`: the device has none.
    fn timer(&self) -> Option<RawFd> {
        None
    }
    /// The timer fired; returns one bit per queue whose used ring moved.
    fn process_timer(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> u32 {
        0
    }
    /// Completes everything the device has in flight (waiting for its backend, on any thread,
    /// without the event loop's system calls), returning the chains to the guest: called
    /// before a reset, and by the VMM before a pause, a snapshot or a teardown. Returns one bit
    /// per queue whose used ring moved.
    fn quiesce(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> u32 {
        0
    }
    /// Replaces rate limiter `which` at run time (`None`: unlimited); false if the device has
    /// no such limiter.
    fn set_rate_limiter(
        &mut self,
        _which: LimiterKind,
        _config: Option<&crate::config::RateLimiterConfig>,
    ) -> bool {
        false
    }
}

/// Which of a device's rate limiters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimiterKind {
    /// A disk's (every request).
    Disk,
    /// A network interface's receive direction.
    Rx,
    /// A network interface's transmit direction.
    Tx,
}

/// Returns chain `head` to the guest with `len` bytes written. A head the guest put in its
/// available ring may be any number: one past the queue is counted here, not handed to
/// virtio-queue (which would refuse it with an unthrottled log line).
pub fn return_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    errors: &crate::devices::GuestErrors,
) {
    if head >= queue.size() {
        errors.record(|| format!("virtio: chain head {head} is past the queue's end"));
        return;
    }
    if let Err(e) = queue.add_used(mem, head, len) {
        errors.record(|| format!("virtio: cannot return a chain: {e:?}"));
    }
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus bits plus the irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised by signalling `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: nothing pending.
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}
