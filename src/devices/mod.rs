//! Device models. They know nothing of KVM: a device gets guest memory, an interrupt trigger (an
//! `EventFd`) and its backend, which keeps each one testable without a VM.

pub mod bus;
pub mod legacy;

use vmm_sys_util::eventfd::EventFd;

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
