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

use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

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

    /// Moves frames from the TAP to the guest until one side runs dry.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        while !self.tap_gone {
            if self.rx_pending == 0 {
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
                    let bytes = frame.len - VNET_HDR_LEN as u64;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::Command;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const TAP: &str = "ember-t1";

    /// Sends one Ethernet frame out of interface `TAP` from the host side: it becomes readable
    /// on the TAP's descriptor.
    fn inject(frame: &[u8]) {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_ifindex = i32::try_from(index).unwrap();
        // SAFETY: buffer and address are ours, with their lengths.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(usize::try_from(sent).ok(), Some(frame.len()));
    }

    /// Runs `f` with a device on a fresh TAP (up, no IPv6 chatter) in a network namespace of
    /// its own thread.
    fn with_net(f: impl FnOnce(Net) + Send + 'static) {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread's namespaces; the result is checked.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
            assert!(unshared, "this test needs root (CAP_NET_ADMIN) for a TAP");
            // No router solicitations or MLD reports on the new link: only the test's frames.
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                let _ = std::fs::write(path, "1");
            }
            let tap = Tap::open(TAP).unwrap();
            let up = Command::new("ip").args(["link", "set", TAP, "up"]).status();
            assert!(up.unwrap().success());
            f(Net::new(tap, [6, 0, 0, 0, 0, 1]));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn without_receive_buffers_the_tap_is_not_read_until_the_guest_adds_some() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::new(&mem, 16);
            let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
            assert!(!net.process_queue(RX, &mut queues[RX], &mem));
            assert!(net.backend().unwrap().1.contains(EventSet::IN));

            // A frame arrives while the guest has given no buffer: it is held, and the TAP is
            // no longer watched for input.
            let frame: Vec<u8> = (0..100u8).collect();
            inject(&frame);
            assert_eq!(net.process_backend(EventSet::IN, &mut queues, &mem), 0);
            assert!(!net.backend().unwrap().1.contains(EventSet::IN));

            // The guest adds a buffer and notifies: the held frame goes in, and the TAP is
            // watched again.
            let buf = RawDescriptor::from(Descriptor::new(0x10_0000, 2048, 2, 0));
            rx.add_desc_chains(&[buf], 0).unwrap();
            assert!(net.process_queue(RX, &mut queues[RX], &mem));
            assert!(net.backend().unwrap().1.contains(EventSet::IN));
            let len_addr = rx.used_addr().unchecked_add(4 + 4);
            let used_len: u32 = mem.read_obj(len_addr).unwrap();
            assert_eq!(used_len as usize, VNET_HDR_LEN + frame.len());
            let mut got = vec![0u8; frame.len()];
            mem.read_slice(&mut got, GuestAddress(0x10_0000 + VNET_HDR_LEN as u64))
                .unwrap();
            assert_eq!(got, frame);
            assert_eq!(net.counters().snapshot().rx_packets, 1);
        });
    }

    /// The transmit side of the spin the `virtio_mmio_registers` fuzz target found in
    /// virtio-blk (same drain / re-enable / re-check loop): a used ring two bytes after the
    /// available ring, without EVENT_IDX, makes the device's own flag writes flip the
    /// available index, so that every re-check saw a frame no pass could find.
    #[test]
    fn overlapping_transmit_rings_do_not_spin() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.try_set_size(8).unwrap();
            queue
                .try_set_desc_table_address(GuestAddress(0x2c70))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(0x7676))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(0x7678))
                .unwrap();
            queue.set_ready(true);
            net.activate(VIRTIO_F_VERSION_1);
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                net.process_queue(TX, &mut queue, &mem);
                let _ = done.send(net.errors.count());
            });
            let errors = finished
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("transmit spins on overlapping rings");
            assert!(errors >= 1, "the broken ring is counted");
        });
    }

    /// What epoll reports for the device's backend right now (without waiting).
    fn epoll_events(net: &Net) -> EventSet {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as Ep};
        let (fd, wanted) = net.backend().unwrap();
        let epoll = Epoll::new().unwrap();
        let event = EpollEvent::new(Ep::from_bits_truncate(wanted.bits()), 0);
        epoll.ctl(ControlOperation::Add, fd, event).unwrap();
        let mut ready = [EpollEvent::default(); 1];
        match epoll.wait(0, &mut ready).unwrap() {
            0 => EventSet::empty(),
            _ => EventSet::from_bits_truncate(ready[0].events()),
        }
    }

    #[test]
    fn a_deleted_tap_ends_the_interface_instead_of_spinning_the_event_loop() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::new(&mem, 16);
            let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1);
            assert_eq!(epoll_events(&net), EventSet::empty());
            let del = Command::new("ip").args(["link", "del", TAP]).status();
            assert!(del.unwrap().success());
            // The deleted TAP's descriptor reports an error, on every wait.
            let events = epoll_events(&net);
            assert!(events.contains(EventSet::ERROR), "{events:?}");
            net.process_backend(events, &mut queues, &mem);
            assert_eq!(net.backend(), None, "the dead TAP is still watched");
            // A frame the guest sends now comes back unsent, counted as an error.
            let hdr = RawDescriptor::from(Descriptor::new(0x10_0000, 12, 1, 1));
            let body = RawDescriptor::from(Descriptor::new(0x10_1000, 60, 0, 0));
            tx.add_desc_chains(&[hdr, body], 0).unwrap();
            assert!(net.process_queue(TX, &mut queues[TX], &mem));
            let stats = net.counters().snapshot();
            assert_eq!((stats.tx_packets, stats.tx_errors), (0, 1), "{stats:?}");
            // Receive buffers stay untouched, and still nothing is watched.
            let buf = RawDescriptor::from(Descriptor::new(0x20_0000, 2048, 2, 0));
            rx.add_desc_chains(&[buf], 0).unwrap();
            assert!(!net.process_queue(RX, &mut queues[RX], &mem));
            assert_eq!(net.backend(), None);
        });
    }

    #[test]
    fn transmit_headers_asking_for_offloads_not_negotiated_are_dropped_and_counted() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let tx = MockSplitQueue::new(&mem, 16);
            let mut queue = tx.create_queue().unwrap();
            // Checksum and TCPv4 segmentation negotiated; TCPv6 not; UDP never offered.
            net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4));
            let mut chains = Vec::new();
            for (k, gso_type) in [4u8, 3, 0x81].into_iter().enumerate() {
                let at = 0x10_0000 + 0x1000 * k as u64;
                let mut hdr = [0u8; VNET_HDR_LEN];
                hdr[0] = 1; // NEEDS_CSUM
                hdr[1] = gso_type;
                hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
                mem.write_slice(&hdr, GuestAddress(at)).unwrap();
                chains.push(RawDescriptor::from(Descriptor::new(at, 12 + 100, 0, 0)));
            }
            // Three one-descriptor chains.
            tx.add_desc_chains(&chains, 0).unwrap();
            assert!(net.process_queue(TX, &mut queue, &mem));
            let stats = net.counters().snapshot();
            assert_eq!((stats.tx_drops, stats.tx_packets), (3, 0), "{stats:?}");
            assert_eq!(net.errors.count(), 3);
        });
    }

    #[test]
    fn rings_whose_index_runs_ahead_are_refused_without_spinning() {
        with_net(|mut net| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::new(&mem, 16);
            let mut queues: [Queue; 2] = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            for queue in &mut queues {
                queue.set_event_idx(true);
            }
            // The guest claims 1000 new chains in 16-entry rings.
            rx.avail().idx().store(1000);
            tx.avail().idx().store(1000);
            // Each pass ends (a spin would hang this test), counting the broken ring.
            assert!(!net.process_queue(TX, &mut queues[TX], &mem));
            inject(&[0xff; 64]);
            assert!(!net.process_queue(RX, &mut queues[RX], &mem));
            assert!(net.errors.count() >= 2);
            // The frame waits; the TAP is not watched until the guest notifies again.
            assert!(!net.backend().unwrap().1.contains(EventSet::IN));
        });
    }

    /// Whether `fd` becomes readable within 5 s.
    fn fires(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, 5000) == 1 }
    }

    /// One frame per 200 ms each way: the second frame sent waits for the timer (the TAP not
    /// watched for it), and so does the second received (the TAP not read meanwhile); each is
    /// counted once, and goes when the timer fires.
    #[test]
    fn frames_past_the_rate_limits_wait_for_the_timer() {
        with_net(|mut net| {
            let one_per_200ms = RateLimiterConfig {
                bandwidth: None,
                ops: Some(crate::config::TokenBucketConfig {
                    size: 1,
                    one_time_burst: None,
                    refill_time: 200,
                }),
            };
            net.set_rate_limiters(Some(&one_per_200ms), Some(&one_per_200ms));
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::new(&mem, 16);
            let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
            let timer = net.timer().unwrap();

            let frames: Vec<RawDescriptor> = (0..2u64)
                .map(|k| {
                    RawDescriptor::from(Descriptor::new(0x10_0000 + k * 0x1000, 12 + 60, 0, 0))
                })
                .collect();
            tx.add_desc_chains(&frames, 0).unwrap();
            net.process_queue(TX, &mut queues[TX], &mem);
            assert_eq!(net.counters().snapshot().tx_packets, 1);
            assert_eq!(net.counters().throttled(), (0, 1));
            assert!(!net.backend().unwrap().1.contains(EventSet::OUT));
            assert!(fires(timer), "the timer fires");
            net.process_timer(&mut queues, &mem);
            assert_eq!(net.counters().snapshot().tx_packets, 2);
            assert_eq!(net.counters().throttled(), (0, 1));

            let bufs: Vec<RawDescriptor> = (0..4u64)
                .map(|k| RawDescriptor::from(Descriptor::new(0x20_0000 + k * 0x1000, 2048, 2, 0)))
                .collect();
            rx.add_desc_chains(&bufs, 0).unwrap();
            net.process_queue(RX, &mut queues[RX], &mem);
            inject(&[0x11; 64]);
            inject(&[0x22; 64]);
            std::thread::sleep(std::time::Duration::from_millis(50));
            net.process_backend(EventSet::IN, &mut queues, &mem);
            assert_eq!(net.counters().snapshot().rx_packets, 1);
            assert_eq!(net.counters().throttled(), (1, 1));
            assert!(
                !net.backend().unwrap().1.contains(EventSet::IN),
                "the TAP is not read while the frame waits"
            );
            assert!(fires(timer), "the timer fires");
            net.process_timer(&mut queues, &mem);
            assert_eq!(net.counters().snapshot().rx_packets, 2);
            assert!(net.backend().unwrap().1.contains(EventSet::IN));
        });
    }
}
