//! Guest memory as every part of ember sees it: vm-memory's mmap backend with a dirty bitmap
//! per region, so that every write ember makes into guest memory through vm-memory (used rings,
//! disk reads, received frames, boot data) is recorded page by page. Diff snapshots and live
//! migration combine it with KVM's dirty log (what the vCPUs wrote). Writes made through raw
//! host pointers (readv/preadv/io_uring into guest buffers) must call [`mark_written`].

use vm_memory::bitmap::{AtomicBitmap, BS, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

/// Guest memory with a dirty bitmap per region.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// A slice of guest memory that carries its part of the dirty bitmap.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;
/// The part of the dirty bitmap a slice of guest memory carries.
pub type GuestSliceBitmap<'a> = BS<'a, AtomicBitmap>;

/// Size of the pages dirty tracking counts in (KVM's and the bitmap's).
pub const PAGE_SIZE: u64 = 4096;

/// Records that all of `slice` was written behind vm-memory's back (through its host address).
pub fn mark_written(slice: &GuestSlice<'_>) {
    slice.bitmap().mark_dirty(0, slice.len());
}

/// Records that the first `len` bytes of `slice` were written through its host address.
pub fn mark_written_len(slice: &GuestSlice<'_>, len: usize) {
    slice.bitmap().mark_dirty(0, len.min(slice.len()));
}

/// Records that the guest buffers `segments` were written through their host addresses (a
/// disk read by preadv or io_uring). Segments outside guest memory are skipped: the caller
/// checked them, and an unmapped address has nothing to record.
pub fn mark_segments_written(mem: &GuestMemoryMmap, segments: &[(GuestAddress, u32)]) {
    for &(addr, len) in segments {
        for slice in mem.get_slices(addr, len as usize).flatten() {
            mark_written(&slice);
        }
    }
}

/// Dirty pages, one bit per 4 KiB page, one bitmap per region of guest memory in order (the
/// layout of KVM's dirty log: bit `i` of word `w` is page `64 * w + i` of the region).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per region: its guest-physical start, its length in bytes, its bitmap.
    pub regions: Vec<DirtyRegion>,
}

/// One region's dirty bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest-physical address of the region's first byte.
    pub start: u64,
    /// The region's length in bytes.
    pub len: u64,
    /// One bit per page.
    pub bits: Vec<u64>,
}

impl DirtyPages {
    /// No page dirty, shaped like `mem`.
    pub fn empty(mem: &GuestMemoryMmap) -> Self {
        DirtyPages {
            regions: mem
                .iter()
                .map(|r| DirtyRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    bits: vec![0; words_for(r.len())],
                })
                .collect(),
        }
    }

    /// Every page dirty, shaped like `mem` (the first pass of a migration).
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let mut pages = Self::empty(mem);
        for region in &mut pages.regions {
            let count = region.len.div_ceil(PAGE_SIZE);
            for page in 0..count {
                region.bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        pages
    }

    /// Takes (and clears) the pages ember itself wrote through vm-memory since the last call.
    pub fn take_vmm_writes(mem: &GuestMemoryMmap) -> Self {
        DirtyPages {
            regions: mem
                .iter()
                .map(|r| DirtyRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    bits: std::ops::Deref::deref(r).bitmap().get_and_reset(),
                })
                .collect(),
        }
    }

    /// Forgets the pages ember wrote so far (tracking starts now).
    pub fn clear_vmm_writes(mem: &GuestMemoryMmap) {
        for region in mem.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }

    /// Adds `other`'s pages (the same regions) to these.
    pub fn merge(&mut self, other: &DirtyPages) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.bits.iter_mut().zip(&theirs.bits) {
                *a |= *b;
            }
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Runs of dirty pages as (guest-physical address, length in bytes), in address order, each
    /// run clipped to its region.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        self.regions.iter().flat_map(DirtyRegion::runs).collect()
    }
}

impl DirtyRegion {
    /// This region's runs of dirty pages as (guest-physical address, length in bytes), in
    /// address order, the last clipped to the region's end.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let pages = self.len.div_ceil(PAGE_SIZE);
        let mut page = 0;
        while page < pages {
            // Whole clean words are skipped at once: most of a diff's memory is clean.
            if page % 64 == 0 && self.bits.get((page / 64) as usize) == Some(&0) {
                page += 64;
                continue;
            }
            if !self.is_dirty(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && self.is_dirty(page) {
                page += 1;
            }
            let start = first * PAGE_SIZE;
            let end = (page * PAGE_SIZE).min(self.len);
            runs.push((self.start + start, end - start));
        }
        runs
    }

    /// Whether page `page` of the region is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

fn words_for(len: u64) -> usize {
    usize::try_from(len.div_ceil(PAGE_SIZE).div_ceil(64)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn writes_through_vm_memory_are_recorded_once() {
        let mem = mem();
        DirtyPages::clear_vmm_writes(&mem);
        mem.write_obj(7u32, GuestAddress(0x3000)).unwrap();
        // A write straddling two pages dirties both.
        mem.write_slice(&[1; 8], GuestAddress((1 << 32) + 0x1ffc))
            .unwrap();
        let dirty = DirtyPages::take_vmm_writes(&mem);
        assert_eq!(dirty.count(), 3);
        assert_eq!(
            dirty.runs(),
            vec![(0x3000, 0x1000), ((1 << 32) + 0x1000, 0x2000)]
        );
        assert_eq!(
            DirtyPages::take_vmm_writes(&mem).count(),
            0,
            "taking clears"
        );
    }

    #[test]
    fn raw_writes_are_recorded_when_marked() {
        let mem = mem();
        DirtyPages::clear_vmm_writes(&mem);
        let slice = mem.get_slice(GuestAddress(0x8000), 0x2000).unwrap();
        mark_written_len(&slice, 0x1001);
        assert_eq!(
            DirtyPages::take_vmm_writes(&mem).runs(),
            vec![(0x8000, 0x2000)]
        );
    }

    #[test]
    fn all_merge_and_runs_cover_each_region() {
        let mem = mem();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), 512);
        assert_eq!(
            all.runs(),
            vec![(0, 1 << 20), (1 << 32, 1 << 20)],
            "one run per region"
        );
        let mut some = DirtyPages::empty(&mem);
        some.merge(&all);
        assert_eq!(some, all);
    }
}
