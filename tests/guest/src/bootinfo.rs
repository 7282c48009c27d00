//! The boot information the VMM handed over: the memory map and the command line, copied out of
//! the Linux zero page (`boot_params`) or the PVH `hvm_start_info` into a [`BootInfo`] before the
//! guest touches low memory.

use crate::entry::BOOT_PVH;

/// Longest command line kept (ember's limit, see docs/test-guest.md).
pub const CMDLINE_MAX: usize = 2048;
/// Most memory-map entries kept (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX: usize = 128;

/// The boot protocol the guest was entered through.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Linux64,
    Pvh,
}

impl Protocol {
    /// The value reported as `entry=`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Linux64 => "linux64",
            Protocol::Pvh => "pvh",
        }
    }
}

/// One memory-map entry; `kind` is the e820 type (1 = RAM, 2 = reserved, ...).
#[derive(Clone, Copy)]
pub struct MemRange {
    pub start: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest keeps of the boot information.
pub struct BootInfo {
    pub protocol: Protocol,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    e820: [MemRange; E820_MAX],
    e820_len: usize,
    /// Set when the boot information itself looked wrong (bad PVH magic).
    pub error: Option<&'static str>,
}

// struct boot_params offsets (Documentation/arch/x86/zero-page.rst).
const ZP_E820_ENTRIES: u64 = 0x1e8; // u8
const ZP_CMD_LINE_PTR: u64 = 0x228; // u32, in the setup header
const ZP_E820_TABLE: u64 = 0x2d0; // struct boot_e820_entry[128], 20 bytes each
const ZP_E820_ENTRY_SIZE: u64 = 20;

// struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
const HVM_MAGIC: u32 = 0x336e_c578;
const HVM_VERSION: u64 = 4; // u32
const HVM_CMDLINE_PADDR: u64 = 24; // u64
const HVM_MEMMAP_PADDR: u64 = 40; // u64, version >= 1
const HVM_MEMMAP_ENTRIES: u64 = 48; // u32, version >= 1
const HVM_MEMMAP_ENTRY_SIZE: u64 = 24; // addr u64, size u64, type u32, reserved u32

/// Reads a `T` at guest-physical `addr`.
///
/// # Safety
/// `addr` must be mapped (below 4 GiB) and hold boot information the VMM wrote.
unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller guarantees the address; boot structures are packed, so read unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Copies the boot information found at guest-physical `info` (the zero page for the Linux
    /// protocol, `hvm_start_info` for PVH) into `self`.
    ///
    /// # Safety
    /// `info` must be what the entry code received from the VMM in RSI/EBX.
    pub unsafe fn read(protocol: u32, info: u64) -> BootInfo {
        let mut boot = BootInfo {
            protocol: Protocol::Linux64,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            e820: [MemRange {
                start: 0,
                size: 0,
                kind: 0,
            }; E820_MAX],
            e820_len: 0,
            error: None,
        };
        // SAFETY: the VMM placed the structure at `info` and the tables it points to; every
        // pointer read from it is below 4 GiB (32-bit fields, or ember's low-memory layout).
        unsafe {
            if protocol == BOOT_PVH {
                boot.protocol = Protocol::Pvh;
                if read::<u32>(info) != HVM_MAGIC {
                    boot.error = Some("bad hvm_start_info magic");
                    return boot;
                }
                boot.read_cmdline(read::<u64>(info + HVM_CMDLINE_PADDR));
                if read::<u32>(info + HVM_VERSION) >= 1 {
                    let map = read::<u64>(info + HVM_MEMMAP_PADDR);
                    let n = read::<u32>(info + HVM_MEMMAP_ENTRIES) as u64;
                    boot.read_e820(map, n, HVM_MEMMAP_ENTRY_SIZE);
                }
            } else {
                boot.read_cmdline(read::<u32>(info + ZP_CMD_LINE_PTR) as u64);
                let n = read::<u8>(info + ZP_E820_ENTRIES) as u64;
                boot.read_e820(info + ZP_E820_TABLE, n, ZP_E820_ENTRY_SIZE);
            }
        }
        boot
    }

    /// # Safety
    /// `addr` is 0 or points to a NUL-terminated string.
    unsafe fn read_cmdline(&mut self, addr: u64) {
        if addr == 0 {
            return;
        }
        while self.cmdline_len < CMDLINE_MAX {
            // SAFETY: within the string or its terminator, per the caller.
            let b = unsafe { read::<u8>(addr + self.cmdline_len as u64) };
            if b == 0 {
                break;
            }
            self.cmdline[self.cmdline_len] = b;
            self.cmdline_len += 1;
        }
    }

    /// # Safety
    /// `addr` points to `n` entries of `stride` bytes, each starting with addr, size (u64) and
    /// type (u32).
    unsafe fn read_e820(&mut self, addr: u64, n: u64, stride: u64) {
        for i in 0..n.min(E820_MAX as u64) {
            let entry = addr + i * stride;
            // SAFETY: entry `i` of the table, per the caller.
            self.e820[i as usize] = unsafe {
                MemRange {
                    start: read(entry),
                    size: read(entry + 8),
                    kind: read(entry + 16),
                }
            };
            self.e820_len += 1;
        }
    }

    /// The command line, verbatim (without the terminating NUL).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The memory map, in the VMM's order.
    pub fn e820(&self) -> &[MemRange] {
        &self.e820[..self.e820_len]
    }

    /// Total RAM (type 1) in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.e820()
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.size)
            .sum()
    }

    /// Whether one RAM (type 1) entry holds all of `[start, end)`.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.e820()
            .iter()
            .any(|r| r.kind == 1 && r.start <= start && end <= r.start.saturating_add(r.size))
    }

    /// Whether some map entry, of any type, overlaps `[start, end)`: only such ranges are worth
    /// scanning for firmware tables (elsewhere a read may be an MMIO exit, or nothing at all).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.e820()
            .iter()
            .any(|r| r.start < end && start < r.start.saturating_add(r.size))
    }
}
