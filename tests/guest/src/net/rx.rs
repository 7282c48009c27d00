//! The receive queue: buffer *i* is descriptor *i* (one device-writable descriptor each), all
//! posted at start and re-posted once their frame is handled. Frames are validated before use:
//! the used id must be a buffer the device holds, used lengths must fit the buffers, and
//! `num_buffers` (with `MRG_RXBUF`) must be plausible; what fails is dropped and noted in
//! [`Diag`].
//!
//! Only memory and the notify register are touched, so this may run in ring 3.

use super::Diag;
use super::bytes::Bytes;
use crate::virtio::{DESC_WRITE, Queue};

/// The `virtio_net_hdr_v1` in front of every frame.
pub const HDR_LEN: u32 = 12;
/// Longest frame accepted: a 64 KiB IPv4 packet plus the Ethernet header.
pub const MAX_FRAME: u32 = 65536 + 14;
/// Ethernet header length.
pub const ETH_LEN: u32 = 14;
/// Most buffers a frame may span (with the smallest buffers, [`MRG_BUF`]).
const MAX_SEGS: usize = (MAX_FRAME + HDR_LEN).div_ceil(MRG_BUF) as usize;
/// Buffer size with `MRG_RXBUF`: a page, frames span several.
pub const MRG_BUF: u32 = 4096;
/// Buffer size without it: a whole 64 KiB frame and its header, page-rounded.
pub const BIG_BUF: u32 = 0x1_1000;
/// Most big buffers posted (memory: 64 × 68 KiB).
pub const MAX_BIG_BUFS: u16 = 64;
/// Re-posted buffers are published in batches of this many (and whenever the ring runs dry).
const PUBLISH_BATCH: u16 = 32;

/// A received frame: `nbufs` used elements from the oldest untaken one.
#[derive(Clone, Copy)]
pub struct Frame {
    nbufs: u16,
    /// Length of the frame (without the virtio-net header).
    pub len: u32,
    /// The part of the frame in the first buffer (at least the Ethernet header). The
    /// virtio-net header before it is not needed: the driver verifies no L4 checksum (which
    /// `NEEDS_CSUM` would leave partial).
    pub first: Bytes,
}

impl Frame {
    pub fn ethertype(&self) -> u16 {
        self.first.be16(12)
    }
}

pub struct Rx {
    pub q: Queue,
    bufs: u64,
    buf_len: u32,
    count: u16,
    mrg: bool,
    /// Bit *i*: buffer *i* is with the device.
    posted: [u64; 4],
}

impl Rx {
    /// Posts every buffer: `MRG_BUF`-sized ones for each queue entry with `mrg`, else up to
    /// `MAX_BIG_BUFS` of `BIG_BUF`.
    ///
    /// # Safety
    /// `bufs` must be RAM the driver owns for this queue: [`Rx::bufs_len`] bytes.
    pub unsafe fn new(q: Queue, bufs: u64, mrg: bool) -> Rx {
        let (buf_len, count) = match mrg {
            true => (MRG_BUF, q.size()),
            false => (BIG_BUF, q.size().min(MAX_BIG_BUFS)),
        };
        let mut rx = Rx {
            q,
            bufs,
            buf_len,
            count,
            mrg,
            posted: [0; 4],
        };
        for id in 0..count {
            // SAFETY: descriptor `id` of our own queue, pointing at buffer `id` (ours).
            unsafe { Queue::set_desc(rx.q.table(), id, rx.buf(id), buf_len, DESC_WRITE, 0) };
            rx.post(id);
        }
        rx.q.quiet(); // only the responder sleeps for frames (it arms the queue)
        rx.q.publish();
        rx
    }

    /// The RAM the buffers need at most.
    pub const fn bufs_len() -> u64 {
        let mrg = 256 * MRG_BUF as u64;
        let big = MAX_BIG_BUFS as u64 * BIG_BUF as u64;
        if mrg > big { mrg } else { big }
    }

    fn buf(&self, id: u16) -> u64 {
        self.bufs + id as u64 * self.buf_len as u64
    }

    fn post(&mut self, id: u16) {
        self.posted[id as usize / 64] |= 1 << (id % 64);
        self.q.stage(id);
    }

    /// Whether `id` names a buffer the device holds.
    fn held(&self, id: u32) -> bool {
        id < self.count as u32 && self.posted[id as usize / 64] & 1 << (id % 64) != 0
    }

    /// The next complete frame, or `None` if there is none yet.
    pub fn next(&mut self, diag: &mut Diag) -> Option<Frame> {
        'frames: loop {
            let pending = self.q.pending();
            if pending == 0 {
                return None;
            }
            let (id, len) = self.q.used_elem(0);
            if !self.held(id) {
                diag.note("rx used id not held by the device");
                self.q.take(1);
                continue;
            }
            // SAFETY: buffer `id` is ours and the device has given it back.
            let first = unsafe { Bytes::new(self.buf(id as u16), self.buf_len) };
            let nbufs = if self.mrg { first.le16(10) } else { 1 };
            if len < HDR_LEN + ETH_LEN || len > self.buf_len {
                diag.note("rx used length out of range");
                self.recycle(1);
                continue;
            }
            if nbufs == 0 || nbufs as usize > MAX_SEGS {
                diag.note("rx num_buffers out of range");
                self.recycle(1);
                continue;
            }
            if pending < nbufs {
                return None; // the rest of the frame is not there yet
            }
            let mut total = len - HDR_LEN;
            for k in 1..nbufs {
                let (id, len) = self.q.used_elem(k);
                if !self.held(id) || len == 0 || len > self.buf_len {
                    diag.note("rx bad used element inside a merged frame");
                    self.recycle(k); // the bad element is dropped on the next round
                    continue 'frames;
                }
                total += len;
            }
            if total > MAX_FRAME {
                diag.note("rx frame longer than 65550 bytes");
                self.recycle(nbufs);
                continue;
            }
            return Some(Frame {
                nbufs,
                len: total,
                first: first.sub(HDR_LEN, len - HDR_LEN),
            });
        }
    }

    /// Copies `frame` to `dst` (room for [`MAX_FRAME`] bytes) and returns the copy.
    ///
    /// # Safety
    /// `dst` must be RAM the caller owns, of `MAX_FRAME` bytes.
    pub unsafe fn gather(&self, frame: &Frame, dst: u64) -> Bytes {
        // SAFETY: per the caller.
        let out = unsafe { Bytes::new(dst, frame.len) };
        out.copy_from(0, frame.first);
        let mut at = frame.first.len;
        for k in 1..frame.nbufs {
            let (id, len) = self.q.used_elem(k);
            // SAFETY: validated by `next`: a buffer of ours, `len` within it.
            let seg = unsafe { Bytes::new(self.buf(id as u16), len) };
            out.copy_from(at, seg);
            at += len;
        }
        out
    }

    /// The whole frame in one piece: in place if it is in one buffer, else gathered to `scratch`.
    ///
    /// # Safety
    /// As for [`Rx::gather`].
    pub unsafe fn contiguous(&self, frame: &Frame, scratch: u64) -> Bytes {
        match frame.nbufs {
            1 => frame.first,
            // SAFETY: per the caller.
            _ => unsafe { self.gather(frame, scratch) },
        }
    }

    /// Gives the frame's buffers back to the device.
    pub fn done(&mut self, frame: Frame) {
        self.recycle(frame.nbufs);
        if self.q.staged() >= PUBLISH_BATCH {
            self.q.publish();
        }
    }

    /// Publishes the re-posted buffers (call when there is no frame to handle).
    pub fn flush(&mut self) {
        if self.q.staged() != 0 {
            self.q.publish();
        }
    }

    /// Takes `n` used elements and re-posts their buffers (each held one once).
    fn recycle(&mut self, n: u16) {
        let mut ids = [0u16; MAX_SEGS];
        let mut count = 0;
        for k in 0..n {
            let (id, _) = self.q.used_elem(k);
            if self.held(id) && count < MAX_SEGS {
                self.posted[id as usize / 64] &= !(1 << (id % 64));
                ids[count] = id as u16;
                count += 1;
            }
        }
        self.q.take(n);
        self.q.quiet();
        for &id in &ids[..count] {
            self.post(id);
        }
    }
}
