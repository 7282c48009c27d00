//! The virtio-net device: features, config space, and both directions on the event loop.
//!
//! Receive: the TAP is watched for input only while the guest has given buffers; a frame that
//! does not fit waits (the TAP is not read further) until the guest adds more. Transmit: a queue
//! notification drains the transmit queue into the TAP; if the TAP would block, the frame waits
//! and the TAP is watched for output instead.
//!
//! Rate limits: a frame read from the TAP waits for the receive limiter's tokens before it is
//! delivered (the TAP is not read further meanwhile), a transmit frame for the transmit
//! limiter's before it is written; the device's timer wakes them.
//!
//! A TAP deleted on the host (its descriptor reports an error, reads and writes fail with
//! EBADFD) ends the interface, not the VM: ember logs it once, stops watching the descriptor,
//! and from then on returns the guest's transmit chains unsent and leaves its receive buffers
//! empty.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::guest_memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::header::TxOffloads;
use super::rx::{Delivery, RxPool};
use super::tap::{Tap, VNET_HDR_LEN};
use super::tx::{self, MAX_TX_LEN, TxFrame};
use super::{NetCounters, bump, next_chain};
use crate::config::RateLimiterConfig;
use crate::devices::GuestErrors;
use crate::devices::virtio::drain::{Pass, drain};
use crate::devices::virtio::rate_limiter::{RateLimiter, Timer};
use crate::devices::virtio::{
    LimiterKind, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, return_chain,
};

mod persist;
pub use persist::NetState;

const VIRTIO_ID_NET: u32 = 1;
/// Receive queue, then transmit queue.
const RX: usize = 0;
const TX: usize = 1;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// A whole frame as the TAP hands it over: header plus up to a 64 KiB packet.
#[allow(clippy::cast_possible_truncation)] // 65 KiB fits any usize ember runs on.
const RX_BUFFER_LEN: usize = MAX_TX_LEN as usize;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Most frames read from the TAP in one receive pass.
pub const RX_FRAMES_PER_PASS: usize = 64;

/// A virtio-net device on a TAP.
pub struct Net {
    tap: Tap,
    config: [u8; 6],
    acked: u64,
    /// The guest's offload choice is applied on the event loop, not the vCPU thread.
    offload_pending: bool,
    rx_frame: Vec<u8>,
    /// Bytes of a frame read from the TAP and not yet delivered (0: none).
    rx_pending: usize,
    rx_pool: RxPool,
    /// The guest has no room for the pending frame: stop reading the TAP.
    rx_waiting: bool,
    /// A frame the TAP would not take yet; sent before any other.
    tx_pending: Option<TxFrame>,
    /// What the guest's transmit headers may ask for.
    tx_offloads: TxOffloads,
    /// The TAP was deleted under us: nothing is read or written any more.
    tap_gone: bool,
    /// The last transmit drain ran out of budget: serve the queue again.
    tx_backlog: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The pending frame was paid for (received: `rx_pending`'s; sent: `tx_pending`'s).
    rx_paid: bool,
    tx_paid: bool,
    /// Wakes a direction its limiter held back.
    timer: Option<Timer>,
    active: bool,
    counters: Arc<NetCounters>,
    errors: GuestErrors,
}

impl Net {
    /// A device on `tap` with MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            config: mac,
            acked: 0,
            offload_pending: false,
            rx_frame: vec![0; RX_BUFFER_LEN],
            rx_pending: 0,
            rx_pool: RxPool::default(),
            rx_waiting: false,
            tx_pending: None,
            tx_offloads: TxOffloads::default(),
            tap_gone: false,
            tx_backlog: false,
            rx_limiter: RateLimiter::new(None),
            tx_limiter: RateLimiter::new(None),
            rx_paid: false,
            tx_paid: false,
            timer: Timer::new()
                .map_err(|e| log::warn!("virtio-net: no rate-limiter timer: {e}"))
                .ok(),
            active: false,
            counters: Arc::new(NetCounters::default()),
            errors: GuestErrors::default(),
        }
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Replaces the receive and the transmit rate limiters (full buckets, as configured).
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        self.rx_limiter = RateLimiter::new(rx);
        self.tx_limiter = RateLimiter::new(tx);
    }

    /// Takes `bytes` from `limiter`; if it must wait, counts the frame once in `throttled`
    /// and arms the timer.
    fn admit(
        limiter: &mut RateLimiter,
        timer: &mut Option<Timer>,
        throttled: &std::sync::atomic::AtomicU64,
        bytes: u64,
    ) -> bool {
        let was_blocked = limiter.is_blocked();
        match limiter.consume(bytes) {
            Ok(()) => true,
            Err(wait) => {
                if !was_blocked {
                    bump(throttled, 1);
                }
                if let Some(timer) = timer {
                    timer.arm(wait);
                }
                false
            }
        }
    }

    fn mergeable(&self) -> bool {
        self.acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// What the TAP may hand us, from what the guest accepts. TSO needs checksum offload.
    fn tap_offloads(&self) -> libc::c_uint {
        if self.acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    fn apply_offloads(&mut self) {
        if std::mem::take(&mut self.offload_pending) && !self.tap_gone {
            if let Err(e) = self.tap.set_offload(self.tap_offloads()) {
                log::warn!("virtio-net: {e}");
            }
        }
    }

    /// The TAP is gone (deleted on the host): says so once, and serves the interface no more.
    fn lose_tap(&mut self) {
        if !self.tap_gone {
            self.tap_gone = true;
            self.rx_pending = 0;
            log::error!(
                "virtio-net: TAP {} is gone (deleted on the host?); its interface stops, the VM runs on",
                self.tap.name()
            );
        }
    }

    /// Moves frames from the TAP to the guest until one side runs dry, or [`RX_FRAMES_PER_PASS`]
    /// frames were read: the TAP is watched level-triggered, so the event loop comes back for
    /// the rest after serving everything else (a flood on the TAP cannot hold the loop).
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        let mut reads = 0;
        while !self.tap_gone {
            if self.rx_pending == 0 {
                if reads == RX_FRAMES_PER_PASS {
                    break;
                }
                reads += 1;
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                        self.lose_tap();
                        break;
                    }
                    Err(e) => {
                        bump(&self.counters.rx_errors, 1);
                        log::warn!("virtio-net: cannot read TAP {}: {e}", self.tap.name());
                        break;
                    }
                }
            }
            if !self.rx_paid {
                let bytes = (self.rx_pending - VNET_HDR_LEN) as u64;
                if !Self::admit(
                    &mut self.rx_limiter,
                    &mut self.timer,
                    &self.counters.rx_throttled,
                    bytes,
                ) {
                    // The frame waits (the TAP is not read meanwhile) for the timer.
                    break;
                }
                self.rx_paid = true;
            }
            let mergeable = self.mergeable();
            let frame = &mut self.rx_frame[..self.rx_pending];
            let (delivery, moved) =
                self.rx_pool
                    .deliver(queue, mem, frame, mergeable, &self.errors);
            used_any |= moved;
            match delivery {
                Delivery::Delivered(_) => {
                    bump(&self.counters.rx_packets, 1);
                    bump(
                        &self.counters.rx_bytes,
                        (self.rx_pending - VNET_HDR_LEN) as u64,
                    );
                    self.rx_pending = 0;
                    self.rx_paid = false;
                }
                Delivery::TooBig => {
                    bump(&self.counters.rx_drops, 1);
                    self.rx_pending = 0;
                    self.rx_paid = false;
                }
                Delivery::Broken => {
                    // Retried when the guest notifies again or resets the device.
                    self.rx_waiting = true;
                    break;
                }
                Delivery::NoBuffers => {
                    // Ask to be told when buffers come, unless some came meanwhile.
                    match queue.enable_notification(mem) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => self
                            .errors
                            .record(|| format!("virtio-net: broken receive ring: {e:?}")),
                    }
                    self.rx_waiting = true;
                    break;
                }
            }
        }
        used_any
    }

    /// Sends every frame the guest queued, until the TAP would block.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        let end = drain(queue, mem, |queue, budget| {
            let mut found = false;
            loop {
                let frame = match self.tx_pending.take() {
                    Some(frame) => frame,
                    None if !budget.allows() => return Ok(Pass::Exhausted),
                    None => {
                        // A ring error is retried when the guest notifies again, not spun on.
                        let Some(chain) = next_chain(queue, mem)? else {
                            return Ok(Pass::Drained { found });
                        };
                        found = true;
                        budget.charge(0);
                        let head = chain.head_index();
                        match self.checked_frame(chain, mem) {
                            Ok(frame) => frame,
                            Err(why) => {
                                bump(&self.counters.tx_drops, 1);
                                self.errors.record(|| format!("virtio-net: dropped {why}"));
                                self.complete(queue, mem, head);
                                used_any = true;
                                continue;
                            }
                        }
                    }
                };
                if self.tap_gone {
                    bump(&self.counters.tx_errors, 1);
                    self.complete(queue, mem, frame.head);
                    used_any = true;
                    self.tx_paid = false;
                    continue;
                }
                if !self.tx_paid {
                    let bytes = frame.len.saturating_sub(VNET_HDR_LEN as u64);
                    if !Self::admit(
                        &mut self.tx_limiter,
                        &mut self.timer,
                        &self.counters.tx_throttled,
                        bytes,
                    ) {
                        // Sent when the timer fires; the TAP is not watched for it.
                        self.tx_pending = Some(frame);
                        return Ok(Pass::Stopped);
                    }
                    self.tx_paid = true;
                }
                match tx::send(&self.tap, mem, &frame) {
                    Ok(n) if n as u64 == frame.len => {
                        bump(&self.counters.tx_packets, 1);
                        bump(&self.counters.tx_bytes, frame.len - VNET_HDR_LEN as u64);
                    }
                    Ok(n) => {
                        bump(&self.counters.tx_errors, 1);
                        self.errors
                            .record(|| format!("virtio-net: TAP took {n} of {} bytes", frame.len));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        // Paid for: waits for the TAP, not the limiter.
                        self.tx_pending = Some(frame);
                        return Ok(Pass::Stopped);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                        bump(&self.counters.tx_errors, 1);
                        self.lose_tap();
                    }
                    Err(e) => {
                        // E.g. a header the kernel rejects, or the TAP is down.
                        bump(&self.counters.tx_errors, 1);
                        self.errors
                            .record(|| format!("virtio-net: TAP refused a frame: {e}"));
                    }
                }
                self.tx_paid = false;
                self.complete(queue, mem, frame.head);
                used_any = true;
            }
        });
        end.record(&self.errors, "virtio-net transmit");
        self.tx_backlog = end.backlog();
        used_any
    }

    /// A transmit chain checked, and its header checked against the negotiated offloads.
    fn checked_frame(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<TxFrame, String> {
        let frame = tx::parse(chain, mem)?;
        self.tx_offloads
            .check(&frame.header)
            .map_err(|refused| refused.to_string())?;
        Ok(frame)
    }

    fn complete(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) {
        return_chain(queue, mem, head, 0, &self.errors);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
        self.tx_offloads = TxOffloads::from_features(features);
        self.offload_pending = true;
        self.active = true;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.apply_offloads();
        match index {
            RX => {
                // New buffers: deliver what waits, and watch the TAP again.
                self.rx_waiting = false;
                self.receive(queue, mem)
            }
            TX => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn backend(&self) -> Option<(RawFd, EventSet)> {
        if !self.active || self.tap_gone {
            return None;
        }
        let mut events = EventSet::empty();
        if !self.rx_waiting && !self.rx_limiter.is_blocked() {
            events |= EventSet::IN;
        }
        if self.tx_pending.is_some() && self.tx_paid {
            events |= EventSet::OUT;
        }
        Some((self.tap.as_raw_fd(), events))
    }

    fn process_backend(
        &mut self,
        events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> u32 {
        self.apply_offloads();
        let mut moved = 0;
        // epoll reports an error on a TAP whose interface was deleted, whatever was asked
        // for, and keeps reporting it: unhandled, it would spin the event loop.
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.lose_tap();
        }
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            // Also returns a frame that waited for a TAP now gone.
            if let Some(queue) = queues.get_mut(TX) {
                if self.transmit(queue, mem) {
                    moved |= 1 << TX;
                }
            }
        }
        if events.contains(EventSet::IN) && !self.rx_waiting && !self.rx_limiter.is_blocked() {
            if let Some(queue) = queues.get_mut(RX) {
                if self.receive(queue, mem) {
                    moved |= 1 << RX;
                }
            }
        }
        moved
    }

    fn reset(&mut self) {
        self.active = false;
        self.acked = 0;
        self.rx_pending = 0;
        self.rx_pool.clear();
        self.rx_waiting = false;
        self.tx_pending = None;
        self.tx_offloads = TxOffloads::default();
        self.tx_backlog = false;
        self.rx_paid = false;
        self.tx_paid = false;
        self.rx_limiter.unblock();
        self.tx_limiter.unblock();
    }

    fn timer(&self) -> Option<RawFd> {
        self.timer.as_ref().map(Timer::fd)
    }

    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> u32 {
        if let Some(timer) = &mut self.timer {
            timer.fired();
        }
        if !self.active {
            return 0;
        }
        let mut moved = 0;
        if self.tx_limiter.is_blocked() {
            self.tx_limiter.unblock();
            if let Some(queue) = queues.get_mut(TX) {
                if self.transmit(queue, mem) {
                    moved |= 1 << TX;
                }
            }
        }
        if self.rx_limiter.is_blocked() {
            self.rx_limiter.unblock();
            if let Some(queue) = queues.get_mut(RX) {
                if !self.rx_waiting && self.receive(queue, mem) {
                    moved |= 1 << RX;
                }
            }
        }
        moved
    }

    fn set_rate_limiter(&mut self, which: LimiterKind, config: Option<&RateLimiterConfig>) -> bool {
        match which {
            LimiterKind::Rx => self.rx_limiter = RateLimiter::new(config),
            LimiterKind::Tx => self.tx_limiter = RateLimiter::new(config),
            LimiterKind::Disk => return false,
        }
        true
    }

    fn take_backlog(&mut self) -> u32 {
        u32::from(std::mem::take(&mut self.tx_backlog)) << TX
    }

    fn prepare_save(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) {
        self.give_back_buffers(queues, mem);
    }

    fn save_state(&self) -> crate::devices::virtio::state::VirtioDeviceState {
        self.save_device_state()
    }

    fn restore_state(
        &mut self,
        state: &crate::devices::virtio::state::VirtioDeviceState,
    ) -> Result<(), crate::devices::StateError> {
        self.restore_device_state(state)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
