//! After the attack (ring 3): every device must still serve a driver that behaves. A fresh
//! handshake on each (no optional features), then, polling (the task priority still holds every
//! interrupt off): a disk writes one sector of the seed's pattern at [`SECTOR`], flushes, reads
//! it back and compares; a network interface sends an ARP request for the host side's address
//! and waits for the answer. The results are reported by ring 0 (`hostile.blkN=`,
//! `hostile.netN=`, see docs/test-guest.md).

use core::sync::atomic::{Ordering, fence};

use super::arena::Arena;
use super::device::{Dev, ID_BLK, ID_NET, Vq};
use crate::net::clock;
use crate::virtio::{DESC_NEXT, DESC_WRITE, get, put};

/// The sector the disk check writes.
pub const SECTOR: u64 = 8;
const SECTOR_BYTES: u64 = 512;
/// How long the device has for each step.
const TIMEOUT_US: u64 = 3_000_000;
const RESEND_US: u64 = 300_000;
// Offsets in the scratch region.
const HEADER: u64 = 0;
const STATUS: u64 = 0x10;
const OUT: u64 = 0x1000;
const IN: u64 = 0x2000;
const TX: u64 = 0x3000;
const RX: u64 = 0x4000;
const RX_BUFS: u16 = 8;
const RX_LEN: u32 = 2048;
const NET_HDR: u64 = 12;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];

/// Byte `i` of the sector the disk check writes.
pub fn pattern(seed: u64, i: u64) -> u8 {
    seed.wrapping_mul(31).wrapping_add(i * 7) as u8
}

/// Checks `dev`; returns `ok` or what failed.
pub fn check(dev: &mut Dev, arena: &Arena, seed: u64) -> &'static str {
    if !dev.setup(arena, 0) {
        return "handshake refused";
    }
    match dev.id {
        ID_BLK => blk(dev, arena, seed),
        ID_NET => net(dev, arena),
        _ => "not checked",
    }
}

/// Writes `descs` (address, length, flags) as one chain from descriptor `head` of queue `q`
/// and makes it available (without a notification).
fn offer(vq: &mut Vq, head: u16, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let at = head + i as u16;
        let next = if i + 1 < descs.len() { DESC_NEXT } else { 0 };
        let d = vq.desc + 16 * u64::from(at);
        // SAFETY: the queue's table in the attack area (set up with `size` entries; the
        // callers stay below it).
        unsafe {
            put(d, addr);
            put(d + 8, len);
            put(d + 12, flags | next);
            put(d + 14, at + 1);
        }
    }
    let slot = vq.idx % vq.size;
    // SAFETY: the queue's avail ring in the attack area.
    unsafe { put(vq.avail + 4 + 2 * u64::from(slot), head) };
    vq.idx = vq.idx.wrapping_add(1);
    fence(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { put(vq.avail + 2, vq.idx) };
}

fn used_idx(vq: &Vq) -> u16 {
    // SAFETY: the queue's used ring in the attack area (the device writes it).
    unsafe { get::<u16>(vq.used + 2) }
}

/// The used element at position `pos`: (id, length).
fn used_elem(vq: &Vq, pos: u16) -> (u32, u32) {
    let e = vq.used + 4 + 8 * u64::from(pos % vq.size);
    // SAFETY: as in `used_idx`.
    unsafe { (get::<u32>(e), get::<u32>(e + 4)) }
}

fn deadline() -> u64 {
    clock::now() + clock::ticks(TIMEOUT_US)
}

/// One request on the disk's queue, waited for; the status byte, or `None` on a timeout.
fn request(dev: &mut Dev, arena: &Arena, kind: u32, buf: Option<(u64, u16)>) -> Option<u8> {
    let s = arena.scratch();
    // SAFETY: the scratch region of the area.
    unsafe {
        put(s + HEADER, kind);
        put(s + HEADER + 4, 0u32);
        put(s + HEADER + 8, SECTOR);
        put(s + STATUS, 0xffu8);
    }
    let header = (s + HEADER, 16, 0);
    let status = (s + STATUS, 1, DESC_WRITE);
    let vq = &mut dev.queues[0];
    match buf {
        Some((addr, flags)) => offer(vq, 0, &[header, (addr, SECTOR_BYTES as u32, flags), status]),
        None => offer(vq, 0, &[header, status]),
    }
    let vq = *vq;
    dev.notify(arena, 0);
    let until = deadline();
    while used_idx(&vq) != vq.idx {
        if clock::now() > until {
            return None;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the scratch region.
    Some(unsafe { get::<u8>(s + STATUS) })
}

fn blk(dev: &mut Dev, arena: &Arena, seed: u64) -> &'static str {
    let s = arena.scratch();
    for i in 0..SECTOR_BYTES {
        // SAFETY: the scratch region.
        unsafe {
            put(s + OUT + i, pattern(seed, i));
            put(s + IN + i, 0u8);
        }
    }
    match request(dev, arena, T_OUT, Some((s + OUT, 0))) {
        Some(0) => {}
        Some(_) => return "write refused",
        None => return "write timed out",
    }
    match request(dev, arena, T_FLUSH, None) {
        Some(0) => {}
        Some(_) => return "flush refused",
        None => return "flush timed out",
    }
    match request(dev, arena, T_IN, Some((s + IN, DESC_WRITE))) {
        Some(0) => {}
        Some(_) => return "read refused",
        None => return "read timed out",
    }
    // SAFETY: the scratch region.
    let same = (0..SECTOR_BYTES).all(|i| unsafe { get::<u8>(s + IN + i) } == pattern(seed, i));
    if same { "ok" } else { "read back other bytes" }
}

/// Writes the ARP request (after a zero virtio-net header) at `at`; returns its length.
fn arp_request(dev: &Dev, at: u64) -> u32 {
    let mut frame = [0u8; NET_HDR as usize + 60];
    let arp = &mut frame[NET_HDR as usize..];
    arp[..6].fill(0xff);
    arp[6..12].copy_from_slice(&dev.mac);
    arp[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&dev.mac);
    arp[28..32].copy_from_slice(&GUEST_IP);
    arp[38..42].copy_from_slice(&HOST_IP);
    for (i, &b) in frame.iter().enumerate() {
        // SAFETY: the scratch region.
        unsafe { put(at + i as u64, b) };
    }
    frame.len() as u32
}

/// Whether the `len` bytes received at `buf` are the host's ARP reply.
fn is_arp_reply(buf: u64, len: u32) -> bool {
    let frame = buf + NET_HDR;
    // SAFETY: a receive buffer of the scratch region (RX_LEN bytes, more than read here).
    let byte = |i: u64| unsafe { get::<u8>(frame + i) };
    u64::from(len) >= NET_HDR + 42
        && (byte(12), byte(13), byte(20), byte(21)) == (0x08, 0x06, 0, 2)
        && (28..32).all(|i| byte(i) == HOST_IP[(i - 28) as usize])
}

fn net(dev: &mut Dev, arena: &Arena) -> &'static str {
    let s = arena.scratch();
    let buf = |id: u16| s + RX + u64::from(id % RX_BUFS) * u64::from(RX_LEN);
    for id in 0..RX_BUFS {
        offer(&mut dev.queues[0], id, &[(buf(id), RX_LEN, DESC_WRITE)]);
    }
    dev.notify(arena, 0);
    let len = arp_request(dev, s + TX);
    let until = deadline();
    let (mut seen, mut sent, mut resend) = (0u16, 0u16, 0);
    loop {
        let now = clock::now();
        if now > until {
            return "no ARP reply";
        }
        if now >= resend && sent < dev.queues[1].size {
            offer(&mut dev.queues[1], sent, &[(s + TX, len, 0)]);
            dev.notify(arena, 1);
            sent += 1;
            resend = now + clock::ticks(RESEND_US);
        }
        let rx = dev.queues[0];
        while seen != used_idx(&rx) {
            let (id, used) = used_elem(&rx, seen);
            seen = seen.wrapping_add(1);
            let id = (id % u32::from(RX_BUFS)) as u16;
            if is_arp_reply(buf(id), used) {
                return "ok";
            }
            offer(&mut dev.queues[0], id, &[(buf(id), RX_LEN, DESC_WRITE)]);
            dev.notify(arena, 0);
        }
        core::hint::spin_loop();
    }
}
