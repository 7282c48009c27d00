//! Adversarial virtqueue traffic (ring 3): chains published into a queue the guest set up, then
//! a notification. A chain is either plausible (a block request, a transmitted frame, receive
//! buffers: `payload.rs`), possibly with one thing wrong, or garbage: any address, any length,
//! any flags, `next` anywhere or looping, indirect tables that are short, huge, nested, point
//! at themselves or outside RAM. Around the publishing: avail indices that jump far ahead or go
//! back, descriptors rewritten after they were published, notification storms.
//!
//! Every buffer goes through [`Arena::fix`]; only descriptors without `WRITE` may point at
//! descriptor tables (a device must never write there), and indirect descriptors point only at
//! tables the guest wrote or outside RAM (the device takes what it finds there as descriptors).

use super::arena::{Arena, HOARD_ENTRIES};
use super::device::{Dev, F_EVENT_IDX, ID_NET, Vq};
use super::payload::{self, Seg};
use super::rng::Rng;
use crate::net::clock;
use crate::virtio::{DESC_INDIRECT, DESC_NEXT, DESC_WRITE, get, put};

/// Most chains published at once, and most segments in a plausible chain.
const MAX_CHAINS: u64 = 8;
pub const MAX_SEGS: usize = 8;

/// A descriptor table: a queue's, or an indirect one.
#[derive(Clone, Copy)]
struct Table {
    addr: u64,
    size: u16,
}

impl Table {
    fn set(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.addr + 16 * u64::from(i % self.size.max(1));
        // SAFETY: the table is a queue's in the ring region (the guest set it up with `size`
        // entries) or an indirect table slot; both lie in the attack area.
        unsafe {
            put(d, addr);
            put(d + 8, len);
            put(d + 12, flags);
            put(d + 14, next);
        }
    }
}

/// Publishes 1 to 8 chains on queue `q` of `dev`, notifies it, and sometimes rewrites them
/// right away. Returns the operations made (chains and register writes).
pub fn publish(rng: &mut Rng, arena: &Arena, dev: &mut Dev, q: usize) -> u64 {
    let Some(&vq) = dev.queues.get(q).filter(|vq| vq.size != 0) else {
        return 0;
    };
    let count = 1 + rng.below(MAX_CHAINS) as u16;
    for i in 0..count {
        let head = chain(rng, arena, dev, q, vq);
        let slot = vq.idx.wrapping_add(i) % vq.size;
        // SAFETY: the avail ring of a queue the guest set up in the ring region.
        unsafe { put(vq.avail + 4 + 2 * u64::from(slot), head) };
    }
    let idx = match rng.below(40) {
        0 => vq.idx.wrapping_add(rng.u16()), // far ahead (or behind)
        1 => vq.idx.wrapping_sub(1 + rng.below(4) as u16),
        2 => vq.idx,
        3 => vq.idx.wrapping_add(vq.size + 1), // more than the queue holds
        _ => vq.idx.wrapping_add(count),
    };
    // SAFETY: as above; the flags and used_event words of the same avail ring.
    unsafe {
        put(
            vq.avail,
            (rng.one_in(4) as u16) | ((rng.one_in(16) as u16) * rng.u16()),
        );
        put(
            vq.avail + 4 + 2 * u64::from(vq.size),
            vq.idx.wrapping_add(rng.u16() % 8),
        );
        put(vq.avail + 2, idx);
    }
    dev.queues[q].idx = idx;
    let mut ops = u64::from(count) + notify(rng, arena, dev, q);
    if rng.one_in(10) {
        ops += rewrite(rng, arena, vq);
    }
    ops
}

/// QueueNotify for queue `q`; now and then another value, or none.
fn notify(rng: &mut Rng, arena: &Arena, dev: &Dev, q: usize) -> u64 {
    match rng.below(30) {
        0 => 0,
        1 => {
            dev.notify(arena, rng.pick(&[2, 3, 0xffff, u32::MAX]));
            1
        }
        _ => {
            dev.notify(arena, q as u32);
            1
        }
    }
}

/// Thousands of QueueNotify writes in a row (mostly the queue's index, through KVM's
/// ioeventfd; sometimes a value that exits to ember every time).
pub fn storm(rng: &mut Rng, arena: &Arena, dev: &Dev, q: usize) -> u64 {
    let count = 1000 + rng.below(4000);
    let val = match rng.one_in(4) {
        true => rng.u32(),
        false => q as u32,
    };
    for _ in 0..count {
        dev.notify(arena, val);
    }
    count
}

/// Overwrites random descriptors of the queue with garbage (the device may be walking them).
pub fn rewrite(rng: &mut Rng, arena: &Arena, vq: Vq) -> u64 {
    if vq.size == 0 {
        return 0;
    }
    let table = Table {
        addr: vq.desc,
        size: vq.size,
    };
    let count = 1 + rng.below(16);
    for _ in 0..count {
        let at = rng.u16();
        garbage(rng, arena, table, at);
    }
    count
}

/// Crumbs: rounds of a full receive queue of one-byte buffers, each published once the device
/// has taken the previous round (it says so through `avail_event`, hence `EVENT_IDX`). A frame
/// waiting meanwhile (with `MRG_RXBUF`) is spread over one buffer per byte: more than the 65535
/// a frame's `num_buffers` can count, for the largest frames.
/// Stops at TSC `deadline`.
pub fn crumbs(rng: &mut Rng, arena: &Arena, dev: &mut Dev, deadline: u64) -> u64 {
    let Some(mut vq) = dev.queues.first().copied().filter(|vq| vq.size != 0) else {
        return 0;
    };
    if dev.id != ID_NET || dev.features & F_EVENT_IDX == 0 {
        return 0;
    }
    let ops = crumb_rounds(rng, arena, dev, &mut vq, deadline);
    dev.queues[0].idx = vq.idx;
    ops
}

fn crumb_rounds(rng: &mut Rng, arena: &Arena, dev: &Dev, vq: &mut Vq, deadline: u64) -> u64 {
    let table = Table {
        addr: vq.desc,
        size: vq.size,
    };
    let avail_event = vq.used + 4 + 8 * u64::from(vq.size);
    if !arena.holds_rings(avail_event, 2) {
        return 0;
    }
    let mut ops = 0;
    for _ in 0..300 {
        if clock::now() > deadline {
            break;
        }
        let buf = arena.small(rng);
        for i in 0..vq.size {
            table.set(i, buf + u64::from(i % 256), 1, DESC_WRITE, 0);
            let slot = vq.idx.wrapping_add(i) % vq.size;
            // SAFETY: the avail ring of a queue the guest set up in the ring region.
            unsafe { put(vq.avail + 4 + 2 * u64::from(slot), i) };
        }
        vq.idx = vq.idx.wrapping_add(vq.size);
        // SAFETY: as above.
        unsafe { put(vq.avail + 2, vq.idx) };
        dev.notify(arena, 0);
        ops += u64::from(vq.size) + 1;
        // Up to 10 ms for the device to take them all (it does only while a frame waits).
        let until = deadline.min(clock::now() + clock::ticks(10_000));
        // SAFETY: the used ring's avail_event word (in the ring region), which the device writes.
        while unsafe { get::<u16>(avail_event) } != vq.idx {
            if clock::now() > until {
                return ops;
            }
            core::hint::spin_loop();
        }
    }
    ops
}

/// Hoarding: `count` receive chains (at most a queue) of one byte of room in 65535 descriptors
/// each (one indirect table of 1 MiB, every entry empty but the last). A device that keeps,
/// per chain it holds, a record per descriptor spends a megabyte on each byte of room, and a
/// frame waiting for room (with `MRG_RXBUF`) makes it take all it is given.
pub fn hoard(rng: &mut Rng, arena: &Arena, dev: &mut Dev, count: u16) -> u64 {
    let Some(vq) = dev.queues.first_mut().filter(|vq| vq.size != 0) else {
        return 0;
    };
    if dev.id != ID_NET {
        return 0;
    }
    let big = Table {
        addr: arena.hoard_table(),
        size: HOARD_ENTRIES,
    };
    let buf = arena.small(rng);
    for i in 0..HOARD_ENTRIES - 1 {
        big.set(i, buf, 0, DESC_WRITE | DESC_NEXT, i + 1);
    }
    big.set(HOARD_ENTRIES - 1, buf, 1, DESC_WRITE, 0);
    let queue = Table {
        addr: vq.desc,
        size: vq.size,
    };
    let count = vq.size.min(count);
    for i in 0..count {
        queue.set(i, big.addr, 16 * u32::from(HOARD_ENTRIES), DESC_INDIRECT, 0);
        let slot = vq.idx.wrapping_add(i) % vq.size;
        // SAFETY: the avail ring of a queue the guest set up in the ring region.
        unsafe { put(vq.avail + 4 + 2 * u64::from(slot), i) };
    }
    vq.idx = vq.idx.wrapping_add(count);
    // SAFETY: as above.
    unsafe { put(vq.avail + 2, vq.idx) };
    dev.notify(arena, 0);
    u64::from(count) + 1
}

/// Moves the avail index anywhere and notifies.
pub fn jump(rng: &mut Rng, arena: &Arena, dev: &mut Dev, q: usize) -> u64 {
    let Some(vq) = dev.queues.get_mut(q).filter(|vq| vq.size != 0) else {
        return 0;
    };
    vq.idx = vq.idx.wrapping_add(rng.u16());
    // SAFETY: the avail ring of a queue the guest set up in the ring region.
    unsafe { put(vq.avail + 2, vq.idx) };
    dev.notify(arena, q as u32);
    2
}

/// Writes one chain into the queue's table at a random place; returns its head.
fn chain(rng: &mut Rng, arena: &Arena, dev: &Dev, q: usize, vq: Vq) -> u16 {
    let table = Table {
        addr: vq.desc,
        size: vq.size,
    };
    let head = rng.below(vq.size.into()) as u16;
    let mut segs = [Seg::EMPTY; MAX_SEGS];
    let n = match rng.below(4) {
        0 => 0,
        _ => payload::plausible(rng, arena, dev, q, &mut segs),
    };
    if n == 0 {
        // Garbage: 1 to 6 descriptors, or more than the queue holds.
        let len = match rng.one_in(10) {
            true => vq.size + 2,
            false => 1 + rng.below(6) as u16,
        };
        for i in 0..len {
            let at = head.wrapping_add(i) % vq.size;
            let next = garbage(rng, arena, table, at);
            if i + 1 < len && next != at.wrapping_add(1) % vq.size {
                break; // the chain went elsewhere
            }
        }
        return head;
    }
    let segs = &mut segs[..n];
    mutate(rng, arena, segs);
    if rng.one_in(8) {
        indirect(rng, arena, table, head, segs);
        return head;
    }
    link(rng, table, head, segs);
    head
}

/// At most one thing wrong with a plausible chain: a flipped direction, a buffer anywhere, a
/// length anywhere.
fn mutate(rng: &mut Rng, arena: &Arena, segs: &mut [Seg]) {
    let i = rng.below(segs.len() as u64) as usize;
    let Some(seg) = segs.get_mut(i) else { return };
    match rng.below(16) {
        0 => seg.write = !seg.write,
        1 => (seg.addr, seg.len) = arena.fix(arena.addr(rng), seg.len),
        2 => (seg.addr, seg.len) = arena.fix(seg.addr, arena.len(rng)),
        _ => {}
    }
}

/// Writes `segs` as consecutive descriptors from `head` (modulo the table), linked with `NEXT`;
/// sometimes the last one loops back.
fn link(rng: &mut Rng, table: Table, head: u16, segs: &[Seg]) {
    let looped = rng.one_in(32);
    for (i, seg) in segs.iter().enumerate() {
        let at = head.wrapping_add(i as u16) % table.size;
        let last = i + 1 == segs.len();
        let (flags, next) = match (last, looped) {
            (false, _) => (DESC_NEXT, at.wrapping_add(1) % table.size),
            (true, true) => (DESC_NEXT, head),
            (true, false) => (0, 0),
        };
        let write = if seg.write { DESC_WRITE } else { 0 };
        table.set(at, seg.addr, seg.len, flags | write, next);
    }
}

/// Puts `segs` in an indirect table and one `INDIRECT` descriptor at `head`; the table length
/// may be wrong, the table outside RAM, or it may hold a nested indirect descriptor pointing at
/// itself.
fn indirect(rng: &mut Rng, arena: &Arena, queue: Table, head: u16, segs: &[Seg]) {
    let table = Table {
        addr: arena.indirect(rng),
        size: 256,
    };
    link(rng, table, 0, segs);
    let n = segs.len() as u32;
    if rng.one_in(8) {
        let at = rng.below(n.into()) as u16;
        table.set(at, table.addr, 16 * n, DESC_INDIRECT | DESC_NEXT, 0);
    }
    let len = match rng.below(12) {
        0 => 0,
        1 => 16 * n + 8,
        2 => rng.pick(&[16 * 4096, 16 * 65535, 16 * 65536, 0xffff_fff0]),
        _ => 16 * n,
    };
    let (addr, len) = match rng.below(16) {
        0 => (arena.outside(rng), len),
        // The queue's own table as an indirect one (no further: the used rings follow).
        1 => (queue.addr, len.min(16 * u32::from(queue.size))),
        2 => (table.addr + 1 + rng.below(15), len),
        _ => (table.addr, len),
    };
    let write = if rng.one_in(16) { DESC_WRITE } else { 0 };
    queue.set(head, addr, len, DESC_INDIRECT | write, 0);
}

/// A garbage descriptor at index `at`; returns its `next`.
fn garbage(rng: &mut Rng, arena: &Arena, table: Table, at: u16) -> u16 {
    let flags = match rng.below(16) {
        0 => rng.u16() & !DESC_WRITE,
        1 => DESC_INDIRECT,
        _ => (DESC_NEXT * rng.below(2) as u16) | (DESC_WRITE * rng.below(2) as u16),
    };
    // The device reads an indirect table as descriptors: only tables the guest wrote, or
    // nothing at all. Other read-only descriptors may point at the table itself.
    let (addr, len) = match (
        flags & DESC_INDIRECT != 0,
        flags & DESC_WRITE == 0,
        rng.below(4),
    ) {
        (true, _, 0) => (arena.outside(rng), arena.len(rng)),
        (true, _, 1) => (arena.indirect(rng), 16 * rng.below(64) as u32),
        (true, _, _) => (table.addr, 16 * rng.below(64) as u32),
        (false, true, 0) => (table.addr, 16 * u32::from(table.size)),
        _ => arena.fix(arena.addr(rng), arena.len(rng)),
    };
    let next = match rng.below(8) {
        0 => rng.u16(),
        1 => at,
        _ => at.wrapping_add(1) % table.size.max(1),
    };
    table.set(at, addr, len, flags, next);
    next
}
