//! One vCPU: its boot state, and the KVM_RUN loop that dispatches port and MMIO exits to the
//! buses and turns every other exit into an [`ExitReason`].
//!
//! A vCPU thread is stopped by setting the shared stop flag and sending it [`kick_signal`]: the
//! handler sets `immediate_exit` in this thread's `kvm_run`, so a kick that lands just before
//! KVM_RUN still makes KVM_RUN return at once.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::kvm::KvmContext;
use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::GuestErrors;
use crate::devices::bus::Bus;
use crate::exit::ExitReason;

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

/// The port-I/O and MMIO buses a vCPU dispatches to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
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
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(index: u8, fd: VcpuFd) -> Self {
        Vcpu { index, fd }
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID, MSRs, FPU and LAPIC wiring; and for the boot vCPU, the entry state.
    /// Application processors are left for the guest to start with INIT/SIPI.
    pub fn configure(
        &self,
        kvm: &KvmContext,
        cpus: u8,
        mem: &GuestMemoryMmap,
        boot: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |what| {
            move |source| VcpuError::Kvm {
                what,
                index,
                source,
            }
        };
        let mut cpuid = kvm.supported_cpuid().clone();
        cpuid::normalize(&mut cpuid, self.index, cpus);
        self.fd.set_cpuid2(&cpuid).map_err(err("set the CPUID"))?;
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

    /// Runs the guest until it exits or `stop` is set and the thread kicked.
    pub fn run(&mut self, buses: &Buses, stop: &AtomicBool) -> ExitReason {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run()));
        let reason = self.run_loop(buses, stop);
        KVM_RUN.with(|run| run.set(null_mut()));
        reason
    }

    fn run_loop(&mut self, buses: &Buses, stop: &AtomicBool) -> ExitReason {
        let unhandled = GuestErrors::quiet();
        let vcpu = self.index;
        loop {
            if stop.load(Ordering::Acquire) {
                return ExitReason::Stopped;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
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
                    if !buses.mmio.write(addr, data) {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled MMIO write at {:#x}", addr));
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !buses.mmio.read(addr, data) {
                        unhandled
                            .record(|| format!("vCPU {vcpu}: unhandled MMIO read at {:#x}", addr));
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    return ExitReason::TripleFault {
                        vcpu,
                        rip: self.rip(),
                    };
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => return ExitReason::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => return ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => return ExitReason::GuestCrash { vcpu },
                    other => log::debug!("vCPU {vcpu}: ignored system event {other}"),
                },
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, which makes
                    // `internal` the valid member of the exit union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return ExitReason::InternalError {
                        vcpu,
                        suberror,
                        rip: self.rip(),
                    };
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return ExitReason::FailEntry { vcpu, reason };
                }
                // With the in-kernel local APIC KVM handles HLT itself; these are harmless, and
                // there is no level-triggered route for an I/O APIC EOI to complete.
                Ok(
                    VcpuExit::Hlt
                    | VcpuExit::Intr
                    | VcpuExit::IrqWindowOpen
                    | VcpuExit::IoapicEoi(_),
                ) => {}
                Ok(other) => {
                    return ExitReason::VmmError(format!(
                        "unexpected KVM exit on vCPU {vcpu}: {other:?}"
                    ));
                }
                Err(e) if e.errno() == libc::EINTR => self.fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return ExitReason::VmmError(format!("KVM_RUN failed on vCPU {vcpu}: {e}"));
                }
            }
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|regs| regs.rip)
    }
}
