//! Guest memory: anonymous private mappings, split around the 32-bit MMIO gap.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::memory_ranges;

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
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

/// Resident memory of this process outside `mem`, in KiB: what the VMM itself costs on top of
/// guest RAM. Whole-process residency (/proc/self/statm) minus the guest pages `mincore` finds
/// resident; smaps cannot separate them, as the kernel may merge the guest mapping with a
/// neighbouring one.
///
/// `statm` is this process's `/proc/self/statm`, opened beforehand: the thread that measures
/// may not be allowed to open files any more.
pub fn overhead_kib(mem: &GuestMemoryMmap, statm: &std::fs::File) -> std::io::Result<u64> {
    let mut buf = [0u8; 256];
    let n = std::os::unix::fs::FileExt::read_at(statm, &mut buf, 0)?;
    let statm = String::from_utf8_lossy(&buf[..n]);
    let resident: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|pages| pages.parse().ok())
        .ok_or_else(|| std::io::Error::other("unreadable /proc/self/statm"))?;
    let mut guest_resident = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        let mut pages = vec![0u8; len.div_ceil(PAGE_SIZE)];
        // SAFETY: the region is one live, page-aligned mapping of `len` bytes, and `pages` has a
        // byte for each of its pages; the result is checked.
        if unsafe { libc::mincore(region.as_ptr().cast(), len, pages.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        guest_resident += pages.iter().filter(|&&p| p & 1 == 1).count() as u64;
    }
    Ok(resident.saturating_sub(guest_resident) * (PAGE_SIZE as u64 / 1024))
}

/// The host page size mincore reports in.
const PAGE_SIZE: usize = 4096;

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
        let statm = std::fs::File::open("/proc/self/statm").unwrap();
        let before = overhead_kib(&mem, &statm).unwrap();
        mem.write_slice(&vec![1u8; 32 << 20], GuestAddress(0))
            .unwrap();
        let after = overhead_kib(&mem, &statm).unwrap();
        assert!(before > 0);
        // 32 MiB of guest pages became resident; the overhead must not grow by anything close.
        assert!(
            after < before + 4096,
            "overhead {before} KiB -> {after} KiB"
        );
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(
            create_guest_memory(u64::MAX),
            Err(MemoryError::TooLarge(_))
        ));
    }
}
