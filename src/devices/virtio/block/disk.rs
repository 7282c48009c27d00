//! The host side of a virtio-blk device: an image file, locked against a second writer, read
//! and written at sector offsets straight into guest memory.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes per sector in the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

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
    /// Opens `path` (with O_DIRECT when `direct`) and takes an advisory lock: exclusive when
    /// writable, shared when read-only, so no two VMMs write one image at once.
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
        let mode = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; the result is checked.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => DiskError::Locked(owned()),
                _ => DiskError::Open(owned(), e),
            });
        }
        Ok(DiskFile {
            file,
            sectors: meta.len() / SECTOR_SIZE,
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

    /// Reads `len` bytes at byte `offset` of the image into guest memory at `addr`.
    pub fn read_to_guest(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        mem.read_exact_volatile_from(addr, &mut self.file, len)
            .map_err(std::io::Error::other)
    }

    /// Writes `len` bytes of guest memory at `addr` to byte `offset` of the image.
    pub fn write_from_guest(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        mem.write_all_volatile_to(addr, &mut self.file, len)
            .map_err(std::io::Error::other)
    }

    /// Puts every completed write on stable storage.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
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
