//! Kernel (ELF vmlinux, bzImage) and initrd loading through linux-loader.
//!
//! Decides the entry point and protocol: PVH when an ELF carries the Xen PVH note (unless told
//! otherwise), else the 64-bit Linux boot protocol. ELF segments are mapped from the page cache
//! where they can be (`mapped`); a bzImage, which decompresses itself, is copied.

pub mod mapped;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::guest_memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::x86_64::boot_params::InitrdRegion;
use crate::arch::x86_64::layout::HIMEM_START;
use crate::arch::x86_64::regs::EntryMode;
use crate::config::BootProtocol;
use mapped::MappedImage;

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
    #[error("the kernel does not fit in {mem_mib} MiB of guest memory: raise memory_mib")]
    KernelTooBig {
        /// Guest memory size.
        mem_mib: u64,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "the initrd ({size_kib} KiB) does not fit in guest memory above the kernel: raise memory_mib"
    )]
    InitrdTooBig {
        /// Size of the initrd.
        size_kib: u64,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64)")]
    BzImageNot64Bit,
    /// PVH was requested but the kernel has no PVH note.
    #[error("the kernel has no PVH entry note: set boot_protocol to linux or auto")]
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
    /// Bytes of it mapped from the page cache rather than copied.
    pub mapped_bytes: u64,
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
        let shared = crate::vstate::memory::memory_fd(mem).is_some();
        let mut image = MappedImage::new(file).map_err(read_err)?.copy_only(shared);
        let result =
            Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        LoadedKernel {
            mapped_bytes: image.mapped_bytes(),
            ..elf_entry(&result, protocol)?
        }
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
        mapped_bytes: 0,
    })
}

fn bzimage_entry(result: &KernelLoaderResult) -> Result<LoadedKernel, LoaderError> {
    let mut hdr = result.setup_header.ok_or(LoaderError::BzImageNot64Bit)?;
    if hdr.version < BOOT_PROTOCOL_2_12 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::BzImageNot64Bit);
    }
    // The boot loader's fields: what the image carries there describes nothing ember loaded (an
    // initrd, a setup_data list), and the header goes into the zero page as it is.
    hdr.ramdisk_image = 0;
    hdr.ramdisk_size = 0;
    hdr.setup_data = 0;
    // The decompressor needs `init_size` bytes from the load address, and the image itself is
    // there too. linux-loader's `kernel_end` is an address, not a length.
    let load = result.kernel_load.raw_value();
    let image_len = result.kernel_end.saturating_sub(load);
    let end = load + u64::from(hdr.init_size).max(image_len);
    Ok(LoadedKernel {
        entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        mode: EntryMode::Linux64,
        setup_header: Some(hdr),
        end,
        mapped_bytes: 0,
    })
}

/// A bzImage carries "HdrS" at 0x202.
fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    Ok(file.read_exact(&mut magic).is_ok() && &magic == b"HdrS")
}

/// Loads the initrd at the top of low memory, page-aligned, above the kernel and high memory's
/// start, and below the kernel's `initrd_addr_max` when its header gives one.
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
    // Never below high memory, where the boot tables go, even when the kernel (an ELF whose
    // segments all lie low) ends below it.
    if start < kernel.end.max(HIMEM_START).next_multiple_of(PAGE_SIZE) {
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

    /// A bzImage with a 64-bit entry, loaded at `code32_start`, whose protected-mode payload
    /// is `payload` bytes and whose decompressor needs `init_size` bytes.
    fn bzimage(code32_start: u32, init_size: u32, payload: usize) -> Vec<u8> {
        const SETUP_SECTS: u8 = 4;
        let mut image = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512 + payload];
        image[0x1f1] = SETUP_SECTS;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
        image[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        image
    }

    /// Found by the `loader` fuzz target (its bzImage seed): the footprint of a bzImage whose
    /// `init_size` is smaller than its load address plus its payload was computed as load +
    /// max(init_size, load + payload), an address mixed up with a length, which put `end` a
    /// whole load address (1 MiB) too high: small kernels were refused as too big for memory
    /// they fit, and the initrd was kept needlessly far from the kernel.
    #[test]
    fn bzimage_footprint_is_the_larger_of_init_size_and_payload_from_the_load_address() {
        let m = mem(4 << 20);
        let cases = [
            (0x10000, 512, 0x11_0000),
            (0x30_0000, 512, 0x40_0000),
            (0, 0x2000, 0x10_2000),
        ];
        for (i, (init_size, payload, end)) in cases.into_iter().enumerate() {
            let path = temp_file(&format!("bz{i}"), &bzimage(0x10_0000, init_size, payload));
            let kernel = load_kernel(&m, &path, BootProtocol::Auto, 4 << 20).unwrap();
            assert_eq!(
                kernel.end, end,
                "init_size {init_size:#x}, payload {payload:#x}"
            );
            assert_eq!(kernel.entry, GuestAddress(0x10_0200));
            std::fs::remove_file(path).unwrap();
        }
        // 1 MiB + 512 bytes fits in 2 MiB of memory; the old footprint (2 MiB + 512) did not.
        let path = temp_file("bz-small", &bzimage(0x10_0000, 0x1000, 512));
        load_kernel(&mem(2 << 20), &path, BootProtocol::Auto, 2 << 20).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    /// Found by the `loader` fuzz target: a bzImage whose header carried a ramdisk address and
    /// size (and a setup_data pointer) kept them in the header ember copies into the zero
    /// page, so a kernel booted without an initrd was told of one at 0x10140000.
    #[test]
    fn bzimage_boot_loader_fields_are_cleared() {
        let mut image = bzimage(0x10_0000, 0x10000, 512);
        image[0x218..0x21c].copy_from_slice(&0x1014_0000u32.to_le_bytes());
        image[0x21c..0x220].copy_from_slice(&0x1000u32.to_le_bytes());
        image[0x250..0x258].copy_from_slice(&0x8000u64.to_le_bytes());
        let path = temp_file("bz-ramdisk", &image);
        let kernel = load_kernel(&mem(4 << 20), &path, BootProtocol::Auto, 4 << 20).unwrap();
        let hdr = kernel.setup_header.unwrap();
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }, {
                hdr.setup_data
            }),
            (0, 0, 0)
        );
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
            mapped_bytes: 0,
        };
        let m = mem(16 << 20);
        let region = load_initrd(&m, &path, &kernel, 16 << 20).unwrap();
        assert_eq!(region.addr.raw_value() % PAGE_SIZE, 0);
        assert!(region.addr.raw_value() + 5000 <= 16 << 20);
        assert_eq!(m.read_obj::<u8>(region.addr).unwrap(), 7);
        std::fs::remove_file(path).unwrap();
    }

    /// Found by the `loader` fuzz target: an ELF kernel whose segments all lie below 1 MiB
    /// (its entry above) ends low, and a large initrd was then placed under 1 MiB (at 0x2f000),
    /// across the EBDA, the ACPI and MP tables written after it, and memory the e820 map
    /// reserves. It must be refused instead.
    #[test]
    fn initrd_never_goes_below_high_memory() {
        let path = temp_file("low-initrd", &vec![1u8; 0x3d_1000]);
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            mode: EntryMode::Linux64,
            setup_header: None,
            end: 0x1_0000,
            mapped_bytes: 0,
        };
        let err = load_initrd(&mem(4 << 20), &path, &kernel, 4 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooBig { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
        // Just fitting above 1 MiB is fine.
        let path = temp_file("high-initrd", &vec![1u8; 3 << 20]);
        let region = load_initrd(&mem(4 << 20), &path, &kernel, 4 << 20).unwrap();
        assert_eq!(region.addr, GuestAddress(HIMEM_START));
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
            mapped_bytes: 0,
        };
        let err = load_initrd(&mem(4 << 20), &path, &kernel, 4 << 20).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooBig { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
