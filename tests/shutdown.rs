//! A clean shutdown, both ways: the guest powers off through the ACPI sleep control register
//! (ember exits 0, the library reports `ExitReason::PowerOff`), and ember asks the guest to shut
//! down with Ctrl-Alt-Del on the i8042 keyboard. The test guest does both; so does Linux (ours,
//! from `resources/`, with the busybox init).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{Ember, kvm_available, run_guest, test_guest};
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig};

fn guest_config(cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config
}

/// Reads console lines until one contains `wanted`; returns them all.
fn read_until(reader: &mut impl BufRead, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "console closed before {wanted:?}; saw {seen:?}"
        );
        let line = line.trim_end().to_owned();
        let done = line.contains(wanted);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

#[test]
fn test_guest_powers_off_and_ember_exits_0() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--log-level", "info", "--cmdline", "guest.action=poweroff"]);
    out.assert_success();
    assert!(
        out.stderr.contains("the guest powered off"),
        "a power-off, not a reset: {}",
        out.stderr
    );
    assert!(
        out.stdout.iter().any(|l| l == "poweroff=acpi-s5"),
        "{:?}",
        out.stdout
    );
    assert!(
        !out.stdout.iter().any(|l| l == "poweroff=still-running"),
        "the VM ran on after the S5 write: {:?}",
        out.stdout
    );
}

#[test]
fn library_reports_power_off() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&guest_config("guest.action=poweroff")).unwrap();
    assert_eq!(vm.wait(), ExitReason::PowerOff);
}

#[test]
fn test_guest_answers_ctrl_alt_del_by_powering_off() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&guest_config("guest.action=ctrl-alt-del")).unwrap();
    let mut output = BufReader::new(vm.take_console().unwrap().output);
    read_until(&mut output, "ctrl-alt-del=ready");
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(100)),
        None,
        "the guest waits for the keys"
    );
    vm.send_ctrl_alt_del().unwrap();
    let seen = read_until(&mut output, "ctrl-alt-del=seen");
    assert!(
        !seen.iter().any(|l| l.starts_with("ctrl-alt-del.other=")),
        "only Ctrl, Alt, Delete before the match: {seen:?}"
    );
    assert_eq!(vm.wait(), ExitReason::PowerOff);
    assert!(
        vm.send_ctrl_alt_del().is_err(),
        "nothing to press once it is off"
    );
}

// --- Linux ---

/// One Linux boot at a time (each keeps a core busy on a PVM host).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn take_turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Runs `resources/<script> <args>` (it rebuilds only when its inputs changed) and returns
/// `$EMBER_CACHE/guest/<file>` (as tests/linux.rs does).
fn artifact(script: &str, args: &[&str], file: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _lock = BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("resources").join(script))
        .args(args)
        .status()
        .expect("cannot run a resources/ script");
    assert!(status.success(), "resources/{script} {args:?} failed");
    let cache = match std::env::var_os("EMBER_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ember"),
    };
    cache.join("guest").join(file)
}

/// Our kernel for this host (the PVM-quirks build on PVM hosts), the busybox initramfs and
/// the matching command line, with `extra` appended.
fn linux(extra: &str) -> (PathBuf, PathBuf, String) {
    let variant = if is_pvm_host() { "pvm" } else { "microvm" };
    let kernel = artifact("build-kernel.sh", &[variant], &format!("{variant}/vmlinux"));
    let initrd = artifact("build-rootfs.sh", &[], "initramfs.cpio");
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("resources")
        .join(format!("cmdline-{variant}.txt"));
    let cmdline = std::fs::read_to_string(cmdline_file).unwrap();
    (kernel, initrd, format!("{} {extra}", cmdline.trim()))
}

const LINUX_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn linux_powers_off_by_itself_and_ember_exits_0() {
    if !kvm_available() {
        return;
    }
    let (kernel, initrd, cmdline) = linux("");
    let _turn = take_turn();
    let mut ember = Ember::spawn(&[
        "run".as_ref(),
        "--log-level".as_ref(),
        "info".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--memory".as_ref(),
        "128".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    ember.expect_line(LINUX_TIMEOUT, |l| l.contains("EMBER-GUEST-READY"));
    let out = ember.finish(LINUX_TIMEOUT);
    out.assert_success();
    assert!(
        out.stdout
            .iter()
            .any(|l| l.contains("EMBER-GUEST-POWEROFF")),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stderr.contains("the guest powered off"),
        "a power-off, not a reset: {}",
        out.stderr
    );
}

#[test]
fn linux_powers_off_on_ctrl_alt_del() {
    if !kvm_available() {
        return;
    }
    // The command blocks on the console until the test types a line, which it never does:
    // only Ctrl-Alt-Del (SIGINT to init) ends the guest.
    let (kernel, initrd, cmdline) = linux("ember.cmd=\"echo CMD-WAITING; read line\"");
    let _turn = take_turn();
    let mut config = VmConfig::new(&kernel);
    config.initrd = Some(initrd);
    config.memory_mib = 128;
    config.cmdline = cmdline;
    config.console = ConsoleConfig::Pipe;
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    // Held open: the guest's `read` waits on it.
    let input = console.input;
    let mut output = BufReader::new(console.output);
    read_until(&mut output, "CMD-WAITING");
    vm.send_ctrl_alt_del().unwrap();
    let seen = read_until(&mut output, "EMBER-GUEST-POWEROFF");
    assert!(
        !seen.iter().any(|l| l.contains("EMBER-CMD-EXIT")),
        "the command was interrupted, not finished: {seen:?}"
    );
    assert_eq!(vm.wait(), ExitReason::PowerOff);
    drop(input);
}

/// `ember run` on SIGTERM asks a guest that listens on the i8042 to shut down first: the test
/// guest powers off, and ember exits 0 instead of 128 + SIGTERM.
#[test]
fn sigterm_asks_a_listening_guest_to_shut_down_first() {
    if !kvm_available() {
        return;
    }
    let guest = common::test_guest().to_str().unwrap().to_owned();
    let mut ember = common::Ember::spawn(&[
        "--log-level",
        "info",
        "run",
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=ctrl-alt-del",
    ]);
    ember.expect_line(common::GUEST_TIMEOUT, |l| l == "ctrl-alt-del=ready");
    ember.signal(libc::SIGTERM);
    ember.expect_line(common::GUEST_TIMEOUT, |l| l == "ctrl-alt-del=seen");
    let out = ember.finish(common::GUEST_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("asked the guest to shut down"),
        "{}",
        out.stderr
    );
}

/// A guest that never set up the i8042 cannot hear Ctrl-Alt-Del: SIGTERM stops it at once.
#[test]
fn sigterm_stops_a_guest_that_cannot_hear_at_once() {
    if !kvm_available() {
        return;
    }
    let guest = common::test_guest().to_str().unwrap().to_owned();
    let mut ember = common::Ember::spawn(&[
        "run",
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=halt",
        "--shutdown-timeout",
        "600",
    ]);
    ember.expect_line(common::GUEST_TIMEOUT, |l| l == "action=halt");
    // Ember::stop allows GUEST_TIMEOUT, far less than the 600 s a wait would take.
    ember.stop(common::GUEST_TIMEOUT);
}
