//! virtio-net's own state (the MAC address the guest read, the features it acknowledged) and
//! `prepare_save`: before a save the device gives back every guest buffer it holds, so the
//! snapshot has nothing in flight.
//!
//! What `prepare_save` gives back, and how: receive chains waiting in the pool for a frame, and
//! a transmit chain whose frame the TAP would not take yet, are un-taken by moving the queue's
//! next-available index back over them (virtio-queue's `set_next_avail`), when they are exactly
//! the last entries taken from the available ring (always, for a guest that does not rewrite
//! entries it has published); otherwise they are returned used and empty. A frame read from the
//! TAP and not yet delivered stays in ember, so it reaches a guest that goes on running and is
//! lost, like any dropped frame, to a restored one.

use crate::guest_memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{Net, RX, TX};
use crate::devices::StateError;
use crate::devices::virtio::state::VirtioDeviceState;
use crate::devices::virtio::{VirtioDevice, return_chain};

const DEVICE: &str = "virtio-net";

/// What the guest knows of an interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address in the config space.
    pub mac: [u8; 6],
    /// Features the driver acknowledged (0 before DRIVER_OK); the transport activates the
    /// device with its own copy, this one is checked against what the device offers.
    pub acked_features: u64,
}

impl Net {
    /// The interface as the guest knows it.
    pub fn save(&self) -> NetState {
        NetState {
            mac: self.config,
            acked_features: self.acked,
        }
    }

    /// The device's state for its transport.
    pub(super) fn save_device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.save())
    }

    /// Restores a transport's device state, which must be virtio-net's.
    pub(super) fn restore_device_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::Net(state) => self.restore(state),
            other => Err(StateError::mismatch(
                DEVICE,
                format!("state of {}", other.kind()),
            )),
        }
    }

    /// Applies `state`: the saved MAC address replaces the configured one, since the guest
    /// already uses it.
    pub fn restore(&mut self, state: &NetState) -> Result<(), StateError> {
        let offered = self.features();
        if state.acked_features & !offered != 0 {
            return Err(StateError::invalid(
                DEVICE,
                format!(
                    "acknowledged features {:#x} (offered {offered:#x})",
                    state.acked_features
                ),
            ));
        }
        self.config = state.mac;
        Ok(())
    }

    /// Gives back the receive chains in the pool and a transmit chain waiting for the TAP.
    pub(super) fn give_back_buffers(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) {
        if let Some(rx) = queues.get_mut(RX) {
            let heads: Vec<u16> = self.rx_pool.heads().collect();
            give_back(rx, mem, &heads, &self.errors);
            self.rx_pool.clear();
        }
        if let (Some(tx), Some(frame)) = (queues.get_mut(TX), self.tx_pending.take()) {
            give_back(tx, mem, &[frame.head], &self.errors);
        }
    }
}

/// Un-takes `heads` (the last chains taken from `queue`, oldest first) by moving its
/// next-available index back, or, if the ring no longer lists them there, returns them empty.
fn give_back(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    heads: &[u16],
    errors: &crate::devices::GuestErrors,
) {
    let Ok(count) = u16::try_from(heads.len()) else {
        return;
    };
    if count == 0 {
        return;
    }
    let first = queue.next_avail().wrapping_sub(count);
    let listed = (0..count)
        .all(|i| avail_entry(queue, mem, first.wrapping_add(i)) == Some(heads[usize::from(i)]));
    if listed {
        queue.set_next_avail(first);
    } else {
        errors.record(|| "virtio-net: available ring rewritten under the device".into());
        for &head in heads {
            return_chain(queue, mem, head, 0, errors);
        }
    }
}

/// The head at position `position` (free-running) of the available ring.
fn avail_entry(queue: &Queue, mem: &GuestMemoryMmap, position: u16) -> Option<u16> {
    let size = queue.size();
    if size == 0 {
        return None;
    }
    let offset = 4 + 2 * u64::from(position % size);
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring().checked_add(offset)?))
        .ok()
        .map(u16::from_le)
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    use virtio_queue::QueueOwnedT;

    use super::super::bit;
    use super::super::tests::{inject, with_net};
    use super::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

    const WRITE: u16 = 2;

    #[test]
    fn pooled_receive_buffers_go_back_to_the_ring() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            // Both mocks lay their rings at the same addresses: create both before adding.
            let tx = MockSplitQueue::new(&mem, 16);
            for i in 0..3u16 {
                let addr = 0x10_0000 + u64::from(i) * 0x1000;
                let desc = RawDescriptor::from(Descriptor::new(addr, 400, WRITE, 0));
                rx.add_desc_chains(&[desc], i).unwrap();
            }
            let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
            // A frame larger than the three buffers: they wait in the pool, taken, not used.
            inject(&[0xaa; 1400]);
            net.process_queue(RX, &mut queues[RX], &mem);
            assert_eq!(queues[RX].next_avail(), 3);
            net.prepare_save(&mut queues, &mem);
            assert_eq!(
                queues[RX].next_avail(),
                0,
                "the three chains are available again"
            );
            let used = queues[RX]
                .used_idx(&mem, std::sync::atomic::Ordering::Acquire)
                .unwrap();
            assert_eq!(used.0, 0, "none was used");
            assert_eq!(net.rx_pool.heads().count(), 0);
        });
    }

    #[test]
    fn buffers_the_guest_rewrote_in_its_ring_are_returned_empty() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            // Both mocks lay their rings at the same addresses: create both before adding.
            let tx = MockSplitQueue::new(&mem, 16);
            for i in 0..2u16 {
                let addr = 0x10_0000 + u64::from(i) * 0x1000;
                let desc = RawDescriptor::from(Descriptor::new(addr, 400, WRITE, 0));
                rx.add_desc_chains(&[desc], i).unwrap();
            }
            let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
            inject(&[0xaa; 1400]);
            net.process_queue(RX, &mut queues[RX], &mem);
            assert_eq!(queues[RX].next_avail(), 2);
            // The guest overwrites its published entry 1.
            let entry = rx.avail_addr().unchecked_add(4 + 2);
            mem.write_obj(9u16, entry).unwrap();
            net.prepare_save(&mut queues, &mem);
            assert_eq!(queues[RX].next_avail(), 2);
            let used = queues[RX]
                .used_idx(&mem, std::sync::atomic::Ordering::Acquire)
                .unwrap();
            assert_eq!(used.0, 2, "both returned, empty");
        });
    }

    #[test]
    fn a_transmit_chain_waiting_for_the_tap_goes_back_to_the_ring() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
            let desc = RawDescriptor::from(Descriptor::new(0x10_0000, 100, 0, 0));
            tx.add_desc_chains(&[desc], 0).unwrap();
            let mut queues: [Queue; 2] = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1);
            // The device took the chain and the TAP would not take the frame yet.
            let head = queues[TX].iter(&mem).unwrap().next().unwrap().head_index();
            net.tx_pending = Some(crate::devices::virtio::net::tx::TxFrame {
                head,
                header: [0; crate::devices::virtio::net::tap::VNET_HDR_LEN],
                buffers: vec![(GuestAddress(0x10_0000 + 12), 88)]
                    .into_iter()
                    .collect(),
                len: 100,
            });
            assert_eq!(queues[TX].next_avail(), 1);
            net.prepare_save(&mut queues, &mem);
            assert_eq!(queues[TX].next_avail(), 0);
            assert!(net.tx_pending.is_none());
            let used = queues[TX]
                .used_idx(&mem, std::sync::atomic::Ordering::Acquire)
                .unwrap();
            assert_eq!(used.0, 0);
        });
    }

    #[test]
    fn state_round_trips_and_hostile_features_are_refused() {
        with_net(|mut net| {
            net.activate(VIRTIO_F_VERSION_1);
            let mut saved = net.save_state();
            let VirtioDeviceState::Net(s) = &mut saved else {
                panic!("{saved:?}")
            };
            s.mac = [6, 1, 2, 3, 4, 5];
            net.restore_state(&saved).unwrap();
            assert_eq!(net.config_space(), [6, 1, 2, 3, 4, 5]);
            let json = serde_json::to_string(&saved).unwrap();
            assert_eq!(
                serde_json::from_str::<VirtioDeviceState>(&json).unwrap(),
                saved
            );

            let VirtioDeviceState::Net(s) = &mut saved else {
                unreachable!()
            };
            s.acked_features = 1 << 63;
            s.mac = [0; 6];
            assert!(matches!(
                net.restore_state(&saved),
                Err(StateError::Invalid { .. })
            ));
            assert_eq!(net.config_space(), [6, 1, 2, 3, 4, 5], "unchanged");
            let block = VirtioDeviceState::Block(crate::devices::virtio::state::BlockState {
                capacity: 1,
                features: 0,
            });
            assert!(matches!(
                net.restore_state(&block),
                Err(StateError::Mismatch { .. })
            ));
        });
    }
}
