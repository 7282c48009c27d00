//! One vCPU's state as plain data ([`VcpuState`]): saved from a stopped vCPU, applied to a fresh
//! one of a VM built with the same shape (same CPUID, same vCPU index).
//!
//! Restore order matters: the special registers first (they carry the APIC base, so x2APIC mode,
//! and EFER), then the LAPIC, then the MSRs (a TSC-deadline write is ignored unless the LAPIC
//! timer is already in TSC-deadline mode, so the deadline would be lost), with the TSC itself
//! before the deadline. The vCPU events go last: they must see the final register state. Guest
//! memory must be registered before any of it: two paravirtual MSRs point into it
//! ([`MSRS_INTO_GUEST_MEMORY`]). The TSC frequency is set first, when it differs from this host's.
//!
//! The state is untrusted: its shape is checked before any ioctl (lengths, MSR indices, the
//! APIC ID, the MP state), and if KVM refuses a value midway the vCPU is put back as it was.
//!
//! XSAVE: ember never asks for dynamically enabled XSAVE features (AMX; `ARCH_REQ_XCOMP_GUEST_PERM`),
//! so a guest's XSAVE area fits the legacy 4 KiB `kvm_xsave`, and KVM_GET/SET_XSAVE suffice.

use kvm_bindings::{
    KVM_MAX_MSR_ENTRIES, KVM_MP_STATE_SUSPENDED, Msrs, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// 32-bit words in the legacy XSAVE area (`kvm_xsave.region`).
pub const XSAVE_WORDS: usize = 1024;
/// Bytes of the LAPIC register page (`kvm_lapic_state.regs`).
pub const LAPIC_BYTES: usize = 1024;
/// Offset of the LAPIC ID register; KVM presents the ID in bits 24-31 (without
/// KVM_CAP_X2APIC_API, which ember does not enable, also in x2APIC mode).
const APIC_ID_OFFSET: usize = 0x20;

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs that KVM_GET_MSR_INDEX_LIST reports but that are not saved, each with the reason it was
/// proven it cannot be restored. On the development hosts (PVM, Linux 6.18) every listed MSR was
/// read and written back with KVM_SET_MSRS, the paravirtual ones included, both with the values a
/// guest wrote itself (`tests/state.rs`) and with those a Linux 6.1 guest had set when it stopped,
/// so the list is empty. Two paravirtual MSRs are refused only out of order, when guest memory is
/// not registered yet (they point into it; see [`MSRS_INTO_GUEST_MEMORY`]): that is not a reason
/// to skip them. A host that refuses another makes restore fail with an error naming it, and that
/// MSR goes here with the evidence.
pub const UNRESTORABLE_MSRS: &[(u32, &str)] = &[];

/// Paravirtual MSRs whose value is a guest-physical address KVM maps at once: KVM_SET_MSRS
/// refuses them (enabled) until that memory is registered, so guest memory must be registered
/// before a vCPU is restored. MSR_KVM_ASYNC_PF_EN and MSR_KVM_PV_EOI_EN (proven on the
/// development hosts).
pub const MSRS_INTO_GUEST_MEMORY: [u32; 2] = [0x4b56_4d02, 0x4b56_4d04];

/// A vCPU save or restore that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM read or wrote fewer MSRs than asked: the first one it refused.
    #[error("KVM refused MSR {index:#x} ({what})")]
    Msr {
        /// The MSR.
        index: u32,
        /// Reading or writing.
        what: &'static str,
    },
    /// A paravirtual MSR pointing into guest memory that is not registered yet.
    #[error(
        "KVM refused MSR {0:#x}, which points into guest memory: register guest memory before restoring vCPUs"
    )]
    MsrBeforeMemory(u32),
    /// The state is malformed or does not fit this vCPU.
    #[error("vCPU state refused: {0}")]
    Invalid(String),
}

/// Everything KVM holds for one vCPU, as plain data. The KVM structs are serialized as their
/// bytes (kvm-bindings' `serde` feature), and only exactly that many are read back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    #[serde(with = "super::kvm_bytes")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    #[serde(with = "super::kvm_bytes")]
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the XSAVE area, [`XSAVE_WORDS`] words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    #[serde(with = "super::kvm_bytes")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "super::kvm_bytes")]
    pub debug_regs: kvm_debugregs,
    /// (index, value) of every MSR in [`msrs_to_save`], in that order.
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's register page, [`LAPIC_BYTES`] bytes.
    pub lapic: Vec<u8>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: u32,
    /// Pending exceptions, interrupts, NMIs, SIPI vector, SMM.
    #[serde(with = "super::kvm_bytes")]
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// The MSRs a vCPU's state holds: KVM_GET_MSR_INDEX_LIST less [`UNRESTORABLE_MSRS`], with the
/// TSC-deadline MSR moved last (after the TSC it is relative to).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VcpuStateError::Kvm("read KVM's MSR list", e))?;
    let mut msrs: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| UNRESTORABLE_MSRS.iter().all(|(deny, _)| deny != i))
        .collect();
    if let Some(at) = msrs.iter().position(|&i| i == MSR_IA32_TSC_DEADLINE) {
        let deadline = msrs.remove(at);
        msrs.push(deadline);
    }
    Ok(msrs)
}

/// Reads the state of a vCPU that is not running, with the MSRs `msrs` (see [`msrs_to_save`]).
pub fn save_vcpu(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let kvm = |what| move |e| VcpuStateError::Kvm(what, e);
    let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area"))?;
    let lapic = fd.get_lapic().map_err(kvm("read the LAPIC"))?;
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm("read the registers"))?,
        sregs: fd.get_sregs().map_err(kvm("read the special registers"))?,
        xsave: xsave.region.to_vec(),
        xcrs: fd.get_xcrs().map_err(kvm("read the XCRs"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(kvm("read the debug registers"))?,
        msrs: read_msrs(fd, msrs)?,
        lapic: lapic.regs.iter().map(|b| b.to_ne_bytes()[0]).collect(),
        mp_state: fd
            .get_mp_state()
            .map_err(kvm("read the MP state"))?
            .mp_state,
        events: fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().map_err(kvm("read the TSC frequency"))?,
    })
}

/// Applies `state` to a fresh vCPU of the same index in a VM of the same shape. `allowed` is the
/// MSR list this host saves ([`msrs_to_save`]); the state may hold no other. Everything is
/// checked first; if KVM then refuses a value, the vCPU gets its previous state back.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState, allowed: &[u32]) -> Result<(), VcpuStateError> {
    let target_lapic = fd
        .get_lapic()
        .map_err(|e| VcpuStateError::Kvm("read the LAPIC", e))?;
    check(state, allowed, &target_lapic)?;
    let saved_indices: Vec<u32> = state.msrs.iter().map(|&(i, _)| i).collect();
    let before = save_vcpu(fd, &saved_indices)?;
    if let Err(e) = apply(fd, state) {
        if let Err(undo) = apply(fd, &before) {
            log::error!("cannot put a vCPU back after a failed restore: {undo}");
        }
        return Err(e);
    }
    Ok(())
}

fn check(
    state: &VcpuState,
    allowed: &[u32],
    target_lapic: &kvm_lapic_state,
) -> Result<(), VcpuStateError> {
    let invalid = |why: String| Err(VcpuStateError::Invalid(why));
    if state.xsave.len() != XSAVE_WORDS {
        return invalid(format!("XSAVE area of {} words", state.xsave.len()));
    }
    if state.lapic.len() != LAPIC_BYTES {
        return invalid(format!("LAPIC page of {} bytes", state.lapic.len()));
    }
    let id = |regs: &[u8]| regs.get(APIC_ID_OFFSET + 3).copied().unwrap_or_default();
    let target: Vec<u8> = target_lapic
        .regs
        .iter()
        .map(|b| b.to_ne_bytes()[0])
        .collect();
    if id(&state.lapic) != id(&target) {
        return invalid(format!(
            "it is APIC ID {}'s, this vCPU is APIC ID {}",
            id(&state.lapic),
            id(&target)
        ));
    }
    if state.mp_state > KVM_MP_STATE_SUSPENDED {
        return invalid(format!("unknown MP state {}", state.mp_state));
    }
    if state.tsc_khz == 0 {
        return invalid("a TSC frequency of 0".into());
    }
    let mut seen = std::collections::HashSet::new();
    for &(index, _) in &state.msrs {
        if !allowed.contains(&index) {
            return invalid(format!("MSR {index:#x} is not one this host restores"));
        }
        if !seen.insert(index) {
            return invalid(format!("MSR {index:#x} appears twice"));
        }
    }
    Ok(())
}

/// The restore itself, in the order the module comment explains.
fn apply(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let kvm = |what| move |e| VcpuStateError::Kvm(what, e);
    let current_khz = fd.get_tsc_khz().map_err(kvm("read the TSC frequency"))?;
    if current_khz != state.tsc_khz {
        fd.set_tsc_khz(state.tsc_khz)
            .map_err(kvm("set the TSC frequency"))?;
    }
    fd.set_sregs(&state.sregs)
        .map_err(kvm("set the special registers"))?;
    fd.set_regs(&state.regs).map_err(kvm("set the registers"))?;
    let mut xsave = kvm_xsave::default();
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: ember enables no dynamic XSAVE features (module comment), so KVM reads no more
    // than the legacy 4 KiB `kvm_xsave` this is.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("set the XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("set the XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("set the debug registers"))?;
    let mut lapic = kvm_lapic_state::default();
    for (dst, &src) in lapic.regs.iter_mut().zip(&state.lapic) {
        *dst = i8::from_ne_bytes([src]);
    }
    fd.set_lapic(&lapic).map_err(kvm("set the LAPIC"))?;
    write_msrs(fd, &state.msrs)?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(kvm("set the MP state"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("set the vCPU events"))?;
    Ok(())
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut values = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_buffer(&entries)?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Kvm("read the MSRs", e))?;
        if let Some(&index) = chunk.get(read) {
            return Err(VcpuStateError::Msr {
                index,
                what: "reading",
            });
        }
        values.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(values)
}

fn write_msrs(fd: &VcpuFd, values: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for chunk in values.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let written = fd
            .set_msrs(&msr_buffer(&entries)?)
            .map_err(|e| VcpuStateError::Kvm("set the MSRs", e))?;
        if let Some(&(index, value)) = chunk.get(written) {
            if MSRS_INTO_GUEST_MEMORY.contains(&index) && value & 1 != 0 {
                return Err(VcpuStateError::MsrBeforeMemory(index));
            }
            return Err(VcpuStateError::Msr {
                index,
                what: "writing",
            });
        }
    }
    Ok(())
}

fn msr_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    // Chunks are at most KVM_MAX_MSR_ENTRIES long, so this cannot fail.
    Msrs::from_entries(entries).map_err(|_| VcpuStateError::Invalid("too many MSRs".into()))
}
