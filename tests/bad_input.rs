//! Bad input: one clear line on stderr naming the problem and the fix, exit code 1, no panic.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::{ember, kvm_available, test_guest};

struct Failure {
    code: Option<i32>,
    stderr: String,
}

fn ember_run(args: &[&str]) -> Failure {
    let out = Command::new(ember())
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    Failure {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exit 1, exactly one line, starting "ember: ", containing every `needle`, no panic.
fn assert_one_line_error(f: &Failure, needles: &[&str]) {
    assert_eq!(f.code, Some(1), "stderr: {}", f.stderr);
    assert_eq!(
        f.stderr.lines().count(),
        1,
        "one line expected: {}",
        f.stderr
    );
    assert!(f.stderr.starts_with("ember: "), "{}", f.stderr);
    assert!(
        !f.stderr.contains("panicked") && !f.stderr.contains("backtrace"),
        "{}",
        f.stderr
    );
    for needle in needles {
        assert!(f.stderr.contains(needle), "{needle:?} not in: {}", f.stderr);
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ember-bad-{}-{name}", std::process::id()))
}

#[test]
fn missing_kernel() {
    let f = ember_run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&f, &["/nonexistent/vmlinux", "does not exist"]);
}

#[test]
fn missing_initrd() {
    let f = ember_run(&[
        "--kernel",
        "/proc/self/exe",
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_one_line_error(&f, &["initrd", "/nonexistent/initrd", "does not exist"]);
}

#[test]
fn directory_as_kernel() {
    let f = ember_run(&["--kernel", "/tmp"]);
    assert_one_line_error(&f, &["/tmp", "is a directory"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    if !kvm_available() {
        return;
    }
    let path = temp_path("text");
    std::fs::write(&path, "not a kernel\n".repeat(100)).unwrap();
    let f = ember_run(&["--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&f, &["is not a kernel", "ELF vmlinux or a bzImage"]);
    std::fs::remove_file(path).unwrap();
}

/// A minimal x86_64 ELF with one PT_LOAD segment of `filesz` bytes at 1 MiB.
fn elf_with_segment(filesz: u64) -> Vec<u8> {
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut elf[64..];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&0u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&filesz.to_le_bytes());
    ph[40..48].copy_from_slice(&filesz.to_le_bytes());
    elf.resize(usize::try_from(filesz).unwrap().max(120), 0);
    elf
}

#[test]
fn kernel_too_big_for_memory() {
    if !kvm_available() {
        return;
    }
    let path = temp_path("big-kernel");
    std::fs::write(&path, elf_with_segment(8 << 20)).unwrap();
    let f = ember_run(&["--kernel", path.to_str().unwrap(), "--memory", "4"]);
    assert_one_line_error(&f, &["does not fit in 4 MiB", "--memory"]);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn initrd_too_big_for_memory() {
    if !kvm_available() {
        return;
    }
    let path = temp_path("big-initrd");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&vec![0u8; 6 << 20]).unwrap();
    let f = ember_run(&[
        "--kernel",
        test_guest().to_str().unwrap(),
        "--initrd",
        path.to_str().unwrap(),
        "--memory",
        "4",
    ]);
    assert_one_line_error(&f, &["initrd", "does not fit", "--memory"]);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn zero_memory() {
    let f = ember_run(&["--kernel", "/proc/self/exe", "--memory", "0"]);
    assert_one_line_error(&f, &["0 MiB", "memory_mib to 2 or more", "(--memory)"]);
}

#[test]
fn zero_cpus() {
    let f = ember_run(&["--kernel", "/proc/self/exe", "--cpus", "0"]);
    assert_one_line_error(&f, &["at least 1 vCPU", "--cpus"]);
}

#[test]
fn more_cpus_than_kvm_allows() {
    if !kvm_available() {
        return;
    }
    let f = ember_run(&["--kernel", test_guest().to_str().unwrap(), "--cpus", "255"]);
    assert_one_line_error(&f, &["255 vCPUs", "lower vcpus (--cpus)"]);
}

/// Runs `ember run` as the unprivileged user `nobody`.
fn ember_run_as_nobody(args: &[&str]) -> Failure {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(ember())
        .arg("run")
        .args(args)
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    Failure {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn no_permission_on_dev_kvm() {
    if !kvm_available() {
        return;
    }
    // /dev/kvm is root-only (0600) on this machine; nobody cannot open it. The kernel must be
    // readable by nobody, so copy the guest somewhere world-readable.
    let kernel = temp_path("guest-for-nobody");
    std::fs::copy(test_guest(), &kernel).unwrap();
    let f = ember_run_as_nobody(&["--kernel", kernel.to_str().unwrap()]);
    assert_one_line_error(&f, &["no permission to open /dev/kvm", "kvm group"]);
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn unreadable_kernel() {
    let kernel = temp_path("private-kernel");
    std::fs::write(&kernel, b"secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = ember_run_as_nobody(&["--kernel", kernel.to_str().unwrap()]);
    assert_one_line_error(&f, &["cannot read kernel file", "Permission denied"]);
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn bad_serial_value_is_a_usage_error() {
    let out = Command::new(ember())
        .args(["run", "--kernel", "/proc/self/exe", "--serial", "tty"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expected stdio, none or file=PATH"),
        "{stderr}"
    );
}

#[test]
fn missing_disk_image() {
    let f = ember_run(&[
        "--kernel",
        "/proc/self/exe",
        "--disk",
        "path=/nonexistent/disk.img",
    ]);
    assert_one_line_error(&f, &["disk image /nonexistent/disk.img does not exist"]);
}

#[test]
fn directory_as_disk_image() {
    let f = ember_run(&["--kernel", "/proc/self/exe", "--rootfs", "/tmp"]);
    assert_one_line_error(&f, &["disk image /tmp is a directory"]);
}

#[test]
fn disk_image_locked_by_another_vmm() {
    if !kvm_available() {
        return;
    }
    let image = temp_path("locked.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let guest = test_guest().to_str().unwrap();
    let mut first = common::Ember::spawn(&[
        "run",
        "--kernel",
        guest,
        "--disk",
        &format!("path={}", image.display()),
        "--cmdline",
        "guest.action=halt",
    ]);
    first.expect_line(common::GUEST_TIMEOUT, |l| l == "action=halt");
    let f = ember_run(&[
        "--kernel",
        guest,
        "--disk",
        &format!("path={}", image.display()),
    ]);
    assert_one_line_error(
        &f,
        &["is in use by another process (locked)", "readonly=on"],
    );
    // A read-only user is refused too while a writer holds the image.
    let f = ember_run(&[
        "--kernel",
        guest,
        "--disk",
        &format!("path={},readonly=on", image.display()),
    ]);
    assert_one_line_error(&f, &["locked"]);
    drop(first);
    std::fs::remove_file(image).unwrap();
}

#[test]
fn read_only_image_without_readonly_on() {
    // As nobody, a root-owned 0644 image can be read but not written.
    let image = temp_path("ro.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let kernel = temp_path("guest-for-ro");
    std::fs::copy("/proc/self/exe", &kernel).unwrap();
    let f = ember_run_as_nobody(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &format!("path={}", image.display()),
    ]);
    assert_one_line_error(&f, &["cannot be opened for writing", "readonly=on"]);
    std::fs::remove_file(image).unwrap();
    std::fs::remove_file(kernel).unwrap();
}

#[test]
fn bad_disk_spec_is_a_usage_error() {
    let out = Command::new(ember())
        .args(["run", "--kernel", "/proc/self/exe", "--disk", "file=/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected path=FILE"));
}

#[test]
fn tap_name_too_long() {
    let f = ember_run(&[
        "--kernel",
        "/proc/self/exe",
        "--net",
        "tap=a-tap-name-over-15",
    ]);
    assert_one_line_error(&f, &["a-tap-name-over-15", "1 to 15 characters"]);
}

#[test]
fn bad_mac_addresses() {
    for (mac, needle) in [
        ("06:00:zz:00:00:01", "is not a MAC address"),
        ("06:00:00:00:01", "is not a MAC address"),
        ("01:00:5e:00:00:01", "group (multicast)"),
    ] {
        let spec = format!("tap=tap0,mac={mac}");
        let f = ember_run(&["--kernel", "/proc/self/exe", "--net", &spec]);
        assert_one_line_error(&f, &[mac, needle]);
    }
}

#[test]
fn the_same_tap_twice() {
    let f = ember_run(&[
        "--kernel",
        "/proc/self/exe",
        "--net",
        "tap=tap0",
        "--net",
        "tap=tap0",
    ]);
    assert_one_line_error(&f, &["TAP tap0 is given twice"]);
}

#[test]
fn tap_held_by_another_process() {
    if !kvm_available() {
        return;
    }
    let ns = common::netns::NetNs::new("busy");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    // Attach to the TAP from this process, as another VMM would.
    let holder = ns.run(|| {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: ifreq is plain data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"tap0") {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: TUNSETIFF reads the ifreq we pass; the result is checked.
        let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    });
    let out = ns
        .command(ember())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--net", "tap=tap0"])
        .output()
        .unwrap();
    let f = Failure {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_one_line_error(&f, &["TAP tap0 is in use by another process"]);
    drop(holder);
}

#[test]
fn missing_tap_without_the_privilege_to_create_it() {
    if !kvm_available() {
        return;
    }
    let kernel = temp_path("guest-for-nobody-net");
    std::fs::copy(test_guest(), &kernel).unwrap();
    let ns = common::netns::NetNs::new("noperm");
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(ember())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "tap=tap7",
        ])
        .output()
        .unwrap();
    let f = Failure {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // Where /dev/net/tun is 0600 (as here) opening it fails; elsewhere creating the TAP does.
    assert_one_line_error(&f, &["no permission", "run ember as root"]);
    if !f.stderr.contains("/dev/net/tun") {
        assert_one_line_error(&f, &["TAP tap7", "ip tuntap add tap7"]);
    }
    std::fs::remove_file(kernel).unwrap();
}
