//! The guest-physical address map of an x86_64 ember VM, as named constants.
//!
//! Everything the VMM writes into guest memory before the first instruction runs lives at one of
//! these addresses; `docs/architecture.md` shows the same map as a table.

/// Boot GDT (64-bit and PVH entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: empty, so that an early exception triple-faults instead of running garbage.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, then PDPT, then four PDs.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages covering 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass (Linux x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM stops here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first found by a scan, then XSDT, FADT, MADT, DSDT), in the BIOS area.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI tables' slot (exclusive): the VM generation ID follows.
pub const ACPI_END: u64 = VMGENID_START;
/// The VM generation ID (16 bytes, `devices/pseudo/vmgenid.rs`), on a page of its own in the
/// e820-reserved BIOS area: guest memory (so snapshots carry it) the guest's allocator never
/// hands out. The DSDT's `VGEN` device gives this address to the guest.
pub const VMGENID_START: u64 = 0xef000;
/// MP floating pointer and table, in the BIOS area where Linux scans for them.
pub const MPTABLE_START: u64 = 0xf0000;
/// End of the BIOS area (exclusive).
pub const MPTABLE_END: u64 = 0x10_0000;
/// Start of high memory: kernels load at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// The boot-timer device (Firecracker-compatible), first page of the gap.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// First virtio-mmio slot, after the boot timer.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (needed on Intel hosts), just below the BIOS ROM alias.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// KVM's identity-map page (EPT real mode), the page below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// Serial port COM1: ports and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt (IOAPIC pin and GSI).
pub const COM1_IRQ: u32 = 4;
/// POST/debug port: boot progress codes.
pub const DEBUG_PORT: u16 = 0x80;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port; the data and command ports are handled as one range.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// I/O APIC input pins: GSIs 0-23, reserved for ember's I/O APIC in KVM's split irqchip.
pub const IOAPIC_PINS: u8 = 24;
/// The ACPI generic event device's interrupt (GSI), which tells the guest its VM generation ID
/// changed: COM2's ISA line, free on ember (there is no COM2, and virtio lines start at 5).
pub const GED_IRQ: u32 = 3;
/// i8042 keyboard interrupt (IOAPIC pin and GSI), as on a PC.
pub const I8042_KBD_IRQ: u32 = 1;
/// Hardware-reduced ACPI sleep control register (the FADT's SLEEP_CONTROL_REG); the sleep status
/// register follows at the next port. Free on ember (no VGA), and Cloud Hypervisor's choice too.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// Hardware-reduced ACPI sleep status register (SLEEP_STATUS_REG).
pub const ACPI_SLEEP_STATUS_PORT: u16 = ACPI_SLEEP_CONTROL_PORT + 1;
