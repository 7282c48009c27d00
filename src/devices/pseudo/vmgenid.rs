//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", as QEMU and Firecracker
//! offer it): 16 random bytes in guest memory that change whenever the VM may have been
//! duplicated, i.e. on every restore, so that each clone of a snapshot reseeds its random
//! number generator instead of repeating its siblings' numbers (Linux's `vmgenid` driver feeds
//! a new ID to `add_vmfork_randomness`).
//!
//! The guest finds the bytes through the DSDT's `VGEN` device (`ADDR`, `arch/x86_64/acpi.rs`)
//! and learns of a change from a notification: ember raises the interrupt of an ACPI generic
//! event device, whose `_EVT` method notifies `VGEN`. The bytes live in guest memory, so a
//! snapshot carries them; a restore writes new ones before any vCPU runs.

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::entropy;
use crate::guest_memory::GuestMemoryMmap;

/// Bytes of a generation ID.
pub const VMGENID_LEN: usize = 16;

/// A new generation ID cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// getrandom failed.
    #[error("cannot draw a VM generation ID from the host's random number generator")]
    Random(#[source] std::io::Error),
    /// Guest memory does not cover the ID's address.
    #[error("cannot write the VM generation ID into guest memory at {0:#x}")]
    Write(u64),
}

/// The generation ID at a fixed guest-physical address, and the interrupt that announces a
/// new one.
#[derive(Debug)]
pub struct VmGenId {
    addr: GuestAddress,
    id: [u8; VMGENID_LEN],
    irq: EventFd,
}

impl VmGenId {
    /// A device at `addr` with a fresh random ID (not yet written: see [`VmGenId::write`]),
    /// announcing changes on `irq`.
    pub fn new(addr: GuestAddress, irq: EventFd) -> Result<Self, VmGenIdError> {
        Ok(VmGenId {
            addr,
            id: entropy::bytes().map_err(VmGenIdError::Random)?,
            irq,
        })
    }

    /// The current ID.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.id
    }

    /// Writes the current ID into guest memory (a boot).
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), VmGenIdError> {
        mem.write_slice(&self.id, self.addr)
            .map_err(|_| VmGenIdError::Write(self.addr.0))
    }

    /// A restore: draws a new ID, writes it over the snapshot's and raises the interrupt, which
    /// the guest takes once its vCPUs run. An ID equal to the one in memory (2^-128) is drawn
    /// again, so the guest always sees a change.
    pub fn regenerate(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmGenIdError> {
        let mut old = [0u8; VMGENID_LEN];
        mem.read_slice(&mut old, self.addr)
            .map_err(|_| VmGenIdError::Write(self.addr.0))?;
        loop {
            self.id = entropy::bytes().map_err(VmGenIdError::Random)?;
            if self.id != old {
                break;
            }
        }
        self.write(mem)?;
        if let Err(e) = self.irq.write(1) {
            // The new ID is in place; a guest that misses the notification reads it later.
            log::warn!("cannot notify the guest of its new VM generation ID: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap) -> [u8; VMGENID_LEN] {
        let mut id = [0u8; VMGENID_LEN];
        mem.read_slice(&mut id, GuestAddress(0xef000)).unwrap();
        id
    }

    #[test]
    fn a_boot_writes_its_id_and_a_restore_writes_a_new_one_and_raises_the_interrupt() {
        let mem = mem();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = VmGenId::new(GuestAddress(0xef000), irq.try_clone().unwrap()).unwrap();
        dev.write(&mem).unwrap();
        let booted = read(&mem);
        assert_eq!(booted, dev.id());
        assert_ne!(booted, [0; VMGENID_LEN]);
        assert!(irq.read().is_err(), "a boot raises no interrupt");

        dev.regenerate(&mem).unwrap();
        assert_ne!(read(&mem), booted);
        assert_eq!(read(&mem), dev.id());
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn an_address_outside_guest_memory_is_an_error_not_a_panic() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = VmGenId::new(GuestAddress(2 << 20), irq).unwrap();
        assert!(matches!(dev.write(&mem()), Err(VmGenIdError::Write(_))));
        assert!(dev.regenerate(&mem()).is_err());
    }
}
