//! Starting the application processors listed in the MP table with INIT/SIPI/SIPI, and what
//! each AP does once it reaches long mode: record its APIC id, then halt.
//!
//! The BSP copies the trampoline (entry.rs) to `TRAMPOLINE_PHYS`; each AP takes a stack slot with
//! an atomic increment of [`AP_NEXT_SLOT`] in `ap_entry64`, then calls [`ap_main`], which stores
//! its id in that slot and counts itself in `AP_UP`.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::entry::{MAX_APS, TRAMPOLINE_PHYS, trampoline};
use crate::mptable::MpTable;
use crate::{apic, clock, cpu, idt};

/// Next free AP stack slot; incremented by `ap_entry64` (asm) before it has a stack.
pub static AP_NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
/// APs that have stored their APIC id.
static AP_UP: AtomicU32 = AtomicU32::new(0);
/// APIC id of the AP in each stack slot; `u32::MAX` while the slot is unused.
static AP_IDS: [AtomicU32; MAX_APS as usize] =
    [const { AtomicU32::new(u32::MAX) }; MAX_APS as usize];

/// MP spec: wait 10 ms after INIT, 200 us between the two SIPIs.
const INIT_DELAY_US: u64 = 10_000;
const SIPI_DELAY_US: u64 = 200;
/// How long the BSP waits for every AP to check in.
const AP_TIMEOUT_US: u64 = 1_000_000;

/// The APs that came up, as APIC ids in MP-table order.
pub struct ApsUp {
    ids: [u8; MAX_APS as usize],
    len: usize,
}

impl ApsUp {
    /// No AP started (no MP table).
    pub fn none() -> ApsUp {
        ApsUp {
            ids: [0; MAX_APS as usize],
            len: 0,
        }
    }

    pub fn ids(&self) -> &[u8] {
        &self.ids[..self.len]
    }
}

/// Starts every enabled non-BSP processor of `mp` and waits (bounded) until all have checked in.
pub fn start_aps(mp: &MpTable, bsp_id: u8) -> ApsUp {
    let targets = mp
        .cpus()
        .iter()
        .filter(|c| c.enabled && !c.bsp && c.apic_id != bsp_id)
        .map(|c| c.apic_id)
        .take(MAX_APS as usize);
    let mut up = ApsUp::none();
    if targets.clone().next().is_none() {
        return up;
    }

    let code = trampoline();
    // SAFETY: the trampoline page is free low RAM (docs/test-guest.md), the boot information
    // has been copied out already, and no AP runs yet.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_PHYS as *mut u8, code.len());
    }

    let page = (TRAMPOLINE_PHYS >> 12) as u8;
    targets.clone().for_each(apic::send_init);
    clock::delay_us(INIT_DELAY_US);
    targets.clone().for_each(|id| apic::send_startup(id, page));
    clock::delay_us(SIPI_DELAY_US);
    targets.clone().for_each(|id| apic::send_startup(id, page));

    let expected = targets.clone().count() as u32;
    clock::wait_until(AP_TIMEOUT_US, || AP_UP.load(Ordering::Acquire) >= expected);

    // Report in MP-table order, whatever order the APs arrived in.
    let is_up = |id: u8| {
        AP_IDS
            .iter()
            .any(|slot| slot.load(Ordering::Acquire) == id as u32)
    };
    for id in targets.filter(|&id| is_up(id)) {
        up.ids[up.len] = id;
        up.len += 1;
    }
    up
}

/// Rust entry of an AP, on the stack of `slot`: records the APIC id and halts for good.
pub extern "C" fn ap_main(slot: u32) -> ! {
    idt::load(); // so that a fault here is reported rather than a triple fault
    AP_IDS[slot as usize].store(apic::id() as u32, Ordering::Release);
    AP_UP.fetch_add(1, Ordering::Release);
    cpu::halt_forever()
}
