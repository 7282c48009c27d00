//! Diff snapshots with the test guest: a Full snapshot, the guest runs on, a Diff (only the
//! pages written since) folded onto the Full is, byte for byte, the Full snapshot taken at the
//! Diff's moment, and both restore to the same guest. A Diff is refused without dirty page
//! tracking, and cannot be restored before it is folded.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::api_client::{call, wait_for_socket};
use common::console_lines::{lines, wait_for};
use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};
use ember::vmm::fold::{self, data_ranges};
use ember::vmm::persist::{MemoryKind, PersistError, SnapshotPaths};
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig};

/// Where `guest.action=count` keeps its counter (tests/guest/src/actions.rs).
const COUNTER_ADDR: u64 = 0x4000;
/// Where the test writes into guest memory from the host: free RAM at 32 MiB.
const PATTERN_ADDR: u64 = 32 << 20;

fn config(cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config.track_dirty_pages = true;
    config
}

fn snapshot_dir(tag: &str) -> SnapshotPaths {
    let dir = std::env::temp_dir().join(format!("ember-diff-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    SnapshotPaths::in_dir(&dir)
}

fn remove(paths: &SnapshotPaths) {
    let _ = std::fs::remove_dir_all(paths.state.parent().unwrap());
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

/// Bytes of `path` that are data, not holes.
fn data_bytes(path: &PathBuf) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    data_ranges(&file, len).unwrap().iter().map(|r| r.1).sum()
}

/// Restores `paths`, paused; the restored VM tracks dirty pages when `track`.
fn restore_paused(paths: &SnapshotPaths, track: bool) -> (Vm, VmConfig) {
    Vm::restore(
        paths,
        |c| {
            assert!(
                !c.track_dirty_pages,
                "tracking is the restoring side's choice"
            );
            c.console = ConsoleConfig::Pipe;
            c.track_dirty_pages = track;
            Ok(())
        },
        false,
    )
    .unwrap()
}

#[test]
fn a_diff_folded_onto_its_base_is_the_full_snapshot_of_its_moment() {
    if !kvm_available() {
        return;
    }
    let config = config("guest.action=count");
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=count");
    wait_moving(&vm, 0);
    // Time A: a Full snapshot, the base.
    vm.pause().unwrap();
    let at_a = counter(&vm);
    let base = snapshot_dir("base");
    vm.snapshot(&config, &base).unwrap();
    // The guest counts on, and ember writes into its memory (as a device does): time B, a
    // Diff, and a Full of the same moment to compare with.
    vm.write_memory(PATTERN_ADDR, &[0x5a; 3 * 4096 + 17])
        .unwrap();
    vm.resume().unwrap();
    wait_moving(&vm, at_a);
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().unwrap();
    let at_b = counter(&vm);
    assert!(at_b > at_a);
    let diff = snapshot_dir("diff");
    vm.snapshot_of(&config, &diff, MemoryKind::Diff).unwrap();
    let full_b = snapshot_dir("fullb");
    vm.snapshot(&config, &full_b).unwrap();
    assert_eq!(counter(&vm), at_b, "the snapshots ran the guest");
    assert_eq!(vm.stop(), ExitReason::Stopped);

    let diff_len = std::fs::metadata(&diff.memory).unwrap().len();
    assert_eq!(
        diff_len,
        std::fs::metadata(&full_b.memory).unwrap().len(),
        "a diff is as long as a full memory file"
    );
    let (diff_data, full_data) = (data_bytes(&diff.memory), data_bytes(&full_b.memory));
    eprintln!("counting guest: Full {full_data} bytes of data, Diff {diff_data}");
    // The counter's page and the pattern's four at least.
    assert!(
        diff_data >= 5 * 4096 && diff_data < full_data,
        "diff {diff_data} bytes, full {full_data}"
    );

    // A Diff alone is not a VM.
    let Err(refused) = Vm::restore(&diff, |_| Ok(()), false) else {
        panic!("a Diff restored without its base");
    };
    let message = ember::error_chain(&refused);
    assert!(message.contains("fold it onto its base"), "{message}");

    let folded = fold::fold(&base, &diff).unwrap();
    assert_eq!(folded.bytes, diff_data);
    assert_same_bytes(&base.memory, &full_b.memory);
    assert!(
        fold::fold(&base, &full_b).is_err(),
        "a Full is not folded onto anything"
    );

    // Both restore to time B and count on from there.
    let (mut from_fold, restored_config) = restore_paused(&base, true);
    let (mut from_full, _) = restore_paused(&full_b, false);
    assert_eq!(counter(&from_fold), at_b);
    assert_eq!(counter(&from_full), at_b);
    from_fold.resume().unwrap();
    from_full.resume().unwrap();
    wait_moving(&from_fold, at_b);
    wait_moving(&from_full, at_b);
    from_full.pause().unwrap();
    let untracked = from_full.snapshot_of(&restored_config, &diff, MemoryKind::Diff);
    assert!(
        matches!(untracked, Err(PersistError::NotTracking)),
        "restored without tracking, no Diff: {untracked:?}"
    );
    assert_eq!(from_full.stop(), ExitReason::Stopped);

    // A VM restored with tracking takes Diffs against the snapshot it came from.
    from_fold.pause().unwrap();
    let at_c = counter(&from_fold);
    let (diff_c, full_c) = (snapshot_dir("diffc"), snapshot_dir("fullc"));
    from_fold
        .snapshot_of(&restored_config, &diff_c, MemoryKind::Diff)
        .unwrap();
    from_fold.snapshot(&restored_config, &full_c).unwrap();
    assert_eq!(from_fold.stop(), ExitReason::Stopped);
    fold::fold(&base, &diff_c).unwrap();
    assert_same_bytes(&base.memory, &full_c.memory);
    let (again, _) = restore_paused(&base, false);
    assert_eq!(counter(&again), at_c);
    for paths in [base, diff, full_b, diff_c, full_c] {
        remove(&paths);
    }
}

/// Resumes `vm`, lets it count past `above`, pauses it; returns the count.
fn run_a_while(vm: &mut Vm, above: u64) -> u64 {
    vm.resume().unwrap();
    wait_moving(vm, above);
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    counter(vm)
}

fn assert_same_bytes(folded: &PathBuf, full: &PathBuf) {
    let (folded, full) = (std::fs::read(folded).unwrap(), std::fs::read(full).unwrap());
    assert_eq!(folded.len(), full.len());
    let first = folded.iter().zip(&full).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "the folded memory differs from the Full one at {first:?}"
    );
}

#[test]
fn two_diffs_fold_into_one_diff_and_that_onto_the_base() {
    if !kvm_available() {
        return;
    }
    let config = config("guest.action=count");
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=count");
    wait_moving(&vm, 0);
    vm.pause().unwrap();
    let base = snapshot_dir("chainbase");
    vm.snapshot(&config, &base).unwrap();
    let at_a = counter(&vm);
    let at_b = run_a_while(&mut vm, at_a);
    let first = snapshot_dir("chain1");
    vm.snapshot_of(&config, &first, MemoryKind::Diff).unwrap();
    vm.write_memory(PATTERN_ADDR + (1 << 20), &[0xc3; 8192])
        .unwrap();
    let at_c = run_a_while(&mut vm, at_b);
    let second = snapshot_dir("chain2");
    vm.snapshot_of(&config, &second, MemoryKind::Diff).unwrap();
    let full_c = snapshot_dir("chainfull");
    vm.snapshot(&config, &full_c).unwrap();
    vm.stop();

    fold::fold(&first, &second).unwrap();
    let merged = ember::vmm::persist::read_snapshot(&first.state).unwrap();
    assert_eq!(merged.memory, MemoryKind::Diff, "two diffs make a diff");
    assert_eq!(merged.diff_bytes, Some(data_bytes(&first.memory)));
    fold::fold(&base, &first).unwrap();
    assert_same_bytes(&base.memory, &full_c.memory);
    let (mut restored, _) = restore_paused(&base, false);
    assert_eq!(counter(&restored), at_c);
    restored.resume().unwrap();
    wait_moving(&restored, at_c);
    restored.stop();
    for paths in [base, first, second, full_c] {
        remove(&paths);
    }
}

#[test]
fn an_idle_guests_diff_is_a_sliver_of_a_full_snapshot() {
    if !kvm_available() {
        return;
    }
    // The echo guest waits for console input: idle but for the one line it is sent.
    let config = config("guest.action=echo");
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    let (mut input, output) = (console.input, lines(console.output));
    wait_for(&output, "echo=ready");
    vm.pause().unwrap();
    let full = snapshot_dir("idlefull");
    vm.snapshot(&config, &full).unwrap();
    vm.resume().unwrap();
    std::io::Write::write_all(&mut input, b"ping\n").unwrap();
    wait_for(&output, "ping");
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    let diff = snapshot_dir("idlediff");
    vm.snapshot_of(&config, &diff, MemoryKind::Diff).unwrap();
    // Nothing ran since: a second Diff holds nothing.
    let empty = snapshot_dir("idleempty");
    vm.snapshot_of(&config, &empty, MemoryKind::Diff).unwrap();
    vm.stop();
    let (full_data, diff_data) = (data_bytes(&full.memory), data_bytes(&diff.memory));
    eprintln!("idle guest: Full {full_data} bytes of data, Diff {diff_data}");
    assert!(
        diff_data > 0 && diff_data * 10 <= full_data,
        "diff {diff_data} bytes, full {full_data}"
    );
    assert_eq!(
        data_bytes(&empty.memory),
        0,
        "a diff of a paused VM is empty"
    );
    for paths in [full, diff, empty] {
        remove(&paths);
    }
}

#[test]
fn a_diff_needs_tracking() {
    if !kvm_available() {
        return;
    }
    let mut config = config("guest.action=halt");
    config.track_dirty_pages = false;
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=halt");
    vm.pause().unwrap();
    let paths = snapshot_dir("untracked");
    let refused = vm.snapshot_of(&config, &paths, MemoryKind::Diff);
    assert!(
        matches!(refused, Err(PersistError::NotTracking)),
        "{refused:?}"
    );
    vm.snapshot(&config, &paths)
        .expect("a Full needs no tracking");
    vm.stop();
    remove(&paths);
}

/// Over the API and the command line: a Diff is refused (400, naming track_dirty_pages) by an
/// ember started without tracking; one started with `--track-dirty-pages` takes a Full, then a
/// Diff; the Diff will not load alone; `ember snapshot fold` folds it onto the Full, which loads
/// in a fresh ember and answers where the guest was at the Diff.
#[test]
fn diffs_over_the_api_fold_with_the_cli_and_load() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-diff-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (base, diff) = (dir.join("base"), dir.join("diff"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&diff).unwrap();
    let create = |kind: &str, into: &std::path::Path| {
        format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            into.join("vmstate").display(),
            into.join("memory").display()
        )
    };
    let paused = r#"{"state": "Paused"}"#;
    let resumed = r#"{"state": "Resumed"}"#;
    let guest = test_guest().to_str().unwrap().to_owned();
    let echo = |socket: &std::path::Path, track: bool| {
        let mut args = vec!["run", "--kernel", &guest, "--cmdline", "guest.action=echo"];
        args.extend(["--api-sock", socket.to_str().unwrap()]);
        if track {
            args.push("--track-dirty-pages");
        }
        let mut vm = Ember::spawn(&args);
        vm.expect_line(GUEST_TIMEOUT, |l| l == "echo=ready");
        wait_for_socket(socket, "/");
        vm
    };

    let socket = dir.join("untracked.sock");
    let vm = echo(&socket, false);
    assert_eq!(call(&socket, "PATCH", "/vm", paused).status, 204);
    call(&socket, "PUT", "/snapshot/create", &create("Diff", &diff))
        .assert_fault(400, "enable track_dirty_pages");
    vm.stop(GUEST_TIMEOUT);

    let socket = dir.join("tracked.sock");
    let mut vm = echo(&socket, true);
    let machine = call(&socket, "GET", "/vm/config", "").json();
    assert_eq!(machine["machine-config"]["track_dirty_pages"], true);
    assert_eq!(call(&socket, "PATCH", "/vm", paused).status, 204);
    let full = call(&socket, "PUT", "/snapshot/create", &create("Full", &base));
    assert_eq!(full.status, 204, "{full:?}");
    assert_eq!(call(&socket, "PATCH", "/vm", resumed).status, 204);
    vm.send(b"between\n");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "between");
    assert_eq!(call(&socket, "PATCH", "/vm", paused).status, 204);
    let created = std::process::Command::new(common::ember())
        .args([
            "ctl",
            "--api-sock",
            socket.to_str().unwrap(),
            "snapshot",
            "--diff",
        ])
        .arg(&diff)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    vm.stop(GUEST_TIMEOUT);

    let load = |from: &std::path::Path| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            from.join("vmstate").display(),
            from.join("memory").display()
        )
    };
    let socket = dir.join("unfolded.sock");
    let mut args = vec!["run", "--api-sock", socket.to_str().unwrap()];
    let unfolded = Ember::spawn(&args);
    wait_for_socket(&socket, "/");
    call(&socket, "PUT", "/snapshot/load", &load(&diff)).assert_fault(400, "fold it onto its base");
    unfolded.stop(GUEST_TIMEOUT);
    let restore = std::process::Command::new(common::ember())
        .args(["run", "--restore"])
        .arg(&diff)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&restore.stderr);
    assert_eq!(restore.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.lines().count() == 1 && stderr.contains("fold it onto its base"),
        "{stderr}"
    );

    let folded = std::process::Command::new(common::ember())
        .args(["snapshot", "fold", "--base"])
        .arg(&base)
        .arg("--diff")
        .arg(&diff)
        .output()
        .unwrap();
    assert!(folded.status.success(), "{folded:?}");
    assert!(String::from_utf8_lossy(&folded.stdout).starts_with("folded "));

    let socket = dir.join("folded.sock");
    args[2] = socket.to_str().unwrap();
    let mut restored = Ember::spawn(&args);
    wait_for_socket(&socket, "/");
    let loaded = call(&socket, "PUT", "/snapshot/load", &load(&base));
    assert_eq!(loaded.status, 204, "{loaded:?}");
    restored.send(b"after fold\n");
    restored.expect_line(GUEST_TIMEOUT, |l| l == "after fold");
    restored.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}
