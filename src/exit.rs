//! Why a VM stopped: the one value an embedder or the CLI acts on.

use std::fmt;

/// The reason a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line, or a KVM reset event).
    Reset,
    /// The guest powered off (a KVM shutdown event).
    PowerOff,
    /// The VMM was asked to stop (`VmHandle::stop`, or a signal to the CLI).
    Stopped,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Its instruction pointer, when it could be read.
        rip: Option<u64>,
    },
    /// KVM could not emulate or run guest code (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// KVM's sub-error code (1 = emulation failure).
        suberror: u32,
        /// Its instruction pointer, when it could be read.
        rip: Option<u64>,
    },
    /// The hardware refused to enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// The hardware's reason code.
        reason: u64,
    },
    /// The guest reported a crash (a KVM crash event).
    GuestCrash {
        /// The vCPU.
        vcpu: u8,
    },
    /// The VMM failed while the guest ran (a KVM ioctl on a vCPU, say).
    VmmError(String),
    /// The VM moved to another ember (a live migration completed: it runs there now).
    Migrated,
}

impl ExitReason {
    /// True when the guest ended as it meant to, or was stopped on request.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped | ExitReason::Migrated
        )
    }

    /// The guest instruction pointer involved, if any.
    pub fn rip(&self) -> Option<u64> {
        match self {
            ExitReason::TripleFault { rip, .. } | ExitReason::InternalError { rip, .. } => *rip,
            _ => None,
        }
    }
}

/// Where the kernel's sysfs shows the PVM flavour of KVM (guest kernel code emulated by the host).
pub const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// True on a PVM host. Read it before seccomp filters apply: they refuse the lookup.
pub fn host_is_pvm() -> bool {
    std::path::Path::new(PVM_MODULE).exists()
}

impl ExitReason {
    /// What to do about this end, when ember knows (`pvm_host`: [`host_is_pvm`]).
    pub fn advice(&self, pvm_host: bool) -> Option<&'static str> {
        match self {
            // PVM emulates the guest kernel and cannot run everything a stock build does
            // (resources/README.md lists what; the pvm build avoids it).
            ExitReason::InternalError { suberror: 1, .. } if pvm_host => Some(
                "this host runs KVM through PVM, which cannot emulate every instruction of a \
                 stock kernel: boot the pvm build (resources/build-kernel.sh pvm, with \
                 resources/cmdline-pvm.txt)",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest reset the machine"),
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::Stopped => write!(f, "the VM was stopped"),
            ExitReason::Migrated => write!(f, "the VM migrated: it runs on the destination now"),
            ExitReason::TripleFault { vcpu, .. } => {
                write!(f, "the guest triple-faulted on vCPU {vcpu}")
            }
            ExitReason::InternalError {
                vcpu, suberror: 1, ..
            } => write!(
                f,
                "KVM could not emulate a guest instruction on vCPU {vcpu} (internal error 1)"
            ),
            ExitReason::InternalError { vcpu, suberror, .. } => {
                write!(f, "KVM internal error {suberror} on vCPU {vcpu}")
            }
            ExitReason::FailEntry { vcpu, reason } => write!(
                f,
                "KVM could not enter the guest on vCPU {vcpu} (hardware reason {reason:#x})"
            ),
            ExitReason::GuestCrash { vcpu } => {
                write!(f, "the guest reported a crash on vCPU {vcpu}")
            }
            ExitReason::VmmError(message) => write!(f, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulation_failure_on_a_pvm_host_names_the_pvm_build() {
        let failure = ExitReason::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: None,
        };
        assert!(
            failure
                .advice(true)
                .unwrap()
                .contains("build-kernel.sh pvm")
        );
        assert_eq!(failure.advice(false), None);
        let other = ExitReason::InternalError {
            vcpu: 0,
            suberror: 2,
            rip: None,
        };
        assert_eq!(other.advice(true), None);
        assert_eq!(ExitReason::Reset.advice(true), None);
    }
}
