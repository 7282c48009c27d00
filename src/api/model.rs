//! Firecracker's request bodies and configuration-file sections, as strict serde types: unknown
//! fields, wrong types and values ember cannot honour are refused with a message naming them.
//! Each converts into (or out of) the one [`VmConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DiskConfig, IoEngine, MIN_MEMORY_MIB, NetConfig, RateLimiterConfig, VmConfig};

/// Most vCPUs ember's MP table describes.
pub const MAX_VCPUS: u8 = 254;

/// A request that parses but asks for something ember refuses.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(message.into()))
}

/// Refuses a feature ember does not implement unless it is absent, null, false or empty.
fn unsupported(name: &str, value: &Option<Value>) -> Result<(), Refused> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(map)) if map.is_empty() => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(_) => refuse(format!("{name} is not supported by ember")),
    }
}

/// `PUT /machine-config` (every field) and the `machine-config` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 254.
    pub vcpu_count: u8,
    /// Guest memory in MiB, at least 2.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: only false.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking, for Diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template: only "None".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: only "None".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<String>,
    /// Huge pages.
    pub huge_pages: Option<String>,
}

fn check_none_or(name: &str, value: Option<&str>) -> Result<(), Refused> {
    match value {
        None | Some("None") => Ok(()),
        Some(other) => refuse(format!("{name} {other:?} is not supported by ember")),
    }
}

impl MachineConfigUpdate {
    /// Applies the change to `config`, checking each value.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), Refused> {
        if let Some(vcpus) = self.vcpu_count {
            if vcpus == 0 || vcpus > MAX_VCPUS {
                return refuse(format!("vcpu_count must be 1 to {MAX_VCPUS}, not {vcpus}"));
            }
        }
        if let Some(mib) = self.mem_size_mib {
            if mib < MIN_MEMORY_MIB {
                return refuse(format!("mem_size_mib must be at least {MIN_MEMORY_MIB}"));
            }
        }
        if self.smt == Some(true) {
            return refuse("smt is not supported by ember");
        }
        check_none_or("cpu_template", self.cpu_template.as_deref())?;
        check_none_or("huge_pages", self.huge_pages.as_deref())?;
        if let Some(vcpus) = self.vcpu_count {
            config.vcpus = vcpus;
        }
        if let Some(mib) = self.mem_size_mib {
            config.memory_mib = mib;
        }
        if let Some(track) = self.track_dirty_pages {
            config.track_dirty_pages = track;
        }
        Ok(())
    }
}

impl MachineConfig {
    /// Replaces the machine settings of `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), Refused> {
        MachineConfigUpdate {
            vcpu_count: Some(self.vcpu_count),
            mem_size_mib: Some(self.mem_size_mib),
            smt: Some(self.smt),
            track_dirty_pages: Some(self.track_dirty_pages),
            cpu_template: self.cpu_template.clone(),
            huge_pages: self.huge_pages.clone(),
        }
        .apply(config)
    }

    /// The machine settings of `config`.
    pub fn from_config(config: &VmConfig) -> Self {
        MachineConfig {
            vcpu_count: config.vcpus,
            mem_size_mib: config.memory_mib,
            smt: false,
            track_dirty_pages: config.track_dirty_pages,
            cpu_template: None,
            huge_pages: Some("None".into()),
        }
    }
}

/// `PUT /boot-source` and the `boot-source` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel.
    pub kernel_image_path: PathBuf,
    /// The initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line (default: ember's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    /// Sets kernel, initrd and command line in `config`.
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), Refused> {
        if self.kernel_image_path.as_os_str().is_empty() {
            return refuse("kernel_image_path is empty");
        }
        config.kernel = self.kernel_image_path.clone();
        config.initrd = self.initrd_path.clone();
        config.cmdline = self
            .boot_args
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_CMDLINE.to_owned());
        Ok(())
    }

    /// The boot source of `config`.
    pub fn from_config(config: &VmConfig) -> Self {
        BootSource {
            kernel_image_path: config.kernel.clone(),
            initrd_path: config.initrd.clone(),
            boot_args: Some(config.cmdline.clone()),
        }
    }
}

/// Firecracker's block caching modes: ember honours every flush (fdatasync), which is
/// `Writeback`'s promise and more than `Unsafe`'s, so both are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes may be ignored (ember does not ignore them).
    Unsafe,
    /// Flushes reach stable storage.
    Writeback,
}

/// `PUT /drives/{id}` and an entry of the `drives` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The disk's id: the serial the guest reads.
    pub drive_id: String,
    /// The image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// The root filesystem: `/dev/vda`, with `root=/dev/vda` on the command line.
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Root by partition UUID: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Caching mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Bandwidth and operations limits (Firecracker's token buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// I/O engine: "Async" (io_uring) or "Sync"; ember picks io_uring where it can by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// vhost-user-block socket: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Drive {
    /// The disk this drive describes.
    pub fn to_disk(&self) -> Result<DiskConfig, Refused> {
        if self.socket.is_some() {
            return refuse("vhost-user drives (socket) are not supported by ember");
        }
        if self.partuuid.is_some() {
            return refuse("partuuid is not supported by ember");
        }
        let io_engine = match self.io_engine.as_deref() {
            None => IoEngine::Auto,
            Some("Sync") => IoEngine::Sync,
            Some("Async") => IoEngine::Async,
            Some(other) => {
                return refuse(format!(
                    "io_engine {other:?} is not one of \"Sync\" and \"Async\""
                ));
            }
        };
        let Some(path) = &self.path_on_host else {
            return refuse("path_on_host is required");
        };
        let mut disk = DiskConfig::new(path);
        disk.id = Some(self.drive_id.clone());
        disk.read_only = self.is_read_only.unwrap_or(false);
        disk.root = self.is_root_device;
        disk.io_engine = io_engine;
        disk.rate_limiter = self.rate_limiter;
        Ok(disk)
    }

    /// The drive of `disk`.
    pub fn from_disk(disk: &DiskConfig) -> Self {
        Drive {
            drive_id: disk.serial(),
            path_on_host: Some(disk.path.clone()),
            is_root_device: disk.root,
            is_read_only: Some(disk.read_only),
            partuuid: None,
            cache_type: Some(CacheType::Writeback),
            rate_limiter: disk.rate_limiter,
            io_engine: match disk.io_engine {
                IoEngine::Sync => Some("Sync".into()),
                IoEngine::Async => Some("Async".into()),
                IoEngine::Auto => None,
            },
            socket: None,
        }
    }
}

/// `PATCH /drives/{id}`: a new backing file after boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The disk's id.
    pub drive_id: String,
    /// The new image.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// New limits, replacing the old ones.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{id}` and an entry of the `network-interfaces` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// The host TAP.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterface {
    /// The interface this describes.
    pub fn to_net(&self) -> Result<NetConfig, Refused> {
        if self.mtu.is_some() {
            return refuse("mtu is not supported by ember");
        }
        let mut net = NetConfig::new(&self.host_dev_name);
        net.id = Some(self.iface_id.clone());
        net.rx_rate_limiter = self.rx_rate_limiter;
        net.tx_rate_limiter = self.tx_rate_limiter;
        if let Some(mac) = &self.guest_mac {
            net.mac = Some(
                mac.parse()
                    .map_err(|e| Refused(format!("guest_mac: {e}")))?,
            );
        }
        Ok(net)
    }

    /// The interface of `net`.
    pub fn from_net(net: &NetConfig) -> Self {
        NetworkInterface {
            iface_id: net.id().to_owned(),
            host_dev_name: net.tap.clone(),
            // Only a given address: a derived one stays derived when the section is reused.
            guest_mac: net.mac.map(|mac| mac.to_string()),
            mtu: None,
            rx_rate_limiter: net.rx_rate_limiter,
            tx_rate_limiter: net.tx_rate_limiter,
        }
    }
}

/// `PATCH /network-interfaces/{id}`: new rate limiters after boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The interface's id.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Log levels, as Firecracker spells them (case-insensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and errors.
    Warning,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(match text.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown log level {text:?}: expected Error, Warning, Info, Debug, Trace or Off"
                )));
            }
        })
    }
}

impl LogLevel {
    /// The `log` crate's filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `PUT /logger` and the `logger` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where ember's messages go (a file or a named pipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// ember always shows the level: any value is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// The source location: only false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// A module filter: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Refuses what ember's logger cannot do.
    pub fn check(&self) -> Result<(), Refused> {
        if self.show_log_origin == Some(true) {
            return refuse("show_log_origin is not supported by ember");
        }
        if self.module.is_some() {
            return refuse("module filters are not supported by ember");
        }
        Ok(())
    }
}

/// `PUT /metrics` and the `metrics` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where metrics lines are written.
    pub metrics_path: PathBuf,
}

/// `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write a metrics line now.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Ctrl-Alt-Del on the guest's keyboard controller.
    SendCtrlAltDel,
}

/// The body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The state wanted.
    pub state: VmState,
}

/// `PUT /vsock` and the `vsock` section: Firecracker's hybrid vsock (docs/vsock.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to.
    pub uds_path: PathBuf,
    /// Firecracker's deprecated device id: accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// Firecracker's full configuration: the `--config-file` and `GET /vm/config`. Sections ember
/// does not support must be absent, null or empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// Disks.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// ember's messages.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// Metrics output.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Not supported.
    #[serde(default)]
    pub balloon: Option<Value>,
    /// virtio-vsock.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// virtio-rng (`PUT /entropy`): `{}` or `{"rate_limiter": ...}` adds it.
    #[serde(default)]
    pub entropy: Option<crate::config::EntropyConfig>,
    /// Not supported.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<Value>,
    /// Not supported.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<Value>,
    /// Not supported.
    #[serde(default)]
    pub pmem: Option<Value>,
    /// Not supported.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<Value>,
    /// Not supported.
    #[serde(default)]
    pub serial: Option<Value>,
}

impl FullConfig {
    /// Refuses any section ember does not support.
    pub fn check_unsupported(&self) -> Result<(), Refused> {
        unsupported("balloon", &self.balloon)?;
        unsupported("mmds-config", &self.mmds_config)?;
        unsupported("cpu-config", &self.cpu_config)?;
        unsupported("pmem", &self.pmem)?;
        unsupported("memory-hotplug", &self.memory_hotplug)?;
        unsupported("serial", &self.serial)
    }

    /// The sections of `config` (and the API-only logger).
    pub fn from_config(config: &VmConfig, logger: Option<&Logger>) -> Self {
        let has_kernel = !config.kernel.as_os_str().is_empty();
        FullConfig {
            boot_source: has_kernel.then(|| BootSource::from_config(config)),
            drives: config.disks.iter().map(Drive::from_disk).collect(),
            machine_config: Some(MachineConfig::from_config(config)),
            network_interfaces: config.nets.iter().map(NetworkInterface::from_net).collect(),
            logger: logger.cloned(),
            metrics: config
                .metrics_path
                .clone()
                .map(|metrics_path| Metrics { metrics_path }),
            vsock: config.vsock.as_ref().map(|v| Vsock {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
                vsock_id: None,
            }),
            entropy: config.entropy.clone(),
            ..FullConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_is_strict_and_checked() {
        let ok: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#)
                .unwrap();
        let mut config = VmConfig::new("k");
        ok.apply(&mut config).unwrap();
        assert_eq!((config.vcpus, config.memory_mib), (2, 256));
        for bad in [
            r#"{"vcpu_count": 2}"#,
            r#"{"vcpu_count": "2", "mem_size_mib": 256}"#,
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpus": 1}"#,
            r#"{"vcpu_count": 256, "mem_size_mib": 256}"#,
            r#"{"vcpu_count": -1, "mem_size_mib": 256}"#,
        ] {
            assert!(serde_json::from_str::<MachineConfig>(bad).is_err(), "{bad}");
        }
        for refused in [
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
            r#"{"vcpu_count": 255, "mem_size_mib": 256}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 1}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#,
        ] {
            let m: MachineConfig = serde_json::from_str(refused).unwrap();
            assert!(m.apply(&mut config).is_err(), "{refused}");
        }
        assert_eq!((config.vcpus, config.memory_mib), (2, 256), "unchanged");
    }

    #[test]
    fn drives_convert_and_refuse_what_ember_lacks() {
        let d: Drive = serde_json::from_str(
            r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true,
                "is_read_only": false, "cache_type": "Unsafe", "io_engine": "Sync"}"#,
        )
        .unwrap();
        let disk = d.to_disk().unwrap();
        assert_eq!((disk.id.as_deref(), disk.root), (Some("rootfs"), true));
        assert_eq!(Drive::from_disk(&disk).drive_id, "rootfs");
        for field in [
            r#""partuuid": "x""#,
            r#""io_engine": "Fast""#,
            r#""socket": "/s""#,
        ] {
            let text = format!(
                r#"{{"drive_id": "a", "path_on_host": "/i", "is_root_device": false, {field}}}"#
            );
            let d: Drive = serde_json::from_str(&text).unwrap();
            assert!(d.to_disk().is_err(), "{field}");
        }
        assert!(
            serde_json::from_str::<Drive>(r#"{"drive_id": "a", "is_root_device": false, "x": 1}"#)
                .is_err()
        );
    }

    #[test]
    fn unsupported_sections_pass_only_when_empty() {
        let c: FullConfig =
            serde_json::from_str(r#"{"vsock": null, "balloon": {}, "pmem": []}"#).unwrap();
        c.check_unsupported().unwrap();
        let c: FullConfig = serde_json::from_str(r#"{"balloon": {"amount_mib": 1}}"#).unwrap();
        assert_eq!(
            c.check_unsupported().unwrap_err().0,
            "balloon is not supported by ember"
        );
        assert!(serde_json::from_str::<FullConfig>(r#"{"bogus": null}"#).is_err());
    }

    /// Found by the `api_config` fuzz target: `GET /vm/config` showed the derived MAC address
    /// as `guest_mac`, so booting what it returned gave a config with the address fixed, not the
    /// one that was started.
    #[test]
    fn a_derived_mac_is_not_shown_as_given() {
        let net = NetConfig::new("tap0");
        let shown = NetworkInterface::from_net(&net);
        assert_eq!(shown.guest_mac, None);
        assert_eq!(shown.to_net().unwrap().mac, None);
    }

    #[test]
    fn log_levels_are_case_insensitive() {
        let l: Logger = serde_json::from_str(r#"{"level": "warning"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        assert!(serde_json::from_str::<Logger>(r#"{"level": "loud"}"#).is_err());
        let l: Logger = serde_json::from_str(r#"{"show_log_origin": true}"#).unwrap();
        assert!(l.check().is_err());
    }
}
