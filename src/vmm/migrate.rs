//! Live migration of this VM to another ember: [`VmHandle::start_migration`] connects and
//! starts pre-copy while the VM runs; [`VmHandle::advance_migration`], once its descriptor is
//! readable, pauses the VM and hands it over. The protocol and both ends are in `migration/`.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use super::VmHandle;
use crate::exit::ExitReason;
use crate::guest_memory::DirtyPages;
use crate::migration::{
    MigrationError, MigrationState, MigrationStatus, SendParams, SharedStatus, source,
};
use crate::sandbox::ThreadKind;
use crate::sandbox::seccomp::ThreadFilter;

impl VmHandle {
    /// Starts migrating the VM (built from `config`) to `params.url`: connects, has the
    /// destination check that it can hold the VM (a refusal is returned here, before anything
    /// stops), then copies memory on thread `ember-migrate` while the VM runs. When
    /// [`VmHandle::migration_fd`] becomes readable, call [`VmHandle::advance_migration`].
    pub fn start_migration(
        &mut self,
        config: &crate::VmConfig,
        params: SendParams,
    ) -> Result<(), MigrationError> {
        if self.migration.is_some() {
            return Err(MigrationError::InProgress);
        }
        let memory_fd = {
            let running = self.live().map_err(|_| MigrationError::Ended)?;
            crate::vstate::memory::memory_fd(&running.memory).map(|f| f.as_raw_fd())
        };
        if config.vsock.is_some() {
            return Err(MigrationError::Unsupported(
                "a VM with a vsock device cannot migrate yet".into(),
            ));
        }
        if !params.url.is_unix() && params.token.is_empty() {
            return Err(MigrationError::TokenRequired);
        }
        let local = params.local && params.url.is_unix() && memory_fd.is_some();
        if params.local && !local {
            log::info!(
                "migration: guest memory is not shared (start the VM with shared memory) or the \
                 destination is not a Unix socket: copying it"
            );
        }
        let status = SharedStatus::default();
        status.update(|s| {
            s.state = MigrationState::PreCopy;
            s.url = Some(params.url.to_string());
            s.local = local;
        });
        self.migration_status = status.clone();
        let fail = |status: &SharedStatus, e: MigrationError| {
            status.update(|s| {
                s.state = MigrationState::Failed;
                s.error = Some(crate::error_chain(&e));
            });
            e
        };
        let channel = source::connect(&params, config, memory_fd.filter(|_| local))
            .map_err(|e| fail(&status, e))?;
        let running = self.live().map_err(|_| MigrationError::Ended)?;
        let log = if local {
            None
        } else {
            running
                .vm
                .set_dirty_log(&running.memory, true)
                .map_err(|e| fail(&status, e.into()))?;
            DirtyPages::clear_vmm_writes(&running.memory);
            Some(running.vm.dirty_log())
        };
        let filter = config
            .seccomp
            .then(|| ThreadFilter::new(ThreadKind::Migrate, None))
            .transpose()
            .map_err(|e| fail(&status, MigrationError::Unsupported(e.to_string())))?;
        let outgoing = source::start_precopy(
            channel,
            running.memory.clone(),
            log,
            params,
            status.clone(),
            filter,
        )
        .map_err(|e| fail(&status, MigrationError::Unsupported(e.to_string())));
        match outgoing {
            Ok(outgoing) => {
                self.migration = Some(outgoing);
                Ok(())
            }
            Err(e) => {
                let _ = running.vm.set_dirty_log(&running.memory, false);
                Err(e)
            }
        }
    }

    /// Readable when the migration under way needs [`VmHandle::advance_migration`].
    pub fn migration_fd(&self) -> Option<RawFd> {
        self.migration.as_ref().map(|m| m.done.as_raw_fd())
    }

    /// True while a migration is under way (pause, resume and snapshots wait for its end).
    pub fn is_migrating(&self) -> bool {
        self.migration.is_some()
    }

    /// The last migration's progress (`GET /migration`).
    pub fn migration_status(&self) -> MigrationStatus {
        self.migration_status.get()
    }

    /// Completes the migration once pre-copy is done: pauses the VM, hands its disks over,
    /// sends the last pages and the state, and lets the destination run it; the VM then ends
    /// here with [`ExitReason::Migrated`]. If anything fails before the destination was told to
    /// run the VM, the VM runs on here as it did (and the error says why).
    pub fn advance_migration(&mut self, config: &crate::VmConfig) -> Result<(), MigrationError> {
        let Some(mut outgoing) = self.migration.take() else {
            return Ok(());
        };
        let _ = outgoing.done.read();
        let status = outgoing.status.clone();
        let precopied = match outgoing.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(precopied))) => precopied,
            Some(Ok(Err(e))) => return Err(self.migration_failed(&outgoing, e, false)),
            _ => {
                let e = MigrationError::Unsupported("the migration thread failed".into());
                return Err(self.migration_failed(&outgoing, e, false));
            }
        };
        let was_paused = self.paused;
        let paused_at = Instant::now();
        if self.pause().is_err() {
            return Err(self.migration_failed(&outgoing, MigrationError::Ended, was_paused));
        }
        match self.hand_over(config, &outgoing, precopied) {
            Ok(()) => {
                let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
                log::info!("migration completed: {downtime:.1} ms of downtime");
                status.update(|s| {
                    s.state = MigrationState::Completed;
                    s.downtime_ms = Some(downtime);
                    s.total_ms = Some(outgoing.started.elapsed().as_secs_f64() * 1e3);
                });
                self.report_migrated();
                Ok(())
            }
            Err((e, true)) => {
                // Told to run: the VM is the destination's, whatever it says now.
                log::warn!("migration: {}", crate::error_chain(&e));
                status.update(|s| {
                    s.state = MigrationState::Completed;
                    s.error = Some(crate::error_chain(&e));
                });
                self.report_migrated();
                Err(e)
            }
            Err((e, false)) => Err(self.migration_failed(&outgoing, e, was_paused)),
        }
    }

    /// Migrates the VM and waits for the end: [`VmHandle::start_migration`], then
    /// [`VmHandle::advance_migration`] when pre-copy is done. On success the VM has ended here
    /// ([`VmHandle::wait`] returns [`ExitReason::Migrated`]).
    pub fn migrate(
        &mut self,
        config: &crate::VmConfig,
        params: SendParams,
    ) -> Result<MigrationStatus, MigrationError> {
        self.start_migration(config, params)?;
        if let Some(fd) = self.migration_fd() {
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on a descriptor that lives through the call.
            while unsafe { libc::poll(&raw mut poll, 1, -1) } < 0 {}
        }
        self.advance_migration(config)?;
        Ok(self.migration_status())
    }

    /// The stop: disks released, state saved, the last pages and the state sent, the VM
    /// handed over. `Err((e, committed))` as [`source::stop_and_copy`].
    fn hand_over(
        &mut self,
        config: &crate::VmConfig,
        outgoing: &source::Outgoing,
        precopied: source::Precopied,
    ) -> Result<(), (MigrationError, bool)> {
        let before = |e: MigrationError| (e, false);
        let running = self.live().map_err(|_| before(MigrationError::Ended))?;
        for entry in running.devices.virtio.iter().filter(|e| e.disk.is_some()) {
            entry.lock().release_backend().map_err(|source| {
                before(MigrationError::Disk {
                    id: entry.id.clone(),
                    source,
                })
            })?;
        }
        let state = Self::save_state(running, config).map_err(|e| before(e.into()))?;
        let state = crate::snapshot::encode(&state)
            .map_err(|e| before(crate::vmm::persist::PersistError::from(e).into()))?;
        // After the save: returning held receive buffers writes the used rings.
        let mut pages = precopied.pending;
        if let Some(log) = &outgoing.log {
            pages.merge(&log.take(&running.memory).map_err(|e| before(e.into()))?);
            pages.merge(&DirtyPages::take_vmm_writes(&running.memory));
        }
        let mut channel = precopied.channel;
        source::stop_and_copy(
            &mut channel,
            &running.memory,
            &pages,
            &state,
            &outgoing.status,
        )
    }

    /// A migration that did not happen: disks taken back, dirty log off, the VM running again
    /// unless it was paused before; the status says why.
    fn migration_failed(
        &mut self,
        outgoing: &source::Outgoing,
        e: MigrationError,
        was_paused: bool,
    ) -> MigrationError {
        outgoing.connection.shutdown();
        if let Some(running) = self.running.as_mut() {
            for entry in running.devices.virtio.iter().filter(|e| e.disk.is_some()) {
                if let Err(why) = reclaim_disk(&mut entry.lock()) {
                    log::warn!("migration: cannot lock disk {} again: {why}", entry.id);
                }
            }
            if outgoing.log.is_some() {
                if running.tracking {
                    // Pre-copy took the pages a Diff snapshot would need: the next one holds all.
                    running.untaken = Some(DirtyPages::all(&running.memory));
                } else {
                    let _ = running.vm.set_dirty_log(&running.memory, false);
                }
            }
        }
        if !was_paused {
            let _ = self.resume();
        }
        log::warn!("migration failed: {}", crate::error_chain(&e));
        outgoing.status.update(|s| {
            s.state = MigrationState::Failed;
            s.error = Some(crate::error_chain(&e));
            s.total_ms = Some(outgoing.started.elapsed().as_secs_f64() * 1e3);
        });
        e
    }

    fn report_migrated(&self) {
        if let Some(running) = &self.running {
            running.exit.report(ExitReason::Migrated);
        }
    }

    /// Ends a migration still in pre-copy (the VM is stopping): its thread is cut off and joined.
    pub(super) fn abandon_migration(&mut self) {
        if let Some(mut outgoing) = self.migration.take() {
            outgoing
                .cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            outgoing.connection.shutdown();
            if let Some(thread) = outgoing.thread.take() {
                let _ = thread.join();
            }
            outgoing.status.update(|s| {
                s.state = MigrationState::Failed;
                s.error = Some("the VM stopped".into());
            });
        }
    }
}

/// Takes a disk's locks back, waiting a little for a destination that is letting go of them.
fn reclaim_disk(
    transport: &mut crate::devices::virtio::mmio::MmioTransport,
) -> std::io::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match transport.reclaim_backend() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
