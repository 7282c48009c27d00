//! Thin, safe wrappers over KVM state: the KVM handle, the VM, guest memory and vCPUs.

pub mod kvm;
pub mod memory;
pub mod smaps;
pub mod vcpu;
pub mod vm;
