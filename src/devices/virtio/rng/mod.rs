//! virtio-rng (device type 4, "entropy device"): one request queue whose chains the guest hands
//! over empty; the device fills their writable descriptors with random bytes from the host
//! kernel (getrandom, never blocking the event loop) and returns them. Linux's `virtio-rng`
//! driver feeds them to its random number generator (`hw_random`), which is how a clone of a
//! snapshot gets fresh entropy besides its new VM generation ID.
//!
//! Bounds: at most [`MAX_REQUEST_BYTES`] per chain (a longer chain gets that much, as the
//! spec allows), at most a drain's budget per turn of the event loop, and within the device's
//! rate limiter (bytes and requests), whose timer resumes a held-back queue.

mod persist;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::Bytes;

pub use persist::RngState;

use super::drain::{Pass, drain};
use super::rate_limiter::{RateLimiter, Timer};
use super::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    return_chain,
};
use crate::config::RateLimiterConfig;
use crate::devices::GuestErrors;
use crate::devices::entropy::{self, Wait};
use crate::guest_memory::GuestMemoryMmap;

const VIRTIO_ID_RNG: u32 = 4;
/// The request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Most random bytes one request gets (Linux asks for 64 at a time).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// What the device has done, readable while the VM runs (Firecracker's entropy metrics).
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Random bytes given to the guest.
    pub bytes: AtomicU64,
    /// Requests refused (a readable descriptor, an address outside guest memory, a chain
    /// longer than the queue).
    pub bad_requests: AtomicU64,
    /// Requests the host's generator could not serve (answered with no bytes).
    pub host_rng_fails: AtomicU64,
    /// Requests the rate limiter held back.
    pub throttled: AtomicU64,
    /// Times the rate limiter's timer resumed the queue.
    pub timer_events: AtomicU64,
}

/// The device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The rate limiter's timerfd.
    #[error("entropy device: cannot create the rate limiter's timer")]
    Timer(#[source] std::io::Error),
}

/// A virtio-rng device.
pub struct Rng {
    counters: Arc<RngCounters>,
    errors: GuestErrors,
    limiter: RateLimiter,
    /// Present when the device is rate limited: wakes the queue the limiter held back.
    timer: Option<Timer>,
    /// The queue waits for the timer, not for the guest.
    stalled: bool,
    /// The last drain ran out of its budget with work left.
    backlog: bool,
    /// Random bytes for one request.
    buf: Vec<u8>,
}

impl Rng {
    /// A device within `limiter` (`None`: unlimited).
    pub fn new(limiter: Option<&RateLimiterConfig>) -> Result<Self, RngError> {
        let limiter = RateLimiter::new(limiter);
        let timer = if limiter.is_unlimited() {
            None
        } else {
            Some(Timer::new().map_err(RngError::Timer)?)
        };
        Ok(Rng {
            counters: Arc::default(),
            errors: GuestErrors::default(),
            limiter,
            timer,
            stalled: false,
            backlog: false,
            buf: vec![0; MAX_REQUEST_BYTES],
        })
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }

    /// Serves the request queue, a budget at a time, until it is empty or the limiter holds
    /// a request back; returns whether chains were returned.
    fn run_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        self.stalled = false;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            while budget.allows() {
                let Some(chain) = queue.iter(mem)?.next() else {
                    return Ok(Pass::Drained { found });
                };
                found = true;
                let head = chain.head_index();
                // One more than a queue can hold: a looping chain is cut, and refused.
                let descriptors: Vec<Descriptor> =
                    chain.take(usize::from(QUEUE_SIZE) + 1).collect();
                let Some(want) = self.requested(&descriptors) else {
                    self.refuse(queue, mem, head);
                    used_any = true;
                    budget.charge(0);
                    continue;
                };
                if !self.admit(want) {
                    // Taken again, whole, when the timer fires.
                    queue.go_to_previous_position();
                    self.stalled = true;
                    return Ok(Pass::Stopped);
                }
                let len = self.fill(&descriptors, want, mem);
                budget.charge(u64::from(len));
                return_chain(queue, mem, head, len, &self.errors);
                used_any = true;
            }
            Ok(Pass::Exhausted)
        });
        end.record(&self.errors, "virtio-rng");
        self.backlog = end.backlog();
        used_any
    }

    /// How many bytes a chain asks for (its writable length, capped), or `None` when the
    /// chain is not a request: a readable descriptor, or a chain virtio-queue cut short (a
    /// loop, or longer than the queue: its last descriptor still points on).
    fn requested(&self, descriptors: &[Descriptor]) -> Option<usize> {
        let cut = descriptors.len() > usize::from(QUEUE_SIZE)
            || descriptors.last().is_some_and(|d| d.has_next());
        if cut || descriptors.iter().any(|d| !d.is_write_only()) {
            return None;
        }
        let total: u64 = descriptors.iter().map(|d| u64::from(d.len())).sum();
        Some(
            usize::try_from(total)
                .unwrap_or(usize::MAX)
                .min(MAX_REQUEST_BYTES),
        )
    }

    fn refuse(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) {
        self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        self.errors
            .record(|| "virtio-rng: request refused (not a chain of writable buffers)".into());
        return_chain(queue, mem, head, 0, &self.errors);
    }

    /// Whether a request of `bytes` may be served now (every request costs an operation, an
    /// empty one too); if not, the timer is armed.
    fn admit(&mut self, bytes: usize) -> bool {
        let was_blocked = self.limiter.is_blocked();
        match self.limiter.consume(bytes as u64) {
            Ok(()) => true,
            Err(wait) => {
                if !was_blocked {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(timer) = &mut self.timer {
                    timer.arm(wait);
                }
                false
            }
        }
    }

    /// Writes `want` random bytes over `descriptors`, in order; returns how many landed.
    fn fill(&mut self, descriptors: &[Descriptor], want: usize, mem: &GuestMemoryMmap) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let random = &mut self.buf[..want];
        if let Err(e) = entropy::fill(random, Wait::Never) {
            self.counters.host_rng_fails.fetch_add(1, Ordering::Relaxed);
            log::debug!("virtio-rng: the host's generator failed: {e}");
            return 0;
        }
        let mut written = 0usize;
        for desc in descriptors {
            if written == want {
                break;
            }
            let n = usize::try_from(desc.len())
                .unwrap_or(usize::MAX)
                .min(want - written);
            if mem
                .write_slice(&random[written..written + n], desc.addr())
                .is_err()
            {
                self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                self.errors
                    .record(|| "virtio-rng: a buffer lies outside guest memory".into());
                break;
            }
            written += n;
        }
        self.counters
            .bytes
            .fetch_add(written as u64, Ordering::Relaxed);
        u32::try_from(written).unwrap_or(u32::MAX)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn config_space(&self) -> &[u8] {
        &[]
    }

    fn activate(&mut self, _features: u64) {}

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        // A notification while the limiter holds the queue back changes nothing: the timer
        // resumes it.
        if index != 0 || self.stalled {
            return false;
        }
        self.run_queue(queue, mem)
    }

    fn reset(&mut self) {
        self.stalled = false;
        self.backlog = false;
        self.limiter.unblock();
    }

    fn take_backlog(&mut self) -> u32 {
        u32::from(std::mem::take(&mut self.backlog))
    }

    fn save_state(&self) -> super::state::VirtioDeviceState {
        self.save_device_state()
    }

    fn restore_state(
        &mut self,
        state: &super::state::VirtioDeviceState,
    ) -> Result<(), crate::devices::StateError> {
        self.restore_device_state(state)
    }

    fn timer(&self) -> Option<RawFd> {
        self.timer.as_ref().map(Timer::fd)
    }

    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> u32 {
        if let Some(timer) = &mut self.timer {
            timer.fired();
        }
        self.counters.timer_events.fetch_add(1, Ordering::Relaxed);
        self.limiter.unblock();
        match queues.first_mut() {
            Some(queue) if self.stalled => u32::from(self.run_queue(queue, mem)),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests;
