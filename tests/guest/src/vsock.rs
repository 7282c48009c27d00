//! The virtio-vsock driver (docs/test-guest.md, section "virtio-vsock"): finds the first vsock
//! device (`DeviceID` 19) among the `virtio_mmio.device=` entries, sets up its receive, transmit
//! and event queues, runs the `guest.vsock` client operations, and for `guest.action=vsock`
//! serves the listeners (echo, sink) until the VM ends.
//!
//! Module map: `hdr` (the packet header), `layout` (memory), `engine` (the protocol: one polling
//! step, run in ring 3). Reports and halting stay in ring 0.

use crate::bootinfo::BootInfo;
use crate::cmdline::{self, key_value, number, words};
use crate::serial::{Dec, Hex, Hex16};
use crate::virtio::{F_EVENT_IDX, Mmio, Queue};
use crate::{apic, clock, cpu, idt, report, user};

mod engine;
mod hdr;
mod layout;

use engine::{End, Engine, MAX_LISTENERS, Mode, Stats};

const DEVICE_ID_VSOCK: u32 = 19;
/// A client connection with no progress for this long ends as `timeout`.
const CLIENT_TIMEOUT_US: u64 = 10_000_000;
/// The serving loop's ring-3 slice: at most this long, and by default it ends after this much
/// idleness (`guest.vsock.idle=US`).
const SLICE_US: u64 = 500_000;
const IDLE_US: u64 = 50_000;
/// How long the idle server halts before it polls again (an interrupt wakes it sooner).
const HALT_US: u64 = 100_000;

/// One `guest.vsock` item.
#[derive(Clone, Copy)]
enum Item {
    Connect { port: u32, bytes: u64 },
    Listen { port: u32, mode: Mode },
}

fn parse(item: &[u8]) -> Option<Item> {
    let mut fields = item.split(|&b| b == b':');
    let kind = fields.next()?;
    let port = u32::try_from(number(fields.next()?)?).ok()?;
    let item = match kind {
        b"connect" => Item::Connect {
            port,
            bytes: number(fields.next()?)?,
        },
        b"echo" => Item::Listen {
            port,
            mode: Mode::Echo,
        },
        b"sink" => Item::Listen {
            port,
            mode: Mode::Sink,
        },
        b"drain" => Item::Listen {
            port,
            mode: Mode::Drain,
        },
        b"discard" => Item::Listen {
            port,
            mode: Mode::Discard,
        },
        _ => return None,
    };
    fields.next().is_none().then_some(item)
}

/// Calls `f` with every `guest.vsock` item in command-line order (bad items reported).
fn for_each_item(cmdline: &[u8], mut f: impl FnMut(Item)) {
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key != b"guest.vsock" {
            continue;
        }
        for item in value.split(|&b| b == b',') {
            match parse(item) {
                Some(it) => f(it),
                None => report!("guest: bad guest.vsock item ", item),
            }
        }
    }
}

/// The set-up device.
pub struct Vsock {
    engine: Engine,
    hz: u64,
    /// Microseconds without traffic after which the server halts.
    idle_us: u64,
}

/// Brings the device up when `guest.vsock` is given or the action is `vsock`, then runs the
/// `connect` items; `dest` is the APIC id that takes the interrupts.
pub fn run(boot: &BootInfo, dest: u8, serving: bool) -> Option<Vsock> {
    let cmdline = boot.cmdline();
    let any = words(cmdline)
        .filter_map(key_value)
        .any(|(key, _)| key == b"guest.vsock");
    if !any && !serving {
        return None;
    }
    let mut mmio = None;
    cmdline::for_each_virtio_mmio(cmdline, |entry| {
        if let Ok((base, irq)) = entry {
            let m = Mmio { base, irq };
            let in_gap = (0xc000_0000..0xfec0_0000).contains(&base);
            if mmio.is_none() && in_gap && m.device_id() == Some(DEVICE_ID_VSOCK) {
                mmio = Some(m);
            }
        }
    });
    let Some(mmio) = mmio else {
        report!("vsock=none");
        return None;
    };
    if !boot.is_ram(layout::BASE, layout::END) {
        report!(
            "vsock=error:no RAM at ",
            Hex(layout::BASE),
            "-",
            Hex(layout::END)
        );
        return None;
    }
    let idle_us = cmdline::value(cmdline, b"guest.vsock.idle")
        .and_then(number)
        .unwrap_or(IDLE_US);
    let mut vsock = match bring_up(mmio, dest, idle_us) {
        Ok(v) => v,
        Err(why) => {
            report!("vsock=error:", why);
            return None;
        }
    };
    for_each_item(cmdline, |item| match item {
        Item::Listen { port, mode } => {
            let e = &mut vsock.engine;
            if e.n_listeners < MAX_LISTENERS {
                e.listeners[e.n_listeners] = (port, mode);
                e.n_listeners += 1;
            } else {
                report!(
                    "guest: more than 8 vsock listeners, port ",
                    Dec(port.into()),
                    " left out"
                );
            }
        }
        Item::Connect { .. } => {}
    });
    for_each_item(cmdline, |item| {
        if let Item::Connect { port, bytes } = item {
            vsock.connect(port, bytes);
        }
    });
    Some(vsock)
}

fn bring_up(mmio: Mmio, dest: u8, idle_us: u64) -> Result<Vsock, &'static str> {
    let features = mmio.negotiate(F_EVENT_IDX)?;
    // SAFETY: the queue areas are RAM of the layout (checked by `run`), 8 KiB each, more than
    // `Queue::area_len(QUEUE)`.
    let (rx, tx, ev) = unsafe {
        (
            Queue::setup(mmio, 0, features, layout::RXQ, layout::QUEUE)?,
            Queue::setup(mmio, 1, features, layout::TXQ, layout::QUEUE)?,
            Queue::setup(mmio, 2, features, layout::EVQ, 4)?,
        )
    };
    if (rx.size() as usize) < layout::RX_BUFS || (tx.size() as usize) < layout::TX_SLOTS {
        return Err("queues smaller than 64");
    }
    mmio.driver_ok(dest)?;
    let cid = mmio.config64(0);
    report!("vsock.cid=", Dec(cid));
    report!("vsock.features=", Hex(features));
    let hz = clock::tsc_hz();
    cpu::disable_interrupts();
    // SAFETY: the layout is RAM (checked by `run`) that only this driver uses.
    let engine = unsafe { Engine::new(cid, rx, tx, ev) };
    Ok(Vsock {
        engine,
        hz,
        idle_us,
    })
}

/// A ring-3 loop's state (shared with ring 0 through a pointer).
struct Loop<'a> {
    engine: &'a mut Engine,
    hz: u64,
    /// Client: the connection watched; serving: `usize::MAX`.
    conn: usize,
    start: u64,
    end: u64,
    idle: bool,
    idle_us: u64,
}

impl Loop<'_> {
    fn ticks(&self, us: u64) -> u64 {
        (us as u128 * self.hz as u128 / 1_000_000) as u64
    }
}

/// Polls until the client connection ends or makes no progress for [`CLIENT_TIMEOUT_US`].
extern "C" fn client_loop(arg: u64) -> u64 {
    // SAFETY: `connect` passes its `Loop`, untouched until `user::run` returns.
    let l = unsafe { &mut *(arg as *mut Loop) };
    let timeout = l.ticks(CLIENT_TIMEOUT_US);
    l.start = cpu::rdtsc();
    let mut last = l.start;
    loop {
        let moved = l.engine.poll();
        let now = cpu::rdtsc();
        if l.engine.conn(l.conn).end != End::Running as u8 {
            l.end = now;
            return 0;
        }
        if moved {
            last = now;
        } else if now - last > timeout {
            l.end = now;
            l.idle = true;
            return 0;
        }
    }
}

/// Serves for up to [`SLICE_US`], less when nothing moved for [`IDLE_US`] (then `idle`).
extern "C" fn serve_slice(arg: u64) -> u64 {
    // SAFETY: `serve` passes its `Loop`, untouched until `user::run` returns.
    let l = unsafe { &mut *(arg as *mut Loop) };
    let (slice, idle) = (l.ticks(SLICE_US), l.ticks(l.idle_us));
    let start = cpu::rdtsc();
    let mut last = start;
    l.idle = false;
    loop {
        let now = cpu::rdtsc();
        if l.engine.poll() {
            last = now;
        } else if now - last > idle {
            l.idle = true;
            return 0;
        }
        if now - start > slice {
            return 0;
        }
    }
}

impl Vsock {
    /// Runs one `connect:PORT:BYTES` item and reports it.
    fn connect(&mut self, port: u32, bytes: u64) {
        let p = Dec(port.into());
        let Some(i) = self.engine.connect(port, bytes) else {
            report!("vsock.connect=", p, ":error:no free connection");
            return;
        };
        let mut l = Loop {
            engine: &mut self.engine,
            hz: self.hz,
            conn: i,
            start: 0,
            end: 0,
            idle: false,
            idle_us: 0,
        };
        user::run(client_loop, &raw mut l as u64);
        let (ticks, timed_out) = (l.end - l.start, l.idle);
        let us = (ticks as u128 * 1_000_000 / self.hz.max(1) as u128) as u64;
        let c = *self.engine.conn(i);
        let end = match c.end {
            e if timed_out && e == End::Running as u8 => "timeout",
            e if e == End::Done as u8 => End::Done.name(),
            e if e == End::Closed as u8 => End::Closed.name(),
            e if e == End::Refused as u8 => End::Refused.name(),
            e if e == End::Reset as u8 => End::Reset.name(),
            _ => End::Running.name(),
        };
        self.engine.release(i);
        report!(
            "vsock.connect=",
            p,
            ":",
            Dec(c.sent),
            ":",
            Dec(c.received),
            ":",
            Hex16(c.hash),
            ":",
            Dec(us),
            ":",
            end
        );
    }
}

fn report_stats(s: &Stats, open: usize) {
    report!(
        "vsock.stats=accepted=",
        Dec(s.accepted),
        ",open=",
        Dec(open as u64),
        ",refused=",
        Dec(s.refused),
        ",rx=",
        Dec(s.rx_bytes),
        ",tx=",
        Dec(s.tx_bytes),
        ",held=",
        Dec(s.max_held),
        ",overruns=",
        Dec(s.overruns),
        ",bad=",
        Dec(s.bad),
        ",resets=",
        Dec(s.transport_resets)
    );
}

/// `guest.action=vsock`: serves the listeners forever, in ring-3 slices, reporting
/// `vsock.stats=` after a slice that changed them and halting while idle.
pub fn serve(vsock: Option<Vsock>) -> ! {
    let Some(mut v) = vsock else {
        cpu::halt_forever()
    };
    for &(port, mode) in &v.engine.listeners[..v.engine.n_listeners] {
        let name = match mode {
            Mode::Echo => "echo",
            Mode::Sink => "sink",
            Mode::Discard => "discard",
            _ => "drain",
        };
        report!("vsock.listen=", Dec(port.into()), ":", name);
    }
    report!("vsock=ready");
    let mut shown = (Stats::default(), 0);
    let mut drained = 0;
    loop {
        let mut l = Loop {
            engine: &mut v.engine,
            hz: v.hz,
            conn: usize::MAX,
            start: 0,
            end: 0,
            idle: false,
            idle_us: v.idle_us,
        };
        user::run(serve_slice, &raw mut l as u64);
        let idle = l.idle;
        while drained < v.engine.drained_count() {
            if let Some(d) = v.engine.drained(drained) {
                report!(
                    "vsock.drain=",
                    Dec(d.port.into()),
                    ":",
                    Dec(d.bytes),
                    ":",
                    Hex16(d.hash),
                    ":",
                    d.end.name()
                );
            }
            drained += 1;
        }
        let now = (v.engine.stats, v.engine.open());
        if now != shown {
            report_stats(&now.0, now.1);
            shown = now;
        }
        if idle && v.engine.rx.arm() {
            apic::start_tick(idt::TICK_VECTOR);
            let rx = &v.engine.rx;
            clock::wait_halting(HALT_US, || rx.pending() > 0);
            apic::stop_tick();
        }
        v.engine.rx.quiet();
    }
}
