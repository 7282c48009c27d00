//! Wires a VM together ([`builder`]) and runs it: the handle an embedder holds, and teardown.

pub mod builder;
pub mod console;
pub mod event_loop;
mod exit;
pub mod virtio;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::devices::pseudo::debug_port::DebugCodes;
use crate::devices::virtio::net::{NetCounters, NetStats};
use crate::exit::ExitReason;
use crate::timing::{Phase, Timeline};
use crate::vstate;
pub use console::Console;
use event_loop::EventLoopHandle;
use exit::ExitState;

/// Starting a VM failed. Each variant says which stage; its source says why.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// KVM is missing or unusable.
    #[error(transparent)]
    Kvm(#[from] vstate::kvm::KvmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] vstate::memory::MemoryError),
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] vstate::vm::VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    /// Kernel or initrd.
    #[error(transparent)]
    Loader(#[from] crate::loader::LoaderError),
    /// The kernel command line.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Boot parameters.
    #[error(transparent)]
    BootParams(#[from] crate::arch::x86_64::boot_params::BootParamsError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] crate::arch::x86_64::mptable::MptableError),
    /// The ACPI tables.
    #[error(transparent)]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    /// Writing boot data into guest memory.
    #[error("cannot write the {0} into guest memory")]
    GuestMemory(&'static str),
    /// A device address range.
    #[error("cannot place a device")]
    Bus(#[from] crate::devices::bus::BusError),
    /// The console's host side.
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    /// The event loop.
    #[error(transparent)]
    EventLoop(#[from] event_loop::EventLoopError),
    /// A disk image.
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::DiskError),
    /// A TAP device.
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::TapError),
    /// A seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::sandbox::SeccompError),
    /// A virtio queue.
    #[error("cannot create a virtio queue: {0:?}")]
    Queue(virtio_queue::Error),
    /// An eventfd.
    #[error("cannot create an eventfd")]
    Eventfd(#[source] std::io::Error),
    /// A vCPU thread.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Everything a running VM owns. Field order is drop order: threads are joined (by `VmHandle`)
/// before the VM and its memory go away.
struct Running {
    vcpu_threads: Vec<JoinHandle<()>>,
    events: EventLoopHandle,
    exit: Arc<ExitState>,
    stop: Arc<AtomicBool>,
    console: Option<Console>,
    timeline: Arc<Timeline>,
    debug_codes: DebugCodes,
    nets: Vec<(String, Arc<NetCounters>)>,
    smaps: Option<std::fs::File>,
    /// [shutdown branch: for `send_ctrl_alt_del`, until the device manager owns it]
    i8042: Arc<std::sync::Mutex<crate::devices::legacy::I8042>>,
    vm: vstate::vm::Vm,
    memory: GuestMemoryMmap,
}

/// Asks a running VM to stop, from any thread (or, through [`StopTrigger::as_raw_fd`], from a
/// signal handler: writing an 8-byte 1 to the descriptor is async-signal-safe).
#[derive(Debug)]
pub struct StopTrigger(EventFd);

impl StopTrigger {
    /// Requests the stop; `VmHandle::wait` then returns [`ExitReason::Stopped`].
    pub fn request(&self) {
        let _ = self.0.write(1);
    }
}

impl AsRawFd for StopTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A started VM. Dropping it stops the VM.
pub struct VmHandle {
    running: Option<Running>,
    result: Option<ExitReason>,
    timeline: Vec<(Phase, Duration)>,
    debug_codes: Vec<(u8, Duration)>,
    nets: Vec<(String, Arc<NetCounters>)>,
}

impl VmHandle {
    fn new(running: Running) -> Self {
        VmHandle {
            nets: running.nets.clone(),
            running: Some(running),
            result: None,
            timeline: Vec::new(),
            debug_codes: Vec::new(),
        }
    }

    /// Builds and starts a VM: the embedding API's entry point.
    pub fn start(config: &crate::VmConfig) -> Result<VmHandle, StartError> {
        builder::start(config)
    }

    /// The embedder's console ends ([`crate::ConsoleConfig::Pipe`] only), once.
    pub fn take_console(&mut self) -> Option<Console> {
        self.running.as_mut()?.console.take()
    }

    /// A handle that can stop this VM from elsewhere.
    pub fn stop_trigger(&self) -> std::io::Result<StopTrigger> {
        match &self.running {
            Some(running) => running.exit.wake_event().map(StopTrigger),
            None => Err(std::io::Error::other("the VM has already stopped")),
        }
    }

    /// Waits for the VM to exit, then tears it down.
    pub fn wait(&mut self) -> ExitReason {
        self.wait_inner(None).unwrap_or(ExitReason::Stopped)
    }

    /// Waits at most `timeout`; `None` if the VM is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReason> {
        self.wait_inner(Some(timeout))
    }

    /// When each phase of the VM's life happened, as time since the process started
    /// (complete once the VM has ended).
    pub fn timeline(&self) -> Vec<(Phase, Duration)> {
        match &self.running {
            Some(running) => running.timeline.marks(),
            None => self.timeline.clone(),
        }
    }

    /// Boot progress codes the guest wrote to port 0x80, with their times.
    pub fn debug_codes(&self) -> Vec<(u8, Duration)> {
        match &self.running {
            Some(running) => running
                .debug_codes
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            None => self.debug_codes.clone(),
        }
    }

    /// Each network interface's TAP name and counters, in `eth0`, `eth1`, ... order (final once
    /// the VM has ended).
    pub fn net_stats(&self) -> Vec<(String, NetStats)> {
        self.nets
            .iter()
            .map(|(tap, counters)| (tap.clone(), counters.snapshot()))
            .collect()
    }

    /// Presses Ctrl+Alt+Delete on the guest's keyboard (the i8042), which asks a Linux guest
    /// to shut down. False if the VM has already stopped.
    /// [shutdown branch: the lead's `VmHandle::shutdown` builds on this]
    pub fn send_ctrl_alt_del(&self) -> bool {
        let Some(running) = &self.running else {
            return false;
        };
        running
            .i8042
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .trigger_ctrl_alt_del();
        true
    }

    /// Stops the VM (if it still runs) and tears it down.
    pub fn stop(&mut self) -> ExitReason {
        self.teardown()
    }

    fn wait_inner(&mut self, timeout: Option<Duration>) -> Option<ExitReason> {
        if let Some(running) = &self.running {
            if !running.exit.wait(timeout) {
                return None;
            }
        }
        Some(self.teardown())
    }

    /// Stops every thread: vCPUs first (so no device sees another access), then the event
    /// loop. Idempotent.
    fn teardown(&mut self) -> ExitReason {
        if let Some(mut running) = self.running.take() {
            running.timeline.mark(Phase::ExitRequested);
            running.stop.store(true, Ordering::Release);
            let signal = vstate::vcpu::kick_signal();
            for thread in &running.vcpu_threads {
                if let Err(e) = thread.kill(signal) {
                    log::warn!("cannot kick a vCPU thread: {e}");
                }
            }
            for thread in running.vcpu_threads.drain(..) {
                let _ = thread.join();
            }
            running.events.stop();
            for (tap, stats) in self.net_stats() {
                log::debug!("net {tap}: {stats}");
            }
            if let (true, Some(smaps)) = (log::log_enabled!(log::Level::Info), &running.smaps) {
                match vstate::memory::overhead_kib(&running.memory, smaps) {
                    Ok(kib) => log::info!("memory overhead: {kib} KiB outside guest memory"),
                    Err(e) => log::debug!("cannot measure the memory overhead: {e}"),
                }
            }
            self.result = Some(running.exit.reason().unwrap_or(ExitReason::Stopped));
            drop(running.vm);
            drop(running.memory);
            running.timeline.mark(Phase::TeardownDone);
            self.timeline = running.timeline.marks();
            self.debug_codes = running
                .debug_codes
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default();
        }
        self.result.clone().unwrap_or(ExitReason::Stopped)
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.teardown();
    }
}
