//! The VM-wide state KVM holds, as plain data: the kvm-clock. (The I/O APIC is ember's own
//! device and saves itself; see `devices::legacy::ioapic`.)
//!
//! Restoring sets the clock to exactly the saved value, so guest monotonic time continues where
//! it stopped, without a jump for the time the VM was saved (KVM_CLOCK_REALTIME, which would
//! add the wall-clock time elapsed since, is not passed on).

use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE, kvm_clock_data};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Flags KVM_GET_CLOCK may report.
const KNOWN_CLOCK_FLAGS: u32 = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;

/// A VM save or restore that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The state is malformed.
    #[error("VM state refused: {0}")]
    Invalid(String),
}

/// The VM's own state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The kvm-clock (guest nanoseconds), as KVM_GET_CLOCK reports it.
    #[serde(with = "super::kvm_bytes")]
    pub clock: kvm_clock_data,
}

/// Reads the VM's state; every vCPU should be stopped.
pub fn save_vm(fd: &VmFd) -> Result<VmState, VmStateError> {
    let clock = fd
        .get_clock()
        .map_err(|e| VmStateError::Kvm("read the kvm-clock", e))?;
    Ok(VmState { clock })
}

/// Applies `state` to a fresh VM, before its vCPUs run.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    let unknown = state.clock.flags & !KNOWN_CLOCK_FLAGS;
    if unknown != 0 {
        return Err(VmStateError::Invalid(format!(
            "unknown kvm-clock flags {unknown:#x}"
        )));
    }
    if i64::try_from(state.clock.clock).is_err() {
        return Err(VmStateError::Invalid(format!(
            "a kvm-clock of {} ns",
            state.clock.clock
        )));
    }
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        // The saved value as is: no realtime catch-up, and TSC_STABLE/HOST_TSC are reports.
        flags: 0,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| VmStateError::Kvm("set the kvm-clock", e))
}
