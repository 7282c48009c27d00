//! The KVM VM: memory slots, the split irqchip and its interrupt routes, irqfds, vCPU creation.

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MEM_LOG_DIRTY_PAGES, KvmIrqRouting,
    kvm_enable_cap, kvm_irq_routing_entry, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::errno::Error as Errno;
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmContext;
use crate::arch::x86_64::layout::{IOAPIC_PINS, KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::devices::legacy::ioapic::{PinRoutes, RouteInstaller};
use crate::guest_memory::{DirtyPages, GuestMemoryMmap};

/// A KVM VM operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM.
    #[error("cannot create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// TSS or identity-map address.
    #[error("cannot set KVM's TSS and identity-map addresses")]
    SystemAddresses(#[source] kvm_ioctls::Error),
    /// KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP).
    #[error("cannot create the in-kernel local APICs (split irqchip)")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION.
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG.
    #[error("cannot read KVM's dirty-page log")]
    DirtyLog(#[source] kvm_ioctls::Error),
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

/// A KVM VM with its irqchip.
pub struct Vm {
    fd: Arc<VmFd>,
}

impl Vm {
    /// Creates the VM and sets the addresses of KVM's private pages (identity map, TSS).
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm().create_vm().map_err(VmError::Create)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmError::SystemAddresses)?;
        fd.set_tss_address(usize::try_from(KVM_TSS_START).unwrap_or(usize::MAX))
            .map_err(VmError::SystemAddresses)?;
        Ok(Vm { fd: Arc::new(fd) })
    }

    /// Creates the in-kernel local APICs, before any vCPU exists (as KVM requires), and leaves
    /// the I/O APIC to the VMM with GSIs 0-23 reserved for its pins (KVM's split irqchip). No
    /// 8259 PIC or PIT: kernels use the TSC-deadline timer and kvm-clock. KVM's full irqchip
    /// makes every later memslot change and the VM's teardown wait out SRCU grace periods
    /// (5-25 ms each on nested hosts); the split one does not.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(IOAPIC_PINS);
        self.fd.enable_cap(&cap).map_err(VmError::Irqchip)
    }

    /// The KVM VM itself (its clock, for a snapshot).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// What the I/O APIC installs its pins' routes through.
    pub fn route_installer(&self) -> KvmRoutes {
        KvmRoutes {
            fd: self.fd.clone(),
        }
    }

    /// Gives every region of `mem` to KVM, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        self.set_memory_slots(mem, 0)
    }

    /// Turns KVM's dirty log on or off for every slot (it records the pages the vCPUs and KVM
    /// itself write; ember's own writes are in the regions' bitmaps). Changing a slot's flags
    /// keeps its contents; turning the log on starts it empty.
    pub fn set_dirty_log(&self, mem: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
        self.set_memory_slots(mem, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// Takes (and clears) KVM's dirty log of every slot: the pages written since the last call
    /// or since the log was turned on.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<DirtyPages, VmError> {
        self.dirty_log().take(mem)
    }

    /// A handle that takes the dirty log from another thread (a migration's pre-copy).
    pub fn dirty_log(&self) -> DirtyLog {
        DirtyLog {
            fd: self.fd.clone(),
        }
    }

    fn set_memory_slots(&self, mem: &GuestMemoryMmap, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region describes a live mapping owned by `mem`, which the VMM keeps
            // alive (in `vmm::Running`, dropped after the VM fd) for as long as the VM exists,
            // and slots do not overlap.
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

/// Takes KVM's dirty log of a VM's slots from any thread.
#[derive(Clone)]
pub struct DirtyLog {
    fd: Arc<VmFd>,
}

impl DirtyLog {
    /// See [`Vm::take_dirty_log`].
    pub fn take(&self, mem: &GuestMemoryMmap) -> Result<DirtyPages, VmError> {
        let mut pages = DirtyPages::empty(mem);
        for (slot, (region, dirty)) in mem.iter().zip(&mut pages.regions).enumerate() {
            let len = usize::try_from(region.len())
                .map_err(|_| VmError::DirtyLog(Errno::new(libc::EOVERFLOW)))?;
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let bits = self
                .fd
                .get_dirty_log(slot, len)
                .map_err(VmError::DirtyLog)?;
            for (word, got) in dirty.bits.iter_mut().zip(bits) {
                *word = got;
            }
        }
        Ok(pages)
    }
}

/// Installs the I/O APIC's pin routes as KVM's GSI routing table: GSI N is pin N, as MSIs.
pub struct KvmRoutes {
    fd: Arc<VmFd>,
}

impl RouteInstaller for KvmRoutes {
    fn install(&mut self, routes: &PinRoutes) -> io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .zip(0u32..)
            .filter_map(|(route, gsi)| {
                let msi = route.as_ref()?;
                let mut entry = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi.address_lo = (msi.address & 0xffff_ffff) as u32;
                entry.u.msi.address_hi = (msi.address >> 32) as u32;
                entry.u.msi.data = msi.data;
                Some(entry)
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}
