//! `N:bench:MODE:BYTES:COUNT:QD` (docs/test-guest.md): `COUNT` requests of `BYTES` each with up
//! to `QD` outstanding, timed with the TSC (calibrated once against the PIT).
//!
//! Each of the `QD` slots has its own 3-entry indirect table, header, status byte and 4 KiB-aligned
//! data buffer; slot *i* is always ring descriptor *i* (one `INDIRECT` descriptor), so 32
//! outstanding requests fit the driver's 64-entry queue. The data is neither filled nor checked.
//!
//! The request loop runs in ring 3 (user.rs) and polls the used ring with the device's interrupts
//! suppressed: on PVM hosts ring-0 code is emulated (about 1-2 M instructions per second) and
//! would dominate the time per request, whereas ring 3 runs natively, so the figures are the
//! VMM's. Set-up, calibration and reports stay in ring 0.

use core::sync::atomic::{AtomicBool, Ordering};

use super::{Blk, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, Queue, SECTOR, T_IN, T_OUT, get, put};
use crate::bootinfo::BootInfo;
use crate::cmdline::BenchMode;
use crate::serial::{Dec, Put};
use crate::virtio::{F_INDIRECT_DESC, IRQS};
use crate::{clock, cpu, report, user};

/// The slots' tables, headers and status bytes: slot *i* at `META + i * SLOT_META`.
const META: u64 = 0x0100_0000;
const SLOT_META: u64 = 128;
// Offsets in a slot's metadata (the indirect table is at +0, 3 * 16 bytes).
const HEADER: u64 = 48;
const STATUS: u64 = 64;
/// The data buffers: slot *i*'s at `BUFS + i * BYTES`.
const BUFS: u64 = 0x0110_0000;
const TABLE_LEN: u32 = 3 * 16;
/// xorshift64 seed of the random modes.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Without any completion for this long, the outstanding requests count as errors (timeouts).
const TIMEOUT_US: u64 = 1_000_000;
/// Iterations of the loop timed in ring 0 and in ring 3 (diagnostic, once per boot).
const SPIN: u64 = 2_000;

/// Whether the spin-loop diagnostic has been reported.
static SPIN_REPORTED: AtomicBool = AtomicBool::new(false);

/// The TSC's rate (from kvm-clock); the first call also reports the spin-loop diagnostic.
fn tsc_hz() -> u64 {
    if !SPIN_REPORTED.swap(true, Ordering::Relaxed) {
        let (ring0, ring3) = user::spin_ticks(SPIN);
        report!(
            "guest: spin loop=",
            Dec(SPIN),
            " ring0_ticks=",
            Dec(ring0),
            " ring3_ticks=",
            Dec(ring3)
        );
    }
    clock::tsc_hz()
}

/// `MODE:BYTES:COUNT:QD:` of a report line.
struct Args(BenchMode, u64, u64, u64);

impl Put for Args {
    fn put(&self) {
        self.0.name().put();
        for v in [self.1, self.2, self.3] {
            ":".put();
            Dec(v).put();
        }
        ":".put();
    }
}

/// The start sectors of successive requests.
struct Sectors {
    random: bool,
    /// Sectors per request.
    len: u64,
    capacity: u64,
    /// Sequential: the next start. Random: the xorshift64 state.
    state: u64,
    /// Random: how many 4 KiB-aligned starts fit in `[0, capacity - len]`.
    starts: u64,
}

impl Sectors {
    fn next(&mut self) -> u64 {
        if self.random {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            x % self.starts * 8
        } else {
            if self.state + self.len > self.capacity {
                self.state = 0;
            }
            let sector = self.state;
            self.state += self.len;
            sector
        }
    }
}

/// Fills in slot `slot`'s header for `sector`, resets its status byte and stages its descriptor.
fn issue(queue: &mut Queue, slot: u32, sector: u64) {
    let meta = META + slot as u64 * SLOT_META;
    // SAFETY: the slot's metadata is RAM (checked by `bench`) that only the benchmark uses, and
    // the device is done with the slot (never staged or its completion reaped).
    unsafe {
        put(meta + HEADER + 8, sector);
        put(meta + STATUS, 0xffu8);
    }
    queue.stage(slot as u16);
}

impl Blk {
    /// Runs `N:bench:...` and reports `blkN.bench=MODE:BYTES:COUNT:QD:<elapsed_us>:<errors>`.
    pub(super) fn bench(
        &mut self,
        boot: &BootInfo,
        mode: BenchMode,
        bytes: u64,
        qd: u64,
        count: u64,
    ) {
        let n = Dec(self.n as u64);
        let args = Args(mode, bytes, count, qd);
        let len = bytes / SECTOR;
        let why = if !boot.is_ram(META, BUFS + qd * bytes) {
            "no-ram"
        } else if self.features & F_INDIRECT_DESC == 0 {
            "no-indirect"
        } else if (self.queue.size() as u64) < qd {
            "small-queue"
        } else if self.capacity < len {
            "small-disk"
        } else {
            ""
        };
        if !why.is_empty() {
            report!("blk", n, ".bench=", args, "error=", why);
            return;
        }
        let hz = tsc_hz();
        let (kind, data_flags) = match mode.is_write() {
            true => (T_OUT, 0),
            false => (T_IN, DESC_WRITE),
        };
        let ring = self.queue.table();
        for slot in 0..qd {
            let meta = META + slot * SLOT_META;
            // SAFETY: slot metadata and buffers are RAM the benchmark owns (checked above);
            // descriptors 0..qd are in the queue's table (qd <= its size, checked above), and no
            // request of the synchronous ops is outstanding.
            unsafe {
                Queue::set_desc(meta, 0, meta + HEADER, 16, DESC_NEXT, 1);
                Queue::set_desc(
                    meta,
                    1,
                    BUFS + slot * bytes,
                    bytes as u32,
                    data_flags | DESC_NEXT,
                    2,
                );
                Queue::set_desc(meta, 2, meta + STATUS, 1, DESC_WRITE, 0);
                put(meta + HEADER, kind);
                put(meta + HEADER + 4, 0u32);
                Queue::set_desc(ring, slot as u16, meta, TABLE_LEN, DESC_INDIRECT, 0);
            }
        }
        let mut run = Run {
            queue: &mut self.queue,
            sectors: Sectors {
                random: mode.is_random(),
                len,
                capacity: self.capacity,
                state: if mode.is_random() { SEED } else { 0 },
                starts: (self.capacity - len) / 8 + 1,
            },
            count,
            qd,
            timeout: TIMEOUT_US * (hz / 1_000_000).max(1),
            start: 0,
            end: 0,
            errors: 0,
            timed_out: false,
        };
        let irqs = IRQS.load(Ordering::Relaxed);
        cpu::disable_interrupts();
        run.queue.quiet();
        user::run(requests, &raw mut run as u64);
        run.queue.arm(); // the synchronous ops want their interrupts again
        if run.timed_out {
            report!("guest: blk", n, " bench timed out");
        }
        let ticks = run.end - run.start;
        let us = ticks / hz * 1_000_000 + ticks % hz * 1_000_000 / hz;
        let irqs = IRQS.load(Ordering::Relaxed) - irqs;
        report!(
            "guest: blk",
            n,
            " bench irqs=",
            Dec(irqs.into()),
            " tsc_hz=",
            Dec(hz)
        );
        report!("blk", n, ".bench=", args, Dec(us), ":", Dec(run.errors));
    }
}

/// The request loop's state, shared between `bench` (ring 0) and `requests` (ring 3).
struct Run<'a> {
    queue: &'a mut Queue,
    sectors: Sectors,
    count: u64,
    qd: u64,
    /// TSC ticks without a completion after which the outstanding requests count as errors.
    timeout: u64,
    // Results.
    start: u64,
    end: u64,
    errors: u64,
    timed_out: bool,
}

/// The request loop, in ring 3 (user.rs), where PVM hosts run it natively: submits `QD`
/// requests, then polls the used ring, reaping every completion and submitting as many new
/// requests, until `count` are done or none completes within the timeout. No `hlt`, no
/// interrupts, no port I/O (`bench` reports).
extern "C" fn requests(run: u64) -> u64 {
    // SAFETY: `bench` passes its `Run`, which it leaves alone until `user::run` returns.
    let run = unsafe { &mut *(run as *mut Run) };
    let start = cpu::rdtsc();
    let (mut issued, mut done) = (0, 0);
    let mut outstanding = 0u32; // bit i: slot i is with the device
    for slot in 0..run.qd.min(run.count) as u32 {
        issue(run.queue, slot, run.sectors.next());
        outstanding |= 1 << slot;
        issued += 1;
    }
    run.queue.publish();
    let (mut last, mut end) = (start, start);
    while done < run.count {
        let (pending, mut reaped, mut staged) = (run.queue.pending(), false, false);
        for k in 0..pending {
            let (id, _) = run.queue.used_elem(k);
            if id >= 32 || outstanding & 1 << id == 0 {
                continue; // a late completion of an earlier, timed-out request
            }
            reaped = true;
            done += 1;
            // SAFETY: the slot's status byte (RAM the benchmark owns).
            if unsafe { get::<u8>(META + id as u64 * SLOT_META + STATUS) } != 0 {
                run.errors += 1;
            }
            if issued < run.count {
                issue(run.queue, id, run.sectors.next());
                issued += 1;
                staged = true;
            } else {
                outstanding &= !(1 << id);
            }
        }
        if pending > 0 {
            run.queue.take(pending); // without re-arming the interrupt
            run.queue.quiet(); // keeps `used_event` half the index space ahead
        }
        if staged {
            run.queue.publish();
        }
        let now = cpu::rdtsc();
        if reaped {
            (last, end) = (now, now);
        } else if now - last > run.timeout {
            run.timed_out = true;
            run.errors += outstanding.count_ones() as u64;
            break;
        } else {
            core::hint::spin_loop();
        }
    }
    (run.start, run.end) = (start, end);
    0
}
