//! One split virtqueue: setup, publishing descriptor chains, and reaping the used ring, either
//! synchronously (blk: [`Queue::submit`], interrupt-driven with a PIT timeout) or by polling
//! (blk's bench and the net driver: [`Queue::stage`], [`Queue::publish`], [`Queue::pending`],
//! [`Queue::used_elem`], [`Queue::take`]).
//!
//! blk's synchronous ops have one request in flight at a time, each in its own group of
//! [`GROUP`] descriptors (rotating through the table), so a request the device completes late
//! cannot have its descriptors rewritten under it by the next one.
//!
//! The polling methods only touch memory and the notify register, so they may run in ring 3.

use core::sync::atomic::{Ordering, compiler_fence, fence};

use super::{
    F_EVENT_IDX, IRQS, Mmio, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NOTIFY, QUEUE_NUM,
    QUEUE_NUM_MAX, QUEUE_READY, QUEUE_SEL, get, put,
};
use crate::{apic, clock, idt};

const AVAIL_NO_INTERRUPT: u16 = 1;
const USED_NO_NOTIFY: u16 = 1;

/// Queue size of blk's queue.
const BLK_QUEUE: u16 = 64;
/// Descriptors per request slot: header, data, status, one spare.
pub const GROUP: u16 = 4;
/// How long a request may take before it is reported as `timeout`.
const TIMEOUT_US: u64 = 1_000_000;

/// A queue set up in a queue area: descriptor table at +0, avail ring after it, used ring after
/// that (4-byte aligned); [`Queue::area_len`] bytes in all.
pub struct Queue {
    mmio: Mmio,
    index: u16,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    event_idx: bool,
    avail_idx: u16,
    /// Heads put in the avail ring after `avail_idx` but not yet published.
    staged: u16,
    last_used: u16,
    /// Length the device reported for the last chain taken by [`Queue::submit`].
    last_len: u32,
}

/// How a request ended.
#[derive(Clone, Copy)]
pub enum Completion {
    /// The device put the chain in the used ring and interrupted.
    Used,
    /// The chain reached the used ring, but no interrupt came within the timeout.
    NoInterrupt,
    Timeout,
}

impl Queue {
    /// Bytes of queue area a queue of `size` entries needs.
    pub const fn area_len(size: u16) -> u64 {
        let size = size as u64;
        (16 * size + 6 + 2 * size).next_multiple_of(4) + 6 + 8 * size
    }

    /// Sets up blk's queue 0 after [`Mmio::negotiate`] and sets `DRIVER_OK` (see
    /// [`Mmio::driver_ok`]).
    ///
    /// # Safety
    /// `area` must be 4 KiB of RAM the guest owns, for this queue only.
    pub unsafe fn new(
        mmio: Mmio,
        features: u64,
        area: u64,
        dest: u8,
    ) -> Result<Queue, &'static str> {
        // SAFETY: `area_len(64)` is below 4 KiB, which the caller gives us.
        let queue = unsafe { Queue::setup(mmio, 0, features, area, BLK_QUEUE)? };
        mmio.driver_ok(dest)?;
        Ok(queue)
    }

    /// Sets up queue `index` with up to `max` (a power of two) entries after
    /// [`Mmio::negotiate`]; the caller sets `DRIVER_OK` once all its queues are set up.
    ///
    /// # Safety
    /// `area` must be [`Queue::area_len`]`(max)` bytes of RAM the guest owns, for this queue only.
    pub unsafe fn setup(
        mmio: Mmio,
        index: u16,
        features: u64,
        area: u64,
        max: u16,
    ) -> Result<Queue, &'static str> {
        mmio.write(QUEUE_SEL, index.into());
        if mmio.read(QUEUE_READY) != 0 {
            return Err(mmio.fail("queue already ready after reset"));
        }
        let max = mmio.read(QUEUE_NUM_MAX).min(max.into()) as u16;
        if max < GROUP {
            return Err(mmio.fail("QueueNumMax below 4"));
        }
        let size = 1 << (15 - max.leading_zeros()); // a power of two, as split rings need
        // SAFETY: the caller gives us the area, of at least `area_len(size)` bytes.
        unsafe { crate::mem::memset(area as *mut u8, 0, Queue::area_len(size) as usize) };
        let avail = area + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64).next_multiple_of(4);
        mmio.write(QUEUE_NUM, size.into());
        mmio.write64(QUEUE_DESC, area);
        mmio.write64(QUEUE_DRIVER, avail);
        mmio.write64(QUEUE_DEVICE, used);
        mmio.write(QUEUE_READY, 1);
        Ok(Queue {
            mmio,
            index,
            desc: area,
            avail,
            used,
            size,
            event_idx: features & F_EVENT_IDX != 0,
            avail_idx: 0,
            staged: 0,
            last_used: 0,
            last_len: 0,
        })
    }

    /// First descriptor of the next request's group.
    pub fn head(&self) -> u16 {
        self.avail_idx.wrapping_mul(GROUP) % self.size
    }

    /// Writes descriptor `index` of the descriptor table or indirect table at `table`.
    ///
    /// # Safety
    /// `table` must be a queue's table ([`Queue::table`]) or an indirect table the caller owns,
    /// with room for `index`.
    pub unsafe fn set_desc(table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = table + 16 * index as u64;
        // SAFETY: per the caller.
        unsafe {
            put(d, addr);
            put(d + 8, len);
            put(d + 12, flags);
            put(d + 14, next);
        }
    }

    /// The descriptor table (for [`Queue::set_desc`]).
    pub fn table(&self) -> u64 {
        self.desc
    }

    /// Number of descriptors in the table (and entries in each ring).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Puts the chain at `head` in the avail ring without publishing it (see [`Queue::publish`]).
    /// The caller keeps at most [`Queue::size`] chains outstanding.
    pub fn stage(&mut self, head: u16) {
        let slot = self.avail_idx.wrapping_add(self.staged) % self.size;
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(self.avail + 4 + 2 * slot as u64, head) };
        self.staged += 1;
    }

    /// Heads staged but not yet published.
    pub fn staged(&self) -> u16 {
        self.staged
    }

    /// Publishes the staged chains (one store of the avail index) and notifies the device if it
    /// asked for it (`avail_event` with `EVENT_IDX`, else the used ring's `NO_NOTIFY` flag).
    pub fn publish(&mut self) {
        let old = self.avail_idx;
        let new = old.wrapping_add(self.staged);
        compiler_fence(Ordering::Release); // x86 keeps stores in order
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(self.avail + 2, new) };
        self.avail_idx = new;
        self.staged = 0;
        fence(Ordering::SeqCst); // the idx store must be visible before we read avail_event
        // SAFETY: the used ring lives in our queue area.
        let notify = unsafe {
            if self.event_idx {
                let event: u16 = get(self.used + 4 + 8 * self.size as u64);
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                get::<u16>(self.used) & USED_NO_NOTIFY == 0
            }
        };
        if notify {
            self.mmio.write(QUEUE_NOTIFY, self.index.into());
        }
    }

    /// Used elements the device has added that the driver has not taken yet.
    pub fn pending(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.used_idx().wrapping_sub(self.last_used)
    }

    /// The `(id, len)` of the `k`-th untaken used element (`k` < [`Queue::pending`]).
    pub fn used_elem(&self, k: u16) -> (u32, u32) {
        let slot = self.last_used.wrapping_add(k) % self.size;
        let elem = self.used + 4 + 8 * slot as u64;
        // SAFETY: the used ring lives in our queue area.
        unsafe { (get(elem), get(elem + 4)) }
    }

    /// Takes `n` used elements (without re-arming the interrupt: see [`Queue::arm`]).
    pub fn take(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
    }

    /// Asks for an interrupt at the next used element; true when there is none yet (so the
    /// caller may sleep until the interrupt).
    pub fn arm(&mut self) -> bool {
        // SAFETY: the avail ring (and `used_event` after it) lives in our queue area.
        unsafe {
            put(self.avail + 4 + 2 * self.size as u64, self.last_used);
            put(self.avail, 0u16);
        }
        self.pending() == 0
    }

    /// Asks the device for no interrupts (a hint: `NO_INTERRUPT`, or `used_event` half the
    /// index space away with `EVENT_IDX`).
    pub fn quiet(&mut self) {
        let far = self.last_used.wrapping_add(0x8000);
        // SAFETY: as in `arm`.
        unsafe {
            put(self.avail + 4 + 2 * self.size as u64, far);
            put(self.avail, AVAIL_NO_INTERRUPT);
        }
    }

    /// Makes the chain at `head` available, notifies the device if it wants it, and waits for
    /// that chain in the used ring (completions of older, timed-out chains are skipped).
    pub fn submit(&mut self, head: u16) -> Completion {
        // Interrupts are off until `wait_halting` halts: none can be counted before this load.
        let irqs = IRQS.load(Ordering::SeqCst);
        let used_event = self.avail + 4 + 2 * self.size as u64;
        // SAFETY: the avail ring lives in our queue area.
        unsafe { put(used_event, self.last_used) };
        self.stage(head);
        self.publish();
        let mut used_seen = false;
        apic::start_tick(idt::TICK_VECTOR);
        let interrupted = clock::wait_halting(TIMEOUT_US, || {
            fence(Ordering::SeqCst);
            while !used_seen && self.used_idx() != self.last_used {
                used_seen = self.pop_used() == head as u32;
            }
            used_seen && IRQS.load(Ordering::SeqCst) != irqs
        });
        apic::stop_tick();
        match (used_seen, interrupted) {
            (true, true) => Completion::Used,
            (true, false) => Completion::NoInterrupt,
            (false, _) => Completion::Timeout,
        }
    }

    /// Bytes the device said it wrote into the last chain [`Queue::submit`] waited for.
    pub fn last_len(&self) -> u32 {
        self.last_len
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring lives in our queue area.
        unsafe { get(self.used + 2) }
    }

    /// Takes the next used element and returns its descriptor id; re-arms `used_event` for the
    /// element after it.
    fn pop_used(&mut self) -> u32 {
        let (id, len) = self.used_elem(0);
        self.last_len = len;
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: the rings live in our queue area.
        unsafe { put(self.avail + 4 + 2 * self.size as u64, self.last_used) };
        id
    }
}
