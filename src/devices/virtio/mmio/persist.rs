//! The transport's state: its registers, each queue, the interrupt status and the device's own
//! state. Restore applies it to a freshly built transport (same device, same backend, same guest
//! memory) and, when the saved status says DRIVER_OK, activates the device again.

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, rings_fit,
};
use crate::devices::StateError;
use crate::devices::virtio::state::{QueueState, VirtioDeviceState};
use crate::devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};

const DEVICE: &str = "virtio-mmio transport";
const STATUS_KNOWN: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// One virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// virtio device ID, checked against the rebuilt device.
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver acknowledged.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Each queue, in the device's order.
    pub queues: Vec<QueueState>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

impl MmioTransport {
    /// Gives the guest back what the device holds (receive buffers, a frame the TAP would not
    /// take), so a save has nothing in flight. Runs on the event loop, as queue work does; every
    /// queue is served again afterwards, so a VM that goes on running loses nothing.
    pub fn prepare_save(&mut self) {
        if !self.active {
            return;
        }
        self.device.prepare_save(&mut self.queues, &self.mem);
        self.kick_event_loop();
    }

    /// The transport's state (after [`MmioTransport::prepare_save`]).
    pub fn save(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueState::of).collect(),
            device: self.device.save_state(),
        }
    }

    /// Applies `state` to this freshly built transport; refuses it, changing nothing, if any of
    /// it is malformed or does not fit the device.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), StateError> {
        if self.status != 0 {
            return Err(StateError::mismatch(DEVICE, "the device is already in use"));
        }
        let queues = self.check(state)?;
        self.device.restore_state(&state.device)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if state.interrupt_status != 0 {
            // Raised again: the guest may not have seen it before the save.
            self.interrupt.trigger(state.interrupt_status);
        }
        if is_active(state.status) {
            self.device.activate(self.driver_features);
            self.active = true;
            self.kick_event_loop();
        }
        Ok(())
    }

    /// Everything about `state` that can be checked without changing anything; the queues.
    fn check(&self, state: &MmioState) -> Result<Vec<Queue>, StateError> {
        let invalid = |reason: String| Err(StateError::invalid(DEVICE, reason));
        if state.device_type != self.device.device_type() {
            return Err(StateError::mismatch(
                DEVICE,
                format!(
                    "saved device type {}, this slot has type {}",
                    state.device_type,
                    self.device.device_type()
                ),
            ));
        }
        if state.status & !STATUS_KNOWN != 0 {
            return invalid(format!("status {:#x}", state.status));
        }
        if state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return invalid(format!("interrupt status {:#x}", state.interrupt_status));
        }
        if state.status & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if state.driver_features & !offered != 0
                || state.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                return invalid(format!(
                    "driver features {:#x} (offered {offered:#x})",
                    state.driver_features
                ));
            }
        }
        let active = is_active(state.status);
        if active {
            let required = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            if state.status & required != required || state.status & STATUS_FAILED != 0 {
                return invalid(format!("DRIVER_OK with status {:#x}", state.status));
            }
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(StateError::mismatch(
                DEVICE,
                format!(
                    "{} queues saved, the device has {}",
                    state.queues.len(),
                    max_sizes.len()
                ),
            ));
        }
        let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max {
                return Err(StateError::mismatch(
                    DEVICE,
                    format!(
                        "queue {index} of {} entries, the device's has {max}",
                        saved.max_size
                    ),
                ));
            }
            let queue = saved
                .to_queue()
                .map_err(|why| StateError::invalid(DEVICE, format!("queue {index}: {why}")))?;
            if saved.ready && !rings_fit(&queue, &self.mem) {
                return invalid(format!("queue {index}: rings outside guest memory"));
            }
            if active && saved.event_idx_enabled != event_idx {
                return invalid(format!(
                    "queue {index}: EVENT_IDX differs from the features"
                ));
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

/// Whether a transport with `status` has its device running.
fn is_active(status: u32) -> bool {
    status & STATUS_DRIVER_OK != 0 && status & STATUS_NEEDS_RESET == 0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::guest_memory::GuestMemoryMmap;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::VirtioDevice;

    /// A device with two queues that counts its activations.
    struct Dummy(Arc<AtomicU64>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            9
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        }
        fn config_space(&self) -> &[u8] {
            &[]
        }
        fn activate(&mut self, _features: u64) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
            false
        }
        fn reset(&mut self) {}
    }

    struct Fixture {
        transport: MmioTransport,
        activations: Arc<AtomicU64>,
        irq: EventFd,
        notify: Vec<EventFd>,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activations = Arc::new(AtomicU64::new(0));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let transport = MmioTransport::new(
            Box::new(Dummy(activations.clone())),
            mem,
            irq.try_clone().unwrap(),
            notify.iter().map(|e| e.try_clone().unwrap()).collect(),
        )
        .unwrap();
        Fixture {
            transport,
            activations,
            irq,
            notify,
        }
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// What a driver does: features, both queues, DRIVER_OK; then one used-ring interrupt.
    fn drive_to_driver_ok(t: &mut MmioTransport) {
        write(t, 0x070, STATUS_ACKNOWLEDGE);
        write(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, 0x024, 1);
        write(t, 0x020, 1); // VERSION_1, bit 32
        write(t, 0x024, 0);
        write(t, 0x020, 1 << 29); // EVENT_IDX
        write(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for (queue, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            write(t, 0x030, queue);
            write(t, 0x038, 8);
            write(t, 0x080, base);
            write(t, 0x090, base + 0x1000);
            write(t, 0x0a0, base + 0x2000);
            write(t, 0x044, 1);
        }
        write(t, 0x030, 1);
        write(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.active);
        t.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn an_active_transport_round_trips_and_is_active_again() {
        let mut a = fixture();
        drive_to_driver_ok(&mut a.transport);
        let saved = a.transport.save();
        assert!(is_active(saved.status));
        assert_eq!(saved.queues[1].size, 8);
        assert_eq!(saved.queue_sel, 1);

        let mut b = fixture();
        b.transport.restore(&saved).unwrap();
        assert_eq!(b.transport.save(), saved);
        assert!(b.transport.active);
        assert_eq!(b.activations.load(Ordering::SeqCst), 1);
        assert_eq!(
            b.irq.read().unwrap(),
            1,
            "the pending interrupt is raised again"
        );
        for evt in &b.notify {
            assert_eq!(evt.read().unwrap(), 1, "each queue is served once");
        }
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<MmioState>(&json).unwrap(), saved);
    }

    #[test]
    fn a_transport_before_driver_ok_is_restored_inactive() {
        let mut a = fixture();
        write(&mut a.transport, 0x070, STATUS_ACKNOWLEDGE);
        let saved = a.transport.save();
        let mut b = fixture();
        b.transport.restore(&saved).unwrap();
        assert_eq!(b.transport.save(), saved);
        assert!(!b.transport.active);
        assert_eq!(b.activations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let mut a = fixture();
        drive_to_driver_ok(&mut a.transport);
        let good = a.transport.save();
        let mut b = fixture();
        let before = b.transport.save();
        let mut cases: Vec<(&str, MmioState)> = Vec::new();
        let mut s = good.clone();
        s.queues[0].desc_table = 1 << 40;
        cases.push(("rings outside guest memory", s));
        let mut s = good.clone();
        s.queues[0].size = 3;
        cases.push(("size 3", s));
        let mut s = good.clone();
        s.queues[0].size = 32;
        cases.push(("size 32", s));
        let mut s = good.clone();
        s.queues[0].next_avail = 1000;
        cases.push(("in flight", s));
        let mut s = good.clone();
        s.status |= 0x100;
        cases.push(("status 0x10f", s));
        let mut s = good.clone();
        s.interrupt_status = 4;
        cases.push(("interrupt status", s));
        let mut s = good.clone();
        s.driver_features |= 1 << 60;
        cases.push(("driver features", s));
        let mut s = good.clone();
        s.status = STATUS_DRIVER_OK;
        cases.push(("DRIVER_OK with status", s));
        let mut s = good.clone();
        s.queues[1].event_idx_enabled = false;
        cases.push(("EVENT_IDX", s));
        let mut s = good.clone();
        s.queues.pop();
        cases.push(("1 queues saved", s));
        let mut s = good.clone();
        s.queues[0].max_size = 8;
        cases.push(("queue 0 of 8 entries", s));
        let mut s = good.clone();
        s.device_type = 2;
        cases.push(("device type 2", s));
        let mut s = good.clone();
        s.device = VirtioDeviceState::Net(crate::devices::virtio::state::NetState {
            mac: [0; 6],
            acked_features: 0,
        });
        cases.push(("stateless", s));
        for (expected, state) in cases {
            let err = b.transport.restore(&state).unwrap_err();
            assert!(err.to_string().contains(expected), "{expected}: {err}");
            assert_eq!(b.transport.save(), before);
            assert!(!b.transport.active);
        }
        assert_eq!(b.activations.load(Ordering::SeqCst), 0);
        assert!(b.irq.read().is_err(), "no interrupt raised");
    }
}
