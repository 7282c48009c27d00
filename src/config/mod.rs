//! What a VM is made of: plain data, checked by [`VmConfig::validate`] before anything is built.

mod entropy;
mod net;
mod rate_limiter;
mod vsock;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
pub use entropy::EntropyConfig;
pub use net::{MAX_NET_ID_LEN, MAX_TAP_NAME_LEN, MacAddr, MacParseError, NetConfig};
pub use rate_limiter::{IoEngine, RateLimiterConfig, TokenBucketConfig, parse_bucket};
pub use vsock::VsockConfig;

/// The kernel command line used when none is given: the serial console, reset on reboot through
/// the i8042 (which ends the VM), reboot on panic, and no probing for hardware a microVM lacks.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// Default guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Smallest guest memory ember accepts, MiB: the boot structures and a kernel at 1 MiB.
pub const MIN_MEMORY_MIB: u64 = 2;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF kernel carries the PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// Always the 64-bit Linux boot protocol.
    Linux,
    /// Always PVH (the kernel must carry the note).
    Pvh,
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// Output to the process's stdout, input from its stdin.
    #[default]
    Stdio,
    /// Discard output, no input.
    None,
    /// Output to a file (created or truncated), no input.
    File(PathBuf),
    /// Pipes the embedding program reads and writes: see `VmHandle::take_console`. Output that
    /// the program does not read in time is dropped (and counted), never blocking the guest.
    Pipe,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes (and share the image with other read-only users).
    #[serde(default)]
    pub read_only: bool,
    /// Open the image with O_DIRECT: I/O bypasses the host page cache. The guest's buffers must
    /// then be 512-byte aligned (Linux's are); misaligned requests fail with IOERR.
    #[serde(default)]
    pub direct: bool,
    /// The serial the guest reads with GET_ID (`/sys/block/vdX/serial`), up to 20 ASCII bytes;
    /// `None` uses the file name. The API's `drive_id`.
    #[serde(default)]
    pub id: Option<String>,
    /// This disk holds the root filesystem (the API's `is_root_device`): [`VmConfig::for_boot`]
    /// makes it `/dev/vda` and adds `root=/dev/vda rw` (`ro` when read-only) to the command line.
    #[serde(default)]
    pub root: bool,
    /// How requests run (io_uring where the kernel allows it, by default).
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Bandwidth and operations limits on the disk's requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DiskConfig {
    /// A writable disk on `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            direct: false,
            id: None,
            root: false,
            io_engine: IoEngine::Auto,
            rate_limiter: None,
        }
    }

    /// The device's id (the API's `drive_id`): the given id, else the whole file name.
    pub fn device_id(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The GET_ID string: the given id, else the file name cut to 20 bytes.
    pub fn serial(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => {
                let name = self
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let mut name = name.unwrap_or_default();
                while name.len() > MAX_DISK_ID_LEN {
                    name.pop();
                }
                name
            }
        }
    }
}

/// Longest disk id (virtio-blk's GET_ID buffer).
pub const MAX_DISK_ID_LEN: usize = 20;
/// Most virtio devices: IOAPIC pins 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A VM to start. Plain data: the CLI, the API, its configuration file and `GET /vm/config`
/// all go through this one type (with serde: unknown fields are refused, missing ones take the
/// defaults of [`VmConfig::new`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Serial console.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Entry protocol.
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// The KVM device (normally `/dev/kvm`).
    #[serde(default = "default_kvm_device")]
    pub kvm_device: PathBuf,
    /// virtio-blk disks, `/dev/vda` first.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, `eth0` first.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// virtio-vsock with its host side on a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng: random bytes from the host for the guest's generator.
    #[serde(default)]
    pub entropy: Option<EntropyConfig>,
    /// The Firecracker-compatible boot timer at 0xC000_0000.
    #[serde(default)]
    pub boot_timer: bool,
    /// Seccomp filters on ember's vCPU and event-loop threads (on unless debugging).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Guest memory in a memfd mapped shared instead of anonymous memory, so a migration to
    /// another ember on this host hands it over (its descriptor) instead of copying it.
    #[serde(default)]
    pub shared_memory: bool,
    /// Where the VMM writes a line of metrics (JSON) when asked to flush them (the API's
    /// `PUT /metrics`); `None`: nowhere.
    #[serde(default)]
    pub metrics_path: Option<PathBuf>,
    /// Record which guest pages are written (KVM's dirty log and ember's own writes), for Diff
    /// snapshots. Off by default (the dirty log slows guest writes a little); a restore takes
    /// it from the load, not from the snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Debug builds only: make this thread call a forbidden system call once filtered, to test
    /// that violations are caught.
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    #[serde(skip)]
    pub seccomp_selftest: Option<crate::sandbox::ThreadKind>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

fn default_kvm_device() -> PathBuf {
    PathBuf::from("/dev/kvm")
}

fn default_true() -> bool {
    true
}

impl VmConfig {
    /// A config for `kernel` with every other setting at its default.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            console: ConsoleConfig::default(),
            boot_protocol: BootProtocol::default(),
            kvm_device: default_kvm_device(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            entropy: None,
            boot_timer: false,
            seccomp: true,
            shared_memory: false,
            metrics_path: None,
            track_dirty_pages: false,
            #[cfg(debug_assertions)]
            seccomp_selftest: None,
        }
    }

    /// The configuration the VMM boots: the root disk (if one is marked [`DiskConfig::root`])
    /// moved first, to be `/dev/vda`, and `root=/dev/vda rw` (or `ro`) added to the command line.
    pub fn for_boot(&self) -> VmConfig {
        let mut config = self.clone();
        if let Some(index) = config.disks.iter().position(|d| d.root) {
            let root = config.disks.remove(index);
            let mode = if root.read_only { "ro" } else { "rw" };
            config.cmdline.push_str(&format!(" root=/dev/vda {mode}"));
            config.disks.insert(0, root);
        }
        config
    }

    /// Resets what a configuration that came from outside (a snapshot file, a migration's
    /// source) must not decide for this process: where the console and the metrics go, the
    /// KVM device, the seccomp filters (on). The caller then applies its own.
    pub fn reset_host_settings(&mut self) {
        self.console = ConsoleConfig::None;
        self.metrics_path = None;
        self.kvm_device = default_kvm_device();
        self.seccomp = true;
        #[cfg(debug_assertions)]
        {
            self.seccomp_selftest = None;
        }
    }

    /// Puts each interface `id` of `overrides` on its new TAP (a restore's or a migration's
    /// network overrides); the interface keeps its id and MAC.
    pub fn override_taps(&mut self, overrides: &[(String, String)]) -> Result<(), String> {
        for (id, tap) in overrides {
            let Some(net) = self.nets.iter_mut().find(|n| n.id() == id.as_str()) else {
                return Err(format!("the VM has no network interface {id}"));
            };
            net.mac = Some(net.mac());
            net.id = Some(id.clone());
            net.tap = tap.clone();
        }
        Ok(())
    }

    /// Puts the vsock device on another host socket (a restore's `vsock_override`, a clone's
    /// own socket); the guest keeps its CID.
    pub fn override_vsock(&mut self, uds_path: &Path) -> Result<(), String> {
        let Some(vsock) = &mut self.vsock else {
            return Err(format!(
                "the VM has no vsock device to put on {}: give no vsock override",
                uds_path.display()
            ));
        };
        vsock.uds_path = uds_path.to_owned();
        vsock.validate().map_err(|e| e.to_string())
    }

    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_shape()?;
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file("initrd", initrd)?;
        }
        Ok(())
    }

    /// Checks the VM's shape (vCPUs, memory, devices) but not the boot files: what a restore,
    /// which needs no kernel, relies on.
    pub fn validate_shape(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        let devices = self.virtio_devices();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if self.disks.iter().filter(|d| d.root).count() > 1 {
            return Err(ConfigError::TwoRootDisks);
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if let Some(id) = &disk.id {
                if self.disks[..i].iter().any(|d| d.id.as_ref() == Some(id)) {
                    return Err(ConfigError::DuplicateDiskId(id.clone()));
                }
            }
            let id = disk.serial();
            // A path without a file name (a directory) derives an empty id; opening the image
            // reports it. An id given empty is refused here.
            let given_empty = disk.id.as_deref() == Some("");
            if given_empty
                || id.len() > MAX_DISK_ID_LEN
                || !id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::BadDiskId(id));
            }
            if let Some(limiter) = &disk.rate_limiter {
                limiter.validate(&id)?;
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            net.validate()?;
            if self.nets[..i].iter().any(|other| other.tap == net.tap) {
                return Err(ConfigError::DuplicateTap(net.tap.clone()));
            }
            if self.nets[..i].iter().any(|other| other.id() == net.id()) {
                return Err(ConfigError::DuplicateNetId(net.id().to_owned()));
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(entropy) = &self.entropy {
            entropy.validate()?;
        }
        Ok(())
    }

    /// How many virtio-mmio slots the VM uses: disks, network interfaces, vsock, entropy.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some())
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Zero vCPUs.
    #[error("a VM needs at least 1 vCPU: set vcpus to 1 or more")]
    NoVcpus,
    /// More vCPUs than KVM or the MP table allow.
    #[error("{requested} vCPUs is more than this host allows ({max}): lower vcpus")]
    TooManyVcpus {
        /// Asked for.
        requested: u8,
        /// The limit.
        max: u8,
    },
    /// Not enough memory.
    #[error("{0} MiB of guest memory is too little: set memory_mib to {MIN_MEMORY_MIB} or more")]
    MemoryTooSmall(u64),
    /// Command line over the kernel's limit.
    #[error("the kernel command line is {0} bytes; the limit is {max} bytes", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// More devices than interrupt lines.
    #[error("{0} virtio devices is more than the {MAX_VIRTIO_DEVICES} ember can wire")]
    TooManyDevices(usize),
    /// A disk id the guest could not read back.
    #[error("disk id {0:?} must be 1 to 20 printable ASCII characters without spaces")]
    BadDiskId(String),
    /// Two disks with the same id.
    #[error("disk id {0:?} is given twice: each disk needs its own id")]
    DuplicateDiskId(String),
    /// More than one root filesystem.
    #[error("only one disk can be the root device")]
    TwoRootDisks,
    /// An interface id that is empty, too long or not printable.
    #[error("network interface id {0:?} must be 1 to 64 printable ASCII characters without spaces")]
    BadNetId(String),
    /// Two interfaces with the same id.
    #[error("network interface id {0:?} is given twice: each interface needs its own id")]
    DuplicateNetId(String),
    /// A rate limiter that cannot work.
    #[error("rate limiter {0}")]
    BadRateLimiter(String),
    /// A TAP name Linux would refuse.
    #[error("TAP name {0:?} must be 1 to {MAX_TAP_NAME_LEN} characters without '/', ':' or spaces")]
    BadTapName(String),
    /// The same TAP twice.
    #[error("TAP {0} is given twice: each interface needs its own TAP")]
    DuplicateTap(String),
    /// Not a MAC address.
    #[error(transparent)]
    MacSyntax(#[from] MacParseError),
    /// A MAC address a NIC cannot have.
    #[error("MAC address {0} is a group (multicast) or zero address: the first byte must be even")]
    BadMac(MacAddr),
    /// A vsock CID that is reserved or too large.
    #[error("vsock CID {0} is reserved or too large: use 3 to 4294967294")]
    BadGuestCid(u64),
    /// A vsock device without a CID (`--vsock uds=PATH` outside a restore).
    #[error("a vsock device needs the guest's CID: cid=N,uds=PATH")]
    VsockNeedsCid,
    /// A vsock socket path a Unix socket cannot have.
    #[error("vsock socket path {} must be 1 to {} bytes", .0.display(), vsock::MAX_UDS_PATH_LEN)]
    BadVsockPath(PathBuf),
    /// A file that does not exist.
    #[error("{what} file {} does not exist: check the path", .path.display())]
    Missing {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A directory where a file was expected.
    #[error("{what} {} is a directory: give the path of the {what} file", .path.display())]
    Directory {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A file that cannot be read.
    #[error("cannot read {what} file {}", .path.display())]
    Unreadable {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ConfigError::Missing {
            what,
            path: path.to_owned(),
        },
        _ => ConfigError::Unreadable {
            what,
            path: path.to_owned(),
            source,
        },
    })?;
    if meta.is_dir() {
        return Err(ConfigError::Directory {
            what,
            path: path.to_owned(),
        });
    }
    File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::Unreadable {
            what,
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_from_outside_chooses_no_host_settings() {
        let mut config = VmConfig::new("/k");
        config.console = ConsoleConfig::File("/etc/passwd".into());
        config.metrics_path = Some("/etc/shadow".into());
        config.kvm_device = "/dev/sda".into();
        config.seccomp = false;
        config.vcpus = 3;
        config.reset_host_settings();
        assert_eq!(config.console, ConsoleConfig::None);
        assert_eq!(config.metrics_path, None);
        assert_eq!(config.kvm_device, PathBuf::from("/dev/kvm"));
        assert!(config.seccomp);
        assert_eq!(config.vcpus, 3, "the shape stays");
    }

    fn config() -> VmConfig {
        // Any readable file passes validation; loading decides whether it is a kernel.
        VmConfig::new("/proc/self/exe")
    }

    #[test]
    fn defaults_are_valid() {
        let c = config();
        assert_eq!((c.vcpus, c.memory_mib), (1, DEFAULT_MEMORY_MIB));
        c.validate().unwrap();
    }

    #[test]
    fn zero_cpus_and_memory_are_refused() {
        let mut c = config();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::NoVcpus)));
        let mut c = config();
        c.memory_mib = 0;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(0))));
    }

    #[test]
    fn missing_kernel_and_directory_initrd_are_named() {
        let mut c = config();
        c.kernel = PathBuf::from("/nonexistent/vmlinux");
        let err = c.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::Missing { what: "kernel", .. }),
            "{err}"
        );
        let mut c = config();
        c.initrd = Some(PathBuf::from("/tmp"));
        let err = c.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::Directory { what: "initrd", .. }),
            "{err}"
        );
    }

    /// Found by the `config` fuzz target: an embedder's `DiskConfig` with `id: Some("")`
    /// passed validation (only the length limit and the characters were checked), and the
    /// guest got an empty serial, though the error says ids are 1 to 20 characters.
    #[test]
    fn an_empty_disk_id_is_refused() {
        let mut c = config();
        let mut disk = DiskConfig::new("/img");
        disk.id = Some(String::new());
        c.disks.push(disk);
        assert!(matches!(c.validate(), Err(ConfigError::BadDiskId(id)) if id.is_empty()));
        c.disks[0].id = Some("d".into());
        c.validate().unwrap();
    }

    #[test]
    fn the_root_disk_boots_first_with_root_on_the_command_line() {
        let mut c = config();
        c.disks.push(DiskConfig::new("/data"));
        let mut root = DiskConfig::new("/rootfs");
        root.root = true;
        root.read_only = true;
        c.disks.push(root);
        let boot = c.for_boot();
        assert_eq!(boot.disks[0].path, PathBuf::from("/rootfs"));
        assert!(
            boot.cmdline.ends_with(" root=/dev/vda ro"),
            "{}",
            boot.cmdline
        );
        assert_eq!(
            c.cmdline, DEFAULT_CMDLINE,
            "the stored config keeps its command line"
        );
        c.disks[0].root = true;
        assert!(matches!(c.validate(), Err(ConfigError::TwoRootDisks)));
    }

    #[test]
    fn duplicate_disk_and_interface_ids_are_refused() {
        let mut c = config();
        let mut a = DiskConfig::new("/a");
        a.id = Some("x".into());
        c.disks = vec![a.clone(), a];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateDiskId(_))));
        let mut c = config();
        let mut n = NetConfig::new("tap0");
        n.id = Some("eth0".into());
        let mut m = NetConfig::new("tap1");
        m.id = Some("eth0".into());
        c.nets = vec![n, m];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateNetId(_))));
    }

    #[test]
    fn serde_is_strict_and_fills_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "cpus": 2}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpus": 300}"#).is_err());
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mut c = config();
        c.cmdline = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(_))));
    }
}
