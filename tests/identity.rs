//! A VM's identity with the test guest (`guest.action=identity`, `guest.rng=N`): the VM
//! generation ID every VM has and the virtio-rng device, in a booted VM and in clones restored
//! from one snapshot, each of which must see a new generation ID (announced by the ACPI GED's
//! interrupt) and random bytes of its own.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::console_lines::{lines, wait_for};
use common::{kvm_available, run_guest, test_guest, values};
use ember::arch::x86_64::layout::VMGENID_START;
use ember::vmm::persist::SnapshotPaths;
use ember::{ConsoleConfig, EntropyConfig, ExitReason, Vm, VmConfig};

/// Random bytes the guest asks for in these tests.
const RNG_BYTES: usize = 32;

fn config(cmdline: &str, entropy: bool) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config.entropy = entropy.then(EntropyConfig::default);
    config
}

/// The generation ID in guest memory, as the host reads it, in the guest's hex.
fn host_vmgenid(vm: &Vm) -> String {
    let mut id = [0u8; 16];
    vm.read_memory(VMGENID_START, &mut id).unwrap();
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one `key=` value in `seen`.
fn one(seen: &[String], key: &str) -> String {
    let found = values(seen, key);
    assert_eq!(found.len(), 1, "one {key}= line expected in {seen:?}");
    found[0].clone()
}

/// An `rng=` report's bytes, checked to be `RNG_BYTES` of them.
fn rng_bytes(report: &str) -> String {
    let (len, hex) = report
        .split_once(':')
        .unwrap_or_else(|| panic!("rng={report}"));
    assert_eq!(len, RNG_BYTES.to_string(), "rng={report}");
    assert_eq!(hex.len(), 2 * RNG_BYTES, "rng={report}");
    assert_ne!(hex, "0".repeat(2 * RNG_BYTES), "all zero: rng={report}");
    hex.to_owned()
}

fn snapshot_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-identity-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Boots the identity guest; returns the VM, its console lines and what it reported up to
/// `identity=ready`.
fn boot_identity(entropy: bool) -> (Vm, std::sync::mpsc::Receiver<String>, Vec<String>) {
    let cmdline = format!("guest.rng={RNG_BYTES} guest.action=identity");
    let mut vm = Vm::start(&config(&cmdline, entropy)).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    let seen = wait_for(&output, "identity=ready");
    (vm, output, seen)
}

#[test]
fn a_booted_guest_reads_its_generation_id_and_random_bytes_from_virtio_rng() {
    if !kvm_available() {
        return;
    }
    let mut ids = HashSet::new();
    let mut randoms = HashSet::new();
    for _ in 0..2 {
        let (mut vm, _output, seen) = boot_identity(true);
        let id = one(&seen, "vmgenid");
        assert_eq!(id, host_vmgenid(&vm), "the guest reads what ember wrote");
        assert_ne!(id, "0".repeat(32));
        assert_eq!(one(&seen, "vmgenid.addr"), format!("{VMGENID_START:#x}"));
        ids.insert(id);
        randoms.insert(rng_bytes(&one(&seen, "rng")));
        let entropy = vm.metrics().entropy.expect("entropy metrics");
        assert_eq!(entropy.entropy_event_count, 1);
        assert_eq!(entropy.entropy_bytes, RNG_BYTES as u64);
        assert_eq!(entropy.entropy_event_fails + entropy.guest_errors, 0);
        assert_eq!(vm.stop(), ExitReason::Stopped);
    }
    assert_eq!(ids.len(), 2, "each boot gets its own generation ID");
    assert_eq!(randoms.len(), 2, "and its own random bytes");
}

#[test]
fn without_the_entropy_device_the_guest_finds_none_but_has_a_generation_id() {
    if !kvm_available() {
        return;
    }
    let (mut vm, _output, seen) = boot_identity(false);
    assert_eq!(one(&seen, "rng"), "none");
    assert_eq!(one(&seen, "vmgenid"), host_vmgenid(&vm));
    assert!(vm.metrics().entropy.is_none());
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn ember_run_entropy_gives_the_guest_random_bytes() {
    if !kvm_available() {
        return;
    }
    let cmdline = format!("guest.rng={RNG_BYTES}");
    let out = run_guest(&["--entropy", "--cmdline", &cmdline]);
    out.assert_success();
    rng_bytes(&out.value("rng"));
    let limited = run_guest(&["--entropy=bw=4096/100,ops=10/100", "--cmdline", &cmdline]);
    limited.assert_success();
    rng_bytes(&limited.value("rng"));
    let none = run_guest(&["--cmdline", &cmdline]);
    assert_eq!(none.value("rng"), "none");
}

#[test]
fn ten_clones_of_one_snapshot_each_get_a_new_generation_id_and_their_own_random_bytes() {
    if !kvm_available() {
        return;
    }
    let (mut vm, _output, seen) = boot_identity(true);
    let snapshotted = one(&seen, "vmgenid");
    let booted_random = rng_bytes(&one(&seen, "rng"));
    vm.pause().unwrap();
    let dir = snapshot_dir("clones");
    let paths = SnapshotPaths::in_dir(&dir);
    let config = config(
        &format!("guest.rng={RNG_BYTES} guest.action=identity"),
        true,
    );
    vm.snapshot(&config, &paths).unwrap();
    assert_eq!(vm.stop(), ExitReason::Stopped);

    let mut clones: Vec<(Vm, std::sync::mpsc::Receiver<String>)> = (0..10)
        .map(|_| {
            let restore = |c: &mut VmConfig| {
                c.console = ConsoleConfig::Pipe;
                Ok(())
            };
            let (mut clone, _) = Vm::restore(&paths, restore, true).unwrap();
            let output = lines(clone.take_console().unwrap().output);
            (clone, output)
        })
        .collect();
    let mut ids = HashSet::from([snapshotted.clone()]);
    let mut randoms = HashSet::from([booted_random]);
    for (clone, output) in &mut clones {
        // The GED's interrupt woke the guest: it reports what it found then.
        let seen = wait_for(output, "identity.changed=1");
        assert!(
            !seen.iter().any(|l| l.starts_with("cpus_up=")),
            "the clone booted again: {seen:?}"
        );
        let id = one(&seen, "vmgenid");
        assert_eq!(id, host_vmgenid(clone));
        assert!(ids.insert(id.clone()), "generation ID {id} seen before");
        let random = rng_bytes(&one(&seen, "rng"));
        assert!(
            randoms.insert(random.clone()),
            "random bytes {random} seen before"
        );
        let entropy = clone
            .metrics()
            .entropy
            .expect("a clone keeps its entropy device");
        assert_eq!(
            entropy.entropy_event_count, 1,
            "counters start again per process"
        );
    }
    assert_eq!(ids.len(), 11, "the snapshot's ID and ten new ones");
    for (clone, _) in &mut clones {
        assert_eq!(clone.stop(), ExitReason::Stopped);
    }
    let _ = std::fs::remove_dir_all(dir);
}
