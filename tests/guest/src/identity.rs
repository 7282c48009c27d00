//! A VM's identity as a clone sees it (docs/test-guest.md, "Identity"): `guest.rng=N` reads `N`
//! bytes from the virtio-rng device at boot, and `guest.action=identity` reports the VM
//! generation ID, then sleeps until the ACPI generic event device's interrupt (I/O APIC pin
//! [`GED_PIN`]) says the ID changed, and reports the new ID and `N` fresh random bytes each time.
//!
//! Memory: the rng queue at [`RNG_AREA`] (4 KiB), its buffer right after it.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::bootinfo::BootInfo;
use crate::cmdline;
use crate::serial::{Dec, Hex, HexBytes};
use crate::virtio::{Completion, DESC_WRITE, F_EVENT_IDX, F_INDIRECT_DESC, Mmio, Queue, get};
use crate::{apic, cpu, idt, report};

/// Where ember puts the VM generation ID (its layout.rs `VMGENID_START`); `guest.vmgenid=ADDR`
/// reads another address.
const DEFAULT_VMGENID: u64 = 0xef000;
/// The GED's line (ember's layout.rs `GED_IRQ`).
const GED_PIN: u8 = 3;
/// Bytes read when `guest.rng` is not given but the action needs some.
const DEFAULT_RNG_BYTES: u32 = 32;
/// Most bytes one `guest.rng` read asks for.
const MAX_RNG_BYTES: u32 = 1024;
const DEVICE_ID_RNG: u32 = 4;
const RNG_AREA: u64 = 0x30_0000;
const RNG_BUF: u64 = RNG_AREA + 0x1000;

/// GED interrupts taken.
static GED_IRQS: AtomicU32 = AtomicU32::new(0);

/// The GED's interrupt handler (idt.rs): counts, the main loop does the work.
pub extern "C" fn on_ged_irq() {
    GED_IRQS.fetch_add(1, Ordering::SeqCst);
    apic::eoi();
}

/// The virtio-rng device, set up.
pub struct Rng {
    queue: Queue,
    bytes: u32,
}

impl Rng {
    /// Reads `self.bytes` random bytes and reports `rng=<len>:<hex>` (or why not).
    fn report(&mut self) {
        // SAFETY: RNG_BUF is RAM (checked by `setup`) that only this driver uses.
        unsafe { crate::mem::memset(RNG_BUF as *mut u8, 0, MAX_RNG_BYTES as usize) };
        let head = self.queue.head();
        // SAFETY: `head` is in our queue's table; the buffer is ours.
        unsafe { Queue::set_desc(self.queue.table(), head, RNG_BUF, self.bytes, DESC_WRITE, 0) };
        match self.queue.submit(head) {
            Completion::Used => {
                let len = self.queue.last_len().min(self.bytes);
                // SAFETY: the device wrote at most `self.bytes` bytes into our buffer.
                let bytes =
                    unsafe { core::slice::from_raw_parts(RNG_BUF as *const u8, len as usize) };
                report!("rng=", Dec(len.into()), ":", HexBytes(bytes));
            }
            Completion::NoInterrupt => report!("rng=no-interrupt"),
            Completion::Timeout => report!("rng=timeout"),
        }
    }
}

/// Sets up the rng device when the command line asks for random bytes (`guest.rng=N`, or the
/// identity action), and reads them once; returns the device for the action.
pub fn setup(boot: &BootInfo, dest: u8, action: Option<cmdline::Action>) -> Option<Rng> {
    let cmdline = boot.cmdline();
    let asked = cmdline::value(cmdline, b"guest.rng");
    if asked.is_none() && action != Some(cmdline::Action::Identity) {
        return None;
    }
    let bytes = match asked.map(cmdline::number) {
        None => DEFAULT_RNG_BYTES,
        Some(Some(n)) if (1..=MAX_RNG_BYTES.into()).contains(&n) => n as u32,
        Some(_) => {
            report!(
                "guest: bad guest.rng, using ",
                Dec(DEFAULT_RNG_BYTES.into())
            );
            DEFAULT_RNG_BYTES
        }
    };
    if !boot.covers(RNG_AREA, RNG_BUF + MAX_RNG_BYTES as u64) {
        report!("rng=error:no RAM for the queue");
        return None;
    }
    let mut found = None;
    cmdline::for_each_virtio_mmio(cmdline, |entry| {
        if let Ok((base, irq)) = entry {
            let mmio = Mmio { base, irq };
            if found.is_none() && base < 0xffff_f000 && mmio.device_id() == Some(DEVICE_ID_RNG) {
                found = Some(mmio);
            }
        }
    });
    let Some(mmio) = found else {
        report!("rng=none");
        return None;
    };
    let queue = mmio
        .negotiate(F_EVENT_IDX | F_INDIRECT_DESC)
        // SAFETY: RNG_AREA is RAM (checked above) that only this driver uses.
        .and_then(|features| unsafe { Queue::new(mmio, features, RNG_AREA, dest) });
    let mut rng = match queue {
        Ok(queue) => Rng { queue, bytes },
        Err(why) => {
            report!("rng=error:", why);
            return None;
        }
    };
    rng.report();
    Some(rng)
}

fn vmgenid_addr(cmdline: &[u8]) -> u64 {
    cmdline::value(cmdline, b"guest.vmgenid")
        .and_then(cmdline::number)
        .filter(|&a| a < 0xffff_fff0)
        .unwrap_or(DEFAULT_VMGENID)
}

fn report_vmgenid(addr: u64) {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: below 4 GiB (checked when parsed), so identity mapped; a read of reserved
        // memory or a hole cannot harm the guest.
        *b = unsafe { get::<u8>(addr + i as u64) };
    }
    report!("vmgenid=", HexBytes(&id));
}

/// `guest.action=identity`: reports the ID, routes the GED's pin to this CPU, prints
/// `identity=ready`, then reports the new ID and fresh random bytes after each GED interrupt
/// (`identity.changed=<count>` last), forever.
pub fn run(boot: &BootInfo, dest: u8, mut rng: Option<Rng>) -> ! {
    let addr = vmgenid_addr(boot.cmdline());
    report!("vmgenid.addr=", Hex(addr));
    report_vmgenid(addr);
    apic::route_irq(GED_PIN, idt::GED_VECTOR, dest);
    report!("identity=ready");
    let mut seen = 0;
    loop {
        cpu::disable_interrupts();
        let now = GED_IRQS.load(Ordering::SeqCst);
        if now == seen {
            cpu::wait_for_interrupt();
            continue;
        }
        seen = now;
        report_vmgenid(addr);
        if let Some(rng) = &mut rng {
            rng.report();
        }
        report!("identity.changed=", Dec(seen.into()));
    }
}
