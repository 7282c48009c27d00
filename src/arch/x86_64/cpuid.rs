//! CPUID for one vCPU: KVM's supported set, made true for this vCPU and this VM's topology.
//!
//! KVM reports what the host can offer; a guest also needs its own APIC ID, a consistent
//! topology (one socket, one thread per core, `cpus` cores) and the hypervisor bit.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1: processor info and feature bits.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: deterministic cache parameters (carries a cores-per-package field).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 0xB and 0x1F: extended topology enumeration.
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
/// Leaf 0x8000_0008: AMD's core count lives in ECX.
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;
/// Topology level types in leaf 0xB ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Rewrites `cpuid` (a copy of KVM's supported list) for vCPU `apic_id` out of `cpus`.
pub fn normalize(cpuid: &mut CpuId, apic_id: u8, cpus: u8) {
    let core_shift = apic_id_shift(cpus);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => set_features_leaf(entry, apic_id, cpus),
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: addressable core IDs in the package, minus one. Keep the cache
                // description itself as the host reports it.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((u32::from(cpus) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                set_topology_leaf(entry, apic_id, cpus, core_shift)
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0]: cores minus one; ECX[15:12]: APIC ID size.
                entry.ecx = (entry.ecx & !0xf0ff) | (u32::from(cpus) - 1) | (core_shift << 12);
            }
            _ => {}
        }
    }
}

fn set_features_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u8, cpus: u8) {
    // EBX[31:24]: initial APIC ID; EBX[23:16]: logical processors per package.
    entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(cpus) << 16);
    entry.ecx |= ECX_HYPERVISOR_BIT;
    if cpus > 1 {
        entry.edx |= EDX_HTT_BIT;
    } else {
        entry.edx &= !EDX_HTT_BIT;
    }
}

fn set_topology_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u8, cpus: u8, core_shift: u32) {
    entry.edx = u32::from(apic_id);
    match entry.index {
        0 => {
            // One thread per core.
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
        }
        1 => {
            entry.eax = core_shift;
            entry.ebx = u32::from(cpus);
            entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
        }
        _ => {
            // Sub-leaves past the core level are invalid: level type 0.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index;
        }
    }
}

/// Bits of the APIC ID that number the cores: ceil(log2(cpus)).
fn apic_id_shift(cpus: u8) -> u32 {
    u32::from(cpus).next_power_of_two().trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]).unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = cpuid();
        normalize(&mut c, 3, 4);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR_BIT, 0);
        assert_ne!(leaf1.edx & EDX_HTT_BIT, 0);
    }

    #[test]
    fn topology_leaf_describes_cores_and_x2apic_id() {
        let mut c = cpuid();
        normalize(&mut c, 2, 3);
        let s = c.as_slice();
        assert_eq!((s[1].ebx, s[1].edx, s[1].ecx >> 8), (1, 2, LEVEL_TYPE_SMT));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 3, LEVEL_TYPE_CORE));
        assert_eq!(s[3].ecx >> 8, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut c = cpuid();
        normalize(&mut c, 0, 1);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT_BIT, 0);
        assert_eq!(apic_id_shift(1), 0);
        assert_eq!(apic_id_shift(5), 3);
    }
}
