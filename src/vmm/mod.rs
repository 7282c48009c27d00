//! Wires a VM together ([`builder`]) and runs it: the handle an embedder holds, and teardown.

pub mod builder;
pub mod console;
pub mod devices;
pub mod event_loop;
mod exit;
pub mod fold;
pub mod metrics;
mod migrate;
pub mod persist;
mod platform;
mod snapshot;
pub mod vcpus;
pub mod virtio;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::guest_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::net::NetStats;
use crate::exit::ExitReason;
use crate::timing::{Phase, Timeline};
use crate::vstate;
use crate::vstate::vcpu::VcpuCounters;
pub use console::Console;
use devices::{DeviceManager, VirtioKind};
use event_loop::EventLoopHandle;
use exit::ExitState;
pub use metrics::Metrics;
use vcpus::VcpuControl;

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
    /// The VM generation ID.
    #[error(transparent)]
    VmGenId(#[from] crate::devices::pseudo::vmgenid::VmGenIdError),
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
    /// A disk device (its engine or rate limiter).
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// A TAP device.
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::TapError),
    /// The entropy device.
    #[error(transparent)]
    Rng(#[from] crate::devices::virtio::rng::RngError),
    /// The vsock device's socket.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
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
    /// The metrics file.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsFileError),
}

/// Everything a running VM owns. Field order is drop order: threads are joined (by `VmHandle`)
/// before the VM and its memory go away.
struct Running {
    vcpu_threads: Vec<JoinHandle<()>>,
    kvm: vstate::kvm::KvmContext,
    control: Arc<VcpuControl>,
    vcpu_counters: Vec<Arc<VcpuCounters>>,
    events: EventLoopHandle,
    exit: Arc<ExitState>,
    console: Option<Console>,
    timeline: Arc<Timeline>,
    devices: Arc<DeviceManager>,
    smaps: Option<std::fs::File>,
    /// `VmConfig::metrics_path`: a line on request and one at the end.
    metrics_file: Option<metrics::MetricsFile>,
    /// `VmConfig::track_dirty_pages`: the slots log dirty pages, Diff snapshots can be taken.
    tracking: bool,
    /// Pages written since the last snapshot that a failed snapshot took from the records: the
    /// next one adds them back, so that a Diff after a failure misses nothing.
    untaken: Option<crate::guest_memory::DirtyPages>,
    vm: vstate::vm::Vm,
    memory: GuestMemoryMmap,
}

/// A restore failed: the snapshot, or building the VM it describes.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot cannot be read or applied.
    #[error(transparent)]
    Snapshot(#[from] persist::PersistError),
    /// The VM of its shape cannot be built.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The caller refused the saved configuration.
    #[error("{0}")]
    Refused(String),
}

/// A request about a VM's run state that cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The VM has ended (or is ending).
    #[error("the VM is not running: it has ended")]
    Ended,
    /// The VM is paused: the guest cannot act on the request.
    #[error("the VM is paused: resume it first")]
    Paused,
    /// A guest-memory range that is not all guest RAM.
    #[error("{0:#x} is outside guest memory")]
    OutsideMemory(u64),
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
    paused: bool,
    result: Option<ExitReason>,
    timeline: Vec<(Phase, Duration)>,
    debug_codes: Vec<(u8, Duration)>,
    /// The counters as the VM ended.
    final_metrics: Metrics,
    /// An outgoing migration's pre-copy, while it runs.
    migration: Option<crate::migration::source::Outgoing>,
    /// The last migration's progress.
    migration_status: crate::migration::SharedStatus,
}

impl VmHandle {
    fn new(running: Running) -> Self {
        VmHandle {
            running: Some(running),
            paused: false,
            result: None,
            timeline: Vec::new(),
            debug_codes: Vec::new(),
            final_metrics: Metrics::default(),
            migration: None,
            migration_status: crate::migration::SharedStatus::default(),
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

    /// A descriptor that becomes readable when the VM ends or a stop is requested (then call
    /// [`VmHandle::wait`]); `None` once the VM is torn down.
    pub fn exit_fd(&self) -> Option<RawFd> {
        self.running.as_ref().map(|r| r.exit.wake_fd())
    }

    /// The running VM, unless it has ended or an exit is pending.
    fn live(&self) -> Result<&Running, LifecycleError> {
        match &self.running {
            Some(running) if running.exit.reason().is_none() => Ok(running),
            _ => Err(LifecycleError::Ended),
        }
    }

    /// Pauses the VM: returns once every vCPU has left KVM_RUN and is parked and the device
    /// event loop is parked (no queue served, no TAP or console I/O). Pausing a paused VM does
    /// nothing.
    pub fn pause(&mut self) -> Result<(), LifecycleError> {
        let running = self.live()?;
        if self.paused {
            return Ok(());
        }
        running.control.pause(&running.vcpu_threads);
        running.events.pause();
        // Disks' requests in flight complete now: a paused VM has none (snapshots need that).
        running
            .devices
            .virtio
            .iter()
            .for_each(|entry| entry.lock().quiesce());
        self.paused = true;
        Ok(())
    }

    /// Resumes a paused VM: devices first, then the vCPUs. Resuming a running VM does nothing.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        let running = self.live()?;
        if !self.paused {
            return Ok(());
        }
        running.events.resume();
        running.control.resume();
        self.paused = false;
        Ok(())
    }

    /// True while the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused && self.running.is_some()
    }

    /// Every device's counters by id, and the vCPUs' exits (final once the VM has ended).
    pub fn metrics(&self) -> Metrics {
        match &self.running {
            Some(running) => {
                Metrics::gather(&running.devices, &running.vcpu_counters, &running.timeline)
            }
            None => self.final_metrics.clone(),
        }
    }

    /// Reads guest memory at guest-physical `addr` (a shared page, a guest's counter): fails if
    /// the range is not all guest RAM or the VM has been torn down.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), LifecycleError> {
        use vm_memory::{Bytes, GuestAddress};
        let running = self.running.as_ref().ok_or(LifecycleError::Ended)?;
        running
            .memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| LifecycleError::OutsideMemory(addr))
    }

    /// Writes `buf` into guest memory at guest-physical `addr` (data for the guest, a test's
    /// pattern): recorded as written, so the next Diff snapshot holds it. Fails as
    /// [`VmHandle::read_memory`] does.
    pub fn write_memory(&self, addr: u64, buf: &[u8]) -> Result<(), LifecycleError> {
        use vm_memory::{Bytes, GuestAddress};
        let running = self.running.as_ref().ok_or(LifecycleError::Ended)?;
        running
            .memory
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| LifecycleError::OutsideMemory(addr))
    }

    /// Appends the current metrics to the configured metrics file (`VmConfig::metrics_path`);
    /// does nothing without one. A last line is written when the VM ends.
    pub fn flush_metrics(&mut self) -> std::io::Result<()> {
        let metrics = self.metrics();
        match self.running.as_mut().and_then(|r| r.metrics_file.as_mut()) {
            Some(file) => file.write(&metrics),
            None => Ok(()),
        }
    }

    /// Puts disk `id` on the image at `path` (opened as the old one was: read-only, O_DIRECT),
    /// and tells the guest its configuration changed, so it reads the new capacity.
    pub fn update_drive(&mut self, id: &str, path: &std::path::Path) -> Result<(), String> {
        let running = self.live().map_err(|e| e.to_string())?;
        let entry = running
            .devices
            .virtio(id)
            .ok_or_else(|| format!("no drive {id}"))?;
        let disk = entry
            .disk
            .as_ref()
            .ok_or_else(|| format!("{id} is not a drive"))?;
        let image =
            crate::devices::virtio::block::DiskFile::open(path, disk.read_only, disk.direct)
                .map_err(|e| crate::error_chain(&e))?;
        entry.lock().replace_disk(image)
    }

    /// Replaces a limiter of device `id` at run time (`PATCH /drives`, `/network-interfaces`):
    /// the disk's, or an interface's receive or transmit one.
    pub fn update_rate_limiter(
        &mut self,
        id: &str,
        kind: crate::devices::virtio::LimiterKind,
        limiter: &crate::config::RateLimiterConfig,
    ) -> Result<(), String> {
        let running = self.live().map_err(|e| e.to_string())?;
        let entry = running
            .devices
            .virtio(id)
            .ok_or_else(|| format!("no device {id}"))?;
        if entry.lock().set_rate_limiter(kind, Some(limiter)) {
            Ok(())
        } else {
            Err(format!("{id} has no such rate limiter"))
        }
    }

    /// The vsock device's host socket (`VsockConfig::uds_path`), if the VM has one.
    pub fn vsock_uds_path(&self) -> Option<std::path::PathBuf> {
        let running = self.running.as_ref()?;
        running.devices.virtio.iter().find_map(|v| match &v.kind {
            VirtioKind::Vsock { uds_path, .. } => Some(uds_path.clone()),
            _ => None,
        })
    }

    /// The ids of every device, as the API and snapshots name them.
    pub fn device_ids(&self) -> Vec<String> {
        self.running
            .as_ref()
            .map(|r| r.devices.ids())
            .unwrap_or_default()
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
                .devices
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
        match &self.running {
            Some(running) => running
                .devices
                .virtio
                .iter()
                .filter_map(|v| match &v.kind {
                    VirtioKind::Net { tap, counters } => Some((tap.clone(), counters.snapshot())),
                    VirtioKind::Block(_) | VirtioKind::Vsock { .. } | VirtioKind::Rng(_) => None,
                })
                .collect(),
            None => self
                .final_metrics
                .net
                .values()
                .map(|n| (n.tap.clone(), net_stats(n)))
                .collect(),
        }
    }

    /// Presses Ctrl+Alt+Delete on the guest's keyboard (the i8042): a Linux guest with the i8042
    /// and keyboard drivers then shuts down (its init decides how: ember's powers off).
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), LifecycleError> {
        let running = self.live()?;
        if self.paused {
            return Err(LifecycleError::Paused);
        }
        devices::lock(&running.devices.i8042).trigger_ctrl_alt_del();
        Ok(())
    }

    /// True when a guest driver has set up the i8042 with its keyboard enabled, so that a
    /// Ctrl-Alt-Del has someone to hear it.
    pub fn guest_listens_for_ctrl_alt_del(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| devices::lock(&r.devices.i8042).guest_listens())
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del) and waits up to `timeout` for it to end; then
    /// stops it. Returns why the VM ended: `PowerOff` or `Reset` when the guest obliged.
    pub fn shutdown(&mut self, timeout: Duration) -> ExitReason {
        if self.send_ctrl_alt_del().is_ok() {
            if let Some(reason) = self.wait_timeout(timeout) {
                return reason;
            }
            log::info!("the guest did not shut down within {timeout:?}: stopping it");
        }
        self.stop()
    }

    /// Stops the VM (if it still runs, paused or not) and tears it down.
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
        self.abandon_migration();
        if let Some(mut running) = self.running.take() {
            running.timeline.mark(Phase::ExitRequested);
            running.control.exit(&running.vcpu_threads);
            for thread in running.vcpu_threads.drain(..) {
                let _ = thread.join();
            }
            running.events.stop();
            self.final_metrics =
                Metrics::gather(&running.devices, &running.vcpu_counters, &running.timeline);
            if log::log_enabled!(log::Level::Debug) {
                for net in self.final_metrics.net.values() {
                    log::debug!("net {}: {}", net.tap, net_stats(net));
                }
            }
            if let (true, Some(smaps)) = (log::log_enabled!(log::Level::Info), &running.smaps) {
                match vstate::memory::overhead_kib(&running.memory, smaps) {
                    Ok(kib) => {
                        log::info!("memory overhead: {kib} KiB outside guest memory");
                        self.final_metrics.vmm.memory_overhead_kib = Some(kib);
                    }
                    Err(e) => log::debug!("cannot measure the memory overhead: {e}"),
                }
            }
            if let Some(file) = running.metrics_file.as_mut() {
                if let Err(e) = file.write(&self.final_metrics) {
                    log::warn!("cannot write the last metrics line: {e}");
                }
            }
            self.result = Some(running.exit.reason().unwrap_or(ExitReason::Stopped));
            self.debug_codes = running
                .devices
                .debug_codes
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default();
            // The devices hold the VM fd too (the I/O APIC installs its routes through it):
            // with them gone KVM destroys the VM at the close, and unmapping guest memory then
            // no longer makes KVM zap its shadow pages first (measured: a tenth of teardown).
            drop(running.devices);
            drop(running.vm);
            drop(running.memory);
            running.timeline.mark(Phase::TeardownDone);
            self.timeline = running.timeline.marks();
        }
        self.result.clone().unwrap_or(ExitReason::Stopped)
    }
}

fn net_stats(n: &metrics::NetMetrics) -> NetStats {
    NetStats {
        rx_packets: n.rx_packets_count,
        rx_bytes: n.rx_bytes_count,
        rx_drops: n.rx_dropped,
        rx_errors: n.rx_fails,
        tx_packets: n.tx_packets_count,
        tx_bytes: n.tx_bytes_count,
        tx_drops: n.tx_malformed_frames,
        tx_errors: n.tx_fails,
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.teardown();
    }
}
