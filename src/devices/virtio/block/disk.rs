//! The host side of a virtio-blk device: an image file, locked against a second writer, read
//! and written at sector offsets straight into guest memory.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::guest_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Bytes per sector in the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Linux's IOV_MAX: the most buffers one preadv/pwritev takes.
const MAX_IOVECS: usize = 1024;

/// An image that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Missing file.
    #[error("disk image {} does not exist: check the path", .0.display())]
    Missing(PathBuf),
    /// A directory.
    #[error("disk image {} is a directory: give the path of an image file", .0.display())]
    Directory(PathBuf),
    /// Cannot be opened for writing.
    #[error("disk image {} cannot be opened for writing: add readonly=on, or fix its permissions", .0.display())]
    NotWritable(PathBuf),
    /// Locked by another process.
    #[error("disk image {} is in use by another process (locked): stop it, or add readonly=on to share it read-only", .0.display())]
    Locked(PathBuf),
    /// Any other I/O failure.
    #[error("cannot open disk image {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
}

/// An open, locked image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    sectors: u64,
    read_only: bool,
}

impl DiskFile {
    /// Opens `path` (a file or a block device; with O_DIRECT when `direct`) and locks it (see
    /// [`lock`]): exclusively when writable, shared when read-only, so no two VMMs write one
    /// image at once.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        let owned = || path.to_owned();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DiskError::Missing(owned()),
            _ => DiskError::Open(owned(), e),
        })?;
        if meta.is_dir() {
            return Err(DiskError::Directory(owned()));
        }
        let flags = if direct { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| match (e.raw_os_error(), read_only) {
                (Some(libc::EACCES | libc::EROFS | libc::EPERM), false) => {
                    DiskError::NotWritable(owned())
                }
                _ => DiskError::Open(owned(), e),
            })?;
        lock(&file, read_only).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK | libc::EACCES) => DiskError::Locked(owned()),
            _ => DiskError::Open(owned(), e),
        })?;
        // A block device's metadata says 0 bytes: its end is where its size is.
        let bytes = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| DiskError::Open(owned(), e))?;
        Ok(DiskFile {
            file,
            sectors: bytes / SECTOR_SIZE,
            read_only,
        })
    }

    /// Size in sectors (a partial last sector is not exposed).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's descriptor (for the io_uring engine).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Moves the guest buffers `segments`, in order, from (`to_guest`) or to the image at byte
    /// `offset`: one positioned vectored read or write straight into guest memory (repeated only
    /// after a short transfer), so a request costs one system call however many segments it has.
    pub fn transfer(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        segments: &[(GuestAddress, u32)],
        to_guest: bool,
    ) -> std::io::Result<()> {
        let result = self.transfer_unmarked(offset, mem, segments, to_guest);
        if to_guest {
            // preadv wrote guest memory behind vm-memory's back: record the pages, after the
            // write (a migration round on another thread that took them earlier would have
            // sent what was there before).
            crate::guest_memory::mark_segments_written(mem, segments);
        }
        result
    }

    fn transfer_unmarked(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        segments: &[(GuestAddress, u32)],
        to_guest: bool,
    ) -> std::io::Result<()> {
        let mut iovecs = iovecs(mem, segments)?;
        let mut first = 0;
        let mut position = offset;
        while first < iovecs.len() {
            let pending = &iovecs[first..];
            let count = libc::c_int::try_from(pending.len().min(MAX_IOVECS)).unwrap_or(1);
            let at = libc::off_t::try_from(position)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let fd = self.file.as_raw_fd();
            // SAFETY: every iovec points into guest memory, mapped for as long as `mem` lives,
            // with the length vm-memory checked; `count` does not exceed the slice; the result
            // is checked.
            let done = unsafe {
                if to_guest {
                    libc::preadv(fd, pending.as_ptr(), count, at)
                } else {
                    libc::pwritev(fd, pending.as_ptr(), count, at)
                }
            };
            let done = match usize::try_from(done) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            position += done as u64;
            // Skip what was transferred: whole iovecs, then part of the next.
            let mut left = done;
            while left > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                if left >= iov.iov_len {
                    left -= iov.iov_len;
                    first += 1;
                } else {
                    iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(left).cast();
                    iov.iov_len -= left;
                    left = 0;
                }
            }
        }
        Ok(())
    }

    /// Puts every completed write on stable storage.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Hands the image over to another VMM (a migration's destination): every completed write
    /// on stable storage, then both locks released. The file stays open, so [`DiskFile::relock`]
    /// can take it back.
    pub fn release(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        unlock(&self.file)
    }

    /// Takes the locks back after [`DiskFile::release`] (a migration that failed).
    pub fn relock(&mut self) -> std::io::Result<()> {
        lock(&self.file, self.read_only)
    }

    /// Deallocates `[offset, offset + len)`: it reads back as zeros and stops using disk blocks.
    pub fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own, with range checked to fit off_t.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The host addresses of the guest buffers `segments`, in order (a buffer that straddles two
/// memory regions gives two). Guest memory stays mapped while the VM's memory object lives, so
/// the pointers stay valid that long; the kernel may be handed them for I/O in flight.
pub fn iovecs(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, u32)],
) -> std::io::Result<Vec<libc::iovec>> {
    let mut iovecs = Vec::with_capacity(segments.len());
    for &(addr, len) in segments {
        for slice in mem.get_slices(addr, len as usize) {
            let guard = slice.map_err(std::io::Error::other)?.ptr_guard_mut();
            iovecs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            });
        }
    }
    Ok(iovecs)
}

/// Whether `iovecs` fit one preadv/pwritev (or one io_uring readv/writev).
pub fn fits_one_call(iovecs: &[libc::iovec]) -> bool {
    iovecs.len() <= MAX_IOVECS
}

/// Takes the whole file's open-file-description lock (the kind QEMU takes and tests, on bytes
/// of its own, so it and ember see each other) and its `flock` (the kind `flock(1)` and older
/// tools take): a write lock when writable, a read lock when read-only, never waiting.
fn lock(file: &File, read_only: bool) -> std::io::Result<()> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: `flock` is plain data; all zeroes (the whole file from offset 0) is valid.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = i16::try_from(kind).unwrap_or(0);
    range.l_whence = i16::try_from(libc::SEEK_SET).unwrap_or(0);
    // SAFETY: fcntl on a descriptor we own with a valid `flock`; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw const range) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; the result is checked.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Releases both locks [`lock`] took.
fn unlock(file: &File) -> std::io::Result<()> {
    // SAFETY: `flock` is plain data; all zeroes (the whole file from offset 0) is valid.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = i16::try_from(libc::F_UNLCK).unwrap_or(0);
    range.l_whence = i16::try_from(libc::SEEK_SET).unwrap_or(0);
    // SAFETY: fcntl on a descriptor we own with a valid `flock`; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw const range) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: flock on a descriptor we own; the result is checked.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn image(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ember-disk-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Two adjacent regions, so a buffer can straddle them.
    fn two_region_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    #[test]
    fn segments_across_regions_read_and_write_in_order() {
        let content: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
        let path = image("segments", &content);
        let mut disk = DiskFile::open(&path, false, false).unwrap();
        let mem = two_region_memory();
        // 1 KiB straddling the region boundary, then 512 bytes elsewhere.
        let segments = [(GuestAddress(0xfe00), 1024), (GuestAddress(0x2000), 512)];
        disk.transfer(512, &mem, &segments, true).unwrap();
        let mut first = vec![0u8; 1024];
        mem.read_slice(&mut first, GuestAddress(0xfe00)).unwrap();
        assert_eq!(first, content[512..1536]);
        let mut second = vec![0u8; 512];
        mem.read_slice(&mut second, GuestAddress(0x2000)).unwrap();
        assert_eq!(second, content[1536..2048]);

        mem.write_slice(&[0xab; 1024], GuestAddress(0xfe00))
            .unwrap();
        disk.transfer(0, &mem, &segments[..1], false).unwrap();
        let written = std::fs::read(&path).unwrap();
        assert!(written[..1024].iter().all(|&b| b == 0xab));
        assert_eq!(written[1024..], content[1024..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reading_past_the_end_of_the_file_fails() {
        let path = image("short", &[1u8; 1024]);
        let mut disk = DiskFile::open(&path, false, false).unwrap();
        let mem = two_region_memory();
        let err = disk
            .transfer(512, &mem, &[(GuestAddress(0), 1024)], true)
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn buffers_outside_guest_memory_fail_before_any_io() {
        let path = image("outside", &[0u8; 1024]);
        let mut disk = DiskFile::open(&path, false, false).unwrap();
        let mem = two_region_memory();
        assert!(
            disk.transfer(0, &mem, &[(GuestAddress(0x1f000), 8192)], true)
                .is_err()
        );
        std::fs::remove_file(path).unwrap();
    }

    /// Takes an OFD lock on `path` as QEMU does (a read lock on one of its permission bytes,
    /// or a write lock on the whole file) and keeps it while the returned file lives.
    fn ofd_locked(path: &Path, kind: libc::c_int, start: i64, len: i64) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // SAFETY: `flock` is plain data; all zeroes is valid.
        let mut range: libc::flock = unsafe { std::mem::zeroed() };
        range.l_type = i16::try_from(kind).unwrap();
        range.l_start = start;
        range.l_len = len;
        // SAFETY: fcntl on our own descriptor with a valid `flock`.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw const range) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        file
    }

    #[test]
    fn an_image_another_process_locks_like_qemu_is_refused() {
        let path = image("ofd", &[0u8; 1024]);
        {
            let _writer = ofd_locked(&path, libc::F_WRLCK, 0, 0);
            for read_only in [false, true] {
                let e = DiskFile::open(&path, read_only, false).unwrap_err();
                assert!(
                    matches!(e, DiskError::Locked(_)),
                    "read_only {read_only}: {e}"
                );
            }
        }
        {
            // QEMU's shared lock on its "write" permission byte: ember may not write.
            let _qemu = ofd_locked(&path, libc::F_RDLCK, 101, 1);
            let e = DiskFile::open(&path, false, false).unwrap_err();
            assert!(matches!(e, DiskError::Locked(_)), "{e}");
            assert!(DiskFile::open(&path, true, false).is_ok(), "readers share");
        }
        let disk = DiskFile::open(&path, false, false).unwrap();
        // And ember's lock is one QEMU sees: its lock on byte 100 is refused.
        let probe = OpenOptions::new().read(true).open(&path).unwrap();
        // SAFETY: `flock` is plain data; all zeroes is valid.
        let mut range: libc::flock = unsafe { std::mem::zeroed() };
        range.l_type = i16::try_from(libc::F_RDLCK).unwrap();
        range.l_start = 100;
        range.l_len = 1;
        // SAFETY: fcntl on our own descriptor with a valid `flock`.
        let rc = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_SETLK, &raw const range) };
        assert_ne!(rc, 0, "QEMU's lock would be granted");
        drop(disk);
        std::fs::remove_file(path).unwrap();
    }
}
