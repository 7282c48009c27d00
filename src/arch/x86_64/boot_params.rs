//! What the kernel is told at entry: the e820 map, the zero page (64-bit Linux boot protocol) and
//! the PVH start info, written through linux-loader's boot configurators.

use crate::guest_memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress};

use super::layout::{
    ACPI_START, CMDLINE_START, EBDA_START, HIMEM_START, MPTABLE_END, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Linux's `E820_MAX_ENTRIES_ZEROPAGE`.
const E820_MAX_ENTRIES: usize = 128;

/// Failure to write the boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// linux-loader refused or failed to write the structures.
    #[error("cannot write the boot parameters")]
    Write(#[source] linux_loader::configurator::Error),
    /// Too many memory ranges for the zero page.
    #[error("too many e820 entries")]
    TooManyE820Entries,
}

/// One e820 entry: start, size, type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The e820 map for the given RAM ranges: low RAM up to the EBDA, the BIOS area holding the ACPI
/// and MP tables reserved, then every RAM range from high memory on.
pub fn e820_map(ram: &[(GuestAddress, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: MPTABLE_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for &(start, size) in ram {
        let end = start.raw_value() + size;
        let start = start.raw_value().max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initrd was loaded.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRegion {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Writes the zero page for the 64-bit Linux boot protocol. `header` is the bzImage's setup
/// header when there is one; an ELF vmlinux gets a minimal header of our own.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
) -> Result<(), BootParamsError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.raw_value(),
        ..Default::default()
    };
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // Fields the boot loader owns start empty, whatever the image's header holds: a setup_data
    // list ember never wrote, or an initrd it never loaded, would send the kernel to read
    // arbitrary guest memory.
    params.hdr.setup_data = 0;
    params.hdr.ramdisk_image = 0;
    params.hdr.ramdisk_size = 0;
    // Both fit in 32 bits: the command line sits at a fixed low address, and its size is capped
    // at CMDLINE_MAX_SIZE.
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or_default();
    params.hdr.cmdline_size = u32::try_from(cmdline_size).unwrap_or(u32::MAX);
    if let Some(initrd) = initrd {
        // The initrd sits below the MMIO gap, so below 4 GiB.
        params.hdr.ramdisk_image = u32::try_from(initrd.addr.raw_value()).unwrap_or(u32::MAX);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(u32::MAX);
    }
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries);
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries =
        u8::try_from(e820.len()).map_err(|_| BootParamsError::TooManyE820Entries)?;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootParamsError::Write)
}

/// Writes the PVH `hvm_start_info`, its memory map and the initrd as its one module.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
) -> Result<(), BootParamsError> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        rsdp_paddr: rsdp.raw_value(),
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(e820.len())
            .map_err(|_| BootParamsError::TooManyE820Entries)?,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();

    let mut params = if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
        let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
        params
    } else {
        BootParams::new(&start_info, GuestAddress(PVH_INFO_START))
    };
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).unwrap())]).unwrap()
    }

    #[test]
    fn e820_covers_low_ram_bios_area_and_high_ram() {
        let map = e820_map(&[(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (128 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_lists_ram_above_4g() {
        let map = e820_map(&[(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let m = mem(64 << 20);
        let e820 = e820_map(&[(GuestAddress(0), 64 << 20)]);
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            size: 0x1234,
        };
        write_zero_page(&m, None, 42, Some(initrd), &e820, GuestAddress(0xe0000)).unwrap();
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1234);
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
    }

    /// Found by the `loader` fuzz target: a bzImage whose header carried a `setup_data` pointer
    /// (or initrd fields) had it copied into the zero page, so the kernel would walk a list ember
    /// never wrote.
    #[test]
    fn loader_owned_header_fields_start_empty() {
        let m = mem(64 << 20);
        let e820 = e820_map(&crate::arch::x86_64::memory_ranges(64 << 20));
        let mut hdr = setup_header {
            setup_data: 0x1013_0000,
            ramdisk_image: 0x0200_0000,
            ramdisk_size: 0x1000,
            ..Default::default()
        };
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        write_zero_page(&m, Some(hdr), 10, None, &e820, GuestAddress(0xe0000)).unwrap();
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.setup_data }, 0);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_module() {
        let m = mem(64 << 20);
        let e820 = e820_map(&[(GuestAddress(0), 64 << 20)]);
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            size: 0x1234,
        };
        write_pvh_start_info(&m, Some(initrd), &e820, GuestAddress(0xe0000)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(module.paddr, 0x300_0000);
        assert_eq!(module.size, 0x1234);
        let last: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!(last.addr, HIMEM_START);
    }
}
