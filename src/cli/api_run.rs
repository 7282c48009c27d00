//! `ember run --api-sock PATH`: the VMM thread's loop. It serves the API (the `ember-api` thread
//! hands it each request), boots the VM on `InstanceStart` (or at once, from flags or a
//! configuration file), and ends when the VM ends or a signal asks it to.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vmm_sys_util::eventfd::EventFd;

use super::exit_code;
use super::run::{RunArgs, report};
use super::signals::SignalGuard;
use super::terminal::RawTerminal;
use ember::api::model::{FullConfig, Logger};
use ember::api::{ApiServer, Controller, Launcher};
use ember::sandbox::{ThreadKind, seccomp};
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig, VmHandle, error_chain};

/// Largest configuration file read.
const MAX_CONFIG_FILE_LEN: u64 = 1 << 20;

/// Starts VMs with the library, and points ember's messages where `PUT /logger` says.
struct CliLauncher {
    /// Readable when a signal asks ember to stop (ends a wait for a migrating VM).
    cancel: RawFd,
}

/// A restored or migrated VM in this process: its console, filters and metrics file are this
/// run's; `overrides` put interfaces on other TAPs.
fn adopt(
    config: &mut VmConfig,
    base: &VmConfig,
    overrides: &[(String, String)],
) -> Result<(), String> {
    config.console = base.console.clone();
    config.seccomp = base.seccomp;
    config.metrics_path = base.metrics_path.clone();
    config.track_dirty_pages = base.track_dirty_pages;
    config.override_taps(overrides)
}

impl Launcher for CliLauncher {
    type Vm = VmHandle;

    fn start(&mut self, config: &VmConfig) -> Result<VmHandle, String> {
        Vm::start(config).map_err(|e| error_chain(&e))
    }

    fn restore(
        &mut self,
        base: &VmConfig,
        state: &Path,
        memory: &Path,
        overrides: &[(String, String)],
        vsock_uds: Option<&Path>,
        resume: bool,
    ) -> Result<(VmHandle, VmConfig), String> {
        let paths = ember::vmm::persist::SnapshotPaths {
            state: state.to_owned(),
            memory: memory.to_owned(),
        };
        let adjust = |config: &mut VmConfig| {
            adopt(config, base, overrides)?;
            match vsock_uds {
                Some(uds) => config.override_vsock(uds),
                None => Ok(()),
            }
        };
        Vm::restore(&paths, adjust, resume).map_err(|e| error_chain(&e))
    }

    fn receive_migration(
        &mut self,
        base: &VmConfig,
        url: &ember::migration::MigrationUrl,
        token: &str,
        overrides: &[(String, String)],
    ) -> Result<(VmHandle, VmConfig), String> {
        let params = ember::migration::ReceiveParams {
            token: token.to_owned(),
            cancel: Some(self.cancel),
        };
        super::incoming::receive_vm(url, &params, |config| adopt(config, base, overrides))
            .map_err(|e| error_chain(&e))
    }

    fn configure_logger(&mut self, logger: &Logger) -> Result<(), String> {
        if let Some(path) = &logger.log_path {
            redirect_stderr(path)?;
        }
        if let Some(level) = logger.level {
            // env_logger keeps the --log-level filter: this can lower it, not raise it.
            log::set_max_level(level.filter().min(log::max_level()));
        }
        Ok(())
    }
}

/// Sends ember's messages (its stderr) to `path`, a file (appended to) or a named pipe.
fn redirect_stderr(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
    // SAFETY: dup2 onto the standard error descriptor; both descriptors are valid.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("cannot log to {}: {e}", path.display()));
    }
    Ok(())
}

fn read_config_file(path: &Path) -> Result<FullConfig, String> {
    let what = |e: &dyn std::fmt::Display| format!("configuration file {}: {e}", path.display());
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_FILE_LEN + 1).read_to_string(&mut text))
        .map_err(|e| what(&e))?;
    if text.len() as u64 > MAX_CONFIG_FILE_LEN {
        return Err(what(&"larger than 1 MiB"));
    }
    serde_json::from_str(&text).map_err(|e| what(&e))
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// How long a source keeps answering the API once its VM migrated away.
const MIGRATED_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Serves the API for `how_long` more (the VM has ended).
fn linger(
    vmm: &ember::api::VmmEnd,
    controller: &mut Controller<CliLauncher>,
    how_long: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + how_long;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fd = poll_in(vmm.ready_fd());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd on a descriptor that lives through the call.
        if unsafe { libc::poll(&raw mut fd, 1, ms) } > 0 {
            vmm.serve(|request| controller.handle(request));
        }
    }
}

/// Runs `ember run` with the API; returns the process exit code. Errors are printed here (one
/// line), since they are not the library's start errors.
pub fn run(args: &RunArgs, socket: &Path) -> Result<i32, ember::StartError> {
    match run_inner(args, socket) {
        Ok(code) => Ok(code),
        Err(message) => {
            eprintln!("ember: {message}");
            Ok(exit_code::ERROR)
        }
    }
}

fn run_inner(args: &RunArgs, socket: &Path) -> Result<i32, String> {
    let base = args.to_config().map_err(|e| error_chain(&e))?;
    let signal_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let signals = signal_evt
        .try_clone()
        .and_then(SignalGuard::install)
        .map_err(|e| format!("cannot install the signal handlers: {e}"))?;
    let filter = base
        .seccomp
        .then(|| seccomp::ThreadFilter::new(ThreadKind::Api, None))
        .transpose()
        .map_err(|e| error_chain(&e))?;
    let server = ApiServer::start(socket, filter).map_err(|e| error_chain(&e))?;
    // Looked up now: the main thread may be filtered later.
    let pvm_host = ember::exit::host_is_pvm();
    let launcher = CliLauncher {
        cancel: signal_evt.as_raw_fd(),
    };
    let mut controller = if args.kernel.is_some() {
        let vm = Vm::start(&base).map_err(|e| error_chain(&e))?;
        Controller::with_vm(launcher, &args.id, base, vm)
    } else {
        let mut controller = Controller::new(launcher, &args.id, base);
        if let Some(path) = &args.config_file {
            let file = read_config_file(path)?;
            controller.start_from(&file)?;
        }
        controller
    };
    let mut raw: Option<RawTerminal> = None;
    let mut terminal_set = false;
    let code = loop {
        if !terminal_set && controller.vm().is_some() {
            terminal_set = true;
            let seccomp = controller.config().seccomp;
            raw = (controller.config().console == ConsoleConfig::Stdio)
                .then(|| RawTerminal::enable(seccomp))
                .flatten();
        }
        let Some(vmm) = server.vmm() else {
            break exit_code::ERROR;
        };
        let exit_fd = controller.vm().and_then(VmHandle::exit_fd);
        let migration_fd = controller.migration_fd();
        let mut fds = vec![poll_in(signal_evt.as_raw_fd()), poll_in(vmm.ready_fd())];
        fds.push(poll_in(exit_fd.unwrap_or(-1)));
        fds.push(poll_in(migration_fd.unwrap_or(-1)));
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(4);
        // SAFETY: a valid array of `nfds` pollfds on descriptors that live through the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break {
                eprintln!("ember: waiting for the API failed: {e}");
                exit_code::ERROR
            };
        }
        if fds[0].revents != 0 {
            let reason = match controller.vm_mut() {
                Some(vm) => vm.stop(),
                None => ExitReason::Stopped,
            };
            break report(&reason, pvm_host);
        }
        if fds[3].revents != 0 {
            controller.advance_migration();
            continue;
        }
        if fds[2].revents != 0 {
            if let Some(vm) = controller.vm_mut() {
                let reason = vm.wait();
                if reason == ExitReason::Migrated {
                    // The one who asked (`ember ctl migrate`) reads how it went.
                    linger(vmm, &mut controller, MIGRATED_LINGER);
                }
                break report(&reason, pvm_host);
            }
        }
        if fds[1].revents != 0 {
            vmm.serve(|request| controller.handle(request));
        }
    };
    drop(raw);
    drop(controller);
    drop(server);
    drop(signals);
    Ok(code)
}
