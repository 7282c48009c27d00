//! `ember jail [OPTIONS] -- run ...`: `ember run` inside a jail (see `ember::sandbox::jail`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser};

use super::{Cli, Command, exit_code, run};
use ember::sandbox::jail::{
    Access, CgroupLimit, DEFAULT_NOFILE, Jail, JailConfig, JailError, JailOutcome,
};

/// `ember jail` options.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ember jail --id vm1 --uid 10000 --gid 10000 --chroot-base /srv/jail \\\n    --cgroup cpu.max=\"50000 100000\" --cgroup memory.max=256M \\\n    -- run --kernel vmlinux --rootfs rootfs.ext4"
)]
pub struct JailArgs {
    /// Names the jail (`<chroot-base>/ember/<id>`) and its cgroup: letters, digits, '-', '_'.
    #[arg(long, value_name = "ID")]
    pub id: String,

    /// The VMM's uid.
    #[arg(long, value_name = "UID")]
    pub uid: u32,

    /// The VMM's gid.
    #[arg(long, value_name = "GID")]
    pub gid: u32,

    /// Directory under which `ember/<id>/root` is made. The files the VM uses are bound into it
    /// (read-only unless a writable disk), so they may be on any file system; their owner and
    /// mode are never changed: --uid/--gid must be allowed to read them (and write a writable
    /// disk).
    #[arg(long, value_name = "DIR")]
    pub chroot_base: PathBuf,

    /// A cgroup v2 limit for the VMM, e.g. memory.max=256M, cpu.max="50000 100000", pids.max=64;
    /// repeat for more.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    pub cgroups: Vec<String>,

    /// The cgroup (relative to the cgroup root, existing, e.g. delegated to you) to make the
    /// jail's cgroup `<id>` in; default: `ember/<id>` under ember jail's own cgroup.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<PathBuf>,

    /// Network namespace to run in (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// RLIMIT_NOFILE of the VMM.
    #[arg(long, default_value_t = DEFAULT_NOFILE, value_name = "N")]
    pub rlimit_nofile: u64,

    /// RLIMIT_FSIZE of the VMM, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub rlimit_fsize: Option<u64>,

    /// Allow uid or gid 0 for the VMM (it still gets no capabilities).
    #[arg(long)]
    pub allow_root: bool,

    /// Keep the jail directory and cgroup after the VMM exits.
    #[arg(long)]
    pub keep: bool,

    /// The VMM command: `run` and its options (give `--log-level` before `jail`: it applies to
    /// both).
    #[arg(last = true, required = true, value_name = "run OPTIONS")]
    pub vmm: Vec<OsString>,
}

/// Why `ember jail` could not run the VMM.
#[derive(Debug, thiserror::Error)]
pub enum JailCliError {
    /// Not `-- run ...`.
    #[error("ember jail runs a VM: give `-- run --kernel ...` after the jail options")]
    NotRun,
    /// The jail.
    #[error(transparent)]
    Jail(#[from] JailError),
}

/// Builds the jail, runs `ember run` in it and maps how it ended to an exit code.
pub fn run(args: &JailArgs) -> Result<i32, JailCliError> {
    let inner = std::iter::once(OsString::from("ember")).chain(args.vmm.iter().cloned());
    let mut run_args = match Cli::try_parse_from(inner) {
        Ok(Cli {
            command: Command::Run(run_args),
            ..
        }) => run_args,
        Ok(_) => return Err(JailCliError::NotRun),
        Err(e) => e.exit(),
    };
    let cgroups = args
        .cgroups
        .iter()
        .map(|spec| CgroupLimit::parse(spec))
        .collect::<Result<_, _>>()?;
    let mut jail = Jail::create(JailConfig {
        id: args.id.clone(),
        uid: args.uid,
        gid: args.gid,
        allow_root: args.allow_root,
        chroot_base: args.chroot_base.clone(),
        cgroups,
        parent_cgroup: args.parent_cgroup.clone(),
        netns: args.netns.clone(),
        nofile: args.rlimit_nofile,
        fsize: args.rlimit_fsize,
        keep: args.keep,
        guest_memory_mib: run_args.memory,
    })?;
    if let Some(kernel) = &run_args.kernel {
        run_args.kernel = Some(jail.add_file(kernel, Access::ReadOnly)?);
    }
    if let Some(initrd) = &run_args.initrd {
        run_args.initrd = Some(jail.add_file(initrd, Access::ReadOnly)?);
    }
    if let Some(rootfs) = &run_args.rootfs {
        run_args.rootfs = Some(jail.add_file(rootfs, Access::ReadWrite)?);
    }
    for disk in &mut run_args.disks {
        let access = if disk.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        disk.path = jail.add_file(&disk.path, access)?;
    }
    // Sockets are made by the VMM inside the jail: host programs find them under its root.
    if let Some(vsock) = &run_args.vsock {
        let host = jail.add_socket(&vsock.uds)?;
        log::info!("vsock socket on the host: {}", host.display());
    }
    if let Some(api) = &run_args.api_sock {
        let host = jail.add_socket(api)?;
        log::info!("API socket on the host: {}", host.display());
    }
    log::info!("jail {} ready", jail.dir().display());
    let outcome = jail.run(|| {
        run::run(&run_args).unwrap_or_else(|e| {
            eprintln!("ember: {}", ember::error_chain(&e));
            exit_code::ERROR
        })
    })?;
    Ok(match outcome {
        JailOutcome::Exited(code) => code,
        JailOutcome::Killed { signal, oom } => {
            if oom {
                eprintln!(
                    "ember jail: the VMM was killed for exceeding its cgroup's memory.max: raise it above the guest's memory plus a few MiB"
                );
            } else if signal == libc::SIGSYS {
                eprintln!("ember jail: the VMM was killed by its seccomp filter (SIGSYS)");
            } else {
                eprintln!("ember jail: the VMM was killed by signal {signal}");
            }
            exit_code::SIGNAL_BASE + signal
        }
    })
}
