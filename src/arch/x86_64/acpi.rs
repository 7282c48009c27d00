//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) through rust-vmm's `acpi_tables`, so kernels that
//! enumerate CPUs only through ACPI (Debian's and most distributions' stock kernels are built
//! without `X86_MPPARSE`) find every vCPU, as they would on Firecracker or Cloud Hypervisor.
//!
//! The platform is hardware-reduced ACPI: no PM timer, no SCI, no fixed buttons, no VGA, no CMOS
//! RTC, no MSI; an 8042 (the keyboard for Ctrl-Alt-Del, the reset line); the sleep control and
//! status registers, with `_S5` in the DSDT, so the guest can power off. The tables sit in
//! the BIOS area below the MP table, where Linux also scans for the RSDP; the boot protocols pass
//! its address directly too.

use crate::guest_memory::GuestMemoryMmap;
use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, IO, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Return,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use super::addr32;
use super::ioapic_id;
use super::layout::{
    ACPI_END, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, APIC_START, COM1_IRQ,
    COM1_PORT, GED_IRQ, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_KBD_IRQ, IOAPIC_START,
    VMGENID_START,
};
use crate::devices::legacy::acpi_pm::S5_SLEEP_TYPE;

const OEM_ID: [u8; 6] = *b"EMBER ";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: an 8042 (bit 1), VGA not present (bit 2), MSI not supported (bit 3), no CMOS
/// RTC (bit 5). Without the 8042 bit an ACPI Linux that finds no PNP0303 keyboard in the DSDT
/// skips the i8042 ("firmware absent"), and Ctrl-Alt-Del would not reach it; with it, Linux
/// probes ports 0x60/0x64 directly.
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5);
/// MADT flags: no PCAT_COMPAT, since there is no 8259 PIC (Linux then probes, finds none and
/// uses only the I/O APIC).
const MADT_FLAGS: u32 = 0;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENABLED: u32 = 1;
/// Every processor, in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// The tables do not fit or cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More bytes than the BIOS area slot holds.
    #[error("the ACPI tables ({0} bytes) do not fit below the MP table")]
    TooBig(usize),
    /// Guest memory does not cover the slot.
    #[error("cannot write the ACPI tables into guest memory")]
    Write,
}

/// Builds the tables for `cpus` vCPUs (APIC IDs 0..cpus; the IOAPIC's ID follows them, as in the
/// MP table), writes them, and returns the RSDP's address.
/// `virtio` lists each virtio-mmio device's window base and interrupt line (GSI), described in
/// the DSDT as Firecracker does, so that an ACPI Linux maps their interrupts.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    cpus: u8,
    virtio: &[(u64, u32)],
) -> Result<GuestAddress, AcpiError> {
    let (bytes, rsdp) = build(cpus, virtio)?;
    mem.write_slice(&bytes, GuestAddress(ACPI_START))
        .map_err(|_| AcpiError::Write)?;
    Ok(rsdp)
}

/// All tables laid out from `ACPI_START`, and the RSDP's address.
fn build(cpus: u8, virtio: &[(u64, u32)]) -> Result<(Vec<u8>, GuestAddress), AcpiError> {
    let mut area = TableArea::default();
    let dsdt = area.add(&dsdt(virtio));
    let mut fadt = FADTBuilder::new(OEM_ID, *b"EMBRFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.sleep_control_reg = io_byte_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(ACPI_SLEEP_STATUS_PORT);
    let fadt = area.add(&fadt.finalize());
    let madt = area.add(&madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"EMBRXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = area.add(&xsdt);
    let rsdp = area.add(&Rsdp::new(OEM_ID, xsdt));
    if ACPI_START + area.bytes.len() as u64 > ACPI_END {
        return Err(AcpiError::TooBig(area.bytes.len()));
    }
    Ok((area.bytes, GuestAddress(rsdp)))
}

/// The DSDT: `_S5` (the sleep type that powers off, written to the sleep control register;
/// Linux offers ACPI power-off only when `_S5` exists), and COM1 and the i8042 keyboard as PNP
/// devices with their ports and interrupts, as Firecracker describes them. Without the devices an
/// ACPI Linux has no mapping for ISA IRQs 1 and 4 (there is no 8259 PIC to preallocate them), so
/// the UART runs without interrupts (user-space console output stalls) and the i8042 probe fails.
///
/// Each virtio-mmio device is there too (`LNRO0005`, its window and interrupt), for the same
/// reason: without a mapping for its GSI an ACPI Linux cannot request the device's interrupt,
/// and the devices the command line announces fail to probe.
fn dsdt(virtio: &[(u64, u32)]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"EMBRDSDT", OEM_REVISION);
    let mut aml = Vec::new();
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut aml);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_ports = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&com1_irq, &com1_ports]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let data_port = IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let command_port = IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    Device::new(
        "_SB_.PS2_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&data_port, &command_port, &kbd_irq]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    for (index, &(base, irq)) in virtio.iter().enumerate() {
        let window = Memory32Fixed::new(true, addr32(base), VIRTIO_WINDOW);
        let interrupt = Interrupt::new(true, true, false, false, irq);
        let uid = u32::try_from(index).unwrap_or(u32::MAX);
        Device::new(
            format!("_SB_.V{index:03}").as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![&window, &interrupt]),
                ),
            ],
        )
        .to_aml_bytes(&mut aml);
    }
    vmgenid(&mut aml);
    dsdt.append_slice(&aml);
    dsdt
}

/// The VM generation ID device and the generic event device that notifies it.
///
/// `VGEN` is what Linux's `vmgenid` driver binds to (it matches `VMGENCTR` or
/// `VM_GEN_COUNTER`) and evaluates `ADDR` on: a package of the ID's address, low then high 32
/// bits. A hardware-reduced platform has no GPE block for the notification, so it comes as
/// Firecracker sends it: the GED (`ACPI0013`) owns an interrupt, and Linux's GED driver runs
/// `_EVT` with the interrupt's number when it fires, which notifies `VGEN` (the driver then
/// reads the new ID).
fn vmgenid(aml: &mut Vec<u8>) {
    let low = addr32(VMGENID_START);
    let high = u32::try_from(VMGENID_START >> 32).unwrap_or(0);
    Device::new(
        "_SB_.VGEN".into(),
        vec![
            &Name::new("_HID".into(), &"VMGENCTR"),
            &Name::new("_CID".into(), &"VM_GEN_COUNTER"),
            &Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &Method::new(
                "ADDR".into(),
                0,
                false,
                vec![&Return::new(&Package::new(vec![&low, &high]))],
            ),
        ],
    )
    .to_aml_bytes(aml);
    let interrupt = Interrupt::new(true, true, false, false, GED_IRQ);
    let vgen = Path::new("\\_SB_.VGEN");
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&interrupt])),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&If::new(
                    &Equal::new(&Arg(0), &GED_IRQ),
                    vec![&Notify::new(&vgen, &0x80u8)],
                )],
            ),
        ],
    )
    .to_aml_bytes(aml);
}

/// A virtio-mmio device's register window.
const VIRTIO_WINDOW: u32 = 0x1000;

/// A one-byte register on an I/O port, as a Generic Address Structure.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The MADT: one Local APIC per vCPU, the IOAPIC (GSIs from 0), and LINT1 as NMI everywhere.
fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, *b"EMBRMADT", OEM_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&addr32(APIC_START).to_le_bytes());
    body.extend_from_slice(&MADT_FLAGS.to_le_bytes());
    for apic_id in 0..cpus {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, apic_id, apic_id]);
        body.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_IO_APIC, 12, ioapic_id(cpus), 0]);
    body.extend_from_slice(&addr32(IOAPIC_START).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.append_slice(&body);
    madt
}

/// Tables appended one after another, each 16-byte aligned (the RSDP must be).
#[derive(Default)]
struct TableArea {
    bytes: Vec<u8>,
}

impl TableArea {
    /// Appends `table`; returns its guest-physical address.
    fn add(&mut self, table: &dyn Aml) -> u64 {
        self.bytes.resize(self.bytes.len().next_multiple_of(16), 0);
        let addr = ACPI_START + self.bytes.len() as u64;
        table.to_aml_bytes(&mut self.bytes as &mut dyn AmlSink);
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn table_at(bytes: &[u8], addr: u64) -> &[u8] {
        let offset = usize::try_from(addr - ACPI_START).unwrap();
        let len = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap());
        &bytes[offset..offset + usize::try_from(len).unwrap()]
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn rsdp_leads_through_the_xsdt_to_fadt_and_madt_with_valid_checksums() {
        let (bytes, rsdp) = build(2, &[]).unwrap();
        let rsdp_offset = usize::try_from(rsdp.0 - ACPI_START).unwrap();
        let rsdp_bytes = &bytes[rsdp_offset..rsdp_offset + 36];
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert_eq!(rsdp.0 % 16, 0);
        assert_eq!(sum(&rsdp_bytes[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp_bytes), 0, "extended checksum");
        let xsdt = table_at(&bytes, u64_at(rsdp_bytes, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let signatures: Vec<&[u8]> = xsdt[36..]
            .chunks_exact(8)
            .map(|e| &table_at(&bytes, u64::from_le_bytes(e.try_into().unwrap()))[..4])
            .collect();
        assert_eq!(signatures, vec![b"FACP".as_slice(), b"APIC".as_slice()]);
        for entry in xsdt[36..].chunks_exact(8) {
            assert_eq!(
                sum(table_at(
                    &bytes,
                    u64::from_le_bytes(entry.try_into().unwrap())
                )),
                0
            );
        }
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let madt = madt(3);
        let body = &madt.as_slice()[44..];
        let mut apic_ids = Vec::new();
        let mut ioapic = None;
        let mut offset = 0;
        while offset < body.len() {
            let (kind, len) = (body[offset], usize::from(body[offset + 1]));
            match kind {
                MADT_LOCAL_APIC => apic_ids.push(body[offset + 3]),
                MADT_IO_APIC => ioapic = Some(body[offset + 2]),
                _ => {}
            }
            offset += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2]);
        assert_eq!(ioapic, Some(3));
        assert_eq!(sum(madt.as_slice()), 0);
    }

    /// The FADT as the guest finds it: through the RSDP and the XSDT's first entry.
    fn fadt_of(bytes: &[u8], rsdp: GuestAddress) -> &[u8] {
        let rsdp_offset = usize::try_from(rsdp.0 - ACPI_START).unwrap();
        let xsdt = table_at(bytes, u64_at(bytes, rsdp_offset + 24));
        let fadt = table_at(bytes, u64_at(xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        fadt
    }

    #[test]
    fn fadt_has_the_sleep_registers_the_8042_and_hardware_reduced_flag() {
        let (bytes, rsdp) = build(1, &[(0xc000_1000, 5)]).unwrap();
        let fadt = fadt_of(&bytes, rsdp);
        // ACPI 6.x FADT: SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256 (12-byte GAS each).
        assert!(fadt.len() >= 268);
        let control = [1, 8, 0, 1, 0xc0, 0x03, 0, 0, 0, 0, 0, 0];
        let status = [1, 8, 0, 1, 0xc1, 0x03, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            fadt[244..256],
            control,
            "system I/O, 8 bits, byte access, port 0x3c0"
        );
        assert_eq!(fadt[256..268], status, "port 0x3c1");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(boot_arch, IAPC_BOOT_ARCH);
        assert_ne!(boot_arch & (1 << 1), 0, "8042 present");
        assert_eq!(sum(fadt), 0);
    }

    /// As many virtio devices as ember wires.
    fn slots19() -> Vec<(u64, u32)> {
        (0..19u32)
            .map(|i| (0xc000_1000 + u64::from(i) * 0x1000, 5 + i))
            .collect()
    }

    #[test]
    fn dsdt_describes_every_virtio_device_with_its_window_and_interrupt() {
        let table = dsdt(&slots19());
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let count = bytes.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 19);
        assert!(bytes.windows(4).any(|w| w == b"V018"));
    }

    #[test]
    fn dsdt_names_s5_and_the_legacy_devices() {
        let (bytes, rsdp) = build(1, &[(0xc000_1000, 5)]).unwrap();
        let fadt = fadt_of(&bytes, rsdp);
        let x_dsdt = u64_at(fadt, 140);
        let dsdt = table_at(&bytes, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        // NameOp "_S5_" PackageOp PkgLength(4) NumElements(1) BytePrefix 5.
        let s5 = [
            0x08,
            b'_',
            b'S',
            b'5',
            b'_',
            0x12,
            0x04,
            0x01,
            0x0a,
            S5_SLEEP_TYPE,
        ];
        assert_eq!(&dsdt[36..36 + s5.len()], s5);
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(
            has(b"COM1") && has(&[0x41, 0xd0, 0x05, 0x01]),
            "PNP0501 COM1"
        );
        assert!(
            has(b"PS2_") && has(&[0x41, 0xd0, 0x03, 0x03]),
            "PNP0303 keyboard"
        );
        // Extended interrupt descriptors: consumer, edge, active high, exclusive; IRQ 4, IRQ 1.
        assert!(
            has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]),
            "COM1 on IRQ 4"
        );
        assert!(
            has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x01, 0, 0, 0]),
            "keyboard on IRQ 1"
        );
    }

    #[test]
    fn dsdt_describes_the_vm_generation_id_and_the_event_device_that_notifies_it() {
        let (bytes, rsdp) = build(1, &[]).unwrap();
        let dsdt = table_at(&bytes, u64_at(fadt_of(&bytes, rsdp), 140));
        assert_eq!(sum(dsdt), 0);
        let body = &dsdt[36..];
        let find = |needle: &[u8]| body.windows(needle.len()).position(|w| w == needle);
        let string = |s: &str| [&[0x0d], s.as_bytes(), &[0]].concat();
        for name in ["VMGENCTR", "VM_GEN_COUNTER", "VM_Gen_Counter", "ACPI0013"] {
            assert!(find(&string(name)).is_some(), "{name}");
        }
        // NameOp _HID StringPrefix "VMGENCTR", inside Device(VGEN) (ExtOpPrefix DeviceOp).
        let vgen = find(b"VGEN").unwrap();
        assert_eq!(body[vgen - 5..vgen], *b"._SB_", "DualNamePrefix _SB_ VGEN");
        assert!(find(&[[0x08].as_slice(), b"_HID", &string("VMGENCTR")].concat()).is_some());
        // Method ADDR, no arguments: Return (Package (2) { DWordPrefix low, Zero }).
        let addr = find(b"ADDR").unwrap();
        assert_eq!(body[addr + 4], 0, "ADDR takes no arguments");
        let low = u32::try_from(VMGENID_START).unwrap().to_le_bytes();
        let ret = [
            0xa4, 0x12, 0x08, 0x02, 0x0c, low[0], low[1], low[2], low[3], 0x00,
        ];
        assert_eq!(body[addr + 5..addr + 5 + ret.len()], ret);
        // The GED's interrupt (extended descriptor, GSI 3) and its _EVT: If (Arg0 == 3)
        // Notify (\_SB_.VGEN, 0x80).
        assert!(find(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x03, 0, 0, 0]).is_some());
        let notify = [[0x86, b'\\', 0x2e].as_slice(), b"_SB_VGEN", &[0x0a, 0x80]].concat();
        assert!(find(&notify).is_some(), "Notify(\\_SB_.VGEN, 0x80)");
        assert!(find(&[0x93, 0x68, 0x0a, 0x03]).is_some(), "LEqual(Arg0, 3)");
    }

    #[test]
    fn tables_for_the_most_vcpus_fit() {
        assert!(build(crate::arch::x86_64::mptable::MAX_SUPPORTED_CPUS, &slots19()).is_ok());
    }
}
