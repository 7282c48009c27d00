//! Building a VM, in stages:
//!
//! 1. [`shape`]: KVM, guest memory, the VM with its memory slots and split irqchip, every device
//!    with its backend (disk images, TAPs) in the device manager, the vCPUs created with their
//!    CPUID. Everything a boot and a restore share.
//! 2. [`boot`]: kernel, initrd, command line, boot tables and the vCPUs' entry state; or
//!    [`restore`]: a snapshot's state applied to the same shape (guest memory mapped from its
//!    file by `shape`).
//! 3. [`run`]: the seccomp filters, the vCPU threads, then the event loop; returns the handle.

use std::sync::Arc;

use crate::guest_memory::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

use super::console::Console;
use super::devices::{DeviceManager, ENTROPY_ID, VSOCK_ID, VirtioEntry, VirtioKind, lock};
use super::event_loop::{self, Subscriber};
use super::exit::ExitState;
use super::metrics::MetricsFile;
use super::persist::{PersistError, VmSnapshot};
use super::vcpus::{Target, VcpuControl};
use super::{StartError, VmHandle, platform, virtio};
use crate::arch::x86_64::boot_params::{self, E820Entry};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{acpi, low_memory_end, memory_ranges, mptable};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::Buses;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, DiskFile};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::exit::ExitReason;
use crate::loader::{self, LoadedKernel};
use crate::sandbox::ThreadKind;
use crate::sandbox::seccomp::{self, ThreadFilter};
use crate::timing::{Phase, Timeline};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::{
    create_guest_memory, create_shared_guest_memory, map_guest_memory_file,
};
use crate::vstate::vcpu::{self, BootEntry, Vcpu};
use crate::vstate::vcpu_state::{msrs_to_save, restore_vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::restore_vm;

/// Where guest RAM comes from.
pub enum GuestRam<'a> {
    /// Fresh anonymous memory (a boot).
    Fresh,
    /// A snapshot's memory file, mapped privately (a restore).
    File(&'a std::fs::File),
    /// Memory already mapped and filled: a migration's destination, with the TAPs it opened
    /// when it accepted the VM (`None`: open them now).
    Given(GuestMemoryMmap, Option<Vec<Tap>>),
}

/// A VM of the configured shape, not yet booted or restored, with no thread started.
pub struct Shaped {
    kvm: KvmContext,
    memory: GuestMemoryMmap,
    vm: Vm,
    buses: Buses,
    devices: DeviceManager,
    subscribers: Vec<Subscriber>,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitState>,
    timeline: Arc<Timeline>,
    console: Option<Console>,
    smaps: Option<std::fs::File>,
}

/// Builds and starts the VM described by `config`: shape, boot, run.
pub fn start(config: &VmConfig) -> Result<VmHandle, StartError> {
    let mut shaped = shape(config, GuestRam::Fresh)?;
    boot(&mut shaped, config)?;
    run(shaped, config, false)
}

/// Stage 1: everything but the guest's contents and the threads.
pub fn shape(config: &VmConfig, ram: GuestRam<'_>) -> Result<Shaped, StartError> {
    match ram {
        GuestRam::Fresh => config.validate()?,
        GuestRam::File(_) | GuestRam::Given(..) => config.validate_shape()?,
    }
    // Disks first: a locked or missing image is the user's error, worth reporting before KVM's.
    let disks = config
        .disks
        .iter()
        .map(|d| Ok((DiskFile::open(&d.path, d.read_only, d.direct)?, d.serial())))
        .collect::<Result<Vec<_>, StartError>>()?;
    let (ram, opened_taps) = match ram {
        GuestRam::Given(memory, taps) => (GuestRam::Given(memory, None), taps),
        other => (other, None),
    };
    let taps = match opened_taps {
        Some(taps) => taps,
        None => open_taps(config)?,
    };
    let taps: Vec<_> = taps
        .into_iter()
        .zip(config.nets.iter().map(|n| n.mac()))
        .collect();
    let vsock = match &config.vsock {
        Some(v) => Some(Vsock::new(v.guest_cid, &v.uds_path)?),
        None => None,
    };
    let kvm = KvmContext::open(&config.kvm_device)?;
    if config.vcpus > kvm.max_vcpus() {
        return Err(ConfigError::TooManyVcpus {
            requested: config.vcpus,
            max: kvm.max_vcpus(),
        }
        .into());
    }
    let timeline = Arc::new(Timeline::default());
    // Opened now: the thread that measures the overhead at teardown may not open files then.
    let smaps = std::fs::File::open("/proc/self/smaps").ok();
    let memory = match ram {
        GuestRam::Fresh if config.shared_memory => create_shared_guest_memory(config.memory_mib)?,
        GuestRam::Fresh => create_guest_memory(config.memory_mib)?,
        GuestRam::File(file) => map_guest_memory_file(config.memory_mib, file)?,
        GuestRam::Given(memory, _) => memory,
    };
    let vm = Vm::new(&kvm)?;
    timeline.mark(Phase::VmCreated);
    if config.track_dirty_pages {
        // Tracking starts here: what the boot writes (the kernel, the boot data) counts too.
        vm.set_dirty_log(&memory, true)?;
        crate::guest_memory::DirtyPages::clear_vmm_writes(&memory);
    } else {
        vm.register_memory(&memory)?;
    }
    vm.create_irqchip()?;
    timeline.mark(Phase::MemoryMapped);

    let exit = Arc::new(ExitState::new(timeline.clone()).map_err(StartError::Eventfd)?);
    let mut buses = Buses::default();
    let mut subscribers = Vec::new();
    let (platform, console) =
        platform::create(config, &vm, &exit, &timeline, &mut buses, &mut subscribers)?;
    let mut entries = Vec::new();
    let mut devices: Vec<(String, VirtioKind, Box<dyn VirtioDevice>)> = Vec::new();
    for ((disk, serial), disk_config) in disks.into_iter().zip(&config.disks) {
        let block = Block::with_options(
            disk,
            &serial,
            disk_config.io_engine,
            disk_config.rate_limiter.as_ref(),
        )?;
        let kind = VirtioKind::Block(block.counters());
        devices.push((disk_config.device_id(), kind, Box::new(block)));
    }
    let disk_configs = config.disks.iter().cloned().map(Some);
    for ((tap, mac), net_config) in taps.into_iter().zip(&config.nets) {
        log::debug!("net {}: MAC {mac}", tap.name());
        let name = tap.name().to_owned();
        let mut net = Net::new(tap, mac.0);
        net.set_rate_limiters(
            net_config.rx_rate_limiter.as_ref(),
            net_config.tx_rate_limiter.as_ref(),
        );
        let kind = VirtioKind::Net {
            tap: name,
            counters: net.counters(),
        };
        devices.push((net_config.device_id(), kind, Box::new(net)));
    }
    if let (Some(vsock), Some(vsock_config)) = (vsock, &config.vsock) {
        let kind = VirtioKind::Vsock {
            uds_path: vsock_config.uds_path.clone(),
            counters: vsock.counters(),
        };
        devices.push((VSOCK_ID.to_owned(), kind, Box::new(vsock)));
    }
    if let Some(entropy) = &config.entropy {
        let rng = Rng::new(entropy.rate_limiter.as_ref())?;
        let kind = VirtioKind::Rng(rng.counters());
        devices.push((ENTROPY_ID.to_owned(), kind, Box::new(rng)));
    }
    let disk_configs = disk_configs.chain(std::iter::repeat(None));
    for ((slot, (id, kind, device)), disk) in devices.into_iter().enumerate().zip(disk_configs) {
        let transport = virtio::attach(device, slot, &vm, &memory, &mut buses, &mut subscribers)?;
        entries.push(VirtioEntry {
            id,
            slot,
            kind,
            transport,
            disk,
        });
    }
    let devices = platform.with_virtio(entries);

    vcpu::install_kick_handler()?;
    let supported_cpuid = kvm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(index, vm.create_vcpu(index)?);
        vcpu.set_cpuid(supported_cpuid, config.vcpus)?;
        vcpus.push(vcpu);
    }
    timeline.mark(Phase::DevicesReady);
    Ok(Shaped {
        kvm,
        memory,
        vm,
        buses,
        devices,
        subscribers,
        vcpus,
        exit,
        timeline,
        console,
        smaps,
    })
}

/// Opens every network interface's TAP, in `config.nets` order.
pub fn open_taps(config: &VmConfig) -> Result<Vec<Tap>, StartError> {
    config.nets.iter().map(|n| Ok(Tap::open(&n.tap)?)).collect()
}

/// Stage 2 for a fresh boot: the kernel and its boot data in guest memory, and every vCPU's
/// boot state (the boot vCPU at the kernel's entry point).
pub fn boot(shaped: &mut Shaped, config: &VmConfig) -> Result<(), StartError> {
    let kernel = load_kernel_and_tables(config, &shaped.memory)?;
    lock(&shaped.devices.vmgenid).write(&shaped.memory)?;
    shaped.timeline.mark(Phase::KernelLoaded);
    if let (Some(from), Some(to)) = (
        shaped.timeline.get(Phase::DevicesReady),
        shaped.timeline.get(Phase::KernelLoaded),
    ) {
        let mapped = kernel.mapped_bytes >> 10;
        let took = to.saturating_sub(from).as_micros();
        log::info!("kernel loaded in {took} us ({mapped} KiB mapped from the page cache)");
    }
    log::debug!("kernel entry {:#x} via {:?}", kernel.entry.0, kernel.mode);
    for vcpu in &shaped.vcpus {
        let entry = (vcpu.index() == 0).then_some(BootEntry {
            entry: kernel.entry,
            mode: kernel.mode,
        });
        vcpu.configure_boot(&shaped.memory, entry)?;
    }
    Ok(())
}

/// Stage 2 for a restore: the snapshot's state applied to a VM of its shape (built by [`shape`]
/// from `snapshot.config`, with guest memory mapped from the snapshot's memory file). Order:
/// the VM's clock, every vCPU, then the devices, then (for a clone) a new VM generation ID;
/// each part checks its state before it changes anything, and any failure leaves a VM that is
/// dropped, never run.
pub fn restore(
    shaped: &mut Shaped,
    snapshot: &VmSnapshot,
    identity: Identity,
) -> Result<(), PersistError> {
    if snapshot.vcpus.len() != shaped.vcpus.len() {
        return Err(PersistError::Shape(format!(
            "{} vCPU states for {} vCPUs",
            snapshot.vcpus.len(),
            shaped.vcpus.len()
        )));
    }
    let ids: Vec<&str> = shaped
        .devices
        .virtio
        .iter()
        .map(|v| v.id.as_str())
        .collect();
    let saved: Vec<&str> = snapshot.virtio.iter().map(|(id, _)| id.as_str()).collect();
    if ids != saved {
        return Err(PersistError::Shape(format!(
            "devices {saved:?} saved, {ids:?} configured"
        )));
    }
    restore_vm(shaped.vm.fd(), &snapshot.vm)?;
    let msrs = msrs_to_save(shaped.kvm.kvm())?;
    for (vcpu, state) in shaped.vcpus.iter().zip(&snapshot.vcpus) {
        restore_vcpu(vcpu.fd(), state, &msrs)?;
    }
    let devices = &shaped.devices;
    lock(&devices.ioapic).restore(&snapshot.ioapic)?;
    lock(&devices.serial).restore(&snapshot.serial)?;
    lock(&devices.i8042).restore(&snapshot.i8042)?;
    for (entry, (_, state)) in devices.virtio.iter().zip(&snapshot.virtio) {
        entry.lock().restore(state)?;
    }
    // Last, once the I/O APIC routes the event interrupt again: a clone's guest must not go on
    // with the snapshot's random state. The interrupt waits in the LAPIC until a vCPU runs.
    if identity == Identity::Renew {
        lock(&devices.vmgenid).regenerate(&shaped.memory)?;
    }
    Ok(())
}

/// Whether a restored VM is a new one or the same one moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A clone from a snapshot (maybe one of many): a new VM generation ID.
    Renew,
    /// The VM itself, migrated: it keeps its generation ID (nothing was duplicated).
    Keep,
}

/// Stage 3: filters, one thread per vCPU, then the event loop; the VM runs (or, with `paused`,
/// its threads start parked: a restored VM that waits for a resume).
pub fn run(shaped: Shaped, config: &VmConfig, paused: bool) -> Result<VmHandle, StartError> {
    let Shaped {
        kvm,
        memory,
        vm,
        buses,
        devices,
        subscribers,
        vcpus,
        exit,
        timeline,
        console,
        smaps,
    } = shaped;
    let metrics_file = match &config.metrics_path {
        Some(path) => Some(MetricsFile::open(path)?),
        None => None,
    };
    let filters = ThreadFilters::new(config)?;
    let buses = Arc::new(buses);
    let control = Arc::new(if paused {
        VcpuControl::new_paused(vcpus.len())
    } else {
        VcpuControl::new(vcpus.len())
    });
    let vcpu_counters = vcpus.iter().map(Vcpu::counters).collect();
    let mut threads = Vec::with_capacity(vcpus.len());
    // The vCPUs first: the boot vCPU enters the guest while this thread sets up the event loop.
    // Nothing the guest does waits for the loop: its queue notifications and console input
    // stay in their eventfds and pipes until the loop's first epoll_wait.
    let mut spawned = Ok(());
    for vcpu in vcpus {
        match spawn_vcpu(vcpu, &buses, &control, &exit, &timeline, &filters) {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                spawned = Err(e);
                break;
            }
        }
    }
    let loop_exit = exit.clone();
    let events = spawned.and_then(|()| {
        event_loop::start(subscribers, filters.events.clone(), move |why| {
            loop_exit.report(ExitReason::VmmError(why))
        })
        .map_err(StartError::from)
    });
    let events = match events {
        Ok(events) => events,
        Err(e) => {
            // Nothing may keep running detached: end the threads already started.
            control.exit(&threads);
            for thread in threads {
                let _ = thread.join();
            }
            return Err(e);
        }
    };
    if paused {
        events.pause();
    }
    let mut handle = VmHandle::new(super::Running {
        kvm,
        vm,
        memory,
        exit,
        control,
        vcpu_threads: threads,
        vcpu_counters,
        events,
        console,
        timeline,
        devices: Arc::new(devices),
        smaps,
        metrics_file,
        tracking: config.track_dirty_pages,
        untaken: None,
    });
    handle.paused = paused;
    Ok(handle)
}

fn spawn_vcpu(
    mut vcpu: Vcpu,
    buses: &Arc<Buses>,
    control: &Arc<VcpuControl>,
    exit: &Arc<ExitState>,
    timeline: &Arc<Timeline>,
    filters: &ThreadFilters,
) -> Result<std::thread::JoinHandle<()>, StartError> {
    let (buses, control, exit) = (buses.clone(), control.clone(), exit.clone());
    let timeline = (vcpu.index() == 0).then(|| timeline.clone());
    let filter = filters.vcpu.clone();
    std::thread::Builder::new()
        .name(format!("ember-vcpu{}", vcpu.index()))
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = seccomp::apply(&filter) {
                    exit.report(ExitReason::VmmError(e.to_string()));
                    control.finished();
                    return;
                }
                filter.selftest();
            }
            if let Some(timeline) = timeline {
                timeline.mark(Phase::FirstKvmRun);
            }
            // The target is read again after every wake-up: a pause may follow a resume
            // before this thread has even left `park`. Once the VM has ended (a reset, a power
            // off from this or another thread) the guest runs no further: no more guest code
            // after its reset write, and no kick needed at teardown.
            let reason = vcpu.run(&buses, |vcpu| {
                loop {
                    if exit.ended() {
                        return false;
                    }
                    match control.target() {
                        Target::Run => return true,
                        Target::Exit => return false,
                        Target::Pause => {
                            vcpu.settle();
                            control.park(vcpu);
                        }
                    }
                }
            });
            control.finished();
            if reason != ExitReason::Stopped {
                exit.report(reason);
            }
        })
        .map_err(StartError::Thread)
}

/// Loads the kernel and initrd, and writes the command line, boot parameters and MP table.
fn load_kernel_and_tables(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
) -> Result<LoadedKernel, StartError> {
    let mem_bytes = config.memory_mib << 20;
    let low_end = low_memory_end(mem_bytes);
    let kernel = loader::load_kernel(memory, &config.kernel, config.boot_protocol, low_end)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(memory, path, &kernel, low_end)?),
        None => None,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(StartError::Cmdline)?;
    if !config.cmdline.trim().is_empty() {
        cmdline
            .insert_str(config.cmdline.trim())
            .map_err(StartError::Cmdline)?;
    }
    let virtio_devices = config.virtio_devices();
    virtio::add_to_cmdline(&mut cmdline, virtio_devices)?;
    let cmdline = cmdline.as_cstring().map_err(StartError::Cmdline)?;
    let cmdline_bytes = cmdline.as_bytes_with_nul();
    memory
        .write_slice(cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| StartError::GuestMemory("command line"))?;

    let e820: Vec<E820Entry> = boot_params::e820_map(&memory_ranges(mem_bytes));
    mptable::setup_mptable(memory, config.vcpus)?;
    let slots: Vec<(u64, u32)> = (0..virtio_devices).map(virtio::slot).collect();
    let rsdp = acpi::setup_acpi(memory, config.vcpus, &slots)?;
    match kernel.mode {
        EntryMode::Linux64 => boot_params::write_zero_page(
            memory,
            kernel.setup_header,
            cmdline_bytes.len(),
            initrd,
            &e820,
            rsdp,
        )?,
        EntryMode::Pvh => boot_params::write_pvh_start_info(memory, initrd, &e820, rsdp)?,
    }
    Ok(kernel)
}

/// The compiled filters for the threads a VM starts; `None` with seccomp off.
struct ThreadFilters {
    vcpu: Option<ThreadFilter>,
    events: Option<ThreadFilter>,
}

impl ThreadFilters {
    fn new(config: &VmConfig) -> Result<Self, StartError> {
        if !config.seccomp {
            log::warn!("seccomp is off: a guest that escapes into ember may make any system call");
            return Ok(ThreadFilters {
                vcpu: None,
                events: None,
            });
        }
        #[cfg(debug_assertions)]
        let selftest = config.seccomp_selftest;
        #[cfg(not(debug_assertions))]
        let selftest = None;
        Ok(ThreadFilters {
            vcpu: Some(ThreadFilter::new(ThreadKind::Vcpu, selftest)?),
            events: Some(ThreadFilter::new(ThreadKind::Events, selftest)?),
        })
    }
}
