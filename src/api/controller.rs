//! The VMM thread's side of the API: the VM's state (a configuration being assembled, then the
//! running VM) and Firecracker's rules for what each state allows.

use std::path::Path;

use serde_json::json;

mod migration;

use super::model::{self, ActionType, FullConfig, Refused, VmState};
use super::{ApiRequest, ApiResponse, ManagedVm, RateLimited};
use crate::VmConfig;

/// What the controller needs from its host: starting a VM and configuring ember's logging.
pub trait Launcher {
    /// The VM it starts.
    type Vm: ManagedVm;
    /// Boots `config` (already validated and prepared with [`VmConfig::for_boot`]).
    fn start(&mut self, config: &VmConfig) -> Result<Self::Vm, String>;
    /// Applies a `PUT /logger`.
    fn configure_logger(&mut self, logger: &model::Logger) -> Result<(), String>;
    /// Restores a snapshot (`PUT /snapshot/load`): `base` supplies what belongs to this process
    /// (console, seccomp), `overrides` give interfaces (by id) other TAPs, `vsock_uds` the vsock
    /// device another socket. Returns the VM and the configuration it was built from.
    fn restore(
        &mut self,
        base: &VmConfig,
        state: &std::path::Path,
        memory: &std::path::Path,
        overrides: &[(String, String)],
        vsock_uds: Option<&std::path::Path>,
        resume: bool,
    ) -> Result<(Self::Vm, VmConfig), String>;
    /// Waits at `url` for a migrating VM and runs it (`PUT /migration/receive`): `base` and
    /// `overrides` as for [`Launcher::restore`]. Returns the VM and its configuration.
    fn receive_migration(
        &mut self,
        _base: &VmConfig,
        _url: &crate::migration::MigrationUrl,
        _token: &str,
        _overrides: &[(String, String)],
    ) -> Result<(Self::Vm, VmConfig), String> {
        Err("migration is not supported here".into())
    }
}

const AFTER_BOOT: &str = "the microVM is running: this can only be set before InstanceStart";
const BEFORE_BOOT: &str = "the microVM is not started yet: this needs a running microVM";

/// Owns the VM's state and answers every request.
pub struct Controller<L: Launcher> {
    launcher: L,
    id: String,
    /// The configuration being assembled, then the one the VM runs.
    config: VmConfig,
    boot_source_set: bool,
    logger: Option<model::Logger>,
    vm: Option<L::Vm>,
    /// How the migration that brought the VM here went (a destination's `GET /migration`).
    incoming: Option<crate::migration::MigrationStatus>,
}

fn refused(e: Refused) -> ApiResponse {
    ApiResponse::bad_request(e.0)
}

impl<L: Launcher> Controller<L> {
    /// A controller for instance `id`, starting from `base` (console, seccomp and the like; its
    /// kernel is ignored until a boot source is set).
    pub fn new(launcher: L, id: impl Into<String>, base: VmConfig) -> Self {
        Controller {
            launcher,
            id: id.into(),
            config: base,
            boot_source_set: false,
            logger: None,
            vm: None,
            incoming: None,
        }
    }

    /// A controller around a VM already started from `config` (`ember run --kernel ...`).
    pub fn with_vm(launcher: L, id: impl Into<String>, config: VmConfig, vm: L::Vm) -> Self {
        let mut controller = Controller::new(launcher, id, config);
        controller.boot_source_set = true;
        controller.vm = Some(vm);
        controller
    }

    /// The launcher (for tests and fuzzing: what it started).
    pub fn launcher(&self) -> &L {
        &self.launcher
    }

    /// The running VM, if any.
    pub fn vm(&self) -> Option<&L::Vm> {
        self.vm.as_ref()
    }

    /// The running VM, if any, to wait for or stop.
    pub fn vm_mut(&mut self) -> Option<&mut L::Vm> {
        self.vm.as_mut()
    }

    /// The configuration (as assembled so far, or as running).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Applies a whole configuration file, then boots it.
    pub fn start_from(&mut self, file: &FullConfig) -> Result<(), String> {
        file.check_unsupported().map_err(|e| e.0)?;
        let Some(boot) = &file.boot_source else {
            return Err("the configuration has no boot-source".into());
        };
        if let Some(logger) = &file.logger {
            self.put_logger(logger).map_err(fault)?;
        }
        if let Some(metrics) = &file.metrics {
            self.put_metrics(metrics).map_err(fault)?;
        }
        if let Some(machine) = &file.machine_config {
            machine.apply(&mut self.config).map_err(|e| e.0)?;
        }
        boot.apply(&mut self.config).map_err(|e| e.0)?;
        self.boot_source_set = true;
        for drive in &file.drives {
            self.put_drive(drive).map_err(fault)?;
        }
        for iface in &file.network_interfaces {
            self.put_net(iface).map_err(fault)?;
        }
        if let Some(vsock) = &file.vsock {
            self.put_vsock(vsock).map_err(fault)?;
        }
        if let Some(entropy) = &file.entropy {
            self.put_entropy(entropy).map_err(fault)?;
        }
        self.instance_start().map(drop).map_err(fault)
    }

    /// Answers one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        let result = match request {
            ApiRequest::PatchVm(_) | ApiRequest::CreateSnapshot(_) if self.migrating() => {
                Err(ApiResponse::bad_request(
                    "a migration is in progress: wait for its end (GET /migration)",
                ))
            }
            ApiRequest::GetInstanceInfo => Ok(ApiResponse::json(&self.instance_info())),
            ApiRequest::GetVersion => Ok(ApiResponse::json(
                &json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }),
            )),
            ApiRequest::GetMachineConfig => Ok(ApiResponse::json(&json!(
                model::MachineConfig::from_config(&self.config)
            ))),
            ApiRequest::GetVmConfig => Ok(ApiResponse::json(&json!(FullConfig::from_config(
                &self.config,
                self.logger.as_ref()
            )))),
            ApiRequest::GetMetrics => self.running().map(|vm| ApiResponse::json(&vm.metrics())),
            ApiRequest::PutMachineConfig(m) => self.before_boot().and_then(|c| {
                m.apply(&mut c.config).map_err(refused)?;
                Ok(ApiResponse::no_content())
            }),
            ApiRequest::PatchMachineConfig(m) => self.before_boot().and_then(|c| {
                m.apply(&mut c.config).map_err(refused)?;
                Ok(ApiResponse::no_content())
            }),
            ApiRequest::PutBootSource(b) => self.before_boot().and_then(|c| {
                b.apply(&mut c.config).map_err(refused)?;
                c.boot_source_set = true;
                Ok(ApiResponse::no_content())
            }),
            ApiRequest::PutDrive(d) => self.put_drive(&d),
            ApiRequest::PatchDrive(d) => self.patch_drive(&d),
            ApiRequest::PutNetworkInterface(n) => self.put_net(&n),
            ApiRequest::PatchNetworkInterface(n) => self.patch_net(&n),
            ApiRequest::PutLogger(l) => self.put_logger(&l),
            ApiRequest::PutMetrics(m) => self.put_metrics(&m),
            ApiRequest::PutVsock(v) => self.put_vsock(&v),
            ApiRequest::PutEntropy(e) => self.put_entropy(&e),
            ApiRequest::Action(ActionType::InstanceStart) => self.instance_start(),
            ApiRequest::CreateSnapshot(create) => self.create_snapshot(&create),
            ApiRequest::LoadSnapshot(load) => self.load_snapshot(&load),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => self
                .running()
                .and_then(|vm| vm.send_ctrl_alt_del().map_err(ApiResponse::bad_request))
                .map(|()| ApiResponse::no_content()),
            ApiRequest::Action(ActionType::FlushMetrics) => self
                .running()
                .and_then(|vm| vm.flush_metrics().map_err(ApiResponse::bad_request))
                .map(|()| ApiResponse::no_content()),
            ApiRequest::SendMigration(send) => self.send_migration(&send),
            ApiRequest::ReceiveMigration(receive) => self.receive_migration(&receive),
            ApiRequest::GetMigration => Ok(self.get_migration()),
            ApiRequest::PatchVm(state) => self
                .running()
                .and_then(|vm| {
                    match state {
                        VmState::Paused => vm.pause(),
                        VmState::Resumed => vm.resume(),
                    }
                    .map_err(ApiResponse::bad_request)
                })
                .map(|()| ApiResponse::no_content()),
        };
        result.unwrap_or_else(|error| error)
    }

    fn instance_info(&self) -> serde_json::Value {
        let state = match &self.vm {
            None => "Not started",
            Some(vm) if vm.is_paused() => "Paused",
            Some(_) => "Running",
        };
        json!({
            "app_name": "ember",
            "id": self.id,
            "state": state,
            "vmm_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn before_boot(&mut self) -> Result<&mut Self, ApiResponse> {
        match self.vm {
            None => Ok(self),
            Some(_) => Err(ApiResponse::bad_request(AFTER_BOOT)),
        }
    }

    fn running(&mut self) -> Result<&mut L::Vm, ApiResponse> {
        self.vm
            .as_mut()
            .ok_or_else(|| ApiResponse::bad_request(BEFORE_BOOT))
    }

    fn put_drive(&mut self, drive: &model::Drive) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        let disk = drive.to_disk().map_err(refused)?;
        let mut disks = this.config.disks.clone();
        match disks.iter_mut().find(|d| d.id == disk.id) {
            Some(slot) => *slot = disk,
            None => disks.push(disk),
        }
        if disks.iter().filter(|d| d.root).count() > 1 {
            return Err(ApiResponse::bad_request(
                "another drive is already the root device",
            ));
        }
        let mut candidate = this.config.clone();
        candidate.disks = disks;
        check_devices(&candidate)?;
        this.config = candidate;
        Ok(ApiResponse::no_content())
    }

    fn patch_drive(&mut self, update: &model::DriveUpdate) -> Result<ApiResponse, ApiResponse> {
        if self.vm.is_none() {
            return Err(ApiResponse::bad_request(
                "PATCH /drives needs a running microVM: before InstanceStart use PUT",
            ));
        }
        let index = self
            .config
            .disks
            .iter()
            .position(|d| d.serial() == update.drive_id)
            .ok_or_else(|| ApiResponse::bad_request(format!("no drive {:?}", update.drive_id)))?;
        if update.path_on_host.is_none() && update.rate_limiter.is_none() {
            return Err(ApiResponse::bad_request(
                "nothing to change: give path_on_host or rate_limiter",
            ));
        }
        if let Some(limiter) = &update.rate_limiter {
            limiter
                .validate(&update.drive_id)
                .map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            self.running()?
                .update_rate_limiter(&update.drive_id, RateLimited::Disk, limiter)
                .map_err(ApiResponse::bad_request)?;
            self.config.disks[index].rate_limiter = Some(*limiter);
        }
        if let Some(path) = &update.path_on_host {
            self.running()?
                .update_drive(&update.drive_id, path)
                .map_err(ApiResponse::bad_request)?;
            self.config.disks[index].path = path.clone();
        }
        Ok(ApiResponse::no_content())
    }

    fn put_net(&mut self, iface: &model::NetworkInterface) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        let net = iface.to_net().map_err(refused)?;
        let mut candidate = this.config.clone();
        match candidate.nets.iter_mut().find(|n| n.id() == net.id()) {
            Some(slot) => *slot = net,
            None => candidate.nets.push(net),
        }
        check_devices(&candidate)?;
        this.config = candidate;
        Ok(ApiResponse::no_content())
    }

    fn patch_net(
        &mut self,
        update: &model::NetworkInterfaceUpdate,
    ) -> Result<ApiResponse, ApiResponse> {
        if self.vm.is_none() {
            return Err(ApiResponse::bad_request(
                "PATCH /network-interfaces needs a running microVM: before InstanceStart use PUT",
            ));
        }
        let Some(index) = self
            .config
            .nets
            .iter()
            .position(|n| n.id() == update.iface_id)
        else {
            return Err(ApiResponse::bad_request(format!(
                "no network interface {:?}",
                update.iface_id
            )));
        };
        if update.rx_rate_limiter.is_none() && update.tx_rate_limiter.is_none() {
            return Err(ApiResponse::bad_request(
                "nothing to change: give rx_rate_limiter or tx_rate_limiter",
            ));
        }
        for (limiter, kind) in [
            (&update.rx_rate_limiter, RateLimited::Rx),
            (&update.tx_rate_limiter, RateLimited::Tx),
        ] {
            let Some(limiter) = limiter else { continue };
            limiter
                .validate(&update.iface_id)
                .map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            self.running()?
                .update_rate_limiter(&update.iface_id, kind, limiter)
                .map_err(ApiResponse::bad_request)?;
            let net = &mut self.config.nets[index];
            match kind {
                RateLimited::Rx => net.rx_rate_limiter = Some(*limiter),
                _ => net.tx_rate_limiter = Some(*limiter),
            }
        }
        Ok(ApiResponse::no_content())
    }

    fn put_logger(&mut self, logger: &model::Logger) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        logger.check().map_err(refused)?;
        this.launcher
            .configure_logger(logger)
            .map_err(ApiResponse::bad_request)?;
        this.logger = Some(logger.clone());
        Ok(ApiResponse::no_content())
    }

    fn put_vsock(&mut self, vsock: &model::Vsock) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        let device = crate::config::VsockConfig::new(vsock.guest_cid, &vsock.uds_path);
        let mut candidate = this.config.clone();
        candidate.vsock = Some(device.clone());
        check_devices(&candidate)?;
        this.config.vsock = Some(device);
        Ok(ApiResponse::no_content())
    }

    /// The entropy device, replacing one configured before (Firecracker's rule for `PUT`).
    fn put_entropy(
        &mut self,
        entropy: &crate::config::EntropyConfig,
    ) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        let mut candidate = this.config.clone();
        candidate.entropy = Some(entropy.clone());
        check_devices(&candidate)?;
        this.config.entropy = Some(entropy.clone());
        Ok(ApiResponse::no_content())
    }

    fn put_metrics(&mut self, metrics: &model::Metrics) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        if this.config.metrics_path.is_some() {
            return Err(ApiResponse::bad_request("metrics are already configured"));
        }
        check_writable(&metrics.metrics_path)?;
        this.config.metrics_path = Some(metrics.metrics_path.clone());
        Ok(ApiResponse::no_content())
    }

    fn create_snapshot(
        &mut self,
        create: &crate::api::snapshot_model::SnapshotCreate,
    ) -> Result<ApiResponse, ApiResponse> {
        use crate::api::snapshot_model::SnapshotType;
        use crate::vmm::persist::MemoryKind;
        let kind = match create.snapshot_type {
            SnapshotType::Full => MemoryKind::Full,
            SnapshotType::Diff => MemoryKind::Diff,
        };
        if create.version.is_some() {
            return Err(ApiResponse::bad_request(
                "ember writes its own snapshot format version: leave version out",
            ));
        }
        // The shape the VM was built with (the root disk first), which a restore rebuilds.
        let config = self.config.for_boot();
        let vm = self.running()?;
        if !vm.is_paused() {
            return Err(ApiResponse::bad_request(
                "the microVM must be paused before a snapshot: PATCH /vm {\"state\": \"Paused\"}",
            ));
        }
        if kind == MemoryKind::Diff && !config.track_dirty_pages {
            return Err(ApiResponse::bad_request(
                "a Diff snapshot needs dirty page tracking, which this microVM does not have: \
                 enable track_dirty_pages (PUT /machine-config before InstanceStart, or \
                 PUT /snapshot/load), or take a Full snapshot",
            ));
        }
        vm.snapshot(&config, &create.snapshot_path, &create.mem_file_path, kind)
            .map_err(|e| ApiResponse::bad_request(format!("cannot create the snapshot: {e}")))?;
        Ok(ApiResponse::no_content())
    }

    fn load_snapshot(
        &mut self,
        load: &crate::api::snapshot_model::SnapshotLoad,
    ) -> Result<ApiResponse, ApiResponse> {
        let memory = load.memory_file().map_err(ApiResponse::bad_request)?;
        let this = self.before_boot()?;
        // The launcher restores with this process's settings: tracking is one of them (asked
        // for by the load, or on for every VM of this process: `ember run --track-dirty-pages`).
        let mut base = this.config.clone();
        base.track_dirty_pages |= load.tracks_dirty_pages();
        if this.boot_source_set || !this.config.disks.is_empty() || !this.config.nets.is_empty() {
            return Err(ApiResponse::bad_request(
                "a snapshot is loaded before any other configuration: start a fresh ember",
            ));
        }
        let overrides: Vec<(String, String)> = load
            .network_overrides
            .iter()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect();
        let (vm, config) = this
            .launcher
            .restore(
                &base,
                &load.snapshot_path,
                &memory,
                &overrides,
                load.vsock_override.as_ref().map(|v| v.uds_path.as_path()),
                load.resume_vm,
            )
            .map_err(|e| ApiResponse::bad_request(format!("cannot load the snapshot: {e}")))?;
        this.config = config;
        this.boot_source_set = true;
        this.vm = Some(vm);
        Ok(ApiResponse::no_content())
    }

    fn instance_start(&mut self) -> Result<ApiResponse, ApiResponse> {
        let this = self.before_boot()?;
        if !this.boot_source_set {
            return Err(ApiResponse::bad_request(
                "cannot start the microVM without a boot source: PUT /boot-source first",
            ));
        }
        let boot = this.config.for_boot();
        boot.validate()
            .map_err(|e| ApiResponse::bad_request(crate::error_chain(&e)))?;
        let vm = this
            .launcher
            .start(&boot)
            .map_err(|e| ApiResponse::bad_request(format!("cannot start the microVM: {e}")))?;
        this.vm = Some(vm);
        Ok(ApiResponse::no_content())
    }
}

fn fault(response: ApiResponse) -> String {
    response
        .body
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("error {}", response.status))
}

/// Checks the devices of `config` as `validate` will at boot, so that a bad drive or
/// interface is refused by the request that adds it.
fn check_devices(config: &VmConfig) -> Result<(), ApiResponse> {
    // Kernel and initrd are checked at InstanceStart: stand in a file that is always readable.
    let mut devices_only = config.clone();
    devices_only.kernel = std::path::PathBuf::from("/proc/self/exe");
    devices_only.initrd = None;
    devices_only
        .validate()
        .map_err(|e| ApiResponse::bad_request(crate::error_chain(&e)))
}

/// The metrics file must be writable: a file (created if missing) or a named pipe, opened
/// without blocking.
fn check_writable(path: &Path) -> Result<(), ApiResponse> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map(drop)
        .map_err(|e| ApiResponse::bad_request(format!("cannot open {}: {e}", path.display())))
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
