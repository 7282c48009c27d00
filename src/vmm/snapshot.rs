//! Snapshots of a running VM and restores from them (the state types are in `persist.rs`).

use super::{RestoreError, Running, VmHandle, builder, devices, persist};
use crate::vstate;

impl VmHandle {
    /// Snapshots a paused VM: its state (vCPUs, devices, configuration) to `paths.state` and
    /// guest memory to `paths.memory`. Devices first (receive buffers held back go back to the
    /// guest's ring), then every vCPU (each saved by its own parked thread), then memory. The
    /// disks are not copied: the snapshot names their paths. `config` is the configuration the
    /// VM was built from (its shape, which a restore rebuilds).
    pub fn snapshot(
        &mut self,
        config: &crate::VmConfig,
        paths: &persist::SnapshotPaths,
    ) -> Result<(), persist::PersistError> {
        use persist::PersistError;
        let running = self.live().map_err(|_| PersistError::Ended)?;
        if !self.paused {
            return Err(PersistError::NotPaused);
        }
        let snapshot = Self::save_state(running, config)?;
        let memory = persist::create_memory_file(&paths.memory)?;
        let memory_error = |source| PersistError::File {
            what: "cannot write the memory file",
            path: paths.memory.clone(),
            source,
        };
        vstate::memory::write_guest_memory_file(&running.memory, &memory).map_err(memory_error)?;
        memory.sync_data().map_err(memory_error)?;
        persist::write_snapshot(&snapshot, &paths.state)
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
        };
        Ok(snapshot)
    }

    /// Restores a VM from a snapshot in this process: the saved shape rebuilt (with
    /// `adjust` applied to its configuration first: the console, TAP names; an `Err` from it
    /// refuses the restore), guest memory mapped privately from the memory file, the saved
    /// state applied. It stays paused unless `resume`.
    pub fn restore(
        paths: &persist::SnapshotPaths,
        adjust: impl FnOnce(&mut crate::VmConfig) -> Result<(), String>,
        resume: bool,
    ) -> Result<(VmHandle, crate::VmConfig), RestoreError> {
        let snapshot = persist::read_snapshot(&paths.state)?;
        let mut config = snapshot.config.clone();
        adjust(&mut config).map_err(RestoreError::Refused)?;
        let memory = persist::open_memory_file(&paths.memory)?;
        let mut shaped = builder::shape(&config, builder::GuestRam::File(&memory))?;
        builder::restore(&mut shaped, &snapshot)?;
        let handle = builder::run(shaped, &config, !resume)?;
        Ok((handle, config))
    }
}
