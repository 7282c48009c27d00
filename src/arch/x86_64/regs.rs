//! Boot CPU state for the two entries ember supports.
//!
//! - 64-bit Linux boot protocol: long mode on identity-mapped page tables covering 4 GiB,
//!   `RSI` = zero page.
//! - PVH: 32-bit protected mode, paging off, flat segments, `EBX` = `hvm_start_info`.
//!
//! Only the boot vCPU gets this state; application processors start the way hardware does,
//! from the guest's INIT/SIPI.

use crate::guest_memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Present, writable, 2 MiB page.
const PDE_HUGE: u64 = 0x83;

/// Which boot protocol the boot vCPU enters through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol.
    Linux64,
    /// Xen PVH (32-bit, paging off).
    Pvh,
}

/// Failure to write the boot tables.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {0} into guest memory")]
pub struct RegsError(&'static str);

/// General-purpose registers at entry.
pub fn boot_regs(mode: EntryMode, entry: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The x87/SSE state firmware leaves: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT, IDT and (64-bit entry) page tables, and sets `sregs` to use them.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let code = match mode {
        // Long-mode code segment: L bit set, D clear.
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xffff_ffff),
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError("IDT"))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code_seg = segment_from_gdt(gdt[1], 1);
    let data_seg = segment_from_gdt(gdt[2], 2);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages: enough for any kernel and the MMIO gap.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(|_| RegsError("page tables"))?;
    let mut pd_bytes = vec![0u8; 4096];
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + dir * 8))
            .map_err(|_| RegsError("page tables"))?;
        for (i, e) in pd_bytes.chunks_exact_mut(8).enumerate() {
            let entry = ((dir << 30) + ((i as u64) << 21)) | PDE_HUGE;
            e.copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&pd_bytes, GuestAddress(pd))
            .map_err(|_| RegsError("page tables"))?;
    }
    Ok(())
}

/// A GDT descriptor from flags (access byte + granularity nibble), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register that a selector for `entry` at GDT index `index` loads.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| u8::from((entry >> n) & 1 == 1);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = bit(55);
    // With 4 KiB granularity the limit counts pages.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(index) * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or_default(),
        present: bit(47),
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or_default(),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_code_segment_is_64_bit() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64, &mut sregs).unwrap();
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.selector), (1, 0, 8));
        assert_eq!(sregs.ds.selector, 16);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
    }

    #[test]
    fn identity_map_covers_the_mmio_gap() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64, &mut sregs).unwrap();
        // The 2 MiB page holding the LAPIC at 0xfee0_0000: PD 3, entry 0x1f7.
        let pde: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 0x1f7 * 8))
            .unwrap();
        assert_eq!(pde, 0xfee0_0000 | PDE_HUGE);
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Pvh, &mut sregs).unwrap();
        assert_eq!(
            (sregs.cs.l, sregs.cs.db, sregs.cs.limit),
            (0, 1, 0xffff_ffff)
        );
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        let regs = boot_regs(EntryMode::Pvh, GuestAddress(0x100_0000));
        assert_eq!(regs.rbx, PVH_INFO_START);
    }
}
