//! The controller's migration endpoints: `PUT /migration/send` on a running VM,
//! `PUT /migration/receive` on a fresh ember, `GET /migration` on either.

use serde_json::json;

use super::{Controller, Launcher};
use crate::api::migration_model::{MigrationReceive, MigrationSend};
use crate::api::{ApiResponse, ManagedVm};
use crate::migration::{MigrationState, MigrationStatus};

impl<L: Launcher> Controller<L> {
    /// True while the VM is migrating away (pause, resume and snapshots are refused).
    pub(super) fn migrating(&self) -> bool {
        self.vm.as_ref().is_some_and(ManagedVm::is_migrating)
    }

    /// Readable when the migration under way needs [`Controller::advance_migration`].
    pub fn migration_fd(&self) -> Option<std::os::fd::RawFd> {
        self.vm.as_ref().and_then(ManagedVm::migration_fd)
    }

    /// Moves the migration under way on (the VMM's loop calls it when
    /// [`Controller::migration_fd`] is readable). Failures are in `GET /migration`.
    pub fn advance_migration(&mut self) {
        let config = self.config.for_boot();
        if let Some(vm) = self.vm.as_mut() {
            if let Err(e) = vm.advance_migration(&config) {
                log::warn!("migration: {e}");
            }
        }
    }

    pub(super) fn send_migration(
        &mut self,
        send: &MigrationSend,
    ) -> Result<ApiResponse, ApiResponse> {
        let params = send.params().map_err(ApiResponse::bad_request)?;
        let config = self.config.for_boot();
        let vm = self.running()?;
        vm.start_migration(&config, params)
            .map_err(|e| ApiResponse::bad_request(format!("cannot migrate: {e}")))?;
        Ok(ApiResponse::no_content())
    }

    pub(super) fn receive_migration(
        &mut self,
        receive: &MigrationReceive,
    ) -> Result<ApiResponse, ApiResponse> {
        let (url, token) = receive.params().map_err(ApiResponse::bad_request)?;
        let this = self.before_boot()?;
        if this.boot_source_set || !this.config.disks.is_empty() || !this.config.nets.is_empty() {
            return Err(ApiResponse::bad_request(
                "a migration is received before any other configuration: start a fresh ember",
            ));
        }
        let overrides: Vec<(String, String)> = receive
            .network_overrides
            .iter()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect();
        let received = this
            .launcher
            .receive_migration(&this.config, &url, &token, &overrides);
        match received {
            Ok((vm, config)) => {
                this.config = config;
                this.boot_source_set = true;
                this.incoming = Some(MigrationStatus {
                    state: MigrationState::Completed,
                    url: Some(url.to_string()),
                    ..MigrationStatus::default()
                });
                this.vm = Some(vm);
                Ok(ApiResponse::no_content())
            }
            Err(e) => {
                this.incoming = Some(MigrationStatus {
                    state: MigrationState::Failed,
                    url: Some(url.to_string()),
                    error: Some(e.clone()),
                    ..MigrationStatus::default()
                });
                Err(ApiResponse::bad_request(format!(
                    "cannot receive the VM: {e}"
                )))
            }
        }
    }

    pub(super) fn get_migration(&self) -> ApiResponse {
        let status = match (&self.vm, &self.incoming) {
            (Some(vm), _) if vm.migration_status().state != MigrationState::None => {
                vm.migration_status()
            }
            (_, Some(incoming)) => incoming.clone(),
            _ => MigrationStatus::default(),
        };
        ApiResponse::json(&json!(status))
    }
}
