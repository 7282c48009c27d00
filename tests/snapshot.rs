//! Snapshots with the test guest: the state and memory written by a paused VM, restored into a
//! fresh VM (in this process through the embedding API, and in a new `ember` process), which
//! carries on where the guest was: no reboot, its memory and devices as they were.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::console_lines::{lines, wait_for};
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
    let (mut vm, _) = Vm::restore(
        &paths,
        |c| {
            c.console = ConsoleConfig::Pipe;
            Ok(())
        },
        false,
    )
    .unwrap();
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
    let (mut again, _) = Vm::restore(
        &paths,
        |c| {
            c.console = ConsoleConfig::Pipe;
            Ok(())
        },
        true,
    )
    .unwrap();
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

    let (mut vm, _) = Vm::restore(
        &paths,
        |c| {
            c.console = ConsoleConfig::Pipe;
            Ok(())
        },
        true,
    )
    .unwrap();
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

/// Boots the echo guest, checks it echoes, snapshots it; returns the snapshot's directory.
fn echo_snapshot(tag: &str) -> PathBuf {
    let config = config("guest.action=echo", 1);
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    let output = lines(console.output);
    let mut input = console.input;
    wait_for(&output, "echo=ready");
    input.write_all(b"before\n").unwrap();
    wait_for(&output, "before");
    vm.pause().unwrap();
    let dir = snapshot_dir(tag);
    vm.snapshot(&config, &SnapshotPaths::in_dir(&dir)).unwrap();
    vm.stop();
    dir
}

#[test]
fn a_new_ember_process_restores_the_snapshot_and_the_guest_answers() {
    if !kvm_available() {
        return;
    }
    let dir = echo_snapshot("process");
    let mut ember = common::Ember::spawn(&["run", "--restore", dir.to_str().unwrap()]);
    ember.send(b"after restore\n");
    ember.expect_line(common::GUEST_TIMEOUT, |l| l == "after restore");
    ember.send(b"reset\n");
    let finished = ember.finish(common::GUEST_TIMEOUT);
    finished.assert_success();
    assert!(
        !finished.stdout.iter().any(|l| l.starts_with("cpus_up=")),
        "the guest booted again: {:?}",
        finished.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `state` with its JSON payload changed by `edit` and sealed again (magic, version, length and
/// checksum right): what a hostile writer of snapshots can make.
fn rewritten(state: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let mut value: serde_json::Value = ember::snapshot::decode(state).unwrap();
    edit(&mut value);
    ember::snapshot::encode(&value).unwrap()
}

/// The echo guest with a disk (so that the state names a virtio device), snapshotted.
fn echo_snapshot_with_disk(tag: &str) -> PathBuf {
    let dir = snapshot_dir(tag);
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut config = config("guest.action=echo", 1);
    config.disks.push(ember::DiskConfig::new(&image));
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "echo=ready");
    vm.pause().unwrap();
    vm.snapshot(&config, &SnapshotPaths::in_dir(&dir)).unwrap();
    vm.stop();
    dir
}

/// One way to damage a snapshot: what is done to the directory, and a word of the one line
/// the restore must fail with.
struct Damage<'a> {
    case: &'a str,
    damage: Box<dyn Fn(&std::path::Path) + 'a>,
    expected: &'a str,
}

fn case<'a>(
    case: &'a str,
    damage: Box<dyn Fn(&std::path::Path) + 'a>,
    expected: &'a str,
) -> Damage<'a> {
    Damage {
        case,
        damage,
        expected,
    }
}

#[test]
fn damaged_snapshots_are_refused_with_one_line_and_exit_1() {
    if !kvm_available() {
        return;
    }
    let dir = echo_snapshot_with_disk("damaged");
    let state = std::fs::read(dir.join("vmstate")).unwrap();
    let memory_len = std::fs::metadata(dir.join("memory")).unwrap().len();
    let write_state = |d: &std::path::Path, bytes: &[u8]| {
        std::fs::write(d.join("vmstate"), bytes).unwrap();
    };
    let patched = |at: usize, value: &[u8]| {
        let mut bad = state.clone();
        bad[at..at + value.len()].copy_from_slice(value);
        bad
    };
    let hostile = |edit: fn(&mut serde_json::Value)| rewritten(&state, edit);
    let resize_memory = |d: &std::path::Path, len: u64| {
        let memory = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory"))
            .unwrap();
        memory.set_len(len).unwrap();
    };
    let cases: Vec<Damage> = vec![
        case(
            "truncated",
            Box::new(|d| write_state(d, &state[..state.len() / 2])),
            "truncated",
        ),
        case("empty", Box::new(|d| write_state(d, b"")), "truncated"),
        case(
            "trailing bytes",
            Box::new(|d| write_state(d, &[state.as_slice(), b"more"].concat())),
            "trailing bytes",
        ),
        case(
            "flipped byte",
            Box::new(|d| {
                let mut bad = state.clone();
                bad[40] ^= 1;
                write_state(d, &bad)
            }),
            "corrupted",
        ),
        case(
            "flipped checksum",
            Box::new(|d| {
                let mut bad = state.clone();
                *bad.last_mut().unwrap() ^= 0x80;
                write_state(d, &bad)
            }),
            "corrupted",
        ),
        case(
            "not a snapshot",
            Box::new(|d| write_state(d, b"hello, this is not one")),
            "not an ember snapshot",
        ),
        case(
            "bad magic",
            Box::new(|d| write_state(d, &patched(0, b"EMBERSNQ"))),
            "not an ember snapshot",
        ),
        case(
            "future version",
            Box::new(|d| write_state(d, &patched(8, &9u32.to_le_bytes()))),
            "version 9",
        ),
        case(
            "version 0",
            Box::new(|d| write_state(d, &patched(8, &0u32.to_le_bytes()))),
            "version 0",
        ),
        case(
            "unknown flags",
            Box::new(|d| write_state(d, &patched(12, &4u32.to_le_bytes()))),
            "unknown flags",
        ),
        case(
            "huge payload length",
            Box::new(|d| write_state(d, &patched(16, &u64::MAX.to_le_bytes()))),
            "more than",
        ),
        case(
            "payload not JSON",
            Box::new(|d| {
                let bad = ember::snapshot::encode(&"just a string").unwrap();
                write_state(d, &bad)
            }),
            "expected struct VmSnapshot",
        ),
        case(
            "unknown field",
            Box::new(|d| write_state(d, &hostile(|v| v["surprise"] = 1.into()))),
            "unknown field `surprise`",
        ),
        case(
            "a vCPU missing",
            Box::new(|d| {
                let bad = hostile(|v| v["vcpus"].as_array_mut().unwrap().clear());
                write_state(d, &bad)
            }),
            "0 vCPU states for 1",
        ),
        case(
            "more vCPUs than saved",
            Box::new(|d| write_state(d, &hostile(|v| v["config"]["vcpus"] = 2.into()))),
            "1 vCPU states for 2",
        ),
        case(
            "255 vCPUs",
            Box::new(|d| write_state(d, &hostile(|v| v["config"]["vcpus"] = 255.into()))),
            "more than this host allows",
        ),
        case(
            "unknown device id",
            Box::new(|d| {
                let bad = hostile(|v| v["virtio"][0][0] = "no-such-disk".into());
                write_state(d, &bad)
            }),
            "no-such-disk",
        ),
        case(
            "a device missing",
            Box::new(|d| {
                let bad = hostile(|v| v["virtio"].as_array_mut().unwrap().clear());
                write_state(d, &bad)
            }),
            "devices [] saved",
        ),
        case(
            "huge guest memory",
            Box::new(|d| {
                let bad = hostile(|v| v["config"]["memory_mib"] = (1u64 << 44).into());
                write_state(d, &bad)
            }),
            "too large",
        ),
        case(
            "huge queue size",
            Box::new(|d| write_state(d, &hostile(|v| set_all(v, "size", 65535.into())))),
            "size 65535",
        ),
        case(
            "ready queue outside guest memory",
            Box::new(|d| {
                let bad = hostile(|v| {
                    set_all(v, "ready", true.into());
                    set_all(v, "desc_table", (u64::MAX - 4095).into());
                });
                write_state(d, &bad)
            }),
            "rings outside guest memory",
        ),
        case(
            "I/O APIC selector out of range",
            Box::new(|d| write_state(d, &hostile(|v| v["ioapic"]["select"] = u32::MAX.into()))),
            "select register",
        ),
        case(
            "I/O APIC entry with every bit set",
            Box::new(|d| write_state(d, &hostile(|v| v["ioapic"]["entries"][4] = u64::MAX.into()))),
            "read-only bits",
        ),
        case(
            "serial input of a megabyte",
            Box::new(|d| {
                let bad = hostile(|v| v["serial"]["in_buffer"] = vec![b'x'; 1 << 20].into());
                write_state(d, &bad)
            }),
            "64-byte FIFO",
        ),
        case(
            "memory file too short",
            Box::new(|d| {
                write_state(d, &state);
                resize_memory(d, memory_len / 2);
            }),
            "but the VM's memory is",
        ),
        case(
            "memory file too long",
            Box::new(|d| resize_memory(d, memory_len + 4096)),
            "134221824 bytes",
        ),
        case(
            "memory file missing",
            Box::new(|d| std::fs::remove_file(d.join("memory")).unwrap()),
            "cannot open the memory file",
        ),
    ];
    for Damage {
        case,
        damage,
        expected,
    } in cases
    {
        damage(&dir);

        let out = common::Ember::spawn(&["run", "--restore", dir.to_str().unwrap()])
            .finish(common::GUEST_TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{case}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{case}: one line, got {lines:?}");
        assert!(lines[0].contains(expected), "{case}: {}", lines[0]);
        assert!(!out.stderr.contains("panicked"), "{case}");
        assert!(
            out.stdout.is_empty(),
            "{case}: the guest ran: {:?}",
            out.stdout
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Sets every field named `key` anywhere in `value` (e.g. each queue's size) to `new`.
fn set_all(value: &mut serde_json::Value, key: &str, new: serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == key {
                    *v = new.clone();
                } else {
                    set_all(v, key, new.clone());
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                set_all(v, key, new.clone());
            }
        }
        _ => {}
    }
}

/// `ip link show` of `tap` in `ns`: its MAC address.
fn tap_mac(ns: &common::netns::NetNs, tap: &str) -> String {
    let out = ns
        .command("ip")
        .args(["link", "show", tap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"))
        .to_owned()
}

#[test]
fn a_restored_guest_answers_on_another_tap_in_another_namespace() {
    if !kvm_available() {
        return;
    }
    use common::netns::NetNs;
    let first = NetNs::new("snap-a");
    first.add_tap("tap0", "10.0.0.1/24", 1500);
    let mut config = config(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.action=net",
        1,
    );
    let mut net = ember::NetConfig::new("tap0");
    net.mac = Some("06:00:0a:00:00:02".parse().unwrap());
    config.nets.push(net);
    let mut vm = first.run(|| Vm::start(&config)).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "net=ready");
    vm.pause().unwrap();
    let dir = snapshot_dir("net");
    vm.snapshot(&config, &SnapshotPaths::in_dir(&dir)).unwrap();
    vm.stop();

    // A clone's network: its own namespace and TAP, with the address the guest knows its peer
    // by (the guest's ARP cache came with the snapshot).
    let second = NetNs::new("snap-b");
    second.add_tap("tap-clone", "10.0.0.1/24", 1500);
    second.ip(&[
        "link",
        "set",
        "tap-clone",
        "address",
        &tap_mac(&first, "tap0"),
    ]);
    drop(first);
    let mut command = second.command(common::ember());
    command.args([
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--net",
        "tap=tap-clone,id=tap0",
    ]);
    let ember = common::Ember::spawn_command(command);
    let out = second
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "10", "10.0.0.2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "no ping answer from the restored guest: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ember.stop(common::GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ten_clones_of_one_snapshot_run_at_once_each_from_the_saved_count() {
    if !kvm_available() {
        return;
    }
    let (paths, saved) = counting_snapshot("clones", 1);
    let mut clones: Vec<Vm> = (0..10)
        .map(|_| {
            let restore = |c: &mut VmConfig| {
                c.console = ConsoleConfig::None;
                Ok(())
            };
            Vm::restore(&paths, restore, true).unwrap().0
        })
        .collect();
    for clone in &clones {
        wait_moving(clone, saved);
    }
    // Private memory: one clone's writes are not another's.
    clones[0].pause().unwrap();
    let frozen = counter(&clones[0]);
    let other = wait_moving(&clones[1], frozen.max(saved));
    assert!(other > saved);
    assert_eq!(counter(&clones[0]), frozen);
    for clone in &mut clones {
        assert_eq!(clone.stop(), ExitReason::Stopped);
    }
    let _ = std::fs::remove_dir_all(paths.state.parent().unwrap());
}
