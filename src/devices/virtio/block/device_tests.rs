//! Unit tests of the virtio-blk device on both engines.

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

/// Both engines, for the tests that must hold on each.
const ENGINES: [IoEngine; 2] = [IoEngine::Sync, IoEngine::Async];

fn fixture(name: &str, read_only: bool) -> Fixture {
    fixture_on(name, read_only, IoEngine::Sync)
}

fn fixture_on(name: &str, read_only: bool, engine: IoEngine) -> Fixture {
    let image = std::env::temp_dir().join(format!(
        "ember-blk-{}-{name}-{engine:?}",
        std::process::id()
    ));
    let bytes: Vec<u8> = (0..IMAGE_SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&image, bytes).unwrap();
    let disk = DiskFile::open(&image, read_only, false).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    Fixture {
        mem,
        block: Block::with_options(disk, "test-id", engine, None).unwrap(),
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
    let moved = f.block.process_queue(0, &mut queue, &f.mem);
    // io_uring: the requests in flight complete here.
    let completed = f.block.quiesce(std::slice::from_mut(&mut queue), &f.mem);
    assert!(moved || completed != 0, "nothing returned");
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
    for engine in ENGINES {
        refused_then_served_on(name, read_only, &bad, expected, engine);
    }
}

fn refused_then_served_on(
    name: &str,
    read_only: bool,
    bad: &impl Fn(&GuestMemoryMmap) -> Vec<RawDescriptor>,
    expected: u8,
    engine: IoEngine,
) {
    let mut f = fixture_on(name, read_only, engine);
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
    for engine in ENGINES {
        let mut f = fixture_on("read", false, engine);
        let read = good_read(&f.mem, 0, 0);
        assert_eq!(run(&mut f, &[read]), vec![513], "{engine:?}");
        assert_eq!(status_of(&f, 0), VIRTIO_BLK_S_OK);
        assert_eq!(f.block.counters().reads.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn write_then_flush_reaches_the_file() {
    for engine in ENGINES {
        write_then_flush_on(engine);
    }
}

fn write_then_flush_on(engine: IoEngine) {
    let mut f = fixture_on("write", false, engine);
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

/// Data buffers of the 32-request tests, 4 KiB apart (clear of the headers and statuses).
const BIG_DATA: u64 = 0x20_0000;

/// `chains` queued at once, with a queue to serve them from.
fn queued<'a>(
    mem: &'a GuestMemoryMmap,
    chains: &[Vec<RawDescriptor>],
) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
    let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
    let mut offset = 0;
    for chain in chains {
        vq.add_desc_chains(chain, offset).unwrap();
        offset += u16::try_from(chain.len()).unwrap();
    }
    let queue = vq.create_queue().unwrap();
    (vq, queue)
}

/// The used ring's entries: (head, length), in the order the device returned them.
fn used_entries(
    f: &Fixture,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    queue: &Queue,
) -> Vec<(u32, u32)> {
    let used = queue.used_idx(&f.mem, Ordering::Acquire).unwrap().0;
    (0..used)
        .map(|i| {
            let entry = vq.used_addr().unchecked_add(4 + u64::from(i) * 8);
            let id = f.mem.read_obj::<u32>(entry).unwrap();
            let len = f.mem.read_obj::<u32>(entry.unchecked_add(4)).unwrap();
            (id, len)
        })
        .collect()
}

/// A one-sector write of `fill` bytes from chain `n`'s buffer to sector `sector`.
fn write_chain(mem: &GuestMemoryMmap, n: u64, sector: u64, fill: u8) -> Vec<RawDescriptor> {
    let first = u16::try_from(3 * n).unwrap();
    mem.write_slice(&[fill; 512], GuestAddress(BIG_DATA + n * 0x1000))
        .unwrap();
    vec![
        desc(
            header(mem, n, VIRTIO_BLK_T_OUT, sector),
            16,
            NEXT,
            first + 1,
        ),
        desc(BIG_DATA + n * 0x1000, 512, NEXT, first + 2),
        desc(status(mem, n), 1, WRITE, 0),
    ]
}

/// io_uring: a pass puts all 32 requests in flight at once, without waiting for any, and each
/// then returns the image's bytes.
#[test]
fn thirty_two_reads_go_in_flight_together_and_return_the_image_bytes() {
    let mut f = fixture_on("qd32-read", false, IoEngine::Async);
    f.block.reap_after_submit = false;
    let chains: Vec<_> = (0..32u64)
        .map(|n| {
            let first = u16::try_from(3 * n).unwrap();
            vec![
                desc(header(&f.mem, n, VIRTIO_BLK_T_IN, n), 16, NEXT, first + 1),
                desc(BIG_DATA + n * 0x1000, 512, NEXT | WRITE, first + 2),
                desc(status(&f.mem, n), 1, WRITE, 0),
            ]
        })
        .collect();
    let (vq, mut queue) = queued(&f.mem, &chains);
    f.block.process_queue(0, &mut queue, &f.mem);
    assert_eq!(
        f.block.uring.as_ref().unwrap().in_flight(),
        32,
        "every request in flight after one pass"
    );
    let moved = f.block.quiesce(std::slice::from_mut(&mut queue), &f.mem);
    assert_eq!(moved, 1);
    let used = used_entries(&f, &vq, &queue);
    assert_eq!(used.len(), 32);
    assert!(used.iter().all(|&(_, len)| len == 513), "{used:?}");
    let image = std::fs::read(&f.image).unwrap();
    for n in 0..32u64 {
        assert_eq!(status_of(&f, n), VIRTIO_BLK_S_OK);
        let mut data = [0u8; 512];
        f.mem
            .read_slice(&mut data, GuestAddress(BIG_DATA + n * 0x1000))
            .unwrap();
        let at = usize::try_from(n).unwrap() * 512;
        assert_eq!(data[..], image[at..at + 512], "sector {n}");
    }
    assert_eq!(f.block.counters().reads.load(Ordering::Relaxed), 32);
}

/// io_uring: 32 writes and a flush behind them in one pass: the flush returns last, after every
/// write, and the writes are in the image. (Without IOSQE_IO_DRAIN on the flush, the flush
/// returned first or among the writes in 2 of 3 runs.)
#[test]
fn a_flush_behind_thirty_two_writes_completes_after_all_of_them() {
    let mut f = fixture_on("qd32-flush", false, IoEngine::Async);
    f.block.reap_after_submit = false;
    // The writes on the kernel's workers: a flush that did not wait for them would complete
    // first (it has nothing to sync yet).
    f.block.uring.as_mut().unwrap().force_async = true;
    let mut chains: Vec<_> = (0..32u64)
        .map(|n| write_chain(&f.mem, n, n, u8::try_from(n + 1).unwrap()))
        .collect();
    chains.push(vec![
        desc(
            header(&f.mem, 32, request::VIRTIO_BLK_T_FLUSH, 0),
            16,
            NEXT,
            97,
        ),
        desc(status(&f.mem, 32), 1, WRITE, 0),
    ]);
    let (vq, mut queue) = queued(&f.mem, &chains);
    f.block.process_queue(0, &mut queue, &f.mem);
    assert_eq!(f.block.uring.as_ref().unwrap().in_flight(), 33);
    f.block.quiesce(std::slice::from_mut(&mut queue), &f.mem);
    let used = used_entries(&f, &vq, &queue);
    assert_eq!(used.len(), 33);
    assert_eq!(
        used[32],
        (96, 1),
        "the flush (head 96) returns last: {used:?}"
    );
    assert!((0..=32).all(|n| status_of(&f, n) == VIRTIO_BLK_S_OK));
    assert_eq!(f.block.counters().flushes.load(Ordering::Relaxed), 1);
    let image = std::fs::read(&f.image).unwrap();
    for n in 0..32usize {
        assert!(
            image[n * 512..(n + 1) * 512]
                .iter()
                .all(|&b| usize::from(b) == n + 1),
            "sector {n} holds its write"
        );
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, ms) == 1 }
}

/// An ops limit of 2 per second: two requests go, the third waits (counted once) for the timer,
/// which the device arms instead of spinning; when it fires the next ones go.
#[test]
fn an_ops_limit_holds_requests_back_until_the_timer_fires() {
    for engine in ENGINES {
        let mut f = fixture_on("ops-limit", false, engine);
        let limit = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size: 2,
                one_time_burst: None,
                refill_time: 200,
            }),
        };
        f.block.set_rate_limiter(Some(&limit));
        let chains: Vec<_> = (0..4u64).map(|n| write_chain(&f.mem, n, n, 7)).collect();
        let (vq, mut queue) = queued(&f.mem, &chains);
        let queues = std::slice::from_mut(&mut queue);
        f.block.process_queue(0, &mut queues[0], &f.mem);
        f.block.quiesce(queues, &f.mem);
        assert_eq!(used_entries(&f, &vq, &queues[0]).len(), 2, "{engine:?}");
        assert_eq!(f.block.counters().throttled.load(Ordering::Relaxed), 1);
        let timer = f.block.timer().unwrap();
        // A guest notification while throttled serves nothing more and counts nothing again.
        f.block.process_queue(0, &mut queues[0], &f.mem);
        assert_eq!(used_entries(&f, &vq, &queues[0]).len(), 2);
        assert_eq!(f.block.counters().throttled.load(Ordering::Relaxed), 1);
        // Each firing lets through what the refill earned since (a token per 100 ms).
        for _ in 0..2 {
            let before = used_entries(&f, &vq, &queues[0]).len();
            if before == 4 {
                break;
            }
            assert!(readable(timer, 5000), "{engine:?}: the timer fires");
            f.block.process_timer(queues, &f.mem);
            f.block.quiesce(queues, &f.mem);
            assert!(
                used_entries(&f, &vq, &queues[0]).len() > before,
                "{engine:?}"
            );
        }
        assert_eq!(used_entries(&f, &vq, &queues[0]).len(), 4, "{engine:?}");
    }
}

/// A disk throttled to nothing gets its limit lifted at run time: the waiting request goes on
/// the next serving of the queue, without waiting for the old limit's timer.
#[test]
fn a_rate_limit_changed_at_run_time_takes_effect() {
    let mut f = fixture_on("change", false, IoEngine::Async);
    let crawl = RateLimiterConfig {
        bandwidth: Some(crate::config::TokenBucketConfig {
            size: 512,
            one_time_burst: None,
            refill_time: 3_600_000,
        }),
        ops: None,
    };
    f.block.set_rate_limiter(Some(&crawl));
    let chains: Vec<_> = (0..2u64).map(|n| write_chain(&f.mem, n, n, 9)).collect();
    let (vq, mut queue) = queued(&f.mem, &chains);
    let queues = std::slice::from_mut(&mut queue);
    f.block.process_queue(0, &mut queues[0], &f.mem);
    f.block.quiesce(queues, &f.mem);
    assert_eq!(
        used_entries(&f, &vq, &queues[0]).len(),
        1,
        "one sector an hour"
    );
    assert!(VirtioDevice::set_rate_limiter(
        &mut f.block,
        LimiterKind::Disk,
        None
    ));
    assert!(!VirtioDevice::set_rate_limiter(
        &mut f.block,
        LimiterKind::Rx,
        None
    ));
    // What the transport does after a change: serve the queue again.
    f.block.process_queue(0, &mut queues[0], &f.mem);
    f.block.quiesce(queues, &f.mem);
    assert_eq!(used_entries(&f, &vq, &queues[0]).len(), 2);
}

/// Found by the hostile guest: a flush whose header's sector is u64::MAX (a flush's sector
/// means nothing) overflowed computing the io_uring request's offset, and the event loop
/// panicked. It completes like any flush.
#[test]
fn a_flush_with_any_sector_completes_on_io_uring() {
    let mut f = fixture_on("flush-sector", false, IoEngine::Async);
    let flush = vec![
        desc(
            header(&f.mem, 0, request::VIRTIO_BLK_T_FLUSH, u64::MAX),
            16,
            NEXT,
            1,
        ),
        desc(status(&f.mem, 0), 1, WRITE, 0),
    ];
    assert_eq!(run(&mut f, &[flush]), vec![1]);
    assert_eq!(status_of(&f, 0), VIRTIO_BLK_S_OK);
}
