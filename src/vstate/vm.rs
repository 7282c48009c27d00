//! The KVM VM: memory slots, the in-kernel irqchip and PIT, irqfds, vCPU creation.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmContext;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

/// A KVM VM operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM.
    #[error("cannot create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// TSS or identity-map address.
    #[error("cannot set KVM's TSS and identity-map addresses")]
    SystemAddresses(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP.
    #[error("cannot create the in-kernel irqchip")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2.
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION.
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD.
    #[error("cannot register an irqfd for GSI {gsi}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD.
    #[error("cannot register an ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// The MMIO address.
        addr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_CREATE_VCPU.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its irqchip and PIT.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and sets the addresses of KVM's private pages (identity map, TSS).
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm().create_vm().map_err(VmError::Create)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmError::SystemAddresses)?;
        fd.set_tss_address(usize::try_from(KVM_TSS_START).unwrap_or(usize::MAX))
            .map_err(VmError::SystemAddresses)?;
        Ok(Vm { fd })
    }

    /// Creates the in-kernel LAPICs/IOAPIC/PIC and the PIT, before any vCPU exists (as KVM
    /// requires) and after [`Vm::register_memory`]: once the irqchip exists, every memslot
    /// change waits for KVM's interrupt-routing readers, which costs 5-10 ms per change on
    /// nested (PVM) hosts against 0.1 ms before it.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        // The dummy speaker makes port 0x61 work, which Linux reads to calibrate the TSC.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }

    /// Gives every region of `mem` to KVM, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region describes a live mapping owned by `mem`, which the VMM keeps
            // alive (through `Vmm`) for as long as the VM exists, and slots do not overlap.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
        }
        Ok(())
    }

    /// Routes `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `value` to MMIO address `addr` signal `evt` inside KVM,
    /// without an exit to the VMM.
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// Creates vCPU `index` (its APIC ID is the same number).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VmError::CreateVcpu { index, source })
    }
}
