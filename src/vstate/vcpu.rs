//! One vCPU: its boot state, and the KVM_RUN loop that dispatches port and MMIO exits to the
//! buses and turns every other exit into an [`ExitReason`].
//!
//! Before every KVM_RUN the loop asks its caller whether to go on (the VMM's pause and exit
//! requests, `vmm/vcpus.rs`). A request comes with [`kick_signal`]: the handler sets
//! `immediate_exit` in this thread's `kvm_run`, so a kick that lands just before KVM_RUN still
//! makes KVM_RUN return at once.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest_memory::GuestMemoryMmap;
use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::GuestErrors;
use crate::devices::bus::Buses;
use crate::exit::ExitReason;
use kvm_bindings::CpuId;

/// Setting up a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl.
    #[error("cannot {what} of vCPU {index}")]
    Kvm {
        /// What was being set.
        what: &'static str,
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot tables.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MSR list.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// The kick signal handler.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// First instruction.
    pub entry: GuestAddress,
    /// Protocol (and so CPU mode) at entry.
    pub mode: EntryMode,
}

/// Exits of one vCPU by kind, readable while the VM runs.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// KVM_RUN returns for a signal (kicks) or with nothing for the VMM to do.
    pub interrupted: AtomicU64,
    /// Other exits (HLT, IRQ window, EOI, system events, errors).
    pub other: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

thread_local! {
    // This thread's kvm_run, for the kick handler. Const-initialised with no destructor, so
    // reading it from a signal handler allocates nothing.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by `Vcpu::run` before
        // its first KVM_RUN and cleared before the mapping goes away; the handler runs on the
        // same thread, and a one-byte store cannot tear.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The width of each access in the current port-I/O exit. A string instruction (`rep outsb`)
/// exits once with `count` accesses of `size` bytes, all to the same port, which the device
/// must see one by one.
fn pio_access_size(data_len: usize) -> usize {
    let run = KVM_RUN.with(Cell::get);
    if run.is_null() {
        return data_len.max(1);
    }
    // SAFETY: `run` is this thread's kvm_run mapping, set before its first KVM_RUN and live until
    // the loop ends; this is called right after a KVM_EXIT_IO exit, which makes `io` the valid
    // member of the exit union.
    let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size });
    if size == 0 || data_len % size != 0 {
        data_len.max(1)
    } else {
        size
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the kick handler, once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result.map_err(VcpuError::KickHandler)
}

/// A vCPU and its index (equal to its APIC ID).
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    counters: std::sync::Arc<VcpuCounters>,
    /// Accesses that hit no device, logged with a rate limit.
    unhandled: GuestErrors,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(index: u8, fd: VcpuFd) -> Self {
        Vcpu {
            index,
            fd,
            counters: Default::default(),
            unhandled: GuestErrors::quiet(),
        }
    }

    /// Its exit counters.
    pub fn counters(&self) -> std::sync::Arc<VcpuCounters> {
        self.counters.clone()
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn error(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            what,
            index,
            source,
        }
    }

    /// Sets the CPUID this vCPU shows the guest: part of the VM's shape, for a boot and a restore
    /// alike.
    pub fn set_cpuid(&self, supported: &CpuId, cpus: u8) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, self.index, cpus);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.error("set the CPUID"))
    }

    /// Boot state: MSRs, FPU and LAPIC wiring; and for the boot vCPU, the entry registers.
    /// Application processors are left for the guest to start with INIT/SIPI.
    pub fn configure_boot(
        &self,
        mem: &GuestMemoryMmap,
        boot: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let err = |what| self.error(what);
        let msrs = msr::boot_msrs()?;
        self.fd.set_msrs(&msrs).map_err(err("set the MSRs"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(err("set the FPU state"))?;
        let mut lapic = self.fd.get_lapic().map_err(err("read the LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(err("set the LAPIC"))?;

        if let Some(boot) = boot {
            let mut sregs = self
                .fd
                .get_sregs()
                .map_err(err("read the special registers"))?;
            regs::setup_sregs(mem, boot.mode, &mut sregs)?;
            self.fd
                .set_sregs(&sregs)
                .map_err(err("set the special registers"))?;
            self.fd
                .set_regs(&regs::boot_regs(boot.mode, boot.entry))
                .map_err(err("set the registers"))?;
        }
        Ok(())
    }

    /// Runs the guest until it exits, or until `proceed`, asked before every KVM_RUN, says
    /// false (then [`ExitReason::Stopped`]). `proceed` may park the thread (a pause).
    pub fn run(&mut self, buses: &Buses, mut proceed: impl FnMut(&mut Vcpu) -> bool) -> ExitReason {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run()));
        let reason = loop {
            if !proceed(self) {
                break ExitReason::Stopped;
            }
            if let Some(reason) = self.run_once(buses) {
                break reason;
            }
        };
        KVM_RUN.with(|run| run.set(null_mut()));
        reason
    }

    /// Before the thread parks: completes a port or MMIO access KVM is waiting on (KVM_RUN with
    /// `immediate_exit` finishes it without running guest code), so the vCPU's state is
    /// consistent while parked, and tells the guest's kvm-clock that it was stopped (no soft
    /// lockup reports after a long pause).
    pub fn settle(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(exit) => log::debug!("vCPU {}: exit while settling: {exit:?}", self.index),
            Err(e) => log::debug!("vCPU {}: settling: {e}", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
        // EINVAL when the guest has not enabled kvm-clock: nothing to tell it then.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            log::trace!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
    }

    /// One KVM_RUN and the exit it returns; `Some` when the vCPU is done.
    fn run_once(&mut self, buses: &Buses) -> Option<ExitReason> {
        let vcpu = self.index;
        let counters = &*self.counters;
        let unhandled = &self.unhandled;
        {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    count(&counters.io_out);
                    let size = pio_access_size(data.len());
                    let port = u64::from(port);
                    if !data
                        .chunks(size)
                        .all(|access| buses.pio.write(port, access))
                    {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled write to port {port:#x}"));
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    count(&counters.io_in);
                    let size = pio_access_size(data.len());
                    let port = u64::from(port);
                    if !data
                        .chunks_mut(size)
                        .all(|access| buses.pio.read(port, access))
                    {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled read from port {port:#x}"));
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    count(&counters.mmio_write);
                    if !buses.mmio.write(addr, data) {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled MMIO write at {:#x}", addr));
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    count(&counters.mmio_read);
                    if !buses.mmio.read(addr, data) {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled MMIO read at {:#x}", addr));
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    return Some(ExitReason::TripleFault {
                        vcpu,
                        rip: self.rip(),
                    });
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => return Some(ExitReason::Reset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Some(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_CRASH => return Some(ExitReason::GuestCrash { vcpu }),
                    other => log::debug!("vCPU {vcpu}: ignored system event {other}"),
                },
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, which makes
                    // `internal` the valid member of the exit union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Some(ExitReason::InternalError {
                        vcpu,
                        suberror,
                        rip: self.rip(),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Some(ExitReason::FailEntry { vcpu, reason });
                }
                // With the in-kernel local APIC KVM handles HLT itself; these are harmless, and
                // there is no level-triggered route for an I/O APIC EOI to complete.
                Ok(
                    VcpuExit::Hlt
                    | VcpuExit::Intr
                    | VcpuExit::IrqWindowOpen
                    | VcpuExit::IoapicEoi(_),
                ) => count(&counters.other),
                Ok(other) => {
                    return Some(ExitReason::VmmError(format!(
                        "unexpected KVM exit on vCPU {vcpu}: {other:?}"
                    )));
                }
                Err(e) if e.errno() == libc::EINTR => {
                    count(&counters.interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) if e.errno() == libc::EAGAIN => count(&counters.interrupted),
                Err(e) => {
                    return Some(ExitReason::VmmError(format!(
                        "KVM_RUN failed on vCPU {vcpu}: {e}"
                    )));
                }
            }
        }
        None
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|regs| regs.rip)
    }
}
