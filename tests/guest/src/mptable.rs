//! Intel MultiProcessor Specification 1.4 tables: finds the floating pointer structure, checks
//! both checksums and collects the processor entries.

use crate::bootinfo::BootInfo;

/// Most processor entries kept.
pub const MAX_CPUS: usize = 64;

/// One processor entry (type 0).
#[derive(Clone, Copy)]
pub struct MpCpu {
    pub apic_id: u8,
    pub enabled: bool,
    pub bsp: bool,
}

/// The processor entries of the MP configuration table.
pub struct MpTable {
    cpus: [MpCpu; MAX_CPUS],
    len: usize,
}

impl MpTable {
    pub fn cpus(&self) -> &[MpCpu] {
        &self.cpus[..self.len]
    }
}

/// Where the floating pointer may live (16-byte aligned): the last KiB of base memory (the EBDA
/// of docs/test-guest.md), then the BIOS ROM area (where ember, Firecracker and SeaBIOS put it).
const EBDA: (u64, u64) = (0x9_fc00, 0xa_0000);
const BIOS_ROM: (u64, u64) = (0xf_0000, 0x10_0000);

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
const CONFIG_HEADER_LEN: u64 = 44;
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_LEN: u64 = 20;
const OTHER_ENTRY_LEN: u64 = 8; // types 1-4: bus, I/O APIC, I/O and local interrupt assignments
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BSP: u8 = 1 << 1;

/// Views `len` bytes of guest-physical memory.
///
/// # Safety
/// The range must be mapped memory (RAM or ROM) below 4 GiB.
unsafe fn phys(addr: u64, len: u64) -> &'static [u8] {
    // SAFETY: per the caller; the guest never writes these ranges.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Finds and parses the MP table; `None` when there is no valid one.
pub fn find(boot: &BootInfo) -> Option<MpTable> {
    // The ROM area is scanned only when the memory map mentions it: where it is a hole, each of
    // its 4096 candidate reads would be an MMIO exit.
    let rom = boot.covers(BIOS_ROM.0, BIOS_ROM.1).then_some(BIOS_ROM);
    [Some(EBDA), rom]
        .into_iter()
        .flatten()
        .find_map(|(start, end)| {
            (start..end)
                .step_by(16)
                // SAFETY: physical memory below 1 MiB, identity mapped, only read; where nothing is
                // there the reads return junk that fails the signature check.
                .find_map(|addr| unsafe { parse_floating(addr) })
        })
}

/// Parses the floating pointer structure candidate at `addr` and the table it points to.
///
/// # Safety
/// `addr` must be in one of the scanned areas.
unsafe fn parse_floating(addr: u64) -> Option<MpTable> {
    // SAFETY: 16 bytes inside the scanned area, which ends on a 16-byte boundary.
    let fp = unsafe { phys(addr, 16) };
    if &fp[..4] != FLOATING_SIGNATURE {
        return None;
    }
    // Length (in 16-byte units) is 1 in every MP spec revision.
    if fp[8] != 1 || !checksum_ok(fp) {
        return None;
    }
    let config = u32_at(fp, 4) as u64;
    if config == 0 {
        return None; // a "default configuration": no table to read processors from
    }
    // SAFETY: the checksummed floating pointer says a configuration table is there.
    let header = unsafe { phys(config, CONFIG_HEADER_LEN) };
    if &header[..4] != CONFIG_SIGNATURE {
        return None;
    }
    let base_len = u16_at(header, 4) as u64;
    if base_len < CONFIG_HEADER_LEN {
        return None;
    }
    // SAFETY: the header gives the base table's length.
    let table = unsafe { phys(config, base_len) };
    if !checksum_ok(table) {
        return None;
    }
    let mut mp = MpTable {
        cpus: [MpCpu {
            apic_id: 0,
            enabled: false,
            bsp: false,
        }; MAX_CPUS],
        len: 0,
    };
    // Walk the entries by the table's length, as Linux does: the entry count is not always set
    // (qboot leaves it 0).
    let mut off = CONFIG_HEADER_LEN as usize;
    while let Some(&kind) = table.get(off) {
        let len = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_LEN,
            1..=4 => OTHER_ENTRY_LEN,
            _ => break, // unknown entry: its length is unknown too
        } as usize;
        let Some(entry) = table.get(off..off + len) else {
            break;
        };
        if kind == ENTRY_PROCESSOR && mp.len < MAX_CPUS {
            mp.cpus[mp.len] = MpCpu {
                apic_id: entry[1],
                enabled: entry[3] & CPU_ENABLED != 0,
                bsp: entry[3] & CPU_BSP != 0,
            };
            mp.len += 1;
        }
        off += len;
    }
    Some(mp)
}
