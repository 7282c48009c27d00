//! The drain loop every queue a device consumes shares: suppress notifications, take what the
//! guest made available, re-enable them, and go round again if a request raced with that (the
//! EVENT_IDX race) — without ever spinning on a ring the guest broke, and without doing more
//! than one pass's [`Budget`] of work before the event loop gets its thread back.

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::super::GuestErrors;

/// Chains one drain may take before it hands the thread back.
pub const CHAINS_PER_PASS: u32 = 64;
/// Guest bytes one drain may move before it hands the thread back (a chain that starts within
/// the budget is finished, so a pass moves at most this plus one request).
pub const BYTES_PER_PASS: u64 = 16 << 20;

/// What one drain may still do. A guest can make any number of chains available, each of them
/// as large as the device allows: the event loop, which also carries the stop event and Ctrl-A
/// x, and the vCPUs, which wait for the device's lock, must not wait for all of them.
#[derive(Debug)]
pub struct Budget {
    chains: u32,
    bytes: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            chains: CHAINS_PER_PASS,
            bytes: BYTES_PER_PASS,
        }
    }
}

impl Budget {
    /// Whether another chain may be taken.
    pub fn allows(&self) -> bool {
        self.chains > 0 && self.bytes > 0
    }

    /// One chain taken, moving `bytes` of guest data.
    pub fn charge(&mut self, bytes: u64) {
        self.chains = self.chains.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// How one pass over the available ring ended.
pub enum Pass {
    /// Everything available was taken; `found` says whether there was anything.
    Drained {
        /// The pass took at least one chain.
        found: bool,
    },
    /// The device cannot take more now (its backend would block): wait for it, not the guest.
    Stopped,
    /// The budget ran out before the ring did (or just as it did).
    Exhausted,
}

/// Why draining ended.
#[derive(Debug)]
pub enum DrainEnd {
    /// Nothing more is available and notifications are on again.
    Idle,
    /// The pass stopped; notifications stay suppressed until the device resumes.
    Stopped,
    /// The budget ran out: notifications stay suppressed and the device must be served again
    /// on a later turn of the event loop ([`crate::devices::virtio::VirtioDevice::take_backlog`]).
    Exhausted,
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
            DrainEnd::Idle | DrainEnd::Stopped | DrainEnd::Exhausted => {}
            DrainEnd::Broken(e) => errors.record(|| format!("{ring}: broken ring: {e:?}")),
            DrainEnd::PhantomChain => {
                errors.record(|| format!("{ring}: available index moves under the device"))
            }
        }
    }

    /// Whether work is left that nobody will be notified about: serve the queue again.
    pub fn backlog(&self) -> bool {
        matches!(self, DrainEnd::Exhausted)
    }
}

/// Runs `pass` with notifications suppressed until re-enabling them finds nothing new. A ring
/// error, a stopped pass, a spent budget (shared by all the passes of one drain), or a re-check
/// whose pass finds nothing ends it: the event loop is never spun by what the guest wrote.
pub fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut pass: impl FnMut(&mut Queue, &mut Budget) -> Result<Pass, virtio_queue::Error>,
) -> DrainEnd {
    let mut budget = Budget::default();
    let mut recheck = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            return DrainEnd::Broken(e);
        }
        match pass(queue, &mut budget) {
            Err(e) => return DrainEnd::Broken(e),
            Ok(Pass::Stopped) => return DrainEnd::Stopped,
            Ok(Pass::Exhausted) => return DrainEnd::Exhausted,
            Ok(Pass::Drained { found: false }) if recheck => return DrainEnd::PhantomChain,
            Ok(Pass::Drained { .. }) => {}
        }
        if !budget.allows() {
            return DrainEnd::Exhausted;
        }
        match queue.enable_notification(mem) {
            Ok(true) => recheck = true,
            Ok(false) => return DrainEnd::Idle,
            Err(e) => return DrainEnd::Broken(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueOwnedT;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// A queue of 256 one-descriptor chains, all available.
    fn full_queue(mem: &GuestMemoryMmap) -> Queue {
        let vq = MockSplitQueue::new(mem, 256);
        let descs: Vec<RawDescriptor> = (0..256)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 16, 16, 0, 0)))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        vq.create_queue().unwrap()
    }

    /// A pass that takes chains while the budget allows, charging `bytes` each.
    fn taking<'a>(
        mem: &'a GuestMemoryMmap,
        bytes: u64,
        taken: &'a mut u32,
    ) -> impl FnMut(&mut Queue, &mut Budget) -> Result<Pass, virtio_queue::Error> + 'a {
        move |queue, budget| {
            let mut found = false;
            while budget.allows() {
                if queue.iter(mem)?.next().is_none() {
                    return Ok(Pass::Drained { found });
                }
                found = true;
                *taken += 1;
                budget.charge(bytes);
            }
            Ok(Pass::Exhausted)
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn a_full_queue_takes_several_drains_of_a_budget_each() {
        let mem = mem();
        let mut queue = full_queue(&mem);
        let mut taken = 0;
        let mut drains = 0;
        loop {
            let before = taken;
            let end = drain(&mut queue, &mem, taking(&mem, 512, &mut taken));
            drains += 1;
            assert!(
                taken - before <= CHAINS_PER_PASS,
                "one drain took {}",
                taken - before
            );
            if !end.backlog() {
                assert!(matches!(end, DrainEnd::Idle), "{end:?}");
                break;
            }
            assert!(drains < 100, "the queue never drains");
        }
        assert_eq!(taken, 256);
        assert_eq!(
            drains,
            256 / CHAINS_PER_PASS + 1,
            "the last drain finds the ring empty"
        );
    }

    #[test]
    fn large_chains_spend_the_byte_budget_first() {
        let mem = mem();
        let mut queue = full_queue(&mem);
        let mut taken = 0;
        let end = drain(
            &mut queue,
            &mem,
            taking(&mem, BYTES_PER_PASS / 4, &mut taken),
        );
        assert!(matches!(end, DrainEnd::Exhausted), "{end:?}");
        assert_eq!(taken, 4);
    }
}
