//! The io_uring half of the virtio-blk device: reads, writes and flushes go in flight, and
//! their chains return when the completions are reaped (on the event loop, from the ring's
//! eventfd, or by [`Block::wait_in_flight`] before a reset, a pause or a teardown).

use std::sync::atomic::Ordering;

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::Queue;

use super::device::{Block, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use super::disk::{SECTOR_SIZE, fits_one_call, iovecs};
use super::request::{Request, RequestKind};
use super::uring::{InFlight, InFlightRequest, Op};
use crate::devices::virtio::return_chain;

impl Block {
    /// Puts `req` (a read, write or flush the ring has room for) in flight; a request refused
    /// before any I/O, or one too scattered for one call, is served now (`Some(used length)`).
    pub(super) fn submit(&mut self, head: u16, req: Request, mem: &GuestMemoryMmap) -> Option<u32> {
        let op = match req.kind {
            RequestKind::In => Op::Read,
            RequestKind::Out => Op::Write,
            _ => Op::Flush,
        };
        let iovecs = if op == Op::Flush {
            Vec::new()
        } else {
            if let Err(status) = self.check_transfer(&req, op == Op::Write) {
                self.finish(status, req.status, mem);
                return Some(1);
            }
            match iovecs(mem, &req.data) {
                Ok(iovecs) if fits_one_call(&iovecs) => iovecs,
                // Parse checked the buffers; a chain this scattered runs synchronously.
                _ => return Some(self.serve_now(&req, mem)),
            }
        };
        let request = InFlightRequest {
            head,
            status: req.status,
            op,
            len: req.data_len(),
            // A flush's sector is whatever the guest wrote (it means nothing); a transfer's was
            // checked against the disk's end, so it does not overflow.
            offset: req.sector.saturating_mul(SECTOR_SIZE),
            segments: req.data.clone(),
        };
        let fd = self.disk.raw_fd();
        let uring = self.uring.as_mut()?;
        match uring.push(fd, request, iovecs) {
            Ok(()) => None,
            Err(_) => Some(self.serve_now(&req, mem)),
        }
    }

    /// Returns every completed request's chain; true if any.
    pub(super) fn reap(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut done = Vec::new();
        if let Some(uring) = &mut self.uring {
            uring.reap(|request, result| done.push((request, result)));
        }
        self.return_completed(done, queue, mem, true)
    }

    /// Waits for everything in flight and returns its chains; true if any.
    pub(super) fn wait_in_flight(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut done = Vec::new();
        if let Some(uring) = &mut self.uring {
            uring.wait_all(|request, result| done.push((request, result)));
        }
        // Not on the event loop, maybe: no synchronous retry (its system calls are the event
        // loop's), a short transfer is an error.
        self.return_completed(done, queue, mem, false)
    }

    fn return_completed(
        &mut self,
        done: Vec<(InFlight, i32)>,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        may_retry: bool,
    ) -> bool {
        let any = !done.is_empty();
        for (request, result) in done {
            let used_len = self.complete(&request, result, mem, may_retry);
            return_chain(queue, mem, request.head, used_len, &self.guest_errors);
        }
        any
    }

    /// Writes a completed request's status; returns its used length.
    fn complete(
        &mut self,
        r: &InFlight,
        result: i32,
        mem: &GuestMemoryMmap,
        may_retry: bool,
    ) -> u32 {
        if r.op == Op::Read {
            // The kernel wrote these buffers behind vm-memory's back, maybe only partly: they
            // are dirty either way (a diff snapshot or migration round must send them).
            crate::guest_memory::mark_segments_written(mem, &r.segments);
        }
        let what = match r.op {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        };
        let outcome = match u64::try_from(result) {
            Err(_) => Err(self.io_failed(what, std::io::Error::from_raw_os_error(-result))),
            Ok(_) if r.op == Op::Flush => {
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            Ok(n) if n == r.len => Ok(self.count_transfer(r.op == Op::Write, r.len)),
            // Short (the file shrank under us, or a partial write): the whole request again,
            // synchronously, which reports the error if there is one.
            Ok(_) if may_retry => self
                .disk
                .transfer(r.offset, mem, &r.segments, r.op == Op::Read)
                .map(|()| self.count_transfer(r.op == Op::Write, r.len))
                .map_err(|e| self.io_failed(what, e)),
            Ok(n) => Err(self.io_failed(
                what,
                std::io::Error::other(format!("short transfer: {n} of {} bytes", r.len)),
            )),
        };
        match outcome {
            Ok(written) => {
                self.finish(VIRTIO_BLK_S_OK, r.status, mem);
                written + 1
            }
            Err(status) => {
                debug_assert_eq!(status, VIRTIO_BLK_S_IOERR);
                self.finish(status, r.status, mem);
                1
            }
        }
    }
}
