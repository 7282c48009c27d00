//! Plausible chains (ring 3): block requests of every type, transmitted frames (ARP requests
//! that the host answers, so frames come back; random frames with random offload headers) and
//! receive buffers. They get the device past its first checks into the deep paths (disk I/O,
//! TAP writes and reads), where `chains.rs` may still make one thing wrong.

use super::arena::Arena;
use super::chains::MAX_SEGS;
use super::device::{Dev, ID_BLK, ID_NET};
use super::rng::Rng;
use crate::virtio::put;

/// One buffer of a chain.
#[derive(Clone, Copy)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Seg {
    pub const EMPTY: Seg = Seg {
        addr: 0,
        len: 0,
        write: false,
    };
}

const SECTOR: u64 = 512;
const BLK_TYPES: [u32; 10] = [0, 0, 0, 1, 1, 1, 4, 8, 11, 13];
const VNET_HDR: u32 = 12;
/// The ARP requests ask for the host side's address from the guest's (docs/test-guest.md).
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];

/// Fills `segs` with a plausible chain for queue `q` of `dev`; returns how many (0: none for
/// this device).
pub fn plausible(rng: &mut Rng, arena: &Arena, dev: &Dev, q: usize, segs: &mut [Seg]) -> usize {
    match (dev.id, q) {
        (ID_BLK, _) => blk(rng, arena, dev, segs),
        (ID_NET, 0) => rx(rng, arena, segs),
        (ID_NET, _) => tx(rng, arena, dev, segs),
        _ => 0,
    }
}

/// Writes `bytes` at `addr` (a small or data buffer of the area).
fn write(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: `addr` is a buffer of the attack area with room for `bytes`.
        unsafe { put(addr + i as u64, b) };
    }
}

/// Random words here and there in `len` bytes at `addr` (a buffer of the area, or outside
/// RAM, where nothing is written): cheap even for big buffers, and makes written data visible.
fn scatter(rng: &mut Rng, arena: &Arena, addr: u64, len: u32) {
    if !arena.owns(addr, len.into()) {
        return;
    }
    let mut off = 0;
    while off + 8 <= u64::from(len) {
        // SAFETY: inside the buffer, which lies in the attack area.
        unsafe { put(addr + off, rng.next()) };
        off += 8 * (1 + rng.below(64));
    }
}

/// A block request: header, 0 to 3 data buffers, status byte.
fn blk(rng: &mut Rng, arena: &Arena, dev: &Dev, segs: &mut [Seg]) -> usize {
    let kind = match rng.one_in(10) {
        true => rng.u32(),
        false => rng.pick(&BLK_TYPES),
    };
    let cap = dev.capacity;
    let sector = match rng.below(8) {
        0 => cap.wrapping_sub(1),
        1 => cap,
        2 => rng.pick(&[u64::MAX, u64::MAX / SECTOR, 1 << 55]),
        3 => 0,
        _ => rng.below(cap.max(1)),
    };
    let header = arena.small(rng);
    // SAFETY: a small buffer of the area (256 bytes of room).
    unsafe {
        put(header, kind);
        put(header + 4, if rng.one_in(8) { rng.u32() } else { 0 });
        put(header + 8, sector);
    }
    segs[0] = Seg {
        addr: header,
        len: 16,
        write: false,
    };
    let device_writes = kind == 0 || kind == 8;
    let ndata = match kind {
        4 if !rng.one_in(8) => 0,
        _ => rng.below(4) as usize,
    };
    for seg in segs.iter_mut().take(ndata + 1).skip(1) {
        *seg = match kind {
            11 | 13 => {
                // Discard / write-zeroes: one or more {sector, count, flags} segments.
                let at = arena.small(rng);
                let count = (1 + rng.below(4)) as u32;
                for i in 0..u64::from(count) {
                    let range = [rng.below(cap.max(1)), rng.below(256), rng.below(3)];
                    // SAFETY: inside the small buffer (4 segments of 16 bytes).
                    unsafe {
                        put(at + 16 * i, range[0]);
                        put(at + 16 * i + 8, range[1] as u32);
                        put(at + 16 * i + 12, range[2] as u32);
                    }
                }
                Seg {
                    addr: at,
                    len: 16 * count,
                    write: false,
                }
            }
            _ => {
                let len = match rng.below(16) {
                    0 => rng.below(16 << 20) as u32 & !511,
                    1 => rng.below(4096) as u32,
                    _ => 512 * (1 + rng.below(64)) as u32,
                };
                let (addr, len) = arena.fix(arena.data(rng, len.into()), len);
                if kind == 1 {
                    scatter(rng, arena, addr, len.min(1 << 20));
                }
                Seg {
                    addr,
                    len,
                    write: device_writes,
                }
            }
        };
    }
    segs[ndata + 1] = Seg {
        addr: arena.small(rng) + 255,
        len: 1,
        write: true,
    };
    ndata + 2
}

/// Receive buffers: one to four device-writable buffers of typical or odd sizes.
fn rx(rng: &mut Rng, arena: &Arena, segs: &mut [Seg]) -> usize {
    let n = 1 + rng.below(4) as usize;
    for seg in segs.iter_mut().take(n) {
        let len = match rng.below(6) {
            0 => rng.pick(&[1, 11, 12, 13, 60]),
            1 => rng.pick(&[1526, 4096, 65_562, 65_550]),
            _ => 1 + rng.below(8192) as u32,
        };
        let (addr, len) = arena.fix(arena.data(rng, len.into()), len);
        *seg = Seg {
            addr,
            len,
            write: true,
        };
    }
    n
}

/// A frame to transmit: the virtio-net header and the frame, in one to four buffers.
fn tx(rng: &mut Rng, arena: &Arena, dev: &Dev, segs: &mut [Seg]) -> usize {
    let at = arena.data(rng, 70_000);
    let frame = at + u64::from(VNET_HDR);
    let len = match rng.below(4) {
        0 => {
            let mut arp = [0u8; 60];
            arp[..6].fill(0xff);
            arp[6..12].copy_from_slice(&dev.mac);
            arp[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            arp[22..28].copy_from_slice(&dev.mac);
            arp[28..32].copy_from_slice(&GUEST_IP);
            arp[38..42].copy_from_slice(&HOST_IP);
            write(frame, &arp);
            60
        }
        1 => 14 + rng.below(65_522) as u32,
        _ => 14 + rng.below(1501) as u32,
    };
    // Random bytes after the Ethernet addresses (the ARP request stays as built).
    if len != 60 {
        scatter(rng, arena, frame + 12, len - 12);
    }
    // The virtio-net header: usually plain, else random offload requests.
    let mut hdr = [0u8; VNET_HDR as usize];
    if rng.one_in(3) {
        let (flags, gso) = (rng.u8(), rng.u8());
        hdr[0] = rng.pick(&[1, 2, 3, 0x80, flags]);
        hdr[1] = rng.pick(&[1, 3, 4, 5, 0x81, gso]);
        for b in &mut hdr[2..10] {
            *b = rng.u8() & if rng.one_in(2) { 0x3f } else { 0xff };
        }
    }
    write(at, &hdr);
    let total = VNET_HDR + len;
    let n = 1 + rng.below(4) as usize;
    let mut done = 0;
    for (i, seg) in segs.iter_mut().take(n).enumerate() {
        let piece = match i + 1 == n {
            true => total - done,
            false => rng.below(u64::from(total - done) + 1) as u32,
        };
        *seg = Seg {
            addr: at + u64::from(done),
            len: piece,
            write: false,
        };
        done += piece;
    }
    n.min(MAX_SEGS)
}
