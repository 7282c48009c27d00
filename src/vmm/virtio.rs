//! Placing virtio devices: a 4 KiB MMIO slot and an interrupt line each, an ioeventfd per queue,
//! and the `virtio_mmio.device=` entries that tell Linux where they are.

use std::sync::{Arc, Mutex};

use crate::guest_memory::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::StartError;
use super::event_loop::Subscriber;
use crate::arch::x86_64::layout::VIRTIO_MMIO_START;
use crate::devices::bus::Buses;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::vstate::vm::Vm;

/// The first virtio device's interrupt line; lines 0-4 are the legacy ISA lines (timer,
/// keyboard, cascade, COM2, COM1), kept free for what the guest expects there.
const FIRST_VIRTIO_IRQ: u32 = 5;

/// Guest-physical base and interrupt line of virtio device `index`.
pub fn slot(index: usize) -> (u64, u32) {
    let index32 = u32::try_from(index).unwrap_or(u32::MAX);
    (
        VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
        FIRST_VIRTIO_IRQ + index32,
    )
}

/// Announces `count` devices on the kernel command line.
pub fn add_to_cmdline(cmdline: &mut Cmdline, count: usize) -> Result<(), StartError> {
    for index in 0..count {
        let (base, irq) = slot(index);
        cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
            .map_err(StartError::Cmdline)?;
    }
    Ok(())
}

/// Puts `device` in slot `index`: MMIO window on the bus, irqfd, one ioeventfd per queue, and
/// the transport on the event loop. Returns the transport for the device manager.
pub fn attach(
    device: Box<dyn VirtioDevice>,
    index: usize,
    vm: &Vm,
    memory: &GuestMemoryMmap,
    buses: &mut Buses,
    subscribers: &mut Vec<Subscriber>,
) -> Result<Arc<Mutex<MmioTransport>>, StartError> {
    let (base, irq) = slot(index);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
    vm.register_irqfd(&irqfd, irq)?;
    let mut notify = Vec::new();
    for queue in 0..device.queue_max_sizes().len() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::Eventfd)?;
        let queue = u32::try_from(queue).unwrap_or(u32::MAX);
        vm.register_ioevent(&evt, base + QUEUE_NOTIFY_OFFSET, queue)?;
        notify.push(evt);
    }
    let transport =
        MmioTransport::new(device, memory.clone(), irqfd, notify).map_err(StartError::Queue)?;
    let transport = Arc::new(Mutex::new(transport));
    buses
        .mmio
        .insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
    subscribers.push(transport.clone());
    Ok(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_boot_timer_and_stay_in_the_mmio_gap() {
        assert_eq!(slot(0), (0xc000_1000, 5));
        assert_eq!(slot(1), (0xc000_2000, 6));
        let (last_base, last_irq) = slot(crate::config::MAX_VIRTIO_DEVICES - 1);
        assert!(last_irq <= 23, "IOAPIC pins end at 23");
        assert!(last_base < crate::arch::x86_64::layout::IOAPIC_START);
    }

    #[test]
    fn cmdline_names_each_slot() {
        let mut cmdline = Cmdline::new(512).unwrap();
        add_to_cmdline(&mut cmdline, 2).unwrap();
        let s = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert!(s.contains("virtio_mmio.device=4K@0xc0001000:5"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xc0002000:6"), "{s}");
    }
}
