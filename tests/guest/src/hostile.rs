//! `guest.action=hostile` (docs/test-guest.md, "Hostile mode"): for `SECONDS`, attack every
//! surface ember exposes, drawn from xorshift seeded with `SEED` (`guest.hostile=SEED:SECONDS`),
//! then report and let the action reset the VM through the i8042, which shows ember still
//! serves the guest.
//!
//! The hot loop runs in ring 3 (user.rs), natively on PVM hosts: MMIO register attacks on the
//! virtio windows, the boot timer and the MMIO gap (`regs.rs`), handshakes proper and broken
//! (`device.rs`), adversarial virtqueues (`chains.rs`, `payload.rs`), all in a dedicated attack
//! area (`arena.rs`). Between bursts of about 200 ms, ring 0 performs the port I/O the burst
//! drew (`ports.rs`: ring 3 cannot do port I/O on PVM) and the round of I/O APIC accesses it
//! drew (`ioapic.rs`: with interrupts off, every pin masked again at the end), and prints the
//! progress lines.
//!
//! Interrupts: the local APIC's task priority stays at 0xf0 for the whole run, so whatever a
//! device raises through a pin the I/O APIC attacks unmasked (any vector, most of which have no
//! gate) stays pending and is never delivered, in ring 0 or ring 3.
//!
//! After the attack, `check` drives every device properly once more (in ring 3, polling) and
//! ring 0 reports what it found.
//!
//! Module map: `rng` (xorshift64), `arena`, `regs`, `ports`, `ioapic`, `device`, `chains`,
//! `payload`, `heavy` (the heaviest block requests), `check`.

mod arena;
mod chains;
mod check;
mod device;
mod heavy;
mod ioapic;
mod payload;
mod ports;
mod regs;
mod rng;

use arena::{Arena, GAP, GAP_END};
use device::{Dev, ID_BLK, ID_NET, MAX_DEVS};
use ports::Plan;
use rng::Rng;

use crate::bootinfo::BootInfo;
use crate::cmdline::{self, key_value, number, words};
use crate::net::clock;
use crate::serial::{Dec, Hex};
use crate::{apic, cpu, report, user};

/// `guest.hostile=SEED:SECONDS` when absent.
const DEFAULT_SEED: u64 = 1;
const DEFAULT_SECONDS: u64 = 30;
/// Ring-3 time between two rounds of port I/O in ring 0.
const ROUND_US: u64 = 200_000;

/// Everything the ring-3 burst works on (it lives on the kernel stack, which ring 3 may touch).
struct Hostile {
    rng: Rng,
    arena: Arena,
    devs: [Option<Dev>; MAX_DEVS],
    ndevs: usize,
    plan: Plan,
    ioapic: ioapic::Plan,
    ops: u64,
    /// TSC value at which the current burst ends.
    deadline: u64,
    /// Whether this burst may still hoard (once per burst: it costs the VMM memory), and how
    /// many chains the last hoard gave.
    hoard: bool,
    hoards: u16,
    /// `guest.hostile=SEED:SECONDS:heavy`: nothing but heavy requests (`heavy.rs`).
    heavy_only: bool,
    seed: u64,
    /// What the check after the attack found, per device.
    checks: [&'static str; MAX_DEVS],
}

/// Runs the hostile mode for the configured time; returns after `hostile=done:<ops>`.
pub fn run(boot: &BootInfo) {
    let cmdline = boot.cmdline();
    let (seed, seconds, heavy_only) = parse(cmdline);
    clock::calibrate();
    let Some(arena) = Arena::find(boot).filter(Arena::ram_below_4g) else {
        report!("guest: hostile needs 16 MiB of RAM above 0x5000000, and none above 4 GiB");
        report!("hostile=done:0");
        return;
    };
    let mut h = Hostile {
        rng: Rng::new(seed),
        arena,
        devs: [None; MAX_DEVS],
        ndevs: 0,
        plan: Plan::new(),
        ioapic: ioapic::Plan::new(),
        ops: 0,
        deadline: 0,
        hoard: false,
        hoards: 0,
        heavy_only,
        seed,
        checks: [""; MAX_DEVS],
    };
    cmdline::for_each_virtio_mmio(cmdline, |entry| {
        // Only windows inside the MMIO gap: attacking anything else would hit the guest's RAM.
        if let Ok((base, _)) = entry {
            let inside = base >= GAP && base % regs::WINDOW == 0 && base + regs::WINDOW <= GAP_END;
            if inside && h.ndevs < MAX_DEVS && regs::read32(base, 0) == 0x7472_6976 {
                h.devs[h.ndevs] = Some(Dev::new(h.ndevs, base));
                h.ndevs += 1;
            }
        }
    });
    let count = |id| h.devs.iter().flatten().filter(|d| d.id == id).count() as u64;
    report!(
        "guest: hostile seed=",
        Dec(seed),
        " seconds=",
        Dec(seconds),
        if heavy_only { " heavy" } else { "" },
        " devices=",
        Dec(h.ndevs as u64),
        " blk=",
        Dec(count(ID_BLK)),
        " net=",
        Dec(count(ID_NET)),
        " area=",
        Hex(h.arena.base)
    );
    // Before any pin is unmasked: nothing is delivered from now on (see the module comment).
    apic::set_task_priority(0xf0);
    h.ops += ioapic::mask_all(0);
    let ctx = &raw mut h as u64;
    user::run(start, ctx);
    let (t0, hz) = (clock::now(), clock::hz());
    let end = t0 + seconds * hz;
    let mut reported = 0;
    loop {
        let now = clock::now();
        if now >= end {
            break;
        }
        h.deadline = end.min(now + clock::ticks(ROUND_US));
        h.hoard = true;
        user::run(burst, ctx);
        h.ops += h.plan.run();
        h.ops += h.ioapic.run();
        let secs = (clock::now() - t0) / hz;
        if secs > reported && secs < seconds {
            reported = secs;
            report!("hostile=", Dec(secs), ":", Dec(h.ops));
        }
    }
    report!("hostile=done:", Dec(h.ops));
    user::run(after, ctx);
    let (mut blks, mut nets) = (0, 0);
    for (dev, result) in h.devs.iter().flatten().zip(h.checks) {
        let (kind, n) = match dev.id {
            ID_BLK => ("blk", &mut blks),
            ID_NET => ("net", &mut nets),
            _ => continue,
        };
        report!("hostile.", kind, Dec(*n), "=", result);
        *n += 1;
    }
}

/// Ring 3, after the attack: checks that every device still serves a proper driver.
extern "C" fn after(ctx: u64) -> u64 {
    // SAFETY: as in `start`.
    let h = unsafe { &mut *(ctx as *mut Hostile) };
    for (i, dev) in h.devs.iter_mut().enumerate() {
        if let Some(dev) = dev {
            h.checks[i] = check::check(dev, &h.arena, h.seed);
        }
    }
    0
}

/// `guest.hostile=SEED:SECONDS[:heavy]` (decimal; the last one counts).
fn parse(cmdline: &[u8]) -> (u64, u64, bool) {
    let mut got = (DEFAULT_SEED, DEFAULT_SECONDS, false);
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key != b"guest.hostile" {
            continue;
        }
        let mut fields = value.split(|&b| b == b':');
        match (
            fields.next().and_then(number),
            fields.next().and_then(number),
            fields.next(),
        ) {
            (Some(seed), Some(secs), mode @ (None | Some(b"heavy"))) if fields.next().is_none() => {
                got = (seed, secs, mode.is_some())
            }
            _ => report!("guest: bad guest.hostile ", value),
        }
    }
    got
}

/// Ring 3: touches the whole attack area (so the guest's memory does not grow later) and sets
/// every device up properly.
extern "C" fn start(ctx: u64) -> u64 {
    // SAFETY: `run` passes its `Hostile` and leaves it alone until `user::run` returns.
    let h = unsafe { &mut *(ctx as *mut Hostile) };
    h.arena.zero(h.arena.base, arena::LEN);
    for dev in h.devs.iter_mut().flatten() {
        h.ops += dev.handshake(&mut h.rng, &h.arena);
    }
    0
}

/// Ring 3: attack steps until the deadline, then draw the next port and I/O APIC plans.
extern "C" fn burst(ctx: u64) -> u64 {
    // SAFETY: as in `start`.
    let h = unsafe { &mut *(ctx as *mut Hostile) };
    while cpu::rdtsc() < h.deadline {
        h.ops += step(h);
    }
    h.plan.fill(&mut h.rng);
    h.ioapic.fill(&mut h.rng);
    0
}

/// One attack on a random device (or, without devices, on the MMIO gap); returns its operations.
fn step(h: &mut Hostile) -> u64 {
    let Hostile {
        rng, arena, devs, ..
    } = h;
    let pick = rng.below(h.ndevs as u64) as usize;
    let Some(dev) = devs.get_mut(pick).and_then(Option::as_mut) else {
        regs::gap(rng, arena);
        return 1;
    };
    if h.heavy_only {
        return heavy_step(rng, arena, dev);
    }
    let q = rng.below(dev.nqueues() as u64) as usize;
    let times = |rng: &mut Rng, n: u64, f: &mut dyn FnMut(&mut Rng)| {
        let n = 1 + rng.below(n);
        (0..n).for_each(|_| f(rng));
        n
    };
    match rng.below(100) {
        0..45 => chains::publish(rng, arena, dev, q),
        45..57 => times(rng, 16, &mut |rng| regs::window(rng, arena, dev.base)),
        57..60 => times(rng, 4, &mut |rng| regs::boot_timer(rng, arena)),
        60..65 => times(rng, 8, &mut |rng| regs::gap(rng, arena)),
        65..73 => dev.handshake(rng, arena),
        73..76 => {
            let steps = 3 + rng.below(20);
            dev.scramble(rng, arena, steps)
        }
        76..80 => {
            // A reset while the device works on fresh chains; half the time set up again.
            let ops = chains::publish(rng, arena, dev, q) + 1;
            dev.reset(arena);
            ops + if rng.one_in(2) {
                dev.handshake(rng, arena)
            } else {
                0
            }
        }
        80..82 => chains::storm(rng, arena, dev, q),
        82..87 => chains::rewrite(rng, arena, dev.queues[q]) + chains::publish(rng, arena, dev, q),
        87..90 => chains::jump(rng, arena, dev, q),
        90..92 => chains::crumbs(rng, arena, dev, h.deadline),
        92..94 => heavy::publish(rng, arena, dev),
        94 if h.hoard && dev.id == ID_NET => {
            // Once a burst, four chains more each time, up to a queue: the VMM's memory would
            // grow through the run (up to 256 MiB, not more) if each costs it a megabyte.
            h.hoard = false;
            h.hoards = h.hoards.saturating_add(4);
            chains::hoard(rng, arena, dev, h.hoards)
        }
        _ => {
            // Acknowledge whatever is pending, as an interrupt handler would.
            let pending = regs::read32(dev.base, 0x060);
            regs::write32(arena, dev.base, 0x064, pending);
            2
        }
    }
}

/// The heavy-only mode's step: a ring of heavy requests when the disk has room, and now and
/// then a QueueNotify value no ioeventfd matches (the vCPU then waits for the device's lock,
/// which the device thread holds while it works).
fn heavy_step(rng: &mut Rng, arena: &Arena, dev: &mut Dev) -> u64 {
    if rng.one_in(64) {
        dev.notify(arena, 0xffff);
        return 1;
    }
    heavy::publish(rng, arena, dev)
}
