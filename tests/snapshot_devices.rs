//! What a guest restored in a new `ember` process finds of its devices: a disk write it made
//! before the snapshot reads back through virtio-blk (and is in the host's image), and its
//! LAPIC timer, the only thing that wakes an idle guest, keeps firing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::console_lines::{lines, wait_for};
use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};
use ember::vmm::persist::SnapshotPaths;
use ember::{ConsoleConfig, DiskConfig, ExitReason, Vm, VmConfig};

const SECTOR: usize = 512;

fn fnv1a64(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The bytes the guest writes for `write:SECTOR:COUNT:SEED` (docs/test-guest.md).
fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed + i * 7).to_le_bytes()[0]).collect()
}

/// A fresh directory for one snapshot and its disk.
fn snapshot_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-snapdev-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config
}

/// Pauses `vm`, snapshots it into `dir`, stops it.
fn snapshot_and_stop(mut vm: Vm, config: &VmConfig, dir: &Path) {
    vm.pause().unwrap();
    vm.snapshot(config, &SnapshotPaths::in_dir(dir)).unwrap();
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

fn restore_in_a_new_process(dir: &Path) -> Ember {
    Ember::spawn(&["run", "--restore", dir.to_str().unwrap()])
}

#[test]
fn a_disk_write_made_before_the_snapshot_reads_back_in_the_restored_guest() {
    if !kvm_available() {
        return;
    }
    let dir = snapshot_dir("disk");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Write 4 sectors at 8, flush, read them back, then wait for console lines: each one
    // makes the guest read the sectors again through virtio-blk.
    let mut config = config("guest.blk=0:write:8:4:77,0:flush,0:read:8:4,0:read-on-line:8:4");
    config.disks.push(DiskConfig::new(&image));
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    let seen = wait_for(&output, "blk0.read-on-line=ready");
    let written = pattern(77, 4 * SECTOR);
    let expected = format!("blk0.read=8:4:0:{}", fnv1a64(&written));
    assert!(seen.contains(&expected), "{seen:?}");
    snapshot_and_stop(vm, &config, &dir);
    let on_host = std::fs::read(&image).unwrap();
    assert_eq!(
        &on_host[8 * SECTOR..12 * SECTOR],
        written.as_slice(),
        "the write is in the image the snapshot names"
    );

    let mut ember = restore_in_a_new_process(&dir);
    for _ in 0..2 {
        ember.send(b"read\n");
        let line = ember.expect_line(GUEST_TIMEOUT, |l| l.starts_with("blk0.read="));
        assert_eq!(line, expected, "the restored guest reads its write back");
    }
    ember.send(b"reset\n");
    let finished = ember.finish(GUEST_TIMEOUT);
    finished.assert_success();
    assert!(
        !finished.stdout.iter().any(|l| l.starts_with("cpus_up=")),
        "the guest booted again: {:?}",
        finished.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn tick(line: &str) -> Option<u64> {
    line.strip_prefix("timer=")?.parse().ok()
}

#[test]
fn the_lapic_timer_keeps_waking_an_idle_guest_after_a_restore() {
    if !kvm_available() {
        return;
    }
    let dir = snapshot_dir("timer");
    let config = config("guest.action=timer");
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "timer=3");
    // Between ticks the guest is halted: the snapshot finds it idle, its timer armed.
    snapshot_and_stop(vm, &config, &dir);
    std::thread::sleep(Duration::from_millis(100));
    let before: Vec<u64> = output.try_iter().filter_map(|l| tick(&l)).collect();
    let saved = before.last().copied().unwrap_or(3);

    let mut ember = restore_in_a_new_process(&dir);
    let first = ember.expect_line(GUEST_TIMEOUT, |l| tick(l).is_some());
    let first = tick(&first).unwrap();
    assert!(
        first > saved && first <= saved + 2,
        "the ticks go on from {saved}: the first after the restore is {first}"
    );
    let mut last = first;
    while last < first + 10 {
        let line = ember.expect_line(Duration::from_secs(10), |l| tick(l).is_some());
        let now = tick(&line).unwrap();
        assert_eq!(now, last + 1, "ticks in order");
        last = now;
    }
    let finished = ember.stop(GUEST_TIMEOUT);
    assert!(
        !finished.stdout.iter().any(|l| l.starts_with("cpus_up=")),
        "the guest booted again: {:?}",
        finished.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}
