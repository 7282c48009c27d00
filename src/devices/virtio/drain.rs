//! The drain loop every queue a device consumes shares: suppress notifications, take what the
//! guest made available, re-enable them, and go round again if a request raced with that (the
//! EVENT_IDX race) — without ever spinning on a ring the guest broke.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::super::GuestErrors;

/// How one pass over the available ring ended.
pub enum Pass {
    /// Everything available was taken; `found` says whether there was anything.
    Drained {
        /// The pass took at least one chain.
        found: bool,
    },
    /// The device cannot take more now (its backend would block): wait for it, not the guest.
    Stopped,
}

/// Why draining ended.
#[derive(Debug)]
pub enum DrainEnd {
    /// Nothing more is available and notifications are on again.
    Idle,
    /// The pass stopped; notifications stay suppressed until the device resumes.
    Stopped,
    /// The guest's ring could not be read.
    Broken(virtio_queue::Error),
    /// Re-enabling notifications reported a chain the next pass did not find: the guest's rings
    /// overlap, so the device's own writes move the available index.
    PhantomChain,
}

impl DrainEnd {
    /// Counts and logs a broken ring or a phantom chain against `ring` (e.g. `virtio-blk`).
    pub fn record(&self, errors: &GuestErrors, ring: &str) {
        match self {
            DrainEnd::Idle | DrainEnd::Stopped => {}
            DrainEnd::Broken(e) => errors.record(|| format!("{ring}: broken ring: {e:?}")),
            DrainEnd::PhantomChain => {
                errors.record(|| format!("{ring}: available index moves under the device"))
            }
        }
    }
}

/// Runs `pass` with notifications suppressed until re-enabling them finds nothing new. A ring
/// error, a stopped pass, or a re-check whose pass finds nothing ends it: the event loop is
/// never spun by what the guest wrote.
pub fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut pass: impl FnMut(&mut Queue) -> Result<Pass, virtio_queue::Error>,
) -> DrainEnd {
    let mut recheck = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            return DrainEnd::Broken(e);
        }
        match pass(queue) {
            Err(e) => return DrainEnd::Broken(e),
            Ok(Pass::Stopped) => return DrainEnd::Stopped,
            Ok(Pass::Drained { found: false }) if recheck => return DrainEnd::PhantomChain,
            Ok(Pass::Drained { .. }) => {}
        }
        match queue.enable_notification(mem) {
            Ok(true) => recheck = true,
            Ok(false) => return DrainEnd::Idle,
            Err(e) => return DrainEnd::Broken(e),
        }
    }
}
