//! Snapshot creation and restore with the test guest's serial echo (`guest.action=echo`,
//! 1 vCPU, one disk): a Full snapshot to tmpfs, then restores in fresh `ember` processes,
//! timed from the spawn to the guest echoing a line written to it at once (the restored guest
//! running again, as its user sees it), beside a cold boot of the same guest to its
//! `echo=ready`; 128 MiB and 2 GiB; and 10 clones of one snapshot (its disk read-only) restored
//! at once.
//!
//! First, snapshot creation alone: Full and Diff snapshots of a 128 MiB guest that tracks dirty
//! pages, to tmpfs, the Diff with 0 to 64 MiB written since the last snapshot.
//!
//! `cargo bench --bench snapshot [-- --runs N] [--creation-only]` (default 20 runs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::test_guest;
use ember::bench::stats::Summary;
use ember::vmm::persist::{MemoryKind, SnapshotPaths};
use ember::{ConsoleConfig, DiskConfig, Vm, VmConfig};

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ember-bench-snap-{}", std::process::id()))
}

/// Boots the echo guest with `mib` MiB and a disk, snapshots it paused into `dir`.
fn make_snapshot(dir: &Path, mib: u64, read_only: bool) -> Duration {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "guest.action=echo".into();
    config.console = ConsoleConfig::Pipe;
    config.memory_mib = mib;
    let mut disk = DiskConfig::new(&disk);
    disk.read_only = read_only;
    config.disks.push(disk);
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    let mut output = BufReader::new(console.output);
    let mut line = String::new();
    while output.read_line(&mut line).unwrap() > 0 && line.trim_end() != "echo=ready" {
        line.clear();
    }
    vm.pause().unwrap();
    let start = Instant::now();
    vm.snapshot(&config, &SnapshotPaths::in_dir(dir)).unwrap();
    let took = start.elapsed();
    vm.stop();
    took
}

fn spawn(args: &[&str]) -> Child {
    Command::new(common::ember())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Spawn -> the line `wanted` on stdout (after writing `send`, if any, at once).
fn time_to_line(mut child: Child, send: Option<&[u8]>, wanted: &str) -> (Duration, Child) {
    let start = Instant::now();
    if let Some(bytes) = send {
        child.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(output.read_line(&mut line).unwrap() > 0, "no {wanted:?}");
        if line.trim_end() == wanted {
            return (start.elapsed(), child);
        }
    }
}

fn finish(mut child: Child) {
    let _ = child.stdin.as_mut().unwrap().write_all(b"reset\n");
    let _ = child.wait();
}

fn summary(what: &str, samples: &[Duration]) {
    let s = Summary::of(samples).unwrap();
    println!(
        "{what:<34} p50 {:>7} ms  p99 {:>7} ms  min {:>7} ms  ({} runs)",
        ms(s.p50),
        ms(s.p99),
        ms(s.min),
        samples.len()
    );
}

/// Full and Diff creation times of a paused 128 MiB echo guest tracking dirty pages, into
/// `dir` on tmpfs. Each Diff follows a snapshot, with `dirty` MiB written by ember between
/// (what the guest itself wrote meanwhile: a few pages).
fn creation(dir: &Path, runs: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let paths = SnapshotPaths::in_dir(dir);
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "guest.action=echo".into();
    config.console = ConsoleConfig::Pipe;
    config.memory_mib = 128;
    config.track_dirty_pages = true;
    let mut vm = Vm::start(&config).unwrap();
    let mut output = BufReader::new(vm.take_console().unwrap().output);
    let mut line = String::new();
    while output.read_line(&mut line).unwrap() > 0 && line.trim_end() != "echo=ready" {
        line.clear();
    }
    vm.pause().unwrap();
    let take = |vm: &mut Vm, kind| {
        let start = Instant::now();
        vm.snapshot_of(&config, &paths, kind).unwrap();
        start.elapsed()
    };
    let full: Vec<Duration> = (0..runs).map(|_| take(&mut vm, MemoryKind::Full)).collect();
    summary("128 MiB Full (idle guest)", &full);
    let diff: Vec<Duration> = (0..runs).map(|_| take(&mut vm, MemoryKind::Diff)).collect();
    summary("128 MiB Diff, nothing written", &diff);
    // 1 MiB from 8 MiB up, away from the test guest's own pages.
    let ones = vec![0xa5u8; 1 << 20];
    let write = |vm: &Vm, mib: u64| {
        for i in 0..mib {
            vm.write_memory((8 << 20) + (i << 20), &ones).unwrap();
        }
    };
    for dirty in [1u64, 16, 64] {
        let mut samples = Vec::new();
        for _ in 0..runs {
            write(&vm, dirty);
            samples.push(take(&mut vm, MemoryKind::Diff));
        }
        summary(&format!("128 MiB Diff, {dirty} MiB written"), &samples);
    }
    // Every page of guest memory holding data: the Full that writes all 128 MiB.
    write(&vm, 120);
    let full: Vec<Duration> = (0..runs).map(|_| take(&mut vm, MemoryKind::Full)).collect();
    summary("128 MiB Full (120 MiB of data)", &full);
    vm.stop();
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let mut runs = 20;
    let mut creation_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--runs" {
            runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs);
        }
        creation_only |= arg == "--creation-only";
    }
    let root = scratch();
    creation(&root.join("creation"), runs);
    if creation_only {
        return;
    }
    let guest = test_guest().to_str().unwrap().to_owned();
    for mib in [128u64, 2048] {
        let dir = root.join(format!("{mib}"));
        let created = make_snapshot(&dir, mib, false);
        println!("{mib} MiB: Full snapshot to tmpfs took {} ms", ms(created));
        let dir_arg = dir.to_str().unwrap().to_owned();
        let disk = dir.join("disk.img");
        let disk_arg = format!("path={}", disk.display());
        let mem = mib.to_string();
        let (mut restores, mut boots) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let child = spawn(&["run", "--restore", &dir_arg]);
            let (took, child) = time_to_line(child, Some(b"restored\n"), "restored");
            restores.push(took);
            finish(child);
            let child = spawn(&[
                "run",
                "--kernel",
                &guest,
                "--memory",
                &mem,
                "--disk",
                &disk_arg,
                "--cmdline",
                "guest.action=echo",
            ]);
            let (took, child) = time_to_line(child, None, "echo=ready");
            boots.push(took);
            finish(child);
        }
        summary(&format!("{mib} MiB restore -> guest echoes"), &restores);
        summary(&format!("{mib} MiB cold boot -> echo=ready"), &boots);
    }
    // Ten clones of one snapshot at once (each its own process and private memory; the disk
    // read-only, since clones cannot share a writable image).
    let dir = root.join("clones");
    make_snapshot(&dir, 128, true);
    let dir_arg = dir.to_str().unwrap().to_owned();
    let mut walls = Vec::new();
    for _ in 0..runs.min(10) {
        let start = Instant::now();
        let children: Vec<Child> = (0..10)
            .map(|_| {
                let mut child = spawn(&["run", "--restore", &dir_arg]);
                child.stdin.as_mut().unwrap().write_all(b"clone\n").unwrap();
                child
            })
            .collect();
        let waiting: Vec<_> = children
            .into_iter()
            .map(|child| std::thread::spawn(move || time_to_line(child, None, "clone").1))
            .collect();
        let done: Vec<Child> = waiting.into_iter().map(|t| t.join().unwrap()).collect();
        walls.push(start.elapsed());
        done.into_iter().for_each(finish);
    }
    summary("10 clones at once, all echoing", &walls);
    let _ = std::fs::remove_dir_all(root);
}
