//! vCPU and VM state round trips through real KVM: save from one VM, restore into a fresh one of
//! the same shape, save again, compare; and hostile state refused without changing the vCPU.

mod common;

use std::path::Path;

use ember::arch::x86_64::{cpuid, msr};
use ember::guest_memory::GuestMemoryMmap;
use ember::vstate::kvm::KvmContext;
use ember::vstate::vcpu_state::{VcpuState, VcpuStateError, msrs_to_save, restore_vcpu, save_vcpu};
use ember::vstate::vm_state::{VmState, VmStateError, restore_vm, save_vm};
use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, Msrs, kvm_enable_cap, kvm_msr_entry, kvm_userspace_memory_region,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
const MSR_KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// LAPIC task priority and spurious-vector registers.
const APIC_TPR: usize = 0x80;
const APIC_SPIV: usize = 0xf0;

/// A VM shaped like ember's (memory, split irqchip) with one vCPU configured as ember does.
/// Without `memory`, no guest memory is registered.
struct TestVm {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

fn test_vm(kvm: &KvmContext) -> TestVm {
    test_vm_with(kvm, true)
}

fn test_vm_with(kvm: &KvmContext, memory: bool) -> TestVm {
    let vm = kvm.kvm().create_vm().unwrap();
    let mem = ember::vstate::memory::create_guest_memory(16).unwrap();
    for (slot, region) in mem.iter().enumerate().filter(|_| memory) {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap(),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping lives in `mem`, kept as long as the VM.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = 24;
    vm.enable_cap(&cap).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut cpuid = kvm.supported_cpuid().unwrap().clone();
    cpuid::normalize(&mut cpuid, 0, 1);
    vcpu.set_cpuid2(&cpuid).unwrap();
    vcpu.set_msrs(&msr::boot_msrs().unwrap()).unwrap();
    TestVm { vm, vcpu, mem }
}

fn kvm() -> Option<KvmContext> {
    common::kvm_available().then(|| KvmContext::open(Path::new("/dev/kvm")).unwrap())
}

fn set_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) {
    let entries: Vec<_> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let written = vcpu
        .set_msrs(&Msrs::from_entries(&entries).unwrap())
        .unwrap();
    assert_eq!(
        written,
        entries.len(),
        "KVM refused {:#x?}",
        values.get(written)
    );
}

/// Distinctive values in every part of the state, the paravirtual MSRs as Linux sets them.
fn make_distinctive(vcpu: &VcpuFd) {
    let mut regs = vcpu.get_regs().unwrap();
    regs.rax = 0x1111_2222_3333_4444;
    regs.r15 = 0x5555_6666_7777_8888;
    regs.rip = 0x10_0000;
    regs.rflags = 0x2 | 0x200;
    vcpu.set_regs(&regs).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cr2 = 0xdead_b000;
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = 0x1f;
    vcpu.set_sregs(&sregs).unwrap();
    let mut debug = vcpu.get_debug_regs().unwrap();
    debug.db[0] = 0x1234_5000;
    vcpu.set_debug_regs(&debug).unwrap();
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[APIC_TPR] = 0x20;
    lapic.regs[APIC_SPIV] = 0xff_u8 as i8;
    vcpu.set_lapic(&lapic).unwrap();
    set_msrs(
        vcpu,
        &[
            (MSR_STAR, 0x0023_0010_0000_0000),
            (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
            (MSR_KVM_SYSTEM_TIME_NEW, 0x10_0000 | 1),
            (MSR_KVM_ASYNC_PF_INT, 0xec),
            (MSR_KVM_ASYNC_PF_EN, 0x10_2000 | 0b1011),
            (MSR_KVM_STEAL_TIME, 0x10_3000 | 1),
            (MSR_KVM_PV_EOI_EN, 0x10_4000 | 1),
            (MSR_KVM_POLL_CONTROL, 0),
        ],
    );
}

/// The state with the TSC (which runs between two saves) taken out, and the TSC.
fn without_tsc(mut state: VcpuState) -> (VcpuState, u64) {
    let at = state
        .msrs
        .iter()
        .position(|&(i, _)| i == MSR_IA32_TSC)
        .expect("the TSC is saved");
    let (_, tsc) = state.msrs.remove(at);
    (state, tsc)
}

#[test]
fn vcpu_state_round_trips_into_a_fresh_vm() {
    let Some(kvm) = kvm() else { return };
    let msrs = msrs_to_save(kvm.kvm()).unwrap();
    let a = test_vm(&kvm);
    make_distinctive(&a.vcpu);
    let saved = save_vcpu(&a.vcpu, &msrs).unwrap();
    assert_eq!(saved.regs.rax, 0x1111_2222_3333_4444);
    assert!(saved.msrs.contains(&(MSR_KVM_STEAL_TIME, 0x10_3001)));

    let b = test_vm(&kvm);
    restore_vcpu(&b.vcpu, &saved, &msrs).unwrap();
    let again = save_vcpu(&b.vcpu, &msrs).unwrap();
    let (saved, saved_tsc) = without_tsc(saved);
    let (again, again_tsc) = without_tsc(again);
    assert_eq!(again, saved);
    assert!(again_tsc >= saved_tsc, "the TSC went back");
}

#[test]
fn hostile_vcpu_state_is_refused_and_the_vcpu_left_as_it_was() {
    let Some(kvm) = kvm() else { return };
    let msrs = msrs_to_save(kvm.kvm()).unwrap();
    let a = test_vm(&kvm);
    make_distinctive(&a.vcpu);
    let good = save_vcpu(&a.vcpu, &msrs).unwrap();
    let b = test_vm(&kvm);
    let before = without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap()).0;

    let mut cases: Vec<(&str, VcpuState)> = Vec::new();
    let mut s = good.clone();
    s.xsave.pop();
    cases.push(("XSAVE area of 1023 words", s));
    let mut s = good.clone();
    s.lapic.truncate(16);
    cases.push(("LAPIC page of 16 bytes", s));
    let mut s = good.clone();
    s.lapic[0x23] = 3;
    cases.push(("APIC ID 3's", s));
    let mut s = good.clone();
    s.msrs.push((0xdead_beef, 0));
    cases.push(("MSR 0xdeadbeef", s));
    let mut s = good.clone();
    s.msrs.push(s.msrs[0]);
    cases.push(("appears twice", s));
    let mut s = good.clone();
    s.mp_state = 99;
    cases.push(("unknown MP state 99", s));
    for (expected, state) in cases {
        match restore_vcpu(&b.vcpu, &state, &msrs) {
            Err(VcpuStateError::Invalid(why)) => assert!(why.contains(expected), "{why}"),
            other => panic!("{expected}: {other:?}"),
        }
    }
    // KVM itself refuses paging without protected mode: the registers already set are undone.
    let mut s = good.clone();
    s.sregs.cr0 = 0x8000_0000;
    assert!(matches!(
        restore_vcpu(&b.vcpu, &s, &msrs),
        Err(VcpuStateError::Kvm(..))
    ));
    // An XSAVE header with a reserved feature bit (xstate_bv bit 63), after the registers.
    let mut s = good.clone();
    s.xsave[129] |= 1 << 31;
    assert!(
        matches!(
            restore_vcpu(&b.vcpu, &s, &msrs),
            Err(VcpuStateError::Kvm(..))
        ),
        "a reserved XSAVE feature bit"
    );
    assert_eq!(without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap()).0, before);
    // An MSR value KVM refuses (a reserved bit of the steal-time MSR), after the others are set.
    let mut s = good.clone();
    let steal = s
        .msrs
        .iter_mut()
        .find(|(i, _)| *i == MSR_KVM_STEAL_TIME)
        .unwrap();
    steal.1 |= 0x30;
    let err = restore_vcpu(&b.vcpu, &s, &msrs).unwrap_err();
    assert!(
        matches!(
            err,
            VcpuStateError::Msr {
                index: MSR_KVM_STEAL_TIME,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap()).0, before);
}

#[test]
fn the_kvm_clock_continues_from_the_saved_time() {
    let Some(kvm) = kvm() else { return };
    let a = test_vm(&kvm);
    let ten_seconds = kvm_bindings::kvm_clock_data {
        clock: 10_000_000_000,
        ..Default::default()
    };
    a.vm.set_clock(&ten_seconds).unwrap();
    let saved = save_vm(&a.vm).unwrap();
    assert!(saved.clock.clock >= 10_000_000_000);
    let json = serde_json::to_string(&saved).unwrap();
    assert_eq!(serde_json::from_str::<VmState>(&json).unwrap(), saved);

    let b = test_vm(&kvm);
    let host_before = std::time::Instant::now();
    restore_vm(&b.vm, &saved).unwrap();
    let restored = save_vm(&b.vm).unwrap().clock.clock;
    let host_elapsed = u64::try_from(host_before.elapsed().as_nanos()).unwrap();
    assert!(restored >= saved.clock.clock, "the clock went back");
    // No jump: it moved no more than the host's clock did (plus 1 ms of conversion slack).
    assert!(
        restored - saved.clock.clock <= host_elapsed + 1_000_000,
        "the clock jumped by {} ns",
        restored - saved.clock.clock
    );

    let mut hostile = saved.clone();
    hostile.clock.flags |= 0x100;
    assert!(matches!(
        restore_vm(&b.vm, &hostile),
        Err(VmStateError::Invalid(_))
    ));
    hostile.clock.flags = 0;
    hostile.clock.clock = u64::MAX;
    assert!(matches!(
        restore_vm(&b.vm, &hostile),
        Err(VmStateError::Invalid(_))
    ));
}

#[test]
fn vcpu_state_survives_serialization() {
    let Some(kvm) = kvm() else { return };
    let msrs = msrs_to_save(kvm.kvm()).unwrap();
    let a = test_vm(&kvm);
    make_distinctive(&a.vcpu);
    let saved = save_vcpu(&a.vcpu, &msrs).unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let back: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    // A registers blob one byte short is refused, not zero-filled.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["regs"].as_array_mut().unwrap().pop();
    let err = serde_json::from_value::<VcpuState>(value).unwrap_err();
    assert!(
        err.to_string()
            .contains("143 bytes for a 144-byte kvm_regs"),
        "{err}"
    );
}

/// Where the guest code goes, and the port its last instruction writes.
const CODE: u64 = 0x10_0000;

/// Runs 32-bit code that writes each MSR as a Linux guest does (`wrmsr`), then `out 0x80`.
fn run_guest_writing(t: &mut TestVm, msrs: &[(u32, u64)]) {
    use ember::arch::x86_64::regs::{self, EntryMode};
    use vm_memory::{Bytes, GuestAddress};
    let mut code = Vec::new();
    for &(index, value) in msrs {
        code.push(0xb9); // mov ecx, imm32
        code.extend_from_slice(&index.to_le_bytes());
        code.push(0xb8); // mov eax, imm32
        code.extend_from_slice(&u32::try_from(value & 0xffff_ffff).unwrap().to_le_bytes());
        code.push(0xba); // mov edx, imm32
        code.extend_from_slice(&u32::try_from(value >> 32).unwrap().to_le_bytes());
        code.extend_from_slice(&[0x0f, 0x30]); // wrmsr
    }
    code.extend_from_slice(&[0xe6, 0x80, 0xeb, 0xfe]); // out 0x80, al; jmp $
    t.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut sregs = t.vcpu.get_sregs().unwrap();
    regs::setup_sregs(&t.mem, EntryMode::Pvh, &mut sregs).unwrap();
    t.vcpu.set_sregs(&sregs).unwrap();
    t.vcpu
        .set_regs(&regs::boot_regs(EntryMode::Pvh, GuestAddress(CODE)))
        .unwrap();
    match t.vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::IoOut(0x80, _) => {}
        other => panic!("the guest stopped with {other:?}"),
    }
}

#[test]
fn a_vcpu_whose_guest_set_the_paravirtual_msrs_round_trips() {
    let Some(kvm) = kvm() else { return };
    let msrs = msrs_to_save(kvm.kvm()).unwrap();
    let mut a = test_vm(&kvm);
    // Linux's order: kvm-clock, the async-PF vector before async PF, steal time, PV EOI.
    let written = [
        (MSR_KVM_SYSTEM_TIME_NEW, 0x20_0000 | 1),
        (MSR_KVM_ASYNC_PF_INT, 0xec),
        (MSR_KVM_ASYNC_PF_EN, 0x20_1000 | 0b1011),
        (MSR_KVM_STEAL_TIME, 0x20_2000 | 1),
        (MSR_KVM_PV_EOI_EN, 0x20_3000 | 1),
        (MSR_KVM_POLL_CONTROL, 0),
        (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
    ];
    run_guest_writing(&mut a, &written);
    let saved = save_vcpu(&a.vcpu, &msrs).unwrap();
    for (index, value) in written {
        assert!(saved.msrs.contains(&(index, value)), "MSR {index:#x}");
    }
    let b = test_vm(&kvm);
    restore_vcpu(&b.vcpu, &saved, &msrs).unwrap();
    let (again, _) = without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap());
    assert_eq!(again, without_tsc(saved).0);
}

#[test]
fn restoring_before_guest_memory_is_registered_names_the_msr_and_the_order() {
    let Some(kvm) = kvm() else { return };
    let msrs = msrs_to_save(kvm.kvm()).unwrap();
    let a = test_vm(&kvm);
    make_distinctive(&a.vcpu);
    let saved = save_vcpu(&a.vcpu, &msrs).unwrap();
    let b = test_vm_with(&kvm, false);
    let before = without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap()).0;
    let err = restore_vcpu(&b.vcpu, &saved, &msrs).unwrap_err();
    assert!(
        matches!(err, VcpuStateError::MsrBeforeMemory(MSR_KVM_ASYNC_PF_EN)),
        "{err:?}"
    );
    assert!(err.to_string().contains("register guest memory"), "{err}");
    assert_eq!(without_tsc(save_vcpu(&b.vcpu, &msrs).unwrap()).0, before);
}
