//! ember's test guest: a tiny x86_64 kernel that reports on COM1 what the VMM gave it (boot
//! protocol, command line, memory map, MP table, CPUs that start) and then acts on its command
//! line. docs/test-guest.md is the contract for the report lines and parameters.
//!
//! Module map: `entry` (asm entry points, GDT, page tables, AP trampoline), `bootinfo` (zero
//! page / `hvm_start_info`), `cmdline`, `mptable`, `smp` (INIT/SIPI), `apic` (LAPIC, I/O APIC),
//! `clock` (TSC rate from kvm-clock, delays), `idt` (exceptions, IRQ stubs), `user` (running a function in ring 3,
//! where PVM hosts run guest code natively), `actions` (ops and final action), `virtio`
//! (virtio-mmio transport; `virtio/queue` the split queue), `blk` (virtio-blk driver,
//! `guest.blk`), `data` (its transfer buffer), `net` (virtio-net driver, `guest.net`, the `net`
//! responder), `vsock` (virtio-vsock driver, `guest.vsock`, the `vsock` echo service), `hostile` (`guest.action=hostile`: attacks every device ember exposes),
//! `serial` (COM1 and report lines), `cpu` (port/MMIO/halt primitives), `mem` (memcpy and
//! friends), `minimal` (`guest.minimal`: boot timer, marker, reset, nothing else).

#![no_std]
#![no_main]

mod actions;
mod apic;
mod blk;
mod bootinfo;
mod clock;
mod cmdline;
mod cpu;
mod data;
mod entry;
mod hostile;
mod identity;
mod idt;
mod mem;
mod minimal;
mod mptable;
mod net;
mod serial;
mod shutdown;
mod smp;
mod user;
mod virtio;
mod vsock;

use bootinfo::BootInfo;
use serial::{Dec, Hex};

/// Called by `common64` (entry.rs) on the BSP, on its own stack with interrupts off.
/// `protocol` is `BOOT_LINUX64` or `BOOT_PVH`; `info` the zero page or `hvm_start_info`.
extern "C" fn rust_main(protocol: u32, info: u64) -> ! {
    idt::init();
    idt::load();
    serial::init();
    // SAFETY: `info` is what the VMM passed in RSI/EBX, untouched so far.
    let boot = unsafe { BootInfo::read(protocol, info) };

    report!("guest: hello");
    report!("entry=", boot.protocol.name());
    if let Some(error) = boot.error {
        report!("guest: ", error);
    }
    report!("cmdline=", boot.cmdline());
    for r in boot.e820() {
        report!(
            "e820=",
            Hex(r.start),
            "-",
            Hex(r.start + r.size),
            " ",
            Dec(r.kind.into())
        );
    }
    report!("mem_kib=", Dec(boot.ram_bytes() / 1024));

    let bsp_id = apic::id();
    let mp = mptable::find(&boot);
    match &mp {
        Some(mp) => {
            report!("mp_cpus=", Dec(mp.cpus().len() as u64));
            for cpu in mp.cpus() {
                let role = if cpu.bsp { " bsp" } else { " ap" };
                let state = if cpu.enabled { "" } else { " disabled" };
                report!("mp_cpu=", Dec(cpu.apic_id.into()), role, state);
            }
        }
        None => {
            report!("mp_cpus=0");
            report!("mp_table=missing");
        }
    }

    // The LAPIC must be software-enabled for the IPIs and, later, for echo mode's interrupts.
    apic::enable(idt::SPURIOUS_VECTOR);
    let aps = match &mp {
        Some(mp) => smp::start_aps(mp, bsp_id),
        None => smp::ApsUp::none(),
    };
    for &id in aps.ids() {
        report!("ap_up=", Dec(id.into()));
    }
    report!("cpus_up=", Dec(1 + aps.ids().len() as u64));

    let action = cmdline::action(boot.cmdline());
    actions::run_ops(boot.cmdline());
    blk::run(&boot, bsp_id);
    let nets = net::run(&boot, bsp_id, action == Ok(cmdline::Action::Net));
    let vsock = vsock::run(&boot, bsp_id, action == Ok(cmdline::Action::Vsock));
    let rng = identity::setup(&boot, bsp_id, action.ok());
    let action = action.unwrap_or_else(|bad| {
        report!("guest: bad guest.action ", bad, ", using reset");
        cmdline::Action::Reset
    });
    actions::run(action, bsp_id, nets, rng, vsock, &boot)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(at) => report!(
            "guest: rust panic at ",
            at.file(),
            ":",
            Dec(at.line().into())
        ),
        None => report!("guest: rust panic"),
    }
    cpu::halt_forever()
}
