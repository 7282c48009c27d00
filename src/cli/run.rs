//! `ember run`: boot a kernel with its console on this terminal.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::exit_code;
use super::signals::SignalGuard;
use super::terminal::RawTerminal;
use ember::StartError;
use ember::sandbox::{ThreadKind, seccomp};
use ember::vmm::metrics::MetricsFile;
use ember::{
    BootProtocol, ConfigError, ConsoleConfig, DEFAULT_CMDLINE, DiskConfig, ExitReason, NetConfig,
    Vm, VmConfig,
};

/// `ember run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF vmlinux (PVH entry if it has the note) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk (cpio, compressed or not).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = ember::config::DEFAULT_MEMORY_MIB, value_name = "MIB")]
    pub memory: u64,

    /// Serial console: stdio, none, or file=PATH.
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "WHERE")]
    pub serial: ConsoleConfig,

    /// Root filesystem image: the first disk (/dev/vda), with `root=/dev/vda rw` added to the
    /// command line.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,

    /// A virtio-blk disk: path=FILE[,readonly=on][,direct=on][,id=NAME]; repeat for more (vdb, vdc...).
    #[arg(long = "disk", value_parser = parse_disk, value_name = "SPEC")]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net interface on a host TAP: tap=NAME[,mac=MAC]; repeat for more (eth0, eth1...).
    /// A missing TAP is created (it lasts as long as ember) when ember may.
    #[arg(long = "net", value_parser = parse_net, value_name = "SPEC")]
    pub nets: Vec<NetSpec>,

    /// virtio-vsock (Firecracker's hybrid vsock): cid=N,uds=PATH. Host programs connect to PATH
    /// and write `CONNECT <port>\n`; guest connections to CID 2 port P reach PATH_P.
    #[arg(long, value_parser = parse_vsock, value_name = "SPEC")]
    pub vsock: Option<ember::config::VsockConfig>,

    /// Enable the boot timer (Firecracker-compatible): a guest write of 123 to 0xC000_0000 logs
    /// the time since ember started (at --log-level info).
    #[arg(long)]
    pub boot_timer: bool,

    /// Write the VM's metrics to PATH, one JSON object per line, every 60 s and at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// Seccomp filters on ember's threads: on, or off for debugging (never with untrusted guests).
    #[arg(long, value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub seccomp: Switch,

    /// Debug builds only: a thread (vcpu or events) makes a forbidden system call once filtered.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true, value_enum, value_name = "THREAD")]
    pub seccomp_selftest: Option<SelftestThread>,

    /// Entry protocol: auto (PVH if the kernel has the note), linux (64-bit boot protocol) or pvh.
    #[arg(long, value_enum, default_value_t = Protocol::Auto, value_name = "PROTOCOL")]
    pub boot_protocol: Protocol,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// `--seccomp-selftest` values.
#[cfg(debug_assertions)]
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SelftestThread {
    /// A vCPU thread.
    Vcpu,
    /// The event-loop thread.
    Events,
}

/// `--boot-protocol` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Protocol {
    /// PVH if the ELF has the note, else the 64-bit Linux boot protocol.
    Auto,
    /// The 64-bit Linux boot protocol.
    Linux,
    /// PVH.
    Pvh,
}

fn parse_serial(value: &str) -> Result<ConsoleConfig, String> {
    match value {
        "stdio" => Ok(ConsoleConfig::Stdio),
        "none" => Ok(ConsoleConfig::None),
        _ => match value.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err("expected stdio, none or file=PATH".into()),
        },
    }
}

fn parse_vsock(value: &str) -> Result<ember::config::VsockConfig, String> {
    value.parse()
}

fn parse_disk(value: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut disk = DiskConfig::new("");
    for item in value.split(',') {
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("readonly", "on" | "true")) => disk.read_only = true,
            Some(("readonly", "off" | "false")) => disk.read_only = false,
            Some(("direct", "on" | "true")) => disk.direct = true,
            Some(("direct", "off" | "false")) => disk.direct = false,
            Some(("id", id)) if !id.is_empty() => disk.id = Some(id.to_owned()),
            _ => {
                return Err(format!(
                    "unknown item {item:?}: expected path=FILE[,readonly=on][,direct=on][,id=NAME]"
                ));
            }
        }
    }
    disk.path = path.ok_or("missing path=FILE")?;
    Ok(disk)
}

/// A `--net` value as given; its name and address are checked with the rest of the config,
/// so that a bad one is a one-line error like any other.
#[derive(Clone, Debug)]
pub struct NetSpec {
    tap: String,
    mac: Option<String>,
}

fn parse_net(value: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    for item in value.split(',') {
        match item.split_once('=') {
            Some(("tap", name)) => tap = Some(name.to_owned()),
            Some(("mac", addr)) => mac = Some(addr.to_owned()),
            _ => {
                return Err(format!(
                    "unknown item {item:?}: expected tap=NAME[,mac=MAC]"
                ));
            }
        }
    }
    let tap = tap.ok_or("missing tap=NAME")?;
    Ok(NetSpec { tap, mac })
}

impl NetSpec {
    fn to_config(&self) -> Result<NetConfig, ConfigError> {
        let mut net = NetConfig::new(&self.tap);
        if let Some(mac) = &self.mac {
            net.mac = Some(mac.parse()?);
        }
        Ok(net)
    }
}

impl RunArgs {
    /// The library configuration these options describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = VmConfig::new(&self.kernel);
        config.initrd = self.initrd.clone();
        config.cmdline = self.cmdline.clone();
        if let Some(rootfs) = &self.rootfs {
            let mut disk = DiskConfig::new(rootfs);
            disk.id = Some("rootfs".into());
            config.disks.push(disk);
            config.cmdline.push_str(" root=/dev/vda rw");
        }
        config.disks.extend(self.disks.iter().cloned());
        config.nets = self
            .nets
            .iter()
            .map(NetSpec::to_config)
            .collect::<Result<_, _>>()?;
        config.vsock = self.vsock.clone();
        config.boot_timer = self.boot_timer;
        config.seccomp = self.seccomp == Switch::On;
        #[cfg(debug_assertions)]
        {
            config.seccomp_selftest = self.seccomp_selftest.map(|t| match t {
                SelftestThread::Vcpu => ember::sandbox::ThreadKind::Vcpu,
                SelftestThread::Events => ember::sandbox::ThreadKind::Events,
            });
        }
        config.vcpus = self.cpus;
        config.memory_mib = self.memory;
        config.console = self.serial.clone();
        config.boot_protocol = match self.boot_protocol {
            Protocol::Auto => BootProtocol::Auto,
            Protocol::Linux => BootProtocol::Linux,
            Protocol::Pvh => BootProtocol::Pvh,
        };
        Ok(config)
    }
}

/// `ember run` failed before the VM ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM did not start.
    #[error(transparent)]
    Start(#[from] ember::StartError),
    /// A seccomp filter for this thread.
    #[error(transparent)]
    Seccomp(#[from] ember::sandbox::SeccompError),
    /// `--metrics-path`.
    #[error("--metrics-path")]
    Metrics(#[from] ember::vmm::metrics::MetricsFileError),
}

/// The `ember run` flag behind the library setting an error names, for the one-line report.
pub fn flag_for(error: &RunError) -> Option<&'static str> {
    use ember::ConfigError;
    use ember::loader::LoaderError;
    match error {
        RunError::Start(StartError::Config(
            ConfigError::NoVcpus | ConfigError::TooManyVcpus { .. },
        )) => Some("--cpus"),
        RunError::Start(StartError::Config(ConfigError::MemoryTooSmall(_)))
        | RunError::Start(StartError::Loader(
            LoaderError::KernelTooBig { .. } | LoaderError::InitrdTooBig { .. },
        )) => Some("--memory"),
        RunError::Start(StartError::Loader(LoaderError::NoPvhEntry)) => Some("--boot-protocol"),
        _ => None,
    }
}

/// Runs the VM to its end; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32, RunError> {
    let config = args.to_config().map_err(ember::StartError::from)?;
    let mut metrics = match &args.metrics_path {
        Some(path) => Some(MetricsFile::open(path)?),
        None => None,
    };
    let mut vm = Vm::start(&config)?;
    let signals = vm.stop_trigger().and_then(SignalGuard::install);
    if let Err(e) = &signals {
        log::warn!("Ctrl-C/SIGTERM will not stop the VM cleanly: {e}");
    }
    let raw = (config.console == ConsoleConfig::Stdio)
        .then(RawTerminal::enable)
        .flatten();
    if config.seccomp {
        // From here this thread only waits, tears down and restores the terminal.
        let filter =
            seccomp::ThreadFilter::new(ThreadKind::Main, None).and_then(|f| seccomp::apply(&f));
        if let Err(e) = filter {
            drop(raw);
            return Err(e.into());
        }
    }
    let reason = loop {
        let Some(metrics) = metrics.as_mut() else {
            break vm.wait();
        };
        if let Some(reason) = vm.wait_timeout(MetricsFile::INTERVAL) {
            break reason;
        }
        if let Err(e) = metrics.write(&vm.metrics()) {
            log::warn!("cannot write metrics: {e}");
        }
    };
    if let Some(metrics) = metrics.as_mut() {
        if let Err(e) = metrics.write(&vm.metrics()) {
            log::warn!("cannot write metrics: {e}");
        }
    }
    drop(raw);
    for (phase, at) in vm.timeline() {
        log::debug!("timeline: {phase:?} at {} us", at.as_micros());
    }
    drop(signals);
    Ok(report(&reason))
}

/// Prints what ended the VM (one line, when it is news) and picks the exit code.
fn report(reason: &ExitReason) -> i32 {
    if let Some(rip) = reason.rip() {
        log::debug!("guest RIP at exit: {rip:#x}");
    }
    match reason {
        ExitReason::Reset | ExitReason::PowerOff => {
            log::info!("{reason}");
            exit_code::SUCCESS
        }
        ExitReason::Stopped => match SignalGuard::received() {
            Some(signal) => {
                log::info!("stopped by signal {signal}");
                exit_code::SIGNAL_BASE + signal
            }
            None => exit_code::SUCCESS,
        },
        ExitReason::VmmError(_) => {
            eprintln!("ember: {reason}");
            exit_code::ERROR
        }
        _ => {
            eprintln!("ember: {reason}");
            exit_code::GUEST_FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse() {
        let d = parse_disk("path=/img,readonly=on,id=data").unwrap();
        assert_eq!(
            (d.path.to_str(), d.read_only, d.id.as_deref()),
            (Some("/img"), true, Some("data"))
        );
        assert!(!parse_disk("path=/img").unwrap().read_only);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=/img,ro").is_err());
        assert!(parse_disk("path=/img,readonly=maybe").is_err());
    }

    #[test]
    fn serial_values_parse() {
        assert_eq!(parse_serial("stdio"), Ok(ConsoleConfig::Stdio));
        assert_eq!(parse_serial("none"), Ok(ConsoleConfig::None));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }
}
