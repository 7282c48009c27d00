//! `/dev/kvm`: opening it with an error a user can act on, the capabilities ember relies on, and
//! what the host supports (CPUID, vCPU count).

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::arch::x86_64::mptable::MAX_SUPPORTED_CPUS;

/// The KVM API version every Linux since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Capabilities ember cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::SplitIrqchip, "split irqchip"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::ImmediateExit, "immediate exit"),
];

/// Starts `KVM_GET_SUPPORTED_CPUID` on a thread of its own, with its own handle on the device;
/// `None` if that cannot be (the caller asks itself). The thread sees no guest input.
fn spawn_cpuid_query(kvm: &Kvm) -> Option<JoinHandle<Result<CpuId, kvm_ioctls::Error>>> {
    // SAFETY: dup of a descriptor we own; the result is checked before use.
    let fd = unsafe { libc::fcntl(kvm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh duplicate of /dev/kvm's descriptor, owned by the new handle alone.
    let own = unsafe { Kvm::from_raw_fd(fd) };
    std::thread::Builder::new()
        .name("ember-cpuid".into())
        .stack_size(64 << 10)
        .spawn(move || own.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))
        .ok()
}

/// KVM missing or unusable.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is missing.
    #[error("{} does not exist: KVM is not available (load kvm_intel or kvm_amd, and enable virtualization in the firmware)", .path.display())]
    Missing {
        /// The device path.
        path: PathBuf,
    },
    /// No permission on the device node.
    #[error("no permission to open {}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root", .path.display())]
    Permission {
        /// The device path.
        path: PathBuf,
    },
    /// Any other failure to open it.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The device path.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An unexpected API version.
    #[error("KVM API version {0} is not supported (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability ember needs.
    #[error("this host's KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID that KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// An open, checked `/dev/kvm`.
pub struct KvmContext {
    kvm: Kvm,
    /// `KVM_GET_SUPPORTED_CPUID`, asked on thread `ember-cpuid` while the VM is shaped: it costs
    /// ~0.5 ms on PVM (every host CPUID traps), as much as the rest of the VM's creation.
    cpuid_query: Mutex<Option<JoinHandle<Result<CpuId, kvm_ioctls::Error>>>>,
    supported_cpuid: OnceLock<Result<CpuId, kvm_ioctls::Error>>,
    max_vcpus: u8,
}

impl KvmContext {
    /// Opens and checks the KVM device at `path` (normally `/dev/kvm`).
    pub fn open(path: &Path) -> Result<Self, KvmError> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            KvmError::Missing {
                path: path.to_owned(),
            }
        })?;
        let kvm = Kvm::new_with_path(c_path).map_err(|e| match e.errno() {
            libc::ENOENT => KvmError::Missing {
                path: path.to_owned(),
            },
            libc::EACCES | libc::EPERM => KvmError::Permission {
                path: path.to_owned(),
            },
            _ => KvmError::Open {
                path: path.to_owned(),
                source: e,
            },
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(KvmError::ApiVersion(version));
        }
        if let Some((_, name)) = REQUIRED_CAPS
            .iter()
            .find(|(cap, _)| !kvm.check_extension(*cap))
        {
            return Err(KvmError::MissingCapability(name));
        }
        let supported_cpuid = OnceLock::new();
        let cpuid_query = match spawn_cpuid_query(&kvm) {
            Some(query) => Some(query),
            None => {
                let _ = supported_cpuid.set(kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES));
                None
            }
        };
        let max_vcpus = u8::try_from(kvm.get_max_vcpus())
            .unwrap_or(u8::MAX)
            .min(MAX_SUPPORTED_CPUS);
        Ok(KvmContext {
            kvm,
            cpuid_query: Mutex::new(cpuid_query),
            supported_cpuid,
            max_vcpus,
        })
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// CPUID entries the host supports, before per-vCPU normalisation (waits for the query).
    pub fn supported_cpuid(&self) -> Result<&CpuId, KvmError> {
        let answer = self.supported_cpuid.get_or_init(|| {
            let query = self
                .cpuid_query
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match query.map(JoinHandle::join) {
                Some(Ok(answer)) => answer,
                // The thread could not answer (it panicked): ask here.
                Some(Err(_)) | None => self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
            }
        });
        answer.as_ref().map_err(|e| KvmError::SupportedCpuid(*e))
    }

    /// The most vCPUs a VM may have on this host.
    pub fn max_vcpus(&self) -> u8 {
        self.max_vcpus
    }
}
