//! Thin, safe wrappers over KVM state: the KVM handle, the VM, guest memory and vCPUs, and
//! their state as plain data for snapshots (`vcpu_state`, `vm_state`).

pub mod kvm;
mod kvm_bytes;
pub mod memory;
pub mod smaps;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
