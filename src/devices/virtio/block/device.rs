//! The virtio-blk device: features, config space, and request execution on the event loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disk::{DiskFile, SECTOR_SIZE};
use super::request::{self, Request, RequestKind, SEGMENT_SIZE};
use crate::devices::GuestErrors;
use crate::devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
};

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID string.
const ID_BYTES: usize = 20;
const ID_BYTES_U32: u32 = 20;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Queue size: one request queue of 256 entries.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (queue size minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard / write-zeroes range, in sectors.
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 512;

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
}

/// A virtio-blk device.
pub struct Block {
    disk: DiskFile,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    features: u64,
    counters: Arc<BlockCounters>,
    guest_errors: GuestErrors,
}

impl Block {
    /// A device on `disk`, answering GET_ID with `id` (truncated to 20 bytes).
    pub fn new(disk: DiskFile, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
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
        }
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
            RequestKind::Discard | RequestKind::WriteZeroes => {
                self.deallocate(req, mem).map(|()| 0)
            }
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

    fn transfer(&mut self, req: &Request, mem: &GuestMemoryMmap, write: bool) -> Result<u32, u8> {
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
        let mut offset = req.sector * SECTOR_SIZE;
        for &(addr, seg_len) in &req.data {
            let result = if write {
                self.disk
                    .write_from_guest(offset, mem, addr, seg_len as usize)
            } else {
                self.disk.read_to_guest(offset, mem, addr, seg_len as usize)
            };
            result.map_err(|e| self.io_failed(if write { "write" } else { "read" }, e))?;
            offset += u64::from(seg_len);
        }
        let (count, bytes) = if write {
            (&self.counters.writes, &self.counters.write_bytes)
        } else {
            (&self.counters.reads, &self.counters.read_bytes)
        };
        count.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len, Ordering::Relaxed);
        // Data lengths are bounded by the chain's 4 GiB limit.
        Ok(if write {
            0
        } else {
            u32::try_from(len).unwrap_or(u32::MAX)
        })
    }

    /// Discard and write-zeroes: each 16-byte segment is {sector, sectors, flags}.
    fn deallocate(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<(), u8> {
        if self.disk.read_only() {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        for &(addr, len) in &req.data {
            for i in 0..len / SEGMENT_SIZE {
                let seg: [u8; 16] = mem
                    .read_obj(GuestAddress(addr.0 + u64::from(i * SEGMENT_SIZE)))
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let allowed_flags = if req.kind == RequestKind::WriteZeroes {
                    WRITE_ZEROES_UNMAP
                } else {
                    0
                };
                if flags & !allowed_flags != 0 {
                    return Err(VIRTIO_BLK_S_UNSUPP);
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                if !self.in_bounds(sector, bytes) {
                    self.guest_errors.record(|| {
                        format!(
                            "virtio-blk: discard of sector {sector} + {sectors} is past the end"
                        )
                    });
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                self.disk
                    .punch_hole(sector * SECTOR_SIZE, bytes)
                    .map_err(|e| self.io_failed("discard", e))?;
            }
        }
        Ok(())
    }

    fn io_failed(&self, what: &str, e: std::io::Error) -> u8 {
        log::warn!("virtio-blk: {what} failed: {e}");
        VIRTIO_BLK_S_IOERR
    }
}

/// The config space (virtio 1.2, 5.2.4), little-endian at the spec's offsets.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; 60];
    let mut put =
        |offset: usize, bytes: &[u8]| config[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &sectors.to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &512u32.to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &1u32.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(&mut self, _features: u64) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        loop {
            // With EVENT_IDX, suppress notifications while draining, then re-check for a
            // request that raced with re-enabling them.
            if let Err(e) = queue.disable_notification(mem) {
                self.guest_errors
                    .record(|| format!("virtio-blk: broken ring: {e:?}"));
                return used_any;
            }
            let chains: Vec<_> = match queue.iter(mem) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    self.guest_errors
                        .record(|| format!("virtio-blk: broken ring: {e:?}"));
                    return used_any;
                }
            };
            for chain in chains {
                let head = chain.head_index();
                let descriptors: Vec<_> = chain.clone().take(usize::from(QUEUE_SIZE) + 1).collect();
                let cut = descriptors.last().is_some_and(|d| d.has_next());
                let used_len = match request::parse(&descriptors, cut, mem, SEG_MAX as usize) {
                    Ok(req) => {
                        let (status, written) = self.execute(&req, mem);
                        if status != VIRTIO_BLK_S_OK {
                            self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        // The status address was checked in parse.
                        let _ = mem.write_obj(status, req.status);
                        written + 1
                    }
                    Err(refused) => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        self.guest_errors
                            .record(|| format!("virtio-blk: refused request: {}", refused.error));
                        match refused.status {
                            Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
                            _ => 0,
                        }
                    }
                };
                if let Err(e) = queue.add_used(mem, head, used_len) {
                    self.guest_errors
                        .record(|| format!("virtio-blk: cannot complete a request: {e:?}"));
                }
                used_any = true;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.guest_errors
                        .record(|| format!("virtio-blk: broken ring: {e:?}"));
                    break;
                }
            }
        }
        used_any
    }

    fn reset(&mut self) {}
}
