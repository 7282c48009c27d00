//! The virtio-blk device: features, config space, and request execution on the event loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::{DiskFile, SECTOR_SIZE};
use super::request::{self, MAX_RANGE_SECTORS, MAX_RANGES, Request, RequestKind, SIZE_MAX};
use crate::devices::GuestErrors;
use crate::devices::virtio::drain::{Pass, drain};
use crate::devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    return_chain,
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
}

/// A virtio-blk device.
pub struct Block {
    disk: DiskFile,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    features: u64,
    counters: Arc<BlockCounters>,
    guest_errors: GuestErrors,
    io_errors: GuestErrors,
    /// The last drain ran out of budget with chains left.
    backlog: bool,
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
        self.disk
            .transfer(req.sector * SECTOR_SIZE, mem, &req.data, !write)
            .map_err(|e| self.io_failed(if write { "write" } else { "read" }, e))?;
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

    /// Parses and executes one chain and writes its status; returns the used length and what
    /// the request costs the pass's budget.
    fn serve(
        &mut self,
        descriptors: &[Descriptor],
        cut: bool,
        mem: &GuestMemoryMmap,
    ) -> (u32, u64) {
        match request::parse(descriptors, cut, mem, SEG_MAX as usize) {
            Ok(req) => {
                let (status, written) = self.execute(&req, mem);
                if status != VIRTIO_BLK_S_OK {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                // The status address was checked in parse.
                let _ = mem.write_obj(status, req.status);
                let cost = match req.kind {
                    RequestKind::In | RequestKind::Out => req.data_len(),
                    RequestKind::Discard | RequestKind::WriteZeroes => {
                        HOLE_COST * req.ranges.len() as u64
                    }
                    _ => 0,
                };
                (written + 1, cost)
            }
            Err(refused) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.guest_errors
                    .record(|| format!("virtio-blk: refused request: {}", refused.error));
                match refused.status {
                    Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => (1, 0),
                    _ => (0, 0),
                }
            }
        }
    }

    /// A host I/O error: IOERR for the guest, and a log line rate-limited like guest errors,
    /// since a guest can cause the same failure over and over (misaligned O_DIRECT requests).
    fn io_failed(&self, what: &str, e: std::io::Error) -> u8 {
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
        let mut used_any = false;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            while budget.allows() {
                let Some(chain) = queue.iter(mem)?.next() else {
                    return Ok(Pass::Drained { found });
                };
                found = true;
                let head = chain.head_index();
                let descriptors: Vec<_> = chain.take(usize::from(QUEUE_SIZE) + 1).collect();
                let cut = descriptors.last().is_some_and(|d| d.has_next());
                let (used_len, cost) = self.serve(&descriptors, cut, mem);
                budget.charge(cost);
                return_chain(queue, mem, head, used_len, &self.guest_errors);
                used_any = true;
            }
            Ok(Pass::Exhausted)
        });
        end.record(&self.guest_errors, "virtio-blk");
        self.backlog = end.backlog();
        used_any
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

    fn reset(&mut self) {
        self.backlog = false;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use std::path::PathBuf;
    use virtio_queue::QueueT;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x12_0000;
    const IMAGE_SECTORS: u64 = 64;

    struct Fixture {
        mem: GuestMemoryMmap,
        block: Block,
        image: PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.image);
        }
    }

    fn fixture(name: &str, read_only: bool) -> Fixture {
        let image = std::env::temp_dir().join(format!("ember-blk-{}-{name}", std::process::id()));
        let bytes: Vec<u8> = (0..IMAGE_SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&image, bytes).unwrap();
        let disk = DiskFile::open(&image, read_only, false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        Fixture {
            mem,
            block: Block::new(disk, "test-id"),
            image,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Writes a request header for chain `n` and returns its address.
    fn header(mem: &GuestMemoryMmap, n: u64, kind: u32, sector: u64) -> u64 {
        let addr = HEADER + n * 16;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_obj(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Status address of chain `n`, pre-filled with 0xff so "not written" shows.
    fn status(mem: &GuestMemoryMmap, n: u64) -> u64 {
        mem.write_obj(0xffu8, GuestAddress(STATUS + n)).unwrap();
        STATUS + n
    }

    /// Runs `chains` through the device (each chain's descriptors follow the previous chain's
    /// in the table, `next` fields as given); returns the used lengths.
    fn run(f: &mut Fixture, chains: &[Vec<RawDescriptor>]) -> Vec<u32> {
        let vq = MockSplitQueue::new(&f.mem, QUEUE_SIZE);
        let mut offset = 0;
        for chain in chains {
            vq.add_desc_chains(chain, offset).unwrap();
            offset += u16::try_from(chain.len()).unwrap();
        }
        let mut queue: Queue = vq.create_queue().unwrap();
        assert!(f.block.process_queue(0, &mut queue, &f.mem));
        let used = queue
            .used_idx(&f.mem, std::sync::atomic::Ordering::Acquire)
            .unwrap()
            .0;
        (0..used)
            .map(|i| {
                let len_addr = vq.used_addr().unchecked_add(4 + u64::from(i) * 8 + 4);
                f.mem.read_obj::<u32>(len_addr).unwrap()
            })
            .collect()
    }

    /// A good one-sector read as chain `n` starting at descriptor `first`.
    fn good_read(mem: &GuestMemoryMmap, n: u64, first: u16) -> Vec<RawDescriptor> {
        vec![
            desc(header(mem, n, VIRTIO_BLK_T_IN, 1), 16, NEXT, first + 1),
            desc(DATA + n * 0x1000, 512, NEXT | WRITE, first + 2),
            desc(status(mem, n), 1, WRITE, 0),
        ]
    }

    fn status_of(f: &Fixture, n: u64) -> u8 {
        f.mem.read_obj(GuestAddress(STATUS + n)).unwrap()
    }

    /// `bad` as chain 0, then a good read as chain 1: the bad one gets `expected` (0xff: no
    /// status written) and the good one is still served.
    fn refused_then_served(
        name: &str,
        read_only: bool,
        bad: impl Fn(&GuestMemoryMmap) -> Vec<RawDescriptor>,
        expected: u8,
    ) {
        let mut f = fixture(name, read_only);
        status(&f.mem, 0);
        let bad = bad(&f.mem);
        let good = good_read(&f.mem, 1, u16::try_from(bad.len()).unwrap());
        let used = run(&mut f, &[bad, good]);
        assert_eq!(used.len(), 2, "{name}: both chains completed");
        assert_eq!(
            status_of(&f, 0),
            expected,
            "{name}: status of the bad request"
        );
        assert_eq!(
            status_of(&f, 1),
            VIRTIO_BLK_S_OK,
            "{name}: the next request is served"
        );
        let mut data = [0u8; 512];
        f.mem
            .read_slice(&mut data, GuestAddress(DATA + 0x1000))
            .unwrap();
        let expected_data: Vec<u8> = (512..1024u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(data.to_vec(), expected_data, "{name}: sector 1's bytes");
        assert_eq!(used[1], 513);
    }

    #[test]
    fn read_returns_the_image_bytes() {
        let mut f = fixture("read", false);
        let read = good_read(&f.mem, 0, 0);
        assert_eq!(run(&mut f, &[read]), vec![513]);
        assert_eq!(status_of(&f, 0), VIRTIO_BLK_S_OK);
        assert_eq!(f.block.counters().reads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn write_then_flush_reaches_the_file() {
        let mut f = fixture("write", false);
        f.mem
            .write_slice(&[0xab; 1024], GuestAddress(DATA))
            .unwrap();
        let write = vec![
            desc(header(&f.mem, 0, VIRTIO_BLK_T_OUT, 3), 16, NEXT, 1),
            desc(DATA, 1024, NEXT, 2),
            desc(status(&f.mem, 0), 1, WRITE, 0),
        ];
        let flush = vec![
            desc(
                header(&f.mem, 1, request::VIRTIO_BLK_T_FLUSH, 0),
                16,
                NEXT,
                4,
            ),
            desc(status(&f.mem, 1), 1, WRITE, 0),
        ];
        assert_eq!(run(&mut f, &[write, flush]), vec![1, 1]);
        assert_eq!((status_of(&f, 0), status_of(&f, 1)), (0, 0));
        let image = std::fs::read(&f.image).unwrap();
        assert!(image[3 * 512..5 * 512].iter().all(|&b| b == 0xab));
        assert_eq!(
            image[5 * 512],
            ((5 * 512) % 251) as u8,
            "nothing past the request changed"
        );
    }

    #[test]
    fn get_id_writes_the_serial() {
        let mut f = fixture("id", false);
        let descs = vec![
            desc(header(&f.mem, 0, VIRTIO_BLK_T_GET_ID, 0), 16, NEXT, 1),
            desc(DATA, 20, NEXT | WRITE, 2),
            desc(status(&f.mem, 0), 1, WRITE, 0),
        ];
        assert_eq!(run(&mut f, &[descs]), vec![21]);
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..7], b"test-id");
        assert!(id[7..].iter().all(|&b| b == 0));
    }

    #[test]
    fn discard_zeroes_the_range() {
        let mut f = fixture("discard", false);
        let mut segment = [0u8; 16];
        segment[..8].copy_from_slice(&8u64.to_le_bytes());
        segment[8..12].copy_from_slice(&16u32.to_le_bytes());
        f.mem.write_obj(segment, GuestAddress(DATA)).unwrap();
        let descs = vec![
            desc(header(&f.mem, 0, VIRTIO_BLK_T_DISCARD, 0), 16, NEXT, 1),
            desc(DATA, 16, NEXT, 2),
            desc(status(&f.mem, 0), 1, WRITE, 0),
        ];
        run(&mut f, &[descs]);
        assert_eq!(status_of(&f, 0), VIRTIO_BLK_S_OK);
        let image = std::fs::read(&f.image).unwrap();
        assert!(image[8 * 512..24 * 512].iter().all(|&b| b == 0));
        assert_ne!(
            image[24 * 512 + 1],
            0,
            "the sector after the range keeps its data"
        );
    }

    #[test]
    fn write_to_a_read_only_disk_is_ioerr() {
        refused_then_served(
            "ro",
            true,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_OUT, 0), 16, NEXT, 1),
                    desc(DATA, 512, NEXT, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
    }

    #[test]
    fn read_past_the_end_is_ioerr() {
        refused_then_served(
            "beyond",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, IMAGE_SECTORS), 16, NEXT, 1),
                    desc(DATA, 512, NEXT | WRITE, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
        refused_then_served(
            "overflow",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, u64::MAX), 16, NEXT, 1),
                    desc(DATA, 512, NEXT | WRITE, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
    }

    #[test]
    fn buffers_outside_guest_memory_are_ioerr() {
        refused_then_served(
            "outside",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, NEXT, 1),
                    desc(1 << 48, 512, NEXT | WRITE, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
        refused_then_served(
            "huge",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, NEXT, 1),
                    desc(DATA, 0xffff_f000, NEXT | WRITE, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
    }

    #[test]
    fn unknown_types_are_unsupp() {
        refused_then_served(
            "badtype",
            false,
            |m| {
                vec![
                    desc(header(m, 0, 0x7fff, 0), 16, NEXT, 1),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_UNSUPP,
        );
    }

    #[test]
    fn chains_without_a_usable_status_complete_without_one() {
        refused_then_served(
            "nostatus",
            false,
            |m| vec![desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, 0, 0)],
            0xff,
        );
        refused_then_served(
            "rostatus",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, NEXT, 1),
                    desc(DATA, 512, NEXT | WRITE, 2),
                    desc(status(m, 0), 1, 0, 0),
                ]
            },
            0xff,
        );
    }

    #[test]
    fn a_looping_chain_is_cut_and_refused() {
        // Descriptor 1 points at itself: the queue's TTL stops it, the device refuses it.
        refused_then_served(
            "loop",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, NEXT, 1),
                    desc(DATA, 512, NEXT | WRITE, 1),
                ]
            },
            0xff,
        );
    }

    #[test]
    fn data_in_the_wrong_direction_is_ioerr() {
        refused_then_served(
            "rodata",
            false,
            |m| {
                vec![
                    desc(header(m, 0, VIRTIO_BLK_T_IN, 0), 16, NEXT, 1),
                    desc(DATA, 512, NEXT, 2),
                    desc(status(m, 0), 1, WRITE, 0),
                ]
            },
            VIRTIO_BLK_S_IOERR,
        );
    }

    /// A full queue is served a budget at a time, each time saying that work is left, so the
    /// event loop gets its thread back in between.
    #[test]
    fn a_full_queue_is_served_in_bounded_passes() {
        use crate::devices::virtio::drain::CHAINS_PER_PASS;
        let mut f = fixture("passes", false);
        let vq = MockSplitQueue::new(&f.mem, QUEUE_SIZE);
        let chains = QUEUE_SIZE / 2;
        let descs: Vec<RawDescriptor> = (0..u64::from(chains))
            .flat_map(|n| {
                let i = u16::try_from(2 * n).unwrap();
                [
                    desc(header(&f.mem, n, 0x7fff, 0), 16, NEXT, i + 1),
                    desc(status(&f.mem, n), 1, WRITE, 0),
                ]
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let used = |queue: &Queue, mem| queue.used_idx(mem, Ordering::Acquire).unwrap().0;
        let mut passes = 0;
        loop {
            let before = used(&queue, &f.mem);
            f.block.process_queue(0, &mut queue, &f.mem);
            passes += 1;
            let taken = used(&queue, &f.mem) - before;
            assert!(u32::from(taken) <= CHAINS_PER_PASS, "one pass took {taken}");
            if f.block.take_backlog() == 0 {
                break;
            }
            assert!(passes < 10, "the backlog never ends");
        }
        assert_eq!(used(&queue, &f.mem), chains, "every chain served");
        assert_eq!(passes, u32::from(chains) / CHAINS_PER_PASS + 1);
        assert!((0..u64::from(chains)).all(|n| status_of(&f, n) == VIRTIO_BLK_S_UNSUPP));
    }

    /// Found by the `virtio_mmio_registers` fuzz target: a guest that puts its used ring two
    /// bytes after its available ring (no EVENT_IDX) makes the device's NO_NOTIFY flag write
    /// set the available index to 1 and the re-enabling write set it back to 0. Each pass then
    /// found nothing while `enable_notification` kept saying a request had come, and the event
    /// loop spun forever on one notification (a VM that could not even be stopped).
    #[test]
    fn overlapping_rings_do_not_spin_the_event_loop() {
        let mut f = fixture("overlap", false);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.try_set_size(8).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(0x2c70))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(0x7676))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(0x7678))
            .unwrap();
        queue.set_ready(true);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f.block.process_queue(0, &mut queue, &f.mem);
            let _ = done.send(f.block.guest_errors.count());
        });
        let errors = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("process_queue spins on overlapping rings");
        assert!(errors >= 1, "the broken ring is counted");
    }

    #[test]
    fn config_space_reads_capacity_and_zero_past_its_end() {
        use crate::devices::bus::BusDevice;
        use crate::devices::virtio::mmio::MmioTransport;
        use vmm_sys_util::eventfd::EventFd;

        let image = std::env::temp_dir().join(format!("ember-blk-{}-config", std::process::id()));
        std::fs::write(
            &image,
            vec![0u8; usize::try_from(IMAGE_SECTORS * SECTOR_SIZE).unwrap()],
        )
        .unwrap();
        let block = Block::new(DiskFile::open(&image, false, false).unwrap(), "test-id");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport = MmioTransport::new(Box::new(block), mem, evt(), vec![evt()]).unwrap();
        // The device's config space starts at 0x100 in its window.
        let mut capacity = [0u8; 8];
        transport.read(0x100, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), IMAGE_SECTORS);
        let mut past = [0xffu8; 4];
        transport.read(0x100 + (1 << 40), &mut past);
        assert_eq!(past, [0; 4]);
        let mut straddling = [0xffu8; 8];
        transport.read(0x100 + 56, &mut straddling);
        assert_eq!(straddling, [1, 0, 0, 0, 0, 0, 0, 0]);
        drop(transport);
        std::fs::remove_file(image).unwrap();
    }
}
