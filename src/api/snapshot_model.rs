//! The bodies of `PUT /snapshot/create` and `PUT /snapshot/load`, strict as every body is.

use std::path::PathBuf;

use serde::Deserialize;

/// Which snapshot to take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot (the VM must track dirty pages).
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the state goes.
    pub snapshot_path: PathBuf,
    /// Where guest memory goes.
    pub mem_file_path: PathBuf,
    /// Firecracker's target format version: accepted only as absent.
    #[serde(default)]
    pub version: Option<String>,
}

/// Where a restored VM's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum BackendType {
    /// The memory file, mapped privately.
    File,
    /// A userfaultfd handler (refused: ember maps files only).
    Uffd,
}

/// `mem_backend` of a load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: BackendType,
    /// The memory file (or the handler's socket).
    pub backend_path: PathBuf,
}

/// One `network_overrides` entry: interface `iface_id` on another host TAP.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface's id in the snapshot.
    pub iface_id: String,
    /// The TAP it uses now.
    pub host_dev_name: String,
}

/// `vsock_override` of a load: the restored VM's vsock device on another host socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The socket the restored VM listens on (it must not exist).
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where memory comes from (or the older `mem_file_path`).
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older spelling of a File backend.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// Track dirty pages in the restored VM, for later Diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Interfaces that use other TAPs now.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock device on another socket (the snapshot's may be taken by the VM it came from).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

impl SnapshotLoad {
    /// Whether the restored VM tracks dirty pages (either spelling asks for it).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }

    /// The memory file, or why this load cannot be done.
    pub fn memory_file(&self) -> Result<PathBuf, String> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err("give mem_backend or mem_file_path, not both".into()),
            (Some(backend), None) => match backend.backend_type {
                BackendType::File => Ok(backend.backend_path.clone()),
                BackendType::Uffd => {
                    Err("the Uffd memory backend is not supported by ember: use File".into())
                }
            },
            (None, Some(path)) => Ok(path.clone()),
            (None, None) => Err("mem_backend is missing".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_parse_strictly_and_name_their_memory_file() {
        let load: SnapshotLoad = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#,
        )
        .unwrap();
        assert_eq!(load.memory_file().unwrap(), PathBuf::from("/m"));
        assert!(load.resume_vm);
        assert!(!load.tracks_dirty_pages());
        assert_eq!(load.vsock_override, None);
        let vsock: SnapshotLoad = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": {"uds_path": "/v"}}"#,
        )
        .unwrap();
        assert_eq!(vsock.vsock_override.unwrap().uds_path, PathBuf::from("/v"));
        assert!(
            serde_json::from_str::<SnapshotLoad>(
                r#"{"snapshot_path": "/s", "vsock_override": {"uds_path": "/v", "cid": 4}}"#
            )
            .is_err()
        );
        let older: SnapshotLoad = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert!(older.tracks_dirty_pages(), "Firecracker's older name");
        let uffd: SnapshotLoad = serde_json::from_str(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        )
        .unwrap();
        assert!(uffd.memory_file().unwrap_err().contains("Uffd"));
        assert!(
            serde_json::from_str::<SnapshotLoad>(r#"{"snapshot_path": "/s", "x": 1}"#).is_err()
        );
        let create: SnapshotCreate =
            serde_json::from_str(r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#).unwrap();
        assert_eq!(create.snapshot_type, SnapshotType::Full);
        assert!(
            serde_json::from_str::<SnapshotCreate>(
                r#"{"snapshot_type": "Partial", "snapshot_path": "/s", "mem_file_path": "/m"}"#
            )
            .is_err()
        );
    }
}
