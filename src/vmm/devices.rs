//! The device manager: every device of a VM under a stable id, as typed handles.
//!
//! The buses hold devices as `dyn BusDevice` for the vCPU threads' dispatch; the manager keeps
//! the same devices by their concrete types, so the VMM can read their counters (metrics), ask
//! them to act (Ctrl-Alt-Del, a disk swap) and, later, save and restore their state. The ids are
//! what the API, snapshots and migration name devices by: `serial0`, `i8042`, `ioapic`,
//! `debug_port`, `boot_timer`, each disk's id (`rootfs` for `--rootfs`) and each network
//! interface's id, `vsock` and `entropy`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::devices::legacy::serial::SerialCounters;
use crate::devices::legacy::{I8042, IoApic, SerialDevice};
use crate::devices::pseudo::debug_port::{DebugCodes, DebugPort};
use crate::devices::pseudo::{BootTimer, VmGenId};
use crate::devices::virtio::block::BlockCounters;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::NetCounters;
use crate::devices::virtio::rng::RngCounters;
use crate::devices::virtio::vsock::VsockCounters;

/// Id of COM1.
pub const SERIAL_ID: &str = "serial0";
/// Id of the i8042.
pub const I8042_ID: &str = "i8042";
/// Id of the I/O APIC.
pub const IOAPIC_ID: &str = "ioapic";
/// Id of the port-0x80 debug port.
pub const DEBUG_PORT_ID: &str = "debug_port";
/// Id of the vsock device.
pub const VSOCK_ID: &str = "vsock";
/// Id of the entropy device (virtio-rng).
pub const ENTROPY_ID: &str = "entropy";
/// Id of the boot timer.
pub const BOOT_TIMER_ID: &str = "boot_timer";

/// What a virtio device is, with the counters it keeps.
#[derive(Clone)]
pub enum VirtioKind {
    /// virtio-blk.
    Block(Arc<BlockCounters>),
    /// virtio-net on a TAP.
    Net {
        /// The host TAP's name.
        tap: String,
        /// Its counters.
        counters: Arc<NetCounters>,
    },
    /// virtio-vsock on a host Unix socket.
    Vsock {
        /// The socket host programs connect to.
        uds_path: std::path::PathBuf,
        /// Its counters.
        counters: Arc<VsockCounters>,
    },
    /// virtio-rng.
    Rng(Arc<RngCounters>),
}

/// One virtio-mmio slot.
pub struct VirtioEntry {
    /// Stable id.
    pub id: String,
    /// Slot index (MMIO window and interrupt line, `vmm/virtio.rs`).
    pub slot: usize,
    /// The device and its kind.
    pub kind: VirtioKind,
    /// The transport, shared with the MMIO bus and the event loop.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// For a disk: how its image is opened (a replacement is opened the same way).
    pub disk: Option<crate::config::DiskConfig>,
}

impl VirtioEntry {
    /// Locks the transport (a poisoned lock still holds consistent register state).
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every device of one VM.
pub struct DeviceManager {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// COM1's counters (readable without the device lock).
    pub serial_counters: Arc<SerialCounters>,
    /// The i8042 (reset line, Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// The I/O APIC of the split irqchip.
    pub ioapic: Arc<Mutex<IoApic>>,
    /// The port-0x80 debug port.
    pub debug_port: Arc<Mutex<DebugPort>>,
    /// The codes it recorded.
    pub debug_codes: DebugCodes,
    /// The boot timer, when configured.
    pub boot_timer: Option<Arc<Mutex<BootTimer>>>,
    /// The VM generation ID (in guest memory; renewed by a restore).
    pub vmgenid: Mutex<VmGenId>,
    /// virtio devices, in slot order (disks first, then network interfaces, then vsock, then entropy).
    pub virtio: Vec<VirtioEntry>,
}

impl DeviceManager {
    /// Every device id, platform devices first, then virtio in slot order.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = [SERIAL_ID, I8042_ID, IOAPIC_ID, DEBUG_PORT_ID]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if self.boot_timer.is_some() {
            ids.push(BOOT_TIMER_ID.to_owned());
        }
        ids.extend(self.virtio.iter().map(|v| v.id.clone()));
        ids
    }

    /// The virtio device with `id`.
    pub fn virtio(&self, id: &str) -> Option<&VirtioEntry> {
        self.virtio.iter().find(|v| v.id == id)
    }

    /// The I/O APIC's refused register accesses.
    pub fn ioapic_errors(&self) -> u64 {
        self.ioapic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .errors()
    }
}

/// Locks a shared device, whatever a panicking holder left (device state stays consistent
/// between register accesses).
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}
