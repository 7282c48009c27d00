//! [`ManagedVm`] for [`VmHandle`]: where the VMM plugs in.

use std::path::Path;

use super::ManagedVm;
use crate::VmHandle;

impl ManagedVm for VmHandle {
    fn pause(&mut self) -> Result<(), String> {
        VmHandle::pause(self).map_err(|e| e.to_string())
    }

    fn resume(&mut self) -> Result<(), String> {
        VmHandle::resume(self).map_err(|e| e.to_string())
    }

    fn is_paused(&self) -> bool {
        VmHandle::is_paused(self)
    }

    fn metrics(&self) -> serde_json::Value {
        VmHandle::metrics(self).to_json()
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        VmHandle::flush_metrics(self).map_err(|e| format!("cannot write the metrics file: {e}"))
    }

    fn send_ctrl_alt_del(&mut self) -> Result<(), String> {
        VmHandle::send_ctrl_alt_del(self).map_err(|e| e.to_string())
    }

    fn update_drive(&mut self, drive_id: &str, path_on_host: &Path) -> Result<(), String> {
        VmHandle::update_drive(self, drive_id, path_on_host)
    }

    fn update_rate_limiter(
        &mut self,
        id: &str,
        kind: super::RateLimited,
        limiter: &crate::config::RateLimiterConfig,
    ) -> Result<(), String> {
        use crate::devices::virtio::LimiterKind;
        let kind = match kind {
            super::RateLimited::Disk => LimiterKind::Disk,
            super::RateLimited::Rx => LimiterKind::Rx,
            super::RateLimited::Tx => LimiterKind::Tx,
        };
        VmHandle::update_rate_limiter(self, id, kind, limiter)
    }

    fn snapshot(
        &mut self,
        config: &crate::VmConfig,
        state: &Path,
        memory: &Path,
        kind: crate::vmm::persist::MemoryKind,
    ) -> Result<(), String> {
        let paths = crate::vmm::persist::SnapshotPaths {
            state: state.to_owned(),
            memory: memory.to_owned(),
        };
        VmHandle::snapshot_of(self, config, &paths, kind).map_err(|e| crate::error_chain(&e))
    }

    fn start_migration(
        &mut self,
        config: &crate::VmConfig,
        params: crate::migration::SendParams,
    ) -> Result<(), String> {
        VmHandle::start_migration(self, config, params).map_err(|e| crate::error_chain(&e))
    }

    fn is_migrating(&self) -> bool {
        VmHandle::is_migrating(self)
    }

    fn migration_status(&self) -> crate::migration::MigrationStatus {
        VmHandle::migration_status(self)
    }

    fn migration_fd(&self) -> Option<std::os::fd::RawFd> {
        VmHandle::migration_fd(self)
    }

    fn advance_migration(&mut self, config: &crate::VmConfig) -> Result<(), String> {
        VmHandle::advance_migration(self, config).map_err(|e| crate::error_chain(&e))
    }
}
