//! Heavy requests (ring 3): the most work a block request can ask for, a ring of them at a
//! time, each through an indirect table of 256 entries (a chain as long as the queue) whose data
//! descriptors all alias one buffer. Discard and write-zeroes over aliased buffers of 8 MiB (to
//! a device that walks every 16-byte segment of its data, one request is 133 million segments);
//! reads and writes of the whole disk in 1 MiB or 64 KiB buffers (its `size_max` and a smaller
//! size with the most descriptors); and reads past every limit (254 buffers of 4 MiB).
//!
//! Only as many chains are published as the ring has room for (the guest reads the used
//! index), so the device takes every one of them. The device must stay responsive meanwhile:
//! a stop, the console and the other devices must not wait for the ring to drain.

use super::arena::Arena;
use super::device::{Dev, ID_BLK};
use super::rng::Rng;
use crate::virtio::{DESC_INDIRECT, DESC_NEXT, DESC_WRITE, get, put};

const MIB: u32 = 1 << 20;
/// Data descriptors of a chain as long as the queue (header and status take two).
const MAX_DATA: u32 = 254;
const SECTOR: u64 = 512;

/// One descriptor of a table.
fn set(table: u64, i: u32, addr: u64, len: u32, flags: u16, next: u32) {
    let d = table + 16 * u64::from(i);
    // SAFETY: `table` is an indirect slot (4 KiB, room for 256 entries) or the queue's own
    // table, both in the attack area's table regions; `i` is below 256.
    unsafe {
        put(d, addr);
        put(d + 8, len);
        put(d + 12, flags);
        put(d + 14, next as u16);
    }
}

/// Publishes a ring of heavy requests on block device `dev`; returns the chains published.
pub fn publish(rng: &mut Rng, arena: &Arena, dev: &mut Dev) -> u64 {
    if dev.id != ID_BLK {
        return 0;
    }
    let capacity = dev.capacity;
    let Some(vq) = dev.queues.first_mut().filter(|vq| vq.size != 0) else {
        return 0;
    };
    // A used ring the guest placed outside the area (or outside RAM) is not read: the device
    // cannot use it either, so the whole ring is published.
    let room = match arena.holds_rings(vq.used, 4) {
        // SAFETY: the used ring's index (the device writes it), in the attack area.
        true => vq
            .size
            .saturating_sub(vq.idx.wrapping_sub(unsafe { get::<u16>(vq.used + 2) })),
        false => vq.size,
    };
    if room == 0 {
        return 0;
    }
    let whole_disk =
        |len: u32| (capacity * SECTOR / u64::from(len)).clamp(1, MAX_DATA.into()) as u32;
    let transfer = rng.pick(&[0u32, 1]);
    let (kind, len, count) = match rng.below(4) {
        0 => (rng.pick(&[11u32, 13]), 8 * MIB, MAX_DATA),
        1 => (transfer, MIB, whole_disk(MIB)),
        2 => (transfer, 64 << 10, whole_disk(64 << 10)),
        _ => (0, 4 * MIB, MAX_DATA),
    };
    let data = arena.data(rng, len.into());
    let header = arena.small(rng);
    let status = arena.small(rng) + 255;
    // SAFETY: a small buffer of the area (256 bytes of room).
    unsafe {
        put(header, kind);
        put(header + 4, 0u32);
        put(header + 8, 0u64);
    }
    let table = arena.indirect(rng);
    set(table, 0, header, 16, DESC_NEXT, 1);
    let data_flags = DESC_NEXT | if kind == 0 { DESC_WRITE } else { 0 };
    for i in 1..=count {
        set(table, i, data, len, data_flags, i + 1);
    }
    set(table, count + 1, status, 1, DESC_WRITE, 0);
    for i in 0..room {
        let slot = vq.idx.wrapping_add(i) % vq.size;
        set(
            vq.desc,
            slot.into(),
            table,
            16 * (count + 2),
            DESC_INDIRECT,
            0,
        );
        // SAFETY: the avail ring of a queue the guest set up in the ring region.
        unsafe { put(vq.avail + 4 + 2 * u64::from(slot), slot) };
    }
    vq.idx = vq.idx.wrapping_add(room);
    // SAFETY: as above.
    unsafe { put(vq.avail + 2, vq.idx) };
    dev.notify(arena, 0);
    u64::from(room) + 1
}
