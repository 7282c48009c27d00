//! Kernel (ELF vmlinux, bzImage) and initrd loading through linux-loader.
//!
//! Decides the entry point and protocol: PVH when an ELF carries the Xen PVH note (unless told
//! otherwise), else the 64-bit Linux boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::InitrdRegion;
use crate::arch::x86_64::layout::HIMEM_START;
use crate::arch::x86_64::regs::EntryMode;
use crate::config::BootProtocol;

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags`.
const BOOT_PROTOCOL_2_12: u16 = 0x020c;
/// `xloadflags`: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PAGE_SIZE: u64 = 4096;

/// A kernel that cannot be loaded, or an initrd that cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Opening or reading the file failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{} is not a kernel: expected an ELF vmlinux or a bzImage", .0.display())]
    NotAKernel(PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load the kernel {}", .path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The image extends past guest memory.
    #[error("the kernel does not fit in {mem_mib} MiB of guest memory: raise --memory")]
    KernelTooBig {
        /// Guest memory size.
        mem_mib: u64,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "the initrd ({size_kib} KiB) does not fit in guest memory above the kernel: raise --memory"
    )]
    InitrdTooBig {
        /// Size of the initrd.
        size_kib: u64,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64)")]
    BzImageNot64Bit,
    /// PVH was requested but the kernel has no PVH note.
    #[error("the kernel has no PVH entry note: use --boot-protocol linux or auto")]
    NoPvhEntry,
}

/// Where and how to enter a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// First instruction.
    pub entry: GuestAddress,
    /// 64-bit Linux protocol or PVH.
    pub mode: EntryMode,
    /// The bzImage's setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte past the kernel's memory footprint (including bss or `init_size`).
    pub end: u64,
}

/// Loads `path` into `mem`, below `low_end` (the end of RAM under the MMIO gap).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<LoadedKernel, LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    let too_big = || LoaderError::KernelTooBig {
        mem_mib: low_end >> 20,
    };
    let load_err = |source: linux_loader::loader::Error| match source {
        // Segment writes fail only when they fall outside guest memory.
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        ) => too_big(),
        source => LoaderError::Load {
            path: path.to_owned(),
            source,
        },
    };

    let kernel = if is_elf {
        let result =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        elf_entry(&result, protocol)?
    } else {
        if !is_bzimage(&mut file).map_err(read_err)? {
            return Err(LoaderError::NotAKernel(path.to_owned()));
        }
        if protocol == BootProtocol::Pvh {
            return Err(LoaderError::NoPvhEntry);
        }
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        bzimage_entry(&result)?
    };
    if kernel.end > low_end {
        return Err(too_big());
    }
    Ok(kernel)
}

fn elf_entry(
    result: &KernelLoaderResult,
    protocol: BootProtocol,
) -> Result<LoadedKernel, LoaderError> {
    let pvh = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    let (entry, mode) = match (protocol, pvh) {
        (BootProtocol::Linux, _) | (BootProtocol::Auto, None) => {
            (result.kernel_load, EntryMode::Linux64)
        }
        (BootProtocol::Pvh | BootProtocol::Auto, Some(addr)) => (addr, EntryMode::Pvh),
        (BootProtocol::Pvh, None) => return Err(LoaderError::NoPvhEntry),
    };
    Ok(LoadedKernel {
        entry,
        mode,
        setup_header: None,
        end: result.kernel_end,
    })
}

fn bzimage_entry(result: &KernelLoaderResult) -> Result<LoadedKernel, LoaderError> {
    let hdr = result.setup_header.ok_or(LoaderError::BzImageNot64Bit)?;
    if hdr.version < BOOT_PROTOCOL_2_12 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::BzImageNot64Bit);
    }
    // The decompressor needs `init_size` bytes from the load address.
    let end = result.kernel_load.raw_value() + u64::from(hdr.init_size).max(result.kernel_end);
    Ok(LoadedKernel {
        entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        mode: EntryMode::Linux64,
        setup_header: Some(hdr),
        end,
    })
}

/// A bzImage carries "HdrS" at 0x202.
fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    Ok(file.read_exact(&mut magic).is_ok() && &magic == b"HdrS")
}

/// Loads the initrd at the top of low memory, page-aligned, above the kernel and below the
/// kernel's `initrd_addr_max` when its header gives one.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_end: u64,
) -> Result<InitrdRegion, LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_big = LoaderError::InitrdTooBig {
        size_kib: size.div_ceil(1024),
    };
    let top = match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => low_end.min(u64::from(hdr.initrd_addr_max) + 1),
        _ => low_end,
    };
    let start = top.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel.end.next_multiple_of(PAGE_SIZE) {
        return Err(LoaderError::InitrdTooBig {
            size_kib: size.div_ceil(1024),
        });
    }
    let len = usize::try_from(size).map_err(|_| LoaderError::InitrdTooBig {
        size_kib: size >> 10,
    })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| read_err(std::io::Error::other(e)))?;
    Ok(InitrdRegion {
        addr: GuestAddress(start),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).unwrap())]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ember-loader-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let path = temp_file("text", &[b'x'; 4096]);
        let err = load_kernel(&mem(16 << 20), &path, BootProtocol::Auto, 16 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel(_)), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_memory() {
        let path = temp_file("initrd", &[7u8; 5000]);
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            mode: EntryMode::Linux64,
            setup_header: None,
            end: 2 << 20,
        };
        let m = mem(16 << 20);
        let region = load_initrd(&m, &path, &kernel, 16 << 20).unwrap();
        assert_eq!(region.addr.raw_value() % PAGE_SIZE, 0);
        assert!(region.addr.raw_value() + 5000 <= 16 << 20);
        assert_eq!(m.read_obj::<u8>(region.addr).unwrap(), 7);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn initrd_overlapping_the_kernel_is_refused() {
        let path = temp_file("big-initrd", &vec![0u8; 3 << 20]);
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            mode: EntryMode::Linux64,
            setup_header: None,
            end: 2 << 20,
        };
        let err = load_initrd(&mem(4 << 20), &path, &kernel, 4 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooBig { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
