//! A kernel file that reaches guest memory by mapping instead of copying.
//!
//! linux-loader reads each ELF segment into guest memory through this reader. Where a segment's
//! file offset and its guest-memory host address agree modulo the page size (vmlinux segments are
//! 2 MiB-aligned in both), the whole pages in between become a private mapping of the file
//! (`MAP_PRIVATE | MAP_FIXED` over that part of guest RAM); only the partial pages at either end
//! are copied. The guest then reads the kernel straight from the host's page cache, shared by
//! every VM booting that file, and a page it writes gets its own copy: the file never changes.
//! Loading a 50 MB vmlinux this way takes well under a millisecond instead of 30-50 ms of page
//! faults and copying (docs/benchmarking.md).
//!
//! The file must not be truncated or rewritten in place while a VM booted from it runs: the
//! guest would see the new bytes, and ember would fault reading a page past the new end.
//! Replace kernels by renaming a new file over the old one, as package managers do.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE_SIZE: usize = 4096;
/// Segments with fewer whole pages than this are copied: a mapping per tiny segment is not worth
/// its VMA.
const MIN_MAPPED_BYTES: usize = 16 * PAGE_SIZE;

/// A kernel image file with its own position, read by mapping whole pages where it can.
pub struct MappedImage {
    file: File,
    len: u64,
    pos: u64,
    mapped: u64,
    /// Copy every segment: guest memory is shared (a memfd another process may map), and a
    /// private mapping of the image would not be part of it.
    copy_only: bool,
}

impl MappedImage {
    /// Wraps `file`, positioned at its start.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(MappedImage {
            file,
            len,
            pos: 0,
            mapped: 0,
            copy_only: false,
        })
    }

    /// Copies every segment instead of mapping it (guest memory that is shared).
    pub fn copy_only(mut self, copy_only: bool) -> Self {
        self.copy_only = copy_only;
        self
    }

    /// Bytes that went into guest memory as mappings rather than copies.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped
    }

    /// Copies file bytes at `offset` into `len` bytes at `dst`; returns how many (fewer at EOF).
    ///
    /// # Safety
    ///
    /// `dst..dst + len` must be valid for writes.
    unsafe fn copy(&self, dst: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < len {
            // SAFETY: `dst + done .. dst + len` is within the caller's writable range.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    dst.add(done).cast(),
                    len - done,
                    i64::try_from(offset.saturating_add(done as u64)).unwrap_or(i64::MAX),
                )
            };
            match n {
                0 => break,
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => done += n.unsigned_abs(),
            }
        }
        Ok(done)
    }

    /// Replaces the pages at `dst..dst + len` with a private mapping of the file at `offset`.
    /// If that fails they are anonymous zero pages again, as they were, and the caller copies.
    ///
    /// # Safety
    ///
    /// `dst..dst + len` must be page-aligned, part of a private read-write mapping this process
    /// owns, and hold nothing yet: its contents are replaced.
    unsafe fn map(&self, dst: *mut u8, len: usize, offset: u64) -> bool {
        let Ok(offset) = i64::try_from(offset) else {
            return false;
        };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the caller guarantees the range is ours and disposable; MAP_FIXED replaces
        // exactly those pages with a private mapping of an open file.
        let mapped = unsafe {
            libc::mmap(
                dst.cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if mapped != libc::MAP_FAILED {
            // Guest RAM stays out of core dumps, the pages written here included.
            // SAFETY: only sets a flag on the mapping just made.
            unsafe { libc::madvise(dst.cast(), len, libc::MADV_DONTDUMP) };
            return true;
        }
        log::debug!(
            "cannot map the kernel from the page cache ({}); copying it",
            io::Error::last_os_error()
        );
        // A failed MAP_FIXED may have unmapped the range already: put anonymous memory back.
        // SAFETY: as above, with anonymous zero pages, which is what the range held.
        unsafe {
            libc::mmap(
                dst.cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        false
    }
}

impl Read for MappedImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

impl Seek for MappedImage {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(pos) => Some(pos),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl ReadVolatile for MappedImage {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let guard = buf.ptr_guard_mut();
        let dst = guard.as_ptr();
        let head = (dst as usize).next_multiple_of(PAGE_SIZE) - dst as usize;
        let whole = len.saturating_sub(head) / PAGE_SIZE * PAGE_SIZE;
        // A seek may have put `pos` anywhere (the image is untrusted): nothing past the end maps.
        let body_offset = self.pos.saturating_add(head as u64);
        let mappable = !self.copy_only
            && whole >= MIN_MAPPED_BYTES
            && body_offset % PAGE_SIZE as u64 == 0
            && body_offset
                .checked_add(whole as u64)
                .is_some_and(|end| end <= self.len);
        let pos = self.pos;
        let io = VolatileMemoryError::IOError;
        // SAFETY: `dst..dst + len` is the slice's memory, valid for writes by the VolatileSlice's
        // invariants, and `head <= len`.
        let copied_head = unsafe { self.copy(dst, head.min(len), pos) }.map_err(io)?;
        let done = if !mappable || copied_head < head {
            // SAFETY: as above; the rest of the slice.
            let rest = unsafe {
                self.copy(
                    dst.add(copied_head),
                    len - copied_head,
                    pos.saturating_add(copied_head as u64),
                )
            };
            copied_head + rest.map_err(io)?
        // SAFETY: `dst + head` is page-aligned and `whole` bytes of it lie in the slice, which is
        // fresh guest RAM (a private anonymous mapping) that linux-loader is filling: nothing
        // else holds its contents.
        } else if unsafe { self.map(dst.add(head), whole, body_offset) } {
            self.mapped += whole as u64;
            let tail_offset = body_offset.saturating_add(whole as u64);
            // SAFETY: the slice's last `len - head - whole` bytes.
            let tail = unsafe { self.copy(dst.add(head + whole), len - head - whole, tail_offset) };
            head + whole + tail.map_err(io)?
        } else {
            // SAFETY: the slice past the head.
            let rest = unsafe { self.copy(dst.add(head), len - head, body_offset) };
            head + rest.map_err(io)?
        };
        buf.bitmap().mark_dirty(0, done);
        self.pos = self.pos.saturating_add(done as u64);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::guest_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const FILE_LEN: usize = 1 << 20;

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 4096).to_le_bytes()[0]
    }

    fn image(name: &str) -> (MappedImage, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("ember-mapped-{name}-{}", std::process::id()));
        let bytes: Vec<u8> = (0..FILE_LEN).map(pattern).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        (MappedImage::new(File::open(&path).unwrap()).unwrap(), path)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// Loads `len` file bytes from `offset` at guest address `addr`, as linux-loader does, and
    /// checks every byte of the segment and the zero pages around it.
    fn load_and_check(name: &str, offset: usize, addr: u64, len: usize) -> u64 {
        let (mut image, path) = image(name);
        let mem = mem();
        image.seek(SeekFrom::Start(offset as u64)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(addr), &mut image, len)
            .unwrap();
        let mut got = vec![0u8; len + 8192];
        mem.read_slice(&mut got, GuestAddress(addr - 4096)).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0), "before the segment");
        for (i, &b) in got[4096..4096 + len].iter().enumerate() {
            assert_eq!(b, pattern(offset + i), "byte {i}");
        }
        assert!(
            got[4096 + len..].iter().all(|&b| b == 0),
            "past the segment"
        );
        // The guest writes its copy; the file keeps its bytes.
        mem.write_slice(&[0xee; 64], GuestAddress(addr + len as u64 / 2))
            .unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file[offset + len / 2], pattern(offset + len / 2));
        std::fs::remove_file(path).unwrap();
        image.mapped_bytes()
    }

    #[test]
    fn aligned_segments_are_mapped_with_partial_pages_copied() {
        // File offset and address agree modulo 4 KiB; the segment starts and ends mid-page.
        let mapped = load_and_check("aligned", 0x2100, 0x20_0100, 600_000);
        assert!(mapped >= 500_000, "mapped {mapped}");
        assert_eq!(mapped % PAGE_SIZE as u64, 0);
    }

    #[test]
    fn misaligned_segments_are_copied() {
        assert_eq!(load_and_check("misaligned", 0x2100, 0x20_0000, 600_000), 0);
    }

    #[test]
    fn small_segments_are_copied() {
        assert_eq!(load_and_check("small", 0x1000, 0x20_1000, 8 * PAGE_SIZE), 0);
    }

    #[test]
    fn a_segment_past_the_end_of_the_file_fails_without_mapping_past_it() {
        let (mut image, path) = image("short");
        let mem = mem();
        image
            .seek(SeekFrom::Start(FILE_LEN as u64 - 0x1_0000))
            .unwrap();
        let result = mem.read_exact_volatile_from(GuestAddress(0x10_0000), &mut image, 0x10_0000);
        assert!(result.is_err());
        assert_eq!(image.mapped_bytes(), 0);
        std::fs::remove_file(path).unwrap();
    }

    /// Found by the `loader` fuzz target: a seek near `u64::MAX` made the next read overflow.
    #[test]
    fn a_read_after_a_seek_near_the_end_of_the_offset_space_fails_cleanly() {
        let (mut image, path) = image("far");
        let mem = mem();
        image.seek(SeekFrom::Start(u64::MAX - 10)).unwrap();
        let result = mem.read_exact_volatile_from(GuestAddress(0x10_0000), &mut image, 0x10_0000);
        assert!(result.is_err());
        assert_eq!(image.mapped_bytes(), 0);
        std::fs::remove_file(path).unwrap();
    }
}
