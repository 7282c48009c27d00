//! `ember run`: boot a kernel with its console on this terminal.

use std::path::PathBuf;

use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

use clap::{Args, ValueEnum};

use super::exit_code;
use super::signals::SignalGuard;
use super::terminal::RawTerminal;
use ember::StartError;
use ember::config::{RateLimiterConfig, VsockConfig, parse_bucket};
use ember::sandbox::{ThreadKind, seccomp};
use ember::{
    BootProtocol, ConfigError, ConsoleConfig, DEFAULT_CMDLINE, DiskConfig, ExitReason, NetConfig,
    Vm, VmConfig,
};

/// `ember run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF vmlinux (PVH entry if it has the note) or a bzImage. Without it
    /// (and with --api-sock) the VM is configured and started through the API.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["api_sock", "restore", "incoming"],
        conflicts_with_all = ["restore", "incoming"]
    )]
    pub kernel: Option<PathBuf>,

    /// Restore the snapshot in DIR (its `vmstate` and `memory` files) instead of booting: the
    /// VM resumes where it was. `--net tap=NAME,id=ID` gives interface ID another TAP;
    /// `--serial` chooses the console; the rest of the shape is the snapshot's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["api_sock", "initrd", "rootfs", "disks"])]
    pub restore: Option<PathBuf>,

    /// Wait at URL (unix:PATH or tcp:HOST:PORT) for a VM migrating from another ember, and run
    /// it (docs/migration.md). `--net tap=NAME,id=ID` puts interface ID on another TAP;
    /// `--serial` chooses the console; the rest of the shape is the source's.
    #[arg(long, value_name = "URL", conflicts_with_all = ["api_sock", "restore", "initrd", "rootfs", "disks"])]
    pub incoming: Option<String>,

    /// The secret a migration's two ends share (required over TCP; `--incoming`, or the
    /// destination's `PUT /migration/receive` token). Also read from EMBER_MIGRATION_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    pub migration_token: Option<String>,

    /// Guest memory in a memfd, shared: a migration to another ember on this host hands it
    /// over instead of copying it (local mode).
    #[arg(long)]
    pub shared_memory: bool,

    /// Serve Firecracker's REST API on this Unix socket (docs/api.md).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// The instance's name in the API (`GET /`).
    #[arg(
        long,
        value_name = "NAME",
        requires = "api_sock",
        default_value = "anonymous-instance"
    )]
    pub id: String,

    /// Boot at once from Firecracker's JSON configuration (the sections of `GET /vm/config`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "api_sock",
        conflicts_with = "kernel"
    )]
    pub config_file: Option<PathBuf>,

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

    /// A virtio-blk disk: path=FILE[,readonly=on][,direct=on][,id=NAME][,engine=io_uring|sync]
    /// [,bw=BYTES/MS[/BURST]][,ops=COUNT/MS[/BURST]] (token buckets: size, refill time in ms,
    /// one-time burst); repeat for more (vdb, vdc...).
    #[arg(long = "disk", value_parser = parse_disk, value_name = "SPEC")]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net interface on a host TAP: tap=NAME[,mac=MAC][,id=NAME]; repeat for more (eth0,
    /// eth1...). A missing TAP is created (it lasts as long as ember) when ember may. `id` names
    /// the interface for the API (default: the TAP's name).
    /// A virtio-net interface on a host TAP: tap=NAME[,mac=MAC][,rx_bw=..][,rx_ops=..][,tx_bw=..]
    /// [,tx_ops=..] (each SIZE/MS[/BURST], as for --disk); repeat for more (eth0, eth1...).
    /// A missing TAP is created (it lasts as long as ember) when ember may.
    #[arg(long = "net", value_parser = parse_net, value_name = "SPEC")]
    pub nets: Vec<NetSpec>,

    /// virtio-vsock (Firecracker's hybrid vsock): cid=N,uds=PATH. Host programs connect to PATH
    /// and write `CONNECT <port>\n`; guest connections to CID 2 port P reach PATH_P. With
    /// --restore, uds=PATH puts the restored VM's device on another socket (it keeps its CID).
    #[arg(long, value_parser = parse_vsock, value_name = "SPEC")]
    pub vsock: Option<VsockSpec>,

    /// A virtio-rng device: random bytes from the host for the guest's generator (Linux's
    /// virtio-rng driver). `--entropy` is unlimited; `--entropy=bw=SIZE/MS[/BURST],ops=..`
    /// limits its bytes and requests, as for --disk.
    #[arg(
        long,
        value_parser = parse_entropy,
        value_name = "LIMITS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    pub entropy: Option<ember::config::EntropyConfig>,

    /// Enable the boot timer (Firecracker-compatible): a guest write of 123 to 0xC000_0000 logs
    /// the time since ember started (at --log-level info).
    #[arg(long)]
    pub boot_timer: bool,

    /// On SIGTERM, ask the guest to shut down (Ctrl-Alt-Del, when a guest driver listens on the
    /// i8042) and stop it only if it is still running SECS later; 0 stops it at once.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_timeout)]
    pub shutdown_timeout: f64,

    /// Record the pages the guest (and ember) write, so that Diff snapshots can be taken
    /// (`PUT /snapshot/create` with `"snapshot_type": "Diff"`; `ember ctl snapshot --diff`). With
    /// --api-sock, a snapshot loaded through the API tracks them too.
    #[arg(long)]
    pub track_dirty_pages: bool,

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

    /// Debug builds only: the first guest write to COM1 panics the vCPU thread making it.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    pub panic_selftest: bool,

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

/// `--vsock`: `cid=N,uds=PATH`, or `uds=PATH` alone for a restore (the CID is the snapshot's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's CID.
    pub cid: Option<u64>,
    /// The host socket.
    pub uds: PathBuf,
}

fn parse_vsock(value: &str) -> Result<VsockSpec, String> {
    if let Some(uds) = value.strip_prefix("uds=").filter(|p| !p.contains(',')) {
        if uds.is_empty() {
            return Err("missing uds=PATH".into());
        }
        return Ok(VsockSpec {
            cid: None,
            uds: PathBuf::from(uds),
        });
    }
    let config: ember::config::VsockConfig = value.parse()?;
    Ok(VsockSpec {
        cid: Some(config.guest_cid),
        uds: config.uds_path,
    })
}

fn parse_entropy(value: &str) -> Result<ember::config::EntropyConfig, String> {
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
            Some(("engine", engine)) => disk.io_engine = engine.parse()?,
            Some(("bw", rate)) => {
                disk.rate_limiter.get_or_insert_default().bandwidth = Some(parse_bucket(rate)?)
            }
            Some(("ops", rate)) => {
                disk.rate_limiter.get_or_insert_default().ops = Some(parse_bucket(rate)?)
            }
            _ => {
                return Err(format!(
                    "unknown item {item:?}: expected path=FILE[,readonly=on][,direct=on][,id=NAME][,engine=io_uring|sync][,bw=SIZE/MS][,ops=SIZE/MS]"
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
    id: Option<String>,
    rx: Option<RateLimiterConfig>,
    tx: Option<RateLimiterConfig>,
}

fn parse_net(value: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    let mut id = None;
    let mut rx: Option<RateLimiterConfig> = None;
    let mut tx: Option<RateLimiterConfig> = None;
    for item in value.split(',') {
        match item.split_once('=') {
            Some(("tap", name)) => tap = Some(name.to_owned()),
            Some(("mac", addr)) => mac = Some(addr.to_owned()),
            Some(("id", name)) => id = Some(name.to_owned()),
            Some(("rx_bw", rate)) => {
                rx.get_or_insert_default().bandwidth = Some(parse_bucket(rate)?)
            }
            Some(("rx_ops", rate)) => rx.get_or_insert_default().ops = Some(parse_bucket(rate)?),
            Some(("tx_bw", rate)) => {
                tx.get_or_insert_default().bandwidth = Some(parse_bucket(rate)?)
            }
            Some(("tx_ops", rate)) => tx.get_or_insert_default().ops = Some(parse_bucket(rate)?),
            _ => {
                return Err(format!(
                    "unknown item {item:?}: expected tap=NAME[,mac=MAC][,id=NAME][,rx_bw=SIZE/MS][,rx_ops=SIZE/MS][,tx_bw=SIZE/MS][,tx_ops=SIZE/MS]"
                ));
            }
        }
    }
    let tap = tap.ok_or("missing tap=NAME")?;
    Ok(NetSpec {
        tap,
        mac,
        id,
        rx,
        tx,
    })
}

impl NetSpec {
    fn to_config(&self) -> Result<NetConfig, ConfigError> {
        let mut net = NetConfig::new(&self.tap);
        net.id = self.id.clone();
        if let Some(mac) = &self.mac {
            net.mac = Some(mac.parse()?);
        }
        net.rx_rate_limiter = self.rx;
        net.tx_rate_limiter = self.tx;
        Ok(net)
    }
}

impl RunArgs {
    /// The library configuration these options describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = VmConfig::new(self.kernel.clone().unwrap_or_default());
        config.initrd = self.initrd.clone();
        config.metrics_path = self.metrics_path.clone();
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
        config.vsock = match &self.vsock {
            Some(VsockSpec {
                cid: Some(cid),
                uds,
            }) => Some(VsockConfig::new(*cid, uds)),
            Some(VsockSpec { cid: None, .. }) => return Err(ConfigError::VsockNeedsCid),
            None => None,
        };
        config.entropy = self.entropy.clone();
        config.boot_timer = self.boot_timer;
        config.track_dirty_pages = self.track_dirty_pages;
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
        config.shared_memory = self.shared_memory;
        config.console = self.serial.clone();
        config.boot_protocol = match self.boot_protocol {
            Protocol::Auto => BootProtocol::Auto,
            Protocol::Linux => BootProtocol::Linux,
            Protocol::Pvh => BootProtocol::Pvh,
        };
        Ok(config)
    }
}

fn parse_timeout(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{value:?} is not a number of seconds from 0 to 3600"
        )),
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
    /// `--restore`.
    #[error("--restore")]
    Restore(#[source] Box<ember::vmm::RestoreError>),
    /// A `--net` override without `id=`.
    #[error(
        "--net with --restore or --incoming overrides an interface of the VM: name it with id="
    )]
    RestoreNetNeedsId,
    /// `--incoming`.
    #[error("--incoming")]
    Incoming(#[source] Box<ember::migration::MigrationError>),
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
        RunError::Start(StartError::Metrics(_)) => Some("--metrics-path"),
        _ => None,
    }
}

/// Runs the VM to its end; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32, RunError> {
    if let Some(socket) = &args.api_sock {
        return Ok(super::api_run::run(args, socket)?);
    }
    #[cfg(debug_assertions)]
    ember::devices::legacy::serial::PANIC_SELFTEST
        .store(args.panic_selftest, std::sync::atomic::Ordering::Relaxed);
    let (mut vm, config) = match (&args.restore, &args.incoming) {
        (Some(dir), _) => restore(args, dir)?,
        (None, Some(url)) => super::incoming::incoming(args, url)?,
        (None, None) => {
            let config = args.to_config().map_err(ember::StartError::from)?;
            (Vm::start(&config)?, config)
        }
    };
    // Looked up while the guest already runs, before the main thread's filter refuses it.
    let pvm_host = ember::exit::host_is_pvm();
    let signal_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(ember::StartError::Eventfd)?;
    let signals = signal_evt.try_clone().and_then(SignalGuard::install);
    if let Err(e) = &signals {
        log::warn!("Ctrl-C/SIGTERM will not stop the VM cleanly: {e}");
    }
    let raw = (config.console == ConsoleConfig::Stdio)
        .then(|| RawTerminal::enable(config.seccomp))
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
    // The library writes the last metrics line at the end; this loop the periodic ones.
    let waiting = super::run_loop::Waiting {
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        periodic_metrics: config.metrics_path.is_some(),
    };
    let reason = super::run_loop::wait_for_end(&mut vm, &signal_evt, &waiting);
    drop(raw);
    for (phase, at) in vm.timeline() {
        log::debug!("timeline: {phase:?} at {} us", at.as_micros());
    }
    drop(signals);
    if super::signals::panicked() {
        // The panic's own line said what happened.
        eprintln!("ember: the VM was stopped because an ember thread panicked");
        return Ok(exit_code::ERROR);
    }
    Ok(report(&reason, pvm_host))
}

/// `--restore DIR`: the snapshot's VM with this run's console and TAP overrides, resumed.
fn restore(args: &RunArgs, dir: &std::path::Path) -> Result<(Vm, VmConfig), RunError> {
    let overrides = tap_overrides(args)?;
    let paths = ember::vmm::persist::SnapshotPaths::in_dir(dir);
    let console = args.serial.clone();
    let seccomp = args.seccomp == Switch::On;
    let metrics_path = args.metrics_path.clone();
    let (vm, config) = Vm::restore(
        &paths,
        |config| {
            config.console = console;
            config.seccomp = seccomp;
            config.metrics_path = metrics_path;
            config.override_taps(&overrides)?;
            let Some(spec) = &args.vsock else {
                return Ok(());
            };
            let saved = config.vsock.as_ref().map(|v| v.guest_cid);
            if spec.cid.is_some() && spec.cid != saved {
                return Err(format!(
                    "--vsock cid= must be the snapshot's ({}) or left out: a restored guest keeps its CID",
                    saved.map_or_else(|| "none".to_owned(), |c| c.to_string())
                ));
            }
            config.override_vsock(&spec.uds)
        },
        true,
    )
    .map_err(|e| RunError::Restore(Box::new(e)))?;
    Ok((vm, config))
}

/// `--net` flags as overrides of a restored or migrated VM's interfaces (each names its `id`).
pub(super) fn tap_overrides(args: &RunArgs) -> Result<Vec<(String, String)>, RunError> {
    args.nets
        .iter()
        .map(|spec| {
            let net = spec.to_config().map_err(ember::StartError::from)?;
            let id = net.id.clone().ok_or(RunError::RestoreNetNeedsId)?;
            Ok((id, net.tap))
        })
        .collect()
}

/// Prints what ended the VM (one line, when it is news; a second saying what to do, when
/// ember knows) and picks the exit code.
pub(super) fn report(reason: &ExitReason, pvm_host: bool) -> i32 {
    if let Some(advice) = reason.advice(pvm_host) {
        eprintln!("ember: {reason}");
        eprintln!("ember: {advice}");
        return exit_code::GUEST_FAILURE;
    }
    if let Some(rip) = reason.rip() {
        log::debug!("guest RIP at exit: {rip:#x}");
    }
    match reason {
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Migrated => {
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

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        use clap::Parser;
        let argv = [&["ember", "run", "--kernel", "/k"], args].concat();
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Run(run) => Ok(run),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn entropy_takes_no_value_or_limits_after_an_equals_sign() {
        assert_eq!(run_args(&[]).unwrap().entropy, None);
        let plain = run_args(&["--entropy", "--cpus", "2"]).unwrap();
        assert_eq!(plain.entropy, Some(ember::EntropyConfig::default()));
        assert_eq!(plain.cpus, 2);
        let limited = run_args(&["--entropy=bw=4096/100"])
            .unwrap()
            .entropy
            .unwrap();
        assert_eq!(limited.rate_limiter.unwrap().bandwidth.unwrap().size, 4096);
        assert!(run_args(&["--entropy=speed=1"]).is_err());
    }

    #[test]
    fn net_specs_take_an_id() {
        let net = parse_net("tap=tap0,id=eth0").unwrap().to_config().unwrap();
        assert_eq!((net.tap.as_str(), net.id()), ("tap0", "eth0"));
        let net = parse_net("tap=tap1").unwrap().to_config().unwrap();
        assert_eq!(net.id(), "tap1");
        assert!(parse_net("tap=tap0,name=x").is_err());
    }

    #[test]
    fn disk_engines_and_rate_limits_parse() {
        use ember::config::IoEngine;
        let d = parse_disk("path=/img,engine=sync,bw=131072/125,ops=100/1000/50").unwrap();
        assert_eq!(d.io_engine, IoEngine::Sync);
        let limiter = d.rate_limiter.unwrap();
        let bw = limiter.bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.refill_time, bw.one_time_burst),
            (131072, 125, None)
        );
        let ops = limiter.ops.unwrap();
        assert_eq!(
            (ops.size, ops.refill_time, ops.one_time_burst),
            (100, 1000, Some(50))
        );
        assert_eq!(
            parse_disk("path=/img").unwrap().io_engine,
            IoEngine::Auto,
            "io_uring where the kernel allows it"
        );
        assert_eq!(
            parse_disk("path=/img,engine=io_uring").unwrap().io_engine,
            IoEngine::Async
        );
        for bad in [
            "path=/img,engine=aio",
            "path=/img,bw=1",
            "path=/img,ops=a/b",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_rate_limits_parse() {
        let net = parse_net("tap=tap0,rx_bw=1000/100,tx_ops=10/100")
            .unwrap()
            .to_config()
            .unwrap();
        let rx = net.rx_rate_limiter.unwrap();
        assert_eq!(rx.bandwidth.map(|b| b.size), Some(1000));
        assert!(rx.ops.is_none());
        let tx = net.tx_rate_limiter.unwrap();
        assert_eq!(tx.ops.map(|b| b.refill_time), Some(100));
        assert!(parse_net("tap=tap0,rx_bw=").is_err());
    }

    #[test]
    fn vsock_specs_take_the_cid_or_only_a_socket() {
        let both = parse_vsock("cid=3,uds=/a").unwrap();
        assert_eq!((both.cid, both.uds), (Some(3), PathBuf::from("/a")));
        let uds = parse_vsock("uds=/b").unwrap();
        assert_eq!((uds.cid, uds.uds), (None, PathBuf::from("/b")));
        assert!(parse_vsock("uds=").is_err());
        assert!(parse_vsock("uds=/b,port=3").is_err());
        assert!(parse_vsock("cid=3").is_err());
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
