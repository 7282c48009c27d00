//! virtio-net on a host TAP: the device ([`Net`]), its receive and transmit paths, and the TAP.

mod device;
pub mod header;
pub mod rx;
pub mod tap;
pub mod tx;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};

pub use device::{Net, NetState};
pub use tap::{Tap, TapError};

/// What one interface has done, updated by the event loop and readable while the VM runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_drops: AtomicU64,
    rx_errors: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_drops: AtomicU64,
    tx_errors: AtomicU64,
    rx_throttled: AtomicU64,
    tx_throttled: AtomicU64,
}

/// A snapshot of [`NetCounters`]. Bytes count frames without the virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames read from the TAP that did not fit the guest's buffers.
    pub rx_drops: u64,
    /// Receive buffers the guest got wrong (read-only, outside its memory), and TAP read errors.
    pub rx_errors: u64,
    /// Frames written to the TAP.
    pub tx_packets: u64,
    /// Bytes written to the TAP.
    pub tx_bytes: u64,
    /// Malformed transmit chains from the guest, and headers asking for offloads it did not
    /// negotiate: dropped.
    pub tx_drops: u64,
    /// Frames the TAP refused or failed to take (or that found it deleted).
    pub tx_errors: u64,
}

/// The next chain the guest made available. `Err` when its ring is broken (say, an available
/// index more than a queue ahead), which must end the pass rather than be retried: unlike
/// `pop_descriptor_chain`, this keeps "nothing more" and "broken" apart.
fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl NetCounters {
    /// Frames the receive and the transmit rate limiters held back (each counted once).
    pub fn throttled(&self) -> (u64, u64) {
        (
            self.rx_throttled.load(Ordering::Relaxed),
            self.tx_throttled.load(Ordering::Relaxed),
        )
    }

    /// The current values.
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_drops: get(&self.rx_drops),
            rx_errors: get(&self.rx_errors),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_drops: get(&self.tx_drops),
            tx_errors: get(&self.tx_errors),
        }
    }
}

impl std::fmt::Display for NetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rx {} packets {} bytes {} dropped {} errors, tx {} packets {} bytes {} dropped {} errors",
            self.rx_packets,
            self.rx_bytes,
            self.rx_drops,
            self.rx_errors,
            self.tx_packets,
            self.tx_bytes,
            self.tx_drops,
            self.tx_errors
        )
    }
}
