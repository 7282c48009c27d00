//! Guest memory: anonymous private mappings, split around the 32-bit MMIO gap, left out of core
//! dumps and named `ember-guest-ram` for /proc/PID/maps.

use std::ffi::CStr;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::smaps;
use crate::arch::x86_64::memory_ranges;

const GUEST_RAM_NAME: &CStr = c"ember-guest-ram";

/// Guest memory that cannot be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit the host's address space.
    #[error("guest memory of {0} MiB is too large for this host")]
    TooLarge(u64),
    /// mmap failed.
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        /// Requested size.
        mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `mib` MiB of guest RAM.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::TooLarge(mib))?;
    let ranges = memory_ranges(bytes)
        .into_iter()
        .map(|(start, size)| usize::try_from(size).map(|size| (start, size)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::TooLarge(mib))?;
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })?;
    for region in mem.iter() {
        exclude_from_core_dumps(region.as_ptr(), region.len());
        name_guest_ram(region.as_ptr(), region.len());
    }
    Ok(mem)
}

/// Leaves guest memory out of ember's core dumps: what a guest keeps in its RAM (keys, tenant
/// data) does not belong in a crash report. The flag also keeps each guest mapping from merging
/// with a neighbouring anonymous one, so smaps shows guest RAM apart from the VMM's own memory.
pub fn exclude_from_core_dumps(addr: *mut u8, len: u64) {
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    // SAFETY: MADV_DONTDUMP only sets a flag on the mappings in the range; no memory changes.
    if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTDUMP) } != 0 {
        log::debug!(
            "cannot exclude guest memory from core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Names a guest RAM mapping, so that it reads as guest RAM in /proc/PID/maps and smaps and
/// never merges with a neighbouring anonymous mapping (kernels before 5.17 cannot name them).
fn name_guest_ram(addr: *mut u8, len: u64) {
    let name = GUEST_RAM_NAME.as_ptr();
    // SAFETY: PR_SET_VMA_ANON_NAME only labels the mappings in the range (ours, anonymous) with
    // the string, which the kernel copies; it changes no memory.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            name as libc::c_ulong,
        )
    };
    if ret != 0 {
        log::debug!(
            "cannot name guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Resident memory of this process outside `mem`, in KiB: what the VMM itself costs on top of
/// guest RAM. The `Rss` of every mapping in smaps except those inside guest memory (named
/// anonymous RAM, and the kernel's segments mapped from the page cache).
///
/// `smaps` is this process's `/proc/self/smaps`, opened beforehand: the thread that measures
/// may not be allowed to open files any more.
pub fn overhead_kib(mem: &GuestMemoryMmap, smaps: &std::fs::File) -> std::io::Result<u64> {
    let mappings = smaps::parse(&smaps::read(smaps)?);
    let guest: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect();
    let inside = |m: &smaps::Mapping| {
        guest
            .iter()
            .any(|&(start, end)| m.start >= start && m.end <= end)
    };
    Ok(smaps::outside_kib(&mappings, |_, m| inside(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_the_gap_gets_two_regions() {
        let mem = create_guest_memory(4096).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let mem = create_guest_memory(128).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn touched_guest_memory_does_not_count_as_overhead() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_guest_memory(64).unwrap();
        let smaps = std::fs::File::open("/proc/self/smaps").unwrap();
        let before = overhead_kib(&mem, &smaps).unwrap();
        mem.write_slice(&vec![1u8; 32 << 20], GuestAddress(0))
            .unwrap();
        let after = overhead_kib(&mem, &smaps).unwrap();
        assert!(before > 0);
        // 32 MiB of guest pages became resident; the overhead must not grow by anything close.
        assert!(
            after < before + 4096,
            "overhead {before} KiB -> {after} KiB"
        );
    }

    #[test]
    fn guest_memory_is_marked_and_apart_in_smaps() {
        let mem = create_guest_memory(16).unwrap();
        let start = mem.iter().next().unwrap().as_ptr() as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mapping = smaps::parse(&smaps)
            .into_iter()
            .find(|m| m.start == start)
            .unwrap();
        assert!(
            mapping.dont_dump && mapping.is_marked_guest_ram(),
            "{mapping:?}"
        );
        assert_eq!(mapping.size_kib(), 16 << 10);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(
            create_guest_memory(u64::MAX),
            Err(MemoryError::TooLarge(_))
        ));
    }
}
