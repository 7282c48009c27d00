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
}

impl ExitReason {
    /// True when the guest ended as it meant to, or was stopped on request.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped
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

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest reset the machine"),
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::Stopped => write!(f, "the VM was stopped"),
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
