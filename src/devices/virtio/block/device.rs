//! The virtio-blk device: features, config space, and request execution on the event loop,
//! synchronously or through io_uring (`engine.rs`), within the disk's rate limiter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::os::fd::RawFd;

use crate::guest_memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::Bytes;

use super::disk::{DiskFile, SECTOR_SIZE};
use super::request::{
    self, MAX_RANGE_SECTORS, MAX_RANGES, Refused, Request, RequestKind, SIZE_MAX,
};
use super::uring::{Uring, UringError};
use crate::config::{IoEngine, RateLimiterConfig};
use crate::devices::GuestErrors;
use crate::devices::virtio::drain::{DrainEnd, Pass, drain};
use crate::devices::virtio::rate_limiter::{RateLimiter, Timer};
use crate::devices::virtio::{
    LimiterKind, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, return_chain,
};

mod persist;
pub use persist::BlockState;

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub(super) const VIRTIO_BLK_S_OK: u8 = 0;
pub(super) const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID string.
const ID_BYTES: usize = 20;
const ID_BYTES_U32: u32 = 20;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Queue size: one request queue of 256 entries.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (queue size minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// What a punched hole counts against a pass's budget, in bytes: a system call whose cost
/// grows with the extents it frees, not with the bytes (none of which are moved).
const HOLE_COST: u64 = 1 << 20;

/// What the device has done, readable while the VM runs.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Requests answered IOERR or UNSUPP, or dropped for having no status byte.
    pub errors: AtomicU64,
    /// Requests the rate limiter held back (each counted once, however long it waited).
    pub throttled: AtomicU64,
}

/// A disk device that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// `engine=io_uring` was asked for and the kernel refuses it.
    #[error("disk {0}: engine=io_uring cannot be used here: use engine=sync, or allow io_uring")]
    Uring(String, #[source] UringError),
    /// The rate limiter's timer.
    #[error("disk {0}: cannot create the rate limiter's timer")]
    Timer(String, #[source] std::io::Error),
}

/// A virtio-blk device.
pub struct Block {
    pub(super) disk: DiskFile,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    features: u64,
    pub(super) counters: Arc<BlockCounters>,
    pub(super) guest_errors: GuestErrors,
    io_errors: GuestErrors,
    /// The last drain ran out of budget with chains left.
    backlog: bool,
    /// The io_uring engine; `None` runs every request synchronously.
    pub(super) uring: Option<Uring>,
    limiter: RateLimiter,
    /// Wakes a queue the limiter held back.
    timer: Option<Timer>,
    /// The queue stopped taking chains (the ring full, or the limiter): it is served again when
    /// a request completes or the timer fires, not when the guest notifies (notifications stay
    /// suppressed).
    stalled: bool,
    /// Off in tests that need requests to stay in flight until the next event.
    pub(crate) reap_after_submit: bool,
}

impl Block {
    /// A device on `disk` with the io_uring engine where the kernel allows it, no rate limit.
    pub fn new(disk: DiskFile, id: &str) -> Self {
        let uring = Self::auto_uring(id);
        Self::build(disk, id, uring, None, None)
    }

    /// A device on `disk`, answering GET_ID with `id`, running its requests on `engine`
    /// within `limiter`.
    pub fn with_options(
        disk: DiskFile,
        id: &str,
        engine: IoEngine,
        limiter: Option<&RateLimiterConfig>,
    ) -> Result<Self, BlockError> {
        let uring = match engine {
            IoEngine::Sync => None,
            IoEngine::Auto => Self::auto_uring(id),
            IoEngine::Async => {
                Some(Uring::new(QUEUE_SIZE).map_err(|e| BlockError::Uring(id.to_owned(), e))?)
            }
        };
        let timer = Timer::new().map_err(|e| BlockError::Timer(id.to_owned(), e))?;
        Ok(Self::build(disk, id, uring, limiter, Some(timer)))
    }

    /// io_uring if the kernel allows it; else one line saying why and the sync engine.
    fn auto_uring(id: &str) -> Option<Uring> {
        match Uring::new(QUEUE_SIZE) {
            Ok(uring) => Some(uring),
            Err(e) => {
                let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
                log::warn!("disk {id}: {e}{why}; using the sync engine (one request at a time)");
                None
            }
        }
    }

    fn build(
        disk: DiskFile,
        id: &str,
        uring: Option<Uring>,
        limiter: Option<&RateLimiterConfig>,
        timer: Option<Timer>,
    ) -> Self {
        let timer = timer.or_else(|| Timer::new().ok());
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        Block {
            config: config_space(disk.sectors()),
            disk,
            id: id_bytes,
            features,
            counters: Arc::new(BlockCounters::default()),
            guest_errors: GuestErrors::default(),
            io_errors: GuestErrors::default(),
            backlog: false,
            uring,
            limiter: RateLimiter::new(limiter),
            timer,
            stalled: false,
            reap_after_submit: true,
        }
    }

    /// Whether requests run through io_uring.
    pub fn is_async(&self) -> bool {
        self.uring.is_some()
    }

    /// Replaces the rate limiter (full buckets, as configured); the transport then serves the
    /// queue again, so a queue the old limit held back resumes under the new one.
    pub fn set_rate_limiter(&mut self, config: Option<&RateLimiterConfig>) {
        self.limiter = RateLimiter::new(config);
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Executes a parsed request; returns the status and the bytes written into guest buffers.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let result = match req.kind {
            RequestKind::In => self.transfer(req, mem, false),
            RequestKind::Out => self.transfer(req, mem, true),
            RequestKind::Flush => self
                .disk
                .flush()
                .map(|()| {
                    self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                    0
                })
                .map_err(|e| self.io_failed("flush", e)),
            RequestKind::GetId => {
                // The id goes into the first buffer, as much of it as fits.
                let (addr, len) = req.data[0];
                let n = len.min(ID_BYTES_U32);
                mem.write_slice(&self.id[..n as usize], addr)
                    .map(|()| n)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self.deallocate(req).map(|()| 0),
            RequestKind::Unsupported(kind) => {
                self.guest_errors
                    .record(|| format!("virtio-blk: unsupported request type {kind}"));
                Err(VIRTIO_BLK_S_UNSUPP)
            }
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(status) => (status, 0),
        }
    }

    fn in_bounds(&self, sector: u64, bytes: u64) -> bool {
        let sectors = bytes / SECTOR_SIZE;
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.disk.sectors())
    }

    /// Refuses a write to a read-only disk and a transfer past its end.
    pub(super) fn check_transfer(&self, req: &Request, write: bool) -> Result<(), u8> {
        let len = req.data_len();
        if write && self.disk.read_only() {
            self.guest_errors
                .record(|| "virtio-blk: write to a read-only disk".into());
            return Err(VIRTIO_BLK_S_IOERR);
        }
        if !self.in_bounds(req.sector, len) {
            self.guest_errors.record(|| {
                format!(
                    "virtio-blk: sector {} + {len} bytes is past the end",
                    req.sector
                )
            });
            return Err(VIRTIO_BLK_S_IOERR);
        }
        Ok(())
    }

    fn transfer(&mut self, req: &Request, mem: &GuestMemoryMmap, write: bool) -> Result<u32, u8> {
        self.check_transfer(req, write)?;
        let len = req.data_len();
        self.disk
            .transfer(req.sector * SECTOR_SIZE, mem, &req.data, !write)
            .map_err(|e| self.io_failed(if write { "write" } else { "read" }, e))?;
        Ok(self.count_transfer(write, len))
    }

    /// Counts a completed read or write of `len` bytes; returns the bytes it put in guest
    /// buffers.
    pub(super) fn count_transfer(&self, write: bool, len: u64) -> u32 {
        let (count, bytes) = if write {
            (&self.counters.writes, &self.counters.write_bytes)
        } else {
            (&self.counters.reads, &self.counters.read_bytes)
        };
        count.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        // Data lengths are bounded by the chain's 4 GiB limit.
        if write {
            0
        } else {
            u32::try_from(len).unwrap_or(u32::MAX)
        }
    }

    /// Discard and write-zeroes: the ranges parse read (at most [`MAX_RANGES`], each of at
    /// most [`MAX_RANGE_SECTORS`]) become holes.
    fn deallocate(&mut self, req: &Request) -> Result<(), u8> {
        if self.disk.read_only() {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let allowed_flags = if req.kind == RequestKind::WriteZeroes {
            WRITE_ZEROES_UNMAP
        } else {
            0
        };
        for range in &req.ranges {
            if range.flags & !allowed_flags != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            if range.sectors == 0 {
                // Nothing to deallocate (fallocate would refuse a zero length).
                continue;
            }
            let bytes = u64::from(range.sectors) * SECTOR_SIZE;
            if !self.in_bounds(range.sector, bytes) {
                self.guest_errors.record(|| {
                    format!(
                        "virtio-blk: discard of sector {} + {} is past the end",
                        range.sector, range.sectors
                    )
                });
                return Err(VIRTIO_BLK_S_IOERR);
            }
            self.disk
                .punch_hole(range.sector * SECTOR_SIZE, bytes)
                .map_err(|e| self.io_failed("discard", e))?;
        }
        Ok(())
    }

    /// Executes a parsed request now and writes its status; returns the used length.
    pub(super) fn serve_now(&mut self, req: &Request, mem: &GuestMemoryMmap) -> u32 {
        let (status, written) = self.execute(req, mem);
        self.finish(status, req.status, mem);
        written + 1
    }

    /// Writes a request's status (counting a failure); the address was checked in parse.
    pub(super) fn finish(&self, status: u8, addr: vm_memory::GuestAddress, mem: &GuestMemoryMmap) {
        if status != VIRTIO_BLK_S_OK {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let _ = mem.write_obj(status, addr);
    }

    /// A chain parse refused: IOERR if it has a status byte; returns the used length.
    fn refuse(&self, refused: &Refused, mem: &GuestMemoryMmap) -> u32 {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.guest_errors
            .record(|| format!("virtio-blk: refused request: {}", refused.error));
        match refused.status {
            Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
            _ => 0,
        }
    }

    /// Takes what the guest made available, a budget at a time, until the ring is empty, the
    /// io_uring engine has no room, or the limiter holds a request back.
    fn run_queue(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = self.reap(queue, mem);
        let (end, moved) = self.drain_once(queue, mem);
        used_any |= moved;
        if let Some(uring) = &mut self.uring {
            uring.submit();
        }
        // What completed during the submission (the page cache, a fast device) returns now
        // rather than after a trip through the event loop.
        if self.reap_after_submit {
            used_any |= self.reap(queue, mem);
        }
        end.record(&self.guest_errors, "virtio-blk");
        self.backlog = end.backlog();
        used_any
    }

    /// One drain of the ring; returns how it ended and whether chains were returned.
    fn drain_once(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (DrainEnd, bool) {
        let mut used_any = false;
        self.stalled = false;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            while budget.allows() {
                // Notifications go back on when the ring is empty, requests in flight or not:
                // leaving them off until a completion (fewer VM exits) made new requests wait
                // for it, and halved 4 KiB QD32 random reads in the benchmark.
                let Some(chain) = queue.iter(mem)?.next() else {
                    return Ok(Pass::Drained { found });
                };
                found = true;
                let head = chain.head_index();
                let descriptors: Vec<_> = chain.take(usize::from(QUEUE_SIZE) + 1).collect();
                let req = match self.parse(&descriptors, mem) {
                    Ok(req) => req,
                    Err(refused) => {
                        let used_len = self.refuse(&refused, mem);
                        return_chain(queue, mem, head, used_len, &self.guest_errors);
                        used_any = true;
                        continue;
                    }
                };
                if !self.admit(&req) {
                    // Taken again, whole, when a completion or the timer comes.
                    queue.go_to_previous_position();
                    self.stalled = true;
                    return Ok(Pass::Stopped);
                }
                budget.charge(cost(&req));
                if let Some(used_len) = self.start(head, req, mem) {
                    return_chain(queue, mem, head, used_len, &self.guest_errors);
                    used_any = true;
                }
            }
            Ok(Pass::Exhausted)
        });
        (end, used_any)
    }

    fn parse(&self, descriptors: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, Refused> {
        let cut = descriptors.last().is_some_and(|d| d.has_next());
        request::parse(descriptors, cut, mem, SEG_MAX as usize)
    }

    /// Whether `req` may start now: room in the ring (for what goes through it), and tokens.
    fn admit(&mut self, req: &Request) -> bool {
        let bytes = transfer_bytes(req);
        if let Some(uring) = &self.uring {
            if goes_async(req) && !uring.has_room(bytes) {
                return false;
            }
        }
        let was_blocked = self.limiter.is_blocked();
        match self.limiter.consume(bytes) {
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

    /// Starts `req`: through io_uring (its chain returns on completion: `None`), or now
    /// (`Some(used length)`).
    fn start(&mut self, head: u16, req: Request, mem: &GuestMemoryMmap) -> Option<u32> {
        if self.uring.is_some() && goes_async(&req) {
            return self.submit(head, req, mem);
        }
        Some(self.serve_now(&req, mem))
    }

    /// A host I/O error: IOERR for the guest, and a log line rate-limited like guest errors,
    /// since a guest can cause the same failure over and over (misaligned O_DIRECT requests).
    pub(super) fn io_failed(&self, what: &str, e: std::io::Error) -> u8 {
        self.io_errors
            .record(|| format!("virtio-blk: {what} failed: {e}"));
        VIRTIO_BLK_S_IOERR
    }
}

/// The config space (virtio 1.2, 5.2.4), little-endian at the spec's offsets.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; 60];
    let mut put =
        |offset: usize, bytes: &[u8]| config[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &sectors.to_le_bytes()); // capacity
    put(8, &SIZE_MAX.to_le_bytes()); // size_max
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &512u32.to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _features: u64) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.run_queue(queue, mem)
    }

    fn take_backlog(&mut self) -> u32 {
        u32::from(std::mem::take(&mut self.backlog))
    }

    fn replace_disk(&mut self, disk: DiskFile) -> Result<(), String> {
        if disk.read_only() != self.disk.read_only() {
            return Err("the new image must be read-only exactly when the old one was".into());
        }
        self.config = config_space(disk.sectors());
        self.disk = disk;
        Ok(())
    }

    fn release_backend(&mut self) -> std::io::Result<()> {
        self.disk.release()
    }

    fn reclaim_backend(&mut self) -> std::io::Result<()> {
        self.disk.relock()
    }

    fn save_state(&self) -> crate::devices::virtio::state::VirtioDeviceState {
        self.save_device_state()
    }

    fn restore_state(
        &mut self,
        state: &crate::devices::virtio::state::VirtioDeviceState,
    ) -> Result<(), crate::devices::StateError> {
        self.restore_device_state(state)
    }
    fn backend(&self) -> Option<(RawFd, EventSet)> {
        self.uring.as_ref().map(|u| (u.eventfd(), EventSet::IN))
    }

    fn process_backend(
        &mut self,
        _events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let Some(queue) = queues.first_mut() else {
            return 0;
        };
        if let Some(uring) = &self.uring {
            uring.clear_eventfd();
        }
        // Reap, then take what the guest queued meanwhile (a driver submits as it reaps, and a
        // stalled queue has room again): one trip through the event loop instead of two.
        u32::from(self.run_queue(queue, mem))
    }

    fn timer(&self) -> Option<RawFd> {
        self.timer.as_ref().map(Timer::fd)
    }

    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> u32 {
        if let Some(timer) = &mut self.timer {
            timer.fired();
        }
        self.limiter.unblock();
        match queues.first_mut() {
            Some(queue) if self.stalled => u32::from(self.run_queue(queue, mem)),
            _ => 0,
        }
    }

    fn quiesce(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> u32 {
        match queues.first_mut() {
            Some(queue) => u32::from(self.wait_in_flight(queue, mem)),
            None => 0,
        }
    }

    fn set_rate_limiter(&mut self, which: LimiterKind, config: Option<&RateLimiterConfig>) -> bool {
        if which != LimiterKind::Disk {
            return false;
        }
        Block::set_rate_limiter(self, config);
        true
    }

    fn reset(&mut self) {
        // The transport quiesced the device first: nothing is in flight.
        self.backlog = false;
        self.stalled = false;
        self.limiter.unblock();
    }
}

/// Guest bytes a request moves (what the bandwidth bucket charges).
fn transfer_bytes(req: &Request) -> u64 {
    match req.kind {
        RequestKind::In | RequestKind::Out => req.data_len(),
        _ => 0,
    }
}

/// What a request costs a pass's budget.
fn cost(req: &Request) -> u64 {
    match req.kind {
        RequestKind::Discard | RequestKind::WriteZeroes => HOLE_COST * req.ranges.len() as u64,
        _ => transfer_bytes(req),
    }
}

/// Whether the io_uring engine runs `req` (the rest is quick or refused, and runs now).
fn goes_async(req: &Request) -> bool {
    matches!(
        req.kind,
        RequestKind::In | RequestKind::Out | RequestKind::Flush
    )
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
