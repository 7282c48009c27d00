//! Real Linux kernels under ember: ours (ELF via PVH, and bzImage via the 64-bit protocol) and
//! Debian's stock cloud kernel print the command line and e820 map ember gave them and find both
//! vCPUs in the ACPI MADT (ours also finds the MP table, but with ACPI it takes the MADT);
//! the PVM-quirks kernel reaches busybox init and powers off; Linux binds vmgenid, the GED and
//! virtio-rng, and each clone of a snapshot takes the GED interrupt. On a host with hardware
//! KVM (no `kvm_pvm`), the normal kernel also boots to userspace; on a PVM host, where it
//! cannot, ember says so and names the pvm build. A test the host cannot run prints `SKIPPED <test>: <why>`.
//!
//! The guests come from `resources/` (built once, cached in `~/.cache/ember`, rebuilt when
//! their inputs change). Linux runs under instruction emulation on PVM hosts, so one boot keeps
//! a core busy: the tests take turns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{Ember, kvm_available};

/// One Linux boot at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn take_turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Reports `test` as skipped where `cargo test` shows it: the harness captures `eprintln!` of
/// passing tests, not direct writes to stderr. The harness has no "skipped" state, so the test
/// still counts as passed; this line is the record that it tested nothing.
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

fn cache() -> PathBuf {
    match std::env::var_os("EMBER_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ember"),
    }
}

/// Runs `resources/<script> <args>` (idempotent: it rebuilds only when inputs changed) and
/// returns `~/.cache/ember/guest/<file>`.
fn artifact(script: &str, args: &[&str], file: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _lock = BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("resources")
        .join(script);
    let status = Command::new(&script_path)
        .args(args)
        .status()
        .expect("cannot run a resources/ script");
    assert!(
        status.success(),
        "{} {args:?} failed",
        script_path.display()
    );
    let path = cache().join("guest").join(file);
    assert!(
        path.is_file(),
        "{} did not produce {}",
        script,
        path.display()
    );
    path
}

fn kernel_line(line: &str) -> &str {
    // "[    0.000000] Command line: ..." -> "Command line: ..."
    match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((_, rest)) => rest,
        None => line,
    }
}

const MEMORY_MIB: u64 = 256;

/// How a kernel finds the vCPUs, and the line it prints when it does.
enum CpuTable {
    /// Kernels with ACPI, like ours and Debian's (which lacks MP-table support).
    Madt,
}

/// Boots `kernel` with 2 vCPUs until Linux has printed the command line, the e820 map and found
/// both CPUs in `table`; checks them against what ember passed, then stops the VM.
fn check_early_boot(kernel: &Path, protocol: &str, table: CpuTable, timeout: Duration) {
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial reboot=k panic=1 ember.test={}",
        std::process::id()
    );
    let mut ember = Ember::spawn(&[
        "--log-level".as_ref(),
        "info".as_ref(),
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--memory".as_ref(),
        MEMORY_MIB.to_string().as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--boot-protocol".as_ref(),
        protocol.as_ref(),
    ]);
    let expected_cmdline = format!("Command line: {cmdline}");
    ember.expect_line(timeout, |l| kernel_line(l) == expected_cmdline);
    match table {
        CpuTable::Madt => {
            ember.expect_line(timeout, |l| {
                kernel_line(l).starts_with("ACPI: RSDP 0x00000000000E")
            });
            ember.expect_line(timeout, |l| {
                kernel_line(l) == "ACPI: Using ACPI (MADT) for SMP configuration information"
            });
        }
    }
    ember.expect_line(timeout, |l| {
        kernel_line(l).starts_with("smpboot: Allowing 2 CPUs")
    });
    let out = ember.stop(Duration::from_secs(30));

    // An ELF vmlinux's segments come from the page cache; a bzImage decompresses itself.
    let mapped_kib: u64 = out
        .stderr
        .lines()
        .find_map(|l| {
            l.split_once("kernel loaded in ")?
                .1
                .split_once(" us (")?
                .1
                .split_once(" KiB mapped")
        })
        .and_then(|(kib, _)| kib.parse().ok())
        .unwrap_or_else(|| panic!("no kernel load line: {}", out.stderr));
    if kernel.file_name() == Some("vmlinux".as_ref()) {
        assert!(
            mapped_kib > 8 << 10,
            "vmlinux mapped from the page cache: {mapped_kib} KiB"
        );
    } else {
        assert_eq!(mapped_kib, 0, "a bzImage is copied");
    }

    let e820: Vec<&str> = out
        .stdout
        .iter()
        .filter_map(|l| kernel_line(l).strip_prefix("BIOS-e820: "))
        .collect();
    let usable: Vec<&str> = e820
        .iter()
        .copied()
        .filter(|e| e.ends_with(" usable"))
        .collect();
    let top = (MEMORY_MIB << 20) - 1;
    assert_eq!(
        usable,
        vec![
            "[mem 0x0000000000000000-0x000000000009fbff] usable".to_owned(),
            format!("[mem 0x0000000000100000-{top:#018x}] usable"),
        ],
        "usable RAM as ember described it; e820 seen: {e820:?}"
    );
    // Our reserved BIOS area (ACPI and MP tables); PVH Linux also reserves the ISA hole
    // around it, which merges with ours.
    assert!(
        e820.iter()
            .any(|e| e.ends_with("-0x00000000000fffff] reserved")),
        "the BIOS area is reserved: {e820:?}"
    );
}

#[test]
fn our_kernel_elf_boots_through_pvh_with_our_cmdline_e820_and_madt() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["microvm"], "microvm/vmlinux");
    let _turn = take_turn();
    check_early_boot(&kernel, "auto", CpuTable::Madt, Duration::from_secs(120));
}

#[test]
fn our_kernel_elf_boots_through_the_64_bit_protocol() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["microvm"], "microvm/vmlinux");
    let _turn = take_turn();
    check_early_boot(&kernel, "linux", CpuTable::Madt, Duration::from_secs(120));
}

#[test]
fn our_kernel_bzimage_boots_through_the_64_bit_protocol() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["microvm"], "microvm/bzImage");
    let _turn = take_turn();
    // The decompressor runs emulated on PVM hosts.
    check_early_boot(&kernel, "auto", CpuTable::Madt, Duration::from_secs(600));
}

#[test]
fn debian_stock_kernel_boots_with_our_cmdline_e820_and_finds_both_vcpus_by_acpi() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("fetch-debian-kernel.sh", &[], "debian/vmlinuz");
    let _turn = take_turn();
    check_early_boot(&kernel, "auto", CpuTable::Madt, Duration::from_secs(900));
}

/// Boots `kernel` with the busybox initramfs; init prints its marker and powers off.
fn boot_to_userspace(kernel: &Path, cmdline: &str, timeout: Duration) {
    let initrd = artifact("build-rootfs.sh", &[], "initramfs.cpio");
    let mut ember = Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--memory".as_ref(),
        "128".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    ember.expect_line(timeout, |l| l.contains("EMBER-GUEST-READY"));
    let out = ember.finish(timeout);
    out.assert_success();
    assert!(
        out.stdout
            .iter()
            .any(|l| l.contains("EMBER-GUEST-POWEROFF")),
        "{:?}",
        out.stdout
    );
}

#[test]
fn pvm_quirks_kernel_reaches_busybox_init_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["pvm"], "pvm/vmlinux");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-pvm.txt");
    let cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    let _turn = take_turn();
    boot_to_userspace(&kernel, cmdline.trim(), Duration::from_secs(300));
}

#[test]
fn our_kernel_reaches_userspace_on_hardware_kvm() {
    if !kvm_available() {
        return;
    }
    if is_pvm_host() {
        // There the kernel's ring-0 code is emulated and stops at an instruction the emulator
        // lacks (resources/README.md); the PVM-quirks build covers userspace instead, and
        // `a_stock_kernel_on_a_pvm_host_is_said_to_need_the_pvm_build` what happens here.
        skipped(
            "our_kernel_reaches_userspace_on_hardware_kvm",
            "a PVM host cannot run the unpatched kernel",
        );
        return;
    }
    let kernel = artifact("build-kernel.sh", &["microvm"], "microvm/vmlinux");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-microvm.txt");
    let cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    let _turn = take_turn();
    boot_to_userspace(&kernel, cmdline.trim(), Duration::from_secs(60));
}

/// The README's first command on a PVM host with the wrong build: ember must say why the guest
/// died and name the build that works.
#[test]
fn a_stock_kernel_on_a_pvm_host_is_said_to_need_the_pvm_build() {
    if !kvm_available() {
        return;
    }
    if !is_pvm_host() {
        skipped(
            "a_stock_kernel_on_a_pvm_host_is_said_to_need_the_pvm_build",
            "not a PVM host",
        );
        return;
    }
    let kernel = artifact("build-kernel.sh", &["microvm"], "microvm/vmlinux");
    let initrd = artifact("build-rootfs.sh", &[], "initramfs.cpio");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-microvm.txt");
    let cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    let _turn = take_turn();
    let ember = Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--cmdline".as_ref(),
        cmdline.trim().as_ref(),
    ]);
    let out = ember.finish(Duration::from_secs(300));
    assert_eq!(
        out.status.code(),
        Some(3),
        "a guest failure: {}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines.contains(
            &"ember: KVM could not emulate a guest instruction on vCPU 0 (internal error 1)"
        ),
        "{}",
        out.stderr
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ember: this host runs KVM through PVM")
                && l.contains("resources/build-kernel.sh pvm")),
        "{}",
        out.stderr
    );
}

/// Copies the cached rootfs image to a private file the test may modify.
fn scratch_rootfs(name: &str) -> PathBuf {
    let image = artifact("build-rootfs.sh", &[], "rootfs.ext4");
    let copy = std::env::temp_dir().join(format!("ember-{name}-{}.ext4", std::process::id()));
    std::fs::copy(image, &copy).unwrap();
    copy
}

#[test]
fn root_on_virtio_blk_keeps_what_the_guest_wrote_and_a_second_disk_shows_its_id() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["pvm"], "pvm/vmlinux");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-pvm.txt");
    let base_cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    let root = scratch_rootfs("root");
    let data = scratch_rootfs("data");
    let proof = format!("written-by-the-guest-{}", std::process::id());
    let cmdline = format!(
        "{} ember.cmd=\"echo {proof} > /proof; sync; cat /sys/block/vdb/serial; echo\"",
        base_cmdline.trim()
    );
    let data_spec = format!("path={},readonly=on,id=ember-data-7", data.display());
    let _turn = take_turn();
    let mut ember = Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--rootfs".as_ref(),
        root.as_os_str(),
        "--disk".as_ref(),
        data_spec.as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    let timeout = Duration::from_secs(300);
    ember.expect_line(timeout, |l| l.contains("EMBER-GUEST-READY"));
    ember.expect_line(timeout, |l| l.trim() == "ember-data-7");
    ember.expect_line(timeout, |l| l.contains("EMBER-CMD-EXIT=0"));
    ember.finish(timeout).assert_success();

    // The guest remounted its root read-only before the power-off: the journal is checkpointed, so
    // debugfs (which does not replay it) sees the file.
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&root)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout);
    assert!(
        !header.contains("needs_recovery"),
        "the root image was left with an unreplayed journal:\n{header}"
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /proof"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        proof,
        "the file is in the image"
    );
    for image in [&root, &data] {
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        std::fs::remove_file(image).unwrap();
    }
}

#[test]
fn linux_takes_its_address_from_ip_and_pings_the_host_and_back() {
    if !kvm_available() {
        return;
    }
    let kernel = artifact("build-kernel.sh", &["pvm"], "pvm/vmlinux");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-pvm.txt");
    let base_cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    let root = scratch_rootfs("net");
    let ns = common::netns::NetNs::new("linux");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    // busybox ping -c 1 needs no timer (the kernel is built without POSIX timers); `read`
    // keeps the guest up, answering the host's pings, until the test sends a line.
    let cmdline = format!(
        "{} ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off ember.cmd=\"ping -c 1 10.0.0.1 && echo PING-OK && read line\"",
        base_cmdline.trim()
    );
    let _turn = take_turn();
    let mut command = ns.command(common::ember());
    command
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&root)
        .args(["--net", "tap=tap0", "--cmdline", &cmdline]);
    let mut ember = Ember::spawn_command(command);
    let timeout = Duration::from_secs(300);
    ember.expect_line(timeout, |l| l.contains("EMBER-GUEST-READY"));
    ember.expect_line(timeout, |l| l.contains("PING-OK"));
    let out = ns
        .command("ping")
        .args(["-c", "3", "-W", "30", "10.0.0.2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the host's ping of the guest: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ember.send(b"\n");
    ember.expect_line(timeout, |l| l.contains("EMBER-CMD-EXIT=0"));
    ember.finish(timeout).assert_success();
    std::fs::remove_file(root).unwrap();
}

/// The kernel this host boots to userspace, with its command line: the PVM-quirks build on PVM
/// hosts, ours elsewhere.
fn userspace_kernel() -> (PathBuf, String) {
    let (variant, cmdline) = if is_pvm_host() {
        ("pvm", "resources/cmdline-pvm.txt")
    } else {
        ("microvm", "resources/cmdline-microvm.txt")
    };
    let kernel = artifact("build-kernel.sh", &[variant], &format!("{variant}/vmlinux"));
    let cmdline = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(cmdline))
        .unwrap()
        .trim()
        .to_owned();
    (kernel, cmdline)
}

/// Console lines of an embedded VM, with a deadline per wait.
struct Console {
    lines: std::sync::mpsc::Receiver<String>,
    input: std::fs::File,
}

impl Console {
    fn of(vm: &mut ember::Vm) -> Console {
        use std::io::BufRead;
        let console = vm.take_console().expect("a pipe console");
        let (tx, lines) = std::sync::mpsc::channel();
        let output = console.output;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(output).lines() {
                let Ok(line) = line else { return };
                if tx.send(line.trim_end().to_owned()).is_err() {
                    return;
                }
            }
        });
        Console {
            lines,
            input: console.input,
        }
    }

    fn send(&mut self, text: &str) {
        use std::io::Write;
        self.input.write_all(text.as_bytes()).unwrap();
    }

    /// The first output line (not the shell's echo of a command) that starts with `prefix`,
    /// without it.
    fn value(&self, timeout: Duration, prefix: &str) -> String {
        let start = std::time::Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line[prefix.len()..].to_owned(),
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "no {prefix:?} line ({e}); last lines {:?}",
                    seen.iter().rev().take(20).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn expect(&self, timeout: Duration, wanted: &str) -> Duration {
        let start = std::time::Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(wanted) && !line.contains("echo ") => {
                    return start.elapsed();
                }
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "no {wanted:?} ({e}); last lines {:?}",
                    seen.iter().rev().take(20).collect::<Vec<_>>()
                ),
            }
        }
    }
}

/// Linux booted to its shell once, snapshotted, and restored twice in this process and once in
/// a new `ember run --restore`: the restored guest runs a command at once instead of booting
/// again (tens of seconds on PVM hosts): its tty echoes the command within a second of the new
/// process's spawn, and the output follows within a second plus what one command costs in the
/// booted guest (on PVM hosts, where the guest's kernel code is emulated, about a second).
#[test]
fn linux_booted_once_runs_commands_right_after_a_restore() {
    if !kvm_available() {
        return;
    }
    let (kernel, cmdline) = userspace_kernel();
    let initrd = artifact("build-rootfs.sh", &[], "initramfs.cpio");
    let _turn = take_turn();
    let mut config = ember::VmConfig::new(&kernel);
    config.initrd = Some(initrd);
    config.cmdline = format!("{cmdline} ember.shell");
    config.console = ember::ConsoleConfig::Pipe;
    config.memory_mib = 256;
    let mut vm = ember::Vm::start(&config).unwrap();
    let mut console = Console::of(&mut vm);
    console.expect(Duration::from_secs(300), "EMBER-GUEST-READY");
    console.send("echo booted-$((6*7))\n");
    console.expect(Duration::from_secs(120), "booted-42");
    // What one command costs in this guest on this host (a second or so on PVM hosts, where
    // the guest's kernel code is emulated): the restored guest's commands cost the same.
    console.send("echo steady-$((6*7))\n");
    let steady = console.expect(Duration::from_secs(120), "steady-42");
    eprintln!(
        "booted guest: a command answered in {} ms",
        steady.as_millis()
    );
    vm.pause().unwrap();
    let dir = std::env::temp_dir().join(format!("ember-linux-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let paths = ember::vmm::persist::SnapshotPaths::in_dir(&dir);
    vm.snapshot(&config, &paths).unwrap();
    vm.stop();

    for round in 0..2 {
        let (mut vm, _) = ember::Vm::restore(
            &paths,
            |c| {
                c.console = ember::ConsoleConfig::Pipe;
                Ok(())
            },
            true,
        )
        .unwrap();
        let mut console = Console::of(&mut vm);
        console.send(&format!("echo restored-{round}-$((6*7))\n"));
        let took = console.expect(Duration::from_secs(60), &format!("restored-{round}-42"));
        eprintln!(
            "restore {round}: a command answered {} ms after the restore",
            took.as_millis()
        );
        vm.stop();
    }

    // A new process, as a sandbox service starts each VM: `ember run --restore`, timed from
    // the spawn to the terminal's echo of the command line (the restored kernel running its
    // tty) and to the command's output.
    let start = std::time::Instant::now();
    let mut ember = Ember::spawn(&["run", "--restore", dir.to_str().unwrap()]);
    ember.send(b"echo new-process-$((6*7))\n");
    ember.expect_line(Duration::from_secs(60), |l| l.contains("echo new-process-"));
    let echoed = start.elapsed();
    ember.expect_line(Duration::from_secs(60), |l| {
        l.contains("new-process-42") && !l.contains("echo ")
    });
    let took = start.elapsed();
    eprintln!(
        "new process: the command line echoed {} ms and answered {} ms after the spawn",
        echoed.as_millis(),
        took.as_millis()
    );
    assert!(
        echoed < Duration::from_secs(1),
        "the restored guest echoed its input after {echoed:?}"
    );
    assert!(
        took < steady + Duration::from_secs(1),
        "a command took {took:?} in the restored guest, {steady:?} in the booted one"
    );
    ember.send(b"reboot -f\n");
    ember.finish(Duration::from_secs(60)).assert_success();
    let _ = std::fs::remove_dir_all(dir);
}

/// What a Linux guest says of its identity: the GED interrupts it took, a hash of 4 KiB it read
/// from the virtio-rng device (`/dev/hwrng`), and the ACPI errors it logged.
fn identity_of(console: &mut Console) -> (String, String, String) {
    console.send(concat!(
        "echo \"ged=$(grep Ged /proc/interrupts | tr -s ' ' | cut -d' ' -f3)\";",
        // Linux keeps what it read from the device in buffers (virtio_rng's and hw_random's,
        // a few hundred bytes), which a snapshot carries into every clone: read past them.
        " echo \"hwrng=$(head -c 4096 /dev/hwrng | sha256sum | cut -c1-32)\";",
        " echo \"acpi-errors=$(dmesg | grep -c -e AE_ -e 'ACPI Error')\"\n",
    ));
    let timeout = Duration::from_secs(120);
    let ged = console.value(timeout, "ged=");
    let hwrng = console.value(timeout, "hwrng=");
    let errors = console.value(timeout, "acpi-errors=");
    (ged, hwrng, errors)
}

/// Linux binds its `vmgenid` driver to the DSDT's VGEN device, its GED driver to the event
/// device, and `hw_random` to virtio-rng; each clone restored from a snapshot takes the GED's
/// interrupt once (its `_EVT` notifies VGEN, and the driver reads the new ID) and reads random
/// bytes of its own.
#[test]
fn linux_binds_vmgenid_and_virtio_rng_and_each_clone_is_notified() {
    if !kvm_available() {
        return;
    }
    let (kernel, cmdline) = userspace_kernel();
    let initrd = artifact("build-rootfs.sh", &[], "initramfs.cpio");
    let _turn = take_turn();
    let mut config = ember::VmConfig::new(&kernel);
    config.initrd = Some(initrd);
    config.cmdline = format!("{cmdline} ember.shell");
    config.console = ember::ConsoleConfig::Pipe;
    config.memory_mib = 256;
    config.entropy = Some(ember::EntropyConfig::default());
    let mut vm = ember::Vm::start(&config).unwrap();
    let mut console = Console::of(&mut vm);
    console.expect(Duration::from_secs(300), "EMBER-GUEST-READY");
    console.send(concat!(
        "echo \"bound=$(ls /sys/bus/acpi/drivers/vmgenid | grep -c VMGENCTR)",
        " $(cat /sys/class/misc/hw_random/rng_current)\"\n",
    ));
    assert_eq!(
        console.value(Duration::from_secs(120), "bound="),
        "1 virtio_rng.0"
    );
    let (ged, booted_random, errors) = identity_of(&mut console);
    assert_eq!((ged.as_str(), errors.as_str()), ("0", "0"));
    assert_eq!(booted_random.len(), 32, "{booted_random}");
    vm.pause().unwrap();
    let dir = std::env::temp_dir().join(format!("ember-linux-id-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let paths = ember::vmm::persist::SnapshotPaths::in_dir(&dir);
    vm.snapshot(&config, &paths).unwrap();
    vm.stop();

    let mut randoms = std::collections::HashSet::from([booted_random]);
    for _ in 0..2 {
        let (mut clone, _) = ember::Vm::restore(
            &paths,
            |c| {
                c.console = ember::ConsoleConfig::Pipe;
                Ok(())
            },
            true,
        )
        .unwrap();
        let mut console = Console::of(&mut clone);
        let (ged, random, errors) = identity_of(&mut console);
        assert_eq!(ged, "1", "the clone took the GED's interrupt once");
        assert_eq!(errors, "0", "no ACPI error evaluating _EVT");
        assert!(randoms.insert(random.clone()), "{random} read before");
        clone.stop();
    }
    let _ = std::fs::remove_dir_all(dir);
}
