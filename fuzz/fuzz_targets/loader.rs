//! Fuzzes what ember does with the kernel a user gives it: the input is a kernel image (an ELF
//! vmlinux, a bzImage, or anything) plus the rest of a boot (guest memory size, boot protocol,
//! an initrd's size, vCPUs, virtio devices and the command line), and the boot-time steps of
//! `vmm::builder` run on it in order: `loader::load_kernel`, `loader::load_initrd`, the command
//! line with its `virtio_mmio.device=` entries, the MP and ACPI tables, then the zero page or
//! the PVH start info.
//!
//! A bug is a panic, a hang, or a result that is not what it claims: a kernel whose footprint
//! (`end`) passes the end of low memory or does not match the bzImage's `init_size` and payload;
//! an entry mode or setup header that does not match the image and the protocol asked for; an
//! initrd placed unaligned, over the kernel, below high memory (over the boot tables), past
//! the kernel's `initrd_addr_max` or the end of memory, or with other bytes than the file's;
//! boot structures that cannot be written for a kernel that loaded, or that do not say where
//! the command line and initrd are.

#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember::BootProtocol;
use ember::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use ember::arch::x86_64::regs::EntryMode;
use ember::arch::x86_64::{acpi, boot_params, low_memory_end, memory_ranges, mptable};
use ember::loader::{self, LoaderError};
use ember::vstate::memory::create_guest_memory;
use libfuzzer_sys::fuzz_target;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params as BootParams;
use vm_memory::{Address, Bytes, GuestAddress};

const PAGE_SIZE: u64 = 4096;
/// What marks the first and last bytes of the initrd.
const MARK: &[u8; 8] = b"INITRD!!";

fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("ember-fuzz-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    dir.join(name)
}

fuzz_target!(|data: &[u8]| {
    // Layout: flags, initrd size (2 bytes, in KiB), vCPUs, virtio devices, command-line length
    // (2 bytes), the command line, then the kernel image.
    let [flags, i0, i1, vcpus, devices, c0, c1, rest @ ..] = data else {
        return;
    };
    let protocol = match flags & 3 {
        1 => BootProtocol::Linux,
        2 => BootProtocol::Pvh,
        _ => BootProtocol::Auto,
    };
    let mem_mib = 2 + u64::from(flags >> 3) % 15;
    let initrd_size = (flags & 4 != 0).then(|| u64::from(u16::from_le_bytes([*i0, *i1])) * 256);
    let vcpus = vcpus % 254 + 1;
    let devices = usize::from(devices % 20);
    let cmdline_len = usize::from(u16::from_le_bytes([*c0, *c1])) % (CMDLINE_MAX_SIZE + 64);
    let (cmdline, image) = rest.split_at(rest.len().min(cmdline_len));
    let cmdline = String::from_utf8_lossy(cmdline);

    let kernel_path = scratch("kernel");
    std::fs::write(&kernel_path, image).unwrap();
    let mem_bytes = mem_mib << 20;
    let mem = create_guest_memory(mem_mib).unwrap();
    let low_end = low_memory_end(mem_bytes);

    let kernel = match loader::load_kernel(&mem, &kernel_path, protocol, low_end) {
        Ok(kernel) => kernel,
        Err(LoaderError::Read { .. }) => panic!("the kernel file is there to read"),
        Err(_) => return,
    };
    assert!(
        kernel.end <= low_end,
        "kernel ends at {:#x} past {low_end:#x}",
        kernel.end
    );
    let is_elf = image.starts_with(b"\x7fELF");
    match kernel.setup_header {
        Some(hdr) => {
            assert!(!is_elf, "an ELF with a setup header");
            assert!(protocol != BootProtocol::Pvh, "a bzImage booted with PVH");
            assert!(matches!(kernel.mode, EntryMode::Linux64));
            let load = u64::from(hdr.code32_start);
            assert!(load >= HIMEM_START);
            assert_eq!(
                kernel.entry.raw_value(),
                load + 0x200,
                "bzImage 64-bit entry"
            );
            let setup_sects = if hdr.setup_sects == 0 {
                4
            } else {
                u64::from(hdr.setup_sects)
            };
            let payload = image.len() as u64 - (setup_sects + 1) * 512;
            let footprint = u64::from(hdr.init_size).max(payload);
            assert_eq!(
                kernel.end,
                load + footprint,
                "bzImage footprint (load {load:#x})"
            );
        }
        None => {
            assert!(is_elf, "a bzImage without its setup header");
            match kernel.mode {
                EntryMode::Pvh => assert!(protocol != BootProtocol::Linux, "PVH when told linux"),
                EntryMode::Linux64 => assert!(protocol != BootProtocol::Pvh, "linux when told PVH"),
            }
        }
    }

    let initrd = initrd_size.and_then(|size| {
        let path = scratch("initrd");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        if size >= MARK.len() as u64 {
            file.write_all_at(MARK, 0).unwrap();
            file.write_all_at(MARK, size - MARK.len() as u64).unwrap();
        }
        drop(file);
        let region = match loader::load_initrd(&mem, &path, &kernel, low_end) {
            Ok(region) => region,
            Err(LoaderError::InitrdTooBig { .. }) => return None,
            Err(e) => panic!("initrd of {size} bytes: {e}"),
        };
        let start = region.addr.raw_value();
        assert_eq!(region.size, size);
        assert_eq!(start % PAGE_SIZE, 0, "initrd at {start:#x}");
        assert!(
            start >= kernel.end,
            "initrd at {start:#x} over the kernel (end {:#x})",
            kernel.end
        );
        assert!(
            start >= HIMEM_START,
            "initrd at {start:#x} over the boot tables"
        );
        assert!(start + size <= low_end, "initrd past low memory");
        if let Some(hdr) = kernel.setup_header {
            if hdr.initrd_addr_max != 0 {
                assert!(
                    start + size <= u64::from(hdr.initrd_addr_max) + 1,
                    "past initrd_addr_max"
                );
            }
        }
        if size >= MARK.len() as u64 {
            let mut mark = [0u8; 8];
            mem.read_slice(&mut mark, region.addr).unwrap();
            assert_eq!(&mark, MARK, "initrd start");
            mem.read_slice(&mut mark, region.addr.unchecked_add(size - 8))
                .unwrap();
            assert_eq!(&mark, MARK, "initrd end");
        }
        Some(region)
    });

    // The command line as the builder makes it.
    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
    if !cmdline.trim().is_empty() && line.insert_str(cmdline.trim()).is_err() {
        return;
    }
    if ember::vmm::virtio::add_to_cmdline(&mut line, devices).is_err() {
        return;
    }
    let Ok(line) = line.as_cstring() else { return };
    let line = line.as_bytes_with_nul();
    assert!(line.len() <= CMDLINE_MAX_SIZE);
    mem.write_slice(line, GuestAddress(CMDLINE_START)).unwrap();

    let e820 = boot_params::e820_map(&memory_ranges(mem_bytes));
    mptable::setup_mptable(&mem, vcpus).unwrap();
    let slots: Vec<(u64, u32)> = (0..devices).map(ember::vmm::virtio::slot).collect();
    let rsdp = acpi::setup_acpi(&mem, vcpus, &slots).unwrap();
    match kernel.mode {
        EntryMode::Linux64 => {
            boot_params::write_zero_page(
                &mem,
                kernel.setup_header,
                line.len(),
                initrd,
                &e820,
                rsdp,
            )
            .unwrap();
            let params: BootParams = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
            assert_eq!(u64::from(params.hdr.cmd_line_ptr), CMDLINE_START);
            assert_eq!(params.hdr.cmdline_size as usize, line.len());
            let (image, size) = initrd.map_or((0, 0), |r| (r.addr.raw_value(), r.size));
            assert_eq!(u64::from(params.hdr.ramdisk_image), image);
            assert_eq!(u64::from(params.hdr.ramdisk_size), size);
            assert_eq!(
                { params.hdr.setup_data },
                0,
                "a setup_data list ember never wrote"
            );
        }
        EntryMode::Pvh => {
            boot_params::write_pvh_start_info(&mem, initrd, &e820, rsdp).unwrap();
        }
    }
    let mut back = vec![0u8; line.len()];
    mem.read_slice(&mut back, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(
        back, line,
        "the command line was overwritten by the boot tables"
    );
});
