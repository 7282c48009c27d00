//! Snapshots of a running VM and restores from them (the state types are in `persist.rs`).

use super::{RestoreError, Running, VmHandle, builder, devices, persist};
use crate::vstate;

impl VmHandle {
    /// Snapshots a paused VM: its state (vCPUs, devices, configuration) to `paths.state` and
    /// all of guest memory to `paths.memory` (a Full snapshot; see [`VmHandle::snapshot_of`]).
    /// Devices first (receive buffers held back go back to the guest's ring), then every vCPU
    /// (each saved by its own parked thread), then memory. The disks are not copied: the
    /// snapshot names their paths. `config` is the configuration the VM was built from (its
    /// shape, which a restore rebuilds).
    pub fn snapshot(
        &mut self,
        config: &crate::VmConfig,
        paths: &persist::SnapshotPaths,
    ) -> Result<(), persist::PersistError> {
        self.snapshot_of(config, paths, persist::MemoryKind::Full)
    }

    /// Snapshots a paused VM as [`VmHandle::snapshot`] does, its memory file Full or Diff: a
    /// Diff holds only the pages written since the last snapshot of either kind (or since
    /// tracking started), the rest holes, and needs `VmConfig::track_dirty_pages`. Either
    /// kind starts a new record of written pages once it is written.
    pub fn snapshot_of(
        &mut self,
        config: &crate::VmConfig,
        paths: &persist::SnapshotPaths,
        kind: persist::MemoryKind,
    ) -> Result<(), persist::PersistError> {
        use persist::{MemoryKind, PersistError};
        let running = self.live().map_err(|_| PersistError::Ended)?;
        if !self.paused {
            return Err(PersistError::NotPaused);
        }
        if kind == MemoryKind::Diff && !running.tracking {
            return Err(PersistError::NotTracking);
        }
        let mut snapshot = Self::save_state(running, config)?;
        snapshot.memory = kind;
        let dirty = Self::take_dirty(running)?;
        let written = Self::write_snapshot_files(running, &mut snapshot, paths, dirty.as_ref());
        if written.is_err() {
            // Nothing was saved: the pages stay owed to the next snapshot.
            if let Some(running) = self.running.as_mut() {
                running.untaken = dirty;
            }
        } else if let Some(running) = self.running.as_mut() {
            running.untaken = None;
        }
        written
    }

    /// The pages written since the last snapshot (KVM's log, ember's own writes, and what a
    /// failed snapshot left), taken: the records start again empty. `None` without tracking
    /// (ember's own-write record is cleared all the same).
    fn take_dirty(
        running: &Running,
    ) -> Result<Option<crate::guest_memory::DirtyPages>, persist::PersistError> {
        use crate::guest_memory::DirtyPages;
        if !running.tracking {
            DirtyPages::clear_vmm_writes(&running.memory);
            return Ok(None);
        }
        let mut dirty = running.vm.take_dirty_log(&running.memory)?;
        dirty.merge(&DirtyPages::take_vmm_writes(&running.memory));
        if let Some(untaken) = &running.untaken {
            dirty.merge(untaken);
        }
        Ok(Some(dirty))
    }

    fn write_snapshot_files(
        running: &Running,
        snapshot: &mut persist::VmSnapshot,
        paths: &persist::SnapshotPaths,
        dirty: Option<&crate::guest_memory::DirtyPages>,
    ) -> Result<(), persist::PersistError> {
        use persist::{MemoryKind, PersistError};
        let memory = persist::create_memory_file(&paths.memory)?;
        let memory_error = |source| PersistError::File {
            what: "cannot write the memory file",
            path: paths.memory.clone(),
            source,
        };
        match (snapshot.memory, dirty) {
            (MemoryKind::Diff, Some(dirty)) => {
                let written =
                    vstate::memory::write_dirty_pages_file(&running.memory, dirty, &memory)
                        .map_err(memory_error)?;
                snapshot.diff_bytes = Some(written);
            }
            (MemoryKind::Diff, None) => return Err(PersistError::NotTracking),
            (MemoryKind::Full, _) => {
                vstate::memory::write_guest_memory_file(&running.memory, &memory)
                    .map_err(memory_error)?;
            }
        }
        memory.sync_data().map_err(memory_error)?;
        persist::write_snapshot(snapshot, &paths.state)
    }

    /// Everything of a paused VM but its memory (a snapshot's state file, a migration's last
    /// message). Devices first (receive buffers held back go back to the guest's ring), then
    /// every vCPU, each saved by its own parked thread, then the VM's clock.
    pub(super) fn save_state(
        running: &Running,
        config: &crate::VmConfig,
    ) -> Result<persist::VmSnapshot, persist::PersistError> {
        use persist::PersistError;
        let devices = &running.devices;
        let mut virtio = Vec::with_capacity(devices.virtio.len());
        for entry in &devices.virtio {
            let mut transport = entry.lock();
            transport.prepare_save();
            virtio.push((entry.id.clone(), transport.save()));
        }
        let ioapic = devices::lock(&devices.ioapic).save();
        let serial = devices::lock(&devices.serial).save();
        let i8042 = devices::lock(&devices.i8042).save();
        let msrs = vstate::vcpu_state::msrs_to_save(running.kvm.kvm())?;
        let mut vcpus = Vec::with_capacity(running.vcpu_threads.len());
        for index in 0..running.vcpu_threads.len() {
            let msrs = msrs.clone();
            let state = running
                .control
                .run_parked(index, move |vcpu| {
                    vstate::vcpu_state::save_vcpu(vcpu.fd(), &msrs)
                })
                .ok_or(PersistError::VcpuGone(index))??;
            vcpus.push(state);
        }
        let vm = vstate::vm_state::save_vm(running.vm.fd())?;
        let snapshot = persist::VmSnapshot {
            ember_version: env!("CARGO_PKG_VERSION").to_owned(),
            config: config.clone(),
            vm,
            vcpus,
            serial,
            i8042,
            ioapic,
            virtio,
            memory: persist::MemoryKind::Full,
            diff_bytes: None,
        };
        Ok(snapshot)
    }

    /// Restores a VM from a snapshot in this process: the saved shape rebuilt (with
    /// `adjust` applied to its configuration first: the console, TAP names, dirty page
    /// tracking, which starts off; an `Err` from it refuses the restore), guest memory mapped
    /// privately from the memory file, the saved state applied. It stays paused unless
    /// `resume`. A Diff snapshot is refused: it must be folded onto its base first.
    pub fn restore(
        paths: &persist::SnapshotPaths,
        adjust: impl FnOnce(&mut crate::VmConfig) -> Result<(), String>,
        resume: bool,
    ) -> Result<(VmHandle, crate::VmConfig), RestoreError> {
        let snapshot = persist::read_snapshot(&paths.state)?;
        if snapshot.memory == persist::MemoryKind::Diff {
            return Err(persist::PersistError::Unfolded.into());
        }
        let mut config = snapshot.config.clone();
        // The file is untrusted: it does not choose this process's console, files or filters.
        config.reset_host_settings();
        // Tracking is the restoring side's choice (Firecracker's load option), not the saved one.
        config.track_dirty_pages = false;
        adjust(&mut config).map_err(RestoreError::Refused)?;
        let memory = persist::open_memory_file(&paths.memory)?;
        let mut shaped = builder::shape(&config, builder::GuestRam::File(&memory))?;
        builder::restore(&mut shaped, &snapshot, builder::Identity::Renew)?;
        let handle = builder::run(shaped, &config, !resume)?;
        Ok((handle, config))
    }
}
