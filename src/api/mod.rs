//! Firecracker's REST API over a Unix socket, so that its SDKs and tools drive ember unchanged.
//!
//! Two threads: `ember-api` ([`server`]) owns the socket and every connection, parses HTTP
//! ([`http`]) and routes each request ([`router`]) to an [`ApiRequest`]; the VMM thread runs the
//! [`Controller`], which owns the VM's state, answers each request with an [`ApiResponse`] and
//! hands it back. The request bodies and the configuration file are [`model`]'s strict types,
//! converted into the one [`crate::VmConfig`]. docs/api.md lists every endpoint.

pub mod controller;
pub mod http;
pub mod migration_model;
pub mod model;
pub mod router;
pub mod server;
pub mod snapshot_model;
mod vm_handle;

use std::path::Path;

use crate::VmConfig;

pub use controller::{Controller, Launcher};
pub use router::route;
pub use server::{ApiServer, ServerError, VmmEnd};

/// What the API needs from a running VM (implemented for VmHandle by the VMM).
pub trait ManagedVm {
    /// Stops the vCPUs; idempotent when already paused.
    fn pause(&mut self) -> Result<(), String>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), String>;
    /// Whether the vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// One JSON object, Firecracker-like names.
    fn metrics(&self) -> serde_json::Value;
    /// Writes a line to --metrics-path now.
    fn flush_metrics(&mut self) -> Result<(), String>;
    /// Presses Ctrl-Alt-Del on the guest's keyboard controller.
    fn send_ctrl_alt_del(&mut self) -> Result<(), String>;
    /// Swaps the backing file of disk `drive_id` and tells the guest its size may have changed.
    fn update_drive(&mut self, drive_id: &str, path_on_host: &Path) -> Result<(), String>;
    /// Replaces the `kind` limiter of device `id` (a disk, or a network interface's receive or
    /// transmit side).
    fn update_rate_limiter(
        &mut self,
        id: &str,
        kind: RateLimited,
        limiter: &crate::config::RateLimiterConfig,
    ) -> Result<(), String>;
    /// Snapshots the (paused) VM built from `config`: state to `state`, memory (all of it, or
    /// only the pages written since the last snapshot) to `memory`.
    fn snapshot(
        &mut self,
        config: &VmConfig,
        state: &Path,
        memory: &Path,
        kind: crate::vmm::persist::MemoryKind,
    ) -> Result<(), String>;
    /// Starts migrating the VM built from `config` (`PUT /migration/send`).
    fn start_migration(
        &mut self,
        _config: &VmConfig,
        _params: crate::migration::SendParams,
    ) -> Result<(), String> {
        Err("migration is not supported here".into())
    }
    /// True while a migration is under way.
    fn is_migrating(&self) -> bool {
        false
    }
    /// The last migration's progress (`GET /migration`).
    fn migration_status(&self) -> crate::migration::MigrationStatus {
        crate::migration::MigrationStatus::default()
    }
    /// Readable when the migration under way needs [`ManagedVm::advance_migration`].
    fn migration_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Moves the migration on (pre-copy done: the stop and the hand-over).
    fn advance_migration(&mut self, _config: &VmConfig) -> Result<(), String> {
        Ok(())
    }
}

/// Which limiter a `PATCH` replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimited {
    /// A disk's.
    Disk,
    /// A network interface's receive side.
    Rx,
    /// A network interface's transmit side.
    Tx,
}

/// Largest request body accepted, as Firecracker's.
pub const MAX_BODY_LEN: usize = 51_200;

/// One parsed and checked API call.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(model::MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(model::MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(model::BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(model::Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(model::DriveUpdate),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(model::NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(model::NetworkInterfaceUpdate),
    /// `PUT /logger`.
    PutLogger(model::Logger),
    /// `PUT /metrics`.
    PutMetrics(model::Metrics),
    /// `GET /metrics` (ember's own: the current metrics).
    GetMetrics,
    /// `PUT /actions`.
    Action(model::ActionType),
    /// `PATCH /vm`.
    PatchVm(model::VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /vsock`.
    PutVsock(model::Vsock),
    /// `PUT /entropy`.
    PutEntropy(crate::config::EntropyConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(snapshot_model::SnapshotCreate),
    /// `PUT /snapshot/load`.
    LoadSnapshot(snapshot_model::SnapshotLoad),
    /// `PUT /migration/send`.
    SendMigration(migration_model::MigrationSend),
    /// `PUT /migration/receive`.
    ReceiveMigration(migration_model::MigrationReceive),
    /// `GET /migration`.
    GetMigration,
}

/// The answer to one request: 204 without a body, 200 with JSON, or an error with
/// `{"fault_message": ...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
}

impl ApiResponse {
    /// 204 No Content.
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` as the body.
    pub fn json(value: &serde_json::Value) -> Self {
        ApiResponse {
            status: 200,
            body: Some(value.to_string()),
        }
    }

    /// 400 Bad Request with `message`.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        ApiResponse::error(400, message)
    }

    /// An error status with `message` as the fault message.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        let body = serde_json::json!({ "fault_message": message.to_string() });
        ApiResponse {
            status,
            body: Some(body.to_string()),
        }
    }
}
