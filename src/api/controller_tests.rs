//! The controller against a mock VM: Firecracker's state rules, request by request.

use std::path::{Path, PathBuf};

use super::*;
use crate::api::route;

#[derive(Default)]
struct MockVm {
    paused: bool,
    calls: Vec<String>,
}

impl ManagedVm for MockVm {
    fn pause(&mut self) -> Result<(), String> {
        self.paused = true;
        self.calls.push("pause".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.paused = false;
        self.calls.push("resume".into());
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn metrics(&self) -> serde_json::Value {
        json!({ "vcpu": { "exit_io_out": 1 } })
    }
    fn flush_metrics(&mut self) -> Result<(), String> {
        self.calls.push("flush".into());
        Ok(())
    }
    fn send_ctrl_alt_del(&mut self) -> Result<(), String> {
        self.calls.push("ctrl-alt-del".into());
        Ok(())
    }
    fn update_drive(&mut self, drive_id: &str, path: &Path) -> Result<(), String> {
        self.calls
            .push(format!("update {drive_id} {}", path.display()));
        Ok(())
    }
    fn update_rate_limiter(
        &mut self,
        id: &str,
        kind: crate::api::RateLimited,
        _limiter: &crate::config::RateLimiterConfig,
    ) -> Result<(), String> {
        self.calls.push(format!("limit {id} {kind:?}"));
        Ok(())
    }
    fn snapshot(
        &mut self,
        _config: &VmConfig,
        state: &Path,
        _memory: &Path,
        kind: crate::vmm::persist::MemoryKind,
    ) -> Result<(), String> {
        self.calls
            .push(format!("snapshot {kind:?} {}", state.display()));
        Ok(())
    }
}

#[derive(Default)]
struct MockLauncher {
    started: Vec<VmConfig>,
    fail: bool,
}

impl Launcher for MockLauncher {
    type Vm = MockVm;
    fn start(&mut self, config: &VmConfig) -> Result<MockVm, String> {
        if self.fail {
            return Err("no KVM here".into());
        }
        self.started.push(config.clone());
        Ok(MockVm::default())
    }
    fn configure_logger(&mut self, _logger: &model::Logger) -> Result<(), String> {
        Ok(())
    }
    fn restore(
        &mut self,
        base: &VmConfig,
        _state: &Path,
        _memory: &Path,
        _overrides: &[(String, String)],
        _vsock_uds: Option<&Path>,
        resume: bool,
    ) -> Result<(MockVm, VmConfig), String> {
        let vm = MockVm {
            paused: !resume,
            ..MockVm::default()
        };
        Ok((vm, base.clone()))
    }
}

fn controller() -> Controller<MockLauncher> {
    Controller::new(MockLauncher::default(), "vm0", VmConfig::new(""))
}

/// Routes and handles one call, as the API thread and the VMM thread do.
fn call(c: &mut Controller<MockLauncher>, method: &str, path: &str, body: &str) -> ApiResponse {
    match route(method, path, body.as_bytes()) {
        Ok(request) => c.handle(request),
        Err(response) => response,
    }
}

fn body(response: &ApiResponse) -> serde_json::Value {
    serde_json::from_str(response.body.as_deref().unwrap_or("null")).unwrap()
}

fn assert_fault(response: &ApiResponse, part: &str) {
    assert_eq!(response.status, 400, "{response:?}");
    let message = body(response)["fault_message"].as_str().unwrap().to_owned();
    assert!(message.contains(part), "{message:?} lacks {part:?}");
}

fn kernel() -> String {
    // Any readable file passes validation; the mock does not load it.
    "/proc/self/exe".into()
}

fn configure(c: &mut Controller<MockLauncher>) {
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel()
    );
    assert_eq!(call(c, "PUT", "/boot-source", &boot).status, 204);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
    assert_eq!(call(c, "PUT", "/machine-config", machine).status, 204);
    let data = r#"{"drive_id": "data", "path_on_host": "/data.img", "is_root_device": false}"#;
    assert_eq!(call(c, "PUT", "/drives/data", data).status, 204);
    let root = r#"{"drive_id": "rootfs", "path_on_host": "/root.img", "is_root_device": true, "is_read_only": true}"#;
    assert_eq!(call(c, "PUT", "/drives/rootfs", root).status, 204);
    let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#;
    assert_eq!(call(c, "PUT", "/network-interfaces/eth0", net).status, 204);
}

#[test]
fn a_configured_vm_starts_with_what_was_put() {
    let mut c = controller();
    let info = call(&mut c, "GET", "/", "");
    assert_eq!(body(&info)["state"], "Not started");
    assert_eq!(body(&info)["app_name"], "ember");
    assert_eq!(body(&info)["id"], "vm0");
    configure(&mut c);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut c, "PUT", "/actions", start).status, 204);
    let started = &c.launcher.started[0];
    assert_eq!((started.vcpus, started.memory_mib), (2, 256));
    assert_eq!(
        started.disks[0].id.as_deref(),
        Some("rootfs"),
        "the root disk is vda"
    );
    assert_eq!(started.cmdline, "console=ttyS0 root=/dev/vda ro");
    assert_eq!(started.nets[0].id(), "eth0");
    assert_eq!(body(&call(&mut c, "GET", "/", ""))["state"], "Running");
}

#[test]
fn vm_config_returns_the_sections_put() {
    let mut c = controller();
    configure(&mut c);
    let config = body(&call(&mut c, "GET", "/vm/config", ""));
    assert_eq!(config["boot-source"]["boot_args"], "console=ttyS0");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][1]["drive_id"], "rootfs");
    assert_eq!(config["drives"][1]["is_root_device"], true);
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(config["vsock"], serde_json::Value::Null);
    // What GET returns is a configuration file that boots the same VM.
    let file: FullConfig = serde_json::from_value(config).unwrap();
    let mut other = controller();
    other.start_from(&file).unwrap();
    let mut first = c.config().for_boot();
    first.kernel = PathBuf::from(kernel());
    assert_eq!(other.launcher.started[0], first);
}

#[test]
fn wrong_state_calls_are_refused() {
    let mut c = controller();
    assert_fault(
        &call(&mut c, "PATCH", "/vm", r#"{"state": "Paused"}"#),
        "not started",
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_fault(&call(&mut c, "PUT", "/actions", start), "boot source");
    assert_fault(
        &call(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        ),
        "not started",
    );
    let patch = r#"{"drive_id": "rootfs", "path_on_host": "/x"}"#;
    assert_fault(&call(&mut c, "PATCH", "/drives/rootfs", patch), "running");
    configure(&mut c);
    assert_eq!(call(&mut c, "PUT", "/actions", start).status, 204);
    assert_fault(&call(&mut c, "PUT", "/actions", start), "running");
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    assert_fault(
        &call(&mut c, "PUT", "/machine-config", machine),
        "before InstanceStart",
    );
    let boot = r#"{"kernel_image_path": "/k"}"#;
    assert_fault(
        &call(&mut c, "PUT", "/boot-source", boot),
        "before InstanceStart",
    );
    assert_fault(
        &call(&mut c, "PUT", "/logger", r#"{"level": "Info"}"#),
        "before",
    );
    assert_eq!(c.launcher.started.len(), 1);
}

#[test]
fn running_calls_reach_the_vm() {
    let mut c = controller();
    configure(&mut c);
    call(
        &mut c,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(
        call(&mut c, "PATCH", "/vm", r#"{"state": "Paused"}"#).status,
        204
    );
    assert_eq!(body(&call(&mut c, "GET", "/", ""))["state"], "Paused");
    assert_eq!(
        call(&mut c, "PATCH", "/vm", r#"{"state": "Resumed"}"#).status,
        204
    );
    assert_eq!(
        call(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#
        )
        .status,
        204
    );
    assert_eq!(
        call(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#
        )
        .status,
        204
    );
    let patch = r#"{"drive_id": "data", "path_on_host": "/new.img"}"#;
    assert_eq!(call(&mut c, "PATCH", "/drives/data", patch).status, 204);
    assert_fault(
        &call(
            &mut c,
            "PATCH",
            "/drives/nope",
            r#"{"drive_id": "nope", "path_on_host": "/n"}"#,
        ),
        "no drive",
    );
    assert_eq!(
        body(&call(&mut c, "GET", "/metrics", ""))["vcpu"]["exit_io_out"],
        1
    );
    assert_eq!(
        c.vm().unwrap().calls,
        [
            "pause",
            "resume",
            "flush",
            "ctrl-alt-del",
            "update data /new.img"
        ]
    );
    let config = body(&call(&mut c, "GET", "/vm/config", ""));
    assert_eq!(config["drives"][0]["path_on_host"], "/new.img");
}

#[test]
fn bad_devices_are_refused_by_the_request_that_adds_them() {
    let mut c = controller();
    let long = r#"{"drive_id": "a-drive-id-longer-than-twenty", "path_on_host": "/i", "is_root_device": false}"#;
    assert_fault(
        &call(&mut c, "PUT", "/drives/a-drive-id-longer-than-twenty", long),
        "disk id",
    );
    let root = |id: &str| {
        format!(r#"{{"drive_id": "{id}", "path_on_host": "/i", "is_root_device": true}}"#)
    };
    assert_eq!(call(&mut c, "PUT", "/drives/a", &root("a")).status, 204);
    assert_fault(&call(&mut c, "PUT", "/drives/b", &root("b")), "root device");
    // Putting the same id again replaces it.
    assert_eq!(call(&mut c, "PUT", "/drives/a", &root("a")).status, 204);
    let net = r#"{"iface_id": "eth0", "host_dev_name": "bad/name"}"#;
    assert_fault(
        &call(&mut c, "PUT", "/network-interfaces/eth0", net),
        "TAP name",
    );
    let mac = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:00"}"#;
    assert_fault(
        &call(&mut c, "PUT", "/network-interfaces/eth0", mac),
        "multicast",
    );
    let limited = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 99999999999}}}"#;
    assert_fault(
        &call(&mut c, "PUT", "/network-interfaces/eth0", limited),
        "refill_time",
    );
    assert!(c.config().nets.is_empty());
    let limited = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#;
    assert_eq!(
        call(&mut c, "PUT", "/network-interfaces/eth0", limited).status,
        204
    );
    assert!(c.config().nets[0].rx_rate_limiter.is_some());
}

#[test]
fn a_failed_start_can_be_retried() {
    let mut c = controller();
    configure(&mut c);
    c.launcher.fail = true;
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_fault(&call(&mut c, "PUT", "/actions", start), "no KVM here");
    assert_eq!(body(&call(&mut c, "GET", "/", ""))["state"], "Not started");
    c.launcher.fail = false;
    assert_eq!(call(&mut c, "PUT", "/actions", start).status, 204);
}

#[test]
fn a_missing_kernel_is_refused_at_start() {
    let mut c = controller();
    let boot = r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#;
    assert_eq!(call(&mut c, "PUT", "/boot-source", boot).status, 204);
    assert_fault(
        &call(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        ),
        "does not exist",
    );
}

#[test]
fn metrics_are_configured_once() {
    let dir = std::env::temp_dir().join(format!("ember-api-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics");
    let mut c = controller();
    let put = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
    assert_eq!(call(&mut c, "PUT", "/metrics", &put).status, 204);
    assert_eq!(c.config().metrics_path.as_deref(), Some(path.as_path()));
    assert_fault(&call(&mut c, "PUT", "/metrics", &put), "already");
    let mut c = controller();
    assert_fault(
        &call(
            &mut c,
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/nonexistent/dir/m"}"#,
        ),
        "cannot open",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshots_need_a_paused_vm_and_loads_a_fresh_instance() {
    let mut c = controller();
    let create = r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#;
    let load = r#"{"snapshot_path": "/tmp/s", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/m"}}"#;
    assert_eq!(
        call(&mut c, "PUT", "/snapshot/create", create).status,
        400,
        "not started"
    );
    let boot = r#"{"kernel_image_path": "/proc/self/exe"}"#;
    assert_eq!(call(&mut c, "PUT", "/boot-source", boot).status, 204);
    assert_eq!(
        call(&mut c, "PUT", "/snapshot/load", load).status,
        400,
        "configured already"
    );
    assert_eq!(
        call(
            &mut c,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )
        .status,
        204
    );
    assert_eq!(
        call(&mut c, "PUT", "/snapshot/create", create).status,
        400,
        "running"
    );
    assert_eq!(
        call(&mut c, "PATCH", "/vm", r#"{"state": "Paused"}"#).status,
        204
    );
    let diff = r#"{"snapshot_type": "Diff", "snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#;
    assert_fault(
        &call(&mut c, "PUT", "/snapshot/create", diff),
        "enable track_dirty_pages",
    );
    assert_eq!(call(&mut c, "PUT", "/snapshot/create", create).status, 204);

    let mut fresh = controller();
    assert_eq!(call(&mut fresh, "PUT", "/snapshot/load", load).status, 204);
    let info = call(&mut fresh, "GET", "/", "").body.unwrap();
    assert!(
        info.contains("Paused"),
        "a load without resume_vm stays paused: {info}"
    );
    assert_eq!(
        call(&mut fresh, "PUT", "/snapshot/load", load).status,
        400,
        "twice"
    );
}

#[test]
fn diff_snapshots_follow_track_dirty_pages_from_machine_config_or_load() {
    let diff = r#"{"snapshot_type": "Diff", "snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#;
    let paused = r#"{"state": "Paused"}"#;
    let mut c = controller();
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}"#;
    assert_eq!(call(&mut c, "PUT", "/machine-config", machine).status, 204);
    let boot = r#"{"kernel_image_path": "/proc/self/exe"}"#;
    assert_eq!(call(&mut c, "PUT", "/boot-source", boot).status, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut c, "PUT", "/actions", start).status, 204);
    assert!(
        c.launcher.started[0].track_dirty_pages,
        "the VM is built tracking"
    );
    let config = body(&call(&mut c, "GET", "/vm/config", ""));
    assert_eq!(config["machine-config"]["track_dirty_pages"], true);
    assert_eq!(call(&mut c, "PATCH", "/vm", paused).status, 204);
    assert_eq!(call(&mut c, "PUT", "/snapshot/create", diff).status, 204);
    assert_eq!(
        c.vm().unwrap().calls.last().unwrap(),
        "snapshot Diff /tmp/s"
    );

    for (load, tracks) in [
        (
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "track_dirty_pages": true}"#,
            true,
        ),
        (
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
            true,
        ),
        (r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#, false),
    ] {
        let mut fresh = controller();
        assert_eq!(call(&mut fresh, "PUT", "/snapshot/load", load).status, 204);
        let status = call(&mut fresh, "PUT", "/snapshot/create", diff).status;
        assert_eq!(status == 204, tracks, "{load}");
    }
}

#[test]
fn entropy_is_put_before_boot_shown_in_the_config_and_refused_after() {
    let mut c = controller();
    configure(&mut c);
    assert_fault(&call(&mut c, "PUT", "/entropy", r#"{"rate": 1}"#), "rate");
    let limited = r#"{"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}}"#;
    assert_eq!(call(&mut c, "PUT", "/entropy", limited).status, 204);
    let config = body(&call(&mut c, "GET", "/vm/config", ""));
    assert_eq!(config["entropy"]["rate_limiter"]["bandwidth"]["size"], 1024);
    // A second PUT replaces the first, as for every device.
    assert_eq!(call(&mut c, "PUT", "/entropy", "{}").status, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut c, "PUT", "/actions", start).status, 204);
    let started = &c.launcher.started[0];
    assert_eq!(
        started.entropy,
        Some(crate::config::EntropyConfig::default())
    );
    assert_fault(
        &call(&mut c, "PUT", "/entropy", "{}"),
        "before InstanceStart",
    );
}
