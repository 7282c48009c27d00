//! The boot sequence, in order: KVM -> memory -> VM -> memslots -> split irqchip -> kernel and
//! boot tables -> devices (the I/O APIC first) -> vCPUs -> threads.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::console::{self, Console};
use super::event_loop::{self, ConsoleInput, Subscriber};
use super::exit::ExitState;
use super::{StartError, VmHandle, virtio};
use crate::arch::x86_64::boot_params::{self, E820Entry};
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_CONTROL_PORT, BOOT_TIMER_START, CMDLINE_MAX_SIZE, CMDLINE_START, COM1_IRQ,
    COM1_PORT, DEBUG_PORT, I8042_DATA_PORT, I8042_KBD_IRQ, IOAPIC_START,
};
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{acpi, ioapic_id, low_memory_end, memory_ranges, mptable};
use crate::config::{ConfigError, VmConfig};
use crate::devices::legacy::{AcpiPm, I8042, IoApic, SerialDevice};
use crate::devices::pseudo::debug_port::DebugCodes;
use crate::devices::pseudo::{BootTimer, DebugPort};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, DiskFile};
use crate::devices::virtio::net::{Net, Tap};
use crate::exit::ExitReason;
use crate::loader::{self, LoadedKernel};
use crate::sandbox::ThreadKind;
use crate::sandbox::seccomp::{self, ThreadFilter};
use crate::timing::{Phase, Timeline};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::create_guest_memory;
use crate::vstate::vcpu::{self, BootEntry, Buses, Vcpu};
use crate::vstate::vm::Vm;

/// Builds and starts the VM described by `config`.
pub fn start(config: &VmConfig) -> Result<VmHandle, StartError> {
    config.validate()?;
    // Disks first: a locked or missing image is the user's error, worth reporting before KVM's.
    let disks = config
        .disks
        .iter()
        .map(|d| Ok((DiskFile::open(&d.path, d.read_only, d.direct)?, d.serial())))
        .collect::<Result<Vec<_>, StartError>>()?;
    let taps = config
        .nets
        .iter()
        .map(|n| Ok((Tap::open(&n.tap)?, n.mac())))
        .collect::<Result<Vec<_>, StartError>>()?;
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
    let memory = create_guest_memory(config.memory_mib)?;
    let vm = Vm::new(&kvm)?;
    timeline.mark(Phase::VmCreated);
    vm.register_memory(&memory)?;
    vm.create_irqchip()?;
    timeline.mark(Phase::MemoryMapped);

    let kernel = load_kernel_and_tables(config, &memory)?;
    timeline.mark(Phase::KernelLoaded);
    if let (Some(from), Some(to)) = (
        timeline.get(Phase::MemoryMapped),
        timeline.get(Phase::KernelLoaded),
    ) {
        let mapped = kernel.mapped_bytes >> 10;
        let took = to.saturating_sub(from).as_micros();
        log::info!("kernel loaded in {took} us ({mapped} KiB mapped from the page cache)");
    }
    log::debug!("kernel entry {:#x} via {:?}", kernel.entry.0, kernel.mode);

    let exit = Arc::new(ExitState::new(timeline.clone()).map_err(StartError::Eventfd)?);
    let (mut buses, mut subscribers, console, i8042) = create_devices(config, &vm, &exit)?;
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (disk, serial) in disks {
        devices.push(Box::new(Block::new(disk, &serial)));
    }
    let mut nets = Vec::new();
    for (tap, mac) in taps {
        log::debug!("net {}: MAC {mac}", tap.name());
        let name = tap.name().to_owned();
        let net = Net::new(tap, mac.0);
        nets.push((name, net.counters()));
        devices.push(Box::new(net));
    }
    for (index, device) in devices.into_iter().enumerate() {
        virtio::attach(device, index, &vm, &memory, &mut buses, &mut subscribers)?;
    }

    if config.boot_timer {
        let timer = BootTimer::new(timeline.clone());
        buses.mmio.insert(
            BOOT_TIMER_START,
            BootTimer::WINDOW,
            Arc::new(Mutex::new(timer)),
        )?;
    }
    let debug_codes = DebugCodes::default();
    let debug_port = DebugPort::new(debug_codes.clone());
    buses
        .pio
        .insert(u64::from(DEBUG_PORT), 1, Arc::new(Mutex::new(debug_port)))?;
    timeline.mark(Phase::DevicesReady);

    vcpu::install_kick_handler()?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(index, vm.create_vcpu(index)?);
        let boot = (index == 0).then_some(BootEntry {
            entry: kernel.entry,
            mode: kernel.mode,
        });
        vcpu.configure(&kvm, config.vcpus, &memory, boot)?;
        vcpus.push(vcpu);
    }

    let filters = ThreadFilters::new(config)?;
    let events = event_loop::start(subscribers, filters.events.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let buses = Arc::new(buses);
    let mut threads = Vec::with_capacity(vcpus.len());
    for mut vcpu in vcpus {
        let (buses, stop, exit) = (buses.clone(), stop.clone(), exit.clone());
        let timeline = (vcpu.index() == 0).then(|| timeline.clone());
        let filter = filters.vcpu.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ember-vcpu{}", vcpu.index()))
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) = seccomp::apply(&filter) {
                        exit.report(ExitReason::VmmError(e.to_string()));
                        return;
                    }
                    filter.selftest();
                }
                if let Some(timeline) = timeline {
                    timeline.mark(Phase::FirstKvmRun);
                }
                let reason = vcpu.run(&buses, &stop);
                if reason != ExitReason::Stopped {
                    exit.report(reason);
                }
            })
            .map_err(StartError::Thread)?;
        threads.push(thread);
    }
    Ok(VmHandle::new(super::Running {
        vm,
        memory,
        exit,
        stop,
        vcpu_threads: threads,
        events,
        console,
        timeline,
        debug_codes,
        nets,
        smaps,
        i8042,
    }))
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
    virtio::add_to_cmdline(&mut cmdline, config.disks.len() + config.nets.len())?;
    let cmdline = cmdline.as_cstring().map_err(StartError::Cmdline)?;
    let cmdline_bytes = cmdline.as_bytes_with_nul();
    memory
        .write_slice(cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| StartError::GuestMemory("command line"))?;

    let e820: Vec<E820Entry> = boot_params::e820_map(&memory_ranges(mem_bytes));
    mptable::setup_mptable(memory, config.vcpus)?;
    let rsdp = acpi::setup_acpi(memory, config.vcpus)?;
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

/// [shutdown branch] What `create_devices` returns; the i8042 stays reachable for Ctrl-Alt-Del.
type LegacyDevices = (Buses, Vec<Subscriber>, Option<Console>, Arc<Mutex<I8042>>);

/// The I/O APIC, COM1 and the i8042 on the buses, and the event-loop subscribers that serve them.
fn create_devices(
    config: &VmConfig,
    vm: &Vm,
    exit: &Arc<ExitState>,
) -> Result<LegacyDevices, StartError> {
    let mut buses = Buses::default();
    let mut subscribers: Vec<Subscriber> = Vec::new();
    let ioapic = IoApic::new(ioapic_id(config.vcpus), Box::new(vm.route_installer()));
    buses
        .mmio
        .insert(IOAPIC_START, IoApic::WINDOW, Arc::new(Mutex::new(ioapic)))?;
    let ends = console::open(&config.console)?;

    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let rx_space = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq,
        rx_space.try_clone().map_err(StartError::Eventfd)?,
        ends.output,
    )));
    buses.pio.insert(
        u64::from(COM1_PORT),
        SerialDevice::PORT_RANGE,
        serial.clone(),
    )?;
    if let Some(input) = ends.input {
        let mut console_input = ConsoleInput::new(input, serial, rx_space);
        if ends.escape {
            let quit = exit.wake_event().map_err(StartError::Eventfd)?;
            console_input = console_input.with_escape(quit);
        }
        subscribers.push(Arc::new(Mutex::new(console_input)));
    }

    // [shutdown branch: minimal wiring, to be redone in the device manager]
    let reset_exit = exit.clone();
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        move || reset_exit.report(ExitReason::Reset),
        kbd_irq,
    )));
    buses
        .pio
        .insert(u64::from(I8042_DATA_PORT), I8042::PORT_RANGE, i8042.clone())?;
    let poweroff_exit = exit.clone();
    let acpi_pm = AcpiPm::new(move || poweroff_exit.report(ExitReason::PowerOff));
    buses.pio.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        AcpiPm::PORT_RANGE,
        Arc::new(Mutex::new(acpi_pm)),
    )?;
    Ok((buses, subscribers, ends.embedder, i8042))
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
