//! The io_uring engine: reads, writes and flushes submitted to the kernel, many at once, their
//! completions announced on an eventfd the event loop watches (the device's backend).
//!
//! Each request in flight owns a slot (at most one per queue entry, so the completion ring never
//! overflows) holding where its status goes and the iovecs the kernel reads. A flush is
//! submitted with IOSQE_IO_DRAIN: the kernel starts it only once every request submitted before
//! it has completed, and starts nothing after it until it completes, so it covers every write
//! the guest saw complete before it, as virtio-blk requires.
//!
//! The ring is set up on the building thread; the event loop only needs io_uring_enter. Waiting
//! for what is in flight ([`Uring::wait_all`]) reads the completion ring without system calls,
//! so any thread may do it (a vCPU resetting the device, the VMM pausing the VM).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Guest bytes in flight at most: past it the queue waits for completions, so one guest cannot
/// pin unbounded host memory and page cache in requests, nor make a reset wait for long.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// How long [`Uring::wait_all`] waits before giving up (a wedged host disk).
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// What a request in flight does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Into guest buffers.
    Read,
    /// From guest buffers.
    Write,
    /// fdatasync after every earlier request.
    Flush,
}

/// One request in flight.
#[derive(Debug)]
pub struct InFlight {
    /// The chain to return.
    pub head: u16,
    /// Where its status byte goes.
    pub status: GuestAddress,
    /// What it does.
    pub op: Op,
    /// Data bytes.
    pub len: u64,
    /// Byte offset in the image.
    pub offset: u64,
    /// The guest buffers, for a retry of a short transfer.
    pub segments: Vec<(GuestAddress, u32)>,
    /// The kernel reads these while the request is in flight: they live in the slot.
    #[allow(dead_code)] // Read by the kernel, never by ember.
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which every thread of the VMM may access; the
// pointers are only handed to the kernel, never dereferenced here.
unsafe impl Send for InFlight {}

/// Why io_uring cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// io_uring_setup failed: an old kernel, io_uring_disabled, or a filter.
    #[error("io_uring_setup failed")]
    Setup(#[source] std::io::Error),
    /// The kernel lacks an operation the device needs.
    #[error("io_uring lacks the {0} operation on this kernel")]
    Unsupported(&'static str),
    /// The completion eventfd.
    #[error("cannot register io_uring's completion eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A ring of `depth` entries and its requests in flight.
pub struct Uring {
    ring: IoUring,
    completions: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    bytes: u64,
    /// Entries pushed but not yet handed to the kernel.
    unsubmitted: usize,
    /// Tests: reads and writes go to the kernel's worker threads (IOSQE_ASYNC), so they
    /// complete after a flush pushed behind them unless the flush waits for them.
    #[cfg(test)]
    pub(crate) force_async: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Uring {
    /// A ring for `depth` requests in flight, checked to have readv, writev and fsync.
    pub fn new(depth: u16) -> Result<Self, UringError> {
        let ring = IoUring::new(u32::from(depth).next_power_of_two()).map_err(UringError::Setup)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(UringError::Setup)?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
        ] {
            if !probe.is_supported(code) {
                return Err(UringError::Unsupported(name));
            }
        }
        let completions = EventFd::new(libc::EFD_NONBLOCK).map_err(UringError::EventFd)?;
        ring.submitter()
            .register_eventfd(completions.as_raw_fd())
            .map_err(UringError::EventFd)?;
        let depth = usize::from(depth);
        Ok(Uring {
            ring,
            completions,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            bytes: 0,
            unsubmitted: 0,
            #[cfg(test)]
            force_async: false,
        })
    }

    /// The eventfd signalled on each completion.
    pub fn eventfd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Clears the eventfd (completions are then reaped from the ring).
    pub fn clear_eventfd(&self) {
        let _ = self.completions.read();
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request of `len` bytes may go in flight.
    pub fn has_room(&self, len: u64) -> bool {
        !self.free.is_empty() && (self.bytes == 0 || self.bytes + len <= MAX_IN_FLIGHT_BYTES)
    }

    /// Queues a read, write or flush on `fd` (a flush after everything queued before it);
    /// `iovecs` must stay valid memory until the request completes. Fails only when no slot is
    /// free (check [`Self::has_room`] first).
    pub fn push(
        &mut self,
        fd: RawFd,
        request: InFlightRequest,
        iovecs: Vec<libc::iovec>,
    ) -> Result<(), InFlightRequest> {
        let Some(slot) = self.free.pop() else {
            return Err(request);
        };
        let InFlightRequest {
            head,
            status,
            op,
            len,
            offset,
            segments,
        } = request;
        let count = u32::try_from(iovecs.len()).unwrap_or(u32::MAX);
        let entry = match op {
            Op::Read => opcode::Readv::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .build(),
            Op::Write => opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .build(),
            Op::Flush => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        #[cfg(test)]
        let entry = if self.force_async && op != Op::Flush {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        // SAFETY: the iovecs (and the guest memory they point into, mapped for the VM's life,
        // which outlives this ring: see `Drop`) stay where they are until the completion for
        // `slot` is reaped, because the slot owns them.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The ring has as many entries as there are slots: this cannot happen, but if it
            // did the request goes back to the caller, who completes it another way.
            self.free.push(slot);
            return Err(InFlightRequest {
                head,
                status,
                op,
                len,
                offset,
                segments,
            });
        }
        self.bytes += len;
        self.unsubmitted += 1;
        self.slots[slot] = Some(InFlight {
            head,
            status,
            op,
            len,
            offset,
            segments,
            iovecs,
        });
        Ok(())
    }

    /// Hands what was queued to the kernel: one io_uring_enter for a whole pass.
    pub fn submit(&mut self) {
        // A kernel short of memory says EAGAIN: retried a bounded number of times, then left to
        // the next pass.
        let mut tries = 0;
        while self.unsubmitted > 0 && tries < 64 {
            tries += 1;
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    std::thread::yield_now();
                }
                Err(e) => {
                    // Left in the ring; the next submit retries them.
                    log::warn!("virtio-blk: io_uring submit failed: {e}");
                    return;
                }
            }
        }
    }

    /// Takes every completion posted so far: each request with its result (bytes or -errno).
    pub fn reap(&mut self, mut done: impl FnMut(InFlight, i32)) -> usize {
        let mut reaped = Vec::new();
        for cqe in self.ring.completion() {
            reaped.push((cqe.user_data(), cqe.result()));
        }
        let count = reaped.len();
        for (slot, result) in reaped {
            let Some(request) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.slots.get_mut(s))
                .and_then(Option::take)
            else {
                log::error!("virtio-blk: io_uring completed unknown request {slot}");
                continue;
            };
            self.free.push(usize::try_from(slot).unwrap_or_default());
            self.bytes = self.bytes.saturating_sub(request.len);
            done(request, result);
        }
        count
    }

    /// Waits until nothing is in flight, handing each completion to `done`. Reads the
    /// completion ring (no system call but sched_yield), so it works on any thread; gives up
    /// after [`WAIT_LIMIT`] with an error line (the requests left are then forgotten, their
    /// chains never returned).
    pub fn wait_all(&mut self, mut done: impl FnMut(InFlight, i32)) {
        // Every pass submits what it queued (`submit` retries what the kernel was too busy
        // for), so all of it is the kernel's: submitting here would be an io_uring_enter on a
        // thread whose filter forbids it.
        let start = Instant::now();
        while self.in_flight() > self.unsubmitted {
            if self.reap(&mut done) == 0 {
                if start.elapsed() > WAIT_LIMIT {
                    log::error!(
                        "virtio-blk: {} requests still in flight after {WAIT_LIMIT:?}; giving up on them",
                        self.in_flight()
                    );
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Uring {
    /// The kernel may still write into guest memory for requests in flight: wait for them
    /// before the ring (and then the memory the transport holds) goes.
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            self.wait_all(|_, _| {});
        }
    }
}

/// A request about to go in flight (what [`InFlight`] holds, less the iovecs).
#[derive(Debug)]
pub struct InFlightRequest {
    /// The chain to return.
    pub head: u16,
    /// Where its status byte goes.
    pub status: GuestAddress,
    /// What it does.
    pub op: Op,
    /// Data bytes.
    pub len: u64,
    /// Byte offset in the image.
    pub offset: u64,
    /// The guest buffers.
    pub segments: Vec<(GuestAddress, u32)>,
}
