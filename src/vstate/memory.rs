//! Guest memory: anonymous private mappings, split around the 32-bit MMIO gap, left out of core
//! dumps and named `ember-guest-ram` for /proc/PID/maps.

use std::ffi::CStr;

use crate::guest_memory::{DirtyPages, GuestMemoryMmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::smaps;
use crate::arch::x86_64::memory_ranges;

const GUEST_RAM_NAME: &CStr = c"ember-guest-ram";

/// Guest memory that cannot be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit the host's address space.
    #[error("guest memory of {0} MiB is too large for this host")]
    TooLarge(u64),
    /// The memory file cannot be used.
    #[error("cannot map the memory file: {0}")]
    File(String),
    /// The memory file is not the size of the guest's memory.
    #[error("the memory file is {len} bytes but the VM's memory is {total} bytes")]
    FileSize {
        /// The file's length.
        len: u64,
        /// Guest memory's size.
        total: u64,
    },
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

fn guest_ranges(mib: u64) -> Result<Vec<(vm_memory::GuestAddress, usize)>, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::TooLarge(mib))?;
    memory_ranges(bytes)
        .into_iter()
        .map(|(start, size)| usize::try_from(size).map(|size| (start, size)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::TooLarge(mib))
}

/// Maps `mib` MiB of guest RAM.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = guest_ranges(mib)?;
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })?;
    for region in mem.iter() {
        exclude_from_core_dumps(region.as_ptr(), region.len());
        name_guest_ram(region.as_ptr(), region.len());
    }
    Ok(mem)
}

/// Maps `mib` MiB of guest RAM from a memory file (a snapshot's), privately: pages are read
/// from the file (its page cache, shared by every VM restored from it) when the guest first
/// touches them, and what the guest writes stays in this process. Nothing is read up front, so
/// the time this takes does not grow with the size of guest memory.
pub fn map_guest_memory_file(
    mib: u64,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap, MemoryError> {
    map_file(mib, file, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
}

/// Maps `mib` MiB of fresh guest RAM in a memfd, shared: [`memory_fd`] gives the descriptor a
/// migration hands to another ember on this host, which maps the same pages.
pub fn create_shared_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = guest_ranges(mib)?
        .iter()
        .map(|(_, size)| *size as u64)
        .sum();
    let fd = memfd_create(GUEST_RAM_NAME).map_err(|e| MemoryError::File(e.to_string()))?;
    fd.set_len(total)
        .map_err(|e| MemoryError::File(e.to_string()))?;
    map_file(mib, &fd, libc::MAP_SHARED | libc::MAP_NORESERVE)
}

/// Maps `mib` MiB of guest RAM shared from `file`, the memfd another ember handed over.
pub fn map_shared_guest_memory(
    mib: u64,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap, MemoryError> {
    map_file(mib, file, libc::MAP_SHARED | libc::MAP_NORESERVE)
}

/// The descriptor behind shared guest memory, `None` for anonymous or private memory.
pub fn memory_fd(mem: &GuestMemoryMmap) -> Option<&std::fs::File> {
    let region = mem.iter().next()?;
    let shared = std::ops::Deref::deref(region).flags() & libc::MAP_SHARED != 0;
    shared.then(|| region.file_offset().map(|f| f.file()))?
}

fn memfd_create(name: &CStr) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn map_file(mib: u64, file: &std::fs::File, flags: i32) -> Result<GuestMemoryMmap, MemoryError> {
    use std::sync::Arc;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let ranges = guest_ranges(mib)?;
    let total: u64 = ranges.iter().map(|(_, size)| *size as u64).sum();
    let len = file
        .metadata()
        .map_err(|e| MemoryError::File(e.to_string()))?
        .len();
    if len != total {
        return Err(MemoryError::FileSize { len, total });
    }
    let file = Arc::new(
        file.try_clone()
            .map_err(|e| MemoryError::File(e.to_string()))?,
    );
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (start, size) in ranges {
        // With a bitmap as long as the region: `MmapRegionBuilder::new` gives an empty one,
        // which would drop every record of ember's own writes (Diff snapshots, migrations).
        let bitmap =
            <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size);
        let region = MmapRegionBuilder::new_with_bitmap(size, bitmap)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| MemoryError::File(format!("{e:?}")))?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| MemoryError::File("a region wraps the address space".into()))?;
        regions.push(region);
        offset += size as u64;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::File(format!("{e:?}")))?;
    for region in mem.iter() {
        exclude_from_core_dumps(region.as_ptr(), region.len());
    }
    Ok(mem)
}

/// Writes every region of `mem`, in order, to `file` (truncated first): the raw image a
/// restore maps back. All-zero pages are left as holes, so the file takes room only for what
/// the guest wrote. The VM must be paused (nothing writes guest memory meanwhile).
pub fn write_guest_memory_file(mem: &GuestMemoryMmap, file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let total: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    file.set_len(0)?;
    file.set_len(total)?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; the VM is paused,
        // so nothing writes it while this shared view exists, and it is only read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let mut page = 0;
        while page < len {
            // Runs of non-zero pages go out in one write each.
            if is_zero(&bytes[page..(page + PAGE).min(len)]) {
                page += PAGE;
                continue;
            }
            let start = page;
            while page < len && !is_zero(&bytes[page..(page + PAGE).min(len)]) {
                page += PAGE;
            }
            let end = page.min(len);
            file.write_all_at(&bytes[start..end], offset + start as u64)?;
        }
        offset += region.len();
    }
    Ok(())
}

/// Writes the pages `dirty` names to `file` (truncated first, then as long as a full memory
/// file): a Diff snapshot's memory. Every dirty page is written, all-zero ones included (they
/// must overwrite what the base holds there); every other page is a hole. Returns the bytes
/// written. The VM must be paused.
pub fn write_dirty_pages_file(
    mem: &GuestMemoryMmap,
    dirty: &DirtyPages,
    file: &std::fs::File,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let total: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    let shaped_alike = dirty.regions.len() == mem.num_regions()
        && dirty
            .regions
            .iter()
            .zip(mem.iter())
            .all(|(d, r)| d.start == r.start_addr().0 && d.len == r.len());
    if !shaped_alike {
        return Err(std::io::Error::other(
            "the dirty-page record does not match guest memory",
        ));
    }
    file.set_len(0)?;
    file.set_len(total)?;
    let mut written = 0;
    let mut offset = 0u64;
    for (region, record) in mem.iter().zip(&dirty.regions) {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        // SAFETY: as in `write_guest_memory_file`: a live mapping of `len` bytes owned by `mem`,
        // not written while the VM is paused, only read here.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        for (start, run) in record.runs() {
            // Runs are clipped to their region, so these fit in `bytes`.
            let from = usize::try_from(start - record.start).map_err(std::io::Error::other)?;
            let to = from + usize::try_from(run).map_err(std::io::Error::other)?;
            file.write_all_at(&bytes[from..to], offset + from as u64)?;
            written += run;
        }
        offset += region.len();
    }
    Ok(written)
}

pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits at aligned boundaries.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
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
    #[test]
    fn every_kind_of_guest_memory_records_ember_s_writes() {
        use crate::guest_memory::DirtyPages;
        use vm_memory::{Bytes, GuestAddress};
        let file = tempfile(2 << 20);
        let kinds = [
            super::create_guest_memory(2).unwrap(),
            super::create_shared_guest_memory(2).unwrap(),
            super::map_guest_memory_file(2, &file).unwrap(),
        ];
        for mem in kinds {
            DirtyPages::clear_vmm_writes(&mem);
            mem.write_slice(&[1; 8], GuestAddress(0x3000)).unwrap();
            let written = DirtyPages::take_vmm_writes(&mem);
            assert_eq!(written.runs(), vec![(0x3000, 0x1000)]);
        }
    }

    fn tempfile(len: u64) -> std::fs::File {
        // Each test's own name: tests of one process run in parallel.
        let path = std::env::temp_dir().join(format!("ember-memfile-tmp-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }

    use super::*;

    /// The smaps tests measure the whole process: tests that map memory wait for each other.
    static MAPPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_memory_file_round_trips_sparsely_and_maps_privately() {
        let _one_at_a_time = MAPPING.lock().unwrap_or_else(|e| e.into_inner());
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_guest_memory(8).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(0x7f_ffff)).unwrap();
        let path = std::env::temp_dir().join(format!("ember-memfile-rt-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        write_guest_memory_file(&mem, &file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            file.metadata().unwrap().blocks() * 512 < 1 << 20,
            "zero pages are holes"
        );
        let restored = map_guest_memory_file(8, &file).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x7f_ffff)).unwrap(), 7);
        restored.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let again = map_guest_memory_file(8, &file).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef,
            "a restored VM's writes stay private"
        );
        assert!(matches!(
            map_guest_memory_file(16, &file),
            Err(MemoryError::FileSize { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_zero_ones_included_and_nothing_else() {
        let _one_at_a_time = MAPPING.lock().unwrap_or_else(|e| e.into_inner());
        use crate::guest_memory::DirtyPages;
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestAddress};
        let mem = create_guest_memory(8).unwrap();
        mem.write_obj(0x1122_u16, GuestAddress(0x5000)).unwrap();
        DirtyPages::clear_vmm_writes(&mem);
        // Page 0x2000 written with zeros (it must overwrite a base), 0x7f_f000 with data.
        mem.write_slice(&[0; 16], GuestAddress(0x2000)).unwrap();
        mem.write_obj(9u8, GuestAddress(0x7f_ffff)).unwrap();
        let dirty = DirtyPages::take_vmm_writes(&mem);
        let path = std::env::temp_dir().join(format!("ember-memdiff-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert_eq!(write_dirty_pages_file(&mem, &dirty, &file).unwrap(), 0x2000);
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        let ranges = crate::vmm::fold::data_ranges(&file, 8 << 20).unwrap();
        assert_eq!(ranges, vec![(0x2000, 0x1000), (0x7f_f000, 0x1000)]);
        let mut byte = [1u8];
        file.read_exact_at(&mut byte, 0x5000).unwrap();
        assert_eq!(byte, [0], "a page written before the record is a hole");
        file.read_exact_at(&mut byte, 0x7f_ffff).unwrap();
        assert_eq!(byte, [9]);
        let other = create_guest_memory(16).unwrap();
        assert!(
            write_dirty_pages_file(&other, &dirty, &file).is_err(),
            "a record of other memory"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn memory_above_the_gap_gets_two_regions() {
        let mem = create_guest_memory(4096).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let mem = create_guest_memory(128).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn touched_guest_memory_does_not_count_as_overhead() {
        let _one_at_a_time = MAPPING.lock().unwrap_or_else(|e| e.into_inner());
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
        let _one_at_a_time = MAPPING.lock().unwrap_or_else(|e| e.into_inner());
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
