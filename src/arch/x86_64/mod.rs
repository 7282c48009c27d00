//! x86_64 boot: one concern per file, pure functions on guest memory and KVM structures.
//!
//! Nothing here runs the guest or owns a file descriptor; `vmm::builder` calls these in order.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

use vm_memory::GuestAddress;

use layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// The RAM ranges of a VM with `size` bytes of memory: split around the 32-bit MMIO gap.
pub fn memory_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), size - MMIO_GAP_START),
        ]
    }
}

/// A fixed low address (tables, APIC registers) as the 32-bit value firmware tables hold; every
/// such address in `layout` is below 4 GiB.
pub(crate) fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

/// The I/O APIC's ID in the MP and ACPI tables and its ID register: the first after the
/// vCPUs' APIC IDs (0..cpus).
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// The end (exclusive) of RAM below the MMIO gap, where the initrd is placed.
pub fn low_memory_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(memory_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(low_memory_end(128 << 20), 128 << 20);
    }

    #[test]
    fn memory_past_the_gap_is_split_around_it() {
        let ranges = memory_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(low_memory_end(4 << 30), 3 << 30);
    }
}
