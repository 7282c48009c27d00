//! The Intel MultiProcessor Specification 1.4 table, so the guest finds every vCPU, the IOAPIC and
//! the interrupt wiring without ACPI.
//!
//! Layout: the floating pointer, then the configuration table (processor entries, the ISA bus,
//! the IOAPIC, one I/O interrupt entry per IOAPIC pin, LINT1 as NMI), all in the BIOS area.

use crate::guest_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::addr32;
use super::ioapic_id;
use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_END, MPTABLE_START};

/// APIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_SUPPORTED_CPUS: u8 = 254;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const BUS_ID_ISA: u8 = 0;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
/// Polarity and trigger "conform to the bus".
const IRQ_FLAGS_DEFAULT: u16 = 0;
/// Every local APIC.
const ALL_LAPICS: u8 = 0xff;

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;

/// Failure to build or write the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("the MP table describes at most {MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    /// The table does not fit in the BIOS area.
    #[error("the MP table does not fit in the BIOS area")]
    TooBig,
    /// Guest memory does not cover the BIOS area.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// Builds the MP table for `cpus` vCPUs (APIC IDs 0..cpus, vCPU 0 the BSP) and writes it.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

/// The floating pointer followed by the configuration table, as bytes.
fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = ioapic_id(cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&addr32(IOAPIC_START).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[BUS_ID_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT1 is NMI on every CPU. No ExtINT on LINT0: there is no 8259 PIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI]);
    entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
    entries.extend_from_slice(&[BUS_ID_ISA, 0, ALL_LAPICS, 1]);
    count += 1;

    let table_len = CONFIG_HEADER_SIZE + entries.len();
    let total = FLOATING_POINTER_SIZE + table_len;
    if total as u64 > MPTABLE_END - MPTABLE_START {
        return Err(MptableError::TooBig);
    }
    let config_addr = MPTABLE_START + FLOATING_POINTER_SIZE as u64;

    let mut header = Vec::with_capacity(CONFIG_HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(
        &u16::try_from(table_len)
            .map_err(|_| MptableError::TooBig)?
            .to_le_bytes(),
    );
    header.extend_from_slice(&[SPEC_REV, 0]);
    header.extend_from_slice(b"EMBER   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&addr32(APIC_START).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum_fix(&config);

    let mut table = Vec::with_capacity(total);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&addr32(config_addr).to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum_fix(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// The byte that makes `bytes` sum to zero modulo 256 (its checksum slot must hold 0).
fn checksum_fix(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    #[test]
    fn checksums_hold_and_pointer_finds_the_table() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let config = &t[usize::try_from(phys - MPTABLE_START).unwrap()..];
        assert_eq!(&config[0..4], b"PCMP");
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(len, config.len());
        assert_eq!(sum(config), 0);
    }

    #[test]
    fn one_processor_entry_per_cpu_and_only_cpu0_is_bsp() {
        let t = build(3).unwrap();
        let entries = &t[16 + CONFIG_HEADER_SIZE..];
        for id in 0..3u8 {
            let e = &entries[usize::from(id) * 20..][..20];
            assert_eq!((e[0], e[1]), (ENTRY_PROCESSOR, id));
            assert_eq!(e[3] & CPU_BSP != 0, id == 0);
        }
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 3 + 2 + u16::from(IOAPIC_PINS) + 1);
    }

    #[test]
    fn the_largest_table_fits_and_zero_or_too_many_cpus_fail() {
        assert!(build(MAX_SUPPORTED_CPUS).is_ok());
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        assert!(build(255).is_err());
    }
}
