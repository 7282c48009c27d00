//! Device models. They know nothing of KVM: a device gets guest memory, an interrupt trigger (an
//! `EventFd`) and its backend, which keeps each one testable without a VM.

pub mod bus;
pub mod entropy;
pub mod legacy;
pub mod pseudo;
pub mod state;
pub mod virtio;

pub use state::StateError;

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Counts something a guest did wrong, and logs it at the 1st, 2nd, 4th, 8th... time, so a
/// hostile guest can neither go unnoticed nor flood the log.
#[derive(Debug)]
pub struct GuestErrors {
    count: AtomicU64,
    level: log::Level,
}

impl Default for GuestErrors {
    fn default() -> Self {
        GuestErrors {
            count: AtomicU64::new(0),
            level: log::Level::Warn,
        }
    }
}

impl GuestErrors {
    /// Logged at debug level: for what guests do routinely, like probing for absent hardware.
    pub fn quiet() -> Self {
        GuestErrors {
            count: AtomicU64::new(0),
            level: log::Level::Debug,
        }
    }

    /// Counts one error; `describe` is only called when the line is logged.
    pub fn record(&self, describe: impl FnOnce() -> String) {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            log::log!(self.level, "{} ({count} so far)", describe());
        }
    }

    /// How many were counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Raises an interrupt by signalling an `EventFd` that KVM routes to a GSI (irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
