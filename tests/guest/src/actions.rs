//! What the guest does after its reports: the port/MMIO operations of the command line, then the
//! final action (reset, triple fault, halt, the interrupt-driven serial echo, the network
//! responder, the hostile mode followed by a reset, an ACPI power-off, waiting for
//! Ctrl-Alt-Del and then powering off, reporting the VM's identity as it changes, or serving
//! vsock connections).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::bootinfo::BootInfo;
use crate::cmdline::{self, Action, Op};
use crate::net::{self, Nets};
use crate::serial::{self, Hex};
use crate::{apic, cpu, hostile, identity, idt, report, shutdown, vsock};

/// Where `guest.action=count` keeps its counter: a u64 in low RAM the VMM does not use, read by
/// the host through the embedding API.
pub const COUNTER_ADDR: u64 = 0x4000;

/// COM1's line on the I/O APIC.
pub const SERIAL_IOAPIC_PIN: u8 = 4;

/// Performs every `guest.outb`/`inb`/`write32`/`read32` item in command-line order.
pub fn run_ops(cmdline: &[u8]) {
    cmdline::for_each_op(cmdline, |op| match op {
        Ok(Op::Outb(port, val)) => {
            cpu::outb(port, val);
            report!("outb=", Hex(port.into()), ":", Hex(val.into()));
        }
        Ok(Op::Inb(port)) => {
            let val = cpu::inb(port);
            report!("inb=", Hex(port.into()), ":", Hex(val.into()));
        }
        Ok(Op::Write32(addr, val)) => {
            // SAFETY: the test asked for this store; a bad address faults and is reported.
            unsafe { cpu::write32(addr, val) };
            report!("write32=", Hex(addr), ":", Hex(val.into()));
        }
        Ok(Op::Read32(addr)) => {
            // SAFETY: as for write32.
            let val = unsafe { cpu::read32(addr) };
            report!("read32=", Hex(addr), ":", Hex(val.into()));
        }
        Err(bad) => report!("guest: bad ", bad.param, " item ", bad.item),
    });
}

/// Reports `action=` and carries the action out (`nets`: the net devices, for the responder;
/// `boot`: the memory map and command line, for the hostile mode).
pub fn run(
    action: Action,
    bsp_id: u8,
    mut nets: Nets,
    rng: Option<identity::Rng>,
    vsock: Option<vsock::Vsock>,
    boot: &BootInfo,
) -> ! {
    report!("action=", action.name());
    match action {
        Action::Reset => cpu::reset(),
        Action::TripleFault => cpu::triple_fault(),
        Action::Halt => cpu::halt_forever(),
        Action::Echo => echo(bsp_id),
        Action::Net => net::serve(&mut nets),
        Action::Hostile => {
            hostile::run(boot);
            cpu::reset()
        }
        Action::Count => count(),
        Action::Dirty => dirty(boot),
        Action::PowerOff => shutdown::poweroff(),
        Action::CtrlAltDel => shutdown::wait_then_poweroff(),
        Action::Identity => identity::run(boot, bsp_id, rng),
        Action::Vsock => vsock::serve(vsock),
        Action::Timer => timer(),
    }
}

/// Halts between ticks of the LAPIC timer (periodic, every 16 ms or so) and reports each one as
/// `timer=N`: a guest whose only wake-up is its local APIC's timer, as an idle kernel's is.
fn timer() -> ! {
    apic::start_tick(idt::TICK_VECTOR);
    let mut shown = 0;
    loop {
        cpu::disable_interrupts();
        let now = idt::TICKS.load(Ordering::Relaxed);
        if now == shown {
            cpu::wait_for_interrupt();
            continue;
        }
        shown = now;
        report!("timer=", crate::serial::Dec(now));
    }
}

/// Increments the counter at [`COUNTER_ADDR`] forever, in ring 3 (native speed on PVM hosts),
/// with no exit to the VMM.
fn count() -> ! {
    extern "C" fn count_forever(addr: u64) -> u64 {
        let counter = addr as *mut u64;
        let mut n: u64 = 0;
        loop {
            n = n.wrapping_add(1);
            // SAFETY: COUNTER_ADDR is guest RAM no one else uses; volatile so every value lands.
            unsafe { counter.write_volatile(n) };
        }
    }
    report!("count=", Hex(COUNTER_ADDR));
    crate::user::run(count_forever, COUNTER_ADDR);
    cpu::halt_forever()
}

/// Where [`dirty`] starts: above the guest image and the block data buffer.
const DIRTY_BASE: u64 = 32 << 20;

/// Dirties guest RAM: one store in every page of the RAM entry above [`DIRTY_BASE`] (none with
/// `guest.dirty=0`: an idle guest), then
/// `guest.dirty=MIB` MiB per second (default 10), page after page and round again, halting
/// between bursts (the LAPIC tick wakes it each millisecond or so, the TSC sets the pace), so
/// the vCPU leaves the host's CPUs to the VMM as a mostly idle guest would; the counter at
/// [`COUNTER_ADDR`] counts the bursts (it moves once the first pass is done).
fn dirty(boot: &BootInfo) -> ! {
    let rate = cmdline::dirty_rate(boot.cmdline());
    let end = boot
        .e820()
        .iter()
        .find(|r| r.kind == 1 && r.start <= DIRTY_BASE && DIRTY_BASE < r.start + r.size)
        .map(|r| r.start + r.size);
    let Some(end) = end.filter(|&end| end >= DIRTY_BASE + (1 << 20)) else {
        report!(
            "guest: no RAM at ",
            Hex(DIRTY_BASE),
            " for guest.action=dirty"
        );
        cpu::halt_forever()
    };
    report!("dirty=", crate::serial::Dec(rate));
    let store = |page: u64, value: u64| {
        // SAFETY: `page` is in the RAM entry [DIRTY_BASE, end), which only this action uses.
        unsafe { (page as *mut u64).write_volatile(value) };
    };
    // `guest.dirty=0`: an idle guest, nothing written.
    for page in (DIRTY_BASE..end).step_by(4096).take_while(|_| rate > 0) {
        store(page, u64::MAX);
    }
    let counter = COUNTER_ADDR as *mut u64;
    let hz = crate::clock::tsc_hz().max(1);
    let start = cpu::rdtsc();
    let (mut page, mut written, mut bursts) = (DIRTY_BASE, 0u64, 0u64);
    apic::start_tick(idt::TICK_VECTOR);
    loop {
        let elapsed = cpu::rdtsc().wrapping_sub(start);
        let due = (elapsed as u128 * u128::from(rate) * 256 / u128::from(hz)) as u64;
        while written < due {
            store(page, written);
            written += 1;
            page += 4096;
            if page >= end {
                page = DIRTY_BASE;
            }
        }
        bursts += 1;
        // SAFETY: COUNTER_ADDR is guest RAM no one else uses.
        unsafe { counter.write_volatile(bursts) };
        crate::clock::wait_halting(1000, || false);
    }
}

/// Interrupt-driven echo: COM1 IRQ 4 -> I/O APIC pin 4 -> this CPU's LAPIC -> `on_serial_irq`.
fn echo(bsp_id: u8) -> ! {
    apic::enable(idt::SPURIOUS_VECTOR);
    apic::route_irq(SERIAL_IOAPIC_PIN, idt::SERIAL_VECTOR, bsp_id);
    serial::enable_rx_interrupt();
    report!("echo=ready");
    loop {
        cpu::wait_for_interrupt();
    }
}

const RESET_WORD: &[u8] = b"reset";
/// How much of [`RESET_WORD`] the current input line matches; `usize::MAX` once it cannot.
static LINE_MATCH: AtomicUsize = AtomicUsize::new(0);

/// Lines COM1 has received so far (the `read-on-line` disk operation waits for them).
pub static LINES: AtomicU64 = AtomicU64::new(0);

/// Feeds one received byte to the line matcher; true when it ends a line that is exactly `reset`.
fn ends_reset_line(b: u8) -> bool {
    let matched = LINE_MATCH.load(Ordering::Relaxed);
    let next = match b {
        b'\n' => {
            LINES.fetch_add(1, Ordering::Relaxed);
            LINE_MATCH.store(0, Ordering::Relaxed);
            return matched == RESET_WORD.len();
        }
        b'\r' => matched, // tolerate CRLF terminals
        _ if RESET_WORD.get(matched) == Some(&b) => matched + 1,
        _ => usize::MAX,
    };
    LINE_MATCH.store(next, Ordering::Relaxed);
    false
}

/// Serial interrupt handler (called from the `SERIAL_VECTOR` stub in idt.rs): echoes every
/// received byte; a `reset` line ends the guest.
pub extern "C" fn on_serial_irq() {
    while let Some(b) = serial::try_read() {
        serial::put_byte(b);
        if ends_reset_line(b) {
            report!("echo=bye");
            cpu::reset();
        }
    }
    apic::eoi();
}
