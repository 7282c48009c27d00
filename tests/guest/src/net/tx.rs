//! The transmit queue, in slots: slot *k* owns descriptors *2k* and *2k + 1* (a chain is one
//! or two descriptors, its head always *2k*) and a 128-byte header buffer; the first
//! [`REPLY_SLOTS`] also own a reply buffer for a whole frame. A slot is busy from [`Tx::start`]
//! until the device returns its head in the used ring. The device interrupts are not wanted
//! here ([`Queue::quiet`]): completions are reaped by polling.
//!
//! Only memory and the notify register are touched, so this may run in ring 3.

use super::Diag;
use super::bytes::Bytes;
use crate::virtio::Queue;

/// Most slots (half of a 256-entry queue).
pub const MAX_SLOTS: u16 = 128;
/// Header buffer per slot.
pub const SLOT_HDR: u64 = 128;
/// Slots with a reply buffer.
pub const REPLY_SLOTS: u16 = 8;
/// A reply buffer: header and a 64 KiB frame, or `bad:huge`'s 70 000 bytes.
pub const REPLY_LEN: u64 = 0x1_2000;

pub struct Tx {
    pub q: Queue,
    slots: u16,
    /// Bit *k*: slot *k* is with the device.
    busy: [u64; 2],
    /// Bit *k*: slot *k*'s completion is nobody's (given up on, or older than a burst).
    orphan: [u64; 2],
    nbusy: u16,
    /// Where [`Tx::free_slot`] looks first.
    next: u16,
    hdrs: u64,
    replies: u64,
}

fn bit(set: &[u64; 2], k: u16) -> bool {
    set[k as usize / 64] & 1 << (k % 64) != 0
}

fn assign(set: &mut [u64; 2], k: u16, on: bool) {
    let mask = 1 << (k % 64);
    match on {
        true => set[k as usize / 64] |= mask,
        false => set[k as usize / 64] &= !mask,
    }
}

impl Tx {
    /// # Safety
    /// `hdrs` ([`Tx::HDRS_LEN`] bytes) and `replies` ([`Tx::REPLIES_LEN`]) must be RAM the driver
    /// owns for this queue.
    pub unsafe fn new(mut q: Queue, hdrs: u64, replies: u64) -> Tx {
        q.quiet();
        Tx {
            slots: (q.size() / 2).min(MAX_SLOTS),
            q,
            busy: [0; 2],
            orphan: [0; 2],
            nbusy: 0,
            next: 0,
            hdrs,
            replies,
        }
    }

    pub const HDRS_LEN: u64 = MAX_SLOTS as u64 * SLOT_HDR;
    pub const REPLIES_LEN: u64 = REPLY_SLOTS as u64 * REPLY_LEN;

    /// Slot `k`'s header buffer.
    pub fn hdr(&self, k: u16) -> Bytes {
        // SAFETY: inside the header area the creator gave us (k < slots <= MAX_SLOTS).
        unsafe { Bytes::new(self.hdrs + k as u64 * SLOT_HDR, SLOT_HDR as u32) }
    }

    /// Slot `k`'s reply buffer (`k` < [`Tx::reply_slots`]).
    pub fn reply(&self, k: u16) -> Bytes {
        let k = k.min(REPLY_SLOTS - 1);
        // SAFETY: inside the reply area the creator gave us.
        unsafe { Bytes::new(self.replies + k as u64 * REPLY_LEN, REPLY_LEN as u32) }
    }

    pub fn reply_slots(&self) -> u16 {
        REPLY_SLOTS.min(self.slots)
    }

    pub fn busy(&self, k: u16) -> bool {
        bit(&self.busy, k)
    }

    /// Writes descriptor `i` (0 or 1) of slot `k`; with `DESC_NEXT` in `flags` it chains to the
    /// slot's descriptor `next` (0 or 1).
    pub fn desc(&mut self, k: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: descriptors 2k and 2k + 1 of our own table (k < slots <= size / 2).
        unsafe { Queue::set_desc(self.q.table(), 2 * k + i, addr, len, flags, 2 * k + next) }
    }

    /// Stages slot `k`'s chain (publish with `q.publish()`).
    pub fn start(&mut self, k: u16) {
        assign(&mut self.busy, k, true);
        self.nbusy += 1;
        self.q.stage(2 * k);
    }

    /// Takes every used element and frees its slot; returns how many slots came back that were
    /// not orphans.
    pub fn reclaim(&mut self, diag: &mut Diag) -> u64 {
        let n = self.q.pending();
        let mut back = 0;
        for j in 0..n {
            let (id, _) = self.q.used_elem(j);
            let k = (id / 2) as u16;
            if id % 2 != 0 || k >= self.slots || !self.busy(k) {
                diag.note("tx used id not a chain the device holds");
                continue;
            }
            assign(&mut self.busy, k, false);
            self.nbusy -= 1;
            if bit(&self.orphan, k) {
                assign(&mut self.orphan, k, false);
            } else {
                back += 1;
            }
        }
        if n != 0 {
            self.q.take(n);
            self.q.quiet(); // keeps `used_event` half the index space ahead
        }
        back
    }

    /// A free slot, looking from the one after the last handed out (so slots rotate).
    pub fn free_slot(&mut self) -> Option<u16> {
        if self.nbusy == self.slots {
            return None;
        }
        for _ in 0..self.slots {
            let k = self.next;
            self.next = (k + 1) % self.slots;
            if !self.busy(k) {
                return Some(k);
            }
        }
        None
    }

    /// A free slot with a reply buffer.
    pub fn free_reply_slot(&self) -> Option<u16> {
        (0..self.reply_slots()).find(|&k| !self.busy(k))
    }

    /// Marks every busy slot an orphan: its completion will not be counted.
    pub fn orphan_all(&mut self) {
        self.orphan = self.busy;
    }

    /// Marks slot `k` (busy) an orphan.
    pub fn orphan(&mut self, k: u16) {
        assign(&mut self.orphan, k, true);
    }
}
