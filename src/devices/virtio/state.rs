//! virtio state as plain data: each queue ([`QueueState`], virtio-queue's own, made
//! serializable), a transport ([`MmioState`], in `mmio::persist`) and the device behind it
//! ([`VirtioDeviceState`]).

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

pub use super::block::BlockState;
pub use super::net::NetState;
pub use super::rng::RngState;

/// One virtqueue: virtio-queue's `QueueState`, field for field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The device's largest size.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx_enabled: bool,
}

impl QueueState {
    /// `queue`'s state.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// The queue, checked by virtio-queue (size a power of two within the maximum, aligned
    /// rings); what fits guest memory is the transport's to check.
    pub fn to_queue(&self) -> Result<Queue, String> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!(
                "size {} (a power of two up to {} is needed)",
                self.size, self.max_size
            ));
        }
        // Entries taken but not returned: at most a queue's worth.
        let in_flight = self.next_avail.wrapping_sub(self.next_used);
        if in_flight > self.size {
            return Err(format!(
                "{in_flight} entries in flight in a queue of {}",
                self.size
            ));
        }
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e:?}"))
    }
}

/// The state of the device behind a transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A device with nothing of its own to save.
    None,
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-rng.
    Rng(RngState),
}

impl VirtioDeviceState {
    /// What kind of device this state is for, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::None => "a stateless device",
            VirtioDeviceState::Block(_) => "virtio-blk",
            VirtioDeviceState::Net(_) => "virtio-net",
            VirtioDeviceState::Rng(_) => "virtio-rng",
        }
    }
}
