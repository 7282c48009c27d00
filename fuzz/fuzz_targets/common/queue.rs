//! A split virtqueue laid out in guest memory the way a driver lays it out, for the fuzz
//! targets: the descriptor table at 0, the available ring at 0x100, the used ring at 0x200.
//!
//! virtio-queue 0.18's `MockSplitQueue` puts its used ring `size` bytes (not `2 * size`) after
//! the start of the available ring's entries, so with more than `size / 2` chains the device's
//! used-ring writes rewrite the available heads: fine for "no panic", wrong for any oracle that
//! reads the rings back.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use ember::guest_memory::GuestMemoryMmap;

/// Entries in the queue.
pub const QUEUE_SIZE: u16 = 16;
/// The descriptor table.
pub const DESC_TABLE: u64 = 0;
/// The available ring: flags, idx, `QUEUE_SIZE` heads, used_event.
pub const AVAIL_RING: u64 = 0x100;
/// The used ring: flags, idx, `QUEUE_SIZE` (id, len) elements, avail_event.
pub const USED_RING: u64 = 0x200;
/// First byte past the queue's structures.
#[allow(dead_code)]
pub const END: u64 = USED_RING + 6 + 8 * QUEUE_SIZE as u64;

const F_NEXT: u16 = 1;

/// Guest memory of the net targets: the queue at 0, frame bytes and indirect tables above it.
/// Large enough for a 64 KiB frame, so the length limit is reachable.
pub const MEM_SIZE: usize = 0x3_0000;
/// Where the input's payload is copied.
pub const PAYLOAD: u64 = 0x1000;

/// Maps an address from the input: mostly into guest memory, sometimes near or past its end.
fn addr(raw: u64) -> u64 {
    match raw >> 62 {
        0 | 1 => raw % MEM_SIZE as u64,
        2 => MEM_SIZE as u64 - (raw % 0x2000),
        _ => raw,
    }
}

/// Maps a length from the input: mostly small, sometimes up to 64 KiB and more, or anything.
fn len(raw: u32) -> u32 {
    match raw >> 30 {
        0 | 1 => raw % 0x800,
        2 => raw % 0x1_2000,
        _ => raw,
    }
}

/// Guest memory holding up to 0x2000 bytes of `payload` at [`PAYLOAD`], and the descriptors
/// `table` encodes (16 bytes each: address, length, flags, next), shaped by [`addr`]/[`len`].
pub fn guest_with_table(table: &[u8], payload: &[u8]) -> (GuestMemoryMmap, Vec<Descriptor>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let _ = mem.write_slice(&payload[..payload.len().min(0x2000)], GuestAddress(PAYLOAD));
    let descs = table
        .chunks_exact(16)
        .map(|d| {
            let a = addr(u64::from_le_bytes(d[0..8].try_into().unwrap()));
            let l = len(u32::from_le_bytes(d[8..12].try_into().unwrap()));
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap()) & 0x7;
            let next = u16::from_le_bytes(d[14..16].try_into().unwrap()) % (QUEUE_SIZE + 2);
            Descriptor::new(a, l, flags, next)
        })
        .collect();
    (mem, descs)
}

/// Writes `descs` from the table's first entry and makes available, in order, every chain head:
/// the first descriptor and each one after a descriptor without NEXT (their `next` fields are
/// the input's). Returns the device's view of the queue.
pub fn with_chains(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Queue {
    let mut heads = 0u16;
    for (i, d) in descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr().0.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len().to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags().to_le_bytes());
        raw[14..].copy_from_slice(&d.next().to_le_bytes());
        let index = i as u16;
        mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * u64::from(index)))
            .unwrap();
        if i == 0 || descs[i - 1].flags() & F_NEXT == 0 {
            let slot = AVAIL_RING + 4 + 2 * u64::from(heads);
            mem.write_obj(index, GuestAddress(slot)).unwrap();
            heads += 1;
        }
    }
    mem.write_obj(heads, GuestAddress(AVAIL_RING + 2)).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.try_set_size(QUEUE_SIZE).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_ready(true);
    queue
}
