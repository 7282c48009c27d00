//! A controller on a mock VM for the API targets: nothing is booted, no host file outside a
//! scratch directory is opened (request paths are confined to it), and what was started is kept
//! so that the target can check it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ember::VmConfig;
use ember::api::model::Logger;
use ember::api::{ApiRequest, Controller, Launcher, ManagedVm, RateLimited};
use ember::config::RateLimiterConfig;

/// The mock VM: records nothing, answers everything.
#[derive(Default)]
pub struct MockVm {
    paused: bool,
}

impl ManagedVm for MockVm {
    fn pause(&mut self) -> Result<(), String> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.paused = false;
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn flush_metrics(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn send_ctrl_alt_del(&mut self) -> Result<(), String> {
        Err("refused by the mock".into())
    }
    fn update_drive(&mut self, _drive_id: &str, _path: &Path) -> Result<(), String> {
        Ok(())
    }
    fn update_rate_limiter(
        &mut self,
        _id: &str,
        _kind: RateLimited,
        _limiter: &RateLimiterConfig,
    ) -> Result<(), String> {
        Ok(())
    }
    fn snapshot(
        &mut self,
        _config: &VmConfig,
        _state: &Path,
        _memory: &Path,
        _kind: ember::vmm::persist::MemoryKind,
    ) -> Result<(), String> {
        // Nothing is written: the paths come from the fuzzer.
        Ok(())
    }
}

/// Keeps each configuration it is asked to start.
#[derive(Default)]
pub struct MockLauncher {
    pub started: Vec<VmConfig>,
}

impl Launcher for MockLauncher {
    type Vm = MockVm;
    fn start(&mut self, config: &VmConfig) -> Result<MockVm, String> {
        config.validate().map_err(|e| e.to_string())?;
        self.started.push(config.clone());
        Ok(MockVm::default())
    }
    fn configure_logger(&mut self, _logger: &Logger) -> Result<(), String> {
        Ok(())
    }
    fn restore(
        &mut self,
        _base: &VmConfig,
        _state: &Path,
        _memory: &Path,
        _overrides: &[(String, String)],
        _vsock_uds: Option<&Path>,
        _resume: bool,
    ) -> Result<(MockVm, VmConfig), String> {
        // Nothing is read: the paths come from the fuzzer.
        Err("refused by the mock".into())
    }
}

pub fn controller() -> Controller<MockLauncher> {
    Controller::new(MockLauncher::default(), "fuzz", VmConfig::new(""))
}

/// A scratch directory holding a file and a directory.
pub fn sandbox() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-api-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("dir")).unwrap();
        std::fs::write(dir.join("vmlinux"), b"not a kernel").unwrap();
        dir
    })
}

/// A path the controller may open: the last component of `path` inside the scratch directory.
pub fn confine(path: &Path) -> PathBuf {
    match path.file_name() {
        Some(name) if name != ".." => sandbox().join(name),
        _ => sandbox().join("vmlinux"),
    }
}

/// The request with every host path it carries confined.
pub fn confined(request: ApiRequest) -> ApiRequest {
    match request {
        ApiRequest::PutBootSource(mut b) => {
            b.kernel_image_path = confine(&b.kernel_image_path);
            b.initrd_path = b.initrd_path.as_deref().map(confine);
            ApiRequest::PutBootSource(b)
        }
        ApiRequest::PutMetrics(mut m) => {
            m.metrics_path = confine(&m.metrics_path);
            ApiRequest::PutMetrics(m)
        }
        ApiRequest::PutLogger(mut l) => {
            l.log_path = l.log_path.as_deref().map(confine);
            ApiRequest::PutLogger(l)
        }
        other => other,
    }
}
