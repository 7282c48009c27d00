//! Saving a whole VM and applying saved state to a fresh VM of the same shape.
//!
//! Order, as crosvm and Firecracker have it: freeze first (the VM is paused: vCPUs parked,
//! the event loop parked, so nothing is in flight), devices before vCPUs, guest memory last.
//! A restore rebuilds the VM from the saved configuration through the same staged builder as a
//! boot (`builder::shape`), maps the memory file privately, then applies the VM's clock, every
//! vCPU and every device, each checking its state before changing anything.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::ioapic::IoApicState;
use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::mmio::MmioState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// Where a snapshot goes: its state file and its guest-memory file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The state (vCPUs, devices, configuration): `snapshot/` format.
    pub state: PathBuf,
    /// Guest memory: a raw image of every RAM region in order, zero pages as holes.
    pub memory: PathBuf,
}

impl SnapshotPaths {
    /// `vmstate` and `memory` in `dir` (the layout `ember run --restore DIR` reads).
    pub fn in_dir(dir: &Path) -> SnapshotPaths {
        SnapshotPaths {
            state: dir.join("vmstate"),
            memory: dir.join("memory"),
        }
    }
}

/// What a snapshot's memory file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryKind {
    /// Every page of guest memory (zero pages as holes): restorable.
    #[default]
    Full,
    /// Only the pages written since the previous snapshot (the rest holes): folded onto that
    /// snapshot's memory file (`vmm::fold`) before it restores.
    Diff,
}

impl MemoryKind {
    fn is_full(&self) -> bool {
        *self == MemoryKind::Full
    }
}

/// Everything a snapshot holds but guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The ember that wrote it (informational: compatibility is the format version).
    pub ember_version: String,
    /// The VM's shape: restore builds the same one.
    pub config: VmConfig,
    /// The VM (kvm-clock).
    pub vm: VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The I/O APIC.
    pub ioapic: IoApicState,
    /// Every virtio transport with its device, by device id, in slot order.
    pub virtio: Vec<(String, MmioState)>,
    /// Full or Diff. Left out of Full snapshots, so that they read as before this field was
    /// added (and older snapshots read as Full).
    #[serde(default, skip_serializing_if = "MemoryKind::is_full")]
    pub memory: MemoryKind,
    /// A Diff's bytes of data in its memory file (the pages it holds): a fold checks that the
    /// file's data ranges add up to it, so that a diff whose holes were lost (copied densely,
    /// or on a filesystem that rounds data to large blocks or drops zero pages) is refused
    /// rather than folded wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_bytes: Option<u64>,
}

/// A snapshot that cannot be taken or applied.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Snapshots are taken of paused VMs only (Firecracker's rule: nothing may move meanwhile).
    #[error("the VM must be paused before a snapshot")]
    NotPaused,
    /// The VM has ended.
    #[error("the VM is not running")]
    Ended,
    /// A Diff snapshot of a VM that does not record the pages written.
    #[error(
        "a Diff snapshot needs dirty page tracking: enable track_dirty_pages when the VM starts"
    )]
    NotTracking,
    /// A Diff snapshot's memory holds only some pages: it cannot be restored by itself.
    #[error(
        "this snapshot is a Diff (only the pages written since its base): fold it onto its base first (ember snapshot fold)"
    )]
    Unfolded,
    /// A vCPU thread could not save its vCPU (it has ended).
    #[error("vCPU {0} could not be saved")]
    VcpuGone(usize),
    /// A vCPU's state.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu_state::VcpuStateError),
    /// The VM's state.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm_state::VmStateError),
    /// KVM's dirty log.
    #[error(transparent)]
    DirtyLog(#[from] crate::vstate::vm::VmError),
    /// A device's state.
    #[error(transparent)]
    Device(#[from] crate::devices::StateError),
    /// The clone's new VM generation ID.
    #[error(transparent)]
    VmGenId(#[from] crate::devices::pseudo::vmgenid::VmGenIdError),
    /// The snapshot file.
    #[error(transparent)]
    Format(#[from] crate::snapshot::SnapshotError),
    /// The saved shape does not match the VM built from it.
    #[error("the snapshot does not match its configuration: {0}")]
    Shape(String),
    /// Reading or writing a file.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads and checks a state file.
pub fn read_snapshot(path: &Path) -> Result<VmSnapshot, PersistError> {
    use std::io::Read;
    let file_error = |source| PersistError::File {
        what: "cannot read the snapshot",
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(file_error)?;
    // Bounded: a hostile length is refused by `decode`, not allocated.
    let limit = crate::snapshot::MAX_PAYLOAD + 64;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(file_error)?;
    Ok(crate::snapshot::decode(&bytes)?)
}

/// Writes `snapshot` to `path` (replacing it), durably.
pub fn write_snapshot(snapshot: &VmSnapshot, path: &Path) -> Result<(), PersistError> {
    use std::io::Write;
    let bytes = crate::snapshot::encode(snapshot)?;
    let file_error = |source| PersistError::File {
        what: "cannot write the snapshot",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(file_error)?;
    file.write_all(&bytes).map_err(file_error)?;
    file.sync_data().map_err(file_error)
}

/// Opens (creating or truncating) the memory file for writing.
pub fn create_memory_file(path: &Path) -> Result<std::fs::File, PersistError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| PersistError::File {
            what: "cannot create the memory file",
            path: path.to_owned(),
            source,
        })
}

/// Opens a memory file to restore from.
pub fn open_memory_file(path: &Path) -> Result<std::fs::File, PersistError> {
    std::fs::File::open(path).map_err(|source| PersistError::File {
        what: "cannot open the memory file",
        path: path.to_owned(),
        source,
    })
}
