//! The virtio-vsock device: config space (the guest's CID), the three queues, and the muxer as
//! its backend.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::guest_memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;

use super::muxer::{Filled, Muxer};
use super::packet::EVENT_TRANSPORT_RESET;
use super::{MAX_PKT_LEN, VsockCounters};
use crate::devices::StateError;
use crate::devices::virtio::drain::{Pass, drain};
use crate::devices::virtio::state::VirtioDeviceState;
use crate::devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    return_chain,
};

const VIRTIO_ID_VSOCK: u32 = 19;
/// Receive (device to driver), transmit, event.
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;

/// The device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket path is taken.
    #[error("vsock socket {} already exists: remove it or choose another path", .0.display())]
    Exists(PathBuf),
    /// Binding or watching the socket failed.
    #[error("cannot listen on vsock socket {}", .path.display())]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-vsock device whose host side is Unix sockets.
pub struct Vsock {
    config: [u8; 8],
    muxer: Muxer,
    active: bool,
    rx_backlog: bool,
    tx_backlog_pending: bool,
    /// A transport-reset event waits for an event buffer.
    event_owed: bool,
    /// The event queue is to be served once (a transport reset just happened).
    event_kick: bool,
}

impl Vsock {
    /// A device for guest CID `guest_cid`, listening on `uds_path` (removed when the device is
    /// dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::Exists(uds_path.to_owned()));
        }
        let muxer = Muxer::new(guest_cid, uds_path).map_err(|source| VsockError::Listen {
            path: uds_path.to_owned(),
            source,
        })?;
        Ok(Vsock {
            config: guest_cid.to_le_bytes(),
            muxer,
            active: false,
            rx_backlog: false,
            tx_backlog_pending: false,
            event_owed: false,
            event_kick: false,
        })
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.muxer.counters()
    }

    /// After a snapshot is restored: every connection ends (the host sockets close), the
    /// listener stays, and the guest gets the transport-reset event once the event queue
    /// (queue 2) is served, which its driver answers by dropping its connections too.
    pub fn transport_reset(&mut self) {
        self.muxer.reset_all();
        self.event_owed = true;
        self.event_kick = true;
    }

    /// Moves packets for the guest into its receive buffers.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        let muxer = &mut self.muxer;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            loop {
                if !muxer.has_rx_work() {
                    // Buffers the guest gave stay for later; no notification is needed.
                    return Ok(Pass::Stopped);
                }
                if !budget.allows() {
                    return Ok(Pass::Exhausted);
                }
                let Some(mut chain) = next_chain(queue, mem)? else {
                    return Ok(Pass::Drained { found });
                };
                found = true;
                let head = chain.head_index();
                let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_LEN) {
                    Ok(mut packet) => match muxer.fill_rx(&mut packet) {
                        Filled::Packet(len) => len,
                        Filled::Nothing => {
                            queue.go_to_previous_position();
                            return Ok(Pass::Stopped);
                        }
                    },
                    Err(e) => {
                        muxer
                            .errors()
                            .record(|| format!("virtio-vsock: receive buffer refused: {e}"));
                        0
                    }
                };
                budget.charge(u64::from(len));
                return_chain(queue, mem, head, len, muxer.errors());
                used_any = true;
            }
        });
        end.record(self.muxer.errors(), "virtio-vsock receive");
        self.rx_backlog = end.backlog();
        used_any
    }

    /// Takes every packet the guest sent.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        let muxer = &mut self.muxer;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            loop {
                if !budget.allows() {
                    return Ok(Pass::Exhausted);
                }
                let Some(mut chain) = next_chain(queue, mem)? else {
                    return Ok(Pass::Drained { found });
                };
                found = true;
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_LEN) {
                    Ok(packet) => {
                        budget.charge(u64::from(packet.len()));
                        muxer.from_guest(&packet);
                    }
                    Err(e) => {
                        budget.charge(0);
                        muxer
                            .errors()
                            .record(|| format!("virtio-vsock: packet refused: {e}"));
                    }
                }
                return_chain(queue, mem, head, 0, muxer.errors());
                used_any = true;
            }
        });
        end.record(self.muxer.errors(), "virtio-vsock transmit");
        if end.backlog() {
            self.tx_backlog_pending = true;
        }
        used_any
    }

    /// Delivers an owed transport-reset event.
    fn deliver_event(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if !self.event_owed {
            return false;
        }
        let chain = match next_chain(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return false,
            Err(e) => {
                self.muxer
                    .errors()
                    .record(|| format!("virtio-vsock: broken event ring: {e:?}"));
                return false;
            }
        };
        let head = chain.head_index();
        let mut len = 0;
        if let Some(desc) = chain.clone().next() {
            let id = EVENT_TRANSPORT_RESET.to_le_bytes();
            if desc.is_write_only() && desc.len() >= 4 && mem.write_slice(&id, desc.addr()).is_ok()
            {
                len = 4;
                self.event_owed = false;
            }
        }
        if len == 0 {
            self.muxer
                .errors()
                .record(|| "virtio-vsock: event buffer refused".into());
        }
        return_chain(queue, mem, head, len, self.muxer.errors());
        true
    }
}

fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _features: u64) {
        self.active = true;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX => self.receive(queue, mem),
            TX => {
                let used = self.transmit(queue, mem);
                // Replies (responses, resets, credit) go out on the receive queue, which this
                // call does not hold: it is served on the next turn.
                if self.muxer.has_rx_work() {
                    self.rx_backlog = true;
                }
                used
            }
            EVENT => self.deliver_event(queue, mem),
            _ => false,
        }
    }

    fn backend(&self) -> Option<(RawFd, EventSet)> {
        self.active.then(|| (self.muxer.epoll_fd(), EventSet::IN))
    }

    fn process_backend(
        &mut self,
        _events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> u32 {
        self.muxer.process_host();
        match queues.get_mut(RX) {
            Some(queue) if queue.ready() => u32::from(self.receive(queue, mem)) << RX,
            _ => 0,
        }
    }

    fn reset(&mut self) {
        self.muxer.reset_all();
        self.active = false;
        self.rx_backlog = false;
        self.tx_backlog_pending = false;
        // A driver starting afresh has no connections to drop.
        self.event_owed = false;
    }

    /// A snapshot holds no connections (Firecracker's rule): the restored guest's are gone, and
    /// it learns so from a transport reset, delivered once the transport has re-activated the
    /// device and serves its queues. A guest whose driver never bound resets the device
    /// first, which withdraws the event.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::None => {
                self.transport_reset();
                Ok(())
            }
            other => Err(StateError::mismatch(
                "virtio-vsock",
                format!("state of {}", other.kind()),
            )),
        }
    }

    fn take_backlog(&mut self) -> u32 {
        let mut bits = u32::from(std::mem::take(&mut self.rx_backlog)) << RX;
        bits |= u32::from(std::mem::take(&mut self.tx_backlog_pending)) << TX;
        bits |= u32::from(std::mem::take(&mut self.event_kick)) << EVENT;
        bits
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
