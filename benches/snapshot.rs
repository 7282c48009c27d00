//! Snapshot creation and restore with the test guest's serial echo (`guest.action=echo`,
//! 1 vCPU, one disk): a Full snapshot to tmpfs, then restores in fresh `ember` processes,
//! timed from the spawn to the guest echoing a line written to it at once (the restored guest
//! running again, as its user sees it), beside a cold boot of the same guest to its
//! `echo=ready`; 128 MiB and 2 GiB; and 10 clones of one snapshot (its disk read-only) restored
//! at once.
//!
//! `cargo bench --bench snapshot [-- --runs N]` (default 20).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::test_guest;
use ember::bench::stats::Summary;
use ember::vmm::persist::SnapshotPaths;
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

fn main() {
    let mut runs = 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--runs" {
            runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs);
        }
    }
    let root = scratch();
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
