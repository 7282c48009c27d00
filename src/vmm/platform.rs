//! The platform devices every VM has: the I/O APIC, COM1, the i8042 (reset line and keyboard),
//! the ACPI sleep registers (power-off), the VM generation ID with its event interrupt, the
//! port-0x80 debug port and, when asked for, the boot timer; on the buses, in the device manager, and served by the
//! event loop where they take host input.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::StartError;
use super::console::{self, Console};
use super::devices::{DeviceManager, VirtioEntry};
use super::event_loop::{ConsoleInput, Subscriber};
use super::exit::ExitState;
use crate::arch::x86_64::ioapic_id;
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_CONTROL_PORT, BOOT_TIMER_START, COM1_IRQ, COM1_PORT, DEBUG_PORT, GED_IRQ,
    I8042_DATA_PORT, I8042_KBD_IRQ, IOAPIC_START, VMGENID_START,
};
use crate::config::VmConfig;
use crate::devices::bus::Buses;
use crate::devices::legacy::{AcpiPm, I8042, IoApic, SerialDevice};
use crate::devices::pseudo::debug_port::DebugCodes;
use crate::devices::pseudo::{BootTimer, DebugPort, VmGenId};
use crate::exit::ExitReason;
use crate::timing::Timeline;
use crate::vstate::vm::Vm;

/// The platform devices, before the virtio devices join them in the device manager.
pub struct Platform {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    ioapic: Arc<Mutex<IoApic>>,
    debug_port: Arc<Mutex<DebugPort>>,
    debug_codes: DebugCodes,
    boot_timer: Option<Arc<Mutex<BootTimer>>>,
    vmgenid: Mutex<VmGenId>,
}

impl Platform {
    /// The device manager with these and the virtio devices.
    pub fn with_virtio(self, virtio: Vec<VirtioEntry>) -> DeviceManager {
        let serial_counters = super::devices::lock(&self.serial).counters();
        DeviceManager {
            serial: self.serial,
            serial_counters,
            i8042: self.i8042,
            ioapic: self.ioapic,
            debug_port: self.debug_port,
            debug_codes: self.debug_codes,
            boot_timer: self.boot_timer,
            vmgenid: self.vmgenid,
            virtio,
        }
    }
}

/// Creates the platform devices on `buses`; console input joins `subscribers`.
pub fn create(
    config: &VmConfig,
    vm: &Vm,
    exit: &Arc<ExitState>,
    timeline: &Arc<Timeline>,
    buses: &mut Buses,
    subscribers: &mut Vec<Subscriber>,
) -> Result<(Platform, Option<Console>), StartError> {
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        ioapic_id(config.vcpus),
        Box::new(vm.route_installer()),
    )));
    buses
        .mmio
        .insert(IOAPIC_START, IoApic::WINDOW, ioapic.clone())?;
    let mut ends = console::open(&config.console)?;
    // Flushes queued guest output when the host side can take it again, not only on the
    // guest's next write.
    if let Some(drain) = ends.drain.take() {
        subscribers.push(Arc::new(Mutex::new(drain)));
    }

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
        let mut console_input = ConsoleInput::new(input, serial.clone(), rx_space);
        if ends.escape {
            let quit = exit.wake_event().map_err(StartError::Eventfd)?;
            console_input = console_input.with_escape(quit);
        }
        subscribers.push(Arc::new(Mutex::new(console_input)));
    }

    // The i8042: its reset line ends the VM; its keyboard interrupt (GSI 1) carries
    // Ctrl-Alt-Del to the guest.
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
    // Hardware-reduced ACPI's sleep registers: `_S5` written there powers the VM off.
    let poweroff_exit = exit.clone();
    let acpi_pm = AcpiPm::new(move || poweroff_exit.report(ExitReason::PowerOff));
    buses.pio.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        AcpiPm::PORT_RANGE,
        Arc::new(Mutex::new(acpi_pm)),
    )?;

    let boot_timer = if config.boot_timer {
        let timer = Arc::new(Mutex::new(BootTimer::new(timeline.clone())));
        buses
            .mmio
            .insert(BOOT_TIMER_START, BootTimer::WINDOW, timer.clone())?;
        Some(timer)
    } else {
        None
    };
    // Always there, as on Firecracker: a boot costs one getrandom and one irqfd.
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
    vm.register_irqfd(&ged_irq, GED_IRQ)?;
    let vmgenid = Mutex::new(VmGenId::new(
        vm_memory::GuestAddress(VMGENID_START),
        ged_irq,
    )?);
    let debug_codes = DebugCodes::default();
    let debug_port = Arc::new(Mutex::new(DebugPort::new(debug_codes.clone())));
    buses
        .pio
        .insert(u64::from(DEBUG_PORT), 1, debug_port.clone())?;
    let platform = Platform {
        serial,
        i8042,
        ioapic,
        debug_port,
        debug_codes,
        boot_timer,
        vmgenid,
    };
    Ok((platform, ends.embedder))
}
