//! `N:recv:COUNT`: waits for `COUNT` frames of ethertype 0x88b5 and checks their payloads
//! (u32 big-endian sequence number *s*, then byte *i* after it = `(s + i) & 0xff`) against
//! the test pattern (`repe cmpsq`), and that the *k*-th carries *s* = *k* (each frame once, in
//! order). Other frames are dropped. [`receive`], the loop
//! itself, runs in ring 3 (natively on PVM hosts).

use super::bytes::{self, Bytes, PATTERN};
use super::rx::{ETH_LEN, Rx};
use super::send::ETHERTYPE_TEST;
use super::{Diag, Net, clock, in_ring3};
use crate::serial::{Dec, Put};

/// Without a test frame for this long, `recv` reports what it has.
const IDLE_US: u64 = 10_000_000;

/// What arrived: `<frames>:<bytes>:<elapsed_us>:<bad>:<misordered>` of the report.
#[derive(Default)]
pub struct Received {
    frames: u64,
    bytes: u64,
    first: u64,
    last: u64,
    bad: u64,
    /// Frames whose sequence number was not their place in the arrival order.
    misordered: u64,
}

impl Put for Received {
    fn put(&self) {
        for v in [self.frames, self.bytes, clock::us(self.last - self.first)] {
            Dec(v).put();
            ":".put();
        }
        Dec(self.bad).put();
        ":".put();
        Dec(self.misordered).put();
    }
}

pub fn recv(net: &mut Net, count: u64) -> Received {
    let (rx, diag, scratch) = (&mut net.rx, &mut net.diag, net.scratch);
    let idle = clock::ticks(IDLE_US);
    in_ring3(|| receive(rx, diag, scratch, count, idle))
}

/// Takes frames until `count` test frames came or none did for `idle` TSC ticks; frames
/// spanning several buffers are checked in `scratch`.
pub fn receive(rx: &mut Rx, diag: &mut Diag, scratch: u64, count: u64, idle: u64) -> Received {
    let mut got = Received::default();
    let mut since = clock::now();
    while got.frames < count {
        let Some(frame) = rx.next(diag) else {
            rx.flush();
            if clock::now() - since > idle {
                break;
            }
            continue;
        };
        if frame.ethertype() == ETHERTYPE_TEST {
            since = clock::now();
            if got.frames == 0 {
                got.first = since;
            }
            got.last = since;
            // SAFETY: `scratch` is the device's gather buffer, MAX_FRAME bytes.
            let bytes = unsafe { rx.contiguous(&frame, scratch) };
            if !pattern_ok(bytes) {
                got.bad += 1;
            } else if bytes.be32(ETH_LEN) as u64 != got.frames {
                got.misordered += 1;
            }
            got.frames += 1;
            got.bytes += frame.len as u64;
        }
        rx.done(frame);
    }
    rx.flush();
    got
}

/// Whether the frame's payload is a sequence number and the pattern after it.
fn pattern_ok(frame: Bytes) -> bool {
    if frame.len < ETH_LEN + 4 {
        return false;
    }
    let seq = frame.be32(ETH_LEN);
    let rest = frame.sub(ETH_LEN + 4, frame.len);
    // SAFETY: the pattern area is RAM the net driver owns; a 64 KiB payload from any of the
    // 256 offsets fits it (PATTERN_LEN).
    let expect = unsafe { Bytes::new(PATTERN + (seq & 0xff) as u64, rest.len) };
    bytes::same(rest, expect)
}
