//! The virtio-mmio transport, version 2 (modern): one 4 KiB register window and one interrupt
//! line per device.
//!
//! vCPU threads reach it through the MMIO bus (register reads and writes only); the event loop
//! reaches it through the queues' ioeventfds and runs the device's queue work. A guest can write
//! any value to any register in any order: such writes are refused (and counted) without harm,
//! and a broken configuration leaves the device inactive with DEVICE_NEEDS_RESET set.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::guest_memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VirtioDevice};
use crate::devices::GuestErrors;
use crate::devices::bus::BusDevice;

mod persist;
pub use persist::MmioState;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfds listen.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5242_4d45; // "EMBR"
const CONFIG_SPACE: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// The device's backend descriptor as the event loop watches it now.
    watched_backend: Option<(RawFd, EventSet)>,
    errors: GuestErrors,
}

impl MmioTransport {
    /// Wraps `device`; `notify` holds one eventfd per queue (registered with KVM as ioeventfds on
    /// QueueNotify by the caller), and `irqfd` raises the device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
        notify: Vec<EventFd>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            watched_backend: None,
            errors: GuestErrors::default(),
        })
    }

    /// Puts the device on another disk image and tells the driver its configuration changed
    /// (a new ConfigGeneration and the configuration-change interrupt), as a disk resize does.
    pub fn replace_disk(
        &mut self,
        disk: crate::devices::virtio::block::DiskFile,
    ) -> Result<(), String> {
        self.device.replace_disk(disk)?;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt
            .trigger(crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG);
        Ok(())
    }

    /// Lets another VMM take the device's backend (a migration's hand-over; the VM is paused).
    pub fn release_backend(&mut self) -> std::io::Result<()> {
        self.device.release_backend()
    }

    /// Takes the backend back (the migration failed).
    pub fn reclaim_backend(&mut self) -> std::io::Result<()> {
        self.device.reclaim_backend()
    }

    /// Guest mistakes refused so far.
    pub fn guest_errors(&self) -> u64 {
        self.errors.count()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the driver has said DRIVER_OK.
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            0x000 => MAGIC_VALUE,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => low_half(self.device.features()),
                1 => high_half(self.device.features()),
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                self.errors
                    .record(|| format!("virtio-mmio: read of register {offset:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => self.refuse(offset, value),
            },
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 => self.with_queue(offset, value, |q| {
                q.try_set_size(u16::try_from(value).unwrap_or(0))
            }),
            0x044 => self.with_queue(offset, value, |q| {
                q.set_ready(value == 1);
                Ok(())
            }),
            0x050 => self.notify_without_ioeventfd(value),
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            // Checked setters: virtio-queue's plain ones log every refusal, unthrottled.
            0x080 | 0x084 => self.with_queue(offset, value, |q| {
                q.try_set_desc_table_address(with_half(q.desc_table(), offset, value))
            }),
            0x090 | 0x094 => self.with_queue(offset, value, |q| {
                q.try_set_avail_ring_address(with_half(q.avail_ring(), offset, value))
            }),
            0x0a0 | 0x0a4 => self.with_queue(offset, value, |q| {
                q.try_set_used_ring_address(with_half(q.used_ring(), offset, value))
            }),
            _ => self.refuse(offset, value),
        }
    }

    fn with_queue(
        &mut self,
        offset: u64,
        value: u32,
        f: impl FnOnce(&mut Queue) -> Result<(), virtio_queue::Error>,
    ) {
        match self.selected_queue().map(f) {
            Some(Ok(())) => {}
            _ => self.refuse(offset, value),
        }
    }

    fn refuse(&self, offset: u64, value: u32) {
        self.errors.record(|| {
            format!(
                "virtio-mmio: refused write {value:#x} to register {offset:#x} (status {:#x})",
                self.status
            )
        });
    }

    /// A QueueNotify write that no ioeventfd matched (another width, say): it reaches the
    /// transport on a vCPU thread, whose filter forbids device I/O, so the queue is handed to
    /// the event loop through its notification eventfd instead of being served here.
    fn notify_without_ioeventfd(&mut self, value: u32) {
        match usize::try_from(value)
            .ok()
            .and_then(|index| self.notify.get(index))
        {
            Some(evt) => {
                // A failed write means the counter is saturated: the loop wakes anyway.
                let _ = evt.write(1);
            }
            None => self.refuse(QUEUE_NOTIFY_OFFSET, value),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.2, 3.1.1).
        if value & self.status != self.status {
            self.refuse(0x070, value);
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // FEATURES_OK does not stick: the driver sees it and gives up.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let required = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        let queues_ok = self
            .queues
            .iter()
            .all(|q| !q.ready() || rings_fit(q, &self.mem));
        if self.status & required != required || self.status & STATUS_FAILED != 0 || !queues_ok {
            self.errors.record(|| {
                format!(
                    "virtio-mmio: DRIVER_OK with status {:#x} or invalid queues",
                    self.status
                )
            });
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        self.device.activate(self.driver_features);
        self.active = true;
        // Serve every queue once on the event loop: buffers the driver queued before DRIVER_OK
        // get seen, and the device's backend gets watched.
        self.kick_event_loop();
    }

    fn kick_event_loop(&self) {
        for evt in &self.notify {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio-mmio: cannot wake the event loop: {e}");
            }
        }
    }

    fn reset(&mut self) {
        // Requests in flight finish first: nothing writes guest memory after the reset. Their
        // chains return to rings the guest is about to forget, so no interrupt.
        if self.active {
            self.device.quiesce(&mut self.queues, &self.mem);
        }
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.clear();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.active = false;
        // Let the event loop stop watching the device's backend.
        self.kick_event_loop();
    }

    /// Runs the device on queue `index` and interrupts the guest if it asked to be told.
    fn serve_queue(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !self.active || !queue.ready() {
            return;
        }
        if self.device.process_queue(index, queue, &self.mem) {
            self.signal_used(index);
        }
        self.reschedule_backlog();
    }

    /// Queues whose drain ran out of budget get their notification again: the event loop serves
    /// them on its next turn, after whatever else is ready (a stop, console input, the other
    /// devices), instead of one guest keeping the thread.
    fn reschedule_backlog(&mut self) {
        let backlog = self.device.take_backlog();
        for (index, evt) in self.notify.iter().enumerate() {
            if backlog & (1 << index) != 0 {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio-mmio: cannot reschedule a queue: {e}");
                }
            }
        }
    }

    /// Queue `index`'s used ring moved: interrupt the guest if it asked to be told.
    fn signal_used(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        match queue.needs_notification(&self.mem) {
            Ok(false) => {}
            Ok(true) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
            // The guest broke its ring; interrupting it is the safe answer.
            Err(_) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
        }
    }

    /// The device's backend is ready.
    fn serve_backend(&mut self, events: EventSet) {
        if !self.active {
            return;
        }
        let moved = self
            .device
            .process_backend(events, &mut self.queues, &self.mem);
        self.signal_moved(moved);
        self.reschedule_backlog();
    }

    /// Completes everything the device has in flight and interrupts the guest for what
    /// returned. The VMM calls it with the vCPUs and the event loop parked (a pause, before a
    /// snapshot) or stopped (teardown); it waits on any thread without the event loop's system
    /// calls.
    pub fn quiesce(&mut self) {
        if !self.active {
            return;
        }
        let moved = self.device.quiesce(&mut self.queues, &self.mem);
        self.signal_moved(moved);
        // The device left notifications off while it had requests in flight, counting on
        // their completions to bring it back: serve every queue once on the event loop (after
        // a resume), which turns them on again.
        self.kick_event_loop();
    }

    /// Replaces the device's rate limiter `which` (`PATCH /drives/{id}`,
    /// `PATCH /network-interfaces/{id}`); false if it has no such limiter. The queues are then
    /// served again on the event loop, so one the old limit held back resumes under the new.
    pub fn set_rate_limiter(
        &mut self,
        which: super::LimiterKind,
        config: Option<&crate::config::RateLimiterConfig>,
    ) -> bool {
        let changed = self.device.set_rate_limiter(which, config);
        if changed && self.active {
            self.kick_event_loop();
        }
        changed
    }

    /// The device's timer fired.
    fn serve_timer(&mut self) {
        if !self.active {
            return;
        }
        let moved = self.device.process_timer(&mut self.queues, &self.mem);
        self.signal_moved(moved);
        self.reschedule_backlog();
    }

    fn signal_moved(&mut self, moved: u32) {
        for index in 0..self.queues.len() {
            if moved & (1 << index) != 0 {
                self.signal_used(index);
            }
        }
    }

    /// Makes the event loop watch the backend for what the device waits for now.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        let wanted = match self.device.backend() {
            Some((fd, events)) if self.active && !events.is_empty() => Some((fd, events)),
            _ => None,
        };
        if wanted == self.watched_backend {
            return;
        }
        if let Some((fd, events)) = self.watched_backend.take() {
            if let Err(e) = ops.remove(Events::new_raw(fd, events)) {
                log::error!("virtio-mmio: cannot stop watching a device backend: {e:?}");
            }
        }
        if let Some((fd, events)) = wanted {
            match ops.add(Events::new_raw(fd, events)) {
                Ok(()) => self.watched_backend = wanted,
                Err(e) => log::error!("virtio-mmio: cannot watch a device backend: {e:?}"),
            }
        }
    }
}

/// `current` with the half that register `offset` holds (low at the 8-aligned offset, high at
/// +4) replaced by `value`.
fn with_half(current: u64, offset: u64, value: u32) -> GuestAddress {
    let value = u64::from(value);
    GuestAddress(if offset % 8 == 0 {
        (current & !0xffff_ffff) | value
    } else {
        (current & 0xffff_ffff) | (value << 32)
    })
}

/// Whether a queue's table and rings lie in guest memory (virtio-queue's `is_valid` does the
/// same, but logs each failure unthrottled).
fn rings_fit(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = usize::from(queue.size());
    let fits = |addr: u64, len: usize| mem.check_range(GuestAddress(addr), len);
    fits(queue.desc_table(), 16 * size)
        && fits(queue.avail_ring(), 6 + 2 * size)
        && fits(queue.used_ring(), 6 + 8 * size)
}

fn low_half(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

fn high_half(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            // Bytes past the device's config space read as zero.
            data.fill(0);
            let config = self.device.config_space();
            if let Some(src) = usize::try_from(offset - CONFIG_SPACE)
                .ok()
                .and_then(|start| config.get(start..))
            {
                let n = src.len().min(data.len());
                data[..n].copy_from_slice(&src[..n]);
            }
            return;
        }
        let value = match data.len() {
            4 if offset % 4 == 0 => self.read_register(offset),
            _ => {
                self.errors
                    .record(|| format!("virtio-mmio: {}-byte read at {offset:#x}", data.len()));
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            // The config space is read-only for the devices ember has.
            Ok(bytes) if offset % 4 == 0 && offset < CONFIG_SPACE => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => self
                .errors
                .record(|| format!("virtio-mmio: {}-byte write at {offset:#x}", data.len())),
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.notify {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("virtio-mmio: cannot watch a queue notification: {e:?}");
            }
        }
        if let Some(fd) = self.device.timer() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-mmio: cannot watch a device timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let Some(index) = self
            .notify
            .iter()
            .position(|e| e.as_raw_fd() == events.fd())
        {
            // The count does not matter: each serving takes what is available, up to a budget.
            let _ = self.notify[index].read();
            self.serve_queue(index);
        } else if self.device.timer() == Some(events.fd()) {
            self.serve_timer();
        } else if self
            .watched_backend
            .is_some_and(|(fd, _)| fd == events.fd())
        {
            self.serve_backend(events.event_set());
        }
        self.sync_backend(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Block, DiskFile};
    use crate::devices::virtio::drain::CHAINS_PER_PASS;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    fn write(transport: &mut MmioTransport, offset: u64, value: u32) {
        transport.write(offset, &value.to_le_bytes());
    }

    /// A transport on `device` driven to DRIVER_OK with queue 0 on `vq` (features: VERSION_1).
    fn ready_transport(
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        notify: &EventFd,
    ) -> MmioTransport {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport =
            MmioTransport::new(device, mem.clone(), irq, vec![notify.try_clone().unwrap()])
                .unwrap();
        for (offset, value) in [(0x070, 1), (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 11)] {
            write(&mut transport, offset, value);
        }
        write(&mut transport, 0x038, 256);
        for (offset, addr) in [
            (0x080, vq.desc_table_addr().0),
            (0x090, vq.avail_addr().0),
            (0x0a0, vq.used_addr().0),
        ] {
            write(
                &mut transport,
                offset,
                u32::try_from(addr & 0xffff_ffff).unwrap(),
            );
            write(
                &mut transport,
                offset + 4,
                u32::try_from(addr >> 32).unwrap(),
            );
        }
        write(&mut transport, 0x044, 1);
        write(&mut transport, 0x070, 15);
        transport
    }

    /// A driver reset with 32 reads in flight on the io_uring engine: the reset waits for them
    /// and returns them before the queue is forgotten, so nothing writes guest memory after it.
    #[test]
    fn a_reset_with_requests_in_flight_completes_them_first() {
        use crate::config::IoEngine;
        let image = std::env::temp_dir().join(format!("ember-mmio-{}-reset", std::process::id()));
        std::fs::write(&image, vec![0x5au8; 64 * 512]).unwrap();
        let disk = DiskFile::open(&image, false, false).unwrap();
        let mut block = Block::with_options(disk, "reset", IoEngine::Async, None).unwrap();
        // Keep the requests in flight after the pass that submits them.
        block.reap_after_submit = false;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 256);
        let descs: Vec<RawDescriptor> = (0..32u16)
            .flat_map(|n| {
                let header = 0x30_0000 + u64::from(n) * 16;
                mem.write_obj([0u8; 16], GuestAddress(header)).unwrap(); // read sector 0
                mem.write_obj(0xffu8, GuestAddress(0x38_0000 + u64::from(n)))
                    .unwrap();
                [
                    Descriptor::new(header, 16, 1, 3 * n + 1),
                    Descriptor::new(0x20_0000 + u64::from(n) * 0x1000, 512, 3, 3 * n + 2),
                    Descriptor::new(0x38_0000 + u64::from(n), 1, 2, 0),
                ]
            })
            .map(RawDescriptor::from)
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport = ready_transport(Box::new(block), &mem, &vq, &notify);
        transport.serve_queue(0);
        let used = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap()
        };
        // In flight: submitted, not yet reaped (completions are reaped on the event loop).
        assert_eq!(used(&mem), 0, "nothing returned before the reset");
        write(&mut transport, 0x070, 0);
        assert_eq!(used(&mem), 32, "the reset returned every request in flight");
        for n in 0..32u64 {
            let status: u8 = mem.read_obj(GuestAddress(0x38_0000 + n)).unwrap();
            assert_eq!(status, 0, "request {n} completed");
            let mut data = [0u8; 512];
            mem.read_slice(&mut data, GuestAddress(0x20_0000 + n * 0x1000))
                .unwrap();
            assert!(data.iter().all(|&b| b == 0x5a));
        }
        drop(transport);
        std::fs::remove_file(image).unwrap();
    }

    /// A queue left with work after its turn gets its notification again, so the event loop
    /// comes back to it after serving whatever else is ready.
    #[test]
    fn a_queue_with_work_left_after_its_turn_is_notified_again() {
        let image = std::env::temp_dir().join(format!("ember-mmio-{}-backlog", std::process::id()));
        std::fs::write(&image, vec![0u8; 64 * 512]).unwrap();
        let block = Block::new(DiskFile::open(&image, false, false).unwrap(), "backlog");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 256);
        // 128 requests of an unknown type (header and status each): twice a turn's chains.
        let descs: Vec<RawDescriptor> = (0..128u16)
            .flat_map(|n| {
                let header = 0x30_0000 + u64::from(n) * 16;
                mem.write_obj(0x7fffu32, GuestAddress(header)).unwrap();
                [
                    Descriptor::new(header, 16, 1, 2 * n + 1),
                    Descriptor::new(0x38_0000 + u64::from(n), 1, 2, 0),
                ]
            })
            .map(RawDescriptor::from)
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport = ready_transport(Box::new(block), &mem, &vq, &notify);
        // DRIVER_OK kicks the queue once; take that kick, then serve one turn.
        assert_eq!(notify.read().unwrap(), 1);
        // A QueueNotify write that reaches the transport (on a vCPU thread) only passes the
        // notification on: no queue work there.
        write(&mut transport, QUEUE_NOTIFY_OFFSET, 0);
        let used: u16 = mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used, 0, "no queue work on the vCPU thread");
        assert_eq!(notify.read().ok(), Some(1), "handed to the event loop");
        // The event loop's turn.
        transport.serve_queue(0);
        let used: u16 = mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(u32::from(used), CHAINS_PER_PASS, "one turn's chains");
        assert_eq!(notify.read().ok(), Some(1), "the queue is notified again");
        transport.serve_queue(0);
        let used: u16 = mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used, 128);
        drop(transport);
        std::fs::remove_file(image).unwrap();
    }

    fn read(transport: &mut MmioTransport, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        BusDevice::read(transport, offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    #[test]
    fn a_replaced_disk_shows_its_capacity_with_a_config_change_interrupt() {
        let dir = std::env::temp_dir();
        let (one, two) = (
            dir.join(format!("ember-mmio-{}-one", std::process::id())),
            dir.join(format!("ember-mmio-{}-two", std::process::id())),
        );
        std::fs::write(&one, vec![0u8; 8 * 512]).unwrap();
        std::fs::write(&two, vec![0u8; 32 * 512]).unwrap();
        let block = Block::new(DiskFile::open(&one, false, false).unwrap(), "swap");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport = MmioTransport::new(Box::new(block), mem, evt(), vec![evt()]).unwrap();
        assert_eq!(read(&mut transport, CONFIG_SPACE), 8, "capacity, low half");
        let generation = read(&mut transport, 0x0fc);
        transport
            .replace_disk(DiskFile::open(&two, false, false).unwrap())
            .unwrap();
        assert_eq!(read(&mut transport, CONFIG_SPACE), 32);
        assert_ne!(read(&mut transport, 0x0fc), generation);
        assert_eq!(
            read(&mut transport, 0x060) & 2,
            2,
            "configuration change interrupt"
        );
        // A read-only image may not replace a writable one.
        let ro = DiskFile::open(&one, true, false).unwrap();
        assert!(transport.replace_disk(ro).is_err());
        std::fs::remove_file(one).unwrap();
        std::fs::remove_file(two).unwrap();
    }
}
