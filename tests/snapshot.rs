//! Snapshots with the test guest: the state and memory written by a paused VM, restored into a
//! fresh VM (in this process through the embedding API, and in a new `ember` process), which
//! carries on where the guest was: no reboot, its memory and devices as they were.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{kvm_available, test_guest};
use ember::vmm::persist::SnapshotPaths;
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig};

/// Where `guest.action=count` keeps its counter (tests/guest/src/actions.rs).
const COUNTER_ADDR: u64 = 0x4000;

fn config(cmdline: &str, vcpus: u8) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config.vcpus = vcpus;
    config
}

/// A fresh directory for one snapshot.
fn snapshot_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(output: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if tx.send(line.trim_end().to_owned()).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for(lines: &mpsc::Receiver<String>, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line == wanted;
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("no {wanted:?} ({e}); saw {seen:?}"),
        }
    }
}

fn counter(vm: &Vm) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(COUNTER_ADDR, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

fn wait_moving(vm: &Vm, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = counter(vm);
        if now > above {
            return now;
        }
        assert!(Instant::now() < deadline, "the counter stays at {now}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots the counting guest, snapshots it paused, stops it; returns the paths and the count.
fn counting_snapshot(tag: &str, vcpus: u8) -> (SnapshotPaths, u64) {
    let config = config("guest.action=count", vcpus);
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=count");
    wait_moving(&vm, 0);
    vm.pause().unwrap();
    let saved = counter(&vm);
    let paths = SnapshotPaths::in_dir(&snapshot_dir(tag));
    vm.snapshot(&config, &paths).unwrap();
    assert_eq!(counter(&vm), saved, "the snapshot ran the guest");
    assert_eq!(vm.stop(), ExitReason::Stopped);
    (paths, saved)
}

fn restored_counter_continues(vcpus: u8) {
    let (paths, saved) = counting_snapshot(&format!("count{vcpus}"), vcpus);
    let (mut vm, _) = Vm::restore(&paths, |c| c.console = ConsoleConfig::Pipe, false).unwrap();
    assert!(
        vm.is_paused(),
        "a restore stays paused unless asked to resume"
    );
    assert_eq!(counter(&vm), saved, "memory is the snapshot's");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&vm), saved, "a paused restore runs nothing");
    vm.resume().unwrap();
    wait_moving(&vm, saved);
    assert_eq!(vm.stop(), ExitReason::Stopped);

    // The same snapshot restores again, as a template does.
    let (mut again, _) = Vm::restore(&paths, |c| c.console = ConsoleConfig::Pipe, true).unwrap();
    wait_moving(&again, saved);
    assert_eq!(again.stop(), ExitReason::Stopped);
    let _ = std::fs::remove_dir_all(paths.state.parent().unwrap());
}

#[test]
fn one_vcpu_counter_continues_after_restore_twice() {
    if !kvm_available() {
        return;
    }
    restored_counter_continues(1);
}

#[test]
fn four_vcpus_counter_continues_after_restore() {
    if !kvm_available() {
        return;
    }
    restored_counter_continues(4);
}

#[test]
fn the_console_and_its_interrupts_work_after_restore_without_a_reboot() {
    if !kvm_available() {
        return;
    }
    let config = config("guest.action=echo", 2);
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    let output = lines(console.output);
    let mut input = console.input;
    wait_for(&output, "echo=ready");
    input.write_all(b"before\n").unwrap();
    wait_for(&output, "before");
    vm.pause().unwrap();
    let paths = SnapshotPaths::in_dir(&snapshot_dir("echo"));
    vm.snapshot(&config, &paths).unwrap();
    vm.stop();

    let (mut vm, _) = Vm::restore(&paths, |c| c.console = ConsoleConfig::Pipe, true).unwrap();
    let console = vm.take_console().unwrap();
    let output = lines(console.output);
    let mut input = console.input;
    input.write_all(b"after restore\n").unwrap();
    let seen = wait_for(&output, "after restore");
    assert!(
        !seen.iter().any(|l| l.starts_with("cpus_up=")),
        "the guest booted again: {seen:?}"
    );
    input.write_all(b"reset\n").unwrap();
    assert_eq!(vm.wait(), ExitReason::Reset);
    let _ = std::fs::remove_dir_all(paths.state.parent().unwrap());
}
